"""Port proxy: a request whose Host is `{port}-{capsule_id}.{any domain}` reaches the TCP service
listening on that port inside the capsule (on its loopback: the guest agent connects there, not
over the NIC).

An ASGI middleware in front of every route (`create_app` installs it): other Hosts go on to the
API unchanged. Each proxied request opens one connection in the guest (`HostAgent.tcp_connect`).

- routing.py: the Host names the capsule and port; the capsule's guest (through the gateway)
  opens the connection.
- http_relay.py: the request is sent on with `Connection: close` (method, path and query as
  received, the headers minus hop-by-hop ones and `X-API-Key`, plus `X-Forwarded-For/-Proto/-Host`:
  headers.py), the body streamed both ways.
- websocket.py: the proxy does the WebSocket handshake with the service, then relays messages.

Errors (before anything was sent to the client) use the API's shape `{"error": {"code",
"message"}}`: unknown capsule 404 `not_found`; capsule not running 409 `invalid_state`; nothing
listening on the port, or no valid answer from the service, 502 `agent_error`; bad port 400.

Auth: like Wrenn's and E2B's proxies, none by default: the URL is the secret (a capsule id has
25 random base-36 characters, ~129 bits, from `secrets`), so `get_url()` links work in a browser.
Setting WRENN_PROXY_REQUIRE_API_KEY=1 requires the X-API-Key of the capsule's team instead. The
X-API-Key header is never passed into the capsule.

While a request or WebSocket is open the capsule counts as busy (no auto-pause) and traffic records
activity (at most once a second per capsule).
"""

from __future__ import annotations

from typing import Any

from wrenn_control.proxy.headers import header
from wrenn_control.proxy.http_relay import relay_http
from wrenn_control.proxy.routing import parse_target
from wrenn_control.proxy.websocket import bridge_websocket

__all__ = ["PortProxy", "parse_target"]


class PortProxy:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = header(scope, b"host")
            target = parse_target(host.decode("latin-1")) if host else None
            if target is not None:
                port, capsule_id = target
                if scope["type"] == "http":
                    await relay_http(scope, receive, send, port, capsule_id)
                else:
                    await bridge_websocket(scope, receive, send, port, capsule_id)
                return
        await self.app(scope, receive, send)
