"""Web app, issue 23 items 5 and 8: connection limits and a head deadline in front of uvicorn; strict Host parsing.

The connection guard is tested on a stand-in ASGI app behind the real uvicorn on 127.0.0.1 (the whole web app
under a slow-header attack is in test_soak.py). A second loopback address, 127.0.0.2, plays the attacker, so
the per-client cap is seen to spare other clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from helpers import free_port, read_until_closed

pytest.importorskip("uvicorn")

from webapp.connections import uvicorn_options  # noqa: E402
from webapp.security import RequestGuard, split_host  # noqa: E402

ATTACKER = "127.0.0.2"
HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a request head without its final blank line


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture()
def guarded_server():
    """``start(**limits)`` serves :func:`hello` through uvicorn with :func:`uvicorn_options`; returns the port."""
    import uvicorn

    servers = []

    def start(**limits) -> int:
        port = free_port()
        config = uvicorn.Config(hello, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(**limits))
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def get(port: int, source: str = "127.0.0.1") -> bytes:
    """One complete GET on a fresh connection; the raw response."""
    with connect(port, source) as sock:
        sock.sendall(HEAD + b"Connection: close\r\n\r\n")
        return read_until_closed(sock, 10)


def test_head_deadline_closes_slow_headers_and_keeps_good_clients(guarded_server):
    """A head dripped a line at a time used to hold its connection forever; now closed with 408 at the deadline."""
    timeout = 1.0
    port = guarded_server(head_timeout=timeout, max_connections=32, max_per_client=8)
    slow = connect(port)
    t0 = time.monotonic()
    slow.sendall(HEAD)
    for k in range(30):  # a header line every 0.1 s: the old rule "some bytes keep it alive" would never fire
        try:
            slow.sendall(b"X-%d: y\r\n" % k)
        except OSError:
            break
        time.sleep(0.1)
    answer = read_until_closed(slow, 10)
    elapsed = time.monotonic() - t0
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"head" in answer, answer
    assert timeout - 0.05 <= elapsed < timeout + 1.5, elapsed  # not the 3 s of dripping
    assert get(port).startswith(b"HTTP/1.1 200")

    # after a complete response, the next head on the same (keep-alive) connection has its own deadline
    with connect(port) as sock:
        sock.sendall(HEAD + b"\r\n")
        first = b""
        while not first.endswith(b"ok"):  # head and body may come in separate segments
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        t0 = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")  # keeps the keep-alive timer from closing it
        later = read_until_closed(sock, 10)
        assert later.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < timeout + 1.5, later


@pytest.mark.parametrize("per_client", [3, 0])
def test_connection_caps_per_client_and_in_all(guarded_server, per_client):
    """An attacker's idle connections past the cap are refused at once (503, closed), sparing other clients.

    ``per_client`` 0 (behind a proxy) leaves only the total cap, ``max_connections`` = 6.
    """
    port = guarded_server(head_timeout=30.0, max_connections=6, max_per_client=per_client)
    held = [connect(port, ATTACKER) for _ in range(8)]
    answers = []
    for sock in held:  # a refused one has its 503 and EOF waiting; a held one times out
        sock.settimeout(0.5)
        try:
            answers.append(sock.recv(4096))
        except TimeoutError:
            answers.append(None)
    kept = sum(a is None for a in answers)
    refused = [a for a in answers if a is not None]
    assert kept == (per_client or 6) and all(a.startswith(b"HTTP/1.1 503") for a in refused), answers
    reply = get(port)
    if per_client:
        assert reply.startswith(b"HTTP/1.1 200"), reply  # another address is not held back
    else:
        assert reply.startswith(b"HTTP/1.1 503") and b"busy" in reply, reply  # the total cap holds
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while not (reply := get(port)).startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
        time.sleep(0.05)  # the server sees the closes
    assert reply.startswith(b"HTTP/1.1 200")


def test_bad_limits_are_refused():
    for bad in (dict(head_timeout=0), dict(max_connections=0), dict(max_per_client=-1)):
        with pytest.raises(ValueError):
            uvicorn_options(**bad)


GOOD_HOSTS = [
    ("127.0.0.1", ("127.0.0.1", None)),
    ("localhost:8000", ("localhost", "8000")),
    ("LocalHost", ("localhost", None)),
    ("[::1]", ("::1", None)),
    ("[::1]:8000", ("::1", "8000")),
    ("[0:0:0:0:0:0:0:1]:80", ("::1", "80")),  # written out: the same name as "::1"
    ("ct.example.org:443", ("ct.example.org", "443")),
    ("my_host-1.lan", ("my_host-1.lan", None)),
    (" localhost ", ("localhost", None)),  # optional whitespace around a header value
]
BAD_HOSTS = [
    "[::1]evil.example",  # the case: was read as ::1
    "[::1]:80evil.example",
    "[::1]:8000:1",
    "[::1",
    "[evil.example]",
    "[::1%lo]",
    "::1",  # IPv6 needs brackets
    "evil.example@localhost",
    "localhost@evil.example",
    "localhost:8000/evil",
    "localhost:",
    "localhost:0",
    "localhost:65536",
    "localhost:+80",
    "localhost:٨٠٠٠",  # Arabic-Indic digits: str.isdigit() says yes
    "ｌｏｃａｌｈｏｓｔ",  # fullwidth letters
    "local host",
    "localhost\x00.evil.example",
    "a..b",
    ".localhost",
    "localhost.",
    "-evil.example",
    "",
    "x" * 300,
]


@pytest.mark.parametrize(("value", "expected"), GOOD_HOSTS)
def test_split_host_reads_good_hosts(value, expected):
    assert split_host(value) == expected


@pytest.mark.parametrize("value", BAD_HOSTS)
def test_split_host_refuses_malformed_hosts(value):
    with pytest.raises(ValueError):
        split_host(value)


@pytest.mark.parametrize(("host", "status"), [("[::1]evil.example", 400), ("[::1]:8000", 200), ("localhost:٨", 400)])
def test_request_guard_answers_malformed_host_with_400(host, status):
    """Item 8: the guard in front of the app used the lenient reading: ``[::1]evil.example`` was served (200)."""
    guard = RequestGuard(hello, allowed_hosts=["127.0.0.1", "localhost", "::1"], max_body_bytes=1000)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "headers": [(b"host", host.encode("utf-8"))], "scheme": "http"}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == status, sent
    if status == 400:
        assert "not served" in json.loads(sent[1]["body"])["detail"]
