"""Experiment tracking of the bundles: ``--tracking mlflow`` and TensorBoard events by default.

One tiny BTCV training run and one evaluation run, both with MONAI's ``--tracking mlflow`` into a
local MLflow store (SQLite), read back through MLflow's own client.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "swin_bob_btcv" / "configs"
TINY = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1, "num_workers": 0,
        "epochs": 1, "val_interval": 1, "num_samples": 1, "validate#inferer#overlap": 0.0}
EXPERIMENT = "swin_bob_tracking_test"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, btcv_sample: Path) -> dict:
    from monai.bundle import run

    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = dict(logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(root), dataset_dir=str(btcv_sample),
                  tracking="mlflow", tracking_uri=uri, experiment_name=EXPERIMENT, **TINY)
    run(config_file=[str(CONFIGS / "train.json")], run_name="train", cache_rate=0.0, **common)
    run(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], run_name="evaluate",
        output_dir=str(root / "eval_metrics"), **common)
    return {"root": root, "uri": uri}


def _runs(tracked: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_name: r for r in runs}, client


@pytest.mark.slow
def test_mlflow_train_run_has_params_losses_metrics(tracked: dict) -> None:
    runs, client = _runs(tracked)
    train = runs["train"]
    assert train.info.status == "FINISHED"
    assert train.data.params["max_epochs"] == "1"  # MLFlowHandler logs the engine's settings as params
    losses = client.get_metric_history(train.info.run_id, "train_loss")
    assert losses and all(math.isfinite(m.value) and m.value > 0 for m in losses)
    dice = [k for k in train.data.metrics if "dice" in k.lower()]
    assert dice, sorted(train.data.metrics)
    assert 0.0 <= train.data.metrics[dice[0]] <= 1.0
    artifacts = [a.path for a in client.list_artifacts(train.info.run_id)]
    assert any(a.endswith(".json") for a in artifacts), artifacts  # the executed config (save_execute_config)


@pytest.mark.slow
def test_mlflow_evaluate_run_has_metrics(tracked: dict) -> None:
    runs, _ = _runs(tracked)
    evaluate = runs["evaluate"]
    dice = [k for k in evaluate.data.metrics if "dice" in k.lower()]
    assert dice and all(0.0 <= evaluate.data.metrics[k] <= 1.0 for k in dice), evaluate.data.metrics


@pytest.mark.slow
def test_tensorboard_events_by_default(tracked: dict) -> None:
    """train.json's TensorBoardStatsHandler writes event files whether or not --tracking is given."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((tracked["root"] / "eval").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in tracked["root"].rglob("*"))
    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train_loss" in tags and any("dice" in t.lower() for t in tags), tags
