"""Export a bundle as a self-contained, Model-Zoo-ready folder.

    python -m custom.export_bundle swin_bob_btcv dist/            # -> dist/swin_bob_btcv/
    python -m custom.export_bundle bundles/swin_bob_btcv dist/ --weights --overwrite

In the repository the bundles import the ``custom`` package; the export copies the part of it that
the bundle's configs import (:func:`import_closure`: the modules named by ``_target_``s and ``$``
expressions, then their own ``custom`` imports, transitively) into the bundle root, where ``python -m monai.bundle run`` (run from the bundle folder) and MONAI Label
(which puts the bundle folder on ``sys.path``) find it. Before anything appears at the
destination the copy is checked, and a failed check leaves nothing behind:

1. ``metadata.json``: ``version`` has a ``changelog`` entry; ``monai.bundle.verify_metadata``
   against the schema (offline: ``--schema``, by default ``../shared/schema/`` beside the repo);
2. ``large_files.yml``: a list of ``{path, url, hash_val, hash_type}`` entries; listed files are
   left out (users fetch them) unless ``--weights`` is given, and a listed file that is present
   must match its hash;
3. no remaining file is over 25 MB (the Model Zoo limit: bigger files belong in ``large_files.yml``);
4. ``monai.bundle.verify_net_in_out`` runs in a fresh interpreter *inside the exported folder*, and
   the ``custom`` it imports must be the copied one (proof that the export is self-contained).

The folder is assembled under a temporary name beside the destination and renamed into place.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from custom.atomic import check_writable_dir, sha256_file
from custom.errors import InputError, cli_main, parse_overrides

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(__file__).resolve().parent
DEFAULT_SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"
MAX_FILE_BYTES = 25 * 1024 * 1024
#: never exported: outputs of runs, caches, local tracking stores
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "eval", "runs", "mlruns", ".ipynb_checkpoints")
HASHES = {"md5", "sha1", "sha256", "sha512"}


def _log(msg: str) -> None:
    print(f"[export_bundle] {msg}", flush=True)


def resolve_bundle(name: str | os.PathLike) -> Path:
    """A bundle folder: a path, or the name of a folder under ``bundles/``."""
    for candidate in (Path(name), REPO / "bundles" / str(name)):
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate.resolve()
    known = sorted(p.parents[1].name for p in (REPO / "bundles").glob("*/configs/metadata.json"))
    raise InputError(name, "not a bundle folder (no configs/metadata.json)", f"use one of {known} or a bundle path")


def check_version(meta_file: Path) -> str:
    """The metadata ``version``; :class:`InputError` when ``changelog`` has no entry for it."""
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(meta_file, f"invalid JSON ({exc.msg}, line {exc.lineno})", "fix the file") from None
    version, changelog = meta.get("version"), meta.get("changelog") or {}
    if not version:
        raise InputError(meta_file, "no `version`", 'add "version": "X.Y.Z" and a changelog entry for it')
    if version not in changelog:
        raise InputError(meta_file, f"version {version} is not in `changelog`", f'add a "{version}" entry to "changelog"')
    return str(version)


def read_large_files(bundle: Path) -> list[dict[str, Any]]:
    """Entries of ``large_files.yml`` (``[]`` when the bundle has none), each checked for its keys."""
    path = bundle / "large_files.yml"
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"invalid YAML ({exc})", "fix the file") from None
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(path, "no `large_files:` list", "write `large_files:` followed by `- path: ... url: ...` entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("path") or "url" not in entry:
            raise InputError(path, f"entry {i} needs `path` and `url`", "see the Model Zoo's large_files.yml format")
        if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            raise InputError(path, f"entry {i}: path {entry['path']} must be relative to the bundle", "use e.g. models/model.pt")
        hash_type = str(entry.get("hash_type") or "md5").lower()
        if hash_type not in HASHES:
            raise InputError(path, f"entry {i}: unknown hash_type {hash_type}", f"use one of {sorted(HASHES)}")
        if not entry["url"]:
            _log(f"note: {entry['path']} has no download url yet (large_files.yml)")
    return entries


def _check_hash(bundle: Path, entry: dict[str, Any]) -> None:
    file, expected = bundle / entry["path"], str(entry.get("hash_val") or "")
    if not expected or not file.is_file():
        return
    hash_type = str(entry.get("hash_type") or "md5").lower()
    actual = sha256_file(file) if hash_type == "sha256" else _hash(file, hash_type)
    if actual != expected:
        raise InputError(file, f"{hash_type} {actual} differs from large_files.yml ({expected})", "update hash_val or the file")


def _hash(path: Path, hash_type: str) -> str:
    import hashlib

    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _module_file(module: str, package: Path = PACKAGE) -> Path | None:
    """``custom.a.b`` -> ``<package>/a/b.py`` or ``<package>/a/b/__init__.py`` (``None``: not a module)."""
    base = package.joinpath(*module.split(".")[1:])
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _module_of(dotted: str, package: Path = PACKAGE) -> str | None:
    """The longest prefix of ``custom.a.b.Name`` that is a module of the package."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:n]), package):
            return ".".join(parts[:n])
    return None


def _imports(module: str, file: Path) -> list[str]:
    """Every ``custom...`` name that ``file`` imports, at any depth (function-local imports included)."""
    names = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                pkg = module if file.name == "__init__.py" else module.rpartition(".")[0]
                pkg = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                base = f"{pkg}.{base}" if base else pkg
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]  # a name may be a submodule
    return [n for n in names if n.split(".")[0] == "custom"]


def import_closure(config_dir: Path, package: Path = PACKAGE) -> list[Path]:
    """The package files the bundle needs: every ``custom.x`` named in its config files (``_target_``,
    ``$import``, ``$custom.x.f(...)``, writer names), then what those modules import from ``custom``,
    transitively, with the ``__init__.py`` of each package on the way. Returns paths relative to ``package``."""
    todo = [m for f in sorted(config_dir.glob("*.json")) for d in re.findall(r"\bcustom(?:\.\w+)+", f.read_text())
            if (m := _module_of(d, package))]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        todo += [m for name in _imports(module, _module_file(module, package)) if (m := _module_of(name, package))]
    return sorted(_module_file(m, package).relative_to(package) for m in seen)


def copy_closure(bundle: Path, dest: Path, package: Path = PACKAGE) -> list[Path]:
    """Copy :func:`import_closure` of ``bundle``'s configs into ``dest`` (the exported ``custom/``)."""
    files = import_closure(bundle / "configs", package)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / rel, dest / rel)
    return files


def check_sizes(folder: Path, exempt: Sequence[str] = (), limit: int = MAX_FILE_BYTES) -> None:
    """:class:`InputError` for the first file over ``limit`` bytes that is not ``exempt`` (relative paths)."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        size = file.stat().st_size
        if size > limit and rel not in exempt:
            raise InputError(rel, f"{size / 2**20:.1f} MB is over the Model Zoo limit of {limit / 2**20:.0f} MB",
                             "list it in large_files.yml (path, url, hash) instead of shipping it")


def verify_metadata(meta_file: Path, schema: Path | None) -> None:
    from monai.bundle import verify_metadata as _verify

    if schema is not None and not schema.is_file():
        raise InputError(schema, "schema file not found", "pass --schema PATH to meta_schema_20240725.json")
    try:
        _verify(meta_file=str(meta_file), filepath=str(schema) if schema else None)
    except ValueError as exc:
        raise InputError(meta_file, f"fails the bundle metadata schema: {exc}".replace("\n", " "), "fix metadata.json") from None


_NET_CHECK = """
import json, os, sys
import custom
here = os.path.realpath(os.getcwd())
if not os.path.realpath(custom.__file__).startswith(here + os.sep):
    sys.exit(f"custom imported from {custom.__file__}, not from the exported bundle")
from monai.bundle import verify_net_in_out
verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                  device="cpu", **json.loads(sys.argv[1]))
print("verify_net_in_out: ok")
"""


def verify_net(folder: Path, override: dict[str, Any] | None = None) -> None:
    """``verify_net_in_out`` in a new interpreter whose working directory is the exported bundle."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _NET_CHECK, json.dumps(override or {})], cwd=folder, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(folder.name, f"verify_net_in_out failed: {tail[0]}", "fix network_def or metadata network_data_format")


def export_bundle(
    name: str | os.PathLike,
    out: str | os.PathLike,
    schema: str | os.PathLike | None = DEFAULT_SCHEMA,
    weights: bool = False,
    overwrite: bool = False,
    net_override: dict[str, Any] | None = None,
    check_net: bool = True,
) -> Path:
    """Write ``out/<bundle name>``: the bundle plus ``custom/``, checked; return its path."""
    bundle = resolve_bundle(name)
    out_dir = check_writable_dir(out)
    dest = out_dir / bundle.name
    if dest.exists() and not overwrite:
        raise InputError(dest, "already exists", "pass --overwrite or choose another output folder")
    version = check_version(bundle / "configs" / "metadata.json")
    large = read_large_files(bundle)
    listed = [str(Path(e["path"]).as_posix()) for e in large]
    for entry in large:
        _check_hash(bundle, entry)
    _log(f"{bundle.name} {version}: {len(listed)} large file(s) listed")

    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", suffix=".tmp", dir=out_dir))
    try:
        stage = tmp / bundle.name
        shutil.copytree(bundle, stage, ignore=IGNORE)
        if not weights:
            for rel in listed:
                (stage / rel).unlink(missing_ok=True)
        modules = copy_closure(bundle, stage / "custom")
        _log(f"copied the bundle and the {len(modules)} modules of custom/ its configs import "
             f"({sum(1 for p in stage.rglob('*') if p.is_file())} files)")
        check_sizes(stage, exempt=listed if weights else ())
        verify_metadata(stage / "configs" / "metadata.json", Path(schema) if schema else None)
        _log("verify_metadata: ok")
        if check_net:
            verify_net(stage, net_override)
            _log("verify_net_in_out in the exported folder: ok")
        old = None
        if dest.exists():
            old = tmp / "previous"
            os.replace(dest, old)
        os.replace(stage, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {dest}")
    return dest


@cli_main
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m custom.export_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="bundle name under bundles/ (e.g. swin_bob_btcv) or a bundle folder")
    parser.add_argument("out", help="output folder; the bundle is written to OUT/<bundle name>")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA) if DEFAULT_SCHEMA.is_file() else None,
                        help="local metadata schema (default: ../shared/schema/meta_schema_20240725.json; "
                             "without one, verify_metadata downloads the schema URL)")
    parser.add_argument("--weights", action="store_true", help="also copy the files listed in large_files.yml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/<bundle name>")
    parser.add_argument("--net_override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for verify_net_in_out only, e.g. feature_size=12 for a quick check")
    parser.add_argument("--no_net_check", action="store_true", help="skip verify_net_in_out")
    args = parser.parse_args(argv)
    return export_bundle(args.name, args.out, schema=args.schema, weights=args.weights, overwrite=args.overwrite,
                         net_override=parse_overrides(args.net_override, "--net_override", "feature_size=12"), check_net=not args.no_net_check)


def cli() -> None:
    """Console entry point: :func:`main` without its return value (a console script exits with it)."""
    main()


if __name__ == "__main__":
    cli()
