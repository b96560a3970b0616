"""The kernel hardening audit: a Core's kernel configuration, its UKI's command line
and its sysctl settings against the recommended settings of
`rampart/data/hardening/recommended.toml` (docs/build.md "Kernel hardening audit").

`audit` gives one Finding per recommendation: met, covered (a kernel option the
kernel lacks whose protection a command-line or sysctl setting gives), a gap, or
unchecked (its input was not given). `regressions` compares a report with an earlier
one: what was met or covered and is a gap now. `rampart release` records each
release's report and refuses a regression; `rampart hardening check` prints it.

Inputs: the kernel's `.config` text (Debian's /boot/config-<uname>), a command line,
and sysctl values: read from a root tree's sysctl.d files the way systemd-sysctl
applies them (`sysctl_tree`), or from a running machine's /proc/sys (`sysctl_running`).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rampart.contracts.cmdline import cmdline_params
from rampart.errors import FormatError, LocalError, UsageError

FORMAT = 1
KINDS = ("kconfig", "cmdline", "sysctl")
MET, COVERED, GAP, UNCHECKED = "met", "covered", "gap", "unchecked"
PASSING = (MET, COVERED)

# systemd-sysctl's directories, the first that has a file name wins it; the files of
# all of them then apply in the order of their names (sysctl.d(5)). /etc/sysctl.conf
# only through Debian's symlink /etc/sysctl.d/99-sysctl.conf.
SYSCTL_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d")
_MAX_LINKS = 40  # symbolic links followed in a tree, as the kernel's limit
_KCONFIG_SET = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_KCONFIG_UNSET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")
_NAME = re.compile(r"[A-Za-z0-9_.,/=-]{1,128}")
_SYSCTL_KEY = re.compile(r"[a-z0-9_]+(?:[./][A-Za-z0-9_-]+)+")
_COVER = re.compile(r"(cmdline|sysctl):([^=\s]+)=(\S+)")


@dataclass(frozen=True)
class Recommendation:
    kind: str  # kconfig, cmdline or sysctl
    name: str
    accepted: tuple[str, ...]  # the values that pass ("" for a bare cmdline flag)
    why: str
    covered_by: tuple[str, str, str] | None = None  # (kind, name, value)

    @property
    def want(self) -> str:
        return " or ".join(v or "present" for v in self.accepted)


@dataclass(frozen=True)
class Finding:
    recommendation: Recommendation
    status: str  # MET, COVERED, GAP or UNCHECKED
    found: str | None  # the value found; None: not set (or not checked)

    @property
    def key(self) -> str:
        return f"{self.recommendation.kind}:{self.recommendation.name}"

    def to_json(self) -> dict[str, Any]:
        rec = self.recommendation
        doc: dict[str, Any] = {
            "kind": rec.kind,
            "name": rec.name,
            "want": list(rec.accepted),
            "found": self.found,
            "status": self.status,
            "why": rec.why,
        }
        if rec.covered_by is not None:
            doc["covered_by"] = "{}:{}={}".format(*rec.covered_by)
        return doc


def data_document(name: str, text: str | None, source: str, keys: set[str]) -> dict[str, Any]:
    """The TOML document `text`, or rampart/data/hardening/`name` without it, of format
    FORMAT and with no key but `keys`. FormatError otherwise."""
    if text is None:
        text = (resources.files("rampart") / "data" / "hardening" / name).read_text("utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"{source}: not TOML: {exc}") from None
    if doc.get("format") != FORMAT:
        raise FormatError(f"{source}: format = {doc.get('format')!r}, expected {FORMAT}")
    unknown = set(doc) - keys
    if unknown:
        raise FormatError(f"{source}: unknown key {sorted(unknown)[0]!r}")
    return doc


def load(text: str | None = None, source: str = "recommended.toml") -> list[Recommendation]:
    """The recommendations of `text` (the shipped data file without it). FormatError,
    naming the entry, for a malformed one."""
    doc = data_document("recommended.toml", text, source, {"format", *KINDS})
    out: list[Recommendation] = []
    seen: set[tuple[str, str]] = set()
    for kind in KINDS:
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise FormatError(f"{source}: {kind} must be an array of tables ([[{kind}]])")
        for i, entry in enumerate(entries):
            rec = _recommendation(kind, entry, f"{source}: {kind} #{i + 1}")
            if (kind, rec.name) in seen:
                raise FormatError(f"{source}: {kind} {rec.name} is listed twice")
            seen.add((kind, rec.name))
            out.append(rec)
    return out


def _recommendation(kind: str, entry: Any, where: str) -> Recommendation:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: not a table")
    allowed = {"name", "want", "one_of", "why"} | ({"covered_by"} if kind == "kconfig" else set())
    unknown = set(entry) - allowed
    if unknown:
        raise FormatError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, why = entry.get("name"), entry.get("why")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FormatError(f"{where}: name {name!r} is not an option, parameter or key")
    where = f"{where} ({name})"
    if not isinstance(why, str) or not why.strip():
        raise FormatError(f"{where}: why is missing: every recommendation gives its reason")
    accepted = _accepted(kind, entry, where)
    if kind == "kconfig" and not name.startswith("CONFIG_"):
        raise FormatError(f"{where}: a kernel option starts with CONFIG_")
    if kind == "sysctl" and not _SYSCTL_KEY.fullmatch(name):
        raise FormatError(f"{where}: not a sysctl key")
    covered_by = _cover(entry.get("covered_by"), where)
    return Recommendation(kind, name, accepted, why.strip(), covered_by)


def _accepted(kind: str, entry: dict[str, Any], where: str) -> tuple[str, ...]:
    """The values of `want` or `one_of` ("" for a bare command-line flag, `true`)."""
    if ("want" in entry) == ("one_of" in entry):
        raise FormatError(f"{where}: give want or one_of, not both or neither")
    values = entry["one_of"] if "one_of" in entry else [entry["want"]]
    if not isinstance(values, list) or not values:
        raise FormatError(f"{where}: one_of must be a list of values")
    accepted: list[str] = []
    for value in values:
        if value is True and kind == "cmdline":
            accepted.append("")
        elif isinstance(value, str) and value and not any(c.isspace() for c in value):
            accepted.append(value)
        else:
            raise FormatError(f"{where}: {value!r} is not a value to compare with")
    return tuple(accepted)


def _cover(cover: Any, where: str) -> tuple[str, str, str] | None:
    if cover is None:
        return None
    match = _COVER.fullmatch(cover) if isinstance(cover, str) else None
    if match is None:
        raise FormatError(
            f"{where}: covered_by {cover!r} is not cmdline:NAME=VALUE or sysctl:KEY=VALUE"
        )
    return (match.group(1), match.group(2), match.group(3))


# --- inputs ---------------------------------------------------------------------------


def parse_kconfig(text: str) -> dict[str, str]:
    """A kernel .config: option -> value; "n" for `# CONFIG_X is not set`. Quotes of
    string values are kept as written."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        set_ = _KCONFIG_SET.fullmatch(line)
        if set_ is not None:
            out[set_.group(1)] = set_.group(2)
            continue
        unset = _KCONFIG_UNSET.fullmatch(line)
        if unset is not None:
            out[unset.group(1)] = "n"
    return out


def tree_kernel_config(root: Path) -> Path | None:
    """The one /boot/config-* of root tree `root`, if it has one; UsageError if several."""
    found = sorted((root / "boot").glob("config-*"))
    if len(found) > 1:
        raise UsageError(
            f"{root}/boot has {len(found)} kernel configs: choose one with --kernel-config"
        )
    return found[0] if found else None


def read_kernel_config(path: Path) -> dict[str, str]:
    """parse_kconfig of the file `path`; LocalError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the kernel config: {exc.strerror}") from None
    return parse_kconfig(text)


def parse_sysctl(text: str) -> dict[str, str]:
    """The assignments of one sysctl.d file (`key = value`; `#` and `;` comments;
    a leading `-`, ignore-if-missing, is dropped; `/` in a key is the same as `.`)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lstrip("-").replace("/", ".")
        out[key] = " ".join(value.split())
    return out


def sysctl_tree(root: Path) -> dict[str, str]:
    """The sysctl values the files of root tree `root` set, as systemd-sysctl applies
    them at boot."""
    chosen: dict[str, Path] = {}
    for directory in SYSCTL_DIRS:
        base = root / directory
        if not base.is_dir():
            continue
        for path in base.glob("*.conf"):
            chosen.setdefault(path.name, path)
    values: dict[str, str] = {}
    for name in sorted(chosen):
        found = _in_tree(root, chosen[name])
        if found is None:  # masked: a link to /dev/null
            continue
        try:
            values.update(parse_sysctl(found.read_text(encoding="utf-8", errors="replace")))
        except FileNotFoundError:  # a dangling link: systemd-sysctl skips it too
            continue
        except OSError as exc:
            raise LocalError(f"{chosen[name]}: cannot read: {exc.strerror}") from None
    return values


def _in_tree(root: Path, path: Path) -> Path | None:
    """`path` with its symbolic links followed inside the tree `root` (an absolute
    target is the tree's, not this machine's); None for a link to /dev/null."""
    for _ in range(_MAX_LINKS):
        if not path.is_symlink():
            return path
        target = path.readlink()
        if target == Path("/dev/null"):
            return None
        if not target.is_absolute():
            target = "/" / path.parent.relative_to(root) / target
        path = root.joinpath(*Path(os.path.normpath(target)).parts[1:])  # ".." stops at /
    raise LocalError(f"{path}: too many levels of symbolic links in {root}")


def sysctl_running(keys: Iterable[str], proc: Path = Path("/proc/sys")) -> dict[str, str]:
    """The values of `keys` on this machine (a key the kernel does not have is left out)."""
    values: dict[str, str] = {}
    for key in keys:
        path = proc / key.replace(".", "/")
        try:
            values[key] = " ".join(path.read_text(encoding="ascii", errors="replace").split())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    return values


# --- the audit ------------------------------------------------------------------------


def audit(
    recommendations: Sequence[Recommendation],
    kconfig: Mapping[str, str] | None = None,
    cmdline: str | None = None,
    sysctl: Mapping[str, str] | None = None,
) -> list[Finding]:
    """One Finding per recommendation, in the data file's order; an input that is None
    leaves its recommendations unchecked."""
    params = cmdline_params(cmdline) if cmdline is not None else None
    inputs: dict[str, Mapping[str, str] | None] = {
        "kconfig": kconfig,
        "cmdline": params,
        "sysctl": sysctl,
    }
    findings: list[Finding] = []
    for rec in recommendations:
        values = inputs[rec.kind]
        if values is None:
            findings.append(Finding(rec, UNCHECKED, None))
            continue
        found = values.get(rec.name)
        if _passes(rec.kind, rec.accepted, found):
            findings.append(Finding(rec, MET, found))
            continue
        status = GAP
        if rec.covered_by is not None:
            kind, name, value = rec.covered_by
            other = inputs[kind]
            if other is not None and _passes(kind, (value,), other.get(name)):
                status = COVERED
        findings.append(Finding(rec, status, found))
    return findings


def _passes(kind: str, accepted: Sequence[str], found: str | None) -> bool:
    if kind == "kconfig" and found is None:
        found = "n"  # an option the kernel does not have is not set
    return found is not None and found in accepted


def report(findings: Sequence[Finding]) -> dict[str, Any]:
    """The JSON document of an audit (docs/formats.md "Hardening report")."""
    return {
        "format": FORMAT,
        "counts": counts(findings),
        "findings": [f.to_json() for f in findings],
    }


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    """How many findings have each status."""
    return {s: sum(1 for f in findings if f.status == s) for s in (MET, COVERED, GAP, UNCHECKED)}


def read_report(path: Path) -> dict[str, str]:
    """A recorded report: `kind:name` -> status. FormatError if it is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: not a hardening report (JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{path}: not a hardening report of format {FORMAT}")
    out: dict[str, str] = {}
    for entry in doc.get("findings", []):
        try:
            out[f"{entry['kind']}:{entry['name']}"] = str(entry["status"])
        except (KeyError, TypeError):
            raise FormatError(f"{path}: a finding without kind, name or status") from None
    return out


def regressions(before: Mapping[str, str], findings: Sequence[Finding]) -> list[Finding]:
    """The findings that are gaps where `before` (read_report) had them met or covered.
    A recommendation new since, or unchecked on either side, is no regression."""
    return [f for f in findings if f.status == GAP and before.get(f.key) in PASSING]
