"""The `rampart` command line's verbs, one module per area.

release (the vendor's: keys, signatures, the webroot, release artefacts, dm-verity), tuf
(the vendor's TUF repository and its key ceremonies), device
(update, status, the TPM...), server (serve and its administration), testbed, gateway
and hardening each declare their verbs as data (commands.common's `Group` and `Verb`);
`build_parser` assembles them. Declaring a verb imports only the standard library,
`cryptography` and the light modules of rampart: the extras a device lacks
(pefile, virt-firmware, fastapi, sqlalchemy...) are imported when a verb runs.

A command line that names a top-level verb imports that verb's area alone and builds
only its parsers (`LISTING` says which area declares it): a device's `rampart
mark-good` at boot does not import the vendor's and the server's verbs nor build a
hundred parsers it will not use (under the testbed's emulated CPU, more than a second
of every `rampart` command: docs/architecture.md). `rampart`, `rampart --help` and a
verb nobody declared build the whole parser.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import cast

from rampart import __version__
from rampart.commands.common import EPILOG, Group, Verb, register

# Every top-level verb or group, in the order of `rampart --help`, and the area module
# (rampart.commands.<area>) that declares it and everything under it.
LISTING: dict[str, str] = {
    "keygen": "release",
    "sign": "release",
    "verify": "release",
    "publish": "release",
    "webroot": "release",
    "tuf": "tuf",
    "update": "device",
    "serve": "server",
    "channel": "server",
    "machine": "server",
    "fleet": "server",
    "token": "server",
    "audit": "server",
    "attestation": "server",
    "build": "release",
    "inspect": "release",
    "keys": "release",
    "release": "release",
    "testbed": "testbed",
    "verity": "release",
    "status": "device",
    "mark-good": "device",
    "boot-once": "device",
    "bootloader": "device",
    "secureboot": "device",
    "install": "device",
    "identity": "device",
    "remote": "device",
    "tpm": "device",
    "gateway": "gateway",
    "hardening": "hardening",
}
# Options `rampart` itself takes before the verb, and their help: none of them takes a value.
TOP_OPTIONS = {"--debug": "show debug logs and tracebacks"}


def area_verbs(area: str) -> tuple[Group | Verb, ...]:
    """The groups and verbs an area module declares (its VERBS), importing it."""
    module = importlib.import_module(f"{__name__}.{area}")
    return tuple(cast("Sequence[Group | Verb]", module.VERBS))


def declarations(only: str | None = None) -> list[Group | Verb]:
    """Every area's groups and verbs, top-level ones in LISTING's order; with `only` (a
    top-level verb or group in LISTING), just it and what is under it, from its area."""
    if only is not None:
        return [decl for decl in area_verbs(LISTING[only]) if decl.path[0] == only]
    every = []
    for area in dict.fromkeys(LISTING.values()):
        for decl in area_verbs(area):
            if LISTING.get(decl.path[0]) != area:
                raise ValueError(
                    f"{' '.join(decl.path)}: declared in area {area!r}, but LISTING says "
                    f"{LISTING.get(decl.path[0])!r}"
                )
            every.append(decl)
    missing = set(LISTING) - {decl.path[0] for decl in every}
    if missing:
        raise ValueError(f"top-level verbs in LISTING that nobody declares: {sorted(missing)}")
    order = list(LISTING)
    # sorted() is stable: the verbs under a group keep their area's order.
    return sorted(every, key=lambda decl: order.index(decl.path[0]))


def named_verb(argv: Sequence[str]) -> str | None:
    """The top-level verb or group `argv` (a command line without the program name)
    names, if LISTING has it: its first word after `rampart`'s own options. None for
    anything else (no verb, a help or version flag first, an unknown word)."""
    for word in argv:
        if word in TOP_OPTIONS:
            continue
        return word if word in LISTING else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the `rampart` command line: the whole of it, or, for a command line
    `argv` that names a top-level verb, the part that parses it."""
    parser = argparse.ArgumentParser(
        prog="rampart",
        description="Signed A/B system updates and a verified boot chain (CLIP OS 5 model).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rampart {__version__}")
    for option, help_text in TOP_OPTIONS.items():
        parser.add_argument(option, action="store_true", help=help_text)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    register(verbs, declarations(None if argv is None else named_verb(argv)))
    return parser
