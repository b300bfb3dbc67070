"""uvicorn's HTTP/1.1 protocol with a header timeout: a client that connects and sends its request line and headers
slowly (or not at all) is disconnected after ``header_timeout`` seconds, instead of holding a connection forever
(uvicorn times out only idle keep-alive connections)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # httptools' C parser (uvicorn[standard], in cellcls[deploy]) is several times faster than pure-Python h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol
except ImportError:  # pragma: no cover - depends on the install
    BaseProtocol = H11Protocol  # type: ignore[assignment,misc]


class HeaderTimeoutProtocol(BaseProtocol):  # type: ignore[valid-type,misc]
    """uvicorn's HTTP protocol closing connections whose headers take longer than ``header_timeout`` seconds."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            if not self.transport.is_closing():
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        self._arm() if waiting_for_headers else self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, subclassed to close connections whose headers take longer than ``seconds``."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": float(seconds)})
