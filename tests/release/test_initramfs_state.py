"""The device /init's security-epoch check and state-partition unlock, on the host.

/init keeps this logic in one file of shell functions, rampart/data/initramfs/state.sh,
which these tests source with `busybox sh` (after common.sh, /init's settings and
helpers), both filled in as `rampart build initramfs` fills them in:

- with fake commands first in PATH (tpm2_*, cryptsetup, lvm) that record their
  arguments, a fake sysfs for the ESP lookup, and `mount`/`umount` as shell
  functions (busybox's shell runs its own applets before searching PATH): every
  reason for falling back to the recovery passphrase, word for word, and that
  the unsealed key reaches cryptsetup on a pipe and never lands in a file;
- with the real tpm2-tools against a real swtpm and the real cryptsetup on a
  LUKS2 image file (`open --test-passphrase`: the host has no device-mapper): a
  key sealed by rampart.device.tpm opens keyslot 0; a changed PCR, or another TPM,
  falls back to the recovery passphrase; the real NV counter refuses an older
  epoch.

The command-line parsing of `rampart.epoch` runs the same way, sourcing cmdline.sh
with a file in place of /proc/cmdline.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart.contracts import cmdline
from rampart.device import state, tpm
from rampart.release import initramfs
from tests.conftest import start_swtpm, tcti_of

VG = "mainvg"
CORE = f"{VG}/core_1.0.0"
DEV = f"/dev/{VG}/core_state"
KEY = "k3y-0f-the-state-partition-32by!"  # printable: the fakes handle it in sh
PASSPHRASE = "cbdefghi-jklnrtuv-cbdefghi-jklnrtuv"
KVER = "6.1.0-99-amd64"
FUNCTIONS_BEGIN = "# ---- functions: the rollback counter and the state partition"
ASK = f"; enter the recovery passphrase for {VG}/core_state"
PROMPT = f"Enter passphrase for {DEV}: \n"
UNLOCKED_TPM = "rampart: state partition unlocked with the TPM"
UNLOCKED_PASSPHRASE = "rampart: state partition unlocked with the recovery passphrase"
REFUSED_PCR = (
    "the TPM refuses to unseal the state key: PCR sha256:7 differs from when it was sealed "
    "(Secure Boot disabled or its keys changed)"
)


def rendered(name: str) -> str:
    """The shell file `name` of rampart/data/initramfs, filled in as the device's /init."""
    values = initramfs.placeholders(KVER, initramfs.REQUIRED_MODULES, initramfs.BEST_EFFORT_MODULES)
    return initramfs.render(initramfs.piece(name), values)


# The fakes: one busybox sh script, dispatching on its name, recording its argv.
FAKE = r"""#!/bin/busybox sh
name=${0##*/}
echo "$name $*" >>"$T/calls"
case $name in
    tpm2_nvread)
        [ "${FAKE_NVREAD_RC:-0}" = 0 ] || { echo "ERROR: the NV index is not defined" >&2; exit 1; }
        printf "$FAKE_COUNTER" ;;
    tpm2_load)
        [ "${FAKE_LOAD_RC:-0}" = 0 ] || { echo "ERROR: Esys_Load(0x1DF)" >&2; exit 1; }
        eval "ctx=\${$#}"; echo object-context >"$ctx" ;;
    tpm2_startauthsession)
        eval "ctx=\${$#}"; echo session-context >"$ctx" ;;
    tpm2_policypcr)
        exit "${FAKE_POLICY_RC:-0}" ;;
    tpm2_unseal)
        [ "${FAKE_UNSEAL_RC:-0}" = 0 ] || { echo "ERROR: Esys_Unseal(0x99D) policy" >&2; exit 1; }
        printf %s "$FAKE_KEY" ;;
    tpm2_flushcontext) ;;
    lvm)
        [ "$1" = pvs ] && for pv in $FAKE_PVS; do echo "  $pv"; done ;;
    cryptsetup)
        case $1 in
            isLuks) exit "${FAKE_ISLUKS_RC:-0}" ;;
            open)
                prev= slot=
                for arg; do [ "$prev" = --key-slot ] && slot=$arg; prev=$arg; done
                kind=other
                [ -p /dev/stdin ] && kind=pipe
                echo "stdin: $kind" >>"$T/calls"
                got=$(cat; echo .)
                got=${got%.}
                printf %s "$got" >"$T/received.$slot"
                [ -n "$FAKE_OPEN_ABORT" ] && { echo "$FAKE_OPEN_ABORT" >&2; exit 134; }
                want=$FAKE_PASSPHRASE
                [ "$slot" = 0 ] && want=$FAKE_SLOT0
                [ -n "$got" ] && [ "$got" = "$want" ] && exit 0
                echo "No key available with this passphrase." >&2
                exit 2 ;;
        esac ;;
esac
exit 0
"""
FAKE_NAMES = (
    "tpm2_nvread",
    "tpm2_load",
    "tpm2_startauthsession",
    "tpm2_policypcr",
    "tpm2_unseal",
    "tpm2_flushcontext",
    "lvm",
    "cryptsetup",
)

# After the functions: the test's directories, and what needs root or a device.
# (common.sh's PATH has no fakes: the test's PATH comes back; its `fail` stops the
# machine: the test's exits.)
OVERRIDES = r"""
PATH=$TEST_PATH
fail() { echo "rampart: $*"; exit 3; }
RUN=$T/run ESP_MNT=$T/esp SYS_BLOCK=$T/sys/class/block PRINTK=$T/printk
LOG=$RUN/log
vg=@VG@ core=@CORE@ epoch=${EPOCH:-0}
mount() {
    echo "mount $*" >>"$T/calls"
    if [ ! -d "$T/disks/${5#/dev/}" ]; then
        echo "mount: mounting $5 on $6 failed: No such device" >&2
        return 255
    fi
    cp -R "$T/disks/${5#/dev/}/." "$6/"
}
umount() { echo "umount $*" >>"$T/calls"; rm -rf "$1"; mkdir "$1"; }
activate() { echo "activate $*" >>"$T/calls"; }
"""


@dataclass
class Shell:
    """A directory with fake sysfs, disks, commands, and the functions of /init."""

    root: Path
    bin: Path
    env: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def run(self, body: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[str]:
        for name in ("common.sh", "state.sh"):
            (self.root / name).write_text(rendered(name))
        script = self.root / "script.sh"
        script.write_text(
            f'. "{self.root}/common.sh"\n'
            f'. "{self.root}/state.sh"\n'
            + OVERRIDES.replace("@VG@", VG).replace("@CORE@", CORE)
            + body
            + "\n"
        )
        (self.root / "calls").unlink(missing_ok=True)
        full_env = {**self.env, **env}
        done = subprocess.run(
            ["/bin/busybox", "sh", str(script)],
            input=stdin.decode(),
            env={**full_env, "TEST_PATH": full_env["PATH"]},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done

    def add_partition(self, disk: str, number: int, partname: str) -> str:
        name = f"{disk}{number}"
        device = self.root / "sys/devices/pci0000:00/virtio" / disk / name
        device.mkdir(parents=True)
        (device / "partition").write_text(f"{number}\n")
        (device / "uevent").write_text(
            f"MAJOR=254\nMINOR={number}\nDEVNAME={name}\nDEVTYPE=partition\n"
            f"PARTN={number}\nPARTNAME={partname}\n"
        )
        whole = device.parent
        (whole / "uevent").write_text(f"MAJOR=254\nMINOR=0\nDEVNAME={disk}\nDEVTYPE=disk\n")
        for node in (disk, name):
            link = self.root / "sys/class/block" / node
            if not link.is_symlink():
                target = os.path.relpath(whole if node == disk else device, link.parent)
                link.symlink_to(target)
        return name

    def put_sealed(self, partition: str, files: dict[str, bytes]) -> Path:
        directory = self.root / "disks" / partition / tpm.SEALED_DIR
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        return directory


SEALED_FILES = {
    tpm.SEALED_PUB: b"public part",
    tpm.SEALED_PRIV: b"private part",
    tpm.SEALED_PCRS: b"sha256:7\n",
}


def make_shell(root: Path, *, fakes: bool = True) -> Shell:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (root / "sys/class/block").mkdir(parents=True)
    for sub in ("run", "esp", "disks"):
        (root / sub).mkdir()
    (bin_dir / "fake").write_text(FAKE)
    (bin_dir / "fake").chmod(0o755)
    for name in FAKE_NAMES if fakes else ("lvm",):
        (bin_dir / name).symlink_to("fake")
    (root / "tpmrm0").write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "T": str(root),
        "TPM2TOOLS_TCTI": f"device:{root}/tpmrm0",
        "FAKE_KEY": KEY,
        "FAKE_SLOT0": KEY,
        "FAKE_PASSPHRASE": PASSPHRASE,
        "FAKE_PVS": "/dev/vda2",
        "FAKE_COUNTER": "",
    }
    return Shell(root, bin_dir, env)


@pytest.fixture
def sh(tmp_path: Path) -> Shell:
    """A machine with one disk: vda1 the ESP (with a sealed key), vda2 the PV."""
    shell = make_shell(tmp_path)
    shell.add_partition("vda", 1, "esp")
    shell.add_partition("vda", 2, "lvm")
    shell.put_sealed("vda1", SEALED_FILES)
    return shell


def no_file_holds(directory: Path, secret: bytes) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), f"{path} holds the secret"


# --- the command line: rampart.epoch ------------------------------------------------


def run_cmdline(tmp_path: Path, line: str) -> subprocess.CompletedProcess[str]:
    """Source cmdline.sh, reading the command line from a file instead of /proc."""
    text = rendered("cmdline.sh")
    assert text.count("$(cat /proc/cmdline)") == 1
    (tmp_path / "cmdline.sh").write_text(text.replace("$(cat /proc/cmdline)", '$(cat "$CMDLINE")'))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(line + "\n")
    script = tmp_path / "script.sh"
    script.write_text(
        'set -f\nfail() { echo "rampart: $*"; exit 3; }\n'
        f'. "{tmp_path}/cmdline.sh"\n'
        'echo "epoch=$epoch"\n'
    )
    return subprocess.run(
        ["/bin/busybox", "sh", str(script)],
        env={"PATH": "/bin", "CMDLINE": str(cmdline)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _line(epoch: int | None) -> str:
    return cmdline.kernel_cmdline(
        VG, "1.0.0", roothash="ab" * 32, hash_offset=4096, data_blocks=1, epoch=epoch
    )


@pytest.mark.parametrize("epoch", [None, 0, 1, 7, 123456789, 1234567890, cmdline.MAX_EPOCH])
def test_init_reads_the_epoch_kernel_cmdline_writes(tmp_path: Path, epoch: int | None) -> None:
    done = run_cmdline(tmp_path, _line(epoch))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"epoch={epoch or 0}\n"


@pytest.mark.parametrize("value", ["010", "00", "0" * 18 + "9", "0" + str(cmdline.MAX_EPOCH)[1:]])
def test_init_reads_an_epoch_as_the_update_client_does(tmp_path: Path, value: str) -> None:
    """Leading zeros: decimal, as cmdline.cmdline_epoch reads it (ash would say octal)."""
    done = run_cmdline(tmp_path, f"{_line(None)} rampart.epoch={value}")
    assert done.stdout == f"epoch={cmdline.cmdline_epoch(f'rampart.epoch={value}', 'test')}\n"


@pytest.mark.parametrize(
    "value",
    ["", "-1", "1x", "0x10", "+1", "1.0", str(cmdline.MAX_EPOCH + 1), "1" + "0" * 19, "0" * 20],
)
def test_init_refuses_an_epoch_that_is_not_a_number(tmp_path: Path, value: str) -> None:
    done = run_cmdline(tmp_path, f"{_line(None)} rampart.epoch={value}")
    assert done.returncode == 3
    assert done.stdout == f"rampart: rampart.epoch={value} is not a number\n"
    with pytest.raises(Exception, match="is not a security epoch"):
        cmdline.cmdline_epoch(f"rampart.epoch={value}", "test")  # the build refuses them too


# --- the rollback counter and the epoch check ---------------------------------------


@pytest.mark.parametrize(
    ("counter", "epoch", "refused"),
    [
        (r"\000\000\000\000\000\000\000\002", 2, False),
        (r"\000\000\000\000\000\000\000\002", 3, False),
        (r"\000\000\000\000\000\000\000\003", 2, True),
        (r"\000\000\000\000\000\000\001\000", 255, True),  # 256: big-endian
        (r"\000\000\000\000\000\000\001\000", 256, False),
        (r"\177\377\377\377\377\377\377\377", cmdline.MAX_EPOCH, False),
        (r"\177\377\377\377\377\377\377\377", cmdline.MAX_EPOCH - 1, True),
        (r"\200\000\000\000\000\000\000\000", cmdline.MAX_EPOCH, True),  # 2^63: above all
        (r"\000\012\000\012\000\012\000\012", 0, True),  # bytes that are newlines
    ],
)
def test_epoch_below_the_counter_is_refused(
    sh: Shell, counter: str, epoch: int, refused: bool
) -> None:
    value = int.from_bytes(bytes(int(o, 8) for o in counter.split("\\")[1:]), "big")
    done = sh.run("check_epoch && echo accepted", FAKE_COUNTER=counter, EPOCH=str(epoch))
    if refused:
        assert done.returncode == 3
        assert done.stdout == (
            f"rampart: Core {CORE} has security epoch {epoch}, below the TPM's rollback "
            f"counter {value}: refusing to boot an older version\n"
        )
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout == "accepted\n"
    assert sh.calls() == [f"tpm2_nvread -C o -s 8 0x{tpm.COUNTER_INDEX:08x}"]


@pytest.mark.parametrize(
    ("counter", "rc"),
    [
        ("", "1"),  # not defined, or never incremented: tpm2_nvread fails
        (r"\000\000\000\000\000\000\000\011", "1"),  # output of a failed read is ignored
        (r"\000\000\000\011", "0"),  # not 8 bytes
        (r"\000\000\000\000\000\000\000\000\011", "0"),
    ],
)
def test_unreadable_counter_counts_as_zero(sh: Shell, counter: str, rc: str) -> None:
    if rc == "1":
        counter = ""  # the fake prints nothing when it fails
    done = sh.run(
        'echo "$(counter_hex)"; check_epoch && echo accepted',
        FAKE_COUNTER=counter,
        FAKE_NVREAD_RC=rc,
        EPOCH="0",
    )
    assert done.stdout == "0000000000000000\naccepted\n", done.stderr


def test_without_a_tpm_the_counter_is_zero_and_not_read(sh: Shell) -> None:
    (sh.root / "tpmrm0").unlink()
    done = sh.run("check_epoch && echo accepted", FAKE_COUNTER=r"\377" * 8, EPOCH="0")
    assert done.stdout == "accepted\n"
    assert sh.calls() == []


def test_the_device_checks_the_epoch_before_the_core(sh: Shell) -> None:
    device = rendered("device.sh")
    assert device.index("export TPM2TOOLS_TCTI=device:/dev/tpmrm0") < device.index("check_epoch")
    assert device.index("check_epoch") < device.index('activate "$lv"')
    pieces = initramfs.INIT_PIECES
    assert pieces.index("state.sh") < pieces.index("device.sh")
    assert "state.sh" not in initramfs.INSTALLER_PIECES
    installer = initramfs.init_script(KVER, (), (), installer=True)
    assert "check_epoch" not in installer and FUNCTIONS_BEGIN not in installer


# --- the state partition with fake tools ----------------------------------------------


def test_unsealed_key_opens_the_state_on_a_pipe(sh: Shell) -> None:
    done = sh.run('open_state; echo "state=$state"')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"{UNLOCKED_TPM}\nstate=/dev/mapper/state\n"
    run_dir = sh.run_dir
    calls = sh.calls()
    # The two ends of the pipe run at the same time: their records in any order.
    assert sorted(calls[8:11]) == [
        f"cryptsetup open --type luks2 --key-slot 0 --key-file=- {DEV} state",
        "stdin: pipe",
        f"tpm2_unseal -c {run_dir}/state.ctx -p session:{run_dir}/session.ctx",
    ]
    del calls[8:11]
    assert calls == [
        "activate core_state",
        f"cryptsetup isLuks --type luks2 {DEV}",
        "lvm pvs --noheadings -o pv_name --select vg_name=mainvg",
        f"mount -t vfat -o ro,nosuid,nodev,noexec /dev/vda1 {sh.root}/esp",
        f"umount {sh.root}/esp",
        f"tpm2_load -Q -C 0x81000001 -u {run_dir}/state.pub -r {run_dir}/state.priv "
        f"-c {run_dir}/state.ctx",
        f"tpm2_startauthsession --policy-session -S {run_dir}/session.ctx",
        f"tpm2_policypcr -Q -S {run_dir}/session.ctx -l sha256:7",
        f"tpm2_flushcontext {run_dir}/session.ctx",
        "tpm2_flushcontext -t",
    ]
    assert (sh.root / "received.0").read_text() == KEY
    no_file_holds(run_dir, KEY.encode())
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "log",
        "state.pcrs",
        "state.priv",
        "state.pub",
    ]
    assert not (sh.root / "printk").exists()  # the console keeps its kernel messages


def test_the_key_never_touches_a_file_in_the_script() -> None:
    section = rendered("state.sh")
    # tpm2_unseal's stdout is the pipe into cryptsetup's stdin (only its exit
    # status goes to fd 3); no other line names tpm2_unseal.
    pipe = re.search(
        r'\{ tpm2_unseal -c "\$RUN/state.ctx" -p "session:\$RUN/session.ctx" 2>/dev/null\n'
        r'\s+echo "unseal=\$\?" >&3; \} \|\n'
        r'\s+cryptsetup open --type luks2 --key-slot 0 --key-file=- "\$dev" state \\\n',
        section,
    )
    assert pipe, "tpm2_unseal is not piped into cryptsetup"
    assert section.count("tpm2_unseal -c") == 1
    # The passphrase, likewise, goes from a shell variable to cryptsetup's stdin.
    assert 'printf %s "$pass" | cryptsetup open' in section
    assert section.count("read -rs pass") == 1


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("no-tpm", "no TPM"),
        ("no-esp", "no ESP (no partition named esp)"),
        (
            "esp-unmountable",
            "cannot mount the ESP /dev/vda1: mount: mounting /dev/vda1 on @ROOT@/esp failed: "
            "No such device",
        ),
        (
            "no-sealed-key",
            "no sealed state key on the ESP /dev/vda1 (rampart/tpm/state.pub, state.priv, "
            "state.pcrs)",
        ),
        ("bad-pcrs", "the PCR selection rampart/tpm/state.pcrs on the ESP is not sha256:<PCRs>"),
        ("load", "the TPM cannot load the sealed state key (sealed by another TPM?)"),
        ("policy", "the TPM cannot apply the policy on PCR sha256:7: no error output"),
        ("unseal", REFUSED_PCR),
        ("wrong-key", f"the unsealed key does not open {VG}/core_state"),
    ],
)
def test_each_unseal_failure_gives_one_line_then_the_passphrase(
    sh: Shell, setup: str, reason: str
) -> None:
    env: dict[str, str] = {}
    sealed = sh.root / "disks/vda1" / tpm.SEALED_DIR
    if setup == "no-tpm":
        (sh.root / "tpmrm0").unlink()
    elif setup == "no-esp":
        (sh.root / "sys/devices/pci0000:00/virtio/vda/vda1/uevent").write_text("PARTNAME=boot\n")
    elif setup == "esp-unmountable":
        (sh.root / "disks/vda1").rename(sh.root / "disks/elsewhere")
    elif setup == "no-sealed-key":
        (sealed / tpm.SEALED_PRIV).unlink()
    elif setup == "bad-pcrs":
        (sealed / tpm.SEALED_PCRS).write_text("sha256:7;reboot\n")
    elif setup == "load":
        env["FAKE_LOAD_RC"] = "1"
    elif setup == "policy":
        env["FAKE_POLICY_RC"] = "1"
    elif setup == "unseal":
        env["FAKE_UNSEAL_RC"] = "1"
    elif setup == "wrong-key":
        env["FAKE_SLOT0"] = "another key"
    done = sh.run('open_state; echo "state=$state"', stdin=f"{PASSPHRASE}\n".encode(), **env)
    assert done.returncode == 0, done.stdout + done.stderr
    reason = reason.replace("@ROOT@", str(sh.root))
    assert done.stdout == (
        f"rampart: {reason}{ASK}\n{PROMPT}{UNLOCKED_PASSPHRASE}\nstate=/dev/mapper/state\n"
    )
    assert (sh.root / "received.1").read_text() == PASSPHRASE
    assert f"cryptsetup open --type luks2 --tries=1 --key-slot 1 --key-file=- {DEV} state" in (
        sh.calls()
    )
    assert (sh.root / "printk").read_text() == "1\n"  # kernel messages silenced
    no_file_holds(sh.run_dir, PASSPHRASE.encode())
    no_file_holds(sh.run_dir, KEY.encode())
    if setup in ("policy", "unseal", "wrong-key"):
        calls = sh.calls()
        session = f"tpm2_startauthsession --policy-session -S {sh.run_dir}/session.ctx"
        assert calls.index("tpm2_flushcontext -t") > calls.index(session)
        assert not (sh.run_dir / "state.ctx").exists()
        assert not (sh.run_dir / "session.ctx").exists()


def test_kernel_messages_are_back_once_the_passphrase_opened_the_state(sh: Shell) -> None:
    (sh.root / "tpmrm0").unlink()
    (sh.root / "printk").write_text("7\t4\t1\t7\n")
    done = sh.run("open_state; cat $PRINTK", stdin=f"{PASSPHRASE}\n".encode())
    assert done.stdout.endswith(f"{UNLOCKED_PASSPHRASE}\n7\n"), done.stdout


def test_a_wrong_passphrase_stops_with_one_line(sh: Shell) -> None:
    (sh.root / "tpmrm0").unlink()
    done = sh.run("open_state; echo unreachable", stdin=b"not-the-passphrase\n")
    assert done.returncode == 3
    assert done.stdout == (
        f"rampart: no TPM{ASK}\n{PROMPT}"
        f"rampart: the recovery passphrase does not open the state partition {VG}/core_state\n"
    )
    assert (sh.root / "received.1").read_text() == "not-the-passphrase"


def test_cryptsetup_failing_on_its_own_is_not_called_a_wrong_passphrase(sh: Shell) -> None:
    """A crash (here exit 134, SIGABRT as when libgcc_s.so.1 was missing) is told apart
    from a passphrase that opens no keyslot (exit 2)."""
    (sh.root / "tpmrm0").unlink()
    done = sh.run(
        "open_state; echo unreachable",
        stdin=f"{PASSPHRASE}\n".encode(),
        FAKE_OPEN_ABORT="libgcc_s.so.1 must be installed for pthread_exit to work",
    )
    assert done.returncode == 3
    assert done.stdout.endswith(
        f"rampart: cryptsetup cannot open {VG}/core_state (exit 134): "
        "libgcc_s.so.1 must be installed for pthread_exit to work\n"
    ), done.stdout


def test_no_passphrase_at_all_stops_with_one_line(sh: Shell) -> None:
    (sh.root / "tpmrm0").unlink()
    done = sh.run("open_state; echo unreachable", stdin=b"")
    assert done.returncode == 3
    assert done.stdout.endswith(
        f"rampart: the recovery passphrase does not open the state partition {VG}/core_state\n"
    )


def test_a_state_partition_that_is_not_luks2_stops_the_boot(sh: Shell) -> None:
    done = sh.run("open_state; echo unreachable", FAKE_ISLUKS_RC="1")
    assert done.returncode == 3
    assert done.stdout == f"rampart: the state partition {VG}/core_state is not a LUKS2 volume\n"
    assert not any(call.startswith("tpm2_") for call in sh.calls())


def test_the_esp_on_the_volume_groups_disk_is_preferred(tmp_path: Path) -> None:
    shell = make_shell(tmp_path)
    for disk in ("vda", "vdb"):
        shell.add_partition(disk, 1, "esp")
        shell.add_partition(disk, 2, "lvm")
    done = shell.run("find_esp", FAKE_PVS="/dev/vdb2")
    assert done.stdout == "vdb1\n", done.stderr
    done = shell.run("find_esp", FAKE_PVS="/dev/vda2")
    assert done.stdout == "vda1\n"
    done = shell.run("find_esp", FAKE_PVS="/dev/sdz2")  # no PV on these disks: the first
    assert done.stdout == "vda1\n"
    done = shell.run("find_esp", FAKE_PVS="/dev/vdb")  # a whole-disk PV
    assert done.stdout == "vdb1\n"


def test_pcr_selections_the_policy_accepts(sh: Shell) -> None:
    sealed = sh.root / "disks/vda1" / tpm.SEALED_DIR
    for text, ok in [
        ("sha256:0,7\n", True),
        ("sha256:7", True),
        ("sha1:7\n", False),
        ("sha256:\n", False),
        ("sha256:7 \n", False),
        ("sha256:7\nsha256:8\n", False),
        ("sha256:$(reboot)\n", False),
    ]:
        (sealed / tpm.SEALED_PCRS).write_text(text)
        done = sh.run('tpm_open_state /dev/x && echo opened || echo "$why"')
        if ok:
            assert done.stdout == "opened\n", (text, done.stdout)
            assert f"-l {text.strip()}" in "\n".join(sh.calls())
        else:
            assert done.stdout.startswith("the PCR selection "), (text, done.stdout)


# --- the real tools: swtpm, tpm2-tools, cryptsetup --------------------------------------

# cryptsetup without device-mapper: `open` checks the key (--test-passphrase) of
# the image file that stands for /dev/<VG>/core_state; isLuks reads the image.
REAL_CRYPTSETUP = r"""#!/bin/busybox sh
echo "cryptsetup $*" >>"$T/calls"
args=
for arg; do
    case $arg in
        @DEV@) arg=$IMAGE ;;
        state) continue ;;
    esac
    args="$args $arg"
done
case $1 in
    open) exec /usr/sbin/cryptsetup --test-passphrase $args ;;
    *) exec /usr/sbin/cryptsetup $args ;;
esac
"""


@dataclass
class RealSetup:
    shell: Shell
    chip: tpm.Tpm
    key: bytes
    passphrase: str


@pytest.fixture
def chip(tmp_path: Path) -> Iterator[tpm.Tpm]:
    yield from start_swtpm(tmp_path / "swtpm")


@pytest.fixture
def real(tmp_path: Path, chip: tpm.Tpm) -> RealSetup:
    """A LUKS2 image (keyslot 0 the key, 1 the passphrase), the key sealed to PCR 7 of
    a real swtpm on the fake ESP, the real tpm2-tools and cryptsetup."""
    shell = make_shell(tmp_path / "machine", fakes=False)
    shell.add_partition("vda", 1, "esp")
    shell.add_partition("vda", 2, "lvm")
    image = tmp_path / "state.img"
    with image.open("wb") as handle:
        handle.truncate(32 << 20)
    key, passphrase = state.new_key(), state.new_recovery_passphrase()
    state.format_volume(image, key, passphrase, integrity=False)
    esp = shell.root / "disks/vda1"
    esp.mkdir(parents=True)
    state.seal_to_esp(chip, key, esp, (7,))
    wrapper = shell.bin / "cryptsetup"
    wrapper.write_text(REAL_CRYPTSETUP.replace("@DEV@", DEV))
    wrapper.chmod(0o755)
    shell.env.update(TPM2TOOLS_TCTI=tcti_of(chip), IMAGE=str(image))
    return RealSetup(shell, chip, key, passphrase)


def test_real_tpm_unseals_the_key_that_opens_keyslot_0(real: RealSetup) -> None:
    done = real.shell.run('open_state; echo "state=$state"')
    assert done.stdout == f"{UNLOCKED_TPM}\nstate=/dev/mapper/state\n", done.stderr
    assert f"cryptsetup open --type luks2 --key-slot 0 --key-file=- {DEV} state" in (
        real.shell.calls()
    )
    no_file_holds(real.shell.root, real.key)
    # The transient objects were flushed: the TPM's object slots are free again.
    handles = subprocess.run(
        ["tpm2_getcap", "handles-transient"],
        env={**os.environ, **real.chip.env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "0x80" not in handles.stdout


def test_real_tpm_with_another_pcr_7_asks_for_the_passphrase(real: RealSetup) -> None:
    subprocess.run(
        ["tpm2_pcrextend", "7:sha256=" + "11" * 32],
        env={**os.environ, **real.chip.env},
        check=True,
        capture_output=True,
    )
    done = real.shell.run("open_state", stdin=f"{real.passphrase}\n".encode())
    assert done.stdout == f"rampart: {REFUSED_PCR}{ASK}\n{PROMPT}{UNLOCKED_PASSPHRASE}\n", (
        done.stderr
    )
    no_file_holds(real.shell.root, real.passphrase.encode())


def test_real_tpm_unseals_a_key_sealed_to_the_current_and_a_predicted_pcr_7(
    real: RealSetup,
) -> None:
    """The key resealed as before a Secure Boot variable update: a PolicyOR of the
    current PCR 7 and the predicted one, its branches beside it on the ESP. /init opens
    the state with no prompt now, and after PCR 7 moved to the predicted value; at any
    other value it asks for the passphrase, with the same reason as a single policy."""
    import hashlib

    env = {**os.environ, **real.chip.env}
    event = hashlib.sha256(b"the db append").digest()
    current = real.chip.pcr_values()[7]
    predicted = hashlib.sha256(current + event).digest()
    esp = real.shell.root / "disks/vda1"
    state.seal_to_esp(real.chip, real.key, esp, (7,), values=[current, predicted])
    assert len(state.sealed_branches(esp)) == 2
    done = real.shell.run('open_state; echo "state=$state"')
    assert done.stdout == f"{UNLOCKED_TPM}\nstate=/dev/mapper/state\n", done.stderr
    extend = ["tpm2_pcrextend", f"7:sha256={event.hex()}"]
    subprocess.run(extend, env=env, check=True, capture_output=True)
    done = real.shell.run('open_state; echo "state=$state"')
    assert done.stdout == f"{UNLOCKED_TPM}\nstate=/dev/mapper/state\n", done.stderr
    subprocess.run(extend, env=env, check=True, capture_output=True)
    done = real.shell.run("open_state", stdin=f"{real.passphrase}\n".encode())
    assert done.stdout == f"rampart: {REFUSED_PCR}{ASK}\n{PROMPT}{UNLOCKED_PASSPHRASE}\n", (
        done.stderr
    )
    # Sealed again to one set of values: the branches are gone from the ESP.
    state.seal_to_esp(real.chip, real.key, esp, (7,))
    assert state.sealed_branches(esp) == []
    done = real.shell.run('open_state; echo "state=$state"')
    assert done.stdout == f"{UNLOCKED_TPM}\nstate=/dev/mapper/state\n", done.stderr


def test_real_tpm_refuses_a_key_sealed_by_another_tpm(real: RealSetup, tmp_path: Path) -> None:
    for other in start_swtpm(tmp_path / "other-swtpm"):
        done = real.shell.run("open_state", stdin=b"wrong\n", TPM2TOOLS_TCTI=tcti_of(other))
        assert done.returncode == 3
        assert done.stdout == (
            "rampart: the TPM cannot load the sealed state key (sealed by another TPM?)"
            f"{ASK}\n{PROMPT}"
            f"rampart: the recovery passphrase does not open the state partition {VG}/core_state\n"
        )


def test_real_counter_refuses_an_older_epoch(real: RealSetup) -> None:
    done = real.shell.run("check_epoch && echo accepted", EPOCH="0")
    assert done.stdout == "accepted\n"  # the counter is not defined yet
    counter = real.chip.advance_counter(3)
    assert real.chip.counter() == counter >= 3
    done = real.shell.run("check_epoch && echo accepted", EPOCH=str(counter))
    assert done.stdout == "accepted\n", done.stderr
    done = real.shell.run("check_epoch && echo accepted", EPOCH=str(counter - 1))
    assert done.returncode == 3
    assert done.stdout == (
        f"rampart: Core {CORE} has security epoch {counter - 1}, below the TPM's rollback "
        f"counter {counter}: refusing to boot an older version\n"
    )
