"""Remove a backdoor from a self-supervised encoder, and measure it before / after.

    # CompRess knowledge distillation on 10% of clean CIFAR-10, then teacher / defended / clean
    accelerate launch examples/defend.py --method kd --teacher out/backdoored \
        --dataset ../shared/datasets/cifar10 --clean_fraction 0.1 --output_dir defended/ \
        --evaluate_on poisoned/cifar10 --variant htba-t10_target-airplane_rate-0.5_seed-0 \
        --reference_model out/clean --labeled_dataset ../shared/datasets/cifar10 --label_fraction 0.1

    python examples/defend.py --method kd --help     # every flag of a method
    python examples/defend.py --method kd run.yaml   # the same flags as YAML keys

Methods: kd (hf_sslbd.defenses.distillation: a fresh student distilled from the frozen teacher on
a clean subset, never a poisoned row; resumable with --resume_from_checkpoint latest). Outputs of
kd: the student as a plain transformers backbone in --output_dir (load_encoder / AutoModel load it),
clean_subset.json (its row ids), defense_config.json, train_log.jsonl, a defended card (README.md)
and, with --evaluate_on, evaluation/ (teacher and student reports beside the clean reference,
before_after.md, fp_per_class_<probe>.png).
patchsearch (hf_sslbd.defenses.patchsearch: --model <backdoored encoder> --dataset <poisoned data>
--dataset_config <variant>): flags the rows that contain one of the found trigger windows
(--flag_mode match, default; classifier: the paper's poison classifier; union: either).
Outputs: patchsearch.json (detection metrics vs is_poisoned), per-row scores, top_windows.png
and the filtered variant in <output_dir>/filtered (retrain on it with pretrain.py).
"""

import argparse
import json
import logging
import sys

from transformers import HfArgumentParser

from hf_sslbd.defenses.distillation_config import DistillationArguments
from hf_sslbd.defenses.patchsearch import PatchSearchArguments, PatchSearchConfig, run_defense
from hf_sslbd.defenses.pipeline import DefenseEvaluationArguments, run_kd
from hf_sslbd.evaluation.report import EvaluationConfig
from hf_sslbd.hub import HubArguments

#: --method -> (its argument dataclasses, the function that takes them in that order)
DEFENSES = {
    "kd": ((DistillationArguments, DefenseEvaluationArguments, EvaluationConfig, HubArguments), run_kd),
    "patchsearch": ((PatchSearchArguments, PatchSearchConfig), run_defense),
}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    selector = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    selector.add_argument("--method", choices=sorted(DEFENSES), help="the defense to run")
    known, rest = selector.parse_known_args(argv)
    if known.method is None:
        selector.print_help()
        if not {"-h", "--help"} & set(argv):
            selector.exit(2, f"\nerror: --method is required: one of {sorted(DEFENSES)}\n")
        selector.exit()
    classes, run = DEFENSES[known.method]
    parser = HfArgumentParser(
        classes, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if len(rest) == 1 and rest[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(rest[0])
    else:
        parsed = parser.parse_args_into_dataclasses(args=rest)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    summary = run(*parsed)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
