"""The `rampart testbed` verbs: build, run, demo.

The testbed's modules (QEMU, debootstrap, the update server) are imported when a
verb runs.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from rampart.commands.common import JSON, Group, Verb, arg, print_json
from rampart.errors import LocalError, UsageError

log = logging.getLogger(__name__)


def default_checkout() -> Path:
    """The checkout this package runs from (src layout), if it is one."""
    import rampart

    return Path(rampart.__file__).resolve().parents[2]


def _checkout(args: argparse.Namespace) -> Path:
    checkout: Path = args.checkout or default_checkout()
    if not (checkout / "src/rampart/cli.py").is_file():
        raise UsageError(f"{checkout}: not a Rampart checkout; pass --checkout DIR")
    return checkout


def _say(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.0f} s] {text}", flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from rampart.testbed import build

    bed = build.build(_checkout(args), args.cache)
    manifest = bed.manifest()
    if args.json:
        print_json({"directory": str(bed.directory), **manifest})
    else:
        print(f"{bed.directory}: testbed for {', '.join(manifest['versions'])}")
        for step, seconds in manifest["timings"].items():
            print(f"  {step}: {seconds:g} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rampart.testbed import build, session

    started = time.monotonic()
    bed = build.build(_checkout(args), args.cache)
    work: Path = args.work
    if work.exists() and any(work.iterdir()) and not args.resume:
        raise UsageError(f"{work}: exists; pass --resume to boot that machine again")
    with (
        session.UpdateServer(bed, work / "server") as server,
        session.Guest(bed, work / "guest") as guest,
    ):
        for version in args.serve:
            server.publish(version)
        _say(started, f"booting {guest.disk} (Secure Boot, TPM); console: {guest.console_log}")
        booted = guest.boot()
        _say(started, f"booted {booted.core} in {booted.seconds:g} s")
        if args.interactive:
            _say(started, "root's shell (the probe) attached; Ctrl-] detaches and powers off")
            guest.vm.interact()
        else:
            print(guest.sh("rampart status"))
    return 0


def demo(checkout: Path, work: Path, cache: Path | None) -> dict[str, Any]:
    """The `make testbed` story: install, boot 1.0.0, serve 1.0.1, update, reboot, fleet."""
    from rampart.testbed import build, session

    started = time.monotonic()
    _say(started, "building the testbed (cached by the hash of its inputs)")
    bed = build.build(checkout, cache)
    _say(started, f"testbed: {bed.directory}")
    with (
        session.UpdateServer(bed, work / "server") as server,
        session.Guest(bed, work / "guest") as guest,
    ):
        _say(started, "booting the installed disk: OVMF with Secure Boot enforced, swtpm")
        _say(started, f"  (serial console log: {guest.console_log})")
        booted = guest.boot()
        _say(started, f"booted {booted.core} in {booted.seconds:g} s")
        state = session.secure_boot_state(guest)
        _say(started, f"Secure Boot in the guest: {'enforced' if state == 1 else 'OFF'}")
        print(guest.sh("findmnt -no SOURCE,FSTYPE,OPTIONS /"), end="")
        guest.wait_system_up()
        print(guest.sh("rampart status"), end="")
        _say(started, "publishing 1.0.1 on the update server (rampart serve, HTTPS, pinned CA)")
        server.publish("1.0.1")
        _say(started, "starting rampart-update.service in the guest")
        code = guest.run_update_service()
        print(
            guest.sh("journalctl -b -u rampart-update.service -o cat --no-pager | tail -n 12"),
            end="",
        )
        if code != 20:
            raise LocalError(f"the update service exited with {code}, not 20 (updated)")
        _say(started, "rebooting into 1.0.1")
        booted = guest.reboot()
        _say(started, f"booted {booted.core} in {booted.seconds:g} s")
        guest.wait_system_up()
        print(guest.sh("rampart status"), end="")
        guest.run_update_service()  # checks in: the server sees the new version
        _say(started, "the fleet, as the update server sees it")
        print(server.fleet_text(), end="")
        _say(started, "done")
        return {
            "testbed": str(bed.directory),
            "boots": [{"core": b.core, "seconds": b.seconds} for b in guest.boots],
            "seconds": round(time.monotonic() - started, 1),
        }


def cmd_demo(args: argparse.Namespace) -> int:
    result = demo(_checkout(args), args.work, args.cache)
    if args.json:
        print_json(result)
    return 0


# --- the verbs ----------------------------------------------------------------------

COMMON = (
    arg("--checkout", type=Path, metavar="DIR", help="the Rampart source tree"),
    arg(
        "--cache",
        type=Path,
        metavar="DIR",
        help="the build cache (default $RAMPART_CACHE, /var/tmp/rampart-cache)",
    ),
    JSON,
)
WORK = arg("--work", type=Path, default=Path("testbed-work"), metavar="DIR")

VERBS: list[Group | Verb] = [
    Group(
        ("testbed",),
        "build and boot the virtual testbed (QEMU, OVMF Secure Boot, swtpm)",
        "The virtual testbed: a real Rampart system installed on a virtual disk "
        "and booted under Secure Boot with a TPM, updated from `rampart serve` on the host. "
        "Needs root (debootstrap, chroot) and the packages of `make setup`.",
        dest="testbed_verb",
    ),
    Verb(
        ("testbed", "build"),
        "build (or reuse) the testbed's images",
        "Build the testbed: a Debian root tree per version (1.0.0 to 1.0.3, "
        "1.0.3 deliberately broken), Cores, signed UKIs, the ESP, the enrolled OVMF "
        "variables, and the disk installed with 1.0.0 by `rampart install` in a VM. Cached "
        "by the hash of its inputs: a rerun with nothing changed takes a second.",
        cmd_build,
        COMMON,
    ),
    Verb(
        ("testbed", "run"),
        "boot a testbed machine",
        "Boot a machine from a copy-on-write overlay of the installed disk, "
        "with the update server running on the host, and print `rampart status` (or, with "
        "--interactive, attach root's shell on the testbed's probe).",
        cmd_run,
        (
            *COMMON,
            WORK,
            arg("--resume", action="store_true", help="boot the machine in --work again"),
            arg(
                "--serve", action="append", default=[], metavar="V", help="publish version V first"
            ),
            arg("--interactive", action="store_true", help="attach root's shell (the probe)"),
        ),
    ),
    Verb(
        ("testbed", "demo"),
        "install, boot 1.0.0, update to 1.0.1 from rampart serve, reboot (make testbed)",
        "What `make testbed` shows: build, boot 1.0.0 under Secure Boot, serve "
        "1.0.1, update through the real systemd service, reboot into 1.0.1, show the fleet.",
        cmd_demo,
        (*COMMON, WORK),
    ),
]
