"""tarkit: Tar ("Vision as a Dialect") as a modular plugin framework on PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tarkit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
