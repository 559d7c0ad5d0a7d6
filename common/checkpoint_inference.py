"""Build a trained network for inference from its checkpoint and resolve its settings once (:func:`build_for_inference`).

Part of :mod:`common.checkpoint` (import from there). :func:`build_for_inference` is the boundary: it reads the
file once and returns the network with :class:`InferenceSettings` (HU window, DRR geometry, spacing, input size,
prediction type) resolved from the record (else the config); code below it takes them from there and never
looks them up again nor re-reads the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import torch

from common.checkpoint_records import (
    _load_state,
    check_record,
    network_state,
    read_checkpoint,
    record_of,
)
from common.checkpoint_registry import _same, instantiate_network, network_description, plain
from common.drr import DRRGeometry, detector_geometry, get_geometry
from common.errors import InputError, require_file
from common.intensity import HUWindow, get_window

# What a diffusion checkpoint trained before its record said so predicted: the noise. The one place it is written.
LEGACY_PREDICTION_TYPE = "epsilon"
DEFAULT_HU_WINDOW = "xray2ct"


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """The settings of a trained network, resolved once from its record (else its config) at the loader.

    ``hu_window``: the network's intensity window (unit <-> HU); ``spacing``: output voxel spacing (mm, the
    final volume's); ``image_size``: the X-ray input side (pixels); ``geometry``: the DRR camera of the training
    X-rays at ``image_size`` pixels (None: not recorded, no DRR-consistency score); ``prediction_type``: a
    diffusion model's target (None for other networks); ``inputs``: the record's ``inputs`` (a copy; ``{}``
    without a record); ``checkpoint``: the file the network came from.
    """

    bundle: str | None
    hu_window: HUWindow
    spacing: tuple[float, float, float] | None = None
    image_size: int | None = None
    geometry: DRRGeometry | None = None
    prediction_type: str | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None


def _first(*candidates):
    return next((c for c in candidates if c is not None), None)


def _side(value) -> int | None:
    """The X-ray side (pixels) a setting gives: a number, never a volume's (X, Y, Z) list."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def resolve_settings(
    record: Mapping | None, parser=None, definition: Mapping | None = None, checkpoint: str | None = None
) -> InferenceSettings:
    """:class:`InferenceSettings` from ``record`` (its ``network_def`` then ``inputs``), else the config ``parser``
    (``definition``: the network definition actually built, for record-less checkpoints)."""
    record = record or {}
    inputs = dict(record.get("inputs") or {})
    network = dict(definition or record.get("network_def") or {})

    def configured(key: str):
        if parser is None or key not in parser:
            return None
        try:
            return parser.get_parsed_content(key)
        except Exception:  # an id that needs data (a datalist) to resolve: not a setting of this checkpoint
            return None

    window = _first(inputs.get("hu_window"), configured("hu_window"), DEFAULT_HU_WINDOW)
    size = _first(*(_side(v) for v in (network.get("image_size"), network.get("xray_size"), inputs.get("xray_size"),
                                       inputs.get("image_size"), configured("image_size"), configured("xray_size"))))  # fmt: skip
    spacing = _first(network.get("spacing"), inputs.get("spacing"), (inputs.get("spacing_per_stage") or [None])[-1])
    geometry = _first(network.get("geometry"), inputs.get("geometry"))
    if geometry is None and record.get("network_def") is None:
        geometry = configured("geometry")
    geometry = None if geometry is None else get_geometry(geometry)
    if geometry is not None and size is not None:  # recorded at the input size: as is (older records: resized)
        geometry = detector_geometry(geometry, int(size))
    prediction_type = inputs.get("prediction_type")
    if prediction_type is None and parser is not None and "prediction_type" in parser:
        prediction_type = LEGACY_PREDICTION_TYPE
    return InferenceSettings(
        bundle=record.get("bundle"),
        hu_window=get_window(window),
        spacing=None if spacing is None else tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        image_size=size,
        geometry=geometry,
        prediction_type=None if prediction_type is None else str(prediction_type),
        inputs=inputs,
        checkpoint=checkpoint,
    )


def _same_input(key: str, recorded, configured) -> bool:
    if key == "hu_window":
        return get_window(recorded).as_dict() == get_window(configured).as_dict()
    return _same(plain(recorded), plain(configured))


def read_config(config_files: Sequence[str | os.PathLike], overrides: Mapping | None = None):
    """A MONAI ``ConfigParser`` of ``config_files`` (later files override earlier ones) with ``overrides`` set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([require_file(os.fspath(f)) for f in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def configured_network_def(parser, network_id: str = "network_def") -> dict:
    """The config's network definition with every reference resolved, nothing instantiated."""
    component = parser.get_parsed_content(network_id, instantiate=False)
    config = component.get_config() if hasattr(component, "get_config") else component
    return plain(dict(config))


def build_for_inference(
    path: str | os.PathLike,
    config_files: Sequence[str | os.PathLike] | None = None,
    default_config_files: Sequence[str | os.PathLike] | None = None,
    expected_bundle: str | None = None,
    data_arguments: Sequence[str] = (),
    runtime_arguments: Sequence[str] = (),
    input_ids: Sequence[str] = (),
    overrides: Mapping | None = None,
    device: str | torch.device = "cpu",
    network_id: str = "network_def",
    checkpoint: Mapping | None = None,
    settings: Mapping | None = None,
    build_arguments: Mapping | None = None,
):
    """``(network in eval mode, record, parser, settings)``: a trained network built from its checkpoint, for every
    loader, with its :class:`InferenceSettings` resolved from the record (else the config).

    The one entry point of the inference loaders (web app, Python APIs, inference server, batch synthesis,
    pipeline). With a record, the network is built from it alone; the config (``config_files``, else
    ``default_config_files``; ``parser`` carries its other settings) only matters where the user spoke:
    when ``config_files`` or ``overrides`` are given, their network definition must agree with the record
    (else :class:`InputError` naming every differing argument), and so must the config ids ``input_ids``
    (e.g. ``hu_window``) with the record's ``inputs``. Network arguments the config derives from a dataset
    (``data_arguments``, e.g. ``spacing``, ``geometry``) are taken from the record before comparing;
    ``runtime_arguments`` (e.g. ``chunk_size``) are not compared and the config's value is used.
    A checkpoint without a record is built from the config with a warning (nothing can check it).
    ``checkpoint``: the file's contents when the caller already read them (:func:`read_checkpoint`);
    ``settings``: config ids set on the parser that say nothing about the network (``bundle_root``...);
    ``build_arguments``: network arguments replaced before building and never compared (e.g. a pretrained
    weights file, irrelevant once the checkpoint's weights are loaded).
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint  # the one read of the file
    record = record_of(checkpoint)
    spoken = config_files is not None or bool(overrides)
    files = config_files if config_files is not None else default_config_files
    parser = read_config(files, {**(settings or {}), **(overrides or {})}) if files else None
    if parser is not None and network_id not in parser:
        sources = ", ".join(os.fspath(f) for f in files)
        raise InputError(sources, f"config defines no {network_id!r} (give the bundle's inference.json first)")
    recorded = (record or {}).get("network_def")
    if record is not None and expected_bundle is not None and record.get("bundle") != expected_bundle:
        raise InputError(path, f"is a {record.get('bundle')!r} checkpoint, not {expected_bundle!r}")
    if recorded is None:
        check_record(record, expected_bundle=expected_bundle, source=path)  # warns
        if parser is None:
            raise InputError(path, "checkpoint has no record of its network: give the bundle's config")
        for key, value in (build_arguments or {}).items():
            if f"{network_id}#{key}" in parser:
                parser[f"{network_id}#{key}"] = value
        network = parser.get_parsed_content(network_id, instantiate=True)
        definition = network_description(network) or {}  # what build_network recorded of the config's network
    else:
        definition = dict(recorded)
        if spoken and parser is not None:
            for argument in data_arguments:
                if argument in recorded:
                    parser[f"{network_id}#{argument}"] = recorded[argument]
            configured = configured_network_def(parser, network_id)
            ignore = (*runtime_arguments, *(build_arguments or {}))
            check_record(  # the user of a loader gave a config: say how to do without one
                record, network_def=configured, source=path, ignore=ignore,
                hint="Fix the config, or give none: the record alone builds the network",
            )  # fmt: skip
            differing = []
            for key in input_ids:
                if key not in parser or key not in record.get("inputs", {}):
                    continue
                recorded_value, configured_value = record["inputs"][key], parser.get_parsed_content(key)
                if not _same_input(key, recorded_value, configured_value):
                    differing.append(
                        f"{key}={json.dumps(plain(recorded_value))} (checkpoint) vs "
                        f"{json.dumps(plain(configured_value))} (config)"
                    )
            if differing:
                raise InputError(path, "the config contradicts the checkpoint's record: " + "; ".join(differing))
            definition.update({k: configured[k] for k in runtime_arguments if k in configured})
        definition.update({k: v for k, v in (build_arguments or {}).items() if k in definition})
        network = instantiate_network(definition, path)
    _load_state(network, network_state(checkpoint, path), path)
    resolved = resolve_settings(record, parser, definition, path)
    return network.to(device).eval(), record, parser, resolved
