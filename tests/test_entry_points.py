"""Every ``python -m`` entry point answers ``--help`` (issue 24 item 6), and the small CLI fixes behind it.

The table is discovered, not typed: every module of the repository with a ``__main__`` block. Each runs in
its own interpreter (imports torch and MONAI: a few seconds each), hence ``slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".venv", "tests", ".git", "outputs", "node_modules"}
_MAIN = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)


def _entry_modules() -> list[str]:
    found = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in _SKIP_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        if _MAIN.search(path.read_text(encoding="utf-8", errors="replace")):
            module = ".".join(rel.with_suffix("").parts)
            found.append(module.removesuffix(".__main__"))
    return found


ENTRY_MODULES = _entry_modules()


def test_the_table_finds_the_entry_points():
    # the ones issue 24 named, and the tools of every layer
    for module in ("data_prep.build_pairs", "data_prep.dicom_to_nifti", "benchmarks.perx2ct_synthesis", "webapp"):
        assert module in ENTRY_MODULES, module


@pytest.mark.slow
@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_python_m_answers_help(module):
    env = dict(os.environ, PYTHONPATH=str(REPO), PAGER="cat", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} --help exited {proc.returncode}:\n{out[-2000:]}"
    assert "Traceback" not in out, f"{module} --help:\n{out[-2000:]}"
    assert re.search(r"NAME|usage:|Usage", out), f"{module} --help printed no help:\n{out[-2000:]}"


def test_synthesize_ddp_shows_synthesize_options_less_the_rank_ones():
    import inspect

    from bundles.perx2ct.scripts.synthesize import synthesize
    from bundles.perx2ct.scripts.synthesize_ddp import synthesize_rank

    shown = inspect.signature(synthesize_rank).parameters
    assert "part_index" not in shown and "total_parts" not in shown
    assert set(shown) == set(inspect.signature(synthesize).parameters) - {"part_index", "total_parts"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in shown.values())


def test_perx2ct_benchmark_with_no_server_requests_reports_none():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.perx2ct_synthesis import _server_round_trips

    # no server is started, so no network is needed
    got = _server_round_trips(None, None, 8, 0)
    assert got == {
        "server_latency_s_median": None,
        "server_latency_s_max": None,
        "server_throughput_per_s": None,
        "server_requests": 0,
    }
    with pytest.raises(ValueError, match="server_requests"):
        _server_round_trips(None, None, 8, -1)
