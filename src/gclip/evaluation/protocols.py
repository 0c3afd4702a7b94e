"""Per-method, per-dataset protocol settings, read from the TOML files in ``gclip/evaluation/presets/``.

A preset resolves, in order of increasing priority: the protocol's ``[defaults]``, its
``[datasets.<name>]`` table, the method's ``[method.<m>.defaults]`` and ``[method.<m>.datasets.<name>]``
tables, then the caller's overrides (command-line options). Any of these tables may hold a
``method_options`` table: the method's options (e.g. ResCLIP's per-dataset thresholds), resolved the same way,
and the evaluation-only keys (:data:`EVAL_KEYS`: ``centre_crop``, the side of the square the image and its ground
truth are cut to), which are not segmentation settings.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..inference.segmenter import Settings
from ..methods import get_method, method_class
from .layouts import DATASET_CLASSES, DatasetSpec, get_dataset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["EVAL_KEYS", "ProtocolSettings", "list_protocols", "resolve_preset", "protocol_for"]

_SETTING_NAMES = {f.name for f in dataclasses.fields(Settings)}
EVAL_KEYS = {"centre_crop": 0}
"""Preset keys that change how the benchmark is scored, not how images are segmented, with their defaults."""


@dataclass(frozen=True)
class ProtocolSettings:
    """The settings one method uses on one dataset.

    Attributes:
        protocol: the protocol file's name (``clearclip`` or ``sclip``).
        method: the method name.
        dataset: the dataset name.
        settings: keyword arguments for :class:`gclip.Segmenter` (fields of :class:`gclip.Settings`).
        classes_file: the class-name file (the protocol's, or one from the caller's ``classes_dir``).
        overridden: names of the settings the caller changed.
        method_options: the method's options on this dataset (the caller's options win over them).
        scoring: the evaluation-only keys (:data:`EVAL_KEYS`), every one of them, for :func:`gclip.evaluation.score`.
        classes_dir: the caller's class-name folder, if the class file came from one.
        classes_key: the class list's name when the class file is Python source (MESS's ``register_*.py``).
    """

    protocol: str
    method: str
    dataset: str
    settings: dict[str, Any]
    classes_file: Path
    overridden: list[str] = field(default_factory=list)
    method_options: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=lambda: dict(EVAL_KEYS))
    classes_dir: str | None = None
    classes_key: str | None = None

    def describe(self) -> dict[str, Any]:
        """Plain data for printing and JSON."""
        shipped = f"{self.protocol_classes}/{self.classes_file.name}"
        where = str(self.classes_file) if self.classes_dir or self.classes_key else shipped
        return {
            "protocol": self.protocol,
            "classes_file": f"{where}:{self.classes_key}" if self.classes_key else where,
            "overridden": self.overridden,
            **self.settings,
            **{k: v for k, v in self.scoring.items() if v != EVAL_KEYS[k]},
            **({"method_options": self.method_options} if self.method_options else {}),
        }

    @property
    def protocol_classes(self) -> str:
        return self.classes_file.parent.name


def _preset_dir():
    return resources.files("gclip.evaluation") / "presets"


@cache
def _load(name: str) -> dict[str, Any]:
    text = (_preset_dir() / f"{name}.toml").read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # pragma: no cover - shipped files are tested
        raise ConfigError(f"preset file {name}.toml is not valid TOML: {e}") from e
    return data


def list_protocols() -> list[str]:
    """Names of the shipped protocol files."""
    return sorted(p.name[: -len(".toml")] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def protocol_for(method: str) -> str:
    """The protocol a method is evaluated with (its class's :attr:`~gclip.methods.Method.protocol`)."""
    return method_class(method).protocol


def _protocol_on(method: str, spec: DatasetSpec) -> str:
    """The method's own protocol, unless the set names a protocol of its own (``spec.protocol``: ClearCLIP's for
    ADE20K-847 and Context-459, SegEarth-OV's for the remote-sensing sets) and the method's file has no table for it.

    >>> _protocol_on("sclip", get_dataset("ade847")), _protocol_on("sclip", get_dataset("loveda"))
    ('clearclip', 'segearth')
    """
    own = protocol_for(method)
    if spec.protocol is None:
        return own
    data = _load(own)
    tables = [data.get("datasets", {}), data.get("method", {}).get(method, {}).get("datasets", {})]
    return own if any(spec.name in t for t in tables) else spec.protocol


def _check_keys(table: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - _SETTING_NAMES - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f"preset {where}: unknown setting {unknown[0]!r}")
    return table


def resolve_preset(
    method: str,
    dataset: str | DatasetSpec,
    overrides: dict[str, Any] | None = None,
    protocol: str | None = None,
    classes_dir: str | Path | None = None,
) -> ProtocolSettings:
    """The settings and class file for ``method`` on ``dataset``.

    Args:
        method: a method name (``gclip``, ``sclip``, ...).
        dataset: a dataset name or spec.
        overrides: settings (and :data:`EVAL_KEYS`) that win over the preset (e.g. from the command line).
        protocol: force a protocol file (default: the method's own; on a set with a protocol of its own, e.g. the
            remote-sensing sets' ``segearth``, that one unless the method's file has a table for the set).
        classes_dir: take the class-name file from this folder instead of the protocol's, e.g. a method
            repository's ``configs/`` (its own class names): the protocol's file name (``cls_voc21.txt``,
            ``cls_city_scapes.txt``, ...), else ``cls_<dataset name>.txt`` (``cls_cityscapes.txt``), else the set's
            ``classes_aliases`` (CAT-Seg's ``ade847.json``, MESS's ``register_paxray.py``). Without it, the
            protocol's class folder, else the datasets' own names (``gclip/data/classes/datasets/``), else the
            set's file in an installed package (``classes_package``: MESS's names from ``mess-benchmark``).

    Raises:
        ConfigError: an unknown protocol or setting, a bad value, or no class file for the set in ``classes_dir``
            (or, without it, none shipped: ADE20K-847's, Context-459's and MESS's are not, and no MESS package).

    >>> resolve_preset("sclip", "voc21").settings["logit_scale"]
    65.0
    >>> resolve_preset("naclip", "voc20", {"pamr_steps": 0}).settings["pamr_steps"]
    0
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    protocol = protocol or _protocol_on(method, spec)
    if protocol not in list_protocols():
        raise ConfigError(f"unknown protocol {protocol!r}: choose among {', '.join(list_protocols())}")
    data = _load(protocol)
    method_table = data.get("method", {}).get(method, {})
    settings: dict[str, Any] = {}
    method_options: dict[str, Any] = {}
    layers = [
        (data.get("defaults", {}), "defaults"),
        (data.get("datasets", {}).get(spec.name, {}), f"datasets.{spec.name}"),
        (method_table.get("defaults", {}), f"method.{method}.defaults"),
        (method_table.get("datasets", {}).get(spec.name, {}), f"method.{method}.datasets.{spec.name}"),
    ]
    for table, where in layers:
        table = dict(table)
        method_options.update(table.pop("method_options", {}))
        settings.update(_check_keys(table, f"{protocol}.toml [{where}]"))
    if protocol != protocol_for(method):  # another method's protocol: its geometry, not its method's knobs
        accepted = get_method(method).options()
        method_options = {k: v for k, v in method_options.items() if k in accepted}
    overrides = dict(overrides or {})
    _check_keys(overrides, "override")
    changed = sorted(k for k, v in overrides.items() if settings.get(k) != v)
    settings.update(overrides)
    scoring = {k: settings.pop(k, default) for k, default in EVAL_KEYS.items()}
    crop = scoring["centre_crop"]
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ConfigError(f"centre_crop must be a whole number >= 0, got {scoring['centre_crop']!r}")
    if "pamr_dilations" in settings:
        settings["pamr_dilations"] = tuple(int(d) for d in settings["pamr_dilations"])
    Settings(**settings).validate()
    if classes_dir is None:
        shipped = resources.files("gclip") / "data" / "classes"
        found = [
            Path(str(shipped / folder / spec.classes_file))
            for folder in dict.fromkeys((data["classes"], DATASET_CLASSES, "clearclip"))
            if (shipped / folder / spec.classes_file).is_file()
        ]
        found += _package_file(spec)
        if not found:
            raise ConfigError(spec.classes_from or f"{spec.name}: no class file {spec.classes_file} is shipped")
        classes = found[0]
    else:  # cls_city_scapes / cls_cityscapes; CAT-Seg's ade847.json
        names = list(dict.fromkeys([spec.classes_file, f"cls_{spec.name}.txt", *spec.classes_aliases]))
        found = [Path(classes_dir) / n for n in names if (Path(classes_dir) / n).is_file()]
        if not found:
            raise ConfigError(f"classes folder {classes_dir}: no {' or '.join(names)} for {spec.name}")
        classes = found[0]
    own = None if classes_dir is None else str(classes_dir)
    key = (spec.classes_key or None) if classes.suffix == ".py" else None
    return ProtocolSettings(protocol, method, spec.name, settings, classes, changed, method_options, scoring, own, key)


def _package_file(spec: DatasetSpec) -> list[Path]:
    """The set's class file in an installed package (``spec.classes_package``: MESS's ``mess/datasets``), found
    without importing the package (importing ``mess.datasets`` registers every set and needs its dependencies)."""
    if not spec.classes_package or not spec.classes_aliases:
        return []
    import importlib.util

    package, _, folder = spec.classes_package.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    for location in (found.submodule_search_locations or []) if found is not None else []:
        path = Path(location) / folder / spec.classes_aliases[0]
        if path.is_file():
            return [path]
    return []


Preset = ProtocolSettings  # its name before Engine v3 (a backbone preset is gclip.backbones.Preset)
