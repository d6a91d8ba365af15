"""Options several sub-commands share: the store's address (and its backup), and the counting parameters.

Each is one flag everywhere, and each defaults to its ``STEMSTREAM_`` setting.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, help="tcp://HOST:PORT of the store (default STEMSTREAM_STORE_HOST/PORT)"
    )
    parser.add_argument(
        "--store-backup",
        default=None,
        help="tcp://HOST:PORT of its Binary Star backup (default STEMSTREAM_STORE_BACKUP_HOST/PORT)",
    )


def settings_from(args: argparse.Namespace) -> Any:
    """The settings, with the store of ``--store`` / ``--store-backup`` when given."""
    from stemstream.config import get_settings, load_settings, store_overrides

    overrides = store_overrides(getattr(args, "store", None), getattr(args, "store_backup", None))
    return load_settings(**overrides) if overrides else get_settings()


def store_client(
    args: argparse.Namespace, timeout: float = 5.0, *, subtrees: tuple[str, ...] | None = None, role: str | None = None
) -> Any:
    """A started client of the store the options name, with its backup (``StoreClient.from_settings``),
    mirroring ``subtrees`` (default everything) and declaring ``role`` and the key name (docs/store.md, Who
    may write what)."""
    from stemstream.store import StoreClient

    settings = settings_from(args)
    name = settings.key_name if role else None
    return StoreClient.from_settings(settings, timeout=timeout, subtrees=subtrees, role=role, name=name).start()


_TYPES: dict[str, Any] = {
    "background_n_sigma": float,
    "xray_n_sigma": float,
    "threshold_samples": int,
    "threshold_window": int,
}


def add_counting_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The flags of :class:`~stemstream.counting.params.CountingParams` (``--background-n-sigma`` ...)."""
    from stemstream.counting.params import FLAGS, CountingParams

    for name, flag in FLAGS.items():
        described = CountingParams.model_fields[name].description or name.replace("_", " ")
        help_text = f"{described} (default STEMSTREAM_{name.upper()})"
        parser.add_argument(flag, dest=name, type=_TYPES.get(name, str), default=None, help=help_text)


def counting_from(args: argparse.Namespace) -> Any:
    """The CountingParams of :func:`add_counting_arguments`' flags; the settings for those not given."""
    from stemstream.counting.params import FLAGS, counting_params

    return counting_params(**{name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})


def subcommands(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """``stemstream NAME ACTION ...``: the command's parser and its required ACTION subparsers."""
    parser = subparsers.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
