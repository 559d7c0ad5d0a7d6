"""Hostile checkpoints (issue 23, items 1, 4, 12): a record never runs code, a .pt never inflates, and the
zoo form (bare state dict + sidecar record) binds its record to the weights by their sha256.

Every loader of the project is fed the same poisoned checkpoints; each must refuse with one
:class:`InputError` naming the file and the target, and nothing of the payload may run or be imported.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from common.checkpoint import (
    NETWORKS,
    CheckpointLoader,
    CheckpointRecord,
    _locate,
    _qualified_name,
    allowed_network,
    build_for_inference,
    build_from_checkpoint,
    check_torch_file,
    export_bare,
    instantiate_network,
    load_weights,
    read_checkpoint,
    read_config,
    record_of,
    sidecar_path,
)
from common.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PERX2CT = ROOT / "bundles" / "perx2ct"
PERX2CT_CONFIGS = [str(PERX2CT / "configs" / "inference.json"), str(PERX2CT / "configs" / "cpu_tiny.json")]
EVIL_MODULE = "xray2ct_evil_payload"  # a module on sys.path whose import alone leaves a marker


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A tiny perx2ct checkpoint as training writes it: weights + record built from the bundle's configs."""
    parser = read_config(PERX2CT_CONFIGS, {"bundle_root": str(PERX2CT)})
    net = parser.get_parsed_content("network_def")
    inputs = {k: parser.get_parsed_content(k) for k in ("image_size", "volume_size", "spacing", "geometry", "hu_window")}
    record = CheckpointRecord("perx2ct", network=net, inputs=inputs, version="0")
    path = tmp_path_factory.mktemp("real") / "model.pt"
    torch.save({"model": net.state_dict(), "record": record.state_dict()}, path)
    return path


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """The file a payload would create; an importable module that creates it when imported."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_path"
    evil.mkdir()
    (evil / f"{EVIL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef run(**kw): pass\n")
    monkeypatch.syspath_prepend(str(evil))
    sys.modules.pop(EVIL_MODULE, None)
    return marker


def poison(real: Path, dst: Path, network_def: dict | None = None, inputs: dict | None = None) -> Path:
    """``real`` with its record's network_def and/or inputs replaced (weights unchanged)."""
    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    record = json.loads(checkpoint["record"]["json"])
    if network_def is not None:
        record["network_def"] = network_def
    if inputs is not None:
        record["inputs"] = {**record["inputs"], **inputs}
    checkpoint["record"] = {"json": json.dumps(record)}
    torch.save(checkpoint, dst)
    return dst


def payloads(marker: Path) -> dict[str, dict]:
    """network_defs that once ran ``touch marker`` or imported an arbitrary module."""
    command = {"cmd": f"touch {marker}"}
    net = "bundles.perx2ct.scripts.networks.PerX2CTNet"
    return {
        "subprocess.getoutput": {"_target_": "subprocess.getoutput", **command},
        "hidden in build_network": {"_target_": "common.checkpoint.build_network", "target": "subprocess.getoutput", **command},
        "any module imported": {"_target_": f"{EVIL_MODULE}.run"},
        "allowed class, component argument": {"_target_": net, "geometry": {"_target_": "subprocess.getoutput", **command}},
        "allowed class, expression argument": {"_target_": net, "geometry": f"$__import__('os').system('touch {marker}')"},
    }


# every loader of a checkpoint: pipeline (--checkpoint, --pe_checkpoint), web app, perx2ct server, batch
# synthesis, codec, the common loaders and the MONAI handler
def _server(path, tmp_path):
    from bundles.perx2ct.scripts import server

    key = tmp_path / "key"
    if not key.exists():
        server.write_key_file(str(key))
    with pytest.raises(SystemExit) as stop:
        server.main(checkpoint=str(path), key_file=str(key), bundle_root=str(PERX2CT), device="cpu")
    raise InputError(None, str(stop.value))


def _synthesize(path, tmp_path):
    from bundles.perx2ct.scripts.synthesize import synthesize

    (tmp_path / "reports.csv").write_text("uid\n1\n")
    (tmp_path / "projections.csv").write_text("uid,projection,filename\n1,Frontal,a.png\n1,Lateral,b.png\n")
    synthesize(str(tmp_path / "reports.csv"), str(tmp_path / "projections.csv"), str(tmp_path),
               str(tmp_path / "out"), checkpoint=str(path), device="cpu")  # fmt: skip


def _monai_handler(path, tmp_path):
    CheckpointLoader(str(path), {"model": torch.nn.Linear(1, 1)})(None)


LOADERS = {
    "read_checkpoint": lambda p, t: read_checkpoint(p),
    "build_from_checkpoint": lambda p, t: build_from_checkpoint(p),
    "load_weights": lambda p, t: load_weights(torch.nn.Linear(1, 1), p),
    "CheckpointLoader handler": _monai_handler,
    "build_for_inference": lambda p, t: build_for_inference(p, default_config_files=PERX2CT_CONFIGS[:1]),
    "build_for_inference + config": lambda p, t: build_for_inference(
        p, config_files=PERX2CT_CONFIGS, data_arguments=("spacing", "geometry"), settings={"bundle_root": str(PERX2CT)}
    ),
    "export_bare": lambda p, t: export_bare(p, t / "zoo.pt"),
    "codec": lambda p, t: __import__("common.codec", fromlist=["load_vqgan"]).load_vqgan(p, expected_bundle=None),
    "xray2ct-pipeline --checkpoint": lambda p, t: __import__("xray2ct.models", fromlist=["x"]).load_model(str(p)),
    "xray2ct-pipeline --pe_checkpoint": lambda p, t: __import__("xray2ct.models", fromlist=["x"]).load_pe_model(str(p)),
    "web app models": lambda p, t: __import__("webapp.loaders", fromlist=["x"]).load_models([str(p)]),
    "web app classifier": lambda p, t: __import__("webapp.loaders", fromlist=["x"]).load_classifier(str(p)),
    "perx2ct server --checkpoint": _server,
    "perx2ct batch synthesis": _synthesize,
    "progressive_cascade": lambda p, t: __import__(
        "bundles.progressive_cascade.scripts.inference", fromlist=["x"]
    ).CascadePredictor.from_checkpoint(str(p)),
    "latent_ddpm": lambda p, t: __import__(
        "bundles.latent_ddpm.scripts.inference", fromlist=["x"]
    ).LatentCTGenerator.from_checkpoint(str(p)),
}


# ----------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_a_record_that_names_code(loader, real_checkpoint, marker, tmp_path):
    for name, network_def in payloads(marker).items():
        path = poison(real_checkpoint, tmp_path / "poisoned.pt", network_def=network_def)
        with pytest.raises(InputError) as refused:
            LOADERS[loader](path, tmp_path)
        message = str(refused.value)
        assert str(path) in message and "\n" not in message, (name, message)
        assert "subprocess.getoutput" in message or EVIL_MODULE in message or "$__import__" in message, (name, message)
        assert not marker.exists() and EVIL_MODULE not in sys.modules, f"{loader} ran the payload {name!r}"


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_a_poisoned_zoo_record(loader, real_checkpoint, marker, tmp_path):
    """The zoo form: bare weights + a sidecar whose weights_sha256 is right and whose network_def is a payload."""
    weights, sidecar = export_bare(real_checkpoint, tmp_path / "model.pt")
    record = json.loads(Path(sidecar).read_text())
    record["network_def"] = payloads(marker)["hidden in build_network"]
    Path(sidecar).write_text(json.dumps(record))
    with pytest.raises(InputError, match="refusing network 'subprocess.getoutput'") as refused:
        LOADERS[loader](weights, tmp_path)
    assert "record.json" in str(refused.value) and not marker.exists()


def test_record_inputs_that_a_loader_sets_into_its_config_are_data(real_checkpoint, marker, tmp_path):
    """pe_classifier sets the record's modality into its parser, perx2ct its geometry: a ``$`` expression or a
    ``_target_`` component there once ran as code."""
    for inputs in ({"modality": f"$__import__('os').system('touch {marker}')"},
                   {"geometry": {"_target_": "subprocess.getoutput", "cmd": f"touch {marker}"}}):  # fmt: skip
        path = poison(real_checkpoint, tmp_path / "inputs.pt", inputs=inputs)
        for loader in ("xray2ct-pipeline --pe_checkpoint", "xray2ct-pipeline --checkpoint", "read_checkpoint"):
            with pytest.raises(InputError, match="config syntax, not data"):
                LOADERS[loader](path, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "state,problem",
    [
        ({"json": "[" * 5000 + "]" * 5000}, "nested too deeply"),
        ({"json": "[1]"}, "record is a list, not a dict"),
        ({"json": 7}, "record is unreadable"),
        ({"json": '{"network_def": "subprocess.getoutput"}'}, "network definition is a str"),
        ({"json": '{"network_def": {"_target_": ["subprocess.getoutput"]}}'}, "refusing network"),
        ({"json": '{"inputs": {"a": [{"_requires_": "@x"}]}}'}, r"inputs.a\[0\]._requires_ = '@x' is config syntax"),
        ({"json": '{"inputs": {"vqgan": {"record": {"network_def": {"_target_": "os.system"}}}}}'}, "refusing network 'os.system'"),
    ],
    ids=["deep", "list", "not text", "string definition", "list target", "nested requires", "nested record"],
)
def test_malformed_records_are_input_errors(state, problem, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "record": state}, path)
    with pytest.raises(InputError, match=f"bad.pt: .*{problem}"):
        read_checkpoint(path)


def test_a_nested_record_of_an_allowed_network_is_data(tmp_path):
    """latent_ddpm records its VQ-GAN's record (``inputs.vqgan.record.network_def``): allowed, and checked."""
    nested = {"network_def": {"_target_": "monai.networks.nets.vqvae.VQVAE", "channels": [8, 16]}}
    path = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "record": {"json": json.dumps({"inputs": {"vqgan": {"record": nested}}})}}, path)
    assert record_of(read_checkpoint(path))["inputs"]["vqgan"]["record"] == nested


@pytest.mark.parametrize(
    "argument",
    [torch.zeros(2), print, object(), (1, 2), {1: "non-string key"}, [1, {"nested": b"bytes"}]],
    ids=["tensor", "callable", "object", "tuple", "int key", "nested bytes"],
)
def test_allowed_class_with_a_non_plain_argument_is_refused(argument):
    target = "bundles.perx2ct.scripts.networks.PerX2CTNet"
    with pytest.raises(InputError, match=f"x.pt: refusing network '{target}': .*not a plain JSON value"):
        instantiate_network({"_target_": target, "geometry": argument}, "x.pt")


def _config_network_targets() -> list[tuple[str, str]]:
    """(config file, target) of every network the bundle configs build (base configs and overlays)."""
    found = []

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            if value.get("_target_") == "common.checkpoint.build_network":
                found.append((where, value["target"]))
            for key, v in value.items():
                if isinstance(key, str) and key.endswith("#target") and key.split("#")[0].endswith("_def"):
                    found.append((where, v))
                walk(v, where)
        elif isinstance(value, list):
            for v in value:
                walk(v, where)

    for file in sorted(glob.glob(str(ROOT / "bundles" / "*" / "configs" / "*.json"))):
        with open(file) as f:
            walk(json.load(f), os.path.relpath(file, ROOT))
    return found


CONFIG_TARGETS = _config_network_targets()


def test_every_bundle_has_its_networks_in_the_configs_scanned():
    bundles = {where.split(os.sep)[1] for where, _ in CONFIG_TARGETS}
    assert bundles == {"latent_ddpm", "pe_classifier", "perx2ct", "pix2pix_phase", "progressive_cascade", "vqgan_3d_patch"}


@pytest.mark.parametrize("where,target", CONFIG_TARGETS, ids=[f"{w}:{t}" for w, t in CONFIG_TARGETS])
def test_every_config_network_is_on_the_allow_list(where, target):
    """A new network class in a config fails here until its line is added to common.checkpoint.NETWORKS."""
    qualified = allowed_network(target, where)
    assert _qualified_name(_locate(target, where)) == qualified in NETWORKS


def test_a_legitimate_checkpoint_still_loads_everywhere(real_checkpoint):
    network, record, _ = build_for_inference(
        real_checkpoint, config_files=PERX2CT_CONFIGS, data_arguments=("spacing", "geometry"),
        settings={"bundle_root": str(PERX2CT)},
    )  # fmt: skip
    assert record["bundle"] == "perx2ct" and not network.training
    assert build_from_checkpoint(real_checkpoint)[1] == record


@pytest.mark.slow
def test_pipeline_cli_refuses_in_one_line(real_checkpoint, marker, tmp_path):
    path = poison(real_checkpoint, tmp_path / "cli.pt", network_def=payloads(marker)["subprocess.getoutput"])
    pa = ROOT.parent / "shared" / "data" / "cxr" / "frontal"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args in (["-m", "xray2ct.pipeline", "--checkpoint", str(path), "--output_dir", str(tmp_path / "o"),
                  "--inputs", str(pa)],
                 ["-m", "xray2ct.pipeline", "--checkpoint", str(real_checkpoint), "--pe_checkpoint", str(path),
                  "--output_dir", str(tmp_path / "o"), "--inputs", str(pa)]):  # fmt: skip
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {path}: refusing network 'subprocess.getoutput'")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- item 4
def _deflated_bomb(path: Path, inflated: int = 1 << 30) -> Path:
    """A checkpoint whose one float32 tensor (``inflated`` bytes of zeros) is a DEFLATED zip entry (~1 MB)."""
    from benchmarks.checkpoint_zip_bomb import write_bomb

    return Path(write_bomb(path, inflated))


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    return _deflated_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt")


def _peak_rss_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh interpreter running ``code`` (after importing torch)."""
    script = (
        "import resource, sys, torch\n"
        "from common.errors import InputError\n"
        f"{code}\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_zip_bomb_is_refused_without_inflating(zip_bomb):
    assert zip_bomb.stat().st_size < 2 << 20  # ~1 MB on disk, 1 GiB inflated
    with pytest.raises(InputError, match=r"bomb.pt: entry 'archive/data/0' is compressed \(1073741824 bytes"):
        read_checkpoint(zip_bomb)
    refusing = (
        "from common.checkpoint import read_checkpoint\n"
        f"try:\n    read_checkpoint({str(zip_bomb)!r})\nexcept InputError as e:\n    print(e, file=sys.stderr)\n"
    )
    baseline = "from common.checkpoint import read_checkpoint"
    grown = _peak_rss_mb(refusing) - _peak_rss_mb(baseline)
    assert grown < 64, f"refusing the bomb raised the peak by {grown:.0f} MB"  # inflating it costs 1024 MB


def _patch_central_size(path: Path, name: str, size: int) -> None:
    """Make the central directory declare ``size`` bytes for the STORED entry ``name`` (the data unchanged)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    encoded = name.encode()
    at = data.rfind(b"PK\x01\x02", 0, data.rfind(encoded))
    assert data[at + 46 : at + 46 + len(encoded)] == encoded and info.file_size < 1 << 32
    data[at + 20 : at + 28] = size.to_bytes(4, "little") * 2  # compressed and uncompressed sizes
    path.write_bytes(bytes(data))


def test_declared_sizes_beyond_the_file_or_the_limit_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    with zipfile.ZipFile(path) as archive:
        tensor = next(n for n in archive.namelist() if "/data/" in n)
    check_torch_file(path)
    monkeypatch.setenv("XRAY2CT_MAX_CHECKPOINT_BYTES", "1000")
    with pytest.raises(InputError, match=r"model.pt: is \d+ bytes, above the 1000-byte limit"):
        read_checkpoint(path)
    monkeypatch.delenv("XRAY2CT_MAX_CHECKPOINT_BYTES")
    _patch_central_size(path, tensor, 1 << 31)
    with pytest.raises(InputError, match=f"model.pt: entry '{tensor}' declares 2147483648 bytes beyond the end"):
        read_checkpoint(path)


def test_legacy_format_is_refused_for_checkpoints_and_size_checked_for_third_party_weights(tmp_path, monkeypatch):
    from common.weights import read_state_dict

    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy.pt: cannot read the checkpoint \(not the zip format"):
        read_checkpoint(path)
    assert set(read_state_dict(path)) == {"w"}
    monkeypatch.setenv("XRAY2CT_MAX_CHECKPOINT_BYTES", "100")
    with pytest.raises(InputError, match="legacy.pt: is .* above the 100-byte limit"):
        read_state_dict(path)


# ----------------------------------------------------------------------------------------------- zoo form
def test_zoo_form_is_a_bare_state_dict_bound_to_its_record(real_checkpoint, tmp_path):
    weights, sidecar = export_bare(real_checkpoint, tmp_path / "models" / "model.pt")
    assert sidecar == sidecar_path(weights) == str(tmp_path / "models" / "model.record.json")
    bare = torch.load(weights, map_location="cpu", weights_only=True)  # what MONAI's ckpt_export loads
    original = torch.load(real_checkpoint, map_location="cpu", weights_only=True)
    assert bare.keys() == original["model"].keys()
    assert record_of(read_checkpoint(weights)) == record_of(original)
    assert sorted(os.listdir(tmp_path / "models")) == ["model.pt", "model.record.json"]  # nothing half-written
    network, record = build_from_checkpoint(weights)
    assert record["bundle"] == "perx2ct"

    changed = torch.load(real_checkpoint, map_location="cpu", weights_only=True)
    changed["model"] = {k: v + 1 for k, v in changed["model"].items()}
    torch.save(changed, tmp_path / "changed.pt")
    other, other_sidecar = export_bare(tmp_path / "changed.pt", tmp_path / "other" / "model.pt")
    record_of(read_checkpoint(other))
    shutil.copyfile(sidecar, other_sidecar)  # the first model's record beside the second model's weights
    with pytest.raises(InputError, match=r"other/model.record.json: record belongs to other weights .*swapped record"):
        read_checkpoint(other)
    record = json.loads(Path(sidecar).read_text())
    del record["weights_sha256"]
    Path(sidecar).write_text(json.dumps(record))
    with pytest.raises(InputError, match="model.record.json: record has no weights_sha256"):
        read_checkpoint(weights)


@pytest.mark.slow  # two interpreters importing torch
def test_convert_official_reports_a_malicious_file_in_one_line(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}}, bad)
    with zipfile.ZipFile(bad) as archive:
        names = archive.namelist()
        contents = {n: archive.read(n) for n in names}
    contents[next(n for n in names if n.endswith("data.pkl"))] = pickle.dumps({"state_dict": Payload()}, protocol=2)
    with zipfile.ZipFile(bad, "w") as archive:
        for n in names:
            archive.writestr(n, contents[n])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for file in (bad, _deflated_bomb(tmp_path / "bomb.ckpt", 64 << 20)):
        done = subprocess.run(
            [sys.executable, "-m", "bundles.perx2ct.scripts.convert_official", str(file), str(tmp_path / "out.pt")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {file}: "), lines
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.pt").exists()
