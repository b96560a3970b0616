"""The kernel hardening audit of a release (`rampart release`; docs/build.md "Kernel
hardening audit"): the root tree's sysctl files and kernel config, and the command line
its UKI will carry, against the recommended settings (rampart.contracts.hardening).

Each release records its report in its output directory as `hardening-<V>.json`. The
next release is compared with a baseline: the report given, or else the one of the
highest version below it in the same directory. A setting met or covered there and a
gap now is a regression, and the release is refused before anything is built, unless
each regressed setting is accepted by name (`kind:name`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampart.contracts import cmdline, hardening
from rampart.contracts.version import Version, parse_version
from rampart.errors import ConflictError, FormatError, UsageError
from rampart.files import replace_whole

_REPORT = re.compile(r"hardening-(.+)\.json")


@dataclass(frozen=True)
class Audit:
    findings: list[hardening.Finding]
    baseline: Path | None
    regressions: list[hardening.Finding]  # accepted ones included

    def counts(self) -> dict[str, int]:
        return hardening.counts(self.findings)

    def to_json(self) -> dict[str, Any]:
        doc = hardening.report(self.findings)
        doc["baseline"] = None if self.baseline is None else str(self.baseline)
        doc["regressions"] = [f.key for f in self.regressions]
        return doc


def report_path(out: Path, version: Version) -> Path:
    return out / f"hardening-{version.core}.json"


def previous_report(out: Path, version: Version) -> Path | None:
    """The report of the highest version below `version` recorded in `out`, if any."""
    best: tuple[Version, Path] | None = None
    for path in out.glob("hardening-*.json") if out.is_dir() else ():
        match = _REPORT.fullmatch(path.name)
        if match is None:
            continue
        try:
            found = parse_version(match.group(1))
        except (FormatError, UsageError):
            continue
        if found < version and (best is None or best[0] < found):
            best = (found, path)
    return None if best is None else best[1]


def release_cmdline(vg: str, version: Version, extra: Sequence[str], epoch: int | None) -> str:
    """The hardening part of the command line the release's UKI will carry (its verity
    parameters are not known before the Core is built, and not audited)."""
    return cmdline.kernel_cmdline(
        vg,
        version.core,
        roothash="00" * 32,
        hash_offset=4096,
        data_blocks=1,
        extra=extra,
        epoch=epoch,
    )


def audit_release(
    tree: Path,
    line: str,
    out: Path,
    version: Version,
    *,
    config: Path | None = None,
    baseline: Path | None = None,
    accept: Sequence[str] = (),
) -> Audit:
    """Audit the release; ConflictError, naming each setting, on a regression against
    the baseline that `accept` does not name."""
    config = config if config is not None else hardening.tree_kernel_config(tree)
    kconfig = None if config is None else hardening.read_kernel_config(config)
    findings = hardening.audit(hardening.load(), kconfig, line, hardening.sysctl_tree(tree))
    baseline = baseline if baseline is not None else previous_report(out, version)
    regressed: list[hardening.Finding] = []
    if baseline is not None:
        regressed = hardening.regressions(hardening.read_report(baseline), findings)
    refused = [f for f in regressed if f.key not in accept]
    if refused:
        names = ", ".join(
            f"{f.key} (want {f.recommendation.want}, found {f.found})" for f in refused
        )
        raise ConflictError(
            f"release {version.core}: the kernel hardening regressed against {baseline}: "
            f"{names}; fix it, or accept each with --accept-hardening-regression KIND:NAME"
        )
    return Audit(findings, baseline, regressed)


def record(out: Path, version: Version, audit: Audit) -> Path:
    """Write the release's report (the next release's baseline)."""
    path = report_path(out, version)
    text = json.dumps(audit.to_json(), indent=1, sort_keys=True) + "\n"
    replace_whole(path, text.encode(), 0o644)
    return path
