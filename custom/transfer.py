"""Load Swin-BOB, reference or self-supervised checkpoints into a SwinUNETR of another shape.

Fine-tuning starts from Swin-BOB weights (``docs/training.md``, weight transfer). The source and target networks
differ in their input channels (4 Dixon channels -> 1 CT channel or 4 brain contrasts) and in their
output head (73 classes -> 14 BTCV classes or 3 BraTS regions). :func:`load_pretrained` copies
every weight whose shape matches, adapts the layers whose shape depends on the input channel count,
re-initialises the output head and logs each key it did not copy as is.

Checkpoint formats accepted (all loaded with ``torch.load(..., weights_only=True)``):

- MONAI ``CheckpointSaver``: ``{"model": state_dict, ...}`` (what the bundles write);
- the UKBOB reference scripts: ``{"state_dict": state_dict, "epoch": ..., "best_acc": ...}``;
- a bare ``state_dict``;
- any of these with DDP's ``module.`` prefix;
- Swin-UNETR self-supervised encoder weights: ``model_swinvit.pt`` (``module.patch_embed...``,
  ``module.layers1.0.blocks...``, i.e. ``swinViT`` without its prefix) and the ``encoder.``
  layout of MONAI's ``filter_swinunetr`` (``encoder.layers1.0.0.blocks...``).

Channel adaptation: a weight ``W`` of shape ``(out, C_src, *k)`` becomes
``W' = mean_c(W[:, c]) * C_src / C_tgt`` repeated ``C_tgt`` times along dim 1. On an input whose
``C_tgt`` channels are all equal to ``x`` it gives ``sum_j W'[:, j] x = C_src * mean_c(W[:, c]) x =
sum_c W[:, c] x``: the source's response to ``C_src`` copies of ``x``.

Usage from a bundle's ``train.json``::

    "pretrained_ckpt": "",
    "initialize": [
        "$monai.utils.set_determinism(seed=0)",
        "$custom.transfer.load_pretrained(@network, @pretrained_ckpt) if @pretrained_ckpt else None"
    ]

From the command line (writes ``{"model": state_dict}`` ready for the bundle's network)::

    python -m custom.transfer SRC.pt --bundle swin_bob_brats [--out models/pretrained.pt]
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from monai.handlers import CheckpointLoader

from custom.atomic import atomic_path
from custom.checks import check_readable
from custom.errors import InputError, cli_main

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: the wrapper keys under which checkpoints keep their state dict, in the order they are tried
STATE_DICT_KEYS = ("model", "state_dict", "network", "net", "model_state_dict")
#: output head of MONAI's SwinUNETR (``UnetOutBlock``): re-initialised, class meanings differ
HEAD_PREFIXES = ("out.",)
#: below this fraction of the network's weights (by element count, head excluded) a checkpoint is
#: "unrelated"; Swin-UNETR SSL encoder weights alone cover about 17% of the network
MIN_MATCHED_FRACTION = 0.1


@dataclass
class TransferReport:
    """What :func:`load_pretrained` did with every key.

    ``loaded``: copied unchanged; ``adapted``: input-channel layers, ``{key: (src_shape, dst_shape)}``;
    ``reinitialised``: output-head keys reset to a fresh initialisation; ``skipped``: checkpoint keys
    the network has no use for; ``missing``: network keys the checkpoint lacks (left as they were,
    e.g. the decoder when loading self-supervised encoder weights).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reinitialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    matched_fraction: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)}, adapted {len(self.adapted)}, "
            f"re-initialised {len(self.reinitialised)}, skipped {len(self.skipped)}, "
            f"missing {len(self.missing)} keys ({self.matched_fraction:.0%} of the network's weights from the checkpoint)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "loaded": self.loaded,
            "adapted": {k: [list(a), list(b)] for k, (a, b) in self.adapted.items()},
            "reinitialised": self.reinitialised,
            "skipped": self.skipped,
            "missing": self.missing,
            "matched_fraction": self.matched_fraction,
        }


# ---------------------------------------------------------------- reading checkpoints
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as a flat ``{key: tensor}`` dict (wrapper and prefixes kept).

    Raises :class:`InputError` for a missing, empty, truncated or non-PyTorch file, for a file that
    needs arbitrary unpickling (refused: ``weights_only=True``) and for one with no tensors.
    """
    path = check_readable(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file", "give the .pt/.pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(exc))  # blocked modules (os.system) too
        if found:
            raise InputError(
                path,
                f"refused: the checkpoint holds a pickled Python object ({found.group(1)}); only tensors and plain "
                "containers are loaded (torch.load weights_only=True)",
                "if you trust the file, re-save its weights in a trusted environment with "
                "torch.save({'model': model.state_dict()}, path)",
            ) from None
        raise InputError(path, "is not a readable PyTorch checkpoint (the pickle stream is damaged)",
                         "re-download it if it is truncated; give a .pt file written by torch.save") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            path, f"is not a readable PyTorch checkpoint ({first[:120]})", "re-download it if it is truncated; give a .pt file written by torch.save"
        ) from None
    state = _unwrap(obj)
    if not state:
        raise InputError(path, "holds no weight tensors", "give a checkpoint with a state dict (e.g. models/model.pt of a bundle)")
    return state


class SafeCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` (which loads with ``weights_only=True``) whose failures are
    one-line :class:`InputError`: a missing, truncated or non-PyTorch file, a file holding a pickled
    Python object (refused), or weights that do not fit the network. Same arguments, except that
    ``load_path`` may also be a folder: its newest training checkpoint (:func:`latest_checkpoint`) is
    loaded, which is how the bundles' ``--resume true`` continues an interrupted run.
    Use it in bundle configs as ``"_target_": "custom.transfer.SafeCheckpointLoader"``.
    """

    def __call__(self, engine: Any) -> None:
        if os.path.isdir(self.load_path):
            self.load_path = latest_checkpoint(self.load_path)
            self.logger.info(f"resuming from {self.load_path}")
        try:
            super().__call__(engine)
        except Exception as exc:  # noqa: BLE001 - re-read the file to say in one line what is wrong
            read_checkpoint(os.path.realpath(self.load_path))  # InputError naming the real file (not a symlink)
            raise does_not_fit(self.load_path, exc) from None


def does_not_fit(path: str | os.PathLike, exc: BaseException) -> InputError:
    """The one-line error for weights that ``load_state_dict`` refused (the first key or shape it names)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    detail = next((ln for ln in lines if "size mismatch" in ln or "Missing key" in ln or "Unexpected key" in ln), lines[0])
    return InputError(path, f"does not fit this network ({detail[:200]})",
                      "use a checkpoint written by this bundle's config, or adapt it with python -m custom.transfer")


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "*checkpoint_epoch=*.pt") -> str:
    """The training checkpoint with the highest epoch in ``folder`` (``CheckpointSaver`` names), to resume.

    Raises :class:`InputError` when there is none (a first run must not pass ``--resume true``).
    """
    found = sorted(Path(folder).glob(pattern), key=lambda p: int(re.search(r"=(\d+)", p.name).group(1)))
    if not found:
        raise InputError(folder, f"no training checkpoint ({pattern}) to resume from",
                         "start without --resume true, or point --ckpt_dir at the interrupted run's models folder")
    return str(found[-1])


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        return {}
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return _unwrap(inner) or {}
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _candidates(key: str) -> Iterable[str]:
    """Target names a checkpoint key may have in MONAI's SwinUNETR, most likely first."""
    while key.startswith("module."):  # DDP (possibly nested)
        key = key[len("module."):]
    yield key
    yield "swinViT." + key  # model_swinvit.pt: the SwinTransformer without its prefix
    if key.startswith("swin_vit."):
        yield "swinViT." + key[len("swin_vit."):]
    if key.startswith("encoder."):  # MONAI's filter_swinunetr layout: encoder.layers1.0.0.x
        rest = key[len("encoder."):]
        parts = rest.split(".")
        if len(parts) > 3 and parts[0].startswith("layers") and parts[1] == "0" and parts[2].isdigit():
            yield "swinViT." + ".".join([parts[0], parts[1], *parts[3:]])
        yield "swinViT." + rest


# ---------------------------------------------------------------- transfer
def _unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    while hasattr(network, "module") and isinstance(network.module, torch.nn.Module):  # DDP / DataParallel
        network = network.module
    return network


def _input_channels(network: torch.nn.Module) -> int | None:
    embed = getattr(getattr(network, "swinViT", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    return getattr(proj, "in_channels", None)


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """``(out, C_src, *k)`` -> ``(out, channels, *k)``: mean over source channels, repeated, scaled.

    The result answers ``channels`` identical inputs as the source answers ``C_src`` identical inputs.
    """
    src = weight.shape[1]
    mean = weight.float().mean(dim=1, keepdim=True) * (src / channels)
    return mean.repeat(1, channels, *([1] * (weight.ndim - 2))).to(weight.dtype)


def _is_head(key: str, head_prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in head_prefixes)


def load_pretrained(
    network: torch.nn.Module,
    path: str | os.PathLike,
    reinit_head: bool = True,
    head_prefixes: Iterable[str] = HEAD_PREFIXES,
    min_matched_fraction: float = MIN_MATCHED_FRACTION,
) -> TransferReport:
    """Load the checkpoint at ``path`` into ``network`` (a MONAI SwinUNETR, optionally DDP-wrapped).

    Args:
        network: the target network; modified in place.
        path: a checkpoint in any format of this module's docstring.
        reinit_head: re-initialise the output head (``out.*``) even when its shape matches: the
            source's class ids mean other organs. ``False`` copies a head of matching shape.
        head_prefixes: key prefixes of the output head.
        min_matched_fraction: fewer network weights (by element count) than this taken from the
            checkpoint is an error: the checkpoint belongs to another model.

    Returns:
        a :class:`TransferReport`; every adapted, re-initialised and skipped key is also logged.

    Raises:
        InputError: unreadable or untrusted file, weights of another architecture or width.
    """
    net = _unwrap_network(network)
    head_prefixes = tuple(head_prefixes)
    report = TransferReport(path=str(path))
    source = read_checkpoint(path)
    target = net.state_dict()
    in_channels = _input_channels(net)

    new_state: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for src_key, value in source.items():
        dst_key = next((k for k in _candidates(src_key) if k in target), None)
        if dst_key is None or dst_key in new_state:
            report.skipped.append(src_key)
            continue
        if _is_head(dst_key, head_prefixes) and (reinit_head or value.shape != target[dst_key].shape):
            continue  # handled with the rest of the head below
        want = target[dst_key].shape
        if value.shape == want:
            new_state[dst_key] = value
            report.loaded.append(dst_key)
        elif (
            value.ndim == len(want) >= 3
            and value.shape[0] == want[0]
            and value.shape[2:] == want[2:]
            and want[1] == in_channels
        ):
            new_state[dst_key] = adapt_input_channels(value, want[1])
            report.adapted[dst_key] = (tuple(value.shape), tuple(want))
        else:
            mismatched.append(f"{dst_key} {tuple(value.shape)} vs {tuple(want)}")

    if mismatched:
        raise InputError(
            path,
            f"{len(mismatched)} weight(s) have another shape than the network, e.g. {'; '.join(mismatched[:3])}",
            "build the network with the checkpoint's feature_size and depths (only input channels and the output head may differ)",
        )

    sizes = {k: v.numel() for k, v in target.items() if v.is_floating_point()}
    body = sum(n for k, n in sizes.items() if not _is_head(k, head_prefixes)) or 1
    report.matched_fraction = sum(sizes.get(k, 0) for k in new_state if not _is_head(k, head_prefixes)) / body
    if report.matched_fraction < min_matched_fraction:
        raise InputError(
            path,
            f"matches almost nothing of the network: {report.matched_fraction:.1%} of its weights "
            f"({len(new_state)} of {len(target)} keys; checkpoint keys look like {', '.join(list(source)[:3])})",
            "give a SwinUNETR checkpoint (a bundle's models/model.pt, a UKBOB reference or a Swin-UNETR SSL file)",
        )

    with torch.no_grad():
        for key, value in new_state.items():
            target[key].copy_(value.to(target[key].dtype))
    if reinit_head or any(_is_head(k, head_prefixes) and k not in new_state for k in target):
        report.reinitialised = _reinitialise(net, head_prefixes)
    report.missing = [k for k in target if k not in new_state and not _is_head(k, head_prefixes)]

    for key in report.loaded:
        logger.debug("transfer: loaded %s", key)
    for key, (a, b) in report.adapted.items():
        logger.info("transfer: adapted %s %s -> %s (mean over input channels, scaled %d/%d)", key, a, b, a[1], b[1])
    for key in report.reinitialised:
        logger.info("transfer: re-initialised %s (output head)", key)
    for key in report.skipped:
        logger.info("transfer: skipped %s (not in the network)", key)
    if report.missing:
        logger.info("transfer: %d network keys not in the checkpoint keep their initialisation, e.g. %s",
                    len(report.missing), ", ".join(report.missing[:3]))
    logger.info("transfer: %s", report.summary())
    return report


def _reinitialise(net: torch.nn.Module, head_prefixes: tuple[str, ...]) -> list[str]:
    keys = []
    for name, module in net.named_modules():
        if name and _is_head(name + ".", head_prefixes) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            keys += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return sorted(keys)


# ---------------------------------------------------------------- command line
def _bundle_dir(bundle: str) -> Path:
    given = Path(bundle)
    folder = given if (given / "configs").is_dir() else REPO / "bundles" / bundle
    if not (folder / "configs").is_dir():
        known = sorted(p.parent.name for p in (REPO / "bundles").glob("*/configs"))
        raise InputError(bundle, "is not a bundle folder or name", f"use one of {known} or a folder with configs/")
    return folder


def build_bundle_network(bundle: str, config: str = "inference.json", **network_args: Any) -> torch.nn.Module:
    """Instantiate ``network_def`` of a bundle (``network_args`` override its arguments)."""
    from monai.bundle import ConfigParser

    folder = _bundle_dir(bundle)
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / config))
    parser["bundle_root"] = str(folder)
    for name, value in network_args.items():
        parser[f"network_def#{name}"] = value
    return parser.get_parsed_content("network_def")


@cli_main
def main(src: str, bundle: str = "", out: str = "", config: str = "inference.json", reinit_head: bool = True,
         report: str = "", **network_args: Any) -> None:
    """Transfer ``src`` into a bundle's network and save ``{"model": state_dict}``.

    Args:
        src: the source checkpoint.
        bundle: a bundle name under ``bundles/`` or a bundle folder; its ``network_def`` is the target.
        out: where to write the result (default ``<bundle>/models/pretrained.pt``).
        config: the bundle config that defines ``network_def``.
        reinit_head: see :func:`load_pretrained`.
        report: optional JSON file for the full :class:`TransferReport`.
        network_args: without ``bundle``, the ``monai.networks.nets.SwinUNETR`` arguments
            (``--in_channels 1 --out_channels 14 --feature_size 48``); with it, overrides.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if bundle:
        network = build_bundle_network(bundle, config, **network_args)
        out_path = Path(out) if out else _bundle_dir(bundle) / "models" / "pretrained.pt"
    else:
        if not out or "in_channels" not in network_args or "out_channels" not in network_args:
            raise InputError(None, "without --bundle, give --out, --in_channels and --out_channels", "or name a bundle with --bundle")
        from monai.networks.nets import SwinUNETR

        network = SwinUNETR(**network_args)
        out_path = Path(out)
    result = load_pretrained(network, src, reinit_head=reinit_head)
    with atomic_path(out_path) as tmp:
        torch.save({"model": _unwrap_network(network).state_dict()}, tmp)
    if report:
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2))
    print(f"wrote {out_path} ({result.summary()})", flush=True)


def cli() -> None:
    """Console entry point and ``python -m``: :func:`main`'s arguments from the command line."""
    import fire  # only for the command line

    fire.Fire(main)


if __name__ == "__main__":
    cli()
