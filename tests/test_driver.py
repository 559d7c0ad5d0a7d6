"""Issue 25 item 3: one driver trains and evaluates every bundle (bin/demo.py and benchmarks/learning.py use it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from xray2ct import driver

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


class FakeRunner:
    """Records each ``monai.bundle run`` and writes the report an evaluation would write."""

    def __init__(self, smoke_test: bool = False):
        self.calls: list[tuple[str, list[str], dict]] = []
        self.smoke_test = smoke_test

    def __call__(self, run_id: str, files: list[str], overrides: dict) -> dict:
        self.calls.append((run_id, files, overrides))
        if run_id == "evaluating":
            out = Path(overrides[driver.IDS["output_dir"]])
            out.mkdir(parents=True, exist_ok=True)
            report = {"split": overrides[driver.IDS["split"]], "smoke_test": self.smoke_test,
                      "training_cases_evaluated": ["a"] if self.smoke_test else []}  # fmt: skip
            (out / driver.REPORT).write_text(json.dumps(report))
        return {"wall_s": 1.0, "cpu_s": 2.0}


@pytest.mark.parametrize(
    "stages, expected",
    [((None,), [{}]), ((1, 2, 3), [{"stage": 1}, {"stage": 2}, {"stage": 3}]), (({"max_epochs": 80},), [{"max_epochs": 80}])],
)  # fmt: skip
def test_train_and_evaluate_runs_each_training_then_one_evaluation(tmp_path, stages, expected):
    run = FakeRunner()
    result = driver.train_and_evaluate("perx2ct", tmp_path / "data", tmp_path / "work", "cpu_64.json",
                                       {"max_epochs": 2}, stages, "validation", {"preview_cases": 0}, run)  # fmt: skip
    assert [c[0] for c in run.calls] == ["training"] * len(expected) + ["evaluating"]
    place = {"dataset_dir": str(tmp_path / "data"), "bundle_root": str(tmp_path / "work"),
             "output_dir": str(tmp_path / "work" / "eval")}  # fmt: skip
    for (_, files, over), stage in zip(run.calls, expected):
        assert [Path(f).name for f in files] == ["train.json", "cpu_64.json"]
        assert over == {**place, "max_epochs": 2, **stage}
    _, files, over = run.calls[-1]
    assert [Path(f).name for f in files] == ["train.json", "evaluate.json", "cpu_64.json"]
    assert all(Path(f).is_file() for f in files)
    assert over == {**place, "eval_split": "validation", "max_epochs": 2, "preview_cases": 0}
    assert result["report"]["split"] == "validation"
    n = len(expected)
    assert (result["train_wall_s"], result["train_cpu_s"], result["eval_wall_s"]) == (n, 2 * n, 1.0)
    assert (result["wall_s"], result["cpu_s"]) == (n + 1, 2 * n + 2)


def test_a_report_on_training_cases_is_refused_unless_asked_for(tmp_path):
    with pytest.raises(RuntimeError, match="are training cases"):
        driver.evaluate("vqgan_3d_patch", tmp_path, tmp_path / "w", split="test", runner=FakeRunner(smoke_test=True))
    for split, require in (("training", True), ("test", False)):
        out = driver.evaluate("vqgan_3d_patch", tmp_path, tmp_path / "w", split=split,
                              runner=FakeRunner(smoke_test=True), require_unseen=require)  # fmt: skip
        assert out["report"]["smoke_test"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_bundle_declares_the_ids_the_driver_sets(bundle):
    """A renamed config id (issue 25 item 1) changes :data:`driver.IDS`, nowhere else."""
    text = "".join((REPO / "bundles" / bundle / "configs" / n).read_text() for n in ("train.json", "evaluate.json"))
    for name in ("dataset_dir", "bundle_root", "output_dir", "split"):
        assert f'"{driver.IDS[name]}"' in text, (bundle, name)
    assert driver.checkpoint_path(bundle, "w").parts[:2] == ("w", "models")


@pytest.mark.slow  # a child python importing MONAI: seconds on an idle machine, minutes on a busy one
def test_a_failing_subprocess_run_names_its_log(tmp_path):
    log = tmp_path / "demo.log"
    run = driver.Subprocess(log, threads=1)
    with pytest.raises(RuntimeError, match=f"training failed .*log: {log}"):
        run("training", [str(tmp_path / "missing.json")], {"bundle_root": str(tmp_path)})
    assert log.read_text().startswith("$ ") and json.loads(log.with_suffix(".training.json").read_text())


def test_demo_and_learning_benchmark_drive_the_bundles_through_the_driver():
    spec = importlib.util.spec_from_file_location("demo", REPO / "bin" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from benchmarks import learning

    assert demo.driver is driver and learning.driver is driver
    assert isinstance(demo.runner(Path("x.log"), 1), driver.Subprocess)
    for module in (demo, learning):
        assert not hasattr(module, "bundle_run")  # one way to run a bundle
