"""The vendor's verbs: keys and signatures, the webroot, release artefacts, dm-verity
(the TUF repository's are in commands/tuf.py; `publish` and `release` take its hook).

`rampart keygen|sign|verify|publish`, `webroot check`, `build efiboot|esp|core|initramfs`,
`inspect efiboot`, `keys secureboot|ovmf-vars`, `release`, `verity verify|format`.
The `build` extra (pefile, virt-firmware), which a device does not have, is only
imported when a verb runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rampart import files
from rampart.commands import tuf as tuf_verbs
from rampart.commands.common import (
    JSON,
    PASSWORD_ENV,
    PASSWORD_ENV_ARG,
    Group,
    SubParsers,
    Verb,
    arg,
    check_semver,
    epoch,
    password_source,
    print_json,
    register,
)
from rampart.contracts import coremeta, signing, wire
from rampart.contracts.cmdline import check_extra_param
from rampart.contracts.version import parse_version
from rampart.errors import (
    AuditError,
    ConflictError,
    LocalError,
    RampartError,
    UsageError,
    VerificationError,
)
from rampart.release import hardening, secureboot, uki, webroot
from rampart.release.core import COMPRESSIONS

DEFAULT_VG = "mainvg"

CHUNK_ARGS = (
    arg(
        "--no-chunks",
        action="store_true",
        help="publish no chunk index: devices then stream Core whole (no incremental update)",
    ),
    arg(
        "--no-delta",
        action="store_true",
        help="publish no delta from the channel's previous release (devices running it "
        "then rebuild Core from chunks)",
    ),
    arg(
        "--chunk-compression",
        default=f"{webroot.Chunking.compression}:{webroot.Chunking.level}",
        metavar="METHOD[:LEVEL]",
        help="how new chunks are compressed in the chunk store: zstd (1-22) or xz (0-9) "
        f"(default {webroot.Chunking.compression}:{webroot.Chunking.level})",
    ),
)


def chunking(args: argparse.Namespace) -> webroot.Chunking | None:
    """The chunking `--no-chunks` and `--chunk-compression` ask for (UsageError if bad)."""
    if args.no_chunks:
        return None
    method, _, level = str(args.chunk_compression).partition(":")
    ranges = {"zstd": range(1, 23), "xz": range(10)}
    if method not in ranges or (
        level and (not level.isdigit() or int(level) not in ranges[method])
    ):
        raise UsageError(
            f"--chunk-compression {args.chunk_compression!r}: use zstd[:1-22] or xz[:0-9]"
        )
    default = {"xz": 6, "zstd": 19}[method]
    return webroot.Chunking(method, int(level) if level else default, deltas=not args.no_delta)


def chunk_summary(result: webroot.PublishResult) -> dict[str, int] | None:
    if not result.chunks:
        return None
    return {
        "count": result.chunks,
        "new": result.new_chunks,
        "new_bytes": result.new_chunk_bytes,
        "delta_bytes": result.delta_bytes,
    }


# --- keys and signatures ------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    for path in (args.secret_key, args.public_key):
        if path.exists() or path.is_symlink():
            raise ConflictError(f"{path}: already exists; refusing to overwrite a key")
    password = None if args.unencrypted else password_source(args.password_env, True)()
    key = signing.generate_secret_key()
    secret = signing.secret_key_to_bytes(key, password)
    files.write_new_file(args.secret_key, secret, 0o600)
    try:
        files.write_new_file(args.public_key, key.public_key.to_bytes(), 0o644)
    except RampartError:
        args.secret_key.unlink()
        raise
    if args.json:
        print_json(
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
    version = check_semver(args.version)
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
        print_json(
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
        check_semver(args.version)
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
        print_json(
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


# --- the webroot --------------------------------------------------------------------


SBVAR_ARGS = (
    arg(
        "--db-append",
        type=Path,
        metavar="FILE",
        help="a signed append to the firmware's db the release carries "
        "(`rampart keys db-append`); devices apply it after the release's good boot",
    ),
    arg(
        "--dbx-append",
        type=Path,
        metavar="FILE",
        help="a signed append to the firmware's dbx the release carries "
        "(`rampart keys dbx-append`); devices apply it after the release's good boot, "
        "unless it would revoke what they boot",
    ),
)


def sbvars(args: argparse.Namespace) -> dict[str, Path]:
    """The Secure Boot variable appends given (`--db-append`, `--dbx-append`)."""
    given = (("db", args.db_append), ("dbx", args.dbx_append))
    return {name: path for name, path in given if path is not None}


def cmd_publish(args: argparse.Namespace) -> int:
    version = parse_version(check_semver(args.version))
    wire.check_name(args.os, "OS name")
    if args.channel is not None:
        wire.check_name(args.channel, "channel name")
    key = signing.load_secret_key(args.secret_key, password_source(args.password_env, False))
    add_to_tuf = tuf_verbs.hook_prepare(args)
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
        chunking=chunking(args),
        loader=args.loader,
        sbvars=sbvars(args),
    )
    tuf_targets = add_to_tuf()
    channel = result.channel or "default"
    if args.json:
        print_json(
            {
                "os": result.os_name,
                "version": str(result.version),
                "channel": channel,
                "release": str(result.release),
                "version_file": str(result.version_file),
                "previous": None if result.previous is None else str(result.previous),
                "reused_release": result.reused,
                "epoch": result.epoch,
                "chunks": chunk_summary(result),
                "tuf": tuf_targets,
            }
        )
    else:
        state = "already published" if result.reused else "published"
        before = "" if result.previous is None else f" (was {result.previous})"
        chunked = (
            f" in {result.chunks} chunks ({result.new_chunks} new, "
            f"{result.new_chunk_bytes} bytes compressed"
            + (
                f"; a delta from {result.previous} of {result.delta_bytes} bytes"
                if result.delta_bytes
                else ""
            )
            + ")"
            if result.chunks
            else ""
        )
        print(
            f"{result.release}: {result.os_name} {result.version} (security epoch "
            f"{result.epoch}) {state}{chunked}; "
            f"{channel} channel now points at it{before}"
        )
        if tuf_targets is not None:
            print(f"{args.webroot / 'tuf'}: targets {tuf_targets['targets_version']} signs it")
    return 0


def cmd_webroot_check(args: argparse.Namespace) -> int:
    public_key = signing.load_public_key(args.public_key)
    problems = webroot.audit(args.dir, public_key, args.verify_chunks)
    if args.json:
        channels = [
            {"channel": c.name or "default", "os": c.os_name, "version": str(c.version)}
            for c in wire.list_channels(args.dir, [])
        ]
        print_json(
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


def cmd_webroot_gc(args: argparse.Namespace) -> int:
    from rampart.release import chunkstore

    result = chunkstore.collect_garbage(args.dir, args.dry_run)
    if args.json:
        print_json(
            {
                "webroot": str(args.dir),
                "dry_run": args.dry_run,
                "indexes": result.indexes,
                "kept": result.kept,
                "removed": result.removed,
                "removed_bytes": result.removed_bytes,
            }
        )
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{args.dir}: {verb} {result.removed} chunk file(s) ({result.removed_bytes} bytes) that "
        f"none of {result.indexes} chunk index(es) references; {result.kept} kept"
    )
    return 0


# --- release artefacts --------------------------------------------------------------


def cmd_build_efiboot(args: argparse.Namespace) -> int:
    wire.check_name(args.os, "OS name")
    meta = coremeta.read_pins(args.core_meta)
    if meta.version is not None and meta.version != args.version:
        raise UsageError(
            f"{args.core_meta}: Core version {meta.version!r} is not --version "
            f"{args.version!r}; a UKI must boot its own Core"
        )
    if bool(args.sign_key) != bool(args.sign_cert):
        raise UsageError("--sign-key and --sign-cert go together")
    image = uki.build_efiboot(
        args.out,
        meta,
        vg=args.vg,
        version=args.version,
        os_name=args.os,
        kernel=args.kernel,
        initrd=args.initrd,
        extra=args.extra_cmdline,
        lockdown=None if args.lockdown == "none" else args.lockdown,
        epoch=args.epoch,
        uname=args.uname,
        stub=args.stub,
        sign_key=args.sign_key,
        sign_cert=args.sign_cert,
    )
    if args.json:
        print_json(image.to_json())
    else:
        state = "signed by " + ", ".join(image.signers) if image.signed else "unsigned"
        print(f"{image.path}: {args.os} {image.version} (kernel {image.uname}), {state}")
    return 0


def cmd_inspect_efiboot(args: argparse.Namespace) -> int:
    image = uki.inspect(args.file)
    if args.json:
        print_json(image.to_json())
        return 0
    print(f"file:      {image.path}")
    print(f"os:        {image.os_release.get('PRETTY_NAME') or image.os_release.get('ID', '-')}")
    print(f"version:   {image.version or '-'}")
    print(f"kernel:    {image.uname or '-'}")
    print(f"root hash: {image.root_hash or '-'}")
    print(f"signed by: {', '.join(image.signers) if image.signed else '(unsigned)'}")
    print(f"cmdline:   {image.cmdline}")
    return 0


def cmd_keys_secureboot(args: argparse.Namespace) -> int:
    keys = secureboot.generate_keys(args.out, args.common_name)
    files = [str(p) for p in keys.files()]
    if args.json:
        print_json(
            {
                "directory": str(keys.directory),
                "owner_guid": str(keys.owner_guid()),
                "files": files,
            }
        )
    else:
        print(
            f"{keys.directory}: PK, KEK and db keys (mode 0600) and certificates, "
            f"owner GUID {keys.owner_guid()}"
        )
    return 0


def cmd_keys_ovmf_vars(args: argparse.Namespace) -> int:
    out = secureboot.ovmf_vars(args.keys, args.out, args.template)
    if args.json:
        print_json({"vars": str(out), "template": str(args.template), "secure_boot": True})
    else:
        print(f"{out}: OVMF variables with PK, KEK and db from {args.keys}; Secure Boot on")
    return 0


def cmd_keys_append(args: argparse.Namespace) -> int:
    variable = args.keys_verb.removesuffix("-append")
    write = secureboot.signed_append(
        args.keys, variable, args.out, args.cert, getattr(args, "image", None) or ()
    )
    if args.json:
        print_json(
            {
                "variable": variable,
                "out": str(args.out),
                "attributes": write.attributes,
                "payload_bytes": len(write.payload),
            }
        )
    else:
        print(f"{args.out}: an append to {variable}, signed with {args.keys / 'KEK.key'}")
    return 0


def cmd_build_esp(args: argparse.Namespace) -> int:
    out = secureboot.build_esp(
        args.out,
        args.keys,
        args.ukis,
        systemd_boot=args.systemd_boot,
        require_signed=not args.allow_unsigned,
        menu_timeout=args.menu_timeout,
    )
    entries = [f"EFI/Linux/{p.name}" for p in args.ukis]
    if args.json:
        print_json(
            {
                "esp": str(out),
                "loader": "EFI/BOOT/BOOTX64.EFI",
                "loader_conf": "loader/loader.conf",
                "entries": entries,
            }
        )
    else:
        count = f"{len(entries)} boot entr{'y' if len(entries) == 1 else 'ies'}"
        print(f"{out}: signed systemd-boot and {count}")
    return 0


def cmd_build_core(args: argparse.Namespace) -> int:
    from rampart.release import core

    meta = core.build_core(
        args.rootfs, parse_version(args.version), args.out, args.fec, args.compress
    )
    if args.json:
        print_json(meta.to_json())
    else:
        print(
            f"{args.out}/core-{meta.version}.img: {meta.bundle_size} bytes, verity root hash "
            f"{meta.verity.root_hash}{', with FEC' if args.fec else ''}"
        )
    return 0


def cmd_build_initramfs(args: argparse.Namespace) -> int:
    from rampart.release import initramfs

    image = initramfs.build_initramfs(args.out, args.kernel_deb, installer=args.installer)
    if args.json:
        print_json(image.to_json())
    else:
        print(
            f"{image.path}: initramfs for kernel {image.kernel_release}, "
            f"{len(image.modules)} modules, {image.size} bytes, sha256 {image.sha256}"
        )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Root tree + kernel + initramfs -> Core, signed UKI, published release."""
    from rampart.release import core

    version = parse_version(args.version)
    if version.build:
        raise UsageError(f"version {args.version}: build metadata is not allowed in a release")
    wire.check_name(args.os, "OS name")
    uki.check_signing_pair(args.sign_key, args.sign_cert)
    # Cheap checks first: nothing is built for a release that cannot be published.
    for param in args.extra_cmdline:
        check_extra_param(param)
    wire.check_name(args.vg, "volume group")
    if args.channel is not None:
        wire.check_name(args.channel, "channel name")
    published = wire.release_dir(args.webroot, version) / f"{args.os}-core"
    if published.exists():
        raise ConflictError(
            f"{published}: {args.os} {version.core} is already published; release a new version"
        )
    out: Path = args.out
    audited = hardening.audit_release(
        args.rootfs,
        hardening.release_cmdline(args.vg, version, args.extra_cmdline, args.epoch),
        out,
        version,
        config=args.kernel_config,
        baseline=args.hardening_baseline,
        accept=args.accept_hardening_regression,
    )
    secret = signing.load_secret_key(args.secret_key, password_source(args.password_env, False))
    add_to_tuf = tuf_verbs.hook_prepare(args)
    out.mkdir(parents=True, exist_ok=True)
    meta = core.build_core(args.rootfs, version, out, args.fec, args.compress)
    efiboot = out / f"{args.os}-{version.core}.efi"
    efiboot.unlink(missing_ok=True)  # an unpublished earlier build of this release
    image = uki.build_efiboot(
        efiboot,
        coremeta.read_pins(out / f"core-{version.core}.json"),
        vg=args.vg,
        version=version.core,
        os_name=args.os,
        kernel=args.kernel,
        initrd=args.initrd,
        extra=args.extra_cmdline,
        epoch=args.epoch,
        uname=args.uname,
        sign_key=args.sign_key,
        sign_cert=args.sign_cert,
    )
    loader = None
    if args.loader is not None:
        loader = out / wire.loader_name(args.os)
        uki.sign_copy(args.loader, loader, args.sign_key, args.sign_cert)
    result = webroot.publish(
        args.webroot,
        args.os,
        version,
        out / f"core-{version.core}.img",
        efiboot,
        secret,
        args.channel,
        args.force,
        chunking=chunking(args),
        loader=loader,
        sbvars=sbvars(args),
    )
    tuf_targets = add_to_tuf()
    recorded = hardening.record(out, version, audited)
    counts = audited.counts()
    if args.json:
        print_json(
            {
                "version": version.core,
                "core": meta.to_json(),
                "efiboot": image.to_json(),
                "release": str(result.release),
                "version_file": str(result.version_file),
                "chunks": chunk_summary(result),
                "tuf": tuf_targets,
                "hardening": {
                    "report": str(recorded),
                    "counts": counts,
                    "baseline": None if audited.baseline is None else str(audited.baseline),
                    "regressions_accepted": [f.key for f in audited.regressions],
                },
            }
        )
    else:
        print(
            f"{result.release}: {args.os} {version.core} built and published (root hash "
            f"{meta.verity.root_hash}, UKI signed by {', '.join(image.signers)})"
        )
        if tuf_targets is not None:
            print(f"{args.webroot / 'tuf'}: targets {tuf_targets['targets_version']} signs it")
        print(
            f"{recorded}: kernel hardening {counts['met']} met, {counts['covered']} covered, "
            f"{counts['gap']} gap(s), {counts['unchecked']} unchecked (each one listed there)"
        )
    return 0


# --- dm-verity ----------------------------------------------------------------------


def cmd_verity_verify(args: argparse.Namespace) -> int:
    from rampart.release import core

    meta = coremeta.load(args.meta)
    core.verify_core(args.image, meta)
    if args.json:
        print_json(
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
        print_json(params.to_json())
    else:
        print(
            f"{args.data}: root hash {params.root_hash}, salt {params.salt}, "
            f"hash offset {params.hash_offset}"
        )
    return 0


# --- the verbs ----------------------------------------------------------------------

EPOCH_ARG = arg(
    "--epoch",
    type=int,
    metavar="N",
    help="security epoch (rampart.epoch=N on the command line): a device whose TPM "
    "counter is above N refuses to boot or install this version (offline rollback "
    "protection)",
)
COMPRESS_ARG = arg(
    "--compress",
    choices=sorted(COMPRESSIONS),
    metavar="ALGO",
    help="compress the squashfs (" + ", ".join(sorted(COMPRESSIONS)) + "): a smaller "
    "Core to download and write, for CPU at every read on the device; default: none, "
    "as CLIP OS",
)

VERBS: list[Group | Verb] = [
    # keys and signatures
    Verb(
        ("keygen",),
        "create a minisign key pair",
        "Create a minisign key pair. The secret key is encrypted with a password as "
        "minisign does (scrypt, libsodium's sensitive limits: about 1 GiB of memory and "
        "a few seconds) unless --unencrypted. Existing files are never overwritten; the "
        "secret key is written with mode 0600.",
        cmd_keygen,
        (
            JSON,
            arg("--secret-key", type=Path, required=True, metavar="FILE"),
            arg("--public-key", type=Path, required=True, metavar="FILE"),
            arg(
                "--unencrypted",
                action="store_true",
                help="store the secret key without a password (for automated test rigs)",
            ),
            PASSWORD_ENV_ARG,
        ),
        exit_codes=True,
    ),
    Verb(
        ("sign",),
        "sign a file; the trusted comment is its version",
        "Write FILE.sig, a prehashed (ED) minisign signature whose trusted comment is "
        "exactly VERSION. `minisign -V` verifies it.",
        cmd_sign,
        (
            JSON,
            arg("file", type=Path, metavar="FILE"),
            arg("--secret-key", type=Path, required=True, metavar="FILE"),
            arg("--version", required=True, metavar="V", help="semantic version, e.g. 1.0.1"),
            arg("--signature", type=Path, metavar="FILE", help="default: FILE.sig"),
            PASSWORD_ENV_ARG,
        ),
        exit_codes=True,
    ),
    Verb(
        ("verify",),
        "verify a file's minisign signature and print its version",
        "Verify FILE against FILE.sig (or FILE.minisig) with a minisign public key and "
        "print the trusted comment. Prehashed and legacy signatures are accepted, from "
        "rampart, minisign or rsign2. With --version, the trusted comment must equal it.",
        cmd_verify,
        (
            JSON,
            arg("file", type=Path, metavar="FILE"),
            arg("--public-key", type=Path, required=True, metavar="FILE"),
            arg("--version", metavar="V", help="require this version in the trusted comment"),
            arg(
                "--signature",
                type=Path,
                metavar="FILE",
                help="default: FILE.sig, else FILE.minisig",
            ),
        ),
        exit_codes=True,
    ),
    # the webroot
    Verb(
        ("publish",),
        "publish a signed release into a static webroot",
        "Copy and sign the Core and EFI payloads into DIR/dist/V/, with Core's chunk index "
        "(its new chunks into DIR/dist/store.castr/: incremental updates), then point the "
        "channel at V (update/v1/OS/version, or channels/C/update/v1/OS/version). Atomic: the "
        "version file changes last, by rename. Refuses to move a channel backwards "
        "(to a lower version, or to a release whose UKI has a lower security epoch) "
        "without --force and to change an existing release. With --tuf-targets-key and "
        "--tuf-online-key, the release is also added to the webroot's TUF repository "
        "(`rampart tuf add-release`); the keys are read before anything is published.",
        cmd_publish,
        (
            JSON,
            arg("--webroot", type=Path, required=True, metavar="DIR"),
            arg("--os", required=True, metavar="NAME", help="OS name, e.g. clipos"),
            arg("--version", required=True, metavar="V"),
            arg("--core", type=Path, required=True, metavar="FILE"),
            arg("--efiboot", type=Path, required=True, metavar="FILE"),
            arg("--secret-key", type=Path, required=True, metavar="FILE"),
            arg("--channel", metavar="C", help="a named channel (default: the default one)"),
            arg(
                "--force",
                action="store_true",
                help="allow pointing the channel at a lower version or security epoch (a rollback)",
            ),
            arg(
                "--epoch",
                type=epoch,
                metavar="N",
                help="the security epoch the UKI must carry (rampart.epoch=N); else refused",
            ),
            arg(
                "--loader",
                type=Path,
                metavar="FILE",
                help="a boot loader the release carries: systemd-boot, already signed with "
                "the db key; devices install it once the release booted and was marked good",
            ),
            *SBVAR_ARGS,
            *CHUNK_ARGS,
            PASSWORD_ENV_ARG,
            *tuf_verbs.hook_args(),
        ),
        exit_codes=True,
    ),
    Group(
        ("webroot",),
        "inspect a static webroot",
        "Inspect a static webroot.",
        dest="webroot_verb",
    ),
    Verb(
        ("webroot", "check"),
        "audit a webroot",
        "Audit a webroot: every version file names a complete published release; "
        "every payload's and chunk index's signature verifies with the public key and "
        "carries its release's version; each index's chunks make up its Core and are in "
        "the chunk store; nothing is missing or extra. Lists every problem; exit code 5 "
        "if any.",
        cmd_webroot_check,
        (
            arg("dir", type=Path, metavar="DIR"),
            arg("--public-key", type=Path, required=True, metavar="FILE"),
            arg(
                "--verify-chunks",
                action="store_true",
                help="also decompress every chunk an index names and check its id (reads "
                "the whole store)",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("webroot", "gc"),
        "remove the chunks no release references",
        "Remove from DIR/dist/store.castr/ every chunk that no chunk index in DIR/dist/ "
        "references (delete old releases first), and the temporaries of interrupted "
        "publishes. Holds the webroot's lock: never races a publish. Refuses, removing "
        "nothing, if an index cannot be read.",
        cmd_webroot_gc,
        (
            arg("dir", type=Path, metavar="DIR"),
            arg("--dry-run", action="store_true", help="only say what would be removed"),
            JSON,
        ),
        exit_codes=True,
    ),
    # release artefacts
    Group(
        ("build",),
        "build release artefacts (vendor side)",
        "build release artefacts (vendor side)",
        dest="build_verb",
        metavar="WHAT",
    ),
    Group(
        ("inspect",),
        "show what a release artefact contains",
        "show what a release artefact contains",
        dest="inspect_verb",
        metavar="WHAT",
    ),
    Group(
        ("keys",),
        "create Secure Boot keys and firmware variable stores",
        "create Secure Boot keys and firmware variable stores",
        dest="keys_verb",
        metavar="WHAT",
    ),
    Verb(
        ("build", "efiboot"),
        "build the Unified Kernel Image that boots one Core",
        "Assemble a Unified Kernel Image on systemd's EFI stub: .osrel (IMAGE_VERSION=V), "
        ".cmdline (the Core LV and its verity root hash, offsets and the hardening "
        "parameters), .uname, .sbat, .initrd and .linux (an x86 bzImage). Signed for "
        "Secure Boot with --sign-key/--sign-cert (sbsign). Written under a temporary name "
        "and renamed last; an existing --out is never overwritten.",
        cmd_build_efiboot,
        (
            JSON,
            arg("--kernel", type=Path, required=True, metavar="FILE", help="x86 bzImage"),
            arg("--initrd", type=Path, required=True, metavar="FILE", help="initramfs"),
            arg("--os", required=True, metavar="NAME", help="OS name, e.g. clipos"),
            arg("--version", required=True, metavar="V", help="semantic version of Core"),
            arg(
                "--core-meta",
                type=Path,
                required=True,
                metavar="FILE",
                help="Core metadata JSON from `rampart build core` (roothash, hash_offset, "
                "data_blocks; salt, fec_offset, fec_roots when present)",
            ),
            arg(
                "--vg",
                default=DEFAULT_VG,
                metavar="NAME",
                help=f"volume group holding the Core LVs (default {DEFAULT_VG})",
            ),
            arg(
                "--extra-cmdline",
                action="append",
                default=[],
                metavar="S",
                help="kernel parameters appended to the command line (repeatable), e.g. "
                "console=ttyS0; may not redefine root, ro, init, lockdown or the verity "
                "parameters",
            ),
            arg(
                "--lockdown",
                choices=("confidentiality", "integrity", "none"),
                default="confidentiality",
                help="kernel lockdown level on the command line (default confidentiality)",
            ),
            arg(
                "--uname",
                metavar="RELEASE",
                help="kernel release for .uname when the bzImage header has none",
            ),
            EPOCH_ARG,
            arg(
                "--stub",
                type=Path,
                default=uki.STUB,
                metavar="FILE",
                help="unsigned systemd EFI stub (default: Debian's systemd-boot-efi)",
            ),
            arg("--sign-key", type=Path, metavar="FILE", help="db key (PEM) to sign with"),
            arg("--sign-cert", type=Path, metavar="FILE", help="db certificate (PEM)"),
            arg("--out", type=Path, required=True, metavar="FILE"),
        ),
    ),
    Verb(
        ("build", "esp"),
        "lay out an ESP tree: signed systemd-boot, loader.conf, UKIs",
        "Create DIR with EFI/BOOT/BOOTX64.EFI (systemd-boot signed with KEYS/db), "
        "loader/loader.conf (editor no, --menu-timeout, auto-firmware no) and the given UKIs "
        "in EFI/Linux/. Each UKI must verify with KEYS/db.crt unless --allow-unsigned. DIR "
        "must not exist; it appears complete or not at all.",
        cmd_build_esp,
        (
            JSON,
            arg("ukis", type=Path, nargs="*", metavar="UKI"),
            arg("--keys", type=Path, required=True, metavar="DIR"),
            arg("--out", type=Path, required=True, metavar="DIR"),
            arg(
                "--systemd-boot",
                type=Path,
                default=secureboot.SYSTEMD_BOOT,
                metavar="FILE",
                help="unsigned systemd-boot (default: Debian's systemd-boot-efi)",
            ),
            arg(
                "--allow-unsigned",
                action="store_true",
                help="copy UKIs that db does not sign (to test that firmware refuses them)",
            ),
            arg(
                "--menu-timeout",
                type=int,
                default=secureboot.MENU_TIMEOUT,
                metavar="S",
                help=f"seconds systemd-boot shows its menu (default {secureboot.MENU_TIMEOUT}; "
                "0 hides it unless a key is held at boot)",
            ),
        ),
    ),
    Verb(
        ("inspect", "efiboot"),
        "show a UKI's version, command line, root hash and signer",
        "Read a Unified Kernel Image: its .osrel version, .cmdline, the verity root hash "
        "the command line pins, .uname, and the subjects of the certificates that signed it.",
        cmd_inspect_efiboot,
        (JSON, arg("file", type=Path, metavar="FILE")),
    ),
    Verb(
        ("keys", "secureboot"),
        "create PK, KEK and db keys and certificates",
        "Create RSA 2048 keys and self-signed X.509 certificates for PK, KEK and db, and "
        "an owner GUID, in DIR: PK.key PK.crt KEK.key KEK.crt db.key db.crt owner.guid. "
        "Keys are mode 0600; nothing is written if any of these files exists.",
        cmd_keys_secureboot,
        (
            JSON,
            arg("--out", type=Path, required=True, metavar="DIR"),
            arg(
                "--common-name",
                default="Rampart",
                metavar="CN",
                help="prefix of the certificates' common names (default Rampart)",
            ),
        ),
    ),
    Verb(
        ("keys", "db-append"),
        "a signed append of certificates to db (KEK-signed, for efivarfs)",
        "Make a time-based authenticated append to the firmware's db: each --cert (PEM) as "
        "an X.509 entry owned by DIR's owner GUID (sbsiglist), signed with DIR's KEK "
        "(sbvarsign --include-attrs: the file is what efivarfs takes). A release ships it "
        "(`publish --sbvar`); devices apply it before any EFI binary signed only by the new "
        "key. An existing OUT is never overwritten.",
        cmd_keys_append,
        (
            JSON,
            arg("--keys", type=Path, required=True, metavar="DIR", help="holds KEK.key, KEK.crt"),
            arg("--cert", type=Path, action="append", required=True, metavar="PEM"),
            arg("--out", type=Path, required=True, metavar="FILE"),
        ),
    ),
    Verb(
        ("keys", "dbx-append"),
        "a signed append of revocations to dbx (KEK-signed, for efivarfs)",
        "Make a time-based authenticated append to the firmware's dbx, revoking each "
        "--cert (PEM: every binary it signed) and each --image (an EFI binary: its "
        "Authenticode SHA-256), signed with DIR's KEK. Devices refuse to apply a dbx "
        "update that would revoke their boot loader or the EFI binary of a bootable "
        "version. An existing OUT is never overwritten.",
        cmd_keys_append,
        (
            JSON,
            arg("--keys", type=Path, required=True, metavar="DIR", help="holds KEK.key, KEK.crt"),
            arg("--cert", type=Path, action="append", default=[], metavar="PEM"),
            arg("--image", type=Path, action="append", default=[], metavar="EFI"),
            arg("--out", type=Path, required=True, metavar="FILE"),
        ),
    ),
    Verb(
        ("keys", "ovmf-vars"),
        "an OVMF variable store enrolling the keys, Secure Boot on",
        "Copy the empty OVMF variable store and enroll DIR's PK, KEK and db (no Microsoft "
        "keys) with virt-fw-vars --sb. The result is checked before it is renamed to VARS; "
        "an existing VARS is never overwritten.",
        cmd_keys_ovmf_vars,
        (
            JSON,
            arg("--keys", type=Path, required=True, metavar="DIR"),
            arg("--out", type=Path, required=True, metavar="VARS"),
            arg(
                "--template",
                type=Path,
                default=secureboot.OVMF_VARS_TEMPLATE,
                metavar="FILE",
                help="empty variable store (default /usr/share/OVMF/OVMF_VARS_4M.fd)",
            ),
        ),
    ),
    Verb(
        ("build", "core"),
        "build the verity-protected Core image from a root tree",
        "Make a reproducible squashfs of ROOTFS (uncompressed unless --compress) and append "
        "its dm-verity hash tree (and, with --fec, Reed-Solomon parity), as CLIP OS bundles "
        "Core. Writes "
        "DIR/core-V.img and DIR/core-V.json (root hash, salt, offsets, sizes, SHA-256) under "
        "temporary names, renamed last.",
        cmd_build_core,
        (
            JSON,
            arg("rootfs", type=Path, metavar="ROOTFS"),
            arg("--version", required=True, metavar="V"),
            arg("--out", type=Path, required=True, metavar="DIR"),
            arg("--fec", action="store_true", help="append forward error correction"),
            COMPRESS_ARG,
        ),
    ),
    Verb(
        ("build", "initramfs"),
        "build the initramfs that opens Core with dm-verity and switches root",
        "Write a gzip'ed cpio: busybox, lvm and veritysetup with their libraries, the boot "
        "kernel modules of the kernel in the Debian package (and their dependencies), and "
        "an /init that activates the Core LV named on the command line "
        "(rampart.core=VG/core_V), opens it with dm-verity and the root hash and offsets "
        "given there, mounts it read-only as /, mounts VG/core_state on /mnt/state and "
        "switches root; any failure prints one line and powers off. Reproducible; an "
        "existing --out is replaced atomically.",
        cmd_build_initramfs,
        (
            JSON,
            arg("--out", type=Path, required=True, metavar="FILE"),
            arg(
                "--kernel-deb",
                type=Path,
                metavar="FILE",
                help="Debian linux-image package whose modules to include (default: the one "
                "`make setup` keeps in $RAMPART_CACHE, /var/tmp/rampart-cache)",
            ),
            arg(
                "--installer",
                action="store_true",
                help="the installer's initramfs instead: with the device's command line plus "
                "rampart.install.target=/dev/DISK and rampart.install.payload=/dev/DISK "
                "(optionally rampart.install.wipe=1 and rampart.install.state_size=SIZE), it "
                "opens core-V.img on the payload disk with dm-verity and runs "
                "`rampart install` in it",
            ),
        ),
    ),
    Verb(
        ("release",),
        "build Core and the signed UKI from a root tree, and publish them",
        "From a root tree, a kernel and an initramfs: build Core (`build core`), "
        "the Secure Boot-signed Unified Kernel Image that boots it (`build efiboot`), and "
        "publish both into the webroot (`publish`), in one command.",
        cmd_release,
        (
            arg("rootfs", type=Path, metavar="ROOTFS"),
            arg("--version", required=True, metavar="V"),
            arg("--os", required=True, metavar="NAME"),
            arg("--kernel", type=Path, required=True, metavar="FILE"),
            arg("--initrd", type=Path, required=True, metavar="FILE"),
            arg("--sign-key", type=Path, required=True, metavar="FILE", help="Secure Boot db key"),
            arg(
                "--sign-cert",
                type=Path,
                required=True,
                metavar="FILE",
                help="Secure Boot db certificate",
            ),
            arg(
                "--secret-key",
                type=Path,
                required=True,
                metavar="FILE",
                help="minisign key that signs the release",
            ),
            arg("--webroot", type=Path, required=True, metavar="DIR"),
            arg(
                "--loader",
                type=Path,
                metavar="FILE",
                help="a boot loader the release carries: systemd-boot, unsigned (e.g. "
                f"{secureboot.SYSTEMD_BOOT}); signed here with the db key",
            ),
            *SBVAR_ARGS,
            *CHUNK_ARGS,
            arg(
                "--out",
                type=Path,
                required=True,
                metavar="DIR",
                help="where the build products are kept",
            ),
            arg(
                "--vg",
                default=DEFAULT_VG,
                metavar="NAME",
                help=f"volume group of the Core LVs (default {DEFAULT_VG})",
            ),
            arg(
                "--extra-cmdline",
                action="append",
                default=[],
                metavar="S",
                help="kernel parameter appended to the command line (repeatable)",
            ),
            arg(
                "--uname",
                metavar="RELEASE",
                help="kernel release for .uname when the bzImage does not carry it",
            ),
            EPOCH_ARG,
            arg(
                "--kernel-config",
                type=Path,
                metavar="FILE",
                help="the kernel's .config, for the hardening audit (default: the root "
                "tree's /boot/config-* if it has one)",
            ),
            arg(
                "--hardening-baseline",
                type=Path,
                metavar="REPORT",
                help="the hardening report to compare with (default: the highest earlier "
                "version's hardening-V.json in --out)",
            ),
            arg(
                "--accept-hardening-regression",
                action="append",
                default=[],
                metavar="KIND:NAME",
                help="release although this setting regressed (repeatable), e.g. "
                "sysctl:kernel.sysrq",
            ),
            arg("--fec", action="store_true"),
            COMPRESS_ARG,
            arg("--channel", metavar="C"),
            arg("--force", action="store_true"),
            arg("--password-env", default=PASSWORD_ENV, metavar="VAR"),
            *tuf_verbs.hook_args(),
            JSON,
        ),
    ),
    # dm-verity
    Group(
        ("verity",),
        "dm-verity hash trees (no device-mapper needed)",
        "Build and check dm-verity hash trees in pure Python.",
        dest="verity_verb",
    ),
    Verb(
        ("verity", "verify"),
        "check an image against its root hash",
        "Check a Core bundle (data and appended hash tree) against the root hash "
        "in its metadata file, reading the image once; names the first bad block. Exit 11 if "
        "anything differs.",
        cmd_verity_verify,
        (
            arg("image", type=Path, metavar="IMAGE"),
            arg(
                "--meta",
                type=Path,
                required=True,
                metavar="FILE",
                help="the metadata file written by `rampart build core`",
            ),
            JSON,
        ),
        exit_codes=True,
    ),
    Verb(
        ("verity", "format"),
        "append (or write) a hash tree",
        "Compute the dm-verity tree of DATA (a multiple of 4096 bytes) as "
        "`veritysetup format` does, and append it to DATA (or write it to --hash-file).",
        cmd_verity_format,
        (
            arg("data", type=Path, metavar="DATA"),
            arg("--hash-file", type=Path, metavar="FILE"),
            JSON,
        ),
        exit_codes=True,
    ),
]


def add_verbs(verb: object, verbs: SubParsers) -> None:
    """Register this area's verbs alone on `verbs`, a parser's subcommands (a test
    rig's parser). `verb` is not used: the area declares its own verbs."""
    del verb
    register(verbs, VERBS)
