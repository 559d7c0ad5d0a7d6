"""REST calls against a running MONAI Label server with ``monailabel_app`` (bin/monailabel_check.sh runs it).

``/info/``; ``/infer/<model>`` for every offered model on every study (volumes: the returned NIfTI must be
float32 HU on the study's grid; pe_classifier: one probability); a 1-epoch ``/train/<model>`` (run_sync) for
the trainable ones, then their inference again with the weights training wrote. Prints one table row per
call; exits 1 when any call fails or any check does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

try:  # MONAI Label's venv has it; ours may not (then --help still answers, a run says what is missing)
    import requests
except ImportError:  # pragma: no cover - depends on the environment
    requests = None

VOLUME_MODELS = ("vqgan_3d_patch", "pix2pix_phase")
CLASSIFIER_MODELS = ("pe_classifier",)
TRAINABLE = ("vqgan_3d_patch", "pix2pix_phase")
PARAMS = {"device": "cpu"}
# vqgan_3d_patch reconstructs through overlapping 32^3 windows: the 35 M-voxel LIDC CT took 56 s on 2 CPU cores,
# but 2.5 M voxels took 5 min when the cores were shared with a test suite; XRAY2CT_ML_VQGAN_MAX_VOXELS skips
# larger studies (0: none skipped)
SLOW_VOXELS = {"vqgan_3d_patch": int(os.environ.get("XRAY2CT_ML_VQGAN_MAX_VOXELS", 0)) or 10**12}
SLOW_REASON = {"vqgan_3d_patch": "over XRAY2CT_ML_VQGAN_MAX_VOXELS"}
ROWS: list[tuple[str, ...]] = []
FAILURES: list[str] = []


def row(model: str, call: str, study: str, status: int | str, seconds: float, result: str, ok: bool) -> None:
    ROWS.append((model, call, study, str(status), f"{seconds:.1f}", result if ok else f"FAIL: {result}"))
    print(" | ".join(ROWS[-1]), flush=True)
    if not ok:
        FAILURES.append(f"{model} {call} {study}: {result}")


def check_volume(content: bytes, study_path: str) -> tuple[bool, str]:
    """The returned NIfTI against the study: same shape and affine, float32, finite, in the HU range."""
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        f.write(content)
        f.flush()
        out = nib.load(f.name)
        array = np.asarray(out.dataobj)
        dtype, affine = out.get_data_dtype(), out.affine
    ref = nib.load(study_path)
    text = f"{array.shape} {dtype} HU [{float(array.min()):.0f}, {float(array.max()):.0f}]"
    problems = []
    if array.shape != ref.shape:
        problems.append(f"shape {array.shape} != input {ref.shape}")
    if not np.allclose(affine, ref.affine, atol=1e-3):
        problems.append("affine differs from the input's")
    if dtype != np.float32 or not np.isfinite(array).all():
        problems.append("not finite float32")
    if array.min() < -1100 or array.max() > 4000 or (array.max() <= 1.0 and array.min() >= -1.0):
        problems.append("not in HU")
    return not problems, text + ("; " + "; ".join(problems) if problems else "; on the input grid")


def infer(url: str, model: str, study: str, study_path: str, label: str = "infer") -> None:
    volume = model in VOLUME_MODELS
    start = time.time()
    try:
        r = requests.post(
            f"{url}/infer/{model}",
            params={"image": study, "output": "image" if volume else "json"},
            data={"params": json.dumps(PARAMS)},
            timeout=1800,
        )
    except requests.RequestException as exc:
        row(model, label, study, "-", time.time() - start, f"{type(exc).__name__}: {exc}", False)
        return
    seconds = time.time() - start
    if r.status_code != 200:
        row(model, label, study, r.status_code, seconds, r.text[:200].replace("\n", " "), False)
        return
    if volume:
        ok, text = check_volume(r.content, study_path)
    else:
        prediction = r.json().get("prediction", [])
        ok = len(prediction) == 1 and 0.0 <= float(prediction[0]["score"]) <= 1.0
        text = (
            f"classification: {prediction[0]['label']} p={float(prediction[0]['score']):.3f}"
            if prediction
            else str(r.json())[:200]
        )
    row(model, label, study, r.status_code, seconds, text, ok)


def train(url: str, model: str) -> None:
    body = {"max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False, "pretrained": True}
    start = time.time()
    try:
        r = requests.post(f"{url}/train/{model}", params={"run_sync": "true"}, json=body, timeout=3600)
    except requests.RequestException as exc:
        row(model, "train 1 epoch", "all", "-", time.time() - start, f"{type(exc).__name__}: {exc}", False)
        return
    seconds = time.time() - start
    text = r.text[:160].replace("\n", " ")
    row(model, "train 1 epoch", "all", r.status_code, seconds, text if r.status_code != 200 else "done", r.ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--studies", required=True, help="the server's studies folder (<id>.nii.gz files)")
    parser.add_argument("--bundles", required=True, help="the app's bundles_dir (to list checkpoints)")
    args = parser.parse_args(argv)
    if requests is None:
        print("error: the REST check needs the 'requests' package: run it in MONAI Label's venv "
              "(bin/monailabel_check.sh)", file=sys.stderr)
        return 2
    studies = sorted(f[: -len(".nii.gz")] for f in os.listdir(args.studies) if f.endswith(".nii.gz"))
    paths = {s: os.path.join(args.studies, s + ".nii.gz") for s in studies}
    print("model | call | study | HTTP | seconds | result", flush=True)

    start = time.time()
    r = requests.get(f"{args.url}/info/", timeout=60)
    info = r.json() if r.ok else {}
    models = info.get("models", {})
    offered = sorted(models)
    expected = sorted(VOLUME_MODELS + CLASSIFIER_MODELS)
    types = {m: models[m].get("type") for m in offered}
    ok = offered == expected and types.get("pe_classifier") == "classification"
    ok = ok and sorted(info.get("trainers", {})) == sorted(TRAINABLE)
    row("-", "info", "-", r.status_code, time.time() - start,
        f"models {types}; trainers {sorted(info.get('trainers', {}))}", ok)  # fmt: skip

    for model in expected:
        for study in studies:
            voxels = int(np.prod(nib.load(paths[study]).shape))
            if voxels > SLOW_VOXELS.get(model, voxels):
                row(model, "infer", study, "-", 0.0, f"skipped: {voxels / 1e6:.0f} M voxels ({SLOW_REASON[model]})", True)
                continue
            infer(args.url, model, study, paths[study])
    for model in TRAINABLE:
        before = {f: os.path.getmtime(os.path.join(args.bundles, model, "models", f))
                  for f in os.listdir(os.path.join(args.bundles, model, "models"))}  # fmt: skip
        train(args.url, model)
        after = sorted(f for f in os.listdir(os.path.join(args.bundles, model, "models"))
                       if f not in before or os.path.getmtime(os.path.join(args.bundles, model, "models", f)) != before[f])  # fmt: skip
        row(model, "checkpoints written", "-", "-", 0.0, ", ".join(after) or "none", bool(after))
        smallest = min(studies, key=lambda s: int(np.prod(nib.load(paths[s]).shape)))
        infer(args.url, model, smallest, paths[smallest], label="infer after train")

    print(f"\n{len(ROWS) - len(FAILURES)} passed, {len(FAILURES)} failed", flush=True)
    for failure in FAILURES:
        print("FAILED:", failure, flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
