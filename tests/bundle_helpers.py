"""Shared by the bundle tests: a bundle's configs as one ``ConfigWorkflow``, as ``monai.bundle run`` builds it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def bundle_workflow(bundle: str, configs: Sequence[str], bundle_root: Path | str, workflow_type: str, **override: Any) -> ConfigWorkflow:
    """``bundles/<bundle>/configs/<configs...>`` merged in order, run in ``bundle_root``, with ``override`` ids."""
    from monai.bundle import ConfigWorkflow

    config_dir = BUNDLES / bundle / "configs"
    return ConfigWorkflow(
        config_file=[str(config_dir / c) for c in configs], meta_file=str(config_dir / "metadata.json"),
        logging_file=False, workflow_type=workflow_type, bundle_root=str(bundle_root), **override,
    )
