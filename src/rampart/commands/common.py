"""What every area's verbs share: the declaration kit, argument types, output, passwords.

An area module declares its verbs as data, a list of `Group` and `Verb`, and
`register` adds such a list to a parser's subcommands. A group is a node of the
verb tree (`rampart tpm`), a verb a leaf (`rampart tpm status`); a group is
declared before the verbs under it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rampart.contracts.version import parse_version
from rampart.errors import LocalError, UsageError

PASSWORD_ENV = "RAMPART_PASSWORD"  # noqa: S105 - the name of a variable, not a secret

EPILOG = """\
exit codes: 0 success (update: up to date), 1 other error, 2 invalid argument, 3 local
problem (missing file, permission, space, wrong password), 4 refused (would overwrite, go
backwards, or update while another runs), 5 audit found problems, 7 TUF metadata short of
a signature threshold (not published), 10 malformed or oversized data, 11 signature does
not verify or names another version, 12 network failure (TLS, certificate, timeout, HTTP
status), 20 update installed (reboot to use it), 21 an update already waits for a reboot.
See docs/exit-codes.md."""

Func = Callable[[argparse.Namespace], int]


# --- the declaration kit ------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One `add_argument` call: its names (or positional name) and keywords."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument, declared with `add_argument`'s own signature."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Group:
    """A verb that only holds sub-verbs: `rampart PATH... SUB`.

    `dest` receives the chosen sub-verb's name, `metavar` names it in the usage.
    A `func` given here runs for every sub-verb that sets none itself.
    """

    path: tuple[str, ...]
    help: str
    description: str | None
    dest: str
    metavar: str = "VERB"
    func: Func | None = None


@dataclass(frozen=True)
class Verb:
    """A verb that runs `func`: `rampart PATH... [ARGS]`.

    With `exit_codes`, its help ends with the exit codes (EPILOG) and keeps the
    description's line breaks, as the top-level help does.
    """

    path: tuple[str, ...]
    help: str
    description: str | None
    func: Func | None = None
    args: tuple[Arg, ...] = ()
    exit_codes: bool = False


class SubParsers(Protocol):
    """What `register` needs of a parser's subcommands (`add_subparsers()`)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def register(root: SubParsers, declarations: Iterable[Group | Verb]) -> None:
    """Add the declared groups and verbs, in order, under `root`."""
    groups: dict[tuple[str, ...], SubParsers] = {(): root}
    for decl in declarations:
        parent = groups.get(decl.path[:-1])
        if parent is None:
            raise ValueError(f"{' '.join(decl.path)}: its group is not declared before it")
        exit_codes = isinstance(decl, Verb) and decl.exit_codes
        parser = parent.add_parser(
            decl.path[-1],
            help=decl.help,
            description=decl.description,
            epilog=EPILOG if exit_codes else None,
            formatter_class=(
                argparse.RawDescriptionHelpFormatter if exit_codes else argparse.HelpFormatter
            ),
        )
        if isinstance(decl, Group):
            groups[decl.path] = parser.add_subparsers(
                dest=decl.dest, metavar=decl.metavar, required=True
            )
        else:
            for argument in decl.args:
                parser.add_argument(*argument.flags, **argument.options)
        if decl.func is not None:
            parser.set_defaults(func=decl.func)


JSON = arg("--json", action="store_true", help="print a JSON object on stdout")


PASSWORD_ENV_ARG = arg(
    "--password-env",
    metavar="VAR",
    default=PASSWORD_ENV,
    help=f"read the secret key password from this environment variable "
    f"(default {PASSWORD_ENV}); without it, ask on the terminal",
)


# --- argument types -----------------------------------------------------------------


def check_semver(text: str) -> str:
    """The version, checked to be semver without build metadata."""
    version = parse_version(text)
    if version.build:
        raise UsageError(f"version {text!r}: build metadata is not allowed in a signed version")
    return text


def seconds(text: str) -> float:
    """A duration on the command line: seconds, 0 or more, finite."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def timeout(text: str) -> float:
    """A network timeout on the command line: 0 to 3600 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 to 3600 seconds")
    return value


def count(text: str) -> int:
    """A whole number on the command line: 0 or more."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def epoch(text: str) -> int:
    """A security epoch on the command line: 0 to 2^63-1."""
    if not text.isascii() or not text.isdigit() or int(text) >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a security epoch (0 to 2^63-1)")
    return int(text)


# --- output and passwords -----------------------------------------------------------


def print_json(payload: Any, default: Callable[[Any], Any] | None = None) -> None:
    """`payload` as indented JSON with sorted keys, and a newline, on stdout."""
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=default)
    sys.stdout.write("\n")


def password_source(env_name: str, confirm: bool) -> Callable[[], bytes]:
    """A callable giving the key password: from $env_name, else a terminal prompt."""

    def get() -> bytes:
        value = os.environ.get(env_name)
        if value:
            return value.encode()
        if not sys.stdin.isatty():
            raise LocalError(
                f"no password: set ${env_name} or run on a terminal (or use --unencrypted)"
            )
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password (again): ") != first:
            raise LocalError("the two passwords differ")
        if not first:
            raise LocalError("empty password (use --unencrypted for a key without one)")
        return first.encode()

    return get
