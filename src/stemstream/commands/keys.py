"""``stemstream keys``: make and manage the ZeroMQ CURVE keys and their store roles (docs/security.md).

Prints names, file paths and *public* keys only; secret keys stay in their 0600 files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stemstream.commands.options import subcommands


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = subcommands(subparsers, "keys", "make and manage the CURVE keys (docs/security.md)")

    init = sub.add_parser(
        "init",
        help="make a key directory: the store's server keypair, an admin client keypair, authorized/",
        description="Make DIR with the store's server keypair, one client keypair (--client, role admin: it may "
        "write anything) and authorized/ holding its public key. Run it on a secure host; then give each "
        "service its own key with its role (`keys add NAME --role ROLE`) and distribute (docs/security.md).",
    )
    init.add_argument("dir", type=Path, help="the key directory to make (STEMSTREAM_KEYS_DIR)")
    init.add_argument("--client", default="stemstream", help="name of the first client keypair (default stemstream)")
    init.set_defaults(func=_init)

    add = sub.add_parser(
        "add",
        help="make a client keypair NAME with a store role and authorise it, or a host's server keypair (--server)",
    )
    add.add_argument("name")
    _dir_option(add)
    _role_option(add)
    add.add_argument("--no-authorize", action="store_true", help="make the keypair only")
    add.add_argument(
        "--server",
        action="store_true",
        help="make host NAME's own server keypair (servers/NAME) for the sockets it binds; never a client key",
    )
    add.set_defaults(func=_add)

    authorize = sub.add_parser(
        "authorize",
        help="allow a public key to connect, with a store role: a client NAME, or a NAME.key file from elsewhere "
        "(again: change its role)",
    )
    authorize.add_argument("key", help="a client name in DIR, or the path of a public certificate NAME.key")
    _dir_option(authorize)
    _role_option(authorize)
    authorize.set_defaults(func=_authorize)

    ls = sub.add_parser("list", help="show the keys: names and public keys (never secrets)")
    _dir_option(ls)
    ls.set_defaults(func=_list)

    revoke = sub.add_parser("revoke", help="remove NAME's public key from authorized/")
    revoke.add_argument("name")
    _dir_option(revoke)
    revoke.set_defaults(func=_revoke)


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=None, help="the key directory (default STEMSTREAM_KEYS_DIR)")


def _role_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        default=None,
        help="what the key may write in the store: nodegroup, producer, leader, aggregator, session, operator, "
        "store or admin (docs/security.md); none: it may read, not write",
    )


def _check_role(role: str | None) -> str | None:
    from stemstream.errors import ConfigError
    from stemstream.scans.policy import ROLES

    if role is not None and role not in ROLES:
        raise ConfigError(f"role {role!r}: one of {', '.join(ROLES)} (docs/security.md)")
    return role


def _role_note(role: str | None) -> str:
    return f"role {role}" if role else "no role: it may read the store but write nothing; give one with --role"


def _directory(args: argparse.Namespace):  # -> KeyDirectory, imported lazily
    from stemstream.config import load_settings
    from stemstream.errors import ConfigError
    from stemstream.transport.keys import KeyDirectory

    path = args.dir if args.dir is not None else load_settings().keys_dir
    if path is None:
        raise ConfigError("no key directory: give --dir DIR or set STEMSTREAM_KEYS_DIR")
    return KeyDirectory(path)


def _init(args: argparse.Namespace) -> int:
    from stemstream.transport.keys import KeyDirectory

    d = KeyDirectory(args.dir)
    d.init(client=args.client)
    print(f"made {d.path}: the store's server keypair, client keypair {args.client!r} (role admin), authorized/")
    print(f"use it with: export STEMSTREAM_KEYS_DIR={d.path.resolve()}")
    return 0


def _add(args: argparse.Namespace) -> int:
    d = _directory(args)
    if args.server:
        public = d.add(args.name, server=True, role=_check_role(args.role))
        print(f"server key {args.name}: {public.decode()}; keypair in {d.host_secret_file(args.name)}")
        print(f"(on host {args.name}: STEMSTREAM_SERVER_KEY_NAME={args.name}; it publishes this key in its records)")
        return 0
    public = d.add(args.name, authorize=not args.no_authorize, role=_check_role(args.role))
    state = "not authorised" if args.no_authorize else f"authorised, {_role_note(args.role)}"
    print(f"client {args.name}: {public.decode()} ({state}); keypair in {d.client_secret_file(args.name)}")
    return 0


def _authorize(args: argparse.Namespace) -> int:
    d = _directory(args)
    name = d.authorize(args.key, role=_check_role(args.role))
    print(f"authorised {name} in {d.authorized_dir} ({_role_note(args.role)})")
    return 0


def _list(args: argparse.Namespace) -> int:
    d = _directory(args)
    entries = d.entries()
    if not entries:
        print(f"(no keys in {d.path}; make them with `stemstream keys init {d.path}`)")
        return 0
    width = max(len(str(e["name"])) for e in entries)
    print(f"{'NAME':<{width}}  KIND      PUBLIC KEY                                AUTHORISED  SECRET HERE  ROLE")
    for e in entries:
        authorized = "yes" if e["authorized"] else "no"
        secret = "yes" if e["secret"] else "no"
        role = e["role"] or "-"
        print(f"{e['name']!s:<{width}}  {e['kind']!s:<8}  {e['public']!s:<40}  {authorized:<10}  {secret:<11}  {role}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    d = _directory(args)
    removed = d.revoke(args.name)
    print(f"revoked {args.name}: removed {removed}; new connections with it are refused from now on")
    print("(open connections stay until they close: restart the services it talks to, to cut them now)")
    return 0
