"""Pair average CTs with their phase-0 CTs and lay them out as trainA/ trainB/ + a MONAI datalist.

    python -m data_prep.prepare_pairs AVERAGES_DIR PHASES_DIR OUTPUT_DIR \
        [--phase_glob "*Gated 0.0A*.nii*"] [--mode copy|symlink|hardlink] [--val_fraction 0.2 --test_fraction 0.2]
        [--seed 0] [--split_hash sha256|md5]

(console script ``xray2ct-prepare-pairs``). The datalist has ``training``, ``validation`` (model selection) and
``test`` (evaluation on patients the model never saw) splits, by patient folder, assigned as build_pairs
assigns them (:func:`data_prep.layout.assign_splits`); ``--split_hash md5`` reproduces the splits of datasets
written before that (docs/ARCHITECTURE.md, "Splits").

``AVERAGES_DIR/<patient>/*.nii*`` (one average CT) is matched to ``PHASES_DIR/<patient>/<phase_glob>`` by
subfolder name. Each pair must agree in shape, spacing and orientation. Cases that cannot be paired,
do not agree, or cannot be read or copied (cloud-drive permission errors) go to ``pairing_report.json``
instead of stopping the run. Files are copied atomically, so a crash never leaves half a volume.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import fire
import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.atomic import atomic_path, atomic_write_text
from common.errors import InputError
from common.io import read_nifti_header
from data_prep.layout import assign_splits

NIFTI_GLOB = "*.nii*"
DEFAULT_PHASE_GLOB = "*Gated 0.0A*.nii*"
SPACING_TOL_MM = 1e-3


def _match(folder: str, pattern: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if fnmatch.fnmatch(f, pattern) and os.path.isfile(os.path.join(folder, f))
    )


def header_geometry(path: str) -> dict:
    """Shape, spacing and orientation codes from a NIfTI header (voxels are not read)."""
    try:
        read_nifti_header(path)
        img = nib.load(path)
    except PermissionError:
        raise
    except Exception as e:
        raise InputError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    return {
        "shape": [int(s) for s in img.shape[:3]],
        "spacing": [float(s) for s in img.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
    }


def geometry_mismatch(a: dict, b: dict) -> str | None:
    """Why two headers cannot form a pair, or None when shape, spacing and orientation agree."""
    if a["shape"] != b["shape"]:
        return f"shape differs: average {a['shape']} vs phase-0 {b['shape']}"
    if not np.allclose(a["spacing"], b["spacing"], atol=SPACING_TOL_MM):
        return f"spacing differs: average {a['spacing']} vs phase-0 {b['spacing']}"
    if a["orientation"] != b["orientation"]:
        return f"orientation differs: average {a['orientation']} vs phase-0 {b['orientation']}"
    return None


def place_file(src: str, dst: str, mode: str = "copy") -> None:
    """Copy (atomically), symlink or hardlink ``src`` to ``dst``; an existing ``dst`` is replaced."""
    if mode == "copy":
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with atomic_path(dst) as tmp:
        os.remove(tmp)
        if mode == "symlink":
            os.symlink(os.path.abspath(src), tmp)
        elif mode == "hardlink":
            os.link(src, tmp)
        else:
            raise InputError(None, f"mode must be 'copy', 'symlink' or 'hardlink', got {mode!r}")


def split_cases(
    case_ids: list[str], val_fraction: float, test_fraction: float, seed: int = 0, split_hash: str = "sha256"
) -> dict[str, list[str]]:
    """Split name -> sorted case ids, by :func:`data_prep.layout.assign_splits` (the one split rule of every
    dataset writer, so build_pairs and prepare_pairs agree on the same ids). ``split_hash="md5"`` reproduces
    the split prepare_pairs wrote before (MD5 order, at least one validation and test case when possible)."""
    assigned = assign_splits(case_ids, val_fraction, test_fraction, seed, split_hash=split_hash)
    return {name: sorted(c for c, s in assigned.items() if s == name) for name in ("validation", "test", "training")}


def find_pairs(averages_dir: str, phases_dir: str, phase_glob: str, avg_glob: str = NIFTI_GLOB):
    """Return (pairs {case: (avg, phase0)}, unpaired [{case, reason, files}], ignored [paths])."""
    for d in (averages_dir, phases_dir):
        if not os.path.isdir(d):
            raise InputError(d, "folder not found")
    avg_cases = {f for f in os.listdir(averages_dir) if os.path.isdir(os.path.join(averages_dir, f))}
    phase_cases = {f for f in os.listdir(phases_dir) if os.path.isdir(os.path.join(phases_dir, f))}
    ignored = sorted(
        os.path.join(d, f)
        for d in (averages_dir, phases_dir)
        for f in os.listdir(d)
        if not os.path.isdir(os.path.join(d, f))
    )
    pairs, unpaired = {}, []
    for case in sorted(avg_cases | phase_cases):
        if case not in phase_cases:
            unpaired.append({"case": case, "reason": "no phases subfolder", "files": []})
            continue
        if case not in avg_cases:
            unpaired.append({"case": case, "reason": "no averages subfolder", "files": []})
            continue
        avgs = _match(os.path.join(averages_dir, case), avg_glob)
        phases = _match(os.path.join(phases_dir, case), phase_glob)
        if len(avgs) != 1 or len(phases) != 1:
            reason = f"expected one average ({avg_glob}) and one phase-0 ({phase_glob}) file"
            unpaired.append(
                {
                    "case": case,
                    "reason": f"{reason}, found {len(avgs)} and {len(phases)}",
                    "files": avgs + phases,
                }
            )
            continue
        pairs[case] = (avgs[0], phases[0])
    return pairs, unpaired, ignored


def prepare_pairs(
    averages_dir: str,
    phases_dir: str,
    output_dir: str,
    phase_glob: str = DEFAULT_PHASE_GLOB,
    avg_glob: str = NIFTI_GLOB,
    mode: str = "copy",
    prefix: str = "patient",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_hash: str = "sha256",
) -> dict:
    """Pair, check, copy/link into ``trainA``/``trainB``, write ``dataset.json`` and ``pairing_report.json``.

    Splits: :func:`split_cases`; ``split_hash="md5"`` (``--split_hash md5``) rebuilds a dataset written before
    the split rule was shared with the same split as then."""
    pairs, unpaired, ignored = find_pairs(averages_dir, phases_dir, phase_glob, avg_glob)
    items, errors = [], []
    for case in tqdm(sorted(pairs), desc="pairing", unit="case"):
        avg, phase0 = pairs[case]
        try:
            problem = geometry_mismatch(header_geometry(avg), header_geometry(phase0))
        except (OSError, InputError) as e:
            errors.append(
                {
                    "case": case,
                    "file": getattr(e, "path", None) or getattr(e, "filename", None),
                    "error": f"{type(e).__name__}: {e}",
                }
            )
            continue
        if problem:
            unpaired.append({"case": case, "reason": problem, "files": [avg, phase0]})
            continue
        name = (
            f"{prefix}_{len(items) + 1}.nii.gz" if avg.endswith(".gz") else f"{prefix}_{len(items) + 1}.nii"
        )
        dst_a, dst_b = os.path.join(output_dir, "trainA", name), os.path.join(output_dir, "trainB", name)
        try:
            place_file(avg, dst_a, mode)
            place_file(phase0, dst_b, mode)
        except OSError as e:  # e.g. PermissionError on a cloud-synced drive: report the file and go on
            for dst in (dst_a, dst_b):
                if os.path.lexists(dst):
                    os.remove(dst)
            errors.append({"case": case, "file": e.filename, "error": f"{type(e).__name__}: {e}"})
            continue
        items.append(
            {
                "id": name.split(".")[0],
                "source": case,
                "avg": os.path.relpath(dst_a, output_dir),
                "phase0": os.path.relpath(dst_b, output_dir),
            }
        )
    split = split_cases([it["id"] for it in items], val_fraction, test_fraction, seed, split_hash)
    by_id = {it["id"]: it for it in items}
    datalist = {part: [by_id[i] for i in ids] for part, ids in split.items()}
    datalist["keys"] = {"input": "avg", "target": "phase0"}
    datalist["phase_glob"] = phase_glob
    datalist["split"] = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                         "split_hash": split_hash}  # fmt: skip
    atomic_write_text(os.path.join(output_dir, "dataset.json"), json.dumps(datalist, indent=2) + "\n")
    report = {
        "paired": len(items),
        "unpaired": unpaired,
        "errors": errors,
        "ignored": ignored,
        "cases": {it["id"]: it["source"] for it in items},
    }
    atomic_write_text(os.path.join(output_dir, "pairing_report.json"), json.dumps(report, indent=2) + "\n")
    print(
        f"paired {len(items)}, unpaired {len(unpaired)}, errors {len(errors)}, ignored {len(ignored)} "
        f"-> {os.path.join(output_dir, 'dataset.json')}"
    )
    return report


def main() -> None:
    fire.Fire(prepare_pairs)


if __name__ == "__main__":
    main()
