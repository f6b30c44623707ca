"""Bad user input as one line, and the command-line exit that goes with it (standard library only).

- :class:`InputError`: a bad user file, ``str()`` is one line ``FILE: problem. Fix: what to do``.
- :func:`exit_on_input_error` / :func:`cli_main`: run a callable; an :class:`InputError` anywhere in the
  exception chain (MONAI wraps transform errors) becomes ``error: <line>`` on stderr and exit code 2;
  :func:`cli_main` also reads ``bool`` arguments with :func:`parse_flag`.
- :func:`parse_overrides`: ``KEY=VALUE`` command-line items with one-line errors.
- :func:`parse_flag`: a yes/no option as a command line gives it (``--flag false`` arrives as ``"false"``).

SOLF workers and argument parsing import this module, so it imports nothing outside the standard
library at module level.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable, Sequence

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """A user-supplied file cannot be used. ``str()`` is one line: file, problem, fix."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = (str(path) if path is not None else None), problem, fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}" + (f". Fix: {fix}" if fix else ""))


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s cause/context chain (MONAI wraps transform errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_input_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; on a bad input print ``error: <one line>`` to stderr and exit with code 2."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - we re-raise anything that is not a bad input
        err = find_input_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


def cli_main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`exit_on_input_error` for command-line entry points; arguments annotated
    ``bool`` go through :func:`parse_flag` (Python Fire passes ``--plots false`` as the string ``"false"``)."""
    signature = inspect.signature(func)
    flags = [name for name, p in signature.parameters.items() if p.annotation in (bool, "bool")]

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in flags:
            if name in bound.arguments:
                bound.arguments[name] = parse_flag(bound.arguments[name], f"--{name}")
        return func(*bound.args, **bound.kwargs)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return exit_on_input_error(call, *args, **kwargs)

    return wrapper


def config_flag(value: Any, name: str) -> bool:
    """:func:`parse_flag` for a bundle config's ``$`` expressions (``--name false`` is off there too); a value that
    is no yes / no ends the run with the one-line error of :func:`exit_on_input_error`."""
    return exit_on_input_error(parse_flag, value, f"--{name}")


def parse_overrides(items: Sequence[str], option: str = "--override", example: str = "sw_batch_size=2") -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` from a command line -> ``{KEY: value}``, each value parsed as YAML
    (``12`` -> int, ``[64,64,64]`` -> list, ``true`` -> bool). A malformed item is an :class:`InputError`."""
    import yaml  # only when a command line has overrides

    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(None, f"{option} {item!r} is not KEY=VALUE", f"e.g. {option} {example}")
        result[key] = yaml.safe_load(value)
    return result


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, 0 / 1, or true / false, yes / no, on / off in any case.

    ``python -m monai.bundle run ... --flag false`` (Python Fire) passes the string ``"false"``, which ``bool()``
    would take as true; this reads it as meant. Anything else is an :class:`InputError`.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise InputError(None, f"{name} must be true or false, got {value!r}", f"write {name} true or {name} false")
