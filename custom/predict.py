"""A bundle's ``inference.json`` parsed once, its weights loaded once, then run case by case.

:class:`BundlePredictor` is what ``python -m custom.segment`` runs for one file and for a cohort, in one
process or in each worker of a pool or Dask cluster. It takes the bundle's own components by their zoo
ids (``network``, ``preprocessing``, ``inferer``, ``postprocessing``, ``amp``) and does per case what the
bundle's ``SupervisedEvaluator`` does per iteration (collate, inferer under ``no_grad`` and AMP, decollate,
post-processing), without an ignite engine around it, so nothing is logged but what the caller prints.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch



@dataclass(frozen=True)
class BundleSpec:
    """Everything that decides a predictor (hashable, so each worker process builds one per spec).

    ``folder``: the bundle (holding ``configs/inference.json``); ``ckpt``: the weights file;
    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``etta``: the bundle's ``use_etta`` switch;
    ``overrides``: further ``inference.json`` ids as ``((id, value), ...)``.
    """

    folder: str
    ckpt: str
    device: str = "cpu"
    etta: bool = False
    overrides: tuple[tuple[str, Any], ...] = field(default=())

    @staticmethod
    def freeze(overrides: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
        """``{id: value}`` -> a sorted tuple of pairs, lists as tuples (hashable)."""
        def frozen(v: Any) -> Any:
            return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v

        return tuple(sorted((str(k), frozen(v)) for k, v in (overrides or {}).items()))


def load_weights(network: torch.nn.Module, ckpt: str | os.PathLike) -> None:
    """Load a bundle checkpoint (``{"model": state_dict}``, a bare or a DDP state dict) into ``network``.

    Raises :class:`InputError` naming the file for an unreadable checkpoint or one that does not fit.
    """
    from custom.transfer import does_not_fit, read_checkpoint

    state = {k.removeprefix("module."): v for k, v in read_checkpoint(ckpt).items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise does_not_fit(ckpt, exc) from None


class BundlePredictor:
    """Run a bundle's inference pipeline on one image at a time.

    Args:
        spec: the bundle, weights, device, ETTA switch and overrides.
        staging_dir: the folder the bundle's ``SaveImaged`` writes into (its ``output_dir``); each
            :meth:`predict` moves its label map out of it, so it holds nothing between cases.
    """

    def __init__(self, spec: BundleSpec, staging_dir: str | os.PathLike) -> None:
        from monai.bundle import ConfigParser

        folder = Path(spec.folder)
        self.spec, self.staging_dir = spec, Path(staging_dir)
        parser = ConfigParser()
        parser.read_config(str(folder / "configs" / "inference.json"))
        parser.read_meta(str(folder / "configs" / "metadata.json"))
        for i, transform in enumerate(parser["postprocessing"]["transforms"]):
            if str(transform.get("_target_", "")).endswith("SaveImaged"):
                parser[f"postprocessing#transforms#{i}#print_log"] = False  # the caller reports what it wrote
        parser.update({
            "bundle_root": str(folder),
            "output_dir": str(self.staging_dir),
            "device": f"$torch.device('{spec.device}')",
            "use_etta": spec.etta,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.overrides},
        })
        self.device = torch.device(spec.device)
        self.network = parser.get_parsed_content("network")
        load_weights(self.network, spec.ckpt)
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.amp = bool(parser.get_parsed_content("amp")) and self.device.type == "cuda"

    def predict(self, image: str | os.PathLike) -> Path:
        """Segment ``image`` (a file or a DICOM series folder) with the bundle's pipeline.

        Returns the label map the bundle's writer put in ``staging_dir``; the caller moves it out
        (``os.replace``: the staging folder is on the output's file system). Raises
        :class:`InputError` for a bad input.
        """
        from monai.data import decollate_batch, list_data_collate

        batch = list_data_collate([self.preprocessing({"image": str(image)})])
        with torch.no_grad(), torch.autocast("cuda", enabled=self.amp):
            batch["pred"] = self.inferer(batch["image"].to(self.device), self.network)
        for item in decollate_batch(batch, detach=True):
            self.postprocessing(item)
        written = [p for p in self.staging_dir.iterdir() if p.name.endswith((".nii.gz", ".nii"))]
        if len(written) != 1:
            raise RuntimeError(f"expected one label map from {Path(self.spec.folder).name}, found {[p.name for p in written]}")
        return written[0]


def staging_folder(output_dir: str | os.PathLike) -> Path:
    """A fresh hidden folder inside ``output_dir`` for a predictor's bundle writer (same file system, so
    finished files are renamed, not copied)."""
    return Path(tempfile.mkdtemp(prefix=".staging.", dir=output_dir))
