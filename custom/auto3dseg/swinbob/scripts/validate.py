"""Validate a trained swinbob algorithm on its fold, in each label's own space.

    python scripts/validate.py run --config_file "['configs/hyper_parameters.yaml', ...]"

Predicts every validation case of ``fold`` with ``InferClass`` (probabilities mapped back to the
original grid), compares the argmax with the reference label and writes ``validation.yaml`` into
``ckpt_path``: per-case and per-class Dice (classes absent from both maps are left out) and the mean.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from monai.auto3dseg.utils import datafold_read
from monai.metrics import compute_dice
from monai.transforms import LoadImage
from monai.networks.utils import one_hot

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infer import InferClass  # noqa: E402

logger = logging.getLogger("swinbob")


def run(config_file: str | Sequence[str] | None = None, **override: Any) -> float:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    inferer = InferClass(config_file, section="validate", **override)
    parser = inferer.parser
    _, val_files = datafold_read(
        parser.get_parsed_content("data_list_file_path"),
        parser.get_parsed_content("data_file_base_dir"),
        fold=int(parser.get_parsed_content("fold")),
    )
    num_classes = int(parser.get_parsed_content("output_classes"))
    label_key = parser.get_parsed_content("label_key")
    save = bool(parser.get_parsed_content("validate#save_mask"))
    load = LoadImage(image_only=True, ensure_channel_first=True)
    cases = []
    for item in val_files:
        prob = inferer.infer(item, save_mask=save)
        pred = torch.as_tensor(prob).argmax(0, keepdim=True)[None].long()
        label = torch.as_tensor(load(item[label_key]))[None].long()
        dice = compute_dice(one_hot(pred, num_classes), one_hot(label, num_classes), include_background=False, ignore_empty=True)[0]
        per_class = {int(c) + 1: round(float(d), 4) for c, d in enumerate(dice) if torch.isfinite(d)}
        mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        cases.append({"image": item[inferer.image_key], "mean_dice": round(mean, 4), "dice": per_class})
        logger.info(f"{item[inferer.image_key]}: mean Dice {mean:.4f}")
    overall = float(np.nanmean([c["mean_dice"] for c in cases])) if cases else float("nan")
    out = Path(parser.get_parsed_content("ckpt_path")) / "validation.yaml"
    text = yaml.safe_dump({"mean_dice": round(overall, 4), "cases": cases}, sort_keys=False)
    try:
        from custom.atomic import atomic_write_text  # temporary file, then rename

        atomic_write_text(out, text)
    except ImportError:  # the template copied without the custom package
        out.write_text(text)
    logger.info(f"mean Dice over {len(cases)} validation cases: {overall:.4f} ({out})")
    return overall


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
