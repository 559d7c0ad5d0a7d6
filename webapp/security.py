"""Request guards in front of the app: Host and Origin checks and a body limit enforced while streaming.

Written as one small ASGI middleware because Starlette's ``TrustedHostMiddleware`` and
``RequestBodyLimitMiddleware`` answer in plain text (the page shows every error's JSON ``detail``)
and neither checks ``Origin``.

* Host (DNS rebinding): a page on ``evil.example`` whose name resolves to 127.0.0.1 reaches us with
  ``Host: evil.example``; only the configured host names are served (400 otherwise).
* Origin (CSRF): a state-changing request (POST, PUT, PATCH, DELETE) that a browser sends from another
  site carries its ``Origin``; it must be this server's own origin (403 otherwise). Requests without
  ``Origin`` (curl, scripts) pass: they cannot ride on a victim's browser.
* Body size: counted as the bytes arrive, chunked transfer encoding included, so an oversized body is
  refused with 413 after at most ``max_body_bytes`` bytes instead of being spooled to disk first.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"({_LABEL}(?:\.{_LABEL})*)(?::([0-9]{{1,5}}))?", re.ASCII)
_IP_LITERAL = re.compile(r"\[([0-9a-f:.]+)\](?::([0-9]{1,5}))?", re.ASCII)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; FastAPI answers it as JSON 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit / 1e6:.1f} MB: upload smaller files")


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> set[str]:
    """Host names served when bound to ``bind_host``: loopback names, the bound name, ``extra``.

    Bound to a wildcard (``0.0.0.0``), the machine's own host names are added too.
    """
    hosts = {h.lower() for h in LOCAL_NAMES} | {h.strip().lower() for h in extra if h.strip()}
    if bind_host in WILDCARDS:
        hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        hosts.add(bind_host.strip("[]").lower())
    return hosts


def split_host(value: str) -> tuple[str, str | None]:
    """``"Example.org:8000"`` -> (``"example.org"``, ``"8000"``); IPv6 ``"[::1]:80"`` -> (``"::1"``, ``"80"``).

    Strict (RFC 3986 host and port, DNS names and IP literals only): anything else, e.g. ``"[::1]evil.example"``,
    ``"a@b"``, a port over 65535 or non-ASCII digits, raises ``ValueError`` instead of being read leniently.
    """
    value = value.strip().lower()
    if len(value) > 260:
        raise ValueError("host name too long")
    if value.startswith("["):
        match = _IP_LITERAL.fullmatch(value)
        if match is None:
            raise ValueError(f"malformed IPv6 host {value!r}")
        try:
            name = str(ipaddress.IPv6Address(match.group(1)))
        except ValueError:
            raise ValueError(f"malformed IPv6 address in {value!r}") from None
    else:
        match = _HOST.fullmatch(value)
        if match is None or len(match.group(1)) > 253:
            raise ValueError(f"malformed host {value!r}")
        name = match.group(1)
    port = match.group(2)
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return name, port


def host_name(value: str) -> str | None:
    """The name part of a ``Host`` header, or None when it is malformed (see :func:`split_host`)."""
    try:
        return split_host(value)[0]
    except ValueError:
        return None


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (sandboxed frames, file://) and anything odd
    default = {"http": "80", "https": "443"}
    try:
        o_name, o_port = split_host(parts.netloc)
        h_name, h_port = split_host(host)
    except ValueError:
        return False
    return o_name == h_name and (o_port or default[parts.scheme]) == (h_port or default.get(scheme, "80"))


class RequestGuard:
    """ASGI middleware: refuse foreign hosts and cross-site writes, limit the body while it streams."""

    def __init__(self, app, allowed_hosts: Iterable[str], max_body_bytes: int):
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host_name(host) not in self.allowed_hosts:
            return await _json(send, 400, f"host {host!r} is not served here (see --allowed_hosts)")
        method = scope["method"].upper()
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not _same_origin(origin, host, scope.get("scheme", "http")):
                return await _json(send, 403, f"cross-origin request from {origin!r} refused")
            if headers.get("sec-fetch-site") == "cross-site":
                return await _json(send, 403, "cross-site request refused")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _json(send, 413, BodyTooLarge(self.max_body_bytes).detail)

        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route (no FastAPI handler turned it into a reply)
            if started:
                raise
            await _json(send, 413, exc.detail)


async def _json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
