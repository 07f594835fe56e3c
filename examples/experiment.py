"""Run a whole backdoor experiment from one YAML config: poison -> pretrain a clean twin and a
backdoored model -> evaluate both -> report (results.md, results.json, plots).

    python examples/experiment.py --config examples/configs/demo.yaml
    python examples/experiment.py --config examples/configs/demo.yaml --output_dir results/demo-2
    python examples/experiment.py --config examples/configs/methods-w32.yaml --methods mocov2 --seeds 1

Every stage is cached under output_dir: rerunning after a kill continues where it stopped (an
unfinished pretraining resumes from its last checkpoint). ``--seeds`` / ``--methods`` run part of
a config now and the rest later into the same output_dir; a final run without them reports all.
See examples/configs/ for the recipes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_sslbd.experiment import StageError, load_experiment_config, run_experiment

STAGES = ("poison", "pretrain", "evaluate", "report")


@dataclass
class ExperimentArguments:
    config: str = field(
        default="examples/configs/demo.yaml", metadata={"help": "experiment YAML (see examples/configs/)"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "override the config's output_dir"})
    dataset: str | None = field(default=None, metadata={"help": "override the dataset (Hub name or folder)"})
    parallel: int | None = field(default=None, metadata={"help": "pretraining runs side by side"})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "run only these seeds (override the config's)"}
    )
    methods: list[str] | None = field(
        default=None, metadata={"help": "run only these methods (override the config's)"}
    )
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"stages to run, of {list(STAGES)}"}
    )


def main() -> int:
    (args,) = HfArgumentParser(
        ExperimentArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        sys.exit(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    config = load_experiment_config(
        args.config,
        output_dir=args.output_dir,
        dataset=args.dataset,
        parallel=args.parallel,
        seeds=args.seeds,
        methods=args.methods,
    )
    try:
        run_experiment(config, tuple(args.stages))
    except StageError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        results = Path(config.output_dir) / "results.md"
        if results.exists():
            print(results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
