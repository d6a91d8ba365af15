"""``stemstream`` command line: one entry point made of sub-commands.

Each sub-command lives in its own module exposing ``register(subparsers)``; heavy imports stay inside
the command bodies so ``stemstream --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from pydantic import ValidationError

from stemstream.errors import StemstreamError
from stemstream.log import configure_logging, name_native_threads

# Modules that contribute sub-commands; each has register(subparsers) -> None.
COMMAND_MODULES = [
    "stemstream.commands.demo",
    "stemstream.commands.sim",
    "stemstream.commands.store",
    "stemstream.commands.plane",
    "stemstream.commands.count",
    "stemstream.commands.replay",
    "stemstream.commands.analyse",
    "stemstream.commands.catalog",
    "stemstream.commands.keys",
    "stemstream.commands.session",
    "stemstream.commands.metrics",
]

logger = logging.getLogger(__name__)


def one_line_os_error(exc: OSError) -> str:
    """``<path>: <why>; ...`` for an OSError that reached the command line."""
    where = f"{exc.filename}: " if exc.filename else ""
    why = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}{why}; check the path and its permissions (or the STEMSTREAM_ setting that names it)"


def one_line_validation_error(exc: ValidationError) -> str:
    """``<model> <field>=<value>: <why>`` for a ValidationError that reached the command line."""
    first = exc.errors()[0]
    name = ".".join(str(x) for x in first["loc"]) or "?"
    shown = "<hidden>" if "secret" in name else repr(first.get("input"))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{exc.title} {name}={shown}: {first['msg']}{more}"


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line that says where to look, not the whole usage (subparsers inherit this)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stemstream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    name_native_threads()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except StemstreamError as exc:
        # A user's mistake or an environment problem: one line that says what to do.
        print(f"stemstream: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A path the user gave (or a setting names) that cannot be made, read or written: one line, the
        # traceback only at DEBUG.
        logger.debug("%s", exc, exc_info=True)
        print(f"stemstream: error: {one_line_os_error(exc)}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        logger.debug("%s", exc, exc_info=True)
        print(f"stemstream: error: {one_line_validation_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stemstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
