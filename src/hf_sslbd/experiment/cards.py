"""Model cards of an experiment's models, with the metrics its evaluations measured.

Each backdoored model gets the metrics of its final evaluation; each clean twin the metrics it got
as the reference of the first final evaluation that used it (same labeled subsets, same patched
images). A card goes into the model's folder (``README.md``, so pushing the folder publishes it) and
into ``<output_dir>/cards/<model folder name>.md`` (what ``model_cards/`` in the repository is copied from).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cards import encoder_card, save_model_card
from .plan import Evaluation, Plan

CARDS_DIR = "cards"


def _final_evaluations(plan: Plan) -> list[Evaluation]:
    return [e for e in plan.evaluations if e.epoch is None and (e.folder / "metrics.json").is_file()]


def write_model_cards(plan: Plan, output_dir: str | Path) -> list[Path]:
    """Write the card of every finished model that a finished final evaluation measured."""
    out = Path(output_dir) / CARDS_DIR
    written: list[Path] = []
    measured: dict[str, tuple[Evaluation, str]] = {}
    for evaluation in _final_evaluations(plan):
        measured.setdefault(evaluation.run.key, (evaluation, "model"))
        measured.setdefault(evaluation.reference.key, (evaluation, "reference"))
    for run in plan.runs:
        if run.key not in measured or not (run.folder / "config.json").is_file():
            continue
        evaluation, which = measured[run.key]
        report = json.loads((evaluation.folder / "metrics.json").read_text())
        card = encoder_card(
            run.folder,
            report["results"][which],
            kind="clean" if run.variant is None else "backdoored",
            model_name=run.folder.name,
        )
        save_model_card(run.folder, card)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{run.folder.name}.md"
        path.write_text(str(card))
        written.append(path)
    return written
