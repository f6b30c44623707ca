"""Train one fold of a generated swinbob algorithm with MONAI's ignite engines.

    python scripts/train.py run --config_file "['configs/hyper_parameters.yaml', ...]" [--key=value ...]
    torchrun --nproc_per_node=N scripts/train.py run --config_file ...   # DDP, one process per GPU

Runs on the CPU when no GPU is visible (no CUDA, NCCL or GPU memory calls then) and with AMP on a
GPU. Writes into ``ckpt_path``: ``best_metric_model.pt`` (network state dict, best validation Dice),
``model_final.pt``, ``progress.yaml`` (read by ``BundleAlgo.get_score``), TensorBoard events in
``ckpt_path/tb``, and MLflow runs when ``mlflow_tracking_uri`` is set.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import yaml
from ignite.engine import Events
from monai.auto3dseg.utils import datafold_read
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, partition_dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    LrScheduleHandler,
    MeanDice,
    MLFlowHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import set_determinism

try:  # checkpoints and progress.yaml written to a temporary file, then renamed (no half-written file)
    from custom.handlers import AtomicCheckpointSaver as CheckpointSaver
    from custom.atomic import atomic_write_text
except ImportError:  # the template copied without the custom package
    from monai.handlers import CheckpointSaver

    def atomic_write_text(path: Any, text: str) -> Any:
        return Path(path).write_text(text)

logger = logging.getLogger("swinbob")


def parse_config(config_file: str | Sequence[str], **override: Any) -> ConfigParser:
    """Read the algorithm's config files and apply command-line overrides (``--num_epochs=2``)."""
    parser = ConfigParser()
    parser.read_config(list(config_file) if isinstance(config_file, (list, tuple)) else config_file)
    for key, value in override.items():
        parser[key] = value
    return parser


def load_weights(network: torch.nn.Module, parser: ConfigParser) -> None:
    """Start from ``pretrained_ckpt`` (Swin-BOB, Swin-UNETR, SSL) through ``custom.transfer``."""
    path = parser.get_parsed_content("pretrained_ckpt")
    if path:
        from custom.transfer import load_pretrained  # the project package; only needed for pre-training weights

        load_pretrained(network, path)
        logger.info(f"initialised from {path}")


def postprocessing(num_classes: int) -> Compose:
    """Probabilities -> one-hot argmax; label -> one-hot, for MeanDice."""
    return Compose(
        [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=num_classes),
        ]
    )


def _distributed() -> tuple[bool, int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    rank = dist.get_rank() if world > 1 else 0
    return world > 1, rank, world


def run(config_file: str | Sequence[str], **override: Any) -> float:
    """Train, validate every ``num_epochs_per_validation`` epochs, keep the best checkpoint; return its Dice."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = parse_config(config_file, **override)
    distributed, rank, world = _distributed()
    set_determinism(seed=int(parser.get_parsed_content("random_seed")) + rank)

    device = parser.get_parsed_content("device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = bool(parser.get_parsed_content("amp")) and device.type == "cuda"
    ckpt_path = Path(parser.get_parsed_content("ckpt_path"))
    ckpt_path.mkdir(parents=True, exist_ok=True)
    num_classes = int(parser.get_parsed_content("output_classes"))
    num_epochs = int(parser.get_parsed_content("num_epochs"))
    val_interval = max(1, min(int(parser.get_parsed_content("num_epochs_per_validation")), num_epochs))

    train_files, val_files = datafold_read(
        parser.get_parsed_content("data_list_file_path"),
        parser.get_parsed_content("data_file_base_dir"),
        fold=int(parser.get_parsed_content("fold")),
    )
    if not train_files or not val_files:
        raise ValueError(f"fold {parser['fold']}: {len(train_files)} training and {len(val_files)} validation cases")
    if distributed:
        train_files = partition_dataset(train_files, num_partitions=world, shuffle=True, even_divisible=True)[rank]
        val_files = partition_dataset(val_files, num_partitions=world, shuffle=False, even_divisible=False)[rank]
    num_workers = int(parser.get_parsed_content("num_workers"))
    train_loader = DataLoader(
        Dataset(train_files, transform=parser.get_parsed_content("transforms_train")),
        batch_size=int(parser.get_parsed_content("num_images_per_batch")),
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    val_loader = DataLoader(
        Dataset(val_files, transform=parser.get_parsed_content("transforms_validate")),
        batch_size=1,
        num_workers=num_workers,
    )

    network = parser.get_parsed_content("network")
    load_weights(network, parser)
    network = network.to(device)
    model = network
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    optimizer = parser.get_parsed_content("optimizer")  # over @network's parameters (moved in place by .to)
    steps = num_epochs * len(train_loader)
    warmup = min(steps // 2, int(parser.get_parsed_content("warmup_epochs")) * len(train_loader))
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=max(steps, 1))

    main = rank == 0
    tracking = parser.get_parsed_content("mlflow_tracking_uri")
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=model,
        inferer=SlidingWindowInferer(
            roi_size=parser.get_parsed_content("roi_size"),
            sw_batch_size=int(parser.get_parsed_content("num_sw_batch_size")),
            overlap=float(parser.get_parsed_content("overlap_ratio")),
            mode="gaussian",
        ),
        postprocessing=postprocessing(num_classes),
        key_val_metric={
            "val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        val_handlers=[
            StatsHandler(iteration_log=False),
            TensorBoardStatsHandler(log_dir=str(ckpt_path / "tb"), iteration_log=False, output_transform=lambda x: None),
            CheckpointSaver(
                save_dir=str(ckpt_path),
                save_dict={"model": network},
                save_key_metric=True,
                key_metric_filename="best_metric_model.pt",
            ),
        ]
        if main
        else None,
        amp=amp,
    )
    train_handlers = [
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False, epoch_level=False),
        ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True),
    ]
    if main:
        train_handlers += [
            StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
            TensorBoardStatsHandler(log_dir=str(ckpt_path / "tb"), tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
            CheckpointSaver(save_dir=str(ckpt_path), save_dict={"model": network}, save_final=True, final_filename="model_final.pt"),
        ]
        if tracking:
            train_handlers.append(
                MLFlowHandler(
                    tracking_uri=str(tracking),
                    experiment_name=str(parser.get_parsed_content("mlflow_experiment_name")),
                    run_name=f"swinbob_fold{parser['fold']}",
                    output_transform=from_engine(["loss"], first=True),
                    experiment_param={k: parser[k] for k in ("feature_size", "roi_size", "learning_rate", "num_epochs", "fold")},
                    artifacts=None,
                )
            )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=num_epochs,
        train_data_loader=train_loader,
        network=model,
        optimizer=optimizer,
        loss_function=parser.get_parsed_content("loss"),
        inferer=SimpleInferer(),
        train_handlers=train_handlers,
        amp=amp,
    )
    if num_epochs % val_interval:  # the last epochs were not validated: validate once more at the end
        trainer.add_event_handler(Events.COMPLETED, lambda engine: evaluator.run(engine.state.epoch))
    trainer.run()

    best = float(evaluator.state.best_metric)
    if main:
        progress = [
            {
                "best_avg_dice_score": best if math.isfinite(best) else 0.0,
                "best_epoch": int(evaluator.state.best_metric_epoch),
                "num_epochs": num_epochs,
                "train_cases_per_process": len(train_files),
            }
        ]
        atomic_write_text(ckpt_path / "progress.yaml", yaml.safe_dump(progress, sort_keys=False))
        logger.info(f"best validation mean Dice {best:.4f} at epoch {evaluator.state.best_metric_epoch}")
    if distributed:
        dist.destroy_process_group()
    return best


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
