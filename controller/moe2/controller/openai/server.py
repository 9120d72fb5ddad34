"""Serving the front with uvicorn, guarded against slow clients.

uvicorn closes an idle keep-alive connection (``keep_alive_s``) but waits forever for the
headers of a request that has begun, or of the first one on a new connection: a client that
opens connections and sends nothing (or a byte a minute) would hold them all. Here a
connection that has not sent a complete request head within ``header_timeout_s`` of opening
(or of its previous response) is closed; the body has ``body_timeout_s`` (``app.py``: 408).
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from moe2.controller.openai.settings import HttpSettings

log = logging.getLogger(__name__)


def guarded_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing connections that send no request head in time."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            # IDLE: h11 has not seen a whole request line and headers since the last response.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("closing %s: no request head within %g s", client, header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


def run(app: ASGIApp, settings: HttpSettings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        log_config=None,
        access_log=False,  # ours (app.Observed) carries the model and the real status
        lifespan="off",
    )
    uvicorn.Server(config).run()
