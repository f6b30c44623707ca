"""Ignite handlers that MONAI has no component for.

:class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` whose checkpoints are written atomically.
"""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) that writes each checkpoint atomically.

    MONAI turns ignite's atomic saving off (``DiskSaver(atomic=False)``) because ignite once left
    atomic files readable by their owner only; ignite 0.5 restores group/other read permission, so a
    killed run can again leave only complete ``model.pt`` / ``*_checkpoint_epoch=N.pt`` files.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True  # ignite's DiskSaver: temporary file, then os.replace
