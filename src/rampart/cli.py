"""The `rampart` command: parses flags, calls one function, maps errors to exit codes.

Exit codes are those of rampart.errors (docs/exit-codes.md). A user sees one
line per error; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rampart import __version__
from rampart.commands import gateway, server, testbed
from rampart.commands.common import PASSWORD_ENV, password_source, register
from rampart.contracts import coremeta, signing, wire
from rampart.contracts.version import parse_version
from rampart.errors import (
    AuditError,
    ConflictError,
    LocalError,
    RampartError,
    UsageError,
    VerificationError,
)
from rampart.vendor import webroot

log = logging.getLogger("rampart")


EPILOG = """\
exit codes: 0 success (update: up to date), 1 other error, 2 invalid argument, 3 local
problem (missing file, permission, space, wrong password), 4 refused (would overwrite, go
backwards, or update while another runs), 5 audit found problems, 10 malformed or oversized
data, 11 signature does not verify or names another version, 12 network failure (TLS,
certificate, timeout, HTTP status), 20 update installed (reboot to use it), 21 an update
already waits for a reboot. See docs/exit-codes.md."""


def _emit_json(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _check_semver(text: str) -> str:
    """The version, checked to be semver without build metadata."""
    version = parse_version(text)
    if version.build:
        raise UsageError(f"version {text!r}: build metadata is not allowed in a signed version")
    return text


def _seconds(text: str) -> float:
    """A duration on the command line: seconds, 0 or more, finite."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _epoch(text: str) -> int:
    """A security epoch on the command line: 0 to 2^63-1."""
    if not text.isascii() or not text.isdigit() or int(text) >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a security epoch (0 to 2^63-1)")
    return int(text)


# --- verbs -------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    for path in (args.secret_key, args.public_key):
        if path.exists() or path.is_symlink():
            raise ConflictError(f"{path}: already exists; refusing to overwrite a key")
    password = None if args.unencrypted else password_source(args.password_env, True)()
    key = signing.generate_secret_key()
    secret = signing.secret_key_to_bytes(key, password)
    signing.write_new_file(args.secret_key, secret, 0o600)
    try:
        signing.write_new_file(args.public_key, key.public_key.to_bytes(), 0o644)
    except RampartError:
        args.secret_key.unlink()
        raise
    if args.json:
        _emit_json(
            {
                "key_id": key.public_key.key_id,
                "public_key": str(args.public_key),
                "secret_key": str(args.secret_key),
                "encrypted": password is not None,
                "public_key_base64": key.public_key.to_base64(),
            }
        )
    else:
        print(
            f"key {key.public_key.key_id}: secret key {args.secret_key} (mode 0600), "
            f"public key {args.public_key}"
        )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    version = _check_semver(args.version)
    target: Path = args.signature or args.file.with_name(args.file.name + ".sig")
    if not args.file.is_file():
        raise LocalError(f"{args.file}: file not found or not a regular file")
    key = signing.load_secret_key(args.secret_key, password_source(args.password_env, False))
    signature = signing.sign_file(args.file, key, version)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(signature.to_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalError(f"{target}: cannot write the signature: {exc.strerror}") from None
    if args.json:
        _emit_json(
            {
                "file": str(args.file),
                "signature": str(target),
                "version": version,
                "key_id": key.public_key.key_id,
            }
        )
    else:
        print(f"{target}: signed {args.file} as version {version} with key {key.public_key.key_id}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.version is not None:
        _check_semver(args.version)
    sig_path: Path = args.signature or args.file.with_name(args.file.name + ".sig")
    if args.signature is None and not sig_path.exists():
        minisig = args.file.with_name(args.file.name + ".minisig")
        if minisig.exists():
            sig_path = minisig
    public_key = signing.load_public_key(args.public_key)
    signature = signing.load_signature(sig_path)
    signing.verify_file(args.file, signature, public_key)
    comment = signature.trusted_text(str(sig_path))
    if args.version is not None and comment != args.version:
        raise VerificationError(
            f"{sig_path}: signed for version {comment[:80]!r}, not {args.version!r}"
        )
    if args.json:
        try:
            semver = str(parse_version(comment)) == comment
        except UsageError:
            semver = False
        _emit_json(
            {
                "file": str(args.file),
                "signature": str(sig_path),
                "version": comment,
                "semver": semver,
                "key_id": signature.key_id,
                "algorithm": "prehashed" if signature.prehashed else "legacy",
            }
        )
    else:
        print(comment)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    version = parse_version(_check_semver(args.version))
    wire.check_name(args.os, "OS name")
    if args.channel is not None:
        wire.check_name(args.channel, "channel name")
    key = signing.load_secret_key(args.secret_key, password_source(args.password_env, False))
    result = webroot.publish(
        args.webroot,
        args.os,
        version,
        args.core,
        args.efiboot,
        key,
        args.channel,
        args.force,
        epoch=args.epoch,
    )
    channel = result.channel or "default"
    if args.json:
        _emit_json(
            {
                "os": result.os_name,
                "version": str(result.version),
                "channel": channel,
                "release": str(result.release),
                "version_file": str(result.version_file),
                "previous": None if result.previous is None else str(result.previous),
                "reused_release": result.reused,
                "epoch": result.epoch,
            }
        )
    else:
        state = "already published" if result.reused else "published"
        before = "" if result.previous is None else f" (was {result.previous})"
        print(
            f"{result.release}: {result.os_name} {result.version} (security epoch "
            f"{result.epoch}) {state}; "
            f"{channel} channel now points at it{before}"
        )
    return 0


def cmd_webroot_check(args: argparse.Namespace) -> int:
    public_key = signing.load_public_key(args.public_key)
    problems = webroot.audit(args.dir, public_key)
    if args.json:
        channels = [
            {"channel": c.name or "default", "os": c.os_name, "version": str(c.version)}
            for c in wire.list_channels(args.dir, [])
        ]
        _emit_json(
            {
                "webroot": str(args.dir),
                "ok": not problems,
                "problems": problems,
                "channels": channels,
            }
        )
        return AuditError.exit_code if problems else 0
    if problems:
        raise AuditError(f"{args.dir}: {len(problems)} problem(s) found", problems)
    print(f"{args.dir}: webroot is consistent")
    return 0


def _device_parts(args: argparse.Namespace) -> tuple[Any, Any]:
    from rampart.device import config as device_config

    config = device_config.load_device_config(args.config)
    identity = device_config.load_identity(args.os_release, args.machine_id)
    return config, identity


def cmd_update(args: argparse.Namespace) -> int:
    from rampart.device import config as device_config
    from rampart.device import update

    config, identity = _device_parts(args)
    remote = device_config.load_remote_config(args.remote)
    device = update.open_device(config, remote, identity, args.tmp, args.run_dir)
    fetcher = update.make_fetcher(device)
    if sys.stderr.isatty() and not args.json:
        from rampart.device.progress import Bar

        fetcher.progress = Bar(sys.stderr, "download ").update
    result = update.update(device, fetcher)  # reports to the server itself
    if args.json:
        _emit_json(result.to_json())
    elif result.outcome == update.Outcome.UPDATED:
        print(
            f"updated {result.running.core} -> {result.latest}: {result.slot} and "
            f"{result.entry} installed; reboot to use it"
        )
    elif result.outcome == update.Outcome.PENDING:
        print("an update is already installed; reboot to use it")
    else:
        print(f"up to date ({result.running.core})")
    if result.outcome == update.Outcome.UPDATED:
        if config.reboot and not args.no_reboot:
            update.reboot()
        return update.EXIT_UPDATED
    if result.outcome == update.Outcome.PENDING:
        return update.EXIT_PENDING
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rampart.device import status

    config, identity = _device_parts(args)
    report = status.collect(config, identity, args.run_dir)
    if args.json:
        _emit_json(report)
    else:
        print(status.render(report))
    return 0


def cmd_boot_once(args: argparse.Namespace) -> int:
    from rampart.device import bootonce
    from rampart.device.esp import Esp

    config, _identity = _device_parts(args)
    version = parse_version(args.target_version)
    chosen = bootonce.boot_once(Esp(config.esp_directory, config.os_name), version)
    if args.json:
        _emit_json({"version": version.core, "entry": chosen})
    else:
        print(f"{chosen}: boots once at the next boot; the default entry is unchanged")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from rampart.device import installer
    from rampart.device.config import parse_size

    result = installer.install(
        args.target,
        args.payload,
        config_dir=args.config_dir,
        os_release=args.os_release,
        esp_size=parse_size(args.esp_size, "--esp-size"),
        state_size=parse_size(args.state_size, "--state-size"),
        wipe=args.wipe,
        no_tpm=args.no_tpm,
    )
    if args.json:
        _emit_json(result.to_json())
    else:
        sealed = (
            f"state key sealed to PCR {result.sealed_to}"
            if result.sealed_to
            else "no TPM: the recovery passphrase opens the state partition at every boot"
        )
        print(
            f"{result.target}: {result.os_name} {result.version} installed "
            f"({result.volume_group}/{result.core_lv}, root hash {result.root_hash}, "
            f"machine ID {result.machine_id}; {sealed})"
        )
        print(
            "Recovery passphrase of the state partition (shown once; keep it offline, it "
            "opens the state when the TPM does not):\n"
            f"    {result.recovery_passphrase}",
            flush=True,
        )
    return 0


def _state_volume(config: Any) -> Path:
    from rampart.device.installer import STATE_LV

    return Path("/dev") / str(config.core_destination) / STATE_LV


def _esp_root(config: Any) -> Path:
    from rampart.device.installer import esp_root

    root: Path = esp_root(config.esp_directory)
    return root


def _read_passphrase(args: argparse.Namespace) -> str:

    if args.passphrase_file is not None:
        from rampart.contracts import signing

        data = signing.read_file(args.passphrase_file, "passphrase file", 4096)
        text = data.decode("utf-8", errors="replace").strip()
    elif sys.stdin.isatty():
        text = getpass.getpass("Recovery passphrase of the state partition: ").strip()
    else:
        text = sys.stdin.readline(4096).strip()
    if not text:
        raise UsageError("no recovery passphrase given")
    return text


def cmd_tpm_status(args: argparse.Namespace) -> int:
    from rampart.device import state, tpm

    config, _identity = _device_parts(args)
    machine_tpm = tpm.device_tpm(config.tpm_tcti, required=config.tpm_required)
    esp = _esp_root(config)
    pub, priv, pcr_file = state.sealed_paths(esp)
    report: dict[str, Any] = {
        "tpm": machine_tpm is not None,
        "secure_boot": tpm.secure_boot_enabled(),
        "sealed_object": str(priv) if priv.is_file() and pub.is_file() else None,
        "sealed_to": pcr_file.read_text().strip() if pcr_file.is_file() else None,
        "unseals": None,
        "pcrs": {},
        "rollback_counter": None,
    }
    if machine_tpm is not None:
        values = machine_tpm.pcr_values(config.tpm_pcrs)
        report["pcrs"] = {str(n): v.hex() for n, v in sorted(values.items())}
        report["rollback_counter"] = machine_tpm.counter() or 0
        if report["sealed_object"] is not None:
            try:
                machine_tpm.unseal(pub, priv, config.tpm_pcrs)
                report["unseals"] = True
            except LocalError as exc:
                report["unseals"] = False
                report["unseal_error"] = str(exc)
    if args.json:
        _emit_json(report)
        return 0
    print(f"TPM: {'present' if report['tpm'] else 'none'}")
    print(f"Secure Boot: {'enabled' if report['secure_boot'] else 'disabled'}")
    for number, value in report["pcrs"].items():
        print(f"PCR {number} (sha256): {value}")
    print(f"sealed state key: {report['sealed_object'] or 'none'}", end="")
    print(f" (sealed to {report['sealed_to']})" if report["sealed_to"] else "")
    if report["unseals"] is not None:
        print(f"unseals now: {'yes' if report['unseals'] else 'no: ' + report['unseal_error']}")
    print(f"rollback counter: {report['rollback_counter']}")
    return 0


def cmd_tpm_reseal(args: argparse.Namespace) -> int:
    from rampart.device import state, tpm

    config, _identity = _device_parts(args)
    machine_tpm = tpm.Tpm(config.tpm_tcti) if tpm.present(config.tpm_tcti) else None
    if machine_tpm is None:
        raise LocalError(f"no TPM ({config.tpm_tcti}): there is nothing to seal the key to")
    volume = args.volume or _state_volume(config)
    esp = args.esp or _esp_root(config)
    passphrase = _read_passphrase(args)
    state.reseal(volume, esp, machine_tpm, passphrase, config.tpm_pcrs)
    selection = tpm.pcr_selection(config.tpm_pcrs)
    if args.json:
        _emit_json({"volume": str(volume), "sealed_to": selection, "keyslot": tpm.TPM_KEYSLOT})
    else:
        print(
            f"{volume}: state key resealed to the current PCR {selection} "
            f"(keyslot {tpm.TPM_KEYSLOT} replaced); the next boot opens it without a prompt"
        )
    return 0


def cmd_mark_good(args: argparse.Namespace) -> int:
    from rampart.device import rollback
    from rampart.device.esp import Esp, wait_for_directory

    config, identity = _device_parts(args)
    if args.wait_esp:
        waited = wait_for_directory(config.esp_directory, args.wait_esp)
        if waited >= 1:
            log.info("%s: the ESP came after %.0f s", config.esp_directory, waited)
    esp = Esp(config.esp_directory, config.os_name)
    blessed = esp.bless(identity.version)  # first, and durable: the counter comes after
    counter = rollback.protect_after_blessing(config, esp, identity.version)
    if args.json:
        _emit_json(
            {
                "version": identity.version.core,
                "entry": None if blessed is None else blessed.name,
                "rollback_counter": counter,
            }
        )
        return 0
    if blessed is None:
        print(f"{identity.version.core}: boot entry has no counter; already marked good")
    else:
        print(f"{identity.version.core}: marked good ({blessed.name})")
    if counter is None:
        print("rollback counter: none (no TPM on this machine); nothing changes")
    else:
        print(f"rollback counter: {counter}")
    return 0


# --- parser ------------------------------------------------------------------------


def cmd_verity_verify(args: argparse.Namespace) -> int:
    from rampart.vendor import core

    meta = coremeta.load(args.meta)
    core.verify_core(args.image, meta)
    if args.json:
        _emit_json(
            {
                "image": str(args.image),
                "version": meta.version,
                "root_hash": meta.verity.root_hash,
                "ok": True,
            }
        )
    else:
        print(f"{args.image}: verity tree and data match root hash {meta.verity.root_hash}")
    return 0


def cmd_verity_format(args: argparse.Namespace) -> int:
    from rampart.contracts import verity

    if args.hash_file is not None and args.hash_file.exists():
        raise ConflictError(f"{args.hash_file}: already exists; refusing to overwrite")
    params = verity.build(args.data, args.hash_file)
    if args.json:
        _emit_json(params.to_json())
    else:
        print(
            f"{args.data}: root hash {params.root_hash}, salt {params.salt}, "
            f"hash offset {params.hash_offset}"
        )
    return 0


def _add_device_options(parser: argparse.ArgumentParser, remote: bool) -> None:
    from rampart.device import config as c

    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=c.DEFAULT_CONFIG_DIR,
        metavar="DIR",
        help=f"system config dir: config.toml, pubkey (default {c.DEFAULT_CONFIG_DIR})",
    )
    if remote:
        parser.add_argument(
            "-r",
            "--remote",
            type=Path,
            default=c.DEFAULT_REMOTE_DIR,
            metavar="DIR",
            help=f"remote config dir: remote.toml, rootca.pem (default {c.DEFAULT_REMOTE_DIR})",
        )
        parser.add_argument(
            "-t",
            "--tmp",
            type=Path,
            default=c.DEFAULT_DOWNLOAD_DIR,
            metavar="DIR",
            help=f"download directory (default {c.DEFAULT_DOWNLOAD_DIR})",
        )
    parser.add_argument(
        "--os-release",
        type=Path,
        default=c.DEFAULT_OS_RELEASE,
        metavar="FILE",
        help=f"where VERSION_ID is read (default {c.DEFAULT_OS_RELEASE})",
    )
    parser.add_argument(
        "--machine-id",
        type=Path,
        default=c.DEFAULT_MACHINE_ID,
        metavar="FILE",
        help=f"the machine identity (default {c.DEFAULT_MACHINE_ID})",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=c.DEFAULT_RUN_DIR,
        metavar="DIR",
        help=f"runtime state, update-ready marker (default {c.DEFAULT_RUN_DIR})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")


def _add_password_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        default=PASSWORD_ENV,
        help=f"read the secret key password from this environment variable "
        f"(default {PASSWORD_ENV}); without it, ask on the terminal",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rampart",
        description="Signed A/B system updates and a verified boot chain (CLIP OS 5 model).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rampart {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--json", action="store_true", help="print a JSON object on stdout")
        return sub

    p = verb(
        "keygen",
        "create a minisign key pair",
        "Create a minisign key pair. The secret key is encrypted with a password as "
        "minisign does (scrypt, libsodium's sensitive limits: about 1 GiB of memory and "
        "a few seconds) unless --unencrypted. Existing files are never overwritten; the "
        "secret key is written with mode 0600.",
    )
    p.add_argument("--secret-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--public-key", type=Path, required=True, metavar="FILE")
    p.add_argument(
        "--unencrypted",
        action="store_true",
        help="store the secret key without a password (for automated test rigs)",
    )
    _add_password_env(p)
    p.set_defaults(func=cmd_keygen)

    p = verb(
        "sign",
        "sign a file; the trusted comment is its version",
        "Write FILE.sig, a prehashed (ED) minisign signature whose trusted comment is "
        "exactly VERSION. `minisign -V` verifies it.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--secret-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--version", required=True, metavar="V", help="semantic version, e.g. 1.0.1")
    p.add_argument("--signature", type=Path, metavar="FILE", help="default: FILE.sig")
    _add_password_env(p)
    p.set_defaults(func=cmd_sign)

    p = verb(
        "verify",
        "verify a file's minisign signature and print its version",
        "Verify FILE against FILE.sig (or FILE.minisig) with a minisign public key and "
        "print the trusted comment. Prehashed and legacy signatures are accepted, from "
        "rampart, minisign or rsign2. With --version, the trusted comment must equal it.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--public-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--version", metavar="V", help="require this version in the trusted comment")
    p.add_argument(
        "--signature", type=Path, metavar="FILE", help="default: FILE.sig, else FILE.minisig"
    )
    p.set_defaults(func=cmd_verify)

    p = verb(
        "publish",
        "publish a signed release into a static webroot",
        "Copy and sign the Core and EFI payloads into DIR/dist/V/, then point the channel "
        "at V (update/v1/OS/version, or channels/C/update/v1/OS/version). Atomic: the "
        "version file changes last, by rename. Refuses to move a channel backwards "
        "(to a lower version, or to a release whose EFI binary has a lower security epoch) "
        "without --force and to change an existing release.",
    )
    p.add_argument("--webroot", type=Path, required=True, metavar="DIR")
    p.add_argument("--os", required=True, metavar="NAME", help="OS name, e.g. clipos")
    p.add_argument("--version", required=True, metavar="V")
    p.add_argument("--core", type=Path, required=True, metavar="FILE")
    p.add_argument("--efiboot", type=Path, required=True, metavar="FILE")
    p.add_argument("--secret-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--channel", metavar="C", help="a named channel (default: the default one)")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow pointing the channel at a lower version or security epoch (a rollback)",
    )
    p.add_argument(
        "--epoch",
        type=_epoch,
        metavar="N",
        help="the security epoch the EFI binary must carry (rampart.epoch=N); else refused",
    )
    _add_password_env(p)
    p.set_defaults(func=cmd_publish)

    p = verbs.add_parser(
        "webroot", help="inspect a static webroot", description="Inspect a static webroot."
    )
    webroot_verbs = p.add_subparsers(dest="webroot_verb", metavar="VERB", required=True)
    c = webroot_verbs.add_parser(
        "check",
        help="audit a webroot",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Audit a webroot: every version file names a complete published release; "
        "every payload's signature verifies with the public key and carries its release's "
        "version; nothing is missing or extra. Lists every problem; exit code 5 if any.",
    )
    c.add_argument("dir", type=Path, metavar="DIR")
    c.add_argument("--public-key", type=Path, required=True, metavar="FILE")
    c.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    c.set_defaults(func=cmd_webroot_check)

    p = verb(
        "update",
        "check for, download and install an update (device side, as root)",
        "Run the update transaction once: ask the server for the latest version, download "
        "and verify the EFI binary and Core (in an unprivileged process), remove stale boot "
        "entries, write Core into the unused slot, install the boot entry last, and mark "
        "the update ready. Safe to interrupt at any point; a rerun completes the job. "
        "Exit codes: 0 up to date, 20 updated (reboot to use it), 21 an update already "
        "waits for a reboot, otherwise an error code below.",
    )
    _add_device_options(p, remote=True)
    p.add_argument(
        "--no-reboot", action="store_true", help="do not reboot even if config.toml asks for it"
    )
    p.set_defaults(func=cmd_update)

    from rampart.commands.vendor import add_verbs as add_image_verbs

    register(verbs, server.VERBS)
    add_image_verbs(verb, verbs)
    register(verbs, testbed.VERBS)

    p = verbs.add_parser(
        "verity",
        help="dm-verity hash trees (no device-mapper needed)",
        description="Build and check dm-verity hash trees in pure Python.",
    )
    verity_verbs = p.add_subparsers(dest="verity_verb", metavar="VERB", required=True)
    c = verity_verbs.add_parser(
        "verify",
        help="check an image against its root hash",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a Core bundle (data and appended hash tree) against the root hash "
        "in its metadata file, reading the image once; names the first bad block. Exit 11 if "
        "anything differs.",
    )
    c.add_argument("image", type=Path, metavar="IMAGE")
    c.add_argument(
        "--meta",
        type=Path,
        required=True,
        metavar="FILE",
        help="the metadata file written by `rampart build core`",
    )
    c.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    c.set_defaults(func=cmd_verity_verify)
    c = verity_verbs.add_parser(
        "format",
        help="append (or write) a hash tree",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute the dm-verity tree of DATA (a multiple of 4096 bytes) as "
        "`veritysetup format` does, and append it to DATA (or write it to --hash-file).",
    )
    c.add_argument("data", type=Path, metavar="DATA")
    c.add_argument("--hash-file", type=Path, metavar="FILE")
    c.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    c.set_defaults(func=cmd_verity_format)

    p = verb(
        "status",
        "show the running version, slots, boot entries and pending update",
        "Show the running version, the Core slots, the boot entries on the ESP (with boot "
        "counters) and whether an update waits for a reboot.",
    )
    _add_device_options(p, remote=False)
    p.set_defaults(func=cmd_status)

    p = verb(
        "mark-good",
        "remove the boot counter of the running version's entry",
        "Mark the running version good: remove the +tries counter from its boot entry, as "
        "systemd-bless-boot does; then, on a machine with a TPM, raise its rollback counter "
        "to the lowest security epoch among the installed, bootable versions. Run by the "
        "health check once the system is up.",
    )
    _add_device_options(p, remote=False)
    p.add_argument(
        "--wait-esp",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the ESP directory to appear (a slow boot mounts the "
        "ESP late; rampart-mark-good.service waits 300); default: do not wait",
    )
    p.set_defaults(func=cmd_mark_good)

    p = verb(
        "boot-once",
        "boot another installed version at the next boot only (manual rollback)",
        "Set systemd-boot's one-shot entry (the LoaderEntryOneShot EFI variable) to the "
        "boot entry of VERSION: the next boot runs it, the boot after that the default "
        "again. Refuses a version without an entry or whose boot counter ran out.",
    )
    p.add_argument("target_version", metavar="VERSION")
    _add_device_options(p, remote=False)
    p.set_defaults(func=cmd_boot_once)

    p = verb(
        "install",
        "install this Core's version on an empty disk (installer, as root)",
        "Partition DISK (GPT: ESP and LVM), create the volume group with core_<V> and "
        "core_state, write the running Core's version from the payload directory, check it "
        "against the root hash of its signed EFI binary, fill the state partition and the "
        "ESP (last). Reads the layout from the device configuration (-c). Refuses a disk "
        "that holds anything unless --wipe. The payload directory is described in "
        "docs/formats.md; the testbed's installer initramfs runs this verb.",
    )
    p.add_argument("--target", type=Path, required=True, metavar="DISK", help="e.g. /dev/vda")
    p.add_argument("--payload", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "-c",
        "--config-dir",
        type=Path,
        default=Path("/usr/lib/rampart"),
        metavar="DIR",
        help="system configuration (config.toml); default /usr/lib/rampart",
    )
    p.add_argument("--os-release", type=Path, default=Path("/etc/os-release"), metavar="FILE")
    p.add_argument("--esp-size", default="256M", metavar="SIZE", help="default 256M")
    p.add_argument("--state-size", default="512M", metavar="SIZE", help="default 512M")
    p.add_argument("--wipe", action="store_true", help="erase a disk that holds something")
    p.add_argument(
        "--no-tpm",
        action="store_true",
        help="do not seal the state key (a machine without a TPM): every boot asks for the "
        "recovery passphrase",
    )
    p.set_defaults(func=cmd_install)

    p = verbs.add_parser(
        "tpm",
        help="the TPM side of trusted boot: status, reseal the state key",
        description="The state partition's key is sealed to the TPM under a policy on PCR 7 "
        "(the Secure Boot state); the TPM's NV counter holds the lowest security epoch "
        "allowed to boot. See the README's trust model.",
    )
    tpm_verbs = p.add_subparsers(dest="tpm_verb", metavar="VERB", required=True)
    t = tpm_verbs.add_parser(
        "status",
        help="TPM, Secure Boot, PCR values, sealed key, rollback counter",
        description="Show whether the machine has a TPM, whether Secure Boot is on, the "
        "configured PCR values, the sealed state key on the ESP and whether the TPM "
        "unseals it now (the key itself is never shown), and the rollback counter.",
    )
    t.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    _add_device_options(t, remote=False)
    t.set_defaults(func=cmd_tpm_status)
    t = tpm_verbs.add_parser(
        "reseal",
        help="seal the state key again for the current PCR values (with the passphrase)",
        description="After a legitimate change of the Secure Boot keys (PCR 7 changed, so "
        "the boot asked for the recovery passphrase): check the recovery passphrase, seal "
        "a new random key to the current PCR values, store it on the ESP and replace "
        "keyslot 0 with it. The passphrase is read from --passphrase-file, the terminal, "
        "or the first line of stdin. A crash at any point leaves the passphrase working.",
    )
    t.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    t.add_argument("--passphrase-file", type=Path, metavar="FILE")
    t.add_argument(
        "--volume", type=Path, metavar="DEV", help="the LUKS2 volume (default /dev/<VG>/core_state)"
    )
    t.add_argument("--esp", type=Path, metavar="DIR", help="the ESP's mount point")
    _add_device_options(t, remote=False)
    t.set_defaults(func=cmd_tpm_reseal)

    register(verbs, gateway.VERBS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The update verb logs its steps (plain lines for the journal) by default.
    verbose = getattr(args, "verbose", False) or args.verb in ("update", "install")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if verbose else logging.WARNING,
        format="rampart: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AuditError as exc:
        for problem in exc.problems:
            print(f"rampart: {problem}", file=sys.stderr)
        print(f"rampart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RampartError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"rampart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a local failure no layer below anticipated
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rampart: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return LocalError.exit_code
    except KeyboardInterrupt:
        print("rampart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
