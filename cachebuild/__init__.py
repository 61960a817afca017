"""cachebuild: build the signed onboard map cache for a GPS-denied flight.

The library has no doit imports outside :mod:`cachebuild.runner`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
