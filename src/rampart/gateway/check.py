"""Check a rendered gateway with the real tools.

- MANIFEST: every file it lists is there with the same SHA-256 (nothing edited or
  lost since `render`);
- every nftables ruleset: `nft -c -f` (the parser and the kernel's checks), then a
  real load into a scratch network namespace (`unshare --net`), which also catches
  what `nft -c` lets through, such as an expression in a hook that cannot have it;
- the shell scripts: `sh -n`;
- swanctl.conf: loaded into a throwaway charon (its own network and mount
  namespaces, its own vici socket, the gateway's plugin list) with
  `swanctl --load-conns`; it must say it loaded every connection and nothing
  failed. swanctl exits 0 after a syntax error, so its output is what counts.

Needs root (network namespaces), nft, swanctl and /usr/lib/ipsec/charon. User names
in the rulesets (meta skuid) must exist on the machine that checks: check on the
device, or in its image.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rampart import run
from rampart.errors import AuditError, LocalError
from rampart.gateway import description, render

# The IKE daemon to load swanctl.conf into: Debian's strongswan-charon, else
# charon-systemd (what a device running the gateway has; it runs in the foreground
# without systemd too).
CHARONS = (Path("/usr/lib/ipsec/charon"), Path("/usr/sbin/charon-systemd"))


def find_charon() -> Path:
    for path in CHARONS:
        if path.is_file():
            return path
    raise LocalError(
        f"no charon here ({', '.join(str(p) for p in CHARONS)}): install strongswan-charon "
        "or charon-systemd (`make setup` does)"
    )


# Directories swanctl reads next to the swanctl.conf given with --file.
SWANCTL_DIRS = (
    "x509",
    "x509ca",
    "x509aa",
    "x509ac",
    "x509crl",
    "x509ocsp",
    "pubkey",
    "private",
    "rsa",
    "ecdsa",
    "bliss",
    "pkcs8",
    "pkcs12",
    "conf.d",
)
CHARON_START_TIMEOUT = 20.0
_LOADED = re.compile(r"successfully loaded (\d+) connections, (\d+) unloaded")


@dataclass
class Report:
    """What was checked ("ok" lines) and what failed (problems)."""

    directory: Path
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "directory": str(self.directory),
            "ok": not self.problems,
            "checked": self.checked,
            "problems": self.problems,
        }


def read_manifest(directory: Path) -> dict[str, str]:
    """relative path -> SHA-256 hex, from DIR/MANIFEST."""
    path = directory / render.MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LocalError(
            f"{path}: no such file (is {directory} the output of `rampart gateway render`?)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"{path}: cannot read: {exc}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, _, rel = line.partition("  ")
        if (
            not re.fullmatch(r"[0-9a-f]{64}", digest)
            or not rel
            or rel.startswith("/")
            or ".." in rel.split("/")
        ):
            raise LocalError(f"{path}:{number}: not '<sha256>  <relative path>'")
        entries[rel] = digest
    return entries


def _first_error(stderr: bytes) -> str:
    """nft's first "FILE:LINE:COL: Error: MSG" line, else its last line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line
    return lines[-1] if lines else "no error output"


def check_nft(path: Path, rel: str, report: Report) -> None:
    done = run.run(["nft", "-c", "-f", str(path)], check=False)
    if done.returncode != 0:
        report.problems.append(f"{rel}: nft -c: {_first_error(done.stderr)}")
        return
    loaded = run.run(["unshare", "--net", "--", "nft", "-f", str(path)], check=False)
    if loaded.returncode != 0:
        report.problems.append(
            f"{rel}: loading into a scratch network namespace: {_first_error(loaded.stderr)}"
        )
        return
    report.checked.append(f"{rel}: nft -c, and loaded into a scratch network namespace")


def check_script(path: Path, rel: str, report: Report) -> None:
    done = run.run(["sh", "-n", str(path)], check=False)
    if done.returncode != 0:
        report.problems.append(f"{rel}: sh -n: {_first_error(done.stderr)}")
    else:
        report.checked.append(f"{rel}: sh -n")


def _strongswan_conf(work: Path) -> str:
    socket = f"unix://{work}/run/charon.vici"
    daemon = [
        "    load_modular = no",
        f"    load = {' '.join(render.CHARON_PLUGINS)}",
        "    install_routes = no",
        "    plugins {",
        f"        vici {{ socket = {socket} }}",
        "    }",
        "    filelog {",
        "        check {",
        f"            path = {work}/charon.log",
        "            default = 1",
        "        }",
        "    }",
    ]
    return "\n".join(
        [
            "# rampart gateway check: a throwaway charon (or charon-systemd)",
            "charon {",
            *daemon,
            "}",
            "charon-systemd {",
            *daemon,
            "}",
            "swanctl {",
            f"    socket = {socket}",
            # Only what reading certificates and keys needs (a missing default plugin
            # is a 'failed to load' line, not a problem of the configuration).
            "    load = random nonce openssl pem pkcs1 pkcs8 x509 pubkey",
            "}",
            "pki { plugins { tpm { load = no } } }",
            "",
        ]
    )


def check_swanctl(directory: Path, expected: int, report: Report) -> None:
    rel = render.SWANCTL_CONF
    charon_path = find_charon()
    with tempfile.TemporaryDirectory(prefix="rampart-gateway-check-") as tmp:
        work = Path(tmp)
        (work / "run").mkdir()
        conf = work / "strongswan.conf"
        conf.write_text(_strongswan_conf(work))
        swanctl = work / "swanctl"
        for name in SWANCTL_DIRS:
            (swanctl / name).mkdir(parents=True)
        shutil.copyfile(directory / rel, swanctl / "swanctl.conf")
        for sub in ("x509", "x509ca"):
            source = directory / "etc/swanctl" / sub
            if source.is_dir():
                for cert in sorted(source.iterdir()):
                    shutil.copyfile(cert, swanctl / sub / cert.name)
        env = {"STRONGSWAN_CONF": str(conf)}
        # Its own network namespace (no port taken on this machine) and mount
        # namespace, where /run is our directory: charon always writes /run/charon.pid.
        # No --fork: unshare and sh exec into charon, so the process spawned here is
        # charon itself, and terminating and reaping it leaves nothing behind.
        charon = run.spawn(
            [
                "unshare", "--net", "--mount", "--",
                "sh", "-c", 'mount --bind "$1" /run && exec "$2"', "sh",
                str(work / "run"), str(charon_path),
            ],
            env=env,
            stdout_path=work / "charon.out",
            stderr_path=work / "charon.out",
        )  # fmt: skip
        try:
            _wait_for_socket(work / "run/charon.vici", charon, work, charon_path)
            done = run.run(
                ["swanctl", "--load-conns", "--file", str(swanctl / "swanctl.conf")],
                env=env,
                check=False,
                timeout=60,
            )
        finally:
            charon.terminate()
            try:
                charon.wait(10)
            except LocalError:
                charon.kill()
                charon.wait(10)
    output = (done.stdout + done.stderr).decode(errors="replace")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    bad = [
        line
        for line in lines
        if ("failed" in line or "syntax error" in line or "invalid config" in line)
        and not line.startswith("plugin '")
    ]
    loaded = _LOADED.search(output)
    if done.returncode != 0 or bad or loaded is None or int(loaded[1]) != expected:
        why = bad[0] if bad else (lines[-1] if lines else f"exit code {done.returncode}")
        report.problems.append(f"{rel}: swanctl --load-conns into charon: {why}")
    else:
        report.checked.append(
            f"{rel}: loaded into charon ({loaded[1]} connection{'s' if expected != 1 else ''})"
        )


def _wait_for_socket(socket: Path, charon: run.Process, work: Path, path: Path) -> None:
    deadline = time.monotonic() + CHARON_START_TIMEOUT
    while not socket.exists():
        if charon.poll() is not None:
            log = (work / "charon.out").read_text(errors="replace").strip().splitlines()
            last = log[-1] if log else "no output"
            raise LocalError(f"{path}: exited before it listened for swanctl: {last}")
        if time.monotonic() > deadline:
            raise LocalError(f"{path}: no vici socket after {CHARON_START_TIMEOUT:g} s")
        time.sleep(0.05)


_SETTING = re.compile(r"^\s*(version|proposals|esp_proposals|auth)\s*=\s*(.*?)\s*$")


def audit_swanctl(text: str, report: Report) -> None:
    """The policy, again, on the file itself (an edit after `render` must not slip a
    weak suite or IKEv1 past charon, which would accept them)."""
    rel = render.SWANCTL_CONF
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        found = _SETTING.match(line)
        if not found:
            continue
        key, value = found[1], found[2]
        if key == "version" and value != "2":
            problems.append(f"{rel}:{number}: version = {value}: only IKEv2 is allowed")
        elif key in ("proposals", "esp_proposals"):
            allowed = description.IKE_PROPOSALS if key == "proposals" else description.ESP_PROPOSALS
            for proposal in value.split(","):
                if proposal.strip() not in allowed:
                    problems.append(
                        f"{rel}:{number}: {key}: {proposal.strip()!r} is not an allowed suite"
                    )
        elif key == "auth" and value not in ("pubkey", "psk"):
            problems.append(f"{rel}:{number}: auth = {value}: only pubkey (or psk) is allowed")
    if "version = 2" not in text:
        problems.append(f"{rel}: no connection says version = 2")
    report.problems += problems
    if not problems:
        report.checked.append(f"{rel}: IKEv2 only, allowed suites only")


def check(directory: Path) -> Report:
    """Check everything; raise AuditError listing the problems, if any."""
    report = Report(directory)
    manifest = read_manifest(directory)
    for rel, digest in sorted(manifest.items()):
        path = directory / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            report.problems.append(f"{rel}: missing (listed in MANIFEST)")
            continue
        except OSError as exc:
            report.problems.append(f"{rel}: cannot read: {exc.strerror}")
            continue
        if hashlib.sha256(data).hexdigest() != digest:
            report.problems.append(f"{rel}: changed since it was rendered (SHA-256 differs)")
    present = {rel for rel in manifest if (directory / rel).is_file()}
    for rel in sorted(present):
        if rel.endswith(".nft"):
            check_nft(directory / rel, rel, report)
        elif rel in (render.TUNNEL_UP, render.TUNNEL_DOWN):
            check_script(directory / rel, rel, report)
    if render.SWANCTL_CONF in present:
        text = (directory / render.SWANCTL_CONF).read_text(errors="replace")
        expected = len(re.findall(r"^        children \{$", text, re.MULTILINE))
        audit_swanctl(text, report)
        check_swanctl(directory, expected, report)
    else:
        report.problems.append(f"{render.SWANCTL_CONF}: missing")
    if report.problems:
        raise AuditError(
            f"{directory}: {len(report.problems)} problem(s) in the rendered gateway",
            report.problems,
        )
    return report
