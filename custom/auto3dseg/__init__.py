"""Auto3DSeg algorithm templates of this project.

``TEMPLATES_PATH`` is the folder to hand to ``AutoRunner(templates_path_or_url=...)``; it holds one
template, ``swinbob`` (``swinbob/scripts/algo.py`` defines ``SwinbobAlgo``)::

    from monai.apps.auto3dseg import AutoRunner
    from custom.auto3dseg import TEMPLATES_PATH

    AutoRunner(work_dir="work", input="input.yaml", algos="swinbob",
               templates_path_or_url=str(TEMPLATES_PATH)).run()
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_PATH = Path(__file__).resolve().parent
ALGO_NAME = "swinbob"

__all__ = ["ALGO_NAME", "TEMPLATES_PATH"]
