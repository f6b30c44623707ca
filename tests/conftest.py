"""Session fixtures: the real sample datasets, built once (``custom.sample_data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


@pytest.fixture(scope="session")
def btcv_sample() -> Path:
    from custom.sample_data import prepare

    return prepare("btcv_sample")


@pytest.fixture(scope="session")
def ukbob_sample() -> Path:
    from custom.sample_data import prepare

    return prepare("ukbob_sample")


@pytest.fixture(scope="session")
def brats_sample() -> Path:
    from custom.sample_data import prepare

    return prepare("brats_sample")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_configure(config: pytest.Config) -> None:
    # tests run side by side on 2 cores: keep each process from oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", "2")
