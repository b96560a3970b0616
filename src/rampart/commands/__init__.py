"""The `rampart` command line's verbs, one module per area.

release (the vendor's: keys, signatures, the webroot, release artefacts, dm-verity), tuf
(the vendor's TUF repository and its key ceremonies), device
(update, status, the TPM...), server (serve and its administration), testbed and
gateway each declare their verbs as data (commands.common's `Group` and `Verb`);
`build_parser` assembles them. Declaring a verb imports only the standard library,
`cryptography` and the light modules of rampart: the extras a device lacks
(pefile, virt-firmware, fastapi, sqlalchemy...) are imported when a verb runs.
"""

from __future__ import annotations

import argparse

from rampart import __version__
from rampart.commands import device, gateway, hardening, release, server, testbed, tuf
from rampart.commands.common import EPILOG, Group, Verb, register

# The order of `rampart --help`: top-level verbs and groups, whichever area they are in.
LISTING = (
    "keygen",
    "sign",
    "verify",
    "publish",
    "webroot",
    "tuf",
    "update",
    "serve",
    "channel",
    "machine",
    "fleet",
    "token",
    "audit",
    "attestation",
    "build",
    "inspect",
    "keys",
    "release",
    "testbed",
    "verity",
    "status",
    "mark-good",
    "boot-once",
    "bootloader",
    "secureboot",
    "install",
    "identity",
    "remote",
    "tpm",
    "gateway",
    "hardening",
)

AREAS = (
    release.VERBS,
    tuf.VERBS,
    device.VERBS,
    server.VERBS,
    testbed.VERBS,
    gateway.VERBS,
    hardening.VERBS,
)


def declarations() -> list[Group | Verb]:
    """Every area's groups and verbs, top-level ones in LISTING's order."""
    every = [decl for area in AREAS for decl in area]
    mismatch = {decl.path[0] for decl in every} ^ set(LISTING)
    if mismatch:
        raise ValueError(f"top-level verbs not both declared and in LISTING: {sorted(mismatch)}")
    # sorted() is stable: the verbs under a group keep their area's order.
    return sorted(every, key=lambda decl: LISTING.index(decl.path[0]))


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole `rampart` command line."""
    parser = argparse.ArgumentParser(
        prog="rampart",
        description="Signed A/B system updates and a verified boot chain (CLIP OS 5 model).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rampart {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    register(verbs, declarations())
    return parser
