"""One executor interface over local processes or an existing Dask cluster (standard library + optional dask).

The SOLF runner and the cohort segmentation submit their per-volume work through :class:`Executor`, so
the same code runs on a laptop (``workers`` local processes) and on a cluster (``scheduler=
"tcp://host:8786"``, through ``distributed.Client.submit`` / ``distributed.as_completed``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import as_completed as cf_as_completed
from typing import Any, Callable, Iterator, Sequence


class Executor:
    """``submit(fn, *args)`` and ``as_completed(futures)`` over local processes or a Dask cluster.

    Args:
        workers: local worker processes (0: one per CPU core); ignored with ``scheduler``.
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); ``None`` for local processes.
        start_method: how local workers start (``"spawn"`` for workers that use torch: a forked copy of
            a process that already holds torch's thread pools can hang).
        quiet: local workers log nothing below ERROR and show no warnings (the caller reports progress).
    """

    def __init__(self, workers: int = 0, scheduler: str | None = None, start_method: str | None = None, quiet: bool = False):
        self.scheduler = scheduler
        if scheduler:
            try:
                from distributed import Client
            except ImportError as exc:  # pragma: no cover - the [dask] extra is part of `make venv`
                raise RuntimeError("--scheduler needs dask[distributed]: pip install 'swin-bob-bundles[dask]'") from exc
            self.client = Client(scheduler, timeout=30)
            self.pool = None
        else:
            self.client = None
            context = multiprocessing.get_context(start_method) if start_method else None
            self.pool = ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context,
                                            initializer=_quiet_worker if quiet else None)

    def submit(self, fn: Callable, *args: Any) -> Any:
        if self.client is not None:
            return self.client.submit(fn, *args, pure=False)
        return self.pool.submit(fn, *args)

    def as_completed(self, futures: Sequence[Any]) -> Iterator[Any]:
        if self.client is not None:
            from distributed import as_completed

            return iter(as_completed(futures))
        return cf_as_completed(futures)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        else:
            self.pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _quiet_worker() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
