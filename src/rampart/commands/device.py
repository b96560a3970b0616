"""The device's verbs, run as root on the updated machine: `rampart update`, `status`,
`mark-good`, `boot-once`, `install`, `identity`, `remote show|set`, `tpm status|reseal`.

Only the standard library and `cryptography` are imported to declare them; the
device modules that do the work are imported when a verb runs.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path
from typing import Any

from rampart import files
from rampart.commands.common import JSON, Arg, Group, Verb, arg, print_json, seconds
from rampart.contracts.bootloader import STEPS
from rampart.contracts.version import parse_version
from rampart.device import config as device_config
from rampart.errors import LocalError, UsageError, VerificationError

log = logging.getLogger("rampart")


def _device_parts(args: argparse.Namespace) -> tuple[Any, Any]:
    config = device_config.load_device_config(args.config)
    identity = device_config.load_identity(args.os_release, args.machine_id)
    return config, identity


# --- update, status, boot-once, install ---------------------------------------------


def cmd_update(args: argparse.Namespace) -> int:
    from rampart.device import update

    config, identity = _device_parts(args)
    remote = device_config.load_remote_config(args.remote)
    # A pinned TUF root: the one `rampart install` wrote, else the one Core carries.
    pinned = (args.remote / "root.json", args.config / "root.json")
    device = update.open_device(config, remote, identity, args.tmp, args.run_dir, pinned)
    fetcher = update.make_fetcher(device)
    if sys.stderr.isatty() and not args.json:
        from rampart.device.progress import Bar

        fetcher.progress = Bar(sys.stderr, "download ").update
    result = update.update(device, fetcher)  # reports to the server itself
    if args.json:
        print_json(result.to_json())
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
        print_json(report)
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
        print_json({"version": version.core, "entry": chosen})
    else:
        print(f"{chosen}: boots once at the next boot; the default entry is unchanged")
    return 0


def cmd_remote_show(args: argparse.Namespace) -> int:
    from rampart.device import remote

    doc = remote.show(args.remote)
    if args.json:
        print_json(doc)
        return 0
    for key in remote.KEYS:
        print(f"{key}: {doc[key] or '-'}")
    for cert in doc["root_ca"]:
        print(f"root CA: {cert['subject']} (SHA-256 {cert['sha256']}, until {cert['not_after']})")
    return 0


def cmd_remote_set(args: argparse.Namespace) -> int:
    from rampart.device import remote

    changes = {
        key: value
        for key, value in (
            ("update_url", args.update_url),
            ("dist_url", args.dist_url),
            ("tuf_url", args.tuf_url),
            ("channel", args.channel),
        )
        if value is not None
    }
    root_ca = None
    if args.root_ca is not None:
        if str(args.root_ca) == "-":
            root_ca = sys.stdin.buffer.read(remote.MAX_CA_BYTES + 1)
        else:
            root_ca = files.read_small(args.root_ca, "root CA", remote.MAX_CA_BYTES)
    result = remote.set_remote(args.remote, changes, root_ca)
    if args.json:
        print_json(result)
    elif result["changed"]:
        print(f"remote configuration changed: {', '.join(result['changed'])}")
    else:
        print("remote configuration unchanged")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from rampart.device import installer

    result = installer.install(
        args.target,
        args.payload,
        config_dir=args.config_dir,
        os_release=args.os_release,
        esp_size=device_config.parse_size(args.esp_size, "--esp-size"),
        state_size=device_config.parse_size(args.state_size, "--state-size"),
        wipe=args.wipe,
        no_tpm=args.no_tpm,
    )
    if args.json:
        print_json(result.to_json())
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
        if result.identity:
            print(_identity_text(result.machine_id, result.identity), end="")
    return 0


def _identity_text(machine_id: str, described: dict[str, str]) -> str:
    kind = "TPM key" if described["kind"] == "tpm" else "key file"
    return (
        f"Identity of machine {machine_id} ({kind}, fingerprint {described['key_id']}); "
        "admit it on the server with `rampart machine admit`:\n"
        f"{described['public_key']}"
    )


def cmd_identity(args: argparse.Namespace) -> int:
    from rampart.device import identity, tpm

    config, machine = _device_parts(args)
    machine_tpm = tpm.device_tpm(config.tpm_tcti, required=config.tpm_required)
    key = identity.ensure(config.identity_dir, machine_tpm)
    described = identity.describe(key)
    if args.json:
        print_json({"machine_id": machine.machine_id, **described})
    else:
        print(_identity_text(machine.machine_id, described), end="")
    return 0


# --- the TPM ------------------------------------------------------------------------


def _state_volume(config: Any) -> Path:
    from rampart.device.installer import STATE_LV

    return Path("/dev") / str(config.core_destination) / STATE_LV


def _esp_root(config: Any) -> Path:
    from rampart.device.installer import esp_root

    root: Path = esp_root(config.esp_directory)
    return root


def _read_passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file is not None:
        data = files.read_small(args.passphrase_file, "passphrase file", 4096)
        text = data.decode("utf-8", errors="replace").strip()
    elif sys.stdin.isatty():
        text = getpass.getpass("Recovery passphrase of the state partition: ").strip()
    else:
        text = sys.stdin.readline(4096).strip()
    if not text:
        raise UsageError("no recovery passphrase given")
    return text


def _pcr7_sealed(config: Any) -> dict[str, Any] | None:
    """The PCR 7 values `secureboot apply` or an update sealed the state key to: the
    value of the boot that sealed it, then those predicted for the next boot."""
    from rampart.device import secureboot

    sealed = secureboot.read_record(config.loader_dir).get("sealed")
    if not isinstance(sealed, dict) or not sealed.get("pcr7"):
        return None
    values = list(sealed["pcr7"])
    return {"sealed_at": values[0], "predicted": values[1:], "why": sealed.get("why")}


def _tpm_report(config: Any) -> dict[str, Any]:
    """What `tpm status` shows: the TPM, Secure Boot, PCRs, the sealed key, the counter."""
    from rampart.device import state, tpm

    machine_tpm = tpm.device_tpm(config.tpm_tcti, required=config.tpm_required)
    esp = _esp_root(config)
    pub, priv, pcr_file = state.sealed_paths(esp)
    report: dict[str, Any] = {
        "tpm": machine_tpm is not None,
        "secure_boot": tpm.secure_boot_enabled(),
        "sealed_object": str(priv) if priv.is_file() and pub.is_file() else None,
        "sealed_to": pcr_file.read_text().strip() if pcr_file.is_file() else None,
        "sealed_branches": len(state.sealed_branches(esp)),
        "pcr7_sealed": _pcr7_sealed(config),
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
                machine_tpm.unseal(pub, priv, config.tpm_pcrs, state.sealed_branches(esp))
                report["unseals"] = True
            except LocalError as exc:
                report["unseals"] = False
                report["unseal_error"] = str(exc)
    return report


def cmd_tpm_status(args: argparse.Namespace) -> int:
    config, _identity = _device_parts(args)
    report = _tpm_report(config)
    if args.json:
        print_json(report)
        return 0
    print(f"TPM: {'present' if report['tpm'] else 'none'}")
    print(f"Secure Boot: {'enabled' if report['secure_boot'] else 'disabled'}")
    for number, value in report["pcrs"].items():
        print(f"PCR {number} (sha256): {value}")
    print(f"sealed state key: {report['sealed_object'] or 'none'}", end="")
    print(f" (sealed to {report['sealed_to']})" if report["sealed_to"] else "")
    sealed = report["pcr7_sealed"]
    if sealed is not None:
        print(f"PCR 7 when sealed: {sealed['sealed_at']}")
        for value in sealed["predicted"]:
            print(f"PCR 7 predicted for the next boot: {value} ({sealed['why']})")
    if report["unseals"] is not None:
        print(f"unseals now: {'yes' if report['unseals'] else 'no: ' + report['unseal_error']}")
    print(f"rollback counter: {report['rollback_counter']}")
    return 0


def cmd_tpm_reseal(args: argparse.Namespace) -> int:
    from rampart.device import secureboot, state, tpm

    config, _identity = _device_parts(args)
    machine_tpm = tpm.Tpm(config.tpm_tcti) if tpm.present(config.tpm_tcti) else None
    if machine_tpm is None:
        raise LocalError(f"no TPM ({config.tpm_tcti}): there is nothing to seal the key to")
    volume = args.volume or _state_volume(config)
    esp = args.esp or _esp_root(config)
    passphrase = _read_passphrase(args)
    state.reseal(volume, esp, machine_tpm, passphrase, config.tpm_pcrs)
    secureboot.forget_sealing(config.loader_dir)
    selection = tpm.pcr_selection(config.tpm_pcrs)
    if args.json:
        print_json({"volume": str(volume), "sealed_to": selection, "keyslot": tpm.TPM_KEYSLOT})
    else:
        print(
            f"{volume}: state key resealed to the current PCR {selection} "
            f"(keyslot {tpm.TPM_KEYSLOT} replaced); the next boot opens it without a prompt"
        )
    return 0


def cmd_bootloader_status(args: argparse.Namespace) -> int:
    from rampart.device import bootloader
    from rampart.device.esp import Esp

    config = device_config.load_device_config(args.config)
    found = bootloader.status(
        Esp(config.esp_directory, config.os_name), config.loader_dir, config.efivars
    )
    if args.json:
        print_json(found)
        return 0
    print(bootloader.render_status(found))
    return 0


def cmd_secureboot_status(args: argparse.Namespace) -> int:
    from rampart.device import secureboot

    config = device_config.load_device_config(args.config)
    found = secureboot.status(config.loader_dir)
    if args.json:
        print_json(found)
    else:
        print(secureboot.render_status(found))
    return 0


def cmd_secureboot_apply(args: argparse.Namespace) -> int:
    from rampart.device import secureboot
    from rampart.device.esp import Esp

    config, identity = _device_parts(args)
    esp = Esp(config.esp_directory, config.os_name)
    seal = secureboot.sealing(config.efivars, esp, config.tpm_tcti, config.tpm_pcrs)
    done = secureboot.apply(
        esp, config.loader_dir, identity.version, config.efivars, seal, halt_at=args.halt_at
    )
    loader = None if done.loader is None else done.loader.version
    if args.json:
        print_json(
            {
                "applied": done.applied,
                "refused": done.refused,
                "loader": loader,
                "resealed": done.resealed,
            }
        )
    else:
        for variable in done.applied:
            print(f"applied the {variable} append")
        for reason in done.refused:
            print(f"refused: {reason}")
        if loader is not None:
            print(f"installed {loader}")
        if done.resealed:
            print("state key sealed again for PCR 7 now and at the next boot")
        if not (done.applied or done.refused or loader or done.resealed):
            print("nothing to apply")
    return VerificationError.exit_code if done.refused else 0


def cmd_bootloader_install(args: argparse.Namespace) -> int:
    from rampart.device import bootloader
    from rampart.device.esp import Esp

    config, identity = _device_parts(args)
    esp = Esp(config.esp_directory, config.os_name)
    done = bootloader.install(
        esp, config.loader_dir, identity.version, config.efivars, halt_at=args.halt_at
    )
    if args.json:
        print_json(
            None
            if done is None
            else {"installed": done.version, "boot_option": done.boot_option, "copies": done.copies}
        )
    elif done is None:
        print("no boot loader to install")
    else:
        print(f"installed {done.version}: {', '.join(done.copies)}")
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
        print_json(
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


# --- the verbs ----------------------------------------------------------------------


def device_options(remote: bool) -> tuple[Arg, ...]:
    """Where a device verb finds its configuration, identity and runtime state."""
    c = device_config
    config = arg(
        "-c",
        "--config",
        type=Path,
        default=c.DEFAULT_CONFIG_DIR,
        metavar="DIR",
        help=f"system config dir: config.toml, pubkey (default {c.DEFAULT_CONFIG_DIR})",
    )
    remote_options = (
        arg(
            "-r",
            "--remote",
            type=Path,
            default=c.DEFAULT_REMOTE_DIR,
            metavar="DIR",
            help=f"remote config dir: remote.toml, rootca.pem (default {c.DEFAULT_REMOTE_DIR})",
        ),
        arg(
            "-t",
            "--tmp",
            type=Path,
            default=c.DEFAULT_DOWNLOAD_DIR,
            metavar="DIR",
            help=f"download directory (default {c.DEFAULT_DOWNLOAD_DIR})",
        ),
    )
    return (
        config,
        *(remote_options if remote else ()),
        arg(
            "--os-release",
            type=Path,
            default=c.DEFAULT_OS_RELEASE,
            metavar="FILE",
            help=f"where VERSION_ID is read (default {c.DEFAULT_OS_RELEASE})",
        ),
        arg(
            "--machine-id",
            type=Path,
            default=c.DEFAULT_MACHINE_ID,
            metavar="FILE",
            help=f"the machine identity (default {c.DEFAULT_MACHINE_ID})",
        ),
        arg(
            "--run-dir",
            type=Path,
            default=c.DEFAULT_RUN_DIR,
            metavar="DIR",
            help=f"runtime state, update-ready marker (default {c.DEFAULT_RUN_DIR})",
        ),
        arg("-v", "--verbose", action="store_true", help="log each step"),
    )


LOCAL = device_options(remote=False)
REMOTE_DIR = arg(
    "-r",
    "--remote",
    type=Path,
    default=device_config.DEFAULT_REMOTE_DIR,
    metavar="DIR",
    help=f"remote config dir: remote.toml, rootca.pem (default {device_config.DEFAULT_REMOTE_DIR})",
)

VERBS: list[Group | Verb] = [
    Verb(
        ("update",),
        "check for, download and install an update (device side, as root)",
        "Run the update transaction once: ask the server for the latest version, download "
        "and verify the UKI and Core (in an unprivileged process), remove stale boot "
        "entries, write Core into the unused slot, install the boot entry last, and mark "
        "the update ready. Safe to interrupt at any point; a rerun completes the job. "
        "Exit codes: 0 up to date, 20 updated (reboot to use it), 21 an update already "
        "waits for a reboot, otherwise an error code below.",
        cmd_update,
        (
            JSON,
            *device_options(remote=True),
            arg(
                "--no-reboot",
                action="store_true",
                help="do not reboot even if config.toml asks for it",
            ),
        ),
        exit_codes=True,
    ),
    Verb(
        ("identity",),
        "show this machine's identity key, for enrollment on the server",
        "Print the machine ID and the public part of this device's identity key: the TPM's "
        "(an ECC P-256 key that never leaves it, created once) or, without a TPM, an "
        "Ed25519 key in [identity] dir (mode 0600). It is made now if the device has "
        "none (`rampart install` makes it). The server admits the machine with "
        '`rampart machine admit MACHINE_ID --key FILE` (docs/server.md "Device '
        'identity"); from then on its checks and reports are signed with it.',
        cmd_identity,
        (JSON, *LOCAL),
        exit_codes=True,
    ),
    Verb(
        ("status",),
        "show the running version, slots, boot entries and pending update",
        "Show the running version, the Core slots, the boot entries on the ESP (with boot "
        "counters) and whether an update waits for a reboot.",
        cmd_status,
        (JSON, *LOCAL),
        exit_codes=True,
    ),
    Verb(
        ("mark-good",),
        "remove the boot counter of the running version's entry",
        "Mark the running version good: remove the +tries counter from its boot entry, as "
        "systemd-bless-boot does; then, on a machine with a TPM, raise its rollback counter "
        "to the lowest security epoch among the installed, bootable versions. Run by the "
        "health check once the system is up.",
        cmd_mark_good,
        (
            JSON,
            *LOCAL,
            arg(
                "--wait-esp",
                type=seconds,
                default=0.0,
                metavar="SECONDS",
                help="wait up to SECONDS for the ESP directory to appear (a slow boot mounts "
                "the ESP late; rampart-mark-good.service waits 300); default: do not wait",
            ),
        ),
        exit_codes=True,
    ),
    Verb(
        ("boot-once",),
        "boot another installed version at the next boot only (manual rollback)",
        "Set systemd-boot's one-shot entry (the LoaderEntryOneShot EFI variable) to the "
        "boot entry of VERSION: the next boot runs it, the boot after that the default "
        "again. Refuses a version without an entry or whose boot counter ran out.",
        cmd_boot_once,
        (JSON, arg("target_version", metavar="VERSION"), *LOCAL),
        exit_codes=True,
    ),
    Verb(
        ("install",),
        "install this Core's version on an empty disk (installer, as root)",
        "Partition DISK (GPT: ESP and LVM), create the volume group with core_<V> and "
        "core_state, write the running Core's version from the payload directory, check it "
        "against the root hash of its signed UKI, fill the state partition and the "
        "ESP (last). Reads the layout from the device configuration (-c). Refuses a disk "
        "that holds anything unless --wipe. The payload directory is described in "
        "docs/formats.md; the testbed's installer initramfs runs this verb.",
        cmd_install,
        (
            JSON,
            arg("--target", type=Path, required=True, metavar="DISK", help="e.g. /dev/vda"),
            arg("--payload", type=Path, required=True, metavar="DIR"),
            arg(
                "-c",
                "--config-dir",
                type=Path,
                default=Path("/usr/lib/rampart"),
                metavar="DIR",
                help="system configuration (config.toml); default /usr/lib/rampart",
            ),
            arg("--os-release", type=Path, default=Path("/etc/os-release"), metavar="FILE"),
            arg("--esp-size", default="256M", metavar="SIZE", help="default 256M"),
            arg("--state-size", default="512M", metavar="SIZE", help="default 512M"),
            arg("--wipe", action="store_true", help="erase a disk that holds something"),
            arg(
                "--no-tpm",
                action="store_true",
                help="do not seal the state key (a machine without a TPM): every boot asks "
                "for the recovery passphrase",
            ),
        ),
        exit_codes=True,
    ),
    Group(
        ("bootloader",),
        "the boot loader on the ESP: status, install the running release's",
        "A release may carry systemd-boot, signed for Secure Boot; the update stages it, and "
        "`bootloader install` (rampart-bootloader.service, after mark-good) writes its two "
        "copies on the ESP one after the other, each verified before the next "
        '(docs/client.md, "Boot loader updates").',
        dest="bootloader_verb",
    ),
    Verb(
        ("bootloader", "status"),
        "show the boot loader's copies, the running one, the boot option and what is staged",
        "Show the LoaderInfo of each copy on the ESP (EFI/systemd/systemd-bootx64.efi, "
        "EFI/BOOT/BOOTX64.EFI), of the loader that started this boot (the LoaderInfo EFI "
        "variable), the boot option that names the main copy, and the loaders staged.",
        cmd_bootloader_status,
        (JSON, *LOCAL),
        exit_codes=True,
    ),
    Verb(
        ("bootloader", "install"),
        "install the boot loader staged for the running version, once it is marked good",
        "Install the boot loader the running release carries (staged by the update): "
        "refused before the running version is marked good, and unless its Secure Boot "
        "signature verifies with a certificate of the firmware's db and dbx revokes "
        "neither its hash nor its signer. Writes the main copy, makes sure a boot option "
        "names it (efibootmgr), then the fallback copy. Nothing staged: nothing done.",
        cmd_bootloader_install,
        (
            JSON,
            *LOCAL,
            arg(
                "--halt-at",
                choices=STEPS,
                metavar="STEP",
                help="for power-cut tests: stop at STEP and wait to be powered off "
                f"(one of {', '.join(STEPS)})",
            ),
        ),
        exit_codes=True,
    ),
    Group(
        ("secureboot",),
        "Secure Boot variable updates: status, apply the running release's",
        "A release may carry signed appends to the firmware's db and dbx (rampart keys "
        "db-append|dbx-append); the update stages them, and `secureboot apply` "
        "(rampart-bootloader.service, after mark-good) applies them with the boot loader, "
        "keeping the sealed state key in step with PCR 7 "
        '(docs/client.md, "Secure Boot variable updates").',
        dest="secureboot_verb",
    ),
    Verb(
        ("secureboot", "status"),
        "show the Secure Boot updates applied, refused or staged, and the sealed PCR 7",
        "Show each db or dbx append this device recorded (applied, refused by Rampart's "
        "checks, or rejected by the firmware), those staged, and the PCR 7 values the "
        "state key is sealed to.",
        cmd_secureboot_status,
        (JSON, *LOCAL),
        exit_codes=True,
    ),
    Verb(
        ("secureboot", "apply"),
        "apply the running version's db append, boot loader and dbx append",
        "Once the running version is marked good, in this order: its db append, its boot "
        "loader (as `bootloader install`), its dbx append. A dbx append that would make "
        "the firmware refuse an installed boot loader copy or the UKI of an installed "
        "version not marked bad is refused (the images named; nothing written). Before a "
        "write the state key is sealed again so that it unseals with PCR 7 now and at the "
        "next boot (predicted from the firmware's event log). Exits 11 if an update was "
        "refused or the firmware rejected it (the rest is applied).",
        cmd_secureboot_apply,
        (
            JSON,
            *LOCAL,
            arg(
                "--halt-at",
                choices=STEPS,
                metavar="STEP",
                help="for power-cut tests: stop the boot loader install at STEP",
            ),
        ),
        exit_codes=True,
    ),
    Group(
        ("remote",),
        "the remote configuration: the update server's addresses and pinned CA",
        "remote.toml and rootca.pem in the remote directory (/etc/rampart, on the state "
        "partition): what an administrator owns (docs/client.md). The admin role runs "
        "`remote set` through sudo (docs/hardening.md).",
        dest="remote_verb",
    ),
    Verb(
        ("remote", "show"),
        "the update server's addresses, the channel and the pinned root CA",
        "Print remote.toml's values as `rampart update` reads them, and the subject, "
        "SHA-256 fingerprint and expiry of each certificate of rootca.pem.",
        cmd_remote_show,
        (JSON, REMOTE_DIR),
        exit_codes=True,
    ),
    Verb(
        ("remote", "set"),
        "change the update server's addresses, the channel or the pinned root CA",
        "Change the given keys of remote.toml and, with --root-ca, replace rootca.pem "
        "(FILE, or - for standard input). The whole new configuration is checked as "
        "`rampart update` reads it (HTTPS URLs without credentials, a channel name, "
        "PEM certificates that are CAs) before anything is written; then each file is "
        "replaced whole, the CA first. A refused change leaves both as they were.",
        cmd_remote_set,
        (
            JSON,
            arg("--update-url", metavar="URL", help="where version checks go (https://)"),
            arg("--dist-url", metavar="URL", help="where releases are downloaded (https://)"),
            arg("--tuf-url", metavar="URL", help="the TUF metadata (https://)"),
            arg("--channel", metavar="NAME", help="the channel a device in TUF mode follows"),
            arg("--root-ca", type=Path, metavar="FILE", help="the new pinned root CA, - for stdin"),
            REMOTE_DIR,
        ),
        exit_codes=True,
    ),
    Group(
        ("tpm",),
        "the TPM side of trusted boot: status, reseal the state key",
        "The state partition's key is sealed to the TPM under a policy on PCR 7 "
        "(the Secure Boot state); the TPM's NV counter holds the lowest security epoch "
        "allowed to boot. See the README's trust model.",
        dest="tpm_verb",
    ),
    Verb(
        ("tpm", "status"),
        "TPM, Secure Boot, PCR values, sealed key, rollback counter",
        "Show whether the machine has a TPM, whether Secure Boot is on, the "
        "configured PCR values, the sealed state key on the ESP and whether the TPM "
        "unseals it now (the key itself is never shown), and the rollback counter.",
        cmd_tpm_status,
        (JSON, *LOCAL),
    ),
    Verb(
        ("tpm", "reseal"),
        "seal the state key again for the current PCR values (with the passphrase)",
        "After a legitimate change of the Secure Boot keys (PCR 7 changed, so "
        "the boot asked for the recovery passphrase): check the recovery passphrase, seal "
        "a new random key to the current PCR values, store it on the ESP and replace "
        "keyslot 0 with it. The passphrase is read from --passphrase-file, the terminal, "
        "or the first line of stdin. A crash at any point leaves the passphrase working.",
        cmd_tpm_reseal,
        (
            JSON,
            arg("--passphrase-file", type=Path, metavar="FILE"),
            arg(
                "--volume",
                type=Path,
                metavar="DEV",
                help="the LUKS2 volume (default /dev/<VG>/core_state)",
            ),
            arg("--esp", type=Path, metavar="DIR", help="the ESP's mount point"),
            *LOCAL,
        ),
    ),
]
