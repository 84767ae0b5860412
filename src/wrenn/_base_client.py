"""What both clients share: configuration, request building and retry rules (no I/O).

:class:`WrennClient` (:mod:`wrenn._client`) and :class:`AsyncWrennClient`
(:mod:`wrenn._async_client`) build on :class:`_BaseClient`.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

import httpx

from wrenn._calls import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, _Call, _resolve_proxy_domain, _resolve_timeout


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process, shared by every client: building one (loading the CA bundle)
    costs ~20 ms, and `Capsule(...)` makes a client each time. Contexts are safe to share."""
    return httpx.create_ssl_context()


class _BaseClient:
    """Configuration, request building and error translation; no I/O."""

    # Methods safe to resend after a transport failure: they change nothing twice.
    _RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
    _RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
    )
    _MAX_ATTEMPTS = 3
    _RETRY_BACKOFF = 0.3  # seconds, doubled on each retry

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        proxy_domain: str | None,
        timeout: httpx.Timeout | float | None,
    ) -> None:
        key = api_key or os.environ.get(ENV_API_KEY)
        if not key:
            raise ValueError(
                f"No Wrenn API key: pass api_key= or set the {ENV_API_KEY} environment variable."
            )
        self._api_key = key
        self._base_url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        self._proxy_domain = _resolve_proxy_domain(self._base_url, proxy_domain)
        self._timeout = _resolve_timeout(timeout)

    @property
    def base_url(self) -> str:
        """The API base URL, e.g. ``https://app.wrenn.dev/api``."""
        return self._base_url

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            # Trailing slash so httpx joins "/v1/..." under ".../api", not at the host root.
            "base_url": self._base_url + "/",
            "headers": {"X-API-Key": self._api_key, "User-Agent": "wrenn-python"},
            "timeout": self._timeout,
            "verify": _tls_context(),
        }

    @staticmethod
    def _build_request(http: httpx.Client | httpx.AsyncClient, call: _Call[Any]) -> httpx.Request:
        kwargs: dict[str, Any] = {}
        if call.timeout is not None:
            kwargs["timeout"] = call.timeout
        return http.build_request(
            call.method,
            call.path.lstrip("/"),
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
            content=call.content,
            headers=call.headers,
            **kwargs,
        )

    def _retry_delay(self, request: httpx.Request, attempt: int, exc: Exception) -> float | None:
        """Seconds to wait before resending, or None to give up.

        Only idempotent methods are resent: a POST that failed mid-way may have run.
        """
        if (
            request.method in self._RETRY_METHODS
            and isinstance(exc, self._RETRY_EXCEPTIONS)
            and attempt + 1 < self._MAX_ATTEMPTS
        ):
            return float(self._RETRY_BACKOFF * 2**attempt)
        return None
