"""The build machine's image verbs: `rampart build efiboot|esp`, `rampart inspect
efiboot`, `rampart keys secureboot|ovmf-vars`.

Registered on the CLI's subparsers by `add_verbs`, which returns the group
subparsers (`{"build": ..., "inspect": ..., "keys": ...}`) so other modules can
add verbs to the same groups (`rampart build core`). The `build` extra (pefile,
virt-firmware), which a device does not have, is only imported when a verb runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rampart.contracts import coremeta, wire
from rampart.contracts.cmdline import check_extra_param
from rampart.contracts.version import parse_version
from rampart.contracts.wire import check_name
from rampart.errors import ConflictError, UsageError
from rampart.vendor import secureboot, uki

Verb = Callable[[str, str, str], argparse.ArgumentParser]

DEFAULT_VG = "mainvg"


def _emit(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_build_efiboot(args: argparse.Namespace) -> int:
    check_name(args.os, "OS name")
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
        _emit(image.to_json())
    else:
        state = "signed by " + ", ".join(image.signers) if image.signed else "unsigned"
        print(f"{image.path}: {args.os} {image.version} (kernel {image.uname}), {state}")
    return 0


def cmd_inspect_efiboot(args: argparse.Namespace) -> int:
    image = uki.inspect(args.file)
    if args.json:
        _emit(image.to_json())
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
        _emit(
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
        _emit({"vars": str(out), "template": str(args.template), "secure_boot": True})
    else:
        print(f"{out}: OVMF variables with PK, KEK and db from {args.keys}; Secure Boot on")
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
        _emit(
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
    from rampart.vendor import core

    meta = core.build_core(
        args.rootfs, parse_version(args.version), args.out, args.fec, args.compress
    )
    if args.json:
        _emit(meta.to_json())
    else:
        print(
            f"{args.out}/core-{meta.version}.img: {meta.bundle_size} bytes, verity root hash "
            f"{meta.verity.root_hash}{', with FEC' if args.fec else ''}"
        )
    return 0


def cmd_build_initramfs(args: argparse.Namespace) -> int:
    from rampart.vendor import initramfs

    image = initramfs.build_initramfs(args.out, args.kernel_deb, installer=args.installer)
    if args.json:
        _emit(image.to_json())
    else:
        print(
            f"{image.path}: initramfs for kernel {image.kernel_release}, "
            f"{len(image.modules)} modules, {image.size} bytes, sha256 {image.sha256}"
        )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Root tree + kernel + initramfs -> Core, signed EFI binary, published release."""
    from rampart.contracts import signing
    from rampart.vendor import core, webroot

    version = parse_version(args.version)
    if version.build:
        raise UsageError(f"version {args.version}: build metadata is not allowed in a release")
    check_name(args.os, "OS name")
    uki.check_signing_pair(args.sign_key, args.sign_cert)
    password_env = args.password_env
    from rampart.commands.common import password_source

    # Cheap checks first: nothing is built for a release that cannot be published.
    for param in args.extra_cmdline:
        check_extra_param(param)
    check_name(args.vg, "volume group")
    if args.channel is not None:
        check_name(args.channel, "channel name")
    published = wire.release_dir(args.webroot, version) / f"{args.os}-core"
    if published.exists():
        raise ConflictError(
            f"{published}: {args.os} {version.core} is already published; release a new version"
        )
    secret = signing.load_secret_key(args.secret_key, password_source(password_env, False))
    out: Path = args.out
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
    result = webroot.publish(
        args.webroot,
        args.os,
        version,
        out / f"core-{version.core}.img",
        efiboot,
        secret,
        args.channel,
        args.force,
    )
    if args.json:
        _emit(
            {
                "version": version.core,
                "core": meta.to_json(),
                "efiboot": image.to_json(),
                "release": str(result.release),
                "version_file": str(result.version_file),
            }
        )
    else:
        print(
            f"{result.release}: {args.os} {version.core} built and published (root hash "
            f"{meta.verity.root_hash}, EFI binary signed by {', '.join(image.signers)})"
        )
    return 0


def _add_epoch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epoch",
        type=int,
        metavar="N",
        help="security epoch (rampart.epoch=N on the command line): a device whose TPM "
        "counter is above N refuses to boot or install this version (offline rollback "
        "protection)",
    )


def _add_compress(p: argparse.ArgumentParser) -> None:
    from rampart.vendor.core import COMPRESSIONS

    p.add_argument(
        "--compress",
        choices=sorted(COMPRESSIONS),
        metavar="ALGO",
        help="compress the squashfs (" + ", ".join(sorted(COMPRESSIONS)) + "): a smaller "
        "Core to download and write, for CPU at every read on the device; default: none, "
        "as CLIP OS",
    )


def add_verbs(verb: Verb, verbs: Any) -> dict[str, Any]:
    """Register `build`, `inspect` and `keys` and their image leaves.

    Returns the groups' subparsers actions by name, for other modules to add
    leaves to (`build core`). `verb` is unused: every verb here is a group.
    """
    del verb

    def group(name: str, help_text: str, dest: str) -> Any:
        parser = verbs.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=dest, metavar="WHAT", required=True)

    def leaf(sub: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=description
        )
        parser.add_argument("--json", action="store_true", help="print a JSON object on stdout")
        return parser

    build = group("build", "build release artefacts (vendor side)", "build_verb")
    inspect = group("inspect", "show what a release artefact contains", "inspect_verb")
    keys = group("keys", "create Secure Boot keys and firmware variable stores", "keys_verb")

    p = leaf(
        build,
        "efiboot",
        "build the Unified Kernel Image that boots one Core",
        "Assemble a Unified Kernel Image on systemd's EFI stub: .osrel (IMAGE_VERSION=V), "
        ".cmdline (the Core LV and its verity root hash, offsets and the hardening "
        "parameters), .uname, .sbat, .initrd and .linux (an x86 bzImage). Signed for "
        "Secure Boot with --sign-key/--sign-cert (sbsign). Written under a temporary name "
        "and renamed last; an existing --out is never overwritten.",
    )
    p.add_argument("--kernel", type=Path, required=True, metavar="FILE", help="x86 bzImage")
    p.add_argument("--initrd", type=Path, required=True, metavar="FILE", help="initramfs")
    p.add_argument("--os", required=True, metavar="NAME", help="OS name, e.g. clipos")
    p.add_argument("--version", required=True, metavar="V", help="semantic version of Core")
    p.add_argument(
        "--core-meta",
        type=Path,
        required=True,
        metavar="FILE",
        help="Core metadata JSON from `rampart build core` (roothash, hash_offset, "
        "data_blocks; salt, fec_offset, fec_roots when present)",
    )
    p.add_argument(
        "--vg",
        default=DEFAULT_VG,
        metavar="NAME",
        help=f"volume group holding the Core LVs (default {DEFAULT_VG})",
    )
    p.add_argument(
        "--extra-cmdline",
        action="append",
        default=[],
        metavar="S",
        help="kernel parameters appended to the command line (repeatable), e.g. "
        "console=ttyS0; may not redefine root, ro, init, lockdown or the verity parameters",
    )
    p.add_argument(
        "--lockdown",
        choices=("confidentiality", "integrity", "none"),
        default="confidentiality",
        help="kernel lockdown level on the command line (default confidentiality)",
    )
    p.add_argument(
        "--uname",
        metavar="RELEASE",
        help="kernel release for .uname when the bzImage header has none",
    )
    _add_epoch(p)
    p.add_argument(
        "--stub",
        type=Path,
        default=uki.STUB,
        metavar="FILE",
        help="unsigned systemd EFI stub (default: Debian's systemd-boot-efi)",
    )
    p.add_argument("--sign-key", type=Path, metavar="FILE", help="db key (PEM) to sign with")
    p.add_argument("--sign-cert", type=Path, metavar="FILE", help="db certificate (PEM)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.set_defaults(func=cmd_build_efiboot)

    p = leaf(
        build,
        "esp",
        "lay out an ESP tree: signed systemd-boot, loader.conf, UKIs",
        "Create DIR with EFI/BOOT/BOOTX64.EFI (systemd-boot signed with KEYS/db), "
        "loader/loader.conf (editor no, --menu-timeout, auto-firmware no) and the given UKIs in "
        "EFI/Linux/. Each UKI must verify with KEYS/db.crt unless --allow-unsigned. DIR "
        "must not exist; it appears complete or not at all.",
    )
    p.add_argument("ukis", type=Path, nargs="*", metavar="UKI")
    p.add_argument("--keys", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--systemd-boot",
        type=Path,
        default=secureboot.SYSTEMD_BOOT,
        metavar="FILE",
        help="unsigned systemd-boot (default: Debian's systemd-boot-efi)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="copy UKIs that db does not sign (to test that firmware refuses them)",
    )
    p.add_argument(
        "--menu-timeout",
        type=int,
        default=secureboot.MENU_TIMEOUT,
        metavar="S",
        help=f"seconds systemd-boot shows its menu (default {secureboot.MENU_TIMEOUT}; 0 hides "
        "it unless a key is held at boot)",
    )
    p.set_defaults(func=cmd_build_esp)

    p = leaf(
        inspect,
        "efiboot",
        "show a UKI's version, command line, root hash and signer",
        "Read a Unified Kernel Image: its .osrel version, .cmdline, the verity root hash "
        "the command line pins, .uname, and the subjects of the certificates that signed it.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_inspect_efiboot)

    p = leaf(
        keys,
        "secureboot",
        "create PK, KEK and db keys and certificates",
        "Create RSA 2048 keys and self-signed X.509 certificates for PK, KEK and db, and "
        "an owner GUID, in DIR: PK.key PK.crt KEK.key KEK.crt db.key db.crt owner.guid. "
        "Keys are mode 0600; nothing is written if any of these files exists.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--common-name",
        default="Rampart",
        metavar="CN",
        help="prefix of the certificates' common names (default Rampart)",
    )
    p.set_defaults(func=cmd_keys_secureboot)

    p = leaf(
        keys,
        "ovmf-vars",
        "an OVMF variable store enrolling the keys, Secure Boot on",
        "Copy the empty OVMF variable store and enroll DIR's PK, KEK and db (no Microsoft "
        "keys) with virt-fw-vars --sb. The result is checked before it is renamed to VARS; "
        "an existing VARS is never overwritten.",
    )
    p.add_argument("--keys", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="VARS")
    p.add_argument(
        "--template",
        type=Path,
        default=secureboot.OVMF_VARS_TEMPLATE,
        metavar="FILE",
        help="empty variable store (default /usr/share/OVMF/OVMF_VARS_4M.fd)",
    )
    p.set_defaults(func=cmd_keys_ovmf_vars)

    p = leaf(
        build,
        "core",
        "build the verity-protected Core image from a root tree",
        "Make a reproducible squashfs of ROOTFS (uncompressed unless --compress) and append "
        "its dm-verity hash tree (and, with --fec, Reed-Solomon parity), as CLIP OS bundles "
        "Core. Writes "
        "DIR/core-V.img and DIR/core-V.json (root hash, salt, offsets, sizes, SHA-256) under "
        "temporary names, renamed last.",
    )
    p.add_argument("rootfs", type=Path, metavar="ROOTFS")
    p.add_argument("--version", required=True, metavar="V")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--fec", action="store_true", help="append forward error correction")
    _add_compress(p)
    p.set_defaults(func=cmd_build_core)

    p = leaf(
        build,
        "initramfs",
        "build the initramfs that opens Core with dm-verity and switches root",
        "Write a gzip'ed cpio: busybox, lvm and veritysetup with their libraries, the boot "
        "kernel modules of the kernel in the Debian package (and their dependencies), and "
        "an /init that activates the Core LV named on the command line "
        "(rampart.core=VG/core_V), opens it with dm-verity and the root hash and offsets "
        "given there, mounts it read-only as /, mounts VG/core_state on /mnt/state and "
        "switches root; any failure prints one line and powers off. Reproducible; an "
        "existing --out is replaced atomically.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument(
        "--kernel-deb",
        type=Path,
        metavar="FILE",
        help="Debian linux-image package whose modules to include (default: the one "
        "`make setup` keeps in $RAMPART_CACHE, /var/tmp/rampart-cache)",
    )
    p.add_argument(
        "--installer",
        action="store_true",
        help="the installer's initramfs instead: with the device's command line plus "
        "rampart.install.target=/dev/DISK and rampart.install.payload=/dev/DISK, it opens "
        "core-V.img on the payload disk with dm-verity and runs `rampart install` in it",
    )
    p.set_defaults(func=cmd_build_initramfs)

    p = verbs.add_parser(
        "release",
        help="build Core and the signed EFI binary from a root tree, and publish them",
        description="From a root tree, a kernel and an initramfs: build Core (`build core`), "
        "the Secure Boot-signed Unified Kernel Image that boots it (`build efiboot`), and "
        "publish both into the webroot (`publish`), in one command.",
    )
    p.add_argument("rootfs", type=Path, metavar="ROOTFS")
    p.add_argument("--version", required=True, metavar="V")
    p.add_argument("--os", required=True, metavar="NAME")
    p.add_argument("--kernel", type=Path, required=True, metavar="FILE")
    p.add_argument("--initrd", type=Path, required=True, metavar="FILE")
    p.add_argument(
        "--sign-key", type=Path, required=True, metavar="FILE", help="Secure Boot db key"
    )
    p.add_argument(
        "--sign-cert", type=Path, required=True, metavar="FILE", help="Secure Boot db certificate"
    )
    p.add_argument(
        "--secret-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="minisign key that signs the release",
    )
    p.add_argument("--webroot", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where the build products are kept"
    )
    p.add_argument(
        "--vg",
        default=DEFAULT_VG,
        metavar="NAME",
        help=f"volume group of the Core LVs (default {DEFAULT_VG})",
    )
    p.add_argument(
        "--extra-cmdline",
        action="append",
        default=[],
        metavar="S",
        help="kernel parameter appended to the command line (repeatable)",
    )
    p.add_argument(
        "--uname",
        metavar="RELEASE",
        help="kernel release for .uname when the bzImage does not carry it",
    )
    _add_epoch(p)
    p.add_argument("--fec", action="store_true")
    _add_compress(p)
    p.add_argument("--channel", metavar="C")
    p.add_argument("--force", action="store_true")
    p.add_argument("--password-env", default="RAMPART_PASSWORD", metavar="VAR")
    p.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    p.set_defaults(func=cmd_release)
    return {"build": build, "inspect": inspect, "keys": keys}
