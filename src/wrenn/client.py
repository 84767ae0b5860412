"""Public alias of :mod:`wrenn._client`, at the import path the published SDK uses."""

from wrenn._client import AsyncWrennClient, WrennClient

__all__ = ["AsyncWrennClient", "WrennClient"]
