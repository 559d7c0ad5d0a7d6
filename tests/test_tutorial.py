"""docs/TUTORIAL.md runs as written: its marked ``bash`` blocks, in order, on the shared real data at tiny size.

A step is a ``<!-- tutorial-step: NAME | creates: GLOB GLOB ... -->`` comment followed by a fenced ``bash`` block;
the globs (``$WORK`` is the test's temporary folder) must each match a file once the block has run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = REPO_ROOT / "docs" / "TUTORIAL.md"
STEP = re.compile(
    r"<!--\s*tutorial-step:\s*(?P<name>[\w-]+)\s*(?:\|\s*creates:\s*(?P<creates>[^>]*?))?\s*-->\s*\n"
    r"```bash\n(?P<script>.*?)^```",
    re.S | re.M,
)
EXPECTED_STEPS = ["setup", "convert", "collect", "build_pairs", "train", "evaluate", "pipeline"]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    script: str
    creates: tuple[str, ...]  # globs, with $WORK for the work folder


def tutorial_steps(text: str) -> list[Step]:
    """The marked steps of the tutorial's markdown, in document order."""
    return [
        Step(m["name"], m["script"], tuple((m["creates"] or "").split()))
        for m in STEP.finditer(text)
    ]


def test_tutorial_steps_are_marked_and_name_real_commands_and_files():
    """Cheap checks (no data, no run): the walkthrough's steps, the console scripts and config files they use."""
    from xray2ct.cli import COMMANDS

    text = TUTORIAL.read_text()
    steps = tutorial_steps(text)
    assert [s.name for s in steps] == EXPECTED_STEPS
    # every bash block of the page is a step: an unmarked one would be shown to readers but never run
    assert text.count("```bash") == len(steps)
    for step in steps[1:]:
        assert step.creates, f"step {step.name} names no output to check"
        assert all(c.startswith("$WORK/") for c in step.creates), step.creates
    words = [w for s in steps for w in shlex.split(s.script.replace("\\\n", " "), comments=True)]
    scripts = {w for w in words if w.startswith("xray2ct-")}
    assert scripts and scripts <= set(COMMANDS), scripts - set(COMMANDS)
    configs = {c for w in words for c in re.findall(r"bundles/[\w/]+\.json", w)}
    assert configs and all((REPO_ROOT / c).is_file() for c in configs), configs


@pytest.mark.slow
def test_tutorial_runs_on_shared_data(shared_data, tmp_path):
    """Each step's block runs in a fresh bash (exit code 0) from the repository root and writes what it says."""
    work = tmp_path / "work"
    env = dict(os.environ)
    env.update(
        DATA=str(shared_data),
        WORK=str(work),
        # the console scripts and `python` of this interpreter's environment, importing this checkout
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p),
        OMP_NUM_THREADS="1",
    )
    for step in tutorial_steps(TUTORIAL.read_text()):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", step.script],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, f"step {step.name} failed:\n{step.script}\n{(done.stdout + done.stderr)[-4000:]}"
        for pattern in step.creates:
            path = pattern.replace("$WORK", str(work))
            assert glob.glob(path), f"step {step.name} did not write {path}"

    report = json.loads((work / "perx2ct" / "eval" / "metrics_report.json").read_text())
    assert report["split"] == "test" and report["n_cases"] == 1
    assert set(report["model"]) == set(report["baseline"]["metrics"])
    summary = json.loads((work / "report" / "pipeline_summary.json").read_text())
    assert summary["cases"] == summary["written"] == 3 and summary["failed"] == 0
