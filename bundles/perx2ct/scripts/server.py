"""A long-running PerX2CT inference server on a TCP socket: the model stays loaded between clients.

    export XRAY2CT_SERVER_KEY_FILE=~/.perx2ct.key     # a file of mode 0600 holding the key (or
    python -m bundles.perx2ct.scripts.server [--port 6000] [--bundle_root ...] [--device cuda]
                                                      #  XRAY2CT_SERVER_KEY=<key> in the environment)
    python -m bundles.perx2ct.scripts.server --key_file ~/.perx2ct.key --new_key True   # create one

The key never goes on the command line (every local user can read ``/proc/<pid>/cmdline``):
``--authkey`` is refused. See docs/SECURITY.md for deployment.

Wire format (nothing received is ever unpickled or evaluated). Every message is one frame::

    b"X2CT" | header length (uint32, big-endian) | payload length (uint64) | JSON header | payload

The JSON header is an object; arrays travel as raw little-endian bytes in the payload, described in
``header["arrays"] = [{"name", "dtype", "shape"}, ...]`` (dtype from :data:`DTYPES`). Lengths, dtypes,
shapes and pixel counts are checked against :class:`Limits` before a byte of payload is allocated.

Connection: the server sends a challenge, the client answers with HMAC-SHA256(key, challenge) and
its own challenge, the server proves the key back (mutual authentication, as ``multiprocessing``'s
authkey handshake but without pickles). Then requests, each answered in order:

    ``{"frontal": (H, W) array, "lateral": (H, W) array}`` -> ``{"ok": True, "volume": (N, N, N) float32 HU,
    "spacing": [sx, sy, sz], "affine": 4x4 list}``; ``{"cmd": "ping"}`` -> ``{"ok": True, "pong": True}``;
    ``{"cmd": "shutdown"}`` stops the server. Anything wrong -> ``{"ok": False, "error": "..."}``.

Clients are served concurrently (a thread each, at most ``max_clients``); the model runs one request
at a time. A client that sends nothing is dropped after ``handshake_timeout`` (before authenticating)
or ``idle_timeout`` (between requests); a message must arrive within ``transfer_timeout``. Payload
memory in flight is bounded by ``Limits.memory_budget_bytes`` across all clients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import struct
import sys
import threading
import time

import numpy as np

from common.errors import InputError
from common.keys import env_key, read_private_key

logger = logging.getLogger(__name__)

PROTOCOL = "xray2ct-perx2ct/2"
MAGIC = b"X2CT"
FRAME = struct.Struct("!4sIQ")  # magic, header bytes, payload bytes
DTYPES = ("bool", "uint8", "uint16", "int16", "int32", "float32", "float64")
KEY_ENV, KEY_FILE_ENV = "XRAY2CT_SERVER_KEY", "XRAY2CT_SERVER_KEY_FILE"
MAX_DIM = 2**31 - 1  # any one array dimension, even of a zero-size array (numpy refuses larger ones)
VIEWS = ("frontal", "lateral")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one side accepts from the other; every check happens before allocating the payload."""

    max_header_bytes: int = 64 * 1024
    max_payload_bytes: int = 128 * 2**20  # two 4096 x 4096 float32 views
    max_arrays: int = 4
    max_ndim: int = 3
    max_pixels: int | None = 4096 * 4096  # per view, after padding to a square (None: unchecked)
    memory_budget_bytes: int = 512 * 2**20  # server: payload bytes of all clients in flight together


CLIENT_LIMITS = Limits(max_payload_bytes=2**33, max_pixels=None)  # replies: up to a 1024^3 float64 volume
HANDSHAKE_LIMITS = Limits(max_header_bytes=4096, max_payload_bytes=0, max_arrays=0)


class ProtocolError(Exception):
    """The peer broke the wire format; ``fatal`` when the stream cannot be resynchronised."""

    def __init__(self, message: str, fatal: bool = True):
        super().__init__(message)
        self.fatal = fatal


# ----------------------------------------------------------------------------------------------- keys
def read_key_file(path: str | os.PathLike) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped); the file must be yours and mode 0600 or stricter."""
    return read_private_key(os.path.expanduser(os.fspath(path)), "key", hint=" (e.g. --new_key True)")


def write_key_file(path: str | os.PathLike) -> str:
    """Create ``path`` (mode 0600, refuses to overwrite) holding a new random 256-bit key in hex."""
    path = os.fspath(os.path.expanduser(os.fspath(path)))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(path, "key file exists already; delete it first to make a new key") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def resolve_key(authkey: str | bytes | None = None, key_file: str | os.PathLike | None = None) -> bytes:
    """The key from (in order) ``authkey``, ``key_file``, ``$XRAY2CT_SERVER_KEY``, ``$XRAY2CT_SERVER_KEY_FILE``."""
    if authkey:
        return authkey.encode() if isinstance(authkey, str) else bytes(authkey)
    if key_file:
        return read_key_file(key_file)
    key = env_key(KEY_ENV)
    if key:
        return key
    if os.environ.get(KEY_FILE_ENV):
        return read_key_file(os.environ[KEY_FILE_ENV])
    raise InputError(
        None, f"no server key: set {KEY_ENV} or {KEY_FILE_ENV}, or pass --key_file (a file of mode 0600)"
    )


# ----------------------------------------------------------------------------------------------- framing
def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot send a {type(value).__name__} (only JSON values and numpy arrays)")


def encode_message(message: dict) -> list:
    """A dict (JSON values, numpy arrays at the top level) -> the frame as a list of buffers to send."""
    if not isinstance(message, dict):
        raise TypeError(f"a message is a dict, got {type(message).__name__}")
    header, arrays = {}, []
    for key, value in message.items():
        if isinstance(value, np.ndarray):
            if value.dtype.name not in DTYPES:
                raise TypeError(f"'{key}': dtype {value.dtype} cannot be sent; use one of {DTYPES}")
            arrays.append((key, np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))))
        else:
            header[key] = value
    if "arrays" in header:
        raise TypeError("'arrays' is reserved by the wire format")
    header["arrays"] = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays]
    text = json.dumps(header, default=_jsonable, allow_nan=False).encode()
    payload = sum(a.nbytes for _, a in arrays)
    return [FRAME.pack(MAGIC, len(text), payload), text] + [memoryview(a).cast("B") for _, a in arrays]


def send_message(sock: socket.socket, message: dict) -> None:
    for buffer in encode_message(message):
        sock.sendall(buffer)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer is too slow")
        sock.settimeout(remaining)
        n = sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytearray:
    buffer = bytearray(n)
    _recv_into(sock, memoryview(buffer), deadline)
    return buffer


def _discard(sock: socket.socket, n: int, deadline: float) -> None:
    """Read and drop ``n`` bytes in small pieces (keeps the stream in sync after a refused header)."""
    scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        chunk = min(n, len(scratch))
        _recv_into(sock, scratch[:chunk], deadline)
        n -= chunk


def parse_array_specs(header: dict, payload_bytes: int, limits: Limits) -> list[tuple[str, np.dtype, tuple]]:
    """Validate ``header["arrays"]`` against the limits and the payload length (nothing allocated)."""
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) > limits.max_arrays:
        raise ProtocolError(f"'arrays' must be a list of at most {limits.max_arrays} entries", fatal=False)
    out, total, names = [], 0, set()
    for spec in specs:
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise ProtocolError("each array needs exactly 'name', 'dtype' and 'shape'", fatal=False)
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or name in names or name in header or name == "arrays":
            raise ProtocolError(f"bad or duplicate array name {name!r}", fatal=False)
        if dtype not in DTYPES:
            raise ProtocolError(f"'{name}': dtype {dtype!r} not allowed; use one of {DTYPES}", fatal=False)
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_ndim
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
        ):
            raise ProtocolError(
                f"'{name}': shape must be at most {limits.max_ndim} integers from 0 to {MAX_DIM}", fatal=False
            )
        names.add(name)
        dt = np.dtype(dtype).newbyteorder("<")
        total += math.prod(shape) * dt.itemsize
        out.append((name, dt, tuple(shape)))
    if total != payload_bytes:
        raise ProtocolError(f"arrays need {total} bytes, the frame carries {payload_bytes}", fatal=False)
    return out


def read_message(
    sock: socket.socket, limits: Limits, idle_timeout: float | None, transfer_timeout: float
) -> dict:
    """One frame -> dict with numpy arrays. Raises :class:`ProtocolError`, ``TimeoutError``, ``ConnectionError``.

    ``idle_timeout``: seconds to wait for the frame to start (None: forever); ``transfer_timeout``: for
    the rest of it once started.
    """
    return read_frame(sock, limits, idle_timeout, transfer_timeout)[0]


def read_frame(
    sock: socket.socket,
    limits: Limits,
    idle_timeout: float | None,
    transfer_timeout: float,
    check_header=None,
    budget: ByteBudget | None = None,
    deadline: float | None = None,
) -> tuple[dict, int]:
    """:func:`read_message` plus the payload size, which the caller gives back to ``budget`` when done.

    ``check_header(header, specs)`` may raise ``ProtocolError(fatal=False)`` to refuse a request from its
    header alone (the payload is then skipped without being stored). ``budget`` (a :class:`ByteBudget`)
    must grant the payload's bytes before they are allocated. ``deadline`` (``time.monotonic()`` seconds): the
    whole frame must have arrived by then, whatever the two timeouts allow (the handshake's single deadline).
    """
    end = deadline if deadline is not None else math.inf
    first = min(end, time.monotonic() + (idle_timeout if idle_timeout is not None else 10**9))
    frame = bytes(_recv_exact(sock, 1, first))
    deadline = min(end, time.monotonic() + transfer_timeout)
    frame += bytes(_recv_exact(sock, FRAME.size - 1, deadline))
    magic, header_bytes, payload_bytes = FRAME.unpack(frame)
    if magic != MAGIC:
        raise ProtocolError(f"not an {PROTOCOL} frame (wrong magic {magic!r})")
    if header_bytes > limits.max_header_bytes:
        raise ProtocolError(f"header of {header_bytes} bytes is over the {limits.max_header_bytes} limit")
    if payload_bytes > limits.max_payload_bytes:
        raise ProtocolError(
            f"payload of {payload_bytes:,} bytes is over the {limits.max_payload_bytes:,}-byte limit"
        )
    raw = _recv_exact(sock, header_bytes, deadline)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        specs = parse_array_specs(header, payload_bytes, limits)
        if check_header is not None:
            check_header(header, specs)
    except (ValueError, RecursionError, ProtocolError) as e:  # RecursionError: "[[[[..." nested headers
        _discard(sock, payload_bytes, deadline)
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"undecodable header: {e}", fatal=False) from None
    if budget is not None and not budget.acquire(
        payload_bytes, timeout=max(0.0, deadline - time.monotonic())
    ):
        _discard(sock, payload_bytes, deadline)
        raise ProtocolError("server busy: too much data in flight, retry shortly", fatal=False)
    try:
        payload = _recv_exact(sock, payload_bytes, deadline)
    except BaseException:
        if budget is not None:
            budget.release(payload_bytes)
        raise
    message = {k: v for k, v in header.items() if k != "arrays"}
    offset = 0
    for name, dtype, shape in specs:
        count = math.prod(shape)
        message[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    return message, payload_bytes


class ByteBudget:
    """A counting semaphore in bytes: bounds the payload memory all connections hold at once."""

    def __init__(self, total: int):
        self.total, self.used = int(total), 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        if n > self.total:
            return False
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.total, timeout):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


# ----------------------------------------------------------------------------------------------- authentication
def _mac(key: bytes, role: bytes, nonce: bytes) -> str:
    return hmac.new(key, role + nonce, hashlib.sha256).hexdigest()


def _server_handshake(sock: socket.socket, key: bytes, timeout: float) -> None:
    """Challenge, answer, proof: all within ``timeout`` seconds of the connection, however the bytes trickle in."""
    deadline = time.monotonic() + timeout
    nonce = secrets.token_bytes(32)
    sock.settimeout(timeout)
    send_message(sock, {"protocol": PROTOCOL, "challenge": nonce.hex()})
    answer = read_frame(sock, HANDSHAKE_LIMITS, timeout, timeout, deadline=deadline)[0]
    response, challenge = answer.get("response"), answer.get("challenge")
    expected = _mac(key, b"client", nonce).encode()
    # compared as bytes: compare_digest raises TypeError on a str with non-ASCII characters
    if not isinstance(response, str) or not hmac.compare_digest(
        response.encode("utf-8", "replace"), expected
    ):
        with contextlib.suppress(OSError):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            send_message(sock, {"ok": False, "error": "authentication failed"})
        raise ProtocolError("authentication failed (wrong key)")
    if not isinstance(challenge, str) or len(challenge) != 64 or not _is_hex(challenge):
        with contextlib.suppress(OSError):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            send_message(sock, {"ok": False, "error": "handshake without a client challenge (64 hex digits)"})
        raise ProtocolError("handshake without a client challenge")
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    send_message(sock, {"ok": True, "response": _mac(key, b"server", bytes.fromhex(challenge))})


def _is_hex(text: str) -> bool:
    return text.isascii() and all(c in "0123456789abcdefABCDEF" for c in text)


def _client_handshake(sock: socket.socket, key: bytes, timeout: float) -> None:
    hello = read_message(sock, HANDSHAKE_LIMITS, timeout, timeout)
    if hello.get("ok") is False:
        raise ConnectionError(f"server refused the connection: {hello.get('error')}")
    if hello.get("protocol") != PROTOCOL or not isinstance(hello.get("challenge"), str):
        raise ConnectionError(f"not a {PROTOCOL} server (got {str(hello)[:200]})")
    nonce = secrets.token_bytes(32)
    response = _mac(key, b"client", bytes.fromhex(hello["challenge"]))
    send_message(sock, {"protocol": PROTOCOL, "response": response, "challenge": nonce.hex()})
    reply = read_message(sock, HANDSHAKE_LIMITS, timeout, timeout)
    if not reply.get("ok"):
        raise ConnectionError(f"server refused the connection: {reply.get('error', 'no reason')}")
    if not hmac.compare_digest(str(reply.get("response")), _mac(key, b"server", nonce)):
        raise ConnectionError("the server does not hold the key (mutual authentication failed)")


# ----------------------------------------------------------------------------------------------- requests
def check_view_shape(name: str, shape: tuple, max_pixels: int | None) -> None:
    """A view is (H, W) or (1, H, W), at least 2 x 2; padded to a square it must stay under ``max_pixels``."""
    dims = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(dims) != 2 or min(dims) < 2:
        raise InputError(name, f"expected a 2D image, got an array of shape {tuple(shape)}")
    side = max(dims)
    if max_pixels is not None and side * side > max_pixels:
        raise InputError(
            name,
            f"a {dims[1]} x {dims[0]} image is padded to a {side} x {side} square ({side * side:,} pixels), "
            f"over the server's limit of {max_pixels:,}",
        )


def handle_request(predictor, request, max_pixels: int | None = Limits.max_pixels) -> dict:
    """One request -> one reply dict (never raises for bad input)."""
    if not isinstance(request, dict):
        return {
            "ok": False,
            "error": f"expected a dict with 'frontal' and 'lateral' arrays, got {type(request).__name__}",
        }
    cmd = request.get("cmd")
    if cmd is not None and not isinstance(cmd, str):
        return {"ok": False, "error": f"'cmd' must be a string, got {type(cmd).__name__}"}
    if cmd == "ping":
        return {"ok": True, "pong": True}
    if cmd is not None:
        return {"ok": False, "error": f"unknown cmd {request.get('cmd')!r} (ping, shutdown)"}
    missing = [k for k in VIEWS if request.get(k) is None]
    if missing:
        return {
            "ok": False,
            "error": f"missing view(s): {', '.join(missing)} (PerX2CT needs a frontal and a lateral)",
        }
    for key in VIEWS:
        if not isinstance(request[key], np.ndarray):
            return {"ok": False, "error": f"'{key}' must be a numpy array, got {type(request[key]).__name__}"}
    try:
        for key in VIEWS:
            check_view_shape(key, request[key].shape, max_pixels)
        volume = predictor.predict(request["frontal"], request["lateral"])
    except InputError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug or OOM must not take the server down; the client learns what happened
        logger.exception("inference failed")
        return {"ok": False, "error": f"inference failed: {type(e).__name__}: {e}"}
    return {
        "ok": True,
        "volume": np.ascontiguousarray(volume.array, dtype=np.float32),
        "spacing": [float(s) for s in volume.spacing],
        "affine": volume.affine.tolist(),
    }


class PerX2CTServer:
    """Accepts connections on a thread each; one model, one inference at a time. See the module docstring."""

    def __init__(
        self,
        predictor,
        host: str = "127.0.0.1",
        port: int = 6000,
        authkey: str | bytes = b"",
        limits: Limits = Limits(),
        handshake_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        transfer_timeout: float = 120.0,
        max_clients: int = 16,
        allow_shutdown: bool = True,
    ):
        self.key = authkey.encode() if isinstance(authkey, str) else bytes(authkey)
        if not self.key:
            raise ValueError("a key is required (clients authenticate with it)")
        self.predictor, self.limits = predictor, limits
        self.handshake_timeout, self.idle_timeout = float(handshake_timeout), float(idle_timeout)
        self.transfer_timeout, self.max_clients = float(transfer_timeout), int(max_clients)
        self.allow_shutdown = allow_shutdown
        self.budget = ByteBudget(limits.memory_budget_bytes)
        self.answered = 0
        self._model_lock, self._count_lock = threading.Lock(), threading.Lock()
        self._stop = threading.Event()
        self._clients: dict[threading.Thread, socket.socket] = {}
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, int(port)), family=family, backlog=64)
        self.address = self._listener.getsockname()[:2]

    def serve_forever(self, ready: threading.Event | None = None) -> int:
        """Serve until shutdown; returns the number of replies sent."""
        logger.info("PerX2CT server listening on %s:%s", *self.address)
        if ready is not None:
            ready.set()
        self._listener.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                self._start_client(conn, peer)
        finally:
            self._listener.close()
            self._close_clients()
        return self.answered

    def shutdown(self) -> None:
        self._stop.set()

    def _start_client(self, conn: socket.socket, peer) -> None:
        with self._count_lock:
            self._clients = {t: s for t, s in self._clients.items() if t.is_alive()}
            busy = len(self._clients) >= self.max_clients
            if not busy:
                thread = threading.Thread(target=self._serve_client, args=(conn, peer), daemon=True)
                self._clients[thread] = conn
        if busy:
            logger.warning("refused %s: %d clients connected already", peer, self.max_clients)
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                send_message(
                    conn, {"ok": False, "error": f"server busy: {self.max_clients} clients connected"}
                )
            conn.close()
            return
        thread.start()

    def _close_clients(self) -> None:
        with self._count_lock:
            clients = list(self._clients.items())
        for _, conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread, _ in clients:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def _reply(self, conn: socket.socket, reply: dict) -> bool:
        try:
            conn.settimeout(self.transfer_timeout)
            send_message(conn, reply)
        except (OSError, TypeError) as e:
            logger.warning("could not send a reply: %s: %s", type(e).__name__, e)
            return False
        with self._count_lock:
            self.answered += 1
        return True

    def _check_header(self, header: dict, specs: list) -> None:
        for name, _, shape in specs:
            if name in VIEWS:
                try:
                    check_view_shape(name, shape, self.limits.max_pixels)
                except InputError as e:
                    raise ProtocolError(str(e), fatal=False) from None

    def _serve_client(self, conn: socket.socket, peer) -> None:
        with conn:
            try:
                _server_handshake(conn, self.key, self.handshake_timeout)
            except (ProtocolError, OSError, ValueError) as e:  # TimeoutError and ConnectionError are OSErrors
                logger.warning("rejected %s during the handshake: %s: %s", peer, type(e).__name__, e)
                return
            except Exception as e:  # a bug must cost this connection only, with one line in the log
                logger.error(
                    "rejected %s during the handshake (unexpected): %s: %s", peer, type(e).__name__, e
                )
                return
            while not self._stop.is_set():
                try:
                    request, payload = read_frame(
                        conn,
                        self.limits,
                        self.idle_timeout,
                        self.transfer_timeout,
                        self._check_header,
                        self.budget,
                    )
                except ProtocolError as e:
                    logger.info("client %s: refused a frame: %s", peer, e)
                    if not self._reply(conn, {"ok": False, "error": str(e)}) or e.fatal:
                        return
                    continue
                except (OSError, ValueError) as e:  # closed, reset or timed out (maybe mid-message)
                    logger.info("client %s gone: %s: %s", peer, type(e).__name__, e)
                    return
                except Exception as e:  # a bug: one log line, an error reply, then close
                    logger.error("client %s: unreadable frame: %s: %s", peer, type(e).__name__, e)
                    self._reply(conn, {"ok": False, "error": f"unreadable frame: {type(e).__name__}"})
                    return
                try:
                    if isinstance(request.get("cmd"), str) and request["cmd"] == "shutdown":
                        if self.allow_shutdown:
                            self._reply(conn, {"ok": True, "shutdown": True})
                            self.shutdown()
                            return
                        reply = {"ok": False, "error": "this server does not accept shutdown requests"}
                    else:
                        with self._model_lock:
                            reply = handle_request(self.predictor, request, self.limits.max_pixels)
                except Exception as e:  # handle_request never raises for bad input: this is a bug
                    logger.error("client %s: request failed: %s: %s", peer, type(e).__name__, e)
                    reply = {"ok": False, "error": f"request failed: {type(e).__name__}"}
                finally:
                    del request
                    self.budget.release(payload)
                if not self._reply(conn, reply):
                    return


def serve(
    predictor,
    host: str = "127.0.0.1",
    port: int = 6000,
    authkey: str | bytes = b"",
    ready: threading.Event | None = None,
    **options,
) -> int:
    """Serve until a ``{"cmd": "shutdown"}`` request; returns the number of replies sent.

    ``options`` go to :class:`PerX2CTServer` (``limits``, timeouts, ``max_clients``, ``allow_shutdown``).
    """
    return PerX2CTServer(predictor, host, port, authkey, **options).serve_forever(ready)


class PerX2CTClient:
    """Client helper: ``with PerX2CTClient(port=6000) as c: vol, spacing = c.reconstruct(pa, lat)``.

    The key is ``authkey`` or, when not given, read like the server's (:func:`resolve_key`).
    ``timeout`` bounds connecting, the handshake and each reply (seconds).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6000,
        authkey: str | bytes | None = None,
        key_file: str | None = None,
        timeout: float = 600.0,
        limits: Limits = CLIENT_LIMITS,
    ):
        key = resolve_key(authkey, key_file)
        self.timeout, self.limits = float(timeout), limits
        self.conn = socket.create_connection((host, int(port)), timeout=self.timeout)
        try:
            _client_handshake(self.conn, key, self.timeout)
        except BaseException:
            self.conn.close()
            raise

    def request(self, message: dict) -> dict:
        self.conn.settimeout(self.timeout)
        send_message(self.conn, message)
        return read_message(self.conn, self.limits, self.timeout, self.timeout)

    def reconstruct(self, frontal: np.ndarray, lateral: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """(volume in HU, spacing in mm); raises :class:`InputError` with the server's message on failure."""
        reply = self.request({"frontal": np.asarray(frontal), "lateral": np.asarray(lateral)})
        if not reply.get("ok"):
            raise InputError(None, reply.get("error", "server error"))
        return reply["volume"], reply["spacing"]

    def ping(self) -> bool:
        return bool(self.request({"cmd": "ping"}).get("pong"))

    def shutdown(self) -> None:
        self.request({"cmd": "shutdown"})

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PerX2CTClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(
    port: int = 6000,
    host: str = "127.0.0.1",
    key_file: str | None = None,
    new_key: bool = False,
    bundle_root: str | None = None,
    checkpoint: str | None = None,
    config_files: list[str] | str | None = None,
    device: str | None = None,
    max_clients: int = 16,
    idle_timeout: float = 300.0,
    authkey: str | None = None,
) -> int:
    """Load the bundle once and serve requests until shutdown (key: see the module docstring)."""
    if authkey is not None:
        sys.exit(
            "refusing --authkey: a key on the command line is visible to every local user (ps, /proc). "
            f"Put it in a file of mode 0600 (--key_file PATH, or {KEY_FILE_ENV}) or in ${KEY_ENV}."
        )
    if new_key:
        if not key_file:
            sys.exit("--new_key True needs --key_file PATH (the file to create)")
        print(f"new key written to {write_key_file(key_file)} (mode 0600); give clients this file")
        return 0
    try:
        key = resolve_key(None, key_file)
    except InputError as e:
        sys.exit(f"cannot start the server: {e}")
    import torch

    from bundles.perx2ct.scripts.inference import BUNDLE_ROOT, PerX2CTInference

    logging.basicConfig(level=logging.INFO)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on %s: the port is reachable from other machines (see docs/SECURITY.md)", host
        )
    if isinstance(config_files, str):
        config_files = [config_files]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # built from the checkpoint's record; a config that contradicts it is refused
        predictor = PerX2CTInference.from_bundle(bundle_root or BUNDLE_ROOT, checkpoint, config_files, device)
    except InputError as e:
        sys.exit(f"cannot start the server: {e}")
    return serve(predictor, host, port, key, max_clients=max_clients, idle_timeout=idle_timeout)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
