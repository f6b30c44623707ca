"""``SwinbobAlgo``: the Auto3DSeg algorithm template of Swin-BOB (Swin-UNETR).

``BundleGen`` copies this template folder once per fold and calls
:meth:`SwinbobAlgo.fill_template_config`, which writes into ``configs/hyper_parameters.yaml``
what the data statistics of ``DataAnalyzer`` decide:

- ``input_channels`` (image channels), ``output_classes`` (largest label id + 1, so a class that
  happens to be absent from every case keeps its channel),
- ``resample_to_spacing`` (median spacing), ``roi_size`` (median size in mm at that spacing, rounded
  down to a multiple of 32, between 64 and 96 voxels),
- ``modality`` and ``intensity_bounds``: CT -> window on the foreground 0.5 / 99.5 percentiles,
  anything else (MR) -> per-channel z-score on non-zero voxels,
- ``num_epochs`` from the number of cases (about 40,000 patches in all, at most 1000 epochs).

The input config (``AutoRunner(input=...)``) may carry a ``swinbob:`` mapping whose keys override
any hyper-parameter, for example ``{"swinbob": {"pretrained_ckpt": "swin_bob.pt"}}`` to start
from Swin-BOB weights (loaded by ``custom.transfer.load_pretrained``) or
``{"feature_size": 12, "roi_size": [32, 32, 32]}`` for a small run.

Nothing here probes GPUs: unlike MONAI's ``swinunetr`` template, the algorithm is generated and
trained the same way on a CPU-only machine, and the training command uses this Python interpreter
unless ``CMD_PREFIX`` / ``AutoRunner.set_device_info(cmd_prefix=...)`` says otherwise.
"""

from __future__ import annotations

import os
import sys
from copy import deepcopy
from typing import Any

import numpy as np
from monai.apps.auto3dseg import BundleAlgo
from monai.apps.utils import get_logger
from monai.bundle import ConfigParser

logger = get_logger(module_name=__name__)

HYPER_PARAMETERS = "hyper_parameters.yaml"
MAX_ROI = 96
MULTIPLE = 32  # Swin-UNETR needs multiples of 32 (five 2x downsamplings)
MIN_ROI = 64  # at 32 the bottleneck is 1 voxel and InstanceNorm cannot train
TOTAL_PATCHES = 40_000
MAX_EPOCHS = 1000


def roi_from_shape(shape: list[float], max_roi: int = MAX_ROI) -> list[int]:
    """Per axis: the shape rounded down to a multiple of 32, clipped to [64, ``max_roi``]."""
    return [int(min(max_roi, max(MIN_ROI, int(s) // MULTIPLE * MULTIPLE))) for s in shape]


def epochs_for(n_cases: int, patches_per_image: int) -> int:
    return int(min(MAX_EPOCHS, max(1, TOTAL_PATCHES // max(1, n_cases * patches_per_image))))


class SwinbobAlgo(BundleAlgo):
    """Swin-UNETR algorithm generated from data statistics; trains on CPU, one GPU or torchrun."""

    def pre_check_skip_algo(self, skip_bundlegen: bool = False, skip_info: str = "") -> tuple[bool, str]:
        data_src = self._data_src()
        if bool(data_src.get("sigmoid", False)):
            return True, "swinbob trains multi-class softmax label maps; `sigmoid: true` (region labels) is not supported"
        return skip_bundlegen, skip_info

    def _data_src(self) -> dict:
        if self.data_list_file and os.path.isfile(str(self.data_list_file)):
            return ConfigParser.load_config_file(str(self.data_list_file))
        return {}

    def fill_template_config(self, data_stats_file: str, output_path: str, **kwargs: Any) -> dict:
        """Write the data-derived values into the copied template; return what was written."""
        if kwargs.pop("fill_with_datastats", True) and data_stats_file:
            records = {HYPER_PARAMETERS: self._hyper_parameters(data_stats_file, output_path)}
        else:
            records = deepcopy(self.fill_records) or {HYPER_PARAMETERS: {"bundle_root": output_path}}
        kwargs.pop("gpu_customization", None)  # nothing to tune by GPU memory: batch sizes are set explicitly
        kwargs.pop("gpu_customization_specs", None)

        for yaml_file, values in records.items():
            file_path = os.path.join(output_path, "configs", yaml_file)
            parser = ConfigParser(globals=False)
            parser.read_config(file_path)
            for key, value in values.items():
                parser[key] = deepcopy(kwargs.pop(key, value))
                values[key] = deepcopy(parser[key])
            for key, value in kwargs.items():  # e.g. fold=..., only for keys the config already has
                if parser.get(key, None) is not None:
                    parser[key] = deepcopy(value)
                    values[key] = deepcopy(value)
            ConfigParser.export_config_file(parser.get(), file_path, fmt="yaml", default_flow_style=None, sort_keys=False)
        return records

    def _hyper_parameters(self, data_stats_file: str, output_path: str) -> dict:
        stats = ConfigParser(globals=False)
        stats.read_config(str(data_stats_file))
        summary = "stats_summary#"
        data_src = self._data_src()

        spacing = [float(s) for s in stats[summary + "image_stats#spacing#median"]]
        size_mm = np.asarray(stats[summary + "image_stats#sizemm#median"], dtype=float)
        labels = [int(v) for v in stats[summary + "label_stats#labels"]]
        values: dict[str, Any] = {
            "bundle_root": os.path.abspath(output_path),
            "data_file_base_dir": os.path.abspath(data_src.get("dataroot", "")),
            "data_list_file_path": os.path.abspath(data_src.get("datalist", "")),
            "modality": str(data_src.get("modality", "ct")).lower(),
            "input_channels": int(stats[summary + "image_stats#channels#max"]),
            "output_classes": max(labels) + 1,
            "n_cases": int(stats[summary + "n_cases"]),
            "resample_to_spacing": [round(s, 3) for s in spacing],
            "roi_size": roi_from_shape(list(size_mm / np.asarray(spacing))),
        }
        if values["modality"].startswith("ct"):
            fg = summary + "image_foreground_stats#intensity#"
            values["intensity_bounds"] = [float(stats[fg + "percentile_00_5"]), float(stats[fg + "percentile_99_5"])]
        template = ConfigParser.load_config_file(os.path.join(output_path, "configs", HYPER_PARAMETERS))
        values["num_epochs"] = epochs_for(values["n_cases"], int(template["num_patches_per_image"]))
        if self.mlflow_tracking_uri:
            values["mlflow_tracking_uri"] = self.mlflow_tracking_uri
        if self.mlflow_experiment_name:
            values["mlflow_experiment_name"] = self.mlflow_experiment_name

        user = dict(data_src.get("swinbob", {}) or {})
        unknown = sorted(set(user) - set(template) - set(values))
        if unknown:
            raise ValueError(f"input config `swinbob:` has unknown keys {unknown}; allowed: {sorted(template)}")
        if user.get("pretrained_ckpt"):
            user["pretrained_ckpt"] = os.path.abspath(os.path.expanduser(str(user["pretrained_ckpt"])))
            if not os.path.isfile(user["pretrained_ckpt"]):
                raise FileNotFoundError(f"swinbob pretrained_ckpt not found: {user['pretrained_ckpt']}")
        values.update(user)
        logger.info(f"swinbob hyper-parameters from data statistics: {values}")
        return values

    def train(self, train_params: dict | None = None, device_setting: dict | None = None):
        """Train this fold; default command prefix is the running interpreter, not whatever `python` is."""
        if device_setting is not None:
            device_setting = dict(device_setting)
            if not device_setting.get("CMD_PREFIX"):
                device_setting["CMD_PREFIX"] = sys.executable
        elif not self.device_setting.get("CMD_PREFIX"):
            self.device_setting["CMD_PREFIX"] = sys.executable
        return super().train(train_params, device_setting)


if __name__ == "__main__":
    import fire

    fire.Fire({"SwinbobAlgo": SwinbobAlgo})
