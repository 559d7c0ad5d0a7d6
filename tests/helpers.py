"""Plain helpers several test modules call (fixtures live in conftest.py; these are called, not injected)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port free on loopback now (servers, DDP rendezvous): fixed ports collide when suites run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job(client, job_id: str, polls: int = 1200) -> dict:
    """Poll the web app's ``/api/jobs/<id>`` until the job is done or failed (a bounded loop, not a timing assertion)."""
    status = None
    for _ in range(polls):
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never finished: {status}")
