"""Pretrain a self-supervised encoder (SimCLR, MoCo v2, BYOL, MSF, SimSiam, RotNet, Jigsaw) on an
image dataset, clean or poisoned, with Accelerate.

    accelerate launch examples/pretrain.py --dataset ../shared/datasets/cifar10 --method simclr \
        --backbone resnet10-cifar --backbone_width 32 --stem_stride 2 --output_dir out --seed 0

    # a poisoned variant (the card's poisoning config is recorded in out/config.json)
    accelerate launch examples/pretrain.py --dataset poisoned/cifar10 \
        --dataset_config htba-t10_target-airplane_rate-0.5_seed-0 --method byol --output_dir out

    # YAML: every flag below as a key (method_config as a mapping); later flags override it
    python examples/pretrain.py run.yaml --num_train_epochs 20

    # continue an interrupted run to the same result
    accelerate launch examples/pretrain.py ... --resume_from_checkpoint latest   # or auto: start or continue

Outputs: out/ (the full SSL model: AutoModel.from_pretrained(out) after `import hf_sslbd`),
out/backbone/ (a stock transformers backbone + preprocessor_config.json), out/checkpoints/step_N,
out/train_log.jsonl and TensorBoard logs in out/runs. learning_rate is the base rate at batch 256:
the rate used is learning_rate x (per-device batch x processes x accumulation) / 256. Method
settings (temperature, queue size, heads, views ...) go in --method_config as JSON; unset ones
keep the method's CIFAR defaults (see hf_sslbd.methods.<method> for each recipe). MoCo v2 and
SimCLR take i-CutMix (PatchSearch's retraining on a filtered variant, hf_sslbd.methods.imix):
--method_config '{"icutmix_alpha": 1.0}' (off by default; "icutmix_prob" < 1 mixes only some batches).
"""

import json
import logging
import sys

from hf_sslbd.training import parse_pretrain_args, train


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_pretrain_args(sys.argv[1:], description=__doc__)
    result = train(args)
    summary = {
        "output_dir": str(result.output_dir),
        "global_step": result.global_step,
        "finished": result.finished,
        "last_loss": result.last_loss,
        "images_per_second": result.images_per_second,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
