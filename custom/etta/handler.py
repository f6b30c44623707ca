"""Ignite handler for ETTA's per-volume statistics (entropies before/after, weights, intensity curve, time)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from custom.etta.inferer import EntropyTTAInferer

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ETTAStatsHandler"]


class ETTAStatsHandler:
    """Ignite handler: per-volume ETTA entropies, weights and time into ``engine.state`` and the log.

    At every iteration it takes the records of the ETTA inferer (``inferer``, or ``engine.inferer``
    when not given; a no-op when the engine uses another inferer), appends them to
    ``engine.state.etta`` (a list of dicts) and writes the running means over the epoch into
    ``engine.state.metrics``: ``etta_entropy_before`` (H_0), ``etta_entropy_after`` (H_K),
    ``etta_entropy_final`` (of the combined map), ``etta_weight_0..K``, ``etta_time_s``. MONAI's
    StatsHandler, TensorBoardStatsHandler and MLFlowHandler then record them like any metric.
    Logs one line per volume to ``logger_name``.
    """

    def __init__(self, inferer: EntropyTTAInferer | None = None, logger_name: str = "ETTA") -> None:
        self.inferer = inferer
        self.logger = logging.getLogger(logger_name)

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def epoch_started(self, engine: Engine) -> None:
        engine.state.etta = []
        inferer = self.inferer or getattr(engine, "inferer", None)
        if isinstance(inferer, EntropyTTAInferer):
            inferer.pop_records()  # drop anything recorded outside this engine's run

    def __call__(self, engine: Engine) -> None:
        inferer = self.inferer or getattr(engine, "inferer", None)
        if not isinstance(inferer, EntropyTTAInferer):
            return
        history = getattr(engine.state, "etta", None)
        if history is None:
            history = engine.state.etta = []
        for rec in inferer.pop_records():
            history.append(rec)
            h, curve = rec["entropy"], rec.get("intensity_curve")
            curve_text = f", intensity curve gamma {curve['gamma']} scale {curve['scale']} shift {curve['shift']}" if curve else ""
            self.logger.info(
                f"ETTA volume {len(history)}{' (' + rec['name'] + ')' if rec['name'] else ''}: "
                f"entropy {h[0]:.4f} -> {h[-1]:.4f} after {rec['steps']} steps, combined {rec['entropy_final']:.4f}, "
                f"weights [{' '.join(f'{w:.3f}' for w in rec['weights'])}]{curve_text}, {rec['time_s']:.1f} s"
            )
        if not history:
            return
        metrics = engine.state.metrics
        metrics["etta_entropy_before"] = float(np.mean([r["entropy"][0] for r in history]))
        metrics["etta_entropy_after"] = float(np.mean([r["entropy"][-1] for r in history]))
        metrics["etta_entropy_final"] = float(np.mean([r["entropy_final"] for r in history]))
        metrics["etta_time_s"] = float(np.mean([r["time_s"] for r in history]))
        for k in range(len(history[-1]["weights"])):
            metrics[f"etta_weight_{k}"] = float(np.mean([r["weights"][k] for r in history if len(r["weights"]) > k]))

