"""What the scenarios share: the lines the testbed's guests print that they wait for
(the initramfs's), and what an attacker with root in the guest does to its boot."""

from __future__ import annotations

import re

from rampart.contracts.layout import efi_file_path
from rampart.device import bootonce
from rampart.testbed import session

CORE = "mainvg/core_{}"
UNLOCKED_TPM = "rampart: state partition unlocked with the TPM"
UNLOCKED_PASSPHRASE = "rampart: state partition unlocked with the recovery passphrase"
PROMPT = re.compile(r"rampart: (?P<reason>[^\n]*); enter the recovery passphrase[^\n]*\n")


def force_one_shot(guest: session.Guest, entry: str) -> None:
    """Write systemd-boot's LoaderEntryOneShot by hand, as an attacker with root could
    (`rampart boot-once` only takes entries systemd-boot listed at this boot)."""
    var = f"/sys/firmware/efi/efivars/LoaderEntryOneShot-{bootonce.LOADER_GUID}"
    guest.sh(
        'sync; python3 -c "import struct; '
        f"open('{var}', 'wb').write(struct.pack('<I', 7) + '{entry}\\0'.encode('utf-16-le'))\""
    )


def boot_next(guest: session.Guest, label: str, loader: str) -> str:
    """Add a firmware boot option `label` that starts `loader` (a file on the ESP, from
    its root: `EFI/x/y.efi`), outside BootOrder, and make it the next boot's (BootNext),
    as an attacker with root could; its number (four hex digits)."""
    path = efi_file_path(loader)
    created = guest.sh(
        f"efibootmgr --create-only --disk /dev/vda --part 1 --label {label} --loader '{path}'"
    )
    number = re.search(rf"Boot([0-9A-F]{{4}})\* {re.escape(label)}", created)
    assert number is not None, created
    guest.sh(f"efibootmgr --bootnext {number.group(1)} >/dev/null")
    return number.group(1)


def delete_boot_option(guest: session.Guest, number: str) -> None:
    """Remove the firmware boot option `number` (from `boot_next`)."""
    guest.sh(f"efibootmgr --delete-bootnum --bootnum {number} >/dev/null")


def console_login(machine: session.Guest, user: str, password: str) -> bool:
    """Log in on the serial console's getty as a person would: whether a shell
    started (False: "Login incorrect")."""
    vm = machine.vm
    vm.mark()
    vm.send("\n")  # agetty prints its prompt again
    vm.expect(r"login: ", 60)
    vm.send(user + "\n")
    vm.expect(r"Password: ", 60)
    vm.send(password + "\n")
    index, _ = vm.expect_any([r"Login incorrect\n", r"Last login|[#$] $"], 60)
    return index == 1


def type_passphrase(machine: session.Guest, passphrase: str) -> str:
    """Wait for the initramfs's prompt and type `passphrase`; the reason it gave."""
    reason = machine.vm.expect(PROMPT, session.BOOT_TIMEOUT).group("reason")
    machine.vm.expect(r"Enter passphrase", 60)
    machine.vm.send(passphrase + "\n")
    return str(reason)
