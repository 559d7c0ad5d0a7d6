"""PerX2CT server, issue 23 items 6 and 7: bad frames never kill a client thread; one handshake deadline.

The server runs in a thread of this process (the ``server`` fixture of test_perx2ct_tools), so an uncaught
exception in a client thread reaches ``threading.excepthook``, which these tests record.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time

import pytest
from helpers import read_until_closed
from test_perx2ct_tools import KEY, frame, predictor, read_reply, send_raw, server  # noqa: F401 (fixtures)

from bundles.perx2ct.scripts.server import (
    CLIENT_LIMITS,
    PROTOCOL,
    PerX2CTClient,
    _mac,
    read_message,
)

LOGGER = "bundles.perx2ct.scripts.server"


@pytest.fixture()
def thread_errors(monkeypatch) -> list:
    """Exceptions that escaped any thread while the test ran."""
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def server_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def answer_challenge(port: int, answer_for) -> tuple[dict, bool]:
    """Connect, read the challenge, send ``answer_for(nonce)``; returns the server's reply and whether it closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        hello = read_message(sock, CLIENT_LIMITS, 30, 30)
        sock.sendall(frame(answer_for(bytes.fromhex(hello["challenge"]))))
        reply = read_message(sock, CLIENT_LIMITS, 30, 30)
        return reply, read_until_closed(sock) == b""


HANDSHAKES = [  # (answer to the challenge, what the reply says)
    (lambda nonce: {"protocol": PROTOCOL, "response": "é" * 64, "challenge": "00" * 32}, "authentication"),
    (lambda nonce: {"protocol": PROTOCOL, "response": "\ud800" * 64, "challenge": "00" * 32}, "authentication"),
    (lambda nonce: {"protocol": PROTOCOL, "response": 12, "challenge": "00" * 32}, "authentication"),
    (lambda nonce: {"protocol": PROTOCOL, "response": _mac(KEY.encode(), b"client", nonce), "challenge": "zz" * 32},
     "challenge"),
    (lambda nonce: {"protocol": PROTOCOL, "response": _mac(KEY.encode(), b"client", nonce), "challenge": "é" * 64},
     "challenge"),
]  # fmt: skip

FRAMES = [  # (a frame after authentication, what the error reply says)
    (frame({"arrays": [{"name": "cmd", "dtype": "uint8", "shape": [2]}]}, b"\0\0"), "cmd"),
    (frame({"arrays": [{"name": "cmd", "dtype": "uint8", "shape": [1]}]}, b"\0"), "cmd"),
    (frame({"cmd": ["shutdown"]}), "cmd"),
    (frame({"cmd": {"shutdown": 1}}), "cmd"),
    (frame({"arrays": [{"name": "x", "dtype": "uint8", "shape": [0, 2**40, 2**40]}]}), "shape"),
    (frame({"arrays": [{"name": "x", "dtype": "float64", "shape": [0, 2**70]}]}), "shape"),
    (frame({"arrays": [{"name": "frontal", "dtype": "uint8", "shape": [2**62, 0]}]}), "shape"),
]


def test_bad_handshakes_get_a_reply_a_close_and_one_log_line(server, caplog, thread_errors):  # noqa: F811 (the imported fixture)
    """Item 6: a non-ASCII HMAC response used to raise TypeError in the client thread (no reply, a traceback)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = server()
    for answer_for, expected in HANDSHAKES:
        before = len(server_records(caplog))
        reply, closed = answer_challenge(port, answer_for)
        assert reply["ok"] is False and expected in reply["error"], reply
        assert closed
        new = server_records(caplog)[before:]
        assert len(new) == 1 and "handshake" in new[0], new
    assert thread_errors == []
    with PerX2CTClient(port=port, authkey=KEY, timeout=30) as client:
        assert client.ping()


def test_bad_frames_get_an_error_reply_and_one_log_line(server, caplog, thread_errors):  # noqa: F811 (the imported fixture)
    """Item 6: an array named ``cmd`` (ValueError on ``==``), a zero-size array with a huge dimension."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = server()
    with PerX2CTClient(port=port, authkey=KEY, timeout=30) as client:
        for data, expected in FRAMES:
            before = len(server_records(caplog))
            send_raw(client, data)
            reply = read_reply(client)
            assert reply["ok"] is False and expected in reply["error"], (data[:120], reply)
            assert len(server_records(caplog)[before:]) <= 1
            assert client.ping()  # the connection stays usable
    assert thread_errors == []


def drip(port: int, start_after: float, period: float, closed: dict, key: int) -> None:
    """Read the challenge, wait, then send the answer one byte every ``period`` s; note when the server hangs up."""
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        read_message(sock, CLIENT_LIMITS, 30, 30)
        answer = frame({"protocol": PROTOCOL, "response": "0" * 64, "challenge": "0" * 64})
        time.sleep(max(0.0, start_after - (time.monotonic() - t0)))
        for byte in answer:
            try:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], period)[0] and not sock.recv(4096):
                    break
            except OSError:
                break
        closed[key] = time.monotonic() - t0


def test_handshake_has_one_deadline_against_drip_feeding(server, thread_errors):  # noqa: F811 (the imported fixture)
    """Item 7: the first byte just before the timeout used to restart the clock for the rest of the frame.

    With ``handshake_timeout`` T = 2 s, a client that starts its answer at 0.8 T and drips a byte every 0.1 s
    is now dropped at T; before, at 0.8 T + T = 3.6 s. Four drippers fill ``max_clients`` = 4: a good client
    gets in once they are dropped. The bound 2.9 s lies halfway between the two.
    """
    timeout = 2.0
    port = server(handshake_timeout=timeout, max_clients=4)
    closed: dict = {}
    threads = [threading.Thread(target=drip, args=(port, 0.8 * timeout, 0.1, closed, k)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)  # all four hold their slot
    served_after = None
    while time.monotonic() - t0 < 10 and served_after is None:
        try:
            with PerX2CTClient(port=port, authkey=KEY, timeout=30) as client:
                if client.ping():
                    served_after = time.monotonic() - t0
        except ConnectionError:  # "server busy": every slot is held by a dripper
            time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert sorted(closed) == [0, 1, 2, 3]
    assert all(timeout - 0.1 <= s < 2.9 for s in closed.values()), closed
    assert served_after is not None and served_after < 2.9, (served_after, closed)
    assert thread_errors == []
    print(json.dumps({"dripper_dropped_after_s": sorted(round(s, 2) for s in closed.values()),
                      "good_client_served_after_s": round(served_after, 2)}))  # fmt: skip
