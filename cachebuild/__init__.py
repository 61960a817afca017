"""cachebuild: build the signed onboard map cache for a GPS-denied flight.

The library has no doit imports outside :mod:`cachebuild.cli.runner` and the
command modules beside it (:mod:`cachebuild.cli.doitcmds`, :mod:`cachebuild.cli.doitrun`).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
