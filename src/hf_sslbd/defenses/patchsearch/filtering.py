"""Write the filtered training set as a Hub-layout variant: the flagged rows removed, the other
splits (``test``, ``test_patched``) copied as they are, and a card that says what was removed.

```
output_dir/
  README.md                          card: YAML `configs:`, `dataset_info`, `hf_sslbd: {name: record}`
  <name>/train-*.parquet ...         the same shard layout as hf_sslbd.variants.save_variant
  <name>/removed_rows.json           row indices (in the source train split) that were removed
  <name>/trigger.png                 copied from the source variant when it has one
```
``load_dataset(output_dir, name)`` reads it, and ``examples/pretrain.py --dataset output_dir
--dataset_config name`` retrains on it. The record is the source variant's record (poisoning
config, trigger, target, so evaluation builds the same controls) with the counts of the filtered
splits and a ``defense`` entry (method, source, removed rows, detection metrics, config).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np
from datasets.info import DatasetInfo, DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData

from ...variants import CARD_KEY, SPLITS, VariantExistsError, publish_staged, write_split

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

> **Filtered by a backdoor defense, for security research.** Each configuration below is a
> training set from which a defense removed the rows it flagged as poisoned. The removal is
> imperfect: poisoned rows may remain (see the counts), and clean rows were removed too.
{% for name, info in variants.items() if info.defense %}{% set d = info.defense %}
## `{{ name }}`

- **Defense**: {{ d.method }}; source `{{ d.source.dataset }}`{% if d.source.config %} configuration `{{ d.source.config }}`{% endif %}.
- **Removed**: {{ d.removed_rows }} of {{ d.source_train_rows }} training rows (listed in `{{ d.removed_rows_file }}`); {{ info.counts.train.rows }} rows left.
{% if d.detection %}- **Against the ground truth** (`is_poisoned`): recall of the poisons {{ "%.3f"|format(d.detection.recall) if d.detection.recall is not none else "n/a" }}, precision {{ "%.3f"|format(d.detection.precision) if d.detection.precision is not none else "n/a (nothing removed)" }}, clean rows removed {{ "%.4f"|format(d.detection.clean_removed_fraction) if d.detection.clean_removed_fraction is not none else "n/a" }}; {{ info.counts.train.poisoned }} poisoned rows left in `train`.
{% endif %}- **Other splits**: {% for split in d.copied_splits %}`{{ split }}`{% if not loop.last %}, {% endif %}{% else %}none{% endfor %} copied unchanged from the source.
{% if info.config %}- **Poisoning of the source**: trigger `{{ info.trigger_spec }}`, {{ info.config.mode }}{% if info.target %}, target `{{ info.target.name if info.target.name is not none else info.target.id }}`{% endif %}, seed {{ info.config.seed }} (full record in the YAML header).
{% endif %}{% endfor %}
```python
from datasets import load_dataset

ds = load_dataset("<this folder or repo id>", "<configuration name>")
```
"""


def _counts(dataset_dict: datasets.DatasetDict) -> dict:
    counts = {}
    for split, dataset in dataset_dict.items():
        poisoned = None
        if "is_poisoned" in dataset.column_names:
            poisoned = int(
                np.asarray(
                    dataset.select_columns(["is_poisoned"]).with_format("numpy")[:]["is_poisoned"]
                ).sum()
            )
        counts[split] = {"rows": int(len(dataset)), "poisoned": poisoned}
    return counts


def write_filtered_variant(
    dataset_dict: datasets.DatasetDict,
    removed: np.ndarray,
    output_dir: str | os.PathLike,
    name: str,
    defense: dict,
    source_record: dict | None = None,
    source_root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``dataset_dict`` with the rows of ``train`` whose ``removed`` flag is set dropped.

    ``defense``: what to record (method, source {dataset, config}, detection metrics, config);
    ``source_record``: the source variant's card record, if it has one; ``source_root``: the
    source folder (its ``trigger.png`` is copied). Written to a temporary folder first: an error
    leaves ``output_dir`` as it was. Returns the variant's folder."""
    if "train" not in dataset_dict:
        raise ValueError(f"the dataset has no 'train' split to filter; it has {list(dataset_dict)}")
    train = dataset_dict["train"]
    removed = np.asarray(removed, dtype=bool)
    if removed.shape != (len(train),):
        raise ValueError(f"removed has shape {removed.shape}; the train split has {len(train)} rows")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"invalid variant name {name!r}: a non-empty folder name without slashes")
    root = Path(output_dir)
    final = root / name
    if final.exists() and not overwrite:
        raise VariantExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it")
    existing_card = root / "README.md"
    if existing_card.is_file():
        records = DatasetCard.load(existing_card).data.to_dict().get(CARD_KEY) or {}
        others = sorted(k for k, v in records.items() if not (v or {}).get("defense"))
        if others:
            raise ValueError(
                f"{root} holds dataset variants that no defense wrote ({others[:3]}...): write filtered "
                "variants to a folder of their own, so that its card describes them"
            )
        if name in records and not overwrite:
            raise VariantExistsError(f"{root} already lists {name!r}; pass overwrite=True to replace it")

    kept = np.flatnonzero(~removed)
    splits = {"train": train.select(kept)}
    copied = [s for s in SPLITS if s != "train" and s in dataset_dict]
    splits.update({s: dataset_dict[s] for s in copied})
    filtered = datasets.DatasetDict(splits)

    record = dict(source_record or {})
    record["counts"] = _counts(filtered)
    record["defense"] = {
        **defense,
        "source_train_rows": int(len(train)),
        "removed_rows": int(removed.sum()),
        "removed_rows_file": f"{name}/removed_rows.json",
        "copied_splits": copied,
    }
    trigger = (
        Path(source_root) / str(record.get("trigger_file") or "")
        if source_root and record.get("trigger_file")
        else None
    )
    if trigger is not None and trigger.is_file():
        record["trigger_file"] = f"{name}/trigger.png"
    else:
        trigger = None

    data = {}
    if existing_card.is_file():
        data = DatasetCard.load(existing_card).data.to_dict()
    configs = [c for c in data.get("configs", []) if c.get("config_name") != name]
    configs.append(
        {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*"} for s in filtered]}
    )
    data["configs"] = sorted(configs, key=lambda c: c["config_name"])
    records = dict(data.get(CARD_KEY) or {})
    records[name] = json.loads(json.dumps(record))  # plain YAML-able types only
    data[CARD_KEY] = dict(sorted(records.items()))
    tags = list(data.get("tags") or [])
    data["tags"] = tags + [t for t in ("backdoor", "backdoor-defense", "security-research") if t not in tags]
    data.setdefault("pretty_name", "Training sets filtered by a backdoor defense (hf-sslbd)")
    infos = DatasetInfosDict.from_dataset_card_data(DatasetCardData(**data))
    infos = DatasetInfosDict({k: v for k, v in infos.items() if k in records})
    split_infos = datasets.SplitDict()
    for split, dataset in filtered.items():
        split_infos.add(datasets.SplitInfo(name=split, num_examples=len(dataset)))
    infos[name] = DatasetInfo(features=train.features, splits=split_infos)
    data.pop("dataset_info", None)
    card_data = DatasetCardData(**data)
    infos.to_dataset_card_data(card_data)
    card = DatasetCard.from_template(card_data, template_str=CARD_TEMPLATE, variants=data[CARD_KEY])

    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    card_tmp = root / f".README.md.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for split, dataset in filtered.items():
            write_split(dataset, staging, split)
        with open(staging / "removed_rows.json", "w") as handle:
            json.dump(np.flatnonzero(removed).tolist(), handle)
        if trigger is not None:
            shutil.copyfile(trigger, staging / "trigger.png")
        card.save(str(card_tmp))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        card_tmp.unlink(missing_ok=True)
        raise
    return publish_staged(root, name, staging, card_tmp)
