"""Console entry points (pyproject ``[project.scripts]``) and their ``python -m`` twins."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
#: words each command's --help must show (its own options)
HELP_WORDS = {"swin-bob-segment": "--bundle", "swin-bob-solf": "features", "swin-bob-export": "--weights",
              "swin-bob-transfer": "reinit_head", "swin-bob-overlay": "--gif", "swin-bob-sample-data": "--force"}
#: python-fire reads a bare --help as a keyword argument of a function with **kwargs; "-- --help" is its help flag
HELP_ARGS = {"swin-bob-transfer": ["--", "--help"]}


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAGER": "cat"}
    return subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_every_command_line_tool_has_an_entry_point():
    assert set(SCRIPTS) == set(HELP_WORDS)
    assert all(target.startswith("custom.") and target.endswith(":cli") for target in SCRIPTS.values())


@pytest.mark.parametrize("name", sorted(HELP_WORDS))
def test_entry_point_help(name):
    """What the installed script runs (``from module import cli; cli()``) with ``--help``: usage, exit 0."""
    module, func = SCRIPTS[name].split(":")
    argv = [name, *HELP_ARGS.get(name, ["--help"])]
    res = _run(["-c", f"import sys; sys.argv = {argv!r}; from {module} import {func}; {func}()"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert HELP_WORDS[name] in res.stdout + res.stderr


def test_python_dash_m_still_works():
    res = _run(["-m", "custom.segment", "--help"])
    assert res.returncode == 0 and "--bundle" in res.stdout
    res = _run(["-m", "custom.export_bundle", "no_such_bundle", "/tmp"])
    assert res.returncode == 2 and res.stderr.startswith("error: no_such_bundle: not a bundle folder")
