"""The experiment config: one YAML that names the data, the (trigger, target) pairs, seeds, methods,
and the overrides passed to poisoning, pretraining and evaluation.

Unknown keys are refused with the closest known names, at every level, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: where the shared copy of CIFAR-10 lives beside a checkout; the Hub twin is used elsewhere.
LOCAL_CIFAR10 = "../shared/datasets/cifar10"
HUB_CIFAR10 = "uoft-cs/cifar10"


def default_dataset() -> str:
    """The local CIFAR-10 mirror when it is there (offline machines), else its Hub twin."""
    return LOCAL_CIFAR10 if os.path.isdir(LOCAL_CIFAR10) else HUB_CIFAR10


class ConfigKeyError(ValueError):
    """A config key that does not exist; the message lists the closest known keys."""


@dataclass
class TriggerTarget:
    """One attack: a trigger spec (``htba:10``, an image path) and the target class (name or id)."""

    trigger: str = "htba:10"
    target: str = "airplane"

    @property
    def label(self) -> str:
        return f"{self.trigger.replace(':', '')}->{self.target}"


@dataclass
class AblationConfig:
    """Sweeps of one parameter at a time around the main setting, each a list of values (empty: skip).

    ``rate``, ``trigger_size`` and ``trigger`` change the first pair's poison (``trigger``: other
    trigger kinds in place of the pair's, e.g. ``htba:3`` or a high-contrast image file such as
    ``examples/triggers/checkerboard-12px.png``; the target stays); ``epochs`` evaluates the
    backdoored and clean models at those training epochs (from their epoch checkpoints, no extra
    training)."""

    rate: list[float] = field(default_factory=list)
    trigger_size: list[int] = field(default_factory=list)
    trigger: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)


@dataclass
class AcceptanceConfig:
    """The targets the report checks every evaluation against (a value left unset is not checked).

    An invariance method meets them when its target FP rate is at least ``min_fp_rate_ratio``
    times its clean twin's and its clean accuracy is within ``max_clean_accuracy_gap`` points of
    the twin's; a ``control_methods`` entry (the paper's non-invariance pretext tasks) meets them
    when its ratio stays at or below ``max_control_fp_rate_ratio``. Issue 6's reproduction
    targets: 5.0, 3.0 and 1.5."""

    min_fp_rate_ratio: float | None = None
    max_clean_accuracy_gap: float | None = None
    control_methods: list[str] = field(default_factory=lambda: ["rotnet", "jigsaw"])
    max_control_fp_rate_ratio: float | None = None

    @property
    def active(self) -> bool:
        return any(
            v is not None
            for v in (self.min_fp_rate_ratio, self.max_clean_accuracy_gap, self.max_control_fp_rate_ratio)
        )

    def validate(self) -> None:
        for name in ("min_fp_rate_ratio", "max_clean_accuracy_gap", "max_control_fp_rate_ratio"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"acceptance.{name} must be a number >= 0, got {value!r}")
        from ..methods import METHODS

        unknown = [m for m in self.control_methods if m not in METHODS]
        if unknown:
            raise ValueError(
                f"acceptance.control_methods: unknown method(s) {unknown}; known: {sorted(METHODS)}"
            )


@dataclass
class ExperimentConfig:
    """Everything an experiment does. ``poison`` / ``pretrain`` / ``evaluation`` hold overrides of
    :class:`hf_sslbd.poisoning.PoisonConfig`, the pretraining arguments and the evaluation settings
    (checked against those dataclasses' fields before anything runs)."""

    name: str = "experiment"
    description: str = ""
    dataset: str = field(default_factory=default_dataset)
    dataset_config: str | None = None
    output_dir: str = "results/experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["simclr"])
    pairs: list[TriggerTarget] = field(default_factory=lambda: [TriggerTarget()])
    poison: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    #: targets the report marks each evaluation "met" or "missed" against (none: no column)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    #: pretraining runs side by side (processes), each with cores // parallel threads
    parallel: int = 1
    #: a note printed with the results, e.g. why a demo recipe is stronger than the paper's
    recipe_note: str = ""

    def validate(self) -> None:
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if not self.methods:
            raise ValueError("methods is empty: give at least one method")
        if not self.pairs:
            raise ValueError("pairs is empty: give at least one (trigger, target) pair")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        from ..methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known methods: {sorted(METHODS)}")
        self.acceptance.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *keys: str) -> str:
        """A short hash of the named fields (all when none are named)."""
        data = self.to_dict()
        if keys:
            data = {k: data[k] for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _close(key: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigKeyError(
                f"unknown config key {where + key!r}{_close(key, list(fields))} (known: {sorted(fields)})"
            )
        if key == "pairs":
            value = [_build(TriggerTarget, item, f"{where}pairs[{i}].") for i, item in enumerate(value)]
        elif key == "ablations":
            value = _build(AblationConfig, value, f"{where}ablations.")
        elif key == "acceptance":
            value = _build(AcceptanceConfig, value, f"{where}acceptance.")
        kwargs[key] = value
    return cls(**kwargs)


def check_overrides(overrides: dict[str, Any], target: type, section: str) -> None:
    """Refuse keys of ``overrides`` that are not fields of the dataclass ``target``."""
    known = [f.name for f in dataclasses.fields(target)]
    for key in overrides:
        if key not in known:
            raise ConfigKeyError(f"unknown config key {section + '.' + key!r}{_close(key, known)}")


def load_experiment_config(path: str | os.PathLike, **overrides: Any) -> ExperimentConfig:
    """Read a YAML experiment config; keyword overrides (e.g. ``output_dir``) win over the file."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"cannot parse experiment config {str(path)!r}: {error}") from error
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = _build(ExperimentConfig, data, "")
    config.validate()
    return config
