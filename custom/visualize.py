"""Look at segmentations: PNG overlays, GIF sweeps, an evaluation handler and a CLI.

- :func:`save_overlay_png`: one axial slice, side by side: image / reference / prediction, organs in
  fixed colours with their names (from the taxonomy in :mod:`custom.labels`).
- :func:`save_sweep_gif`: the same panels for every axial slice, as an animated GIF.
- :class:`OverlaySaver`: ignite handler for ``evaluate.json`` that writes both per case.
- ``python -m custom.visualize IMAGE PRED [LABEL] [--out DIR] [--taxonomy btcv] [--gif]``.

Volumes are channel-first ``(1, H, W, D)`` or ``(H, W, D)`` arrays (a one-hot ``(C, H, W, D)``
label is reduced by argmax); with an ``affine`` they are re-oriented to RAS and shown in the
radiological convention (patient's right on the left of the picture, anterior at the top).
"""

from __future__ import annotations

import argparse
import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.atomic import atomic_path
from custom.checks import case_name, source_name
from custom.errors import InputError, cli_main
from custom.labels import TAXONOMIES

__all__ = ["label_colors", "to_display_volume", "pick_slice", "render_slice", "save_overlay_png", "save_sweep_gif", "OverlaySaver", "main"]

_TAB20 = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
)


def label_colors(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours, fixed per id (0 = background, black)."""
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(1, num_classes):
        if i <= len(_TAB20):
            colors[i] = _TAB20[i - 1]
        else:  # golden-ratio hues keep later ids distinct from each other
            r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
            colors[i] = (int(r * 255), int(g * 255), int(b * 255))
    return colors


def _as_array(volume: Any) -> np.ndarray:
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    return np.asarray(volume)


def to_display_volume(volume: Any, affine: Any = None, is_label: bool = False) -> np.ndarray:
    """``(H, W, D)`` array in RAS voxel order.

    Args:
        volume: ``(H, W, D)``, ``(1, H, W, D)`` or, for labels, one-hot ``(C, H, W, D)`` (argmax).
        affine: 4x4 voxel-to-world matrix; ``None`` keeps the voxel order (assumed RAS).
        is_label: reduce a one-hot label with argmax and return integers.
    """
    arr = _as_array(volume)
    if arr.ndim == 4:
        arr = arr.argmax(0) if (is_label and arr.shape[0] > 1) else arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {arr.shape}")
    if affine is not None:
        import nibabel as nib

        ornt = nib.orientations.io_orientation(_as_array(affine).astype(float))
        arr = nib.orientations.apply_orientation(arr, ornt)
    return arr.astype(np.int64) if is_label else arr.astype(np.float32)


def pick_slice(label: np.ndarray | None, pred: np.ndarray | None = None, depth: int | None = None) -> int:
    """The axial slice with the most labelled voxels (reference first, else prediction, else middle)."""
    for vol in (label, pred):
        if vol is not None and vol.any():
            return int((vol > 0).sum(axis=(0, 1)).argmax())
    ref = label if label is not None else pred
    return (ref.shape[2] if ref is not None else depth or 1) // 2


def _grey(image2d: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    lo, hi = window if window is not None else (np.percentile(image2d, 1), np.percentile(image2d, 99))
    scaled = np.clip((image2d - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def _orient2d(slice2d: np.ndarray) -> np.ndarray:
    # RAS (x, y) slice -> picture rows = anterior..posterior, columns = patient right..left
    return slice2d.T[::-1, ::-1]


def render_slice(
    image: np.ndarray, labels: np.ndarray | None, index: int, colors: np.ndarray, alpha: float = 0.45,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """RGB ``uint8`` picture of axial slice ``index``: grey image with ``labels`` blended in colour."""
    grey = _grey(_orient2d(image[:, :, index]), window)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if labels is not None:
        lab = _orient2d(labels[:, :, index])
        lab = np.clip(lab, 0, len(colors) - 1)
        mask = lab > 0
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors[lab[mask]]
    return rgb.astype(np.uint8)


def _panels(image, label, pred, index, colors, window) -> tuple[list[np.ndarray], list[str]]:
    pics = [render_slice(image, None, index, colors, window=window)]
    titles = ["image"]
    if label is not None:
        pics.append(render_slice(image, label, index, colors, window=window))
        titles.append("reference")
    pics.append(render_slice(image, pred, index, colors, window=window))
    titles.append("prediction")
    return pics, titles


def _check_shapes(image: np.ndarray, *labels: np.ndarray | None) -> None:
    for lab in labels:
        if lab is not None and lab.shape != image.shape:
            raise ValueError(f"label shape {lab.shape} differs from image shape {image.shape}")


def _display_volumes(image: Any, pred: Any, label: Any, taxonomy: str, affine: Any) -> tuple:
    """(organ names, colour table, image, prediction, reference or None) ready to draw, same shapes."""
    names = TAXONOMIES[taxonomy].output_channels
    img = to_display_volume(image, affine)
    prd = to_display_volume(pred, affine, is_label=True)
    lab = None if label is None else to_display_volume(label, affine, is_label=True)
    _check_shapes(img, prd, lab)
    return names, label_colors(max(names) + 1), img, prd, lab


def save_overlay_png(
    path: str | os.PathLike, image: Any, pred: Any, label: Any = None, taxonomy: str = "btcv",
    affine: Any = None, slice_index: int | None = None, window: tuple[float, float] | None = None, title: str = "",
) -> Path:
    """Write a PNG: image / reference (if given) / prediction on one axial slice, with a legend of the
    organs visible there. Inputs as in :func:`to_display_volume`; ``window`` is the grey-level range
    (default: 1st..99th percentile of the slice). Returns the path (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names, colors, img, prd, lab = _display_volumes(image, pred, label, taxonomy, affine)
    index = pick_slice(lab, prd) if slice_index is None else int(slice_index)
    pics, titles = _panels(img, lab, prd, index, colors, window)

    shown = sorted({int(v) for v in np.unique(np.concatenate([_orient2d(v[:, :, index]).ravel() for v in (lab, prd) if v is not None]))} - {0})
    fig, axes = plt.subplots(1, len(pics), figsize=(4.2 * len(pics), 4.8), squeeze=False)
    for ax, pic, name in zip(axes[0], pics, titles):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if shown:
        handles = [Patch(color=colors[i] / 255.0, label=f"{i} {names.get(i, i)}") for i in shown]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(f"{title}  axial slice {index}/{img.shape[2] - 1}  (R on the left)".strip())
    fig.tight_layout(rect=(0, 0.1 if shown else 0, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def save_sweep_gif(
    path: str | os.PathLike, image: Any, pred: Any, label: Any = None, taxonomy: str = "btcv",
    affine: Any = None, step: int = 1, duration_ms: int = 80, window: tuple[float, float] | None = None,
) -> Path:
    """Write an animated GIF sweeping the axial slices (every ``step``-th), panels as in
    :func:`save_overlay_png` (no legend). Returns the path (written atomically)."""
    from PIL import Image

    _, colors, img, prd, lab = _display_volumes(image, pred, label, taxonomy, affine)
    if window is None:  # one grey window for the whole sweep, so frames do not flicker
        window = (float(np.percentile(img, 1)), float(np.percentile(img, 99)))
    frames = []
    for index in range(0, img.shape[2], max(1, int(step))):
        pics, _ = _panels(img, lab, prd, index, colors, window)
        frames.append(Image.fromarray(np.concatenate(pics, axis=1)))
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return Path(path)


def _case_name(meta: Mapping[str, Any] | None, fallback: str) -> str:
    """The case name of a MONAI metadata dict's source file (``fallback`` when it names none)."""
    name = source_name(meta or {})
    return case_name(name) if name else fallback


class OverlaySaver:
    """Ignite handler: per case, ``<output_dir>/<case>_overlay.png`` (and ``_sweep.gif``).

    Reads the decollated ``engine.state.output`` items after postprocessing: ``image_key``,
    ``pred_key`` (labels or one-hot) and optionally ``label_key``; all must be on one grid (in
    ``evaluate.json`` the image and the prediction are inverted to the input's space, like the
    reference). Orientation comes from the prediction's affine.

    Args:
        output_dir: folder for the pictures (created).
        taxonomy: key of :data:`custom.labels.TAXONOMIES` for colours and names.
        gif: also write the sweep GIF (slower on big volumes).
        gif_step: use every n-th slice in the GIF.
        window: grey range of the image as it arrives (``None``: percentiles).
    """

    def __init__(
        self, output_dir: str | os.PathLike, taxonomy: str, image_key: str = "image", pred_key: str = "pred",
        label_key: str | None = "label", gif: bool = False, gif_step: int = 1, window: Sequence[float] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.taxonomy, self.gif, self.gif_step = taxonomy, gif, gif_step
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.window = tuple(window) if window is not None else None
        self.count = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        for item in output if isinstance(output, Sequence) else [output]:
            self.save(item)

    def save(self, item: Mapping[str, Any]) -> list[Path]:
        """Write the pictures of one decollated case; returns the written paths."""
        pred = item[self.pred_key]
        label = item.get(self.label_key) if self.label_key else None
        meta = getattr(pred, "meta", None)
        affine = getattr(pred, "affine", None)
        name = _case_name(meta, f"case_{self.count}")
        self.count += 1
        args = dict(image=item[self.image_key], pred=pred, label=label, taxonomy=self.taxonomy, affine=affine, window=self.window)
        written = [save_overlay_png(self.output_dir / f"{name}_overlay.png", title=name, **args)]
        if self.gif:
            written.append(save_sweep_gif(self.output_dir / f"{name}_sweep.gif", step=self.gif_step, **args))
        return written


@cli_main
def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m custom.visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="image file or DICOM folder")
    parser.add_argument("pred", help="predicted label map on the image's grid")
    parser.add_argument("label", nargs="?", help="reference label map (optional)")
    parser.add_argument("--out", default=".", help="output folder (default: current)")
    parser.add_argument("--taxonomy", default="btcv", choices=sorted(TAXONOMIES))
    parser.add_argument("--slice", type=int, default=None, help="axial slice index in RAS order (default: most labelled)")
    parser.add_argument("--gif", action="store_true", help="also write a GIF sweep through the volume")
    args = parser.parse_args(argv)

    from custom.transforms import load_image_checked  # MONAI only for the command line: overlays need NumPy

    image = load_image_checked(args.image)
    pred = load_image_checked(args.pred)
    label = load_image_checked(args.label) if args.label else None
    for path, vol in ((args.pred, pred), (args.label, label)):
        if vol is not None and tuple(vol.shape[1:]) != tuple(image.shape[1:]):
            raise InputError(path, f"its grid {tuple(vol.shape[1:])} differs from the image's {tuple(image.shape[1:])}", "give a label map on the image's grid")
    name = _case_name(image.meta, "case")
    out = Path(args.out)
    common = dict(image=image, pred=pred, label=label, taxonomy=args.taxonomy, affine=image.affine)
    written = [save_overlay_png(out / f"{name}_overlay.png", slice_index=args.slice, title=name, **common)]
    if args.gif:
        written.append(save_sweep_gif(out / f"{name}_sweep.gif", **common))
    for path in written:
        print(f"wrote {path}")
    return written


def cli() -> None:
    """Console entry point: :func:`main` without its return value (a console script exits with it)."""
    main()


if __name__ == "__main__":
    cli()
