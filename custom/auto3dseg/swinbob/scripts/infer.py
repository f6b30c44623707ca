"""Inference with a trained swinbob algorithm (``InferClass`` is what Auto3DSeg's ensemble calls).

    python scripts/infer.py run --config_file "['configs/hyper_parameters.yaml', ...]"

``InferClass(config_files, **override).infer({"image": path})`` returns the class probabilities,
shape ``(output_classes, H, W, D)``, on the input image's own grid (``Invertd`` undoes orientation
and spacing), as a MetaTensor that carries the input's affine; with ``save_mask=True`` it also
writes the argmax label map (uint8) to ``infer#output_path``. CPU or GPU, AMP on GPU only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import torch
from monai.auto3dseg.utils import datafold_read
from monai.data import decollate_batch, list_data_collate
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, SaveImaged

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import parse_config  # noqa: E402  (sibling script; the template is not an installed package)

logger = logging.getLogger("swinbob")


def load_checkpoint(network: torch.nn.Module, path: str, device: torch.device) -> None:
    """Load ``best_metric_model.pt``: a state dict, or ``{"model": state dict}``."""
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)


class InferClass:
    def __init__(self, config_file: str | Sequence[str] | None = None, section: str = "infer", **override: Any):
        parser = parse_config(config_file, **override)
        self.parser = parser
        cfg = parser.get_parsed_content(section)
        self.output_path = cfg["output_path"]
        self.data_list_key = cfg.get("data_list_key", "testing")
        self.device = parser.get_parsed_content("device")
        self.amp = bool(parser.get_parsed_content("amp")) and self.device.type == "cuda"
        self.image_key = parser.get_parsed_content("image_key")
        self.transforms = parser.get_parsed_content("transforms_infer")
        self.network = parser.get_parsed_content("network").to(self.device).eval()
        load_checkpoint(self.network, cfg["ckpt_name"], self.device)
        self.inferer = SlidingWindowInferer(
            roi_size=parser.get_parsed_content("roi_size"),
            sw_batch_size=int(parser.get_parsed_content("num_sw_batch_size")),
            overlap=float(parser.get_parsed_content("overlap_ratio_final")),
            mode="gaussian",
            device="cpu",  # stitch on the CPU: whole-volume probabilities can exceed GPU memory
        )
        self.to_probabilities = Compose(
            [
                Invertd(keys="pred", transform=self.transforms, orig_keys=self.image_key, nearest_interp=False, to_tensor=True),
                Activationsd(keys="pred", softmax=True),
            ]
        )
        self.to_mask = Compose(
            [
                AsDiscreted(keys="pred", argmax=True),
                SaveImaged(
                    keys="pred",
                    output_dir=self.output_path,
                    output_postfix="seg",
                    output_dtype="uint8",
                    resample=False,
                    separate_folder=False,
                    print_log=False,
                    savepath_in_metadict=True,
                    writer="custom.transforms.AtomicNibabelWriter" if _has_custom() else None,
                ),
            ]
        )

    @torch.no_grad()
    def infer(self, image_file: str | dict, save_mask: bool = False) -> torch.Tensor:
        """Probabilities (C, H, W, D) of one image on its own grid; optionally save the label map."""
        item = image_file if isinstance(image_file, dict) else {self.image_key: image_file}
        batch = list_data_collate([self.transforms(dict(item))])
        with torch.autocast(self.device.type, enabled=self.amp):
            batch["pred"] = self.inferer(batch[self.image_key].to(self.device), self.network)
        data = self.to_probabilities(decollate_batch(batch)[0])
        if save_mask:
            data = self.to_mask(data)
        return data["pred"]

    def infer_all(self, files: list[dict] | None = None) -> list[str]:
        if files is None:
            files, _ = datafold_read(
                self.parser.get_parsed_content("data_list_file_path"),
                self.parser.get_parsed_content("data_file_base_dir"),
                fold=-1,
                key=self.data_list_key,
            )
        written = []
        for i, item in enumerate(files):
            pred = self.infer(item, save_mask=True)
            written.append(pred.meta.get("saved_to", ""))
            logger.info(f"[{i + 1}/{len(files)}] {written[-1]}")
        return written


def _has_custom() -> bool:
    try:
        import custom.transforms  # noqa: F401
    except ImportError:
        return False
    return True


def run(config_file: str | Sequence[str] | None = None, **override: Any) -> list[str]:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    return InferClass(config_file, **override).infer_all()


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
