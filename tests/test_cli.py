"""Console scripts: every [project.scripts] entry resolves to a fire target, is installed, and the README lists it."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xray2ct.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SECTION = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
SCRIPTS = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', SECTION, flags=re.M))  # tomllib is Python >= 3.11


def test_every_console_script_is_declared_and_documented():
    assert set(SCRIPTS) == set(COMMANDS)
    readme = (REPO / "README.md").read_text()
    for name, entry in SCRIPTS.items():
        module, attr = entry.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
        target_module, target, _ = COMMANDS[name]
        assert callable(getattr(importlib.import_module(target_module), target)), name
        assert f"`{name}`" in readme, f"README does not list {name}"


@pytest.mark.parametrize("name", ["xray2ct-prepare-pairs", "xray2ct-pe-compare"])
def test_installed_console_script_runs(name):
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed in this environment (pip install -e . installs it)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and name in done.stdout + done.stderr
