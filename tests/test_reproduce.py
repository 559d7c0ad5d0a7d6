"""The papers' recipes (xray2ct/reproduce.py, reproduce/<paper>/run.sh): full-size commands as printed, and each
recipe end to end at tiny size on the real example CT (LIDC-IDRI-0001 as its DICOM series) standing in for LIDC."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from xray2ct import reproduce

REPO = Path(__file__).resolve().parents[1]
PAPERS = sorted(reproduce.PAPERS)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TINY", None)
    return env


def _dry_run(paper: str, work: Path, *args: str) -> list[list[str]]:
    """The commands a recipe would run, from its own run.sh, as logged in commands.sh."""
    res = subprocess.run(
        ["bash", str(REPO / "reproduce" / paper / "run.sh"), "--lidc", "/data/LIDC-IDRI", "--work", str(work),
         "--dry_run", *args],
        env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in (work / "commands.sh").read_text().splitlines()]


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# paper -> (bundle, split file, geometry, size, renderer)
FULL_SIZE = {
    "perx2ct": ("perx2ct", "perx2ct", "perx2ct", [128, 128, 128], "plastimatch"),
    "x2ctgan": ("perx2ct", "x2ctgan", "x2ctgan", [128, 128, 128], "plastimatch"),
    "xray2ctpa-vqgan": ("vqgan_3d_patch", None, "x2ctgan", [512, 512, 604], None),
}


@pytest.mark.parametrize("paper", PAPERS)
def test_full_size_commands_follow_the_paper(paper, tmp_path):
    """Without --tiny: the paper's split file, geometry, grid and renderer; train.json with no size overlay;
    --gpus 4 trains through torchrun with multi_gpu_train.json and renders a 4-GPU sbatch file."""
    bundle, split, geometry, size, renderer = FULL_SIZE[paper]
    steps = "nifti,name,pairs,train,slurm,evaluate,table"
    cmds = _dry_run(paper, tmp_path / "w", "--gpus", "4", "--steps", steps)
    by_tool = {next(c for c in cmd if c.startswith(("data_prep.", "monai.", "xray2ct."))): cmd for cmd in cmds}
    pairs = by_tool["data_prep.build_pairs"]
    assert json.loads(_value(pairs, "--size")) == size
    assert _value(pairs, "--geometry") == geometry
    assert ("--split_file" in pairs) == (split is not None)
    if split:
        assert _value(pairs, "--split_file") == split
    if renderer:
        assert _value(pairs, "--renderer") == renderer
    train = next(c for c in cmds if "training" in c)
    assert train[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    configs = _value(train, "--config_file")
    assert f"bundles/{bundle}/configs/train.json" in configs and "multi_gpu_train.json" in configs
    assert "cpu_tiny" not in " ".join(" ".join(c) for c in cmds)
    slurm = by_tool["xray2ct.slurm"]
    assert _value(slurm, "--bundle") == bundle and _value(slurm, "--gpus_per_node") == "4"
    evaluate = next(c for c in cmds if "evaluating" in c)
    assert "evaluate.json" in _value(evaluate, "--config_file")
    dataset = str(tmp_path / "w" / "dataset")
    assert _value(evaluate, "--dataset_dir") == _value(train, "--dataset_dir") == pairs[pairs.index(dataset)]


def test_official_short_path_converts_then_evaluates(tmp_path):
    """--official: no training; the converted checkpoint is evaluated with the paper's overlay."""
    cmds = _dry_run("perx2ct", tmp_path / "w", "--official", str(tmp_path / "PerX2CT.ckpt"))
    tools = [next((c for c in cmd if c.startswith(("data_prep.", "monai.", "bundles."))), None) for cmd in cmds]
    assert "monai.bundle" in tools and not any("training" in cmd for cmd in cmds)
    convert = cmds[tools.index("bundles.perx2ct.scripts.convert_official")]
    evaluate = next(c for c in cmds if "evaluating" in c)
    assert convert[-1] == str(tmp_path / "w" / "bundle" / "models" / "model.pt")
    assert "perx2ct_official.json" in _value(evaluate, "--config_file")
    assert _value(evaluate, "--bundle_root") == str(tmp_path / "w" / "bundle")


@pytest.mark.parametrize("args", [["x2ctgan", "--official", "x.ckpt"], ["perx2ct", "--official", "x.ckpt",
                                  "--steps", "train"], ["perx2ct", "--official", "x.ckpt", "--tiny"],
                                  ["perx2ct", "--steps", "nope"], ["xray2ctpa-vqgan", "--list_patients"]])  # fmt: skip
def test_bad_arguments_are_refused(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main([*args, "--work", str(tmp_path)])
    assert e.value.code == 2


def test_split_patients_are_the_listed_patients():
    patients = reproduce.split_patients("perx2ct")
    assert len(patients) == 944 and patients[0] == "LIDC-IDRI-0001"
    assert all(p.startswith("LIDC-IDRI-") and len(p) == 14 for p in patients)


def test_table_puts_ours_beside_the_baseline_and_the_source():
    paper = reproduce.PAPERS["x2ctgan"]
    report = {"n_cases": 102, "split": "test", "metrics": {"mae_x2ctgan": 90.0, "psnr_x2ctgan": 26.5},
              "baseline": {"name": "mean_training_ct", "metrics": {"mae_x2ctgan": 120.0}}}  # fmt: skip
    text = reproduce.format_table(paper, report)
    rows = [line for line in text.splitlines() if line.startswith("| MAE")]
    assert rows and "| 90 | 120 | - |" in rows[0] and "CVPR 2019" in rows[0]
    assert "SMOKE TEST" not in text
    assert "SMOKE TEST" in reproduce.format_table(paper, report, tiny=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, chest_dicom_dir) -> Path:
    """The nifti step once (data_prep.dicom_to_nifti on the example series), shared by the three recipes."""
    work = tmp_path_factory.mktemp("reproduce_nifti")
    res = subprocess.run([sys.executable, "-m", "xray2ct.reproduce", "perx2ct", "--lidc", str(chest_dicom_dir), "--work",
                          str(work), "--tiny", "--steps", "nifti"], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return work / "nifti"


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_tiny_recipe_runs_end_to_end(paper, converted, chest_dicom_dir, tmp_path):
    """The recipe's own script at tiny size (TINY=1): name, pairs, train, slurm, evaluate, table, from the
    converted example CT; its metrics report, sbatch file and table exist and say what they are."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "nifti").symlink_to(converted)
    res = subprocess.run(
        ["bash", str(REPO / "reproduce" / paper / "run.sh"), "--lidc", str(chest_dicom_dir), "--work", str(work),
         "--steps", "name,pairs,train,slurm,evaluate,table"],
        env={**_env(), "TINY": "1", "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bundle = FULL_SIZE[paper][0]
    report = json.loads((work / "eval" / "metrics_report.json").read_text())
    assert report["bundle"] == bundle and report["case_ids"] == ["tiny-test"]
    for metric in reproduce.PAPERS[paper].metrics:
        assert metric.key in report["metrics"], metric.key
    table = (work / "table.md").read_text()
    assert "SMOKE TEST" in table and table.count("\n|") >= 2 + len(reproduce.PAPERS[paper].metrics)
    sbatch = (work / "train.sbatch").read_text()
    assert "multi_gpu_train.json" in sbatch and "cpu_tiny.json" in sbatch and "--requeue" in sbatch
    listed = reproduce.PAPERS[paper].split_file
    named = sorted(p.name for p in (work / "named").iterdir())
    assert named[0] == ("LIDC-IDRI-0001.20000101.3000566.1.nii.gz" if listed else "LIDC-IDRI-0001.20000101.3000566.nii.gz")


def _five_slices(src: Path, dst: Path, **tags) -> Path:
    """Five slices of the example series in ``dst``, with DICOM ``tags`` replaced (pydicom)."""
    import pydicom

    dst.mkdir(parents=True)
    for name in sorted(p.name for p in src.iterdir())[60:65]:
        ds = pydicom.dcmread(src / name)
        for tag, value in tags.items():
            setattr(ds, tag, value)
        ds.save_as(dst / name)
    return dst


@pytest.mark.parametrize("patient, split, expected", [
    ("LIDC-IDRI-0001", "perx2ct", "LIDC-IDRI-0001.20000101.3000566.1.nii.gz"),  # the split file's id
    ("LIDC-IDRI-0001", None, "LIDC-IDRI-0001.20000101.3000566.nii.gz"),  # no split: the header's key
    ("LIDC-IDRI-0002", "perx2ct", None),  # its listed scan has another series number: not linked
    ("../../escaped", None, "escaped.20000101.3000566-"),  # a hostile header stays inside the output folder
])  # fmt: skip
def test_name_by_split_links_series_by_case_id(chest_dicom_dir, tmp_path, patient, split, expected):
    from data_prep.dicom_to_nifti import convert_folder

    dicom = _five_slices(Path(chest_dicom_dir), tmp_path / "dicom" / "series", PatientID=patient)
    results, _ = convert_folder(str(tmp_path / "dicom"), str(tmp_path / "nifti"))
    assert [r.ok for r in results] == [True]
    out = tmp_path / "named"
    linked = reproduce.name_by_split(str(dicom.parent), str(tmp_path / "nifti"), str(out), split)
    names = [p.name for p in out.iterdir()]
    if expected is None:
        assert linked == {} and names == []
        return
    assert len(names) == 1 and names[0].startswith(expected) and (out / names[0]).resolve().is_file()
    assert (out / names[0]).resolve() == Path(results[0].output).resolve()
