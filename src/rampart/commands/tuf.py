"""The TUF repository's verbs (the vendor's): keys, the repository, its key ceremonies,
signatures made offline, releases, the timer's re-signing, and its status.

`rampart tuf keygen|init|add-release|timestamp|status`, `tuf key add|revoke|rotate`,
`tuf root rotate`, `tuf sign export|add|import|discard`. The repository lives in
`<webroot>/tuf/` (docs/tuf.md); the logic is rampart.release.tufrepo's, imported when a
verb runs (python-tuf is not loaded to declare the verbs).

Passwords: a key file's password comes from `--password-file FILE` (mode 0600), else
$RAMPART_TUF_PASSWORD, else a prompt on the terminal, one per encrypted key; it is
never printed, logged or written anywhere. Every verb that writes metadata holds the
repository's lock and checks everything (roles, keyids, thresholds, passwords, the
signatures at hand) before the first file is written.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rampart import files
from rampart.commands.common import (
    JSON,
    Arg,
    Group,
    Verb,
    arg,
    check_semver,
    count,
    print_json,
)
from rampart.contracts import wire
from rampart.contracts.tuf import CHANNEL_PATTERN
from rampart.contracts.version import parse_version
from rampart.errors import (
    AuditError,
    ConflictError,
    IncompleteError,
    LocalError,
    RampartError,
    UsageError,
)

if TYPE_CHECKING:
    from securesystemslib.signer import Signer

    from rampart.release.tufrepo import Ceremony, KeyFile

ROLES = ("root", "targets", "snapshot", "timestamp", "channels")
PASSWORD_ENV = "RAMPART_TUF_PASSWORD"  # noqa: S105 - a variable's name (contracts.tufrepo's)
SHORT = 16  # the hex digits of a keyid shown in text output


# --- passwords and keys ------------------------------------------------------------------


class Passwords:
    """The password of each encrypted key file: `--password-file`, else
    $RAMPART_TUF_PASSWORD, else asked on the terminal (one prompt per key file)."""

    def __init__(self, password_file: Path | None) -> None:
        self.password_file = password_file

    def __call__(self, path: Path) -> bytes:
        from rampart.contracts.tufrepo import read_password

        given = read_password(self.password_file)
        if given:
            return given
        if sys.stdin.isatty():
            typed = getpass.getpass(f"Password of {path}: ")
            if typed:
                return typed.encode()
        raise LocalError(
            f"{path}: the key is encrypted and no password is given "
            f"(--password-file FILE, ${PASSWORD_ENV}, or run on a terminal)"
        )


def new_password(password_file: Path | None, no_password: bool) -> bytes | None:
    """The password a new key is encrypted with; None only with --no-password."""
    from rampart.contracts.tufrepo import read_password

    if no_password:
        if password_file is not None:
            raise UsageError("--no-password and --password-file exclude each other")
        return None
    given = read_password(password_file)
    if given:
        return given
    if not sys.stdin.isatty():
        raise LocalError(
            f"no password: give --password-file FILE, set ${PASSWORD_ENV}, run on a "
            "terminal, or write the key unencrypted with --no-password"
        )
    first = getpass.getpass("Password of the new key: ")
    if not first:
        raise LocalError("empty password (use --no-password for a key without one)")
    if getpass.getpass("Password (again): ") != first:
        raise LocalError("the two passwords differ")
    return first.encode()


def load_keys(paths: Sequence[Path], password_file: Path | None) -> list[KeyFile]:
    """The key files, each read once (a path given twice is read once)."""
    from rampart.release import tufrepo

    passwords = Passwords(password_file)
    return [tufrepo.read_key(path, passwords) for path in dict.fromkeys(paths)]


def signers(keys: Sequence[KeyFile]) -> list[Signer]:
    return [key.signer for key in keys if key.signer is not None]


def repository(webroot: Path) -> None:
    """LocalError unless `webroot` has a TUF repository."""
    if not (webroot / "tuf" / "1.root.json").is_file():
        raise LocalError(f"{webroot}: no TUF repository in {webroot / 'tuf'} (rampart tuf init)")


def short(keyid: str) -> str:
    return keyid[:SHORT]


# --- argument types ----------------------------------------------------------------------


def days(text: str) -> int:
    """A lifetime in days on the command line: 1 to 3650."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 3650:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days from 1 to 3650")
    return int(text)


def lifetime(text: str) -> int:
    """The timestamp's lifetime on the command line: 60 seconds to 30 days."""
    if not text.isascii() or not text.isdigit() or not 60 <= int(text) <= 30 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 60 to 2592000 seconds")
    return int(text)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"{role[:40]!r}: not a role (one of {', '.join(ROLES)})")
    return role


def expires(args: argparse.Namespace) -> datetime.timedelta | None:
    return None if args.expires is None else datetime.timedelta(days=args.expires)


# --- keygen, init ------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    keyfile: Path = args.keyfile
    public_file = keyfile.with_name(keyfile.name + ".pub")
    for path in (keyfile, public_file):
        if path.exists() or path.is_symlink():
            raise ConflictError(f"{path}: already exists; refusing to overwrite a key")
    password = new_password(args.password_file, args.no_password)
    key = tufrepo.generate_key(keyfile, password)
    try:
        files.write_new_file(public_file, tufrepo.public_pem(key), 0o644)
    except RampartError:
        keyfile.unlink()
        raise
    if args.json:
        print_json(
            {
                "keyid": key.keyid,
                "keytype": key.keytype,
                "scheme": key.scheme,
                "public": key.keyval["public"],
                "key_file": str(keyfile),
                "public_key_file": str(public_file),
                "encrypted": password is not None,
            }
        )
    else:
        state = "encrypted" if password is not None else "NOT encrypted"
        print(f"keyid {key.keyid}")
        print(f"public key (ed25519) {key.keyval['public']}")
        print(f"{keyfile}: private key, mode 0600, {state}; {public_file}: public key")
    return 0


def _online(args: argparse.Namespace, role: str) -> list[Path]:
    given: list[Path] | None = getattr(args, f"{role}_key") or args.online_key
    if not given:
        raise UsageError(f"no key for {role}: give --online-key FILE (or --{role}-key FILE)")
    return given


def cmd_init(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    webroot: Path = args.webroot
    if not webroot.is_dir():
        raise LocalError(f"{webroot}: not a directory (the webroot of `rampart publish`)")
    if (tufrepo.metadata_dir(webroot) / "1.root.json").exists():
        raise ConflictError(f"{tufrepo.metadata_dir(webroot)}: a TUF repository is already there")
    paths = {
        "root": list(args.root_key),
        "targets": list(args.targets_key),
        **{role: _online(args, role) for role in ("snapshot", "timestamp", "channels")},
    }
    if not 1 <= args.threshold <= len(set(paths["root"])):
        raise UsageError(
            f"--threshold {args.threshold}: must be from 1 to the {len(set(paths['root']))} "
            "root keys given"
        )
    loaded = {
        key.path: key
        for key in load_keys([p for v in paths.values() for p in v], args.password_file)
    }
    by_role = {role: [loaded[p] for p in dict.fromkeys(v)] for role, v in paths.items()}
    keys = tufrepo.Keys(
        root=[key.public for key in by_role["root"]],
        targets=[key.public for key in by_role["targets"]],
        snapshot=[key.public for key in by_role["snapshot"]],
        timestamp=[key.public for key in by_role["timestamp"]],
        root_threshold=args.threshold,
        channels=[key.public for key in by_role["channels"]],
    )
    tufrepo.create(webroot, keys, {role: signers(v) for role, v in by_role.items()})
    report: dict[str, dict[str, Any]] = {
        role: {
            "keyids": [key.public.keyid for key in v],
            "threshold": args.threshold if role == "root" else 1,
        }
        for role, v in by_role.items()
    }
    if args.json:
        print_json(
            {
                "webroot": str(webroot),
                "repository": str(tufrepo.metadata_dir(webroot)),
                "roles": report,
            }
        )
    else:
        print(f"{tufrepo.metadata_dir(webroot)}: a new TUF repository, version 1 of every role")
        for role, info in report.items():
            ids = ", ".join(short(keyid) for keyid in info["keyids"])
            print(f"  {role:<9} {info['threshold']} of {len(info['keyids'])}: {ids}")
    return 0


# --- key ceremonies ----------------------------------------------------------------------


def _finish(args: argparse.Namespace, what: str, ceremony: Ceremony, pool: list[Signer]) -> int:
    """Sign `ceremony` with the keys at hand, publish it if nothing is missing; else stage
    it with --stage, or refuse (IncompleteError, nothing written)."""
    from rampart.release import tufrepo

    tufrepo.sign_ceremony(args.webroot, ceremony, pool)
    missing = tufrepo.missing(args.webroot, ceremony, pool)
    written: dict[str, int] = {}
    if not missing:
        written = tufrepo.publish(args.webroot, ceremony, pool)
    elif args.stage:
        tufrepo.stage(args.webroot, ceremony)
    else:
        lines = "; ".join(str(s) for s in missing)
        raise IncompleteError(
            f"{what}: not published, nothing written: {lines} (give the keys with --key, or "
            "keep it for signatures made elsewhere with --stage)"
        )
    _report(args, what, ceremony, written, missing)
    return 0


def _report(
    args: argparse.Namespace,
    what: str,
    ceremony: Ceremony,
    written: dict[str, int],
    missing: Sequence[Any],
) -> None:
    staged = [] if written else ceremony.names()
    if args.json:
        print_json(
            {
                "webroot": str(args.webroot),
                "ceremony": what,
                "published": bool(written),
                "versions": written,
                "staged": staged,
                "signed_by": ceremony.signed_by,
                "missing": [s.to_json() for s in missing],
            }
        )
        return
    if written:
        done = ", ".join(f"{role} {version}" for role, version in written.items())
        print(f"{what}: published {done}")
        return
    print(f"{what}: staged {', '.join(staged)} in {args.webroot / 'tuf' / 'staged'}")
    for shortfall in missing:
        print(f"  still needed: {shortfall}")
    print(
        "  next: rampart tuf sign export, sign add on each key holder's machine, "
        "then rampart tuf sign import"
    )


def _ceremony_keys(args: argparse.Namespace, extra: Sequence[Path] = ()) -> list[KeyFile]:
    return load_keys([*extra, *args.key], args.password_file)


def cmd_key_add(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    role = check_role(args.role)
    repository(args.webroot)
    keys = _ceremony_keys(args, [args.keyfile])
    new = keys[0]
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.change_keys(
            args.webroot, role, add=[new.public], threshold=args.threshold, expires=expires(args)
        )
        return _finish(args, f"key add {role} {short(new.public.keyid)}", ceremony, signers(keys))


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    role = check_role(args.role)
    repository(args.webroot)
    keyid = tufrepo.resolve_keyid(args.webroot, role, args.keyid)
    keys = _ceremony_keys(args)
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.change_keys(
            args.webroot, role, revoke=[keyid], threshold=args.threshold, expires=expires(args)
        )
        return _finish(args, f"key revoke {role} {short(keyid)}", ceremony, signers(keys))


def cmd_key_rotate(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    role = check_role(args.role)
    repository(args.webroot)
    old = tufrepo.resolve_keyid(args.webroot, role, args.old_keyid)
    keys = _ceremony_keys(args, [args.new_keyfile])
    new = keys[0]
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.change_keys(
            args.webroot,
            role,
            add=[new.public],
            revoke=[old],
            threshold=args.threshold,
            expires=expires(args),
        )
        what = f"key rotate {role} {short(old)} -> {short(new.public.keyid)}"
        return _finish(args, what, ceremony, signers(keys))


def cmd_root_rotate(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    repository(args.webroot)
    keys = _ceremony_keys(args)
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.rotate_root(args.webroot, args.threshold, expires(args))
        return _finish(args, "root rotate", ceremony, signers(keys))


# --- offline signatures ------------------------------------------------------------------


def _describe(md: Any) -> list[str]:
    """What a root or targets metadata says, for the person about to sign it."""
    signed = md.signed
    lines = [f"{signed.type} version {signed.version}, expires {signed.expires:%Y-%m-%d %H:%M} UTC"]
    if signed.type == "root":
        for role, entry in signed.roles.items():
            ids = ", ".join(short(keyid) for keyid in entry.keyids)
            lines.append(f"  {role:<9} {entry.threshold} of {len(entry.keyids)}: {ids}")
    else:
        lines.append(f"  {len(signed.targets)} target(s)")
        delegations = signed.delegations
        for name, entry in (delegations.roles or {}).items() if delegations else ():
            ids = ", ".join(short(keyid) for keyid in entry.keyids)
            lines.append(f"  delegates {name}: {entry.threshold} of {len(entry.keyids)}: {ids}")
    lines.append(f"  signatures: {', '.join(short(k) for k in md.signatures) or 'none'}")
    return lines


def cmd_sign_export(args: argparse.Namespace) -> int:
    from rampart.contracts.tufrepo import SERIALIZER
    from rampart.release import tufrepo

    if args.role not in ("root", "targets"):
        raise UsageError(f"{args.role[:40]!r}: only root and targets are signed offline")
    repository(args.webroot)
    if args.out.exists() or args.out.is_symlink():
        raise ConflictError(f"{args.out}: already exists; refusing to overwrite it")
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.staged(args.webroot)
        if ceremony is None:
            ceremony = tufrepo.next_version(args.webroot, args.role, expires(args))
            tufrepo.stage(args.webroot, ceremony)
        md = ceremony.root if args.role == "root" else ceremony.targets
        if md is None:
            raise ConflictError(
                f"{tufrepo.staged_dir(args.webroot)}: the staged ceremony has no {args.role} "
                f"({', '.join(ceremony.names())})"
            )
        missing = tufrepo.shortfalls(args.webroot, ceremony)
        files.write_new_file(args.out, md.to_bytes(SERIALIZER), 0o644)
    if args.json:
        print_json(
            {
                "file": str(args.out),
                "role": md.signed.type,
                "version": md.signed.version,
                "signed_by": list(md.signatures),
                "missing": [s.to_json() for s in missing],
            }
        )
    else:
        print(f"{args.out}: {md.signed.type} {md.signed.version} to sign")
        for shortfall in missing:
            print(f"  still needed: {shortfall}")
    return 0


def cmd_sign_add(args: argparse.Namespace) -> int:
    from rampart.contracts.tufrepo import read_metadata, write_to

    md = read_metadata(args.file)
    if md.signed.type not in ("root", "targets"):
        raise UsageError(f"{args.file}: {md.signed.type} metadata is signed online, not here")
    keys = load_keys(args.key, args.password_file)
    for key in keys:
        if key.signer is None:
            raise UsageError(f"{key.path}: a public key cannot sign (give the private key)")
        md.sign(key.signer, append=True)
    write_to(args.file, md)
    added = [key.public.keyid for key in keys]
    if args.json:
        print_json(
            {
                "file": str(args.file),
                "role": md.signed.type,
                "version": md.signed.version,
                "added": added,
                "signatures": list(md.signatures),
            }
        )
    else:
        print(f"{args.file}: signed by {', '.join(short(k) for k in added)}")
        for line in _describe(md):
            print(f"  {line}")
    return 0


def cmd_sign_import(args: argparse.Namespace) -> int:
    from rampart.contracts.tufrepo import read_metadata
    from rampart.release import tufrepo

    repository(args.webroot)
    copies = [(path, read_metadata(path)) for path in args.files]
    keys = load_keys(args.key, args.password_file)
    with tufrepo.locked(args.webroot):
        ceremony = tufrepo.staged(args.webroot)
        if ceremony is None:
            raise ConflictError(f"{args.webroot}: no key ceremony is staged")
        merged: list[str] = []
        ignored: list[str] = []
        for path, md in copies:
            added, skipped = tufrepo.merge(args.webroot, ceremony, md, str(path))
            merged += added
            ignored += skipped
        signed_here = tufrepo.sign_ceremony(args.webroot, ceremony, signers(keys))
        missing = tufrepo.missing(args.webroot, ceremony, signers(keys))
        if missing:
            tufrepo.stage(args.webroot, ceremony)
            lines = "; ".join(str(s) for s in missing)
            raise IncompleteError(
                f"not published: {lines} (the signatures so far are kept in "
                f"{tufrepo.staged_dir(args.webroot)})"
            )
        written = tufrepo.publish(args.webroot, ceremony, signers(keys))
    if ignored and not args.json:
        print(
            f"ignored: signatures of keys that do not sign these: {', '.join(map(short, ignored))}"
        )
    if args.json:
        print_json(
            {
                "webroot": str(args.webroot),
                "published": True,
                "versions": written,
                "merged": list(dict.fromkeys(merged)),
                "signed_by": signed_here,
                "ignored": list(dict.fromkeys(ignored)),
            }
        )
    else:
        print(f"published {', '.join(f'{r} {v}' for r, v in written.items())}")
    return 0


def cmd_sign_discard(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    repository(args.webroot)
    with tufrepo.locked(args.webroot):
        removed = tufrepo.discard(args.webroot)
    if args.json:
        print_json({"webroot": str(args.webroot), "discarded": removed})
    else:
        print(f"discarded: {', '.join(removed)}" if removed else "nothing was staged")
    return 0


# --- releases, the timer, status ---------------------------------------------------------


def add_release_keys(
    targets_keys: Sequence[Path], online_keys: Sequence[Path], password_file: Path | None
) -> list[Signer]:
    """The signers of a release's targets, snapshot and timestamp, read before anything
    is published (a wrong password fails first)."""
    return signers(load_keys([*targets_keys, *online_keys], password_file))


def add_release(
    webroot: Path, os_name: str, version: str, pool: Sequence[Signer]
) -> dict[str, Any]:
    """Add a published release to the repository's targets (also `rampart publish`'s
    hook); what was signed. A release already there is left as it is."""
    from tuf.api.metadata import Targets

    from rampart.contracts import tuf
    from rampart.contracts.tufrepo import latest
    from rampart.release import tufrepo

    parsed = parse_version(version)
    with tufrepo.locked(webroot):
        by_role = tufrepo.signers_for(webroot, pool)
        tufrepo.check_release_signers(webroot, by_role)
        current: Targets = latest(tufrepo.metadata_dir(webroot), "targets").signed
        paths = [tuf.payload_target(os_name, parsed, kind) for kind in wire.PAYLOADS]
        if all(path in current.targets for path in paths):
            return {"targets": paths, "targets_version": current.version, "added": False}
        signed = tufrepo.add_release(webroot, os_name, parsed, by_role)
    release = wire.release_dir(webroot, parsed)
    paths += [tuf.document_target(parsed, name) for name, _ in tufrepo.documents(release, os_name)]
    return {"targets": paths, "targets_version": signed.version, "added": True}


def cmd_add_release(args: argparse.Namespace) -> int:
    check_semver(args.version)
    wire.check_name(args.os, "OS name")
    repository(args.webroot)
    pool = add_release_keys(args.targets_key, args.online_key, args.password_file)
    result = add_release(args.webroot, args.os, args.version, pool)
    if args.json:
        print_json({"webroot": str(args.webroot), "os": args.os, "version": args.version, **result})
    elif result["added"]:
        added = ", ".join(result["targets"])
        print(f"{args.os} {args.version}: targets {result['targets_version']}: {added}")
    else:
        print(f"{args.os} {args.version}: already targets (targets {result['targets_version']})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from rampart.release import tufrepo

    wire.check_name(args.os, "OS name")
    repository(args.webroot)
    pool = add_release_keys(args.targets_key, args.online_key, args.password_file)
    with tufrepo.locked(args.webroot):
        by_role = tufrepo.signers_for(args.webroot, pool)
        tufrepo.check_release_signers(args.webroot, by_role)
        removed, signed = tufrepo.prune_releases(args.webroot, args.os, args.keep, by_role)
    if args.json:
        print_json(
            {
                "webroot": str(args.webroot),
                "os": args.os,
                "removed": removed,
                "targets_version": None if signed is None else signed.version,
            }
        )
    elif removed and signed is not None:
        print(f"{args.os}: targets {signed.version} no longer lists {', '.join(removed)}")
    else:
        print(f"{args.os}: nothing to prune")
    return 0


def cmd_timestamp(args: argparse.Namespace) -> int:
    from rampart.contracts.tufrepo import refresh
    from rampart.release import tufrepo

    repository(args.webroot)
    pool = signers(load_keys(args.online_key, args.password_file))
    with tufrepo.locked(args.webroot):
        done = refresh(
            args.webroot,
            tufrepo.signers_for(args.webroot, pool),
            datetime.timedelta(seconds=args.expires),
        )
    signed = {"timestamp": done.timestamp.version}
    if done.snapshot is not None:
        signed["snapshot"] = done.snapshot.version
    if done.channels is not None:
        signed["channels"] = done.channels.version
    expiry = done.timestamp.expires.isoformat().replace("+00:00", "Z")
    if args.json:
        print_json({"webroot": str(args.webroot), "signed": signed, "timestamp_expires": expiry})
    else:
        done_list = ", ".join(f"{role} {version}" for role, version in signed.items())
        print(f"signed {done_list}; the timestamp expires {expiry}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rampart.release import tufstatus

    found = tufstatus.status(args.webroot, warn=datetime.timedelta(days=args.warn_days))
    if args.json:
        print_json(found.to_json())
        return AuditError.exit_code if found.problems else 0
    print(f"{args.webroot / 'tuf'}: root versions 1 to {found.root_versions}")
    for role in found.roles:
        keyids = ", ".join(short(k) for k in role.keyids)
        print(
            f"  {role.role:<9} version {role.version:<4} "
            f"expires {role.expires:%Y-%m-%d %H:%M} UTC  {role.threshold} of "
            f"{len(role.keyids)} keys, signed by {len(role.signed_by)}: {keyids}"
        )
    if found.staged:
        print(f"  staged: {', '.join(found.staged)}")
        for shortfall in found.missing:
            print(f"    still needed: {shortfall}")
    if found.problems:
        raise AuditError(
            f"{args.webroot / 'tuf'}: {len(found.problems)} problem(s) found", found.problems
        )
    print("  the chain verifies; nothing expires within the warning windows")
    return 0


# --- the verbs ---------------------------------------------------------------------------


def key_files(flag: str, help_text: str, **options: Any) -> Arg:
    """A repeatable option naming key files (`FILE`, a list of paths)."""
    return arg(flag, type=Path, action="append", metavar="FILE", help=help_text, **options)


PASSWORD_FILE = arg(
    "--password-file",
    type=Path,
    metavar="FILE",
    help=f"the keys' password: the first line of FILE (mode 0600); else ${PASSWORD_ENV}; "
    "else asked on the terminal for each encrypted key",
)
RELEASE_KEYS = (
    key_files(
        "--targets-key",
        "a release key (repeatable)",
        required=True,
    ),
    key_files(
        "--online-key",
        "the snapshot and timestamp key(s)",
        required=True,
    ),
)
WEBROOT = arg(
    "webroot", type=Path, metavar="WEBROOT", help="the webroot (its repository: WEBROOT/tuf)"
)
KEYS = key_files(
    "--key",
    "a private key at hand (repeatable): each signs whatever the ceremony needs that it "
    "may sign (old and new root, targets, and the online roles it makes stale)",
    default=[],
)
STAGE = arg(
    "--stage",
    action="store_true",
    help="when the keys at hand do not meet every threshold, keep the ceremony in "
    "WEBROOT/tuf/staged/ for signatures made elsewhere (sign export, sign add, sign import) "
    "instead of refusing",
)
THRESHOLD = arg(
    "--threshold", type=count, metavar="K", help="the role's new threshold (default: unchanged)"
)
EXPIRES_DAYS = arg(
    "--expires", type=days, metavar="DAYS", help="the new root's lifetime (default 365 days)"
)
ROLE = arg("role", metavar="ROLE", help=f"one of {', '.join(ROLES)}")
CEREMONY = (KEYS, THRESHOLD, EXPIRES_DAYS, STAGE, PASSWORD_FILE, JSON)
ROOT_ROTATION = (
    "Keys of root, targets, snapshot and timestamp are listed in root: changing them makes "
    "root version N+1, which must be signed by a threshold of root N's root keys and a "
    "threshold of its own (TUF 1.0 5.3.4). The channels role's keys are listed in the targets "
    "metadata: changing them makes a new targets version, signed by the targets keys. "
    "Metadata left signed by a revoked key, or short of a new threshold, is re-signed as a "
    "new version (targets by the targets keys; channels, snapshot and timestamp by the "
    "online keys given with --key). Refused, with nothing written, if a role would have "
    "fewer keys than its threshold, or if the keys at hand do not meet every threshold "
    "(unless --stage)."
)

VERBS: list[Group | Verb] = [
    Group(
        ("tuf",),
        "the TUF repository beside a webroot: keys, ceremonies, signatures",
        "The Update Framework repository in WEBROOT/tuf/ (docs/tuf.md): create it, add "
        "releases, change its keys in ceremonies, sign offline, keep its timestamp fresh, "
        "check it.",
        dest="tuf_verb",
    ),
    Verb(
        ("tuf", "keygen"),
        "create an Ed25519 key for a TUF role",
        "Write KEYFILE, a new Ed25519 private key (PEM, PKCS#8, encrypted with the password, "
        "mode 0600), and KEYFILE.pub, its public key (PEM, for ceremonies held elsewhere); "
        "print its keyid. Neither file may exist: a key is never overwritten.",
        cmd_keygen,
        (
            arg("keyfile", type=Path, metavar="KEYFILE"),
            PASSWORD_FILE,
            arg(
                "--no-password",
                action="store_true",
                help="write the key unencrypted (an online key whose file only its service reads)",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "init"),
        "create the TUF repository of a webroot",
        "Create WEBROOT/tuf/: root version 1 (the --root-key keys, signed by at least "
        "--threshold of them), targets (the release keys), the channels role targets "
        f"delegates {CHANNEL_PATTERN} to, snapshot and timestamp; each role's first version "
        "signed by its keys. A key file is a private key (KEYFILE) or, for a root key held "
        "elsewhere, its public key (KEYFILE.pub). An online key (snapshot, timestamp, "
        "channels) may not be a root or targets key.",
        cmd_init,
        (
            WEBROOT,
            key_files(
                "--root-key",
                "a root key (repeatable)",
                required=True,
            ),
            arg(
                "--threshold",
                type=count,
                required=True,
                metavar="K",
                help="root keys needed to sign a root",
            ),
            RELEASE_KEYS[0],  # --targets-key
            key_files(
                "--online-key",
                "the key of snapshot, timestamp and channels (the server's)",
            ),
            key_files(
                "--snapshot-key",
                "snapshot's own key",
            ),
            key_files(
                "--timestamp-key",
                "timestamp's own key",
            ),
            key_files(
                "--channels-key",
                "the channels role's own key",
            ),
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Group(
        ("tuf", "key"),
        "add, revoke or rotate a role's key",
        "A role's keys: " + ROOT_ROTATION,
        dest="tuf_key_verb",
    ),
    Verb(
        ("tuf", "key", "add"),
        "add a key to a role",
        "Add KEYFILE's key (a private key, or a public key KEYFILE.pub) to ROLE. " + ROOT_ROTATION,
        cmd_key_add,
        (WEBROOT, ROLE, arg("keyfile", type=Path, metavar="KEYFILE"), *CEREMONY),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "key", "revoke"),
        "revoke a role's key",
        "Remove the key KEYID (its keyid, or a prefix of 8 hex digits or more) from ROLE; its "
        "signatures no longer count. " + ROOT_ROTATION,
        cmd_key_revoke,
        (WEBROOT, ROLE, arg("keyid", metavar="KEYID"), *CEREMONY),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "key", "rotate"),
        "replace a role's key by a new one",
        "Revoke OLD_KEYID from ROLE and add NEW_KEYFILE's key, in one version. " + ROOT_ROTATION,
        cmd_key_rotate,
        (
            WEBROOT,
            ROLE,
            arg("old_keyid", metavar="OLD_KEYID"),
            arg("new_keyfile", type=Path, metavar="NEW_KEYFILE"),
            *CEREMONY,
        ),
        exit_codes=True,
    ),
    Group(("tuf", "root"), "a new root version", "A new root version.", dest="tuf_root_verb"),
    Verb(
        ("tuf", "root", "rotate"),
        "sign a new root version (new expiry, new threshold)",
        "Make root version N+1 with the same keys, a new expiry (--expires) and, with "
        "--threshold, a new root threshold; signed by a threshold of root N's keys and of "
        "its own. Do it before root expires.",
        cmd_root_rotate,
        (
            WEBROOT,
            KEYS,
            arg(
                "--threshold",
                type=count,
                metavar="K",
                help="the new root threshold (default: unchanged)",
            ),
            EXPIRES_DAYS,
            STAGE,
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Group(
        ("tuf", "sign"),
        "sign root or targets offline, by key holders who never share keys",
        "Sign a staged ceremony's metadata on machines that never see each other's keys: "
        "export it, have each holder add a signature, import the copies.",
        dest="tuf_sign_verb",
    ),
    Verb(
        ("tuf", "sign", "export"),
        "write the staged root or targets to sign",
        "Write the staged ROLE metadata (root or targets) to --out, with the signatures "
        "collected so far. With nothing staged, stage ROLE's next version first: the same "
        "content with a new expiry (--expires, for root).",
        cmd_sign_export,
        (
            WEBROOT,
            arg("role", metavar="ROLE", help="root or targets"),
            arg("--out", type=Path, required=True, metavar="FILE", help="never overwritten"),
            arg(
                "--expires",
                type=days,
                metavar="DAYS",
                help="lifetime of a new version (default 365 days)",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "sign", "add"),
        "add a signature to an exported metadata file",
        "Sign FILE (an exported root or targets) with each --key, in place (written through a "
        "temporary file renamed over it), and show what it says: what you are signing. Needs "
        "no webroot: run it on the key holder's offline machine.",
        cmd_sign_add,
        (
            arg("file", type=Path, metavar="FILE"),
            key_files(
                "--key",
                "a private key (repeatable)",
                required=True,
            ),
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "sign", "import"),
        "merge signatures into the staged ceremony and publish it",
        "Merge the signatures of each FILE (copies of the staged metadata, signed elsewhere) "
        "into the staged ceremony, sign with the --key keys at hand (the online keys too), and "
        "publish once every threshold is met. Otherwise keep the signatures in staged/ and "
        "exit 7, naming how many signatures of which keys are still needed. A copy that "
        "signs other content, or carries a signature that does not verify, is refused.",
        cmd_sign_import,
        (WEBROOT, arg("files", type=Path, nargs="*", metavar="FILE"), KEYS, PASSWORD_FILE, JSON),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "sign", "discard"),
        "discard the staged ceremony",
        "Remove WEBROOT/tuf/staged/ and the ceremony it holds, with the signatures "
        "collected so far: a ceremony abandoned. The published metadata is unchanged.",
        cmd_sign_discard,
        (WEBROOT, JSON),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "add-release"),
        "add a published release to the TUF targets",
        "Add VERSION of --os (published by `rampart publish`: its dist/ payloads) as targets, "
        "with the custom fields a device checks (OS, kind, version, security epoch, verity "
        "parameters); sign a new targets with the release keys, then a new snapshot and "
        "timestamp with the online keys. A release already there is left as it is.",
        cmd_add_release,
        (
            WEBROOT,
            arg("version", metavar="VERSION"),
            arg("--os", required=True, metavar="NAME", help="OS name, e.g. clipos"),
            *RELEASE_KEYS,
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "prune"),
        "keep only the newest releases as targets",
        "Remove from the targets role every release of --os but the --keep newest and those "
        "a signed channel head names (its version or its rollout): a device fetches the whole "
        "targets metadata after each release (about 1 kB a release), so it must stay bounded. "
        "The payload files stay in the webroot; a device refuses a pruned version as software "
        "the release keys did not sign. Signed like add-release: a new targets version with "
        "the release keys, then a snapshot and a timestamp with the online keys.",
        cmd_prune,
        (
            WEBROOT,
            arg("--os", required=True, metavar="NAME", help="OS name, e.g. clipos"),
            arg(
                "--keep",
                type=int,
                required=True,
                metavar="N",
                help="how many of the newest releases stay targets (at least 1)",
            ),
            *RELEASE_KEYS,
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "timestamp"),
        "re-sign the timestamp (and what is near its expiry): a timer's job",
        "Re-sign the timestamp, valid for --expires seconds; first re-sign the channels "
        "metadata and the snapshot if they expire within half their lifetime (7 days). What "
        "rampart-tuf-timestamp.timer runs for a static webroot.",
        cmd_timestamp,
        (
            WEBROOT,
            key_files(
                "--online-key",
                "the online key(s): timestamp, snapshot, channels",
                required=True,
            ),
            arg(
                "--expires",
                type=lifetime,
                default=86400,
                metavar="SECONDS",
                help="the timestamp's lifetime (default 86400, a day)",
            ),
            PASSWORD_FILE,
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("tuf", "status"),
        "show and check the TUF repository",
        "Show each role's version, expiry, keys and threshold, and check the whole chain as a "
        "client would: root 1 to N, each signed by a threshold of the previous root's keys and "
        "its own; timestamp, snapshot, targets and channels signed by their thresholds, each "
        "naming the latest version of the next; none expired. Exit 5 if anything is wrong or "
        "expires within the warning window: --warn-days for root and targets, a quarter of "
        "their lifetime for the online roles (6 hours of a timestamp).",
        cmd_status,
        (
            WEBROOT,
            arg(
                "--warn-days",
                type=days,
                default=30,
                metavar="DAYS",
                help="warn when root or targets expire within DAYS (default 30)",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
]


def hook_args() -> tuple[Arg, ...]:
    """The flags `rampart publish` and `rampart release` take to add the release to the
    webroot's TUF repository as well."""
    return (
        key_files(
            "--tuf-targets-key",
            "also add the release to WEBROOT/tuf as targets, signed by this release key "
            "(repeatable)",
            default=[],
        ),
        key_files(
            "--tuf-online-key",
            "the TUF snapshot and timestamp key, with --tuf-targets-key",
            default=[],
        ),
        arg(
            "--tuf-password-file",
            type=Path,
            metavar="FILE",
            help=f"the TUF keys' password (else ${PASSWORD_ENV} or the terminal)",
        ),
    )


def hook_prepare(args: argparse.Namespace) -> Callable[[], dict[str, Any] | None]:
    """Before `publish` writes anything: read the TUF keys (a wrong password, a missing
    repository or key fails first); returns what adds the release after publishing."""
    if not args.tuf_targets_key and not args.tuf_online_key:
        return lambda: None
    if not args.tuf_targets_key or not args.tuf_online_key:
        raise UsageError("--tuf-targets-key and --tuf-online-key go together")
    from rampart.release import tufrepo

    repository(args.webroot)
    pool = add_release_keys(args.tuf_targets_key, args.tuf_online_key, args.tuf_password_file)
    tufrepo.check_release_signers(args.webroot, tufrepo.signers_for(args.webroot, pool))
    return lambda: add_release(args.webroot, args.os, args.version, pool)
