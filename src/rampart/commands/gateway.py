"""The IPsec gateway's verbs: `rampart gateway render|check`.

rampart.gateway is imported when a verb runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rampart.commands.common import JSON, Group, Verb, arg, print_json
from rampart.errors import AuditError


def cmd_gateway_render(args: argparse.Namespace) -> int:
    from rampart.gateway import description, render

    gw = description.load(args.description)
    rendered = render.write(gw, args.out)
    files = sorted(rendered.files)
    if args.json:
        print_json(
            {
                "description": str(args.description),
                "out": str(args.out),
                "name": gw.name,
                "peers": [p.name for p in gw.peers],
                "files": files,
            }
        )
        return 0
    for rel in files:
        print(f"{args.out / rel}")
    print(
        f"rampart: rendered gateway {gw.name!r} ({len(gw.peers)} peer(s)) into {args.out}; "
        f"check it with `rampart gateway check {args.out}`",
        file=sys.stderr,
    )
    return 0


def cmd_gateway_check(args: argparse.Namespace) -> int:
    from rampart.gateway import check

    try:
        report = check.check(args.dir)
    except AuditError as exc:
        if args.json:
            print_json({"directory": str(args.dir), "ok": False, "problems": exc.problems})
            return exc.exit_code
        raise
    if args.json:
        print_json(report.as_json())
        return 0
    for line in report.checked:
        print(f"ok  {line}")
    print(f"{args.dir}: the rendered gateway passes nft and charon")
    return 0


VERBS: list[Group | Verb] = [
    Group(
        ("gateway",),
        "IPsec gateway: render gateway.toml into strongSwan, nftables and units; check",
        "An IPsec gateway (or client) from one declarative gateway.toml: strict "
        "IKEv2 strongSwan connections with XFRM interfaces in a tunnel network namespace, "
        "default-drop nftables rulesets for the public side and the tunnel namespace, the "
        "units that set them up, a drop-in that confines charon. See docs/gateway.md.",
        dest="gateway_verb",
    ),
    Verb(
        ("gateway", "render"),
        "validate gateway.toml and write the files (deterministic)",
        "Validate DESCRIPTION (weak suites, IKEv1, PSK without ike.allow_psk, "
        "overlapping selectors, missing certificates and out-of-range ports are refused "
        "with one line, exit 6) and write the files into --out, a tree to copy onto the "
        "root file system, with a MANIFEST of SHA-256 sums. The same description always "
        "gives the same bytes. The private key is referenced, never read or copied.",
        cmd_gateway_render,
        (
            arg("description", type=Path, metavar="DESCRIPTION", help="the gateway.toml"),
            arg("--out", type=Path, required=True, metavar="DIR", help="output directory"),
            JSON,
        ),
    ),
    Verb(
        ("gateway", "check"),
        "check rendered files with nft and a throwaway charon (root)",
        "Check DIR (the output of `gateway render`): the MANIFEST sums, "
        "`nft -c -f` and a real load into a scratch network namespace for every ruleset, "
        "`sh -n` for the scripts, and swanctl.conf loaded into a throwaway charon in its "
        "own namespaces. Exit 5 lists every problem. Needs root, nft, swanctl and charon; "
        "the users the rulesets name must exist here.",
        cmd_gateway_check,
        (
            arg("dir", type=Path, metavar="DIR", help="a directory `gateway render` wrote"),
            JSON,
        ),
    ),
]
