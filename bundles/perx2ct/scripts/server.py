"""A long-running PerX2CT inference server over ``multiprocessing.connection`` (authenticated sockets).

    python -m bundles.perx2ct.scripts.server --port 6000 --authkey SECRET [--bundle_root ...] [--device cuda]

Protocol (pickled dicts, so only clients holding the authkey are accepted):
    request  ``{"frontal": (H, W) array, "lateral": (H, W) array}``   -> reply ``{"ok": True, "volume": (N, N, N)
             float32 HU, "spacing": [sx, sy, sz], "affine": 4x4 list}``
    request  ``{"cmd": "ping"}`` -> ``{"ok": True, "pong": True}``; ``{"cmd": "shutdown"}`` stops the server.
    Anything wrong (a single array, wrong shape/dtype, NaN...) -> ``{"ok": False, "error": "..."}`` and the
    server keeps serving. A client that disconnects (even mid-message) only ends its own connection.
Clients are served one at a time, in order; the model stays loaded between them.
"""

from __future__ import annotations

import logging
import pickle
from multiprocessing.connection import Client, Listener

import numpy as np

from common.errors import InputError

logger = logging.getLogger(__name__)


def handle_request(predictor, request) -> dict:
    """One request -> one reply dict (never raises for bad input)."""
    if not isinstance(request, dict):
        return {
            "ok": False,
            "error": f"expected a dict with 'frontal' and 'lateral' arrays, got {type(request).__name__}",
        }
    if request.get("cmd") == "ping":
        return {"ok": True, "pong": True}
    missing = [k for k in ("frontal", "lateral") if request.get(k) is None]
    if missing:
        return {
            "ok": False,
            "error": f"missing view(s): {', '.join(missing)} (PerX2CT needs a frontal and a lateral)",
        }
    for key in ("frontal", "lateral"):
        if not isinstance(request[key], np.ndarray):
            return {"ok": False, "error": f"'{key}' must be a numpy array, got {type(request[key]).__name__}"}
    try:
        volume = predictor.predict(request["frontal"], request["lateral"])
    except InputError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug or OOM must not take the server down; the client learns what happened
        logger.exception("inference failed")
        return {"ok": False, "error": f"inference failed: {type(e).__name__}: {e}"}
    return {
        "ok": True,
        "volume": volume.array,
        "spacing": list(volume.spacing),
        "affine": volume.affine.tolist(),
    }


def serve(
    predictor, host: str = "127.0.0.1", port: int = 6000, authkey: str | bytes = b"", ready=None
) -> int:
    """Serve until a ``{"cmd": "shutdown"}`` request; returns the number of requests answered."""
    key = authkey.encode() if isinstance(authkey, str) else authkey
    if not key:
        raise ValueError("an authkey is required (requests are pickled)")
    answered = 0
    with Listener((host, int(port)), authkey=key) as listener:
        logger.info("PerX2CT server listening on %s:%s", *listener.address)
        if ready is not None:
            ready.set()
        while True:
            try:
                conn = listener.accept()
            except Exception as e:  # wrong authkey, client vanished during the handshake
                logger.warning("rejected a connection: %s: %s", type(e).__name__, e)
                continue
            with conn:
                while True:
                    try:
                        request = conn.recv()
                    except (EOFError, ConnectionError, OSError):
                        break  # client closed (maybe mid-message): serve the next one
                    except (pickle.UnpicklingError, AttributeError, ImportError, ValueError, TypeError) as e:
                        reply = {"ok": False, "error": f"undecodable message: {type(e).__name__}: {e}"}
                    else:
                        if isinstance(request, dict) and request.get("cmd") == "shutdown":
                            _send(conn, {"ok": True, "shutdown": True})
                            return answered
                        reply = handle_request(predictor, request)
                    answered += 1
                    if not _send(conn, reply):
                        break


def _send(conn, reply: dict) -> bool:
    try:
        conn.send(reply)
        return True
    except (ConnectionError, OSError, EOFError):
        return False


class PerX2CTClient:
    """Client helper: ``with PerX2CTClient(port=6000, authkey="...") as c: vol, spacing = c.reconstruct(pa, lat)``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6000, authkey: str | bytes = b""):
        key = authkey.encode() if isinstance(authkey, str) else authkey
        self.conn = Client((host, int(port)), authkey=key)

    def request(self, message) -> dict:
        self.conn.send(message)
        return self.conn.recv()

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
    authkey: str = "",
    host: str = "127.0.0.1",
    bundle_root: str | None = None,
    checkpoint: str | None = None,
    config_files: list[str] | str | None = None,
    device: str | None = None,
) -> int:
    """Load the bundle once and serve requests until shutdown."""
    import torch

    from bundles.perx2ct.scripts.inference import BUNDLE_ROOT, PerX2CTInference

    logging.basicConfig(level=logging.INFO)
    if isinstance(config_files, str):
        config_files = [config_files]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = PerX2CTInference.from_bundle(bundle_root or BUNDLE_ROOT, checkpoint, config_files, device)
    return serve(predictor, host, port, authkey)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
