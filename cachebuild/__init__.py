"""cachebuild: build the signed onboard map cache for a GPS-denied flight.

The library has no doit imports outside :mod:`cachebuild.runner` and the
command modules beside it (:mod:`cachebuild.doitcmds`, :mod:`cachebuild.doitrun`).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
