"""Where a Rampart device keeps things: the names that the device's code, the
installer and the initramfs builder (which writes them into `/init`) must agree on.

Volume group: one LV per Core, `core_<V>`, beside the encrypted state partition
`core_state` (and `core_swap`, reserved); the state opens as `/dev/mapper/state`,
mounted on `/mnt/state` in Core; Core `core_<V>` opens as `/dev/mapper/verity_core_<V>`.
On the ESP (the GPT partition named `esp`), below its root: the boot entries
(`EFI/Linux/<os>-<V>[+T[-D]].efi`, the Boot Loader Specification's type #2 with boot
counting), the boot loader (twice: `EFI/systemd/systemd-bootx64.efi`, which a boot
option names, and the removable-media path `EFI/BOOT/BOOTX64.EFI`, which the firmware
falls back to) and the TPM-sealed state key (`rampart/tpm/state.{pub,priv,pcrs}`).
TPM: the storage primary key at a persistent handle, the rollback counter at an
NV index; LUKS2 keyslot 0 is the sealed key, keyslot 1 the recovery passphrase.
"""

from __future__ import annotations

SLOT_PREFIX = "core_"  # a Core's LV is core_<version>
STATE_LV = "core_state"
SWAP_LV = "core_swap"
RESERVED_LVS = frozenset({STATE_LV, SWAP_LV})  # never a slot
STATE_MAPPER = "state"  # /dev/mapper/state
STATE_MOUNT = "/mnt/state"  # where the initramfs mounts it, in Core's tree
VERITY_MAPPER_PREFIX = "verity_"  # Core core_<V> opens as /dev/mapper/verity_core_<V>
# The GPT partition name of the ESP: the installer gives it, the initramfs looks for it.
ESP_PARTLABEL = "esp"
# The boot loader's two copies, below the ESP's root (device/bootloader.py updates
# them one after the other: at every moment one of them is whole and verified).
LOADER_PATH = "EFI/systemd/systemd-bootx64.efi"  # named by the boot option Rampart adds
FALLBACK_LOADER_PATH = "EFI/BOOT/BOOTX64.EFI"  # what the firmware starts without one

# The TPM objects (TCG's ranges: owner persistent handles, owner NV indexes).
PRIMARY_HANDLE = 0x81000001
COUNTER_INDEX = 0x01500016
# The device's identity key (contracts/identity.py): an ECC P-256 restricted signing
# primary key of the owner hierarchy (the same template always gives the same key).
IDENTITY_HANDLE = 0x81000002
DEFAULT_PCRS = (7,)

# Where the sealed state key lives, relative to the ESP's root (CLIP OS kept it on
# the ESP too): the TPM2B public and private parts, and the PCR selection it was
# sealed to ("sha256:7"), which the initramfs passes to tpm2_policypcr.
SEALED_DIR = "rampart/tpm"
SEALED_PUB = "state.pub"
SEALED_PRIV = "state.priv"
SEALED_PCRS = "state.pcrs"
# A key sealed to more than one set of PCR values (a PolicyOR: the current values and
# those predicted after a Secure Boot variable update) keeps each branch's policy
# digest beside it, state.branch0 to state.branch7, which the unseal needs.
SEALED_BRANCH = "state.branch"
# The LUKS2 keyslots of core_state: the TPM-sealed key, and the recovery passphrase.
TPM_KEYSLOT = 0
RECOVERY_KEYSLOT = 1


def efi_file_path(esp_path: str) -> str:
    """A file below the ESP's root (`EFI/x/y.efi`) as a firmware boot option names it
    (`\\EFI\\x\\y.efi`)."""
    return "\\" + esp_path.strip("/").replace("/", "\\")
