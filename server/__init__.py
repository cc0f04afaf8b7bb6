"""Switchboard's server side: the core (engine), the runtime (registry, batcher, training) and the HTTP edge."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("switchboard")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
