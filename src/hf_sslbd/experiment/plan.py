"""What an experiment runs, as a list of stages with stable names, inputs and output folders.

```
<output_dir>/
  experiment.yaml               the full config as run
  data/<variant>/...            poisoned variants (one Hub-layout folder, one config each)
  models/<method>_clean_seed-<s>/            clean twin (one per method and seed, shared by every pair)
  models/<method>_<variant>/                 backdoored model
  eval/<model>__<variant>[__epoch-<e>]/      metrics.json, summary.md, plots
  stages/<stage>.json           what each stage ran with, and whether it finished
  results.json, results.md      the report
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..poisoning import PoisonConfig
from .config import ExperimentConfig


@dataclass
class Variant:
    key: str  # stage name
    config: PoisonConfig
    name: str  # the variant's config name on disk
    pair: int  # index into ExperimentConfig.pairs
    seed: int
    ablation: tuple[str, Any] | None = None


@dataclass
class Run:
    key: str
    method: str
    seed: int
    variant: Variant | None  # None: the clean twin
    folder: Path
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """A backdoored model evaluated beside its clean twin (same method, seed and epoch) on the
    same labeled subsets and the same patched images of ``variant``."""

    key: str
    run: Run
    reference: Run
    variant: Variant  # whose test / test_patched splits are used
    folder: Path
    epoch: int | None = None  # None: the final model


@dataclass
class Plan:
    variants: list[Variant]
    runs: list[Run]
    evaluations: list[Evaluation]


def _poison_config(config: ExperimentConfig, pair_index: int, seed: int, **changes: Any) -> PoisonConfig:
    pair = config.pairs[pair_index]
    values = {**config.poison, "trigger": pair.trigger, "target": pair.target, "seed": seed, **changes}
    poison = PoisonConfig(**values)
    poison.validate()
    return poison


def build_plan(config: ExperimentConfig, features: Any) -> Plan:
    """Every stage of ``config``. ``features`` are the dataset's features (to name variants)."""
    from ..variants import variant_name

    out = Path(config.output_dir)
    variants: list[Variant] = []

    def add_variant(pair_index: int, seed: int, ablation: tuple[str, Any] | None = None) -> Variant:
        changes = {ablation[0]: ablation[1]} if ablation else {}
        poison = _poison_config(config, pair_index, seed, **changes)
        name = variant_name(poison, features)
        for existing in variants:
            if existing.name == name:
                return existing
        variant = Variant(f"poison__{name}", poison, name, pair_index, seed, ablation)
        variants.append(variant)
        return variant

    main_variants = [add_variant(p, s) for p in range(len(config.pairs)) for s in config.seeds]
    ablation_variants = [
        add_variant(0, seed, (key, value))
        for key in ("rate", "trigger_size", "trigger")
        for value in getattr(config.ablations, key)
        for seed in config.seeds
    ]

    runs: list[Run] = []
    evaluations: list[Evaluation] = []

    def add_run(method: str, seed: int, variant: Variant | None) -> Run:
        name = f"{method}_clean_seed-{seed}" if variant is None else f"{method}_{variant.name}"
        for existing in runs:
            if existing.key == f"pretrain__{name}":
                return existing
        run = Run(f"pretrain__{name}", method, seed, variant, out / "models" / name)
        runs.append(run)
        return run

    def add_eval(run: Run, reference: Run, variant: Variant, epoch: int | None = None) -> None:
        suffix = f"__epoch-{epoch}" if epoch is not None else ""
        name = f"{run.folder.name}{suffix}"
        if any(e.key == f"evaluate__{name}" for e in evaluations):
            return
        evaluations.append(
            Evaluation(f"evaluate__{name}", run, reference, variant, out / "eval" / name, epoch)
        )

    for method in config.methods:
        for seed in config.seeds:
            clean = add_run(method, seed, None)
            for variant in [v for v in main_variants if v.seed == seed]:
                backdoored = add_run(method, seed, variant)
                add_eval(backdoored, clean, variant)
                if variant.pair == 0:
                    for epoch in config.ablations.epochs:
                        add_eval(backdoored, clean, variant, epoch)
    # poison-amount, trigger-size and trigger-kind ablations: the first method, the first pair, every seed
    for variant in ablation_variants:
        method = config.methods[0]
        add_eval(add_run(method, variant.seed, variant), add_run(method, variant.seed, None), variant)
    return Plan(variants, runs, evaluations)


def poison_inputs(config: ExperimentConfig, variant: Variant) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "dataset_config": config.dataset_config,
        "poison": dataclasses.asdict(variant.config),
    }
