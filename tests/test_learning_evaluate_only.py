"""benchmarks/learning.py --evaluate_only: the test split is scored by the checkpoints the validation run
trained (issue 21 item 4), so no training may run and the training times are reported as 0."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from benchmarks import learning
from xray2ct import driver


@pytest.mark.parametrize(
    ("evaluate_only", "expected_runs"),
    [
        ({}, ["training", "training", "training", "evaluating"]),
        ({"evaluate_only": True}, ["evaluating"]),
        ({"rows": {"work"}}, ["evaluating"]),  # --evaluate_only <row>: that row's folder (work / row) only
        ({"rows": {"vqgan_cohort64"}}, ["training", "training", "training", "evaluating"]),
    ],
)
def test_evaluate_only_skips_every_training_stage(tmp_path, monkeypatch, evaluate_only, expected_runs):
    runs: list[str] = []

    def fake_run(run_id: str, files: list[str], overrides: dict) -> dict:
        runs.append(run_id)
        if run_id == "evaluating":
            report = {"smoke_test": False, "split": overrides["eval_split"]}
            out = Path(overrides["output_dir"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics_report.json").write_text(json.dumps(report))
        return {"wall_s": 2.0, "cpu_s": 1.0}

    real = driver.train_and_evaluate
    monkeypatch.setattr(driver, "train_and_evaluate", functools.partial(real, runner=fake_run))
    monkeypatch.setattr(learning, "EVALUATE_ONLY", evaluate_only)
    result = learning.train_and_evaluate(
        "progressive_cascade", tmp_path / "data", tmp_path / "work", "test", stages=(1, 2, 3), overlay="cpu_64.json"
    )
    assert runs == expected_runs
    assert result["report"]["split"] == "test"
    assert result["train_wall_s"] == (0.0 if runs == ["evaluating"] else 6.0)
    assert result["wall_s"] == result["train_wall_s"] + 2.0
