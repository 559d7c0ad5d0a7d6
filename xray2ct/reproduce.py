"""Reproduce a paper end to end: LIDC-IDRI DICOM -> NIfTI -> paired dataset -> training -> evaluation -> table.

One recipe per paper (``reproduce/<paper>/README.md`` says what to download and what it costs)::

    python -m xray2ct.reproduce perx2ct --lidc LIDC-IDRI/ --work runs/perx2ct            # every step
    python -m xray2ct.reproduce perx2ct --lidc ... --work ... --gpus 4                   # torchrun, 4 GPUs
    python -m xray2ct.reproduce perx2ct --lidc ... --work ... --steps slurm               # sbatch file only
    python -m xray2ct.reproduce perx2ct --lidc ... --work ... --official PerX2CT.ckpt     # the short path
    python -m xray2ct.reproduce perx2ct --lidc EXAMPLE_DICOM --work /tmp/w --tiny         # CI size, CPU

Steps (``--steps``, comma-separated, default all but ``slurm``): ``nifti`` (``data_prep.dicom_to_nifti``),
``name`` (each NIfTI linked under the paper's case id, read from its DICOM headers, so ``build_pairs
--split_file`` finds it), ``pairs`` (``data_prep.build_pairs`` with the paper's split file, geometry, grid and
renderer), ``train`` (``monai.bundle run training``, ``torchrun`` with ``multi_gpu_train.json`` when
``--gpus > 1``), ``slurm`` (the same training as an sbatch file, ``xray2ct.slurm render``), ``evaluate``
(``monai.bundle run evaluating`` on the test split -> ``metrics_report.json``) and ``table`` (the report beside
the paper's numbers -> ``table.md``). Every command is printed before it runs and appended to
``<work>/commands.sh``, so a run can be replayed or moved to a cluster step by step.

``--tiny``: the same commands at CPU size (each bundle's ``cpu_tiny.json`` overlay, a 32^3 grid) and, since one
example CT (LIDC-IDRI-0001) stands in for LIDC-IDRI, a stand-in split file that lists that CT under three ids
(training, validation, test): it proves the commands and the wiring, never a quality figure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("nifti", "name", "pairs", "train", "slurm", "evaluate", "table")
DEFAULT_STEPS = tuple(s for s in STEPS if s != "slurm")

# The papers' data conventions (data_prep): their volumes use the DICOM SliceThickness as z spacing
# (dicom_to_nifti/build_pairs --z_spacing slice_thickness), and their DRRs see HU shifted by +24
# (build_pairs --drr_hu_offset paper: common.drr.PAPER_DRR_HU_OFFSET). Passed to whichever tool accepts them;
# a checkout where neither does is told so and runs without them.
FIDELITY_FLAGS: dict[str, str] = {"z_spacing": "slice_thickness", "drr_hu_offset": "paper"}


@dataclass(frozen=True)
class Metric:
    """One column of a paper's table: our report key, the paper's value (None: not read) and its source."""

    key: str  # key of metrics_report.json's "metrics" (common.metrics names)
    label: str
    paper: float | None
    source: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Paper:
    """A paper's data conventions, the bundle that trains on them and the figures to compare with."""

    name: str
    title: str
    bundle: str
    split_file: str | None  # data_prep/splits name; None: split by patient with build_pairs' fractions
    geometry: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    drr_pixels: int
    renderer: str
    fidelity: bool  # pass FIDELITY_FLAGS (the papers' LIDC-IDRI conversion)
    metrics: tuple[Metric, ...]
    overrides: dict = field(default_factory=dict)  # config ids set on every bundle command
    tiny_size: tuple[int, int, int] = (32, 32, 32)


_NOT_READ = "the paper's table could not be read while this was written (no copy reachable offline): fill in"
PERX2CT_SRC = f"Kyung et al., ICASSP 2023 (arXiv 2303.05297), Table 1, LIDC-IDRI test set; {_NOT_READ}"
X2CTGAN_SRC = f"Ying et al., CVPR 2019 (arXiv 1905.06902), Table 1 (biplanar X2CT-GAN); {_NOT_READ}"
XRAY2CTPA_SRC = ("Cahan et al., arXiv 2406.16109: reports the whole X-ray -> CTPA model, no VQ-GAN "
                 "reconstruction figure was found to compare with")  # fmt: skip

# PerX2CT and X2CT-GAN's setups differ only in their split, geometry and metrics: the LIDC-IDRI conversion, grid
# and renderer are one recipe
_LIDC_128 = Paper(
    name="perx2ct",
    title="PerX2CT (Kyung et al., ICASSP 2023): 855 / 17 / 76 LIDC-IDRI CTs, 128^3 at 2.5 mm from 128^2 DRRs",
    bundle="perx2ct",
    split_file="perx2ct",
    geometry="perx2ct",
    size=(128, 128, 128),
    spacing=(2.5, 2.5, 2.5),
    drr_pixels=128,
    renderer="plastimatch",
    fidelity=True,
    overrides={"hu_window": "x2ctgan"},
    metrics=(
        Metric("psnr_2d_x2ctgan", "PSNR (dB), PerX2CT: 2D slices, peak 4095", None, PERX2CT_SRC),
        Metric("ssim_perx2ct", "SSIM, PerX2CT: one 3D SSIM, data range 2", None, PERX2CT_SRC),
        Metric("mae_hu", "MAE (HU) [not in the paper]", None, "ours", higher_is_better=False),
    ),
)

PAPERS: dict[str, Paper] = {
    "perx2ct": _LIDC_128,
    "x2ctgan": replace(
        _LIDC_128,
        name="x2ctgan",
        title="X2CT-GAN's setup (Ying et al., CVPR 2019): 916 / 102 LIDC-IDRI CTs, 128^3 at 2.5 mm from 128^2 DRRs",
        # bundle perx2ct, kept: the bundle with X2CT-GAN's input and output sizes (README: why not the cascade)
        split_file="x2ctgan",
        geometry="x2ctgan",
        metrics=(
            Metric("mae_x2ctgan", "MAE, X2CT-GAN: integer [0, 2500] levels", None, X2CTGAN_SRC, False),
            Metric("psnr_x2ctgan", "PSNR (dB), X2CT-GAN: 3D, peak 4095", None, X2CTGAN_SRC),
            Metric("ssim_x2ctgan", "SSIM, X2CT-GAN: 2D slices, mean of 3 axes", None, X2CTGAN_SRC),
        ),
    ),
    "xray2ctpa-vqgan": Paper(
        name="xray2ctpa-vqgan",
        title="X-ray2CTPA's stage 1 (Cahan et al., arXiv 2406.16109): 3D VQ-GAN, whole CTs of 512x512x604",
        bundle="vqgan_3d_patch",
        split_file=None,
        geometry="x2ctgan",
        size=(512, 512, 604),
        spacing=(0.7, 0.7, 0.5),
        drr_pixels=128,  # unused by the VQ-GAN (it reads the CT only); build_pairs renders them anyway
        renderer="xray2ct",
        fidelity=False,
        metrics=(
            Metric("psnr_xray2ct", "PSNR (dB), ours: HU [-1024, 2048], 3D", None, XRAY2CTPA_SRC),
            Metric("ssim_xray2ct", "SSIM, ours: 3D gaussian window", None, XRAY2CTPA_SRC),
            Metric("mae_hu", "MAE (HU)", None, XRAY2CTPA_SRC, False),
        ),
    ),
}


def accepts(module: str, function: str, option: str) -> bool:
    """Whether ``module.function`` (a data_prep CLI entry) has the keyword ``option`` on this checkout."""
    import importlib

    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError):
        return False
    return option in inspect.signature(fn).parameters


def fidelity_args(module: str, function: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``--z_spacing slice_thickness --drr_hu_offset paper``, each only where ``module.function`` accepts it
    (and not in ``skip``)."""
    out = []
    for option, value in FIDELITY_FLAGS.items():
        if option not in skip and accepts(module, function, option):
            out += [f"--{option}", value]
    return out


def missing_fidelity_flags() -> list[str]:
    """FIDELITY_FLAGS neither dicom_to_nifti nor build_pairs accepts on this checkout."""
    return [o for o in FIDELITY_FLAGS
            if not (accepts("data_prep.dicom_to_nifti", "main", o) or accepts("data_prep.build_pairs", "build_pairs", o))]  # fmt: skip


def split_patients(split_file: str) -> list[str]:
    """The LIDC-IDRI patient ids (``LIDC-IDRI-NNNN``) a split file lists: what to select for download."""
    from data_prep import splits

    return sorted({case.split(".")[0] for case in splits.load_split_file(split_file)})


def _series_key(path: str) -> str | None:
    """``<PatientID>.<StudyDate>.<SeriesNumber>`` of the series ``path`` (one of its files) belongs to: the key
    ``build_pairs`` matches DICOM folders with (read from this file, not the folder's first, so a folder holding
    several series still names each one right)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # dicom_to_nifti converted it, so this is a race or a changed file: no key
        return None
    parts = [str(ds.get(tag, "") or "").strip() for tag in ("PatientID", "StudyDate", "SeriesNumber")]
    return ".".join(parts) if all(parts) else None


def name_by_split(dicom_dir: str, nifti_dir: str, out_dir: str, split_file: str | None) -> dict[str, str]:
    """Link every converted series (``dicom_to_nifti``'s name) as ``<out_dir>/<case id>.nii.gz``.

    The id is the split file's (``<PatientID>.<StudyDate>.<SeriesNumber>.<n>``, matched from the DICOM headers as
    ``build_pairs`` matches DICOM folders), else ``<PatientID>.<StudyDate>.<SeriesNumber>``. Returns id -> NIfTI.
    """
    from common.datalist import safe_case_name
    from common.dicom import scan_dicom_folder
    from common.errors import InputError
    from data_prep import splits
    from data_prep.dicom_to_nifti import output_name

    listed = splits.load_split_file(split_file) if split_file else {}
    by_prefix = splits.prefix_index(listed) if listed else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    linked: dict[str, str] = {}
    for info in scan_dicom_folder(dicom_dir):
        nifti = Path(nifti_dir) / output_name(info)
        if not nifti.is_file():
            continue  # dicom_to_nifti reported why
        key = _series_key(info.files[0])
        if key is None:
            raise InputError(info.files[0], "no PatientID, StudyDate or SeriesNumber in the DICOM header")
        # a listed id is the split file's; an unlisted one comes from a (hostile) header: made a safe file name
        case = splits.match_listed_id(key, key, listed, by_prefix) if listed else safe_case_name(key)
        if case is None:
            continue  # not in the paper's lists: build_pairs would leave it out too
        if case in linked:
            raise InputError(info.folder, f"a second series for case {case} (first: {linked[case]})")
        target = out / f"{case}.nii.gz"
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(nifti.resolve())
        linked[case] = str(nifti)
    return linked


def tiny_split(named_dir: str, path: str) -> str:
    """The CI stand-in: the one example CT under a training, a validation and a test id (a smoke test only)."""
    from common.atomic import atomic_write_text

    folder = Path(named_dir)
    cases = sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("tiny-"))
    if not cases:
        raise SystemExit(f"error: {named_dir}: no converted CT to stand in for LIDC-IDRI")
    source = cases[0]
    lists = {"training": [source.name[: -len(".nii.gz")]], "validation": ["tiny-validation"], "test": ["tiny-test"]}
    for split in ("validation", "test"):
        link = folder / f"tiny-{split}.nii.gz"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source.resolve())
    atomic_write_text(path, json.dumps(lists, indent=1) + "\n")
    return path


class Recipe:
    """The commands of one paper's recipe in ``work``; ``run(step)`` runs one step."""

    def __init__(self, paper: Paper, lidc: str | None, work: str, tiny: bool = False, gpus: int = 1,
                 python: str = sys.executable, official: str | None = None, extra: list[str] | None = None,
                 dry_run: bool = False):  # fmt: skip
        # absolute: the commands run from the repository root
        lidc, official = (None if p is None else os.path.abspath(p) for p in (lidc, official))
        self.paper, self.lidc, self.work, self.tiny, self.gpus = paper, lidc, Path(work).resolve(), tiny, int(gpus)
        self.python, self.official, self.extra = python, official, list(extra or [])
        self.dry_run = dry_run  # print (and log) every command, run none
        self.configs = REPO / "bundles" / paper.bundle / "configs"
        self.nifti, self.named = self.work / "nifti", self.work / "named"
        self.dataset, self.bundle_root = self.work / "dataset", self.work / "bundle"
        self.eval_dir = self.work / ("eval_official" if official else "eval")

    # ------------------------------------------------------------------------------------------- commands
    def config_files(self, *names: str) -> str:
        files = [str(self.configs / n) for n in names]
        if self.official:
            files.append(str(self.configs / "perx2ct_official.json"))
        if self.tiny:
            files.append(str(self.configs / "cpu_tiny.json"))
        return "[" + ",".join(f"'{f}'" for f in files) + "]"

    def overrides(self) -> list[str]:
        out = []
        for key, value in self.paper.overrides.items():
            out += [f"--{key}", str(value)]
        return out + self.extra

    def split_arg(self) -> str | None:
        if self.tiny:
            return str(self.work / "tiny_split.json")
        return self.paper.split_file

    def pairs_command(self) -> list[str]:
        p = self.paper
        size = p.tiny_size if self.tiny else p.size
        # the same field of view at tiny size: spacing scaled by size / tiny size
        spacing = [s * n / t for s, n, t in zip(p.spacing, p.size, size)]
        cmd = [self.python, "-m", "data_prep.build_pairs", str(self.named), str(self.dataset),
               "--size", json.dumps(list(size)), "--spacing", json.dumps([round(s, 6) for s in spacing]),
               "--geometry", p.geometry, "--drr_pixels", str(size[0] if self.tiny else p.drr_pixels)]  # fmt: skip
        split = self.split_arg()
        if split:
            cmd += ["--split_file", split]
            if p.split_file == "x2ctgan" and not self.tiny:
                cmd += ["--val_fraction", "0.1"]  # X2CT-GAN lists no validation cases: 10% of training, by patient
        if p.renderer == "plastimatch" and not self.tiny:
            cmd += ["--renderer", "plastimatch"]
        elif p.renderer == "plastimatch":
            cmd += ["--attenuation", "plastimatch"]  # CI has no plastimatch: our projector, its HU conversion
        if p.fidelity:  # the z spacing was set by dicom_to_nifti (the nifti step); build_pairs reads NIfTI here
            cmd += fidelity_args("data_prep.build_pairs", "build_pairs", skip=("z_spacing",))
        return cmd

    def train_command(self) -> list[str]:
        if self.gpus > 1:
            launch = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.gpus)]
            files = self.config_files("train.json", "multi_gpu_train.json")
        else:
            launch, files = [self.python], self.config_files("train.json")
        return launch + ["-m", "monai.bundle", "run", "training", "--config_file", files,
                         "--dataset_dir", str(self.dataset), "--bundle_root", str(self.bundle_root),
                         "--output_dir", str(self.work / "train_logs")] + self.overrides()  # fmt: skip

    def slurm_command(self, nodes: int = 1) -> list[str]:
        overlays = [str(self.configs / "cpu_tiny.json")] if self.tiny else []
        extra = " ".join(shlex.quote(a) for a in self.overrides())
        cmd = [self.python, "-m", "xray2ct.slurm", "render", "--bundle", self.paper.bundle,
               "--dataset_dir", str(self.dataset), "--bundle_root", str(self.bundle_root), "--nodes", str(nodes),
               "--gpus_per_node", str(max(self.gpus, 1))]  # fmt: skip
        if overlays:
            cmd += ["--overlays", ",".join(overlays)]
        return cmd + ([f"--extra={extra}"] if extra else [])  # one argument: fire reads "--x" values as flags

    def evaluate_command(self) -> list[str]:
        return [self.python, "-m", "monai.bundle", "run", "evaluating",
                "--config_file", self.config_files("train.json", "evaluate.json"),
                "--dataset_dir", str(self.dataset), "--bundle_root", str(self.bundle_root),
                "--output_dir", str(self.eval_dir)] + self.overrides()  # fmt: skip

    # ------------------------------------------------------------------------------------------- running
    def _log(self, cmd: list[str]) -> None:
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"[reproduce {self.paper.name}] $ {line}", flush=True)
        with open(self.work / "commands.sh", "a") as fh:
            fh.write(line + "\n")

    def _call(self, cmd: list[str], stdout=None) -> None:
        self._log(cmd)
        if self.dry_run:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        res = subprocess.run(cmd, cwd=REPO, env=env, stdout=stdout)
        if res.returncode != 0:
            raise SystemExit(f"error: step failed (exit code {res.returncode}): {' '.join(cmd[:6])} ...")

    def run(self, step: str) -> None:
        from common.atomic import atomic_path, atomic_write_text

        self.work.mkdir(parents=True, exist_ok=True)
        if step == "nifti":
            if not self.lidc:
                raise SystemExit("error: --lidc (the LIDC-IDRI DICOM folder) is needed for the nifti step")
            extra = fidelity_args("data_prep.dicom_to_nifti", "main") if self.paper.fidelity else []
            self._call([self.python, "-m", "data_prep.dicom_to_nifti", self.lidc, str(self.nifti)] + extra)
        elif step == "name":
            self._log([self.python, "-m", "xray2ct.reproduce", self.paper.name, "--lidc", str(self.lidc), "--work",
                       str(self.work), "--steps", "name"] + (["--tiny"] if self.tiny else []))  # fmt: skip
            if self.dry_run:
                return
            linked = name_by_split(str(self.lidc), str(self.nifti), str(self.named), self.paper.split_file)
            print(f"[reproduce {self.paper.name}] {len(linked)} CT(s) named by their case ids in {self.named}")
            if self.tiny:
                tiny_split(str(self.named), str(self.work / "tiny_split.json"))
        elif step == "pairs":
            missing = missing_fidelity_flags() if self.paper.fidelity else []
            if missing:
                print(f"[reproduce {self.paper.name}] WARNING: data_prep has no --{', --'.join(missing)} on this "
                      "checkout: the DRRs are built without the papers' z-spacing / HU-offset conventions")  # fmt: skip
            self._call(self.pairs_command())
        elif step == "train":
            self._call(self.train_command())
        elif step == "slurm":
            target = self.work / "train.sbatch"
            if self.dry_run:
                self._log(self.slurm_command() + [">", str(target)])
                return
            with atomic_path(target) as tmp, open(tmp, "w") as fh:
                self._call(self.slurm_command(), stdout=fh)
            print(f"[reproduce {self.paper.name}] wrote {target}: submit with `sbatch {target}`")
        elif step == "evaluate":
            if self.official:
                self._call([self.python, "-m", "bundles.perx2ct.scripts.convert_official", self.official,
                            str(self.bundle_root / "models" / "model.pt")])  # fmt: skip
            self._call(self.evaluate_command())
        elif step == "table":
            if self.dry_run:
                return
            report = self.eval_dir / "metrics_report.json"
            text = format_table(self.paper, json.loads(report.read_text()), tiny=self.tiny, official=bool(self.official))
            atomic_write_text(self.work / "table.md", text + "\n")
            print(text)
        else:
            raise SystemExit(f"error: unknown step {step!r}; one of {', '.join(STEPS)}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(paper: Paper, report: dict, tiny: bool = False, official: bool = False) -> str:
    """Our figures on the test split beside the mean-training-CT baseline and the paper's, with sources."""
    ours, base = report.get("metrics", {}), report.get("baseline", {}).get("metrics", {})
    what = "the official PerX2CT.ckpt, converted" if official else f"bundle {paper.bundle}, trained by this recipe"
    baseline = report.get("baseline", {})
    baseline_text = baseline.get("name", "none") + (f" ({baseline['description']})" if baseline.get("description") else "")
    lines = [f"## {paper.title}", "",
             f"{report.get('n_cases', '?')} {report.get('split', 'test')} case(s); model: {what}; "
             f"baseline: {baseline_text}.", "",
             "| metric | ours | baseline | paper | paper's source |", "|---|---|---|---|---|"]  # fmt: skip
    for m in paper.metrics:
        lines.append(f"| {m.label} | {_fmt(ours.get(m.key))} | {_fmt(base.get(m.key))} | {_fmt(m.paper)} | {m.source} |")
    if tiny or report.get("smoke_test"):
        lines += ["", "SMOKE TEST: tiny size and/or training cases evaluated; not a quality figure."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("paper", choices=sorted(PAPERS))
    parser.add_argument("--lidc", help="the LIDC-IDRI download: a folder of DICOM series (nifti and name steps)")
    parser.add_argument("--work", default=None, help="working folder: nifti/, named/, dataset/, bundle/, eval/")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    parser.add_argument("--gpus", type=int, default=1, help="> 1: torchrun on one node (and the sbatch's GPUs)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("TINY") == "1",
                        help="CPU size (cpu_tiny.json; env TINY=1): the CI run")  # fmt: skip
    parser.add_argument("--list_patients", action="store_true",
                        help="print the patient ids of the paper's split (to select in the LIDC-IDRI download), exit")
    parser.add_argument("--dry_run", action="store_true", help="print every command (and commands.sh), run none")
    parser.add_argument("--official", help="PerX2CT only: PerX2CT.ckpt, converted and evaluated (no training)")
    args, extra = parser.parse_known_args(argv)
    paper = PAPERS[args.paper]
    if args.list_patients:
        if not paper.split_file:
            parser.error(f"{paper.name} has no published LIDC-IDRI split: any CT collection works")
        print("\n".join(split_patients(paper.split_file)))
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.official:
        if paper.name != "perx2ct":
            parser.error("--official is PerX2CT's released checkpoint: only with the perx2ct recipe")
        if args.steps == ",".join(DEFAULT_STEPS):
            steps = ["nifti", "name", "pairs", "evaluate", "table"]
        if "train" in steps:
            parser.error("--official evaluates the released weights: leave out the train step")
        if args.tiny:
            parser.error("--official is the paper-size network: not with --tiny (TINY=1)")
    if not args.work:
        parser.error("--work is required")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    recipe = Recipe(paper, args.lidc, args.work, tiny=args.tiny, gpus=args.gpus, official=args.official, extra=extra,
                    dry_run=args.dry_run)
    for step in STEPS:  # always in the recipe's order
        if step in steps:
            recipe.run(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
