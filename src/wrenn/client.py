"""Public alias of :mod:`wrenn._client` and :mod:`wrenn._async_client`, at the import path the
published SDK uses."""

from wrenn._async_client import AsyncWrennClient
from wrenn._client import WrennClient

__all__ = ["AsyncWrennClient", "WrennClient"]
