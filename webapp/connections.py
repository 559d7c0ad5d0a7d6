"""Connection limits in front of uvicorn: a deadline for each request head, a cap per client and in all.

uvicorn (h11) has no header-read deadline: a client that sends ``GET / HTTP/1.1\\r\\n`` and then one header
byte now and then (slowloris) keeps its socket forever, and a few hundred of them exhaust the process's
file descriptors (``accept`` fails with EMFILE; good clients time out). :func:`guarded_protocol` returns a
subclass of uvicorn's h11 protocol, passed to ``uvicorn.run(http=...)``, that

* closes a connection whose request head is not complete ``head_timeout`` seconds after it opened or after
  its previous response ended (a 408 is written first); the body and the app's work are not timed here;
* refuses, with a 503 and a close, a connection beyond ``max_connections`` in all or beyond
  ``max_per_client`` from one client address (0: no per-client cap; behind a reverse proxy every client
  has the proxy's address, so the proxy must do the per-client limiting).

uvicorn's own ``limit_concurrency`` and ``timeout_keep_alive`` are set beside it (:func:`uvicorn_options`), and
its ``backlog``: asyncio accepts up to ``backlog`` connections in one burst, and a burst's sockets reach
``connection_made`` (where they are refused) only two loop turns later, by when up to two more bursts were
accepted; so ``max_connections + 3 * backlog`` descriptors must fit the open-file limit. Refusals and closes are logged
at most once per :data:`LOG_EVERY_S` seconds (with a count), so a flood cannot fill the log.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("uvicorn.error")

REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
FILES_SPARE = 64  # descriptors kept for the model, uploads, job files and logs
LOG_EVERY_S = 10.0
BURSTS_IN_FLIGHT = 3  # accept bursts whose sockets may be open before the first is refused (see above)


class _ThrottledLog:
    """One warning per ``every`` seconds per kind of event, saying how many happened since the last one."""

    def __init__(self, every: float = LOG_EVERY_S):
        self.every, self.last, self.count = every, {}, {}

    def __call__(self, kind: str, message: str, *args) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) >= self.every:
            n, self.count[kind], self.last[kind] = self.count[kind], 0, now
            logger.warning(message + (f" ({n} such in the last {self.every:g} s)" if n > 1 else ""), *args)


def _response(head: bytes, detail: str) -> bytes:
    body = b'{"detail": "' + detail.encode() + b'"}'
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def guarded_protocol(head_timeout: float, max_connections: int, max_per_client: int) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass enforcing the limits above (seconds, connection counts)."""

    log = _ThrottledLog()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            ip = self.client[0] if self.client else None
            if len(self.connections) > max_connections:
                return self._refuse(f"{max_connections} connections open already")
            if max_per_client and ip is not None:
                mine = sum(1 for p in self.connections if p.client and p.client[0] == ip)
                if mine > max_per_client:
                    return self._refuse(f"{max_per_client} connections from {ip} open already")
            self._arm_head_timer()

        def _refuse(self, why: str) -> None:
            log("refused", "refused a connection from %s: %s", self.client[0] if self.client else "?", why)
            self.transport.write(_response(REFUSED, f"server busy: {why}; retry shortly"))
            self.transport.close()
            self.connections.discard(self)  # counts no more: closing takes a loop turn, a burst many

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            waiting_for_head = self.conn.their_state is h11.IDLE and (
                self.cycle is None or self.cycle.response_complete
            )
            if self.transport.is_closing() or not waiting_for_head:
                return  # a request is in progress: on_response_complete re-arms the timer
            log(
                "head",
                "closed a connection from %s: request head not complete within %g s",
                self.client[0] if self.client else "?",
                head_timeout,
            )
            self.transport.write(_response(TIMED_OUT, f"request head not complete within {head_timeout:g} s"))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_options(
    head_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    max_connections: int = 64,
    max_per_client: int = 16,
    backlog: int = 64,
) -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: the guarded protocol and uvicorn's own limits.

    ``max_connections`` and one accept burst (``backlog``) must leave file descriptors for the app: when
    ``max_connections + 3 * backlog + FILES_SPARE`` exceeds the open-file limit (``ulimit -n``), ``backlog``
    and ``max_connections`` are lowered to fit, with a warning.
    """
    if head_timeout <= 0 or keep_alive_timeout <= 0 or max_connections < 1 or max_per_client < 0 or backlog < 1:
        raise ValueError(
            "timeouts must be positive, max_connections and backlog at least 1, max_per_client 0 or more"
        )
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = soft - FILES_SPARE if soft != resource.RLIM_INFINITY else 1 << 30
    if max_connections + BURSTS_IN_FLIGHT * backlog > room:
        backlog = max(1, min(backlog, room // (2 * BURSTS_IN_FLIGHT)))
        max_connections = max(1, min(max_connections, room - BURSTS_IN_FLIGHT * backlog))
        logger.warning(
            "open-file limit %d: at most %d connections, accepted %d at a time", soft, max_connections, backlog
        )
    return {
        "http": guarded_protocol(head_timeout, max_connections, max_per_client),
        "limit_concurrency": max_connections + 1,  # uvicorn answers 503 from this many (ours refuse beyond)
        "timeout_keep_alive": keep_alive_timeout,
        "backlog": backlog,
    }
