"""Does the refactor change a result? The same trained checkpoint evaluated before and after (issue 25).

    python benchmarks/refactor_equivalence.py --old_repo /work/wt-old --work /tmp/eq [--bundles perx2ct ...]

``--old_repo`` is a checkout of the pre-refactor commit (``git worktree add --detach /work/wt-old af6b8e9``);
this checkout (or ``--new_repo``) is the new tree. For each row of :data:`BUNDLES` (the six bundles, the
X-ray-only PE classifier, perx2ct and the cascade on the real-CT cohort), with the **old** tree: build the
tiny dataset (its ``data_prep.phantom`` / ``data_prep.cohort``), train at ``cpu_tiny`` size, evaluate with its
``evaluate.json``; then evaluate the **same** checkpoint on the **same** dataset with the **new** tree's
``evaluate.json``: the same command-line ids (the checkpoint under the old tree's id, which the new tree takes
with a DeprecationWarning where it was renamed: the warnings are recorded), another ``output_dir``. Every run
is ``python -m monai.bundle run`` in a subprocess with ``PYTHONPATH`` set to its tree (recorded:
``imported_from``) and one thread, so both trees reduce in the same order on the same CPU. latent_ddpm encodes
with the VQ-GAN trained in the vqgan_3d_patch row (run first when latent_ddpm is selected alone).

The two ``metrics_report.json`` are flattened (``a/b/0/c``) and every number both have is compared:
``|old - new| <= RTOL * max(1, |old|, |new|)`` with ``RTOL = 1e-5``. Why that bound: the figures are means
over 32^3 = 32768 voxels (and over the test cases) computed in float32 (eps 1.19e-7); a reordered float32
sum of N terms is off by about eps * log2(N) = 1.8e-6 relative with pairwise summation; PSNR turns a relative
error d of the MSE into 10 / ln 10 * d = 4.3 d dB (1e-5 dB at PSNR ~15 dB, inside the bound); the bootstrap
intervals resample the same per-case values with the same seed. So 1e-5 is about 5x the float32 order of a
reordered sum: a difference beyond it is a change of computation, not rounding. Keys only the new report
has are listed (the refactor may add figures); keys only the old one has, numbers outside the bound and
numbers that became strings are failures. Other strings that differ are listed, not judged (each
evaluation's own output folder is replaced by ``<output_dir>`` first). The files both evaluations wrote
(previews, reconstructions, CSVs) are compared byte for byte (NIfTI: header affine and voxels).

Prints the table (bundle, metric, old, new, |diff|) of each report's ``metrics`` and the largest difference
over all other numbers; writes ``<work>/refactor_equivalence.json``. Resumable: a dataset, checkpoint or
report already under ``--work`` is reused (``--fresh`` re-runs the evaluations, ``--fresh new`` the new tree's).

Measured (2026-12-07, old af6b8e9, 2-core CPU, one thread per run, ``--work /tmp/eq``): 9 rows, 14,288
numbers compared, **all bit-identical** (max |diff| 0), no key added or removed, against main de8c170, 09c57d3
(the one-writer merge) and 58e7241 (the geometry merge; re-run with ``--fresh new``). The renamed ``checkpoint``
id warned in the new tree for vqgan_3d_patch, progressive_cascade and pix2pix_phase. Output files: at de8c170
all 30 identical; from 09c57d3 on the VQ-GAN reconstructions are the same voxels under the new names
(``<case>_recon.nii.gz`` -> ``<case>_ct.nii.gz``), and the 14 evaluation previews are ``<case>_preview.png``
(``_preview_stages.png``) with the same panel rows, the ground truth moved to the top (the one writer puts the
reference first: common.predictor.write_previews). About 20 minutes from scratch on the shared, loaded 2-core
machine; ``--fresh new`` about 5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
REPORT = "metrics_report.json"

# dataset name -> data_prep.phantom.make_phantom_dataset arguments (the tests' tiny datasets, a few more cases)
DATASETS: dict[str, dict] = {
    # 12 chests 32^3 at 10 mm with PerX2CT-geometry DRRs 32^2, half with emboli (pe_classifier's label):
    # 4 training / 4 validation / 4 test, stratified by the PE label
    "pairs": dict(n_cases=12, size=32, spacing=10.0, geometry="perx2ct", drr_pixels=32, seed=0),
    # 6 breathing cycles, 4 phases, 32x32x16: average CT -> end-inhale phase (pix2pix_phase)
    "phases": dict(n_cases=6, size=[32, 32, 16], spacing=[10.0, 10.0, 16.0], drr_pixels=32, emboli_fraction=0.0,
                   n_phases=4, val_fraction=0.34, test_fraction=0.34, seed=1),  # fmt: skip
    # 12 patients generated from the real chest CT LIDC-IDRI-0001 with its label maps (bin/demo.py's cohort at
    # the tiny size): the anatomy metrics from label maps (heart Dice and centroid) that phantoms lack
    "cohort": dict(n_cases=12, size=32, spacing=10.0, drr_pixels=32, geometry="perx2ct", seed=0, val_fraction=0.25,
                   test_fraction=0.25, previews=0),  # fmt: skip
}
MAKERS = {"cohort": "data_prep.cohort import make_cohort"}  # dataset -> its builder (else make_phantom_dataset)

# bundle -> dataset, training runs (overrides on train.json + cpu_tiny.json), the checkpoint evaluated and the
# old tree's id for it (given to both trees: the new one renamed "checkpoint" to "ckpt_path"), evaluation overrides
_MODEL, _SAME_ID = {"checkpoint": "models/model.pt", "checkpoint_id": "checkpoint"}, {"checkpoint_id": "ckpt_path"}
BUNDLES: dict[str, dict] = {
    "vqgan_3d_patch": {"data": "pairs", "train": [{"max_epochs": 3}], **_MODEL},
    "perx2ct": {"data": "pairs", "train": [{"max_epochs": 3}], **_MODEL, **_SAME_ID},
    "progressive_cascade": {"data": "pairs", "train": [{"stage": s, "max_epochs": 2} for s in (1, 2, 3)],
                            **_MODEL, "checkpoint": "models/stage3_model.pt", "evaluate": {"stage": 3}},  # fmt: skip
    # the VQ-GAN of the vqgan_3d_patch step (cpu_tiny: the same architecture as latent_ddpm's cpu_tiny vqgan_def);
    # the old evaluation reads the latent cache the training wrote (latent_dir), the new one the dataset
    "latent_ddpm": {"data": "pairs", "train": [{"max_epochs": 3, "sampling_steps": 4}], **_MODEL, **_SAME_ID,
                    "evaluate": {"sampling_steps": 4}, "needs": "vqgan_3d_patch"},  # fmt: skip
    "pix2pix_phase": {"data": "phases", "train": [{"max_epochs": 3}], **_MODEL},
    "pe_classifier": {"data": "pairs", "train": [{"max_epochs": 3}], **_MODEL, **_SAME_ID},
    # the X-ray-only classifier (its own inputs and transforms): a row of pe_classifier, ids set for both runs
    "pe_classifier_xray": {"bundle": "pe_classifier", "data": "pairs", "base": {"modality": "xray"},
                           "train": [{"max_epochs": 3}], **_MODEL, **_SAME_ID},  # fmt: skip
    # the X-ray -> CT bundles with anatomy on the real-CT cohort
    "perx2ct_cohort": {"bundle": "perx2ct", "data": "cohort", "train": [{"max_epochs": 3}], **_MODEL, **_SAME_ID},
    "progressive_cascade_cohort": {"bundle": "progressive_cascade", "data": "cohort", **_MODEL,
                                   "train": [{"stage": s, "max_epochs": 2} for s in (1, 2, 3)],
                                   "checkpoint": "models/stage3_model.pt", "evaluate": {"stage": 3}},  # fmt: skip
}


def _env(tree: Path, threads: int = 1) -> dict:
    keep = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return {**keep, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "default::DeprecationWarning"}  # fmt: skip


def _run(cmd: list[str], tree: Path, log: Path) -> float:
    """``cmd`` in ``tree`` with ``PYTHONPATH=tree``, output appended to ``log``; returns wall seconds."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ PYTHONPATH={tree} {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, cwd=tree, env=_env(tree), stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed in {tree} (exit {res.returncode}); log: {log}")
    return time.time() - t0


def bundle_run(tree: Path, bundle: str, run_id: str, names: list[str], overrides: dict, log: Path) -> float:
    """``python -m monai.bundle run <run_id>`` with ``tree``'s ``bundles/<bundle>/configs/<names>``; the
    overrides go to ``<log>.json`` (``--args_file``), the output to ``log``."""
    files = [str(tree / "bundles" / bundle / "configs" / n) for n in names]
    args = log.with_suffix(".json")
    args.write_text(json.dumps(overrides, indent=1))
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(files),
           "--args_file", str(args)]  # fmt: skip
    return _run(cmd, tree, log)


def make_dataset(old: Path, name: str, work: Path) -> Path:
    """``<work>/data/<name>`` written by the old tree's ``make_phantom_dataset`` (kept when already there)."""
    root = work / "data" / name
    if not (root / "dataset.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        maker = MAKERS.get(name, "data_prep.phantom import make_phantom_dataset")
        code = f"from {maker} as m; m({str(root)!r}, **{DATASETS[name]!r})"
        _run([sys.executable, "-c", code], old, work / f"data_{name}.log")
    return root


def imported_from(tree: Path) -> str:
    """Where ``common`` and ``bundles`` come from with ``tree``'s environment (evidence that each run used its tree)."""
    code = "import bundles, common; print(common.__file__, bundles.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True)
    return res.stdout.strip() or res.stderr.strip()[-300:]


def flatten(value, prefix: str = "") -> dict:
    """``{"a/b/0/c": leaf}`` of a JSON value (dict keys and list indices joined by ``/``)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out or {prefix: []}
    return {prefix: value}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare(old: dict, new: dict, rtol: float = RTOL, places: dict[str, str] | None = None) -> dict:
    """Every leaf of two reports: numbers within ``rtol`` (relative to max(1, |old|, |new|)), the rest listed.

    NaN equals NaN (an undefined figure in both); None (a NaN written as null) equals None. ``places``
    (``{path: "<name>"}``) are replaced in strings first: each evaluation's own output folder is not a difference.
    """

    def placed(value):
        if isinstance(value, str):
            for path, name in (places or {}).items():
                value = value.replace(path, name)
        return value

    fo = {k: placed(v) for k, v in flatten(old).items()}
    fn = {k: placed(v) for k, v in flatten(new).items()}
    rows, strings, failures = [], [], []
    for key in sorted(set(fo) & set(fn)):
        a, b = fo[key], fn[key]
        if _number(a) and _number(b):
            both_nan = math.isnan(a) and math.isnan(b) if isinstance(a, float) and isinstance(b, float) else False
            diff = 0.0 if both_nan or a == b else abs(float(a) - float(b))
            ok = both_nan or diff <= rtol * max(1.0, abs(a), abs(b))
            rows.append({"key": key, "old": a, "new": b, "abs_diff": diff, "ok": bool(ok)})
            if not ok:
                failures.append(key)
        elif a != b:
            strings.append({"key": key, "old": a, "new": b})
            if _number(a) != _number(b):
                failures.append(key)  # a number became something else (or back)
    only_old, only_new = sorted(set(fo) - set(fn)), sorted(set(fn) - set(fo))
    return {
        "rtol": rtol,
        "n_numbers": len(rows),
        "n_exactly_equal": sum(r["abs_diff"] == 0 for r in rows),
        "max_abs_diff": max((r["abs_diff"] for r in rows), default=0.0),
        "numbers": rows,
        "differing_values": strings,
        "only_old": only_old,
        "only_new": only_new,
        "failures": failures + [f"missing in new: {k}" for k in only_old],
    }


def same_file(a: Path, b: Path) -> bool:
    """Same content: bytes, or for ``.nii.gz`` the decoded affine and voxels (its gzip header has a time stamp)."""
    if a.name.endswith(".nii.gz") != b.name.endswith(".nii.gz"):
        return False
    if a.name.endswith(".nii.gz"):
        import nibabel as nib
        import numpy as np

        va, vb = nib.load(a), nib.load(b)
        return np.array_equal(va.affine, vb.affine) and np.array_equal(va.get_fdata(), vb.get_fdata())
    return a.read_bytes() == b.read_bytes()


def same_rows(a: Path, b: Path) -> bool:
    """Two PNGs whose pixel rows are the same multiset: the same panels in another order (a montage's rows moved)."""
    if not (a.suffix == b.suffix == ".png"):
        return False
    import numpy as np
    from PIL import Image

    try:
        pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    except OSError:  # not a readable image: only bytes can say
        return False
    return pa.shape == pb.shape and sorted(r.tobytes() for r in pa) == sorted(r.tobytes() for r in pb)


def compare_outputs(old_dir: Path, new_dir: Path) -> dict:
    """The files the two evaluations wrote (previews, CSVs, volumes): the same content?

    Files under the same relative path are compared; a file only one side has is paired with a file of the
    same content under another name on the other side (``renamed``: the refactor's one naming scheme), or else
    with a PNG of the same pixel rows in another order (``rows_reordered``: a montage's panels moved).
    """

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != REPORT}

    fo, fn = files(old_dir), files(new_dir)
    same, different, reordered = [], [], {}
    for rel in sorted(fo & fn):
        if same_file(old_dir / rel, new_dir / rel):
            same.append(rel)
        elif same_rows(old_dir / rel, new_dir / rel):
            reordered[rel] = rel
        else:
            different.append(rel)
    only_old, only_new, renamed = sorted(fo - fn), sorted(fn - fo), {}
    for test, found in ((same_file, renamed), (same_rows, reordered)):
        for rel in list(only_old):
            match = next((n for n in only_new if test(old_dir / rel, new_dir / n)), None)
            if match is not None:
                found[rel] = match
                only_old.remove(rel)
                only_new.remove(match)
    return {"identical": same, "different": different, "renamed": renamed, "rows_reordered": reordered,
            "only_old": only_old, "only_new": only_new}  # fmt: skip


def run_bundle(name: str, old: Path, new: Path, work: Path, fresh: str | None = None) -> dict:
    """Train (old tree), evaluate (old tree, then new tree) one bundle; returns its comparison."""
    spec = BUNDLES[name]
    bundle = spec.get("bundle", name)
    data = make_dataset(old, spec["data"], work)
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    base = {"dataset_dir": str(data), "bundle_root": str(root), "output_dir": str(root / "train_out"),
            **spec.get("base", {})}  # fmt: skip
    if spec.get("needs") == "vqgan_3d_patch":
        base["vqgan_checkpoint"] = str(work / "vqgan_3d_patch" / BUNDLES["vqgan_3d_patch"]["checkpoint"])
    times = {}
    checkpoint = root / spec["checkpoint"]
    if not checkpoint.is_file():
        t = 0.0
        for i, over in enumerate(spec["train"]):
            log = logs / f"train_old_{i}.log"
            log.write_text("")
            t += bundle_run(old, bundle, "training", ["train.json", "cpu_tiny.json"], {**base, **over}, log)
        times["train_old_s"] = round(t, 1)
    # the same command line for both trees: the checkpoint under the old tree's id (the new tree accepts a
    # renamed id with a DeprecationWarning, counted below)
    evaluate = {**base, "eval_split": "test", spec["checkpoint_id"]: str(checkpoint), **spec.get("evaluate", {})}
    reports, deprecated = {}, {}
    for tag, tree in (("old", old), ("new", new)):
        out = root / f"eval_{tag}"
        over = {**evaluate, "output_dir": str(out)}
        if name == "latent_ddpm" and tag == "old":  # before the refactor: the cache the training wrote
            over["latent_dir"] = str(root / "train_out" / "latent_cache")
        log = logs / f"evaluate_{tag}.log"
        if fresh in ("all", tag) or not (out / REPORT).is_file():
            shutil.rmtree(out, ignore_errors=True)  # no file of an earlier run is compared
            log.write_text("")
            names = ["train.json", "evaluate.json", "cpu_tiny.json"]
            times[f"evaluate_{tag}_s"] = round(bundle_run(tree, bundle, "evaluating", names, over, log), 1)
        reports[tag] = json.loads((out / REPORT).read_text())
        text = log.read_text() if log.is_file() else ""
        deprecated[tag] = sorted(set(re.findall(r"config id '[^']+' is deprecated[^\n]*?use '[^']+'", text)))
    places = {str(root / f"eval_{t}"): "<output_dir>" for t in ("old", "new")}
    result = compare(reports["old"], reports["new"], places=places)
    result["files"] = compare_outputs(root / "eval_old", root / "eval_new")
    headline = sorted(set(reports["old"].get("metrics", {})) & set(reports["new"].get("metrics", {})))
    return {"bundle": name, "dataset": str(data), "checkpoint": str(checkpoint), "times": times,
            "headline": headline, "checkpoint_id": spec["checkpoint_id"], "deprecated_ids": deprecated,
            "reports": {t: str(root / f"eval_{t}" / REPORT) for t in ("old", "new")}, **result}  # fmt: skip


def _fmt(v) -> str:
    return f"{v:.9g}" if _number(v) else str(v)


def print_table(results: list[dict]) -> None:
    print(f"\n{'bundle':<28}{'metric':<34}{'old':>18}{'new':>18}{'|diff|':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['bundle']:<28}FAILED: {r['error']}")
            continue
        by_key = {row["key"]: row for row in r["numbers"]}
        for k in r["headline"]:
            row = by_key.get(f"metrics/{k}")
            if row is None:
                continue
            flag = "" if row["ok"] else "  <-- outside the bound"
            print(f"{r['bundle']:<28}{k:<34}{_fmt(row['old']):>18}{_fmt(row['new']):>18}{row['abs_diff']:>12.3g}{flag}")
        print(f"{'':<28}all {r['n_numbers']} numbers: {r['n_exactly_equal']} exactly equal, max |diff| "
              f"{r['max_abs_diff']:.3g}; {len(r['failures'])} failures; {len(r['only_new'])} keys only in new, "
              f"{len(r['only_old'])} only in old, {len(r['differing_values'])} differing strings")  # fmt: skip
        files = r["files"]
        print(f"{'':<28}output files: {len(files['identical'])} identical, {len(files['renamed'])} identical under "
              f"another name, {len(files['rows_reordered'])} PNGs of the same rows reordered, "
              f"{len(files['different'])} different {files['different'][:4]}, "
              f"{len(files['only_old'])} only old, "
              f"{len(files['only_new'])} only new")  # fmt: skip
        if any(r["deprecated_ids"].values()):
            print(f"{'':<28}deprecation warnings (old checkpoint id {r['checkpoint_id']!r}): {r['deprecated_ids']}")
        for f in r["failures"][:10]:
            print(f"{'':<28}FAIL {f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--old_repo", required=True, help="checkout of the pre-refactor commit (af6b8e9)")
    p.add_argument("--new_repo", default=str(REPO), help="the checkout evaluated as new (default: this one)")
    p.add_argument("--work", default="outputs/refactor_equivalence", help="datasets, checkpoints, reports, logs")
    p.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES),
                   help="rows to run; default: all (the six bundles and 3 more rows)")  # fmt: skip
    p.add_argument("--fresh", nargs="?", const="all", choices=["all", "new"],
                   help="re-run the evaluations (all) or the new tree's only (new: after merging more changes); "
                        "datasets and checkpoints are kept")  # fmt: skip
    args = p.parse_args(argv)
    old, new, work = Path(args.old_repo).resolve(), Path(args.new_repo).resolve(), Path(args.work).resolve()
    for tree in (old, new):
        if not (tree / "bundles").is_dir():
            p.error(f"{tree}: not a checkout of this repository (no bundles/)")
    work.mkdir(parents=True, exist_ok=True)
    selected = [n for n in BUNDLES if n in args.bundles]  # the table's order: vqgan before latent_ddpm
    if "latent_ddpm" in selected and "vqgan_3d_patch" not in selected:
        selected.insert(0, "vqgan_3d_patch")
    results = []
    for name in selected:
        t0 = time.time()
        try:
            results.append(run_bundle(name, old, new, work, args.fresh))
        except Exception as e:  # one failing bundle must not hide the others
            results.append({"bundle": name, "error": str(e)})
        print(f"[equivalence] {name}: {time.time() - t0:.0f} s", flush=True)
    print_table(results)
    commits = {}
    for tag, tree in (("old", old), ("new", new)):
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True)
        commits[tag] = res.stdout.strip() or None
    summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "old_repo": str(old),
               "new_repo": str(new), "commits": commits,
               "imported_from": {"old": imported_from(old), "new": imported_from(new)}, "rtol": RTOL,
               "datasets": DATASETS, "bundles": results}  # fmt: skip
    out = work / "refactor_equivalence.json"
    sys.path.insert(0, str(REPO))
    from common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(summary, indent=1, default=str) + "\n")
    print(f"[equivalence] {out}")
    return 1 if any("error" in r or r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
