"""The kernel hardening audit's verbs: `rampart hardening check|list`
(rampart.contracts.hardening; docs/build.md "Kernel hardening audit")."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from rampart import run
from rampart.commands.common import JSON, Group, Verb, arg, print_json
from rampart.contracts import exposure, hardening, pe
from rampart.errors import AuditError, LocalError, UsageError
from rampart.files import replace_whole

PROC_CMDLINE = Path("/proc/cmdline")
# systemd-analyze's table, plain: no colours, no pager, no emoji column in a C locale.
_ANALYZE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The audit's inputs from the command line's options (None: not checked)."""
    if args.running and (args.root or args.cmdline is not None or args.efiboot):
        raise UsageError("--running reads this machine: not with --root, --cmdline or --efiboot")
    if args.cmdline is not None and args.efiboot is not None:
        raise UsageError("give --cmdline or --efiboot, not both")
    config_path: Path | None = args.kernel_config
    line: str | None = args.cmdline
    sysctl: dict[str, str] | None = None
    recs = hardening.load()
    if args.running:
        line = _read(PROC_CMDLINE, "kernel command line").decode("ascii", "replace")
        sysctl = hardening.sysctl_running(r.name for r in recs if r.kind == "sysctl")
        if config_path is None:
            running = Path("/boot") / f"config-{os.uname().release}"
            config_path = running if running.is_file() else None
    if args.root is not None:
        if not args.root.is_dir():
            raise LocalError(f"{args.root}: not a directory (a Core's root tree)")
        sysctl = hardening.sysctl_tree(args.root)
        if config_path is None:
            config_path = hardening.tree_kernel_config(args.root)
    if args.efiboot is not None:
        line = pe.cmdline(_read(args.efiboot, "UKI"), str(args.efiboot))
        if line is None:
            raise LocalError(f"{args.efiboot}: the UKI has no .cmdline section")
    kconfig = None if config_path is None else hardening.read_kernel_config(config_path)
    return {"recommendations": recs, "kconfig": kconfig, "cmdline": line, "sysctl": sysctl}


def cmd_hardening_check(args: argparse.Namespace) -> int:
    given = inputs(args)
    if given["kconfig"] is None and given["cmdline"] is None and given["sysctl"] is None:
        raise UsageError(
            "nothing to check: give --running, or --root, --kernel-config, --cmdline or --efiboot"
        )
    findings = hardening.audit(
        given["recommendations"], given["kconfig"], given["cmdline"], given["sysctl"]
    )
    doc = hardening.report(findings)
    failing = [f for f in findings if f.status == hardening.GAP]
    if args.baseline is not None:
        failing = hardening.regressions(hardening.read_report(args.baseline), findings)
        doc["regressions"] = [f.key for f in failing]
    if args.write_report is not None:
        replace_whole(args.write_report, _json_text(doc).encode(), 0o644)
    if args.json:
        print_json(doc)
        return AuditError.exit_code if failing else 0
    for finding in findings:  # the failing ones go to stderr, with the error
        if finding not in failing and (finding.status != hardening.MET or args.verbose):
            print(_line(finding))
    counts = hardening.counts(findings)
    print(
        f"{counts['met']} met, {counts['covered']} covered, {counts['gap']} gap(s), "
        f"{counts['unchecked']} unchecked"
    )
    if failing:
        what = "regression(s) against the baseline" if args.baseline else "gap(s)"
        raise AuditError(
            f"hardening check: {len(failing)} {what} in the recommended settings",
            [_line(f) for f in failing],
        )
    return 0


def _json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _line(finding: hardening.Finding) -> str:
    rec = finding.recommendation
    found = "not set" if finding.found is None else f"{finding.found!r}"
    text = f"{finding.status:<9} {rec.kind} {rec.name}: want {rec.want}"
    if finding.status != hardening.UNCHECKED:
        text += f", found {found}"
    if finding.status == hardening.COVERED and rec.covered_by is not None:
        text += " (covered by {}:{}={})".format(*rec.covered_by)
    if finding.status == hardening.GAP:
        text += f" -- {rec.why}"
    return text


def cmd_hardening_list(args: argparse.Namespace) -> int:
    recs = hardening.load()
    if args.json:
        print_json(
            {
                "format": hardening.FORMAT,
                "recommendations": [
                    hardening.Finding(r, hardening.UNCHECKED, None).to_json() for r in recs
                ],
            }
        )
        return 0
    for rec in recs:
        print(f"{rec.kind} {rec.name} = {rec.want}: {rec.why}")
    return 0


def cmd_hardening_exposure(args: argparse.Namespace) -> int:
    goals = exposure.load()
    if args.scores is not None:
        found = exposure.parse_scores(_read(args.scores, "scores").decode("utf-8", "replace"))
    else:
        found = _running_scores([goal.unit for goal in goals])
    scores = exposure.evaluate(goals, found)
    failing = [s for s in scores if s.status in exposure.FAILING]
    if args.json:
        print_json(exposure.report(scores))
        return AuditError.exit_code if failing else 0
    for score in scores:
        if score not in failing:
            print(_score_line(score))
    if failing:
        raise AuditError(
            f"exposure: {len(failing)} service(s) above their goal or without one",
            [_score_line(s) for s in failing],
        )
    return 0


def _running_scores(units: list[str]) -> dict[str, float]:
    """This machine's scores: every service the table lists (systemd-analyze leaves
    out oneshot services), then those of `units` that are loaded but not listed."""
    scores = exposure.parse_scores(_systemd("systemd-analyze", "security", "--no-pager"))
    missing = [unit for unit in units if unit not in scores]
    if missing:
        shown = _systemd("systemctl", "show", "--property=Id,LoadState", "--", *missing)
        states = dict(re.findall(r"^Id=(\S+)\nLoadState=(\S+)$", shown, re.MULTILINE))
        loaded = [unit for unit in missing if states.get(unit) == "loaded"]
        if loaded:
            text = _systemd("systemd-analyze", "security", "--no-pager", "--", *loaded)
            scores.update(exposure.parse_scores(text))
    return scores


def _systemd(*argv: str) -> str:
    return run.run(argv, env=_ANALYZE_ENV, timeout=300).stdout.decode("utf-8", "replace")


def _score_line(score: exposure.Score) -> str:
    scored = "-" if score.exposure is None else f"{score.exposure:.1f}"
    goal = "-" if score.goal is None else f"{score.goal:.1f}"
    text = f"{score.status:<8} {score.unit:<44} {scored:>4} (goal {goal})"
    return f"{text} -- {score.why}" if score.status == exposure.OVER else text


_SOURCES = (
    arg(
        "--running",
        action="store_true",
        help="this machine: /proc/cmdline, /proc/sys, /boot/config-$(uname -r) if there is one",
    ),
    arg(
        "--root",
        type=Path,
        metavar="DIR",
        help="a Core's root tree: its sysctl.d files "
        "(as systemd-sysctl applies them) and its /boot/config-* if it has one",
    ),
    arg(
        "--kernel-config",
        type=Path,
        metavar="FILE",
        help="a kernel's .config (Debian: /boot/config-<release> of the linux-image package)",
    ),
    arg("--cmdline", metavar="TEXT", help="a kernel command line"),
    arg("--efiboot", type=Path, metavar="UKI", help="a UKI: its .cmdline section"),
)

VERBS: list[Group | Verb] = [
    Group(
        ("hardening",),
        "kernel hardening audit: kernel config, command line, sysctl",
        "Audit a Core's kernel configuration, its UKI's command line and its sysctl "
        "settings against Rampart's recommended settings (after the Kernel Self "
        "Protection Project's list; each with its reason). See docs/build.md "
        '"Kernel hardening audit".',
        dest="hardening_verb",
    ),
    Verb(
        ("hardening", "check"),
        "print every gap; exit 5 on a gap, or with --baseline on a regression",
        "Check what the options give (at least one): each recommendation is met, "
        "covered (a kernel option the kernel lacks whose protection a command-line or "
        "sysctl setting gives), a gap, or unchecked (its input was not given). Prints "
        "every finding but the met ones (-v: those too), then the counts. Exit 5 if "
        "there is a gap; with --baseline, only if something met or covered there is a "
        "gap now (a regression). --write-report records the report (the baseline of "
        "the next check).",
        cmd_hardening_check,
        (
            *_SOURCES,
            arg(
                "--baseline",
                type=Path,
                metavar="REPORT",
                help="a report recorded earlier (--write-report, or a release's hardening.json)",
            ),
            arg("--write-report", type=Path, metavar="FILE", help="write the JSON report"),
            arg("-v", "--verbose", action="store_true", help="list the met ones too"),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("hardening", "exposure"),
        "score this machine's services with systemd-analyze security; exit 5 above a goal",
        "Run `systemd-analyze security` on this machine (every loaded service unit, "
        "scored 0.0, confined, to 10.0, unconfined) and compare each score with its "
        "goal in Rampart's exposure goals (rampart/data/hardening/exposure.toml, each "
        "with its reason). Exit 5 if a service scores above its goal, or runs without "
        "one (nobody reviewed it). --scores reads that command's output from a file "
        "instead. See docs/hardening.md.",
        cmd_hardening_exposure,
        (
            arg(
                "--scores",
                type=Path,
                metavar="FILE",
                help="the output of `systemd-analyze security` (no unit), saved",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("hardening", "list"),
        "list the recommended settings and their reasons",
        None,
        cmd_hardening_list,
        (JSON,),
    ),
]
