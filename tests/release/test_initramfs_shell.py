"""The initramfs's shell files (rampart/data/initramfs) under ShellCheck, and how
/init is put together from them.

busybox's ash runs /init. ShellCheck has no ash dialect; dash is the closest (both
are Almquist shells, both have `local`), so every check runs with `--shell=dash`,
and the files that are pieces, not scripts, say `# shellcheck shell=dash` for an
editor's checker too. The one ash extension /init uses beyond dash (`read -s`)
carries a directive that says so. Checked at style level (ShellCheck's lowest): any
finding fails, and each directive that silences one says why on its line.

- Every file alone. A piece cannot know the variables the pieces before it set or
  those after it read, so two checks are left out there: SC2154 (referenced but
  not assigned) and SC2034 (assigned but never read).
- The assembled /init of the device and of the installer, filled in as `rampart
  build initramfs` fills them in, with every check: there a variable that nothing
  sets, or that nothing reads, is a finding.
- Each check finds a planted fault, so that it is known not to pass vacuously.

The directives are comments for the checker: `init_script` leaves their lines out
of /init. The names and numbers /init shares with Python come from the contract
modules through the placeholders; none is written in the shell's code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from rampart.contracts import cmdline, layout
from rampart.release import initramfs

KVER = "6.1.0-99-amd64"
DATA = resources.files("rampart") / "data" / "initramfs"
FILES = sorted(entry.name for entry in DATA.iterdir())
# What a piece alone cannot know: the whole script is checked for it.
ACROSS_PIECES = ("SC2154", "SC2034")
SHELL_DIRECTIVE = "# shellcheck shell=dash\n"


def shellcheck(path: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """ShellCheck's findings on `path` (one line each), as busybox's ash runs it."""
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: run make setup")
    argv = ["shellcheck", "--norc", "--shell=dash", "--severity=style", "--format=gcc"]
    if exclude:
        argv.append("--exclude=" + ",".join(exclude))
    done = subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, check=False, timeout=120
    )
    findings = done.stdout.splitlines()
    assert done.returncode == (1 if findings else 0), done.stderr
    return findings


def values() -> dict[str, str]:
    return initramfs.placeholders(KVER, initramfs.REQUIRED_MODULES, initramfs.BEST_EFFORT_MODULES)


def whole(installer: bool) -> str:
    """The device's (or the installer's) /init, filled in, with the directives."""
    pieces = initramfs.INSTALLER_PIECES if installer else initramfs.INIT_PIECES
    return initramfs.render(initramfs.template(pieces, directives=True), values())


def test_every_file_is_a_piece_of_init() -> None:
    assert set(FILES) == {*initramfs.INIT_PIECES, *initramfs.INSTALLER_PIECES}
    for name in FILES:
        text = initramfs.piece(name)
        # One newline at the end: /init has exactly one blank line between two pieces.
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        if not text.startswith("#!/bin/sh\n"):
            assert text.startswith(SHELL_DIRECTIVE), f"{name} does not say its shell"


@pytest.mark.parametrize("name", FILES)
def test_each_file_passes_shellcheck(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(initramfs.piece(name))
    assert shellcheck(path, exclude=ACROSS_PIECES) == []


@pytest.mark.parametrize("installer", [False, True], ids=["device", "installer"])
def test_the_assembled_init_passes_shellcheck(tmp_path: Path, installer: bool) -> None:
    path = tmp_path / "init"
    path.write_text(whole(installer))
    assert shellcheck(path) == []


def test_shellcheck_finds_a_planted_fault(tmp_path: Path) -> None:
    """A broken copy of a piece fails alone; a variable read under another name than
    the one cmdline.sh sets fails in the assembled script only."""
    broken = tmp_path / "modules.sh"
    text = initramfs.piece("modules.sh")
    assert text.count('>"$LOG"') == 1
    broken.write_text(text.replace('>"$LOG"', ">$LOG"))
    line_number = text[: text.index('>"$LOG"')].count("\n") + 1
    findings = shellcheck(broken, exclude=ACROSS_PIECES)
    assert any(f"{broken}:{line_number}:" in f and "[SC2086]" in f for f in findings), findings
    init = tmp_path / "init"
    text = whole(installer=False)
    assert text.count('lvm lvchange -ay "$vg/$1"') == 1
    init.write_text(text.replace('lvm lvchange -ay "$vg/$1"', 'lvm lvchange -ay "$volgroup/$1"'))
    findings = shellcheck(init)
    assert any("volgroup is referenced but not assigned" in line for line in findings), findings
    common = tmp_path / "common.sh"
    common.write_text(initramfs.piece("common.sh").replace("$vg/$1", "$volgroup/$1"))
    assert shellcheck(common, exclude=ACROSS_PIECES) == []  # what a piece cannot see


@pytest.mark.parametrize("installer", [False, True], ids=["device", "installer"])
def test_init_is_the_pieces_without_the_directives(installer: bool) -> None:
    kept = whole(installer)
    init = initramfs.init_script(
        KVER, initramfs.REQUIRED_MODULES, initramfs.BEST_EFFORT_MODULES, installer=installer
    )
    assert "shellcheck" not in init
    directives = [line for line in kept.splitlines() if "# shellcheck " in line]
    assert directives and all(line.lstrip().startswith("# shellcheck ") for line in directives)
    assert init.splitlines() == [line for line in kept.splitlines() if line not in directives]
    # What the host tests source is what /init runs.
    pieces = initramfs.INSTALLER_PIECES if installer else initramfs.INIT_PIECES
    for name in pieces:
        text = initramfs.render(initramfs.piece(name), values())
        assert "\n".join(line for line in text.splitlines() if line not in directives) in init


def _code(text: str) -> str:
    """The shell without its comments: whole-line ones and those after two spaces."""
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        lines.append(line.split("  # ", 1)[0])
    return "\n".join(lines)


def test_contract_names_come_from_the_contract_modules() -> None:
    """No name or number /init shares with Python is written in the shell's code:
    each comes through a placeholder from contracts.cmdline or contracts.layout."""
    literals = {
        cmdline.PARAM_PREFIX,  # rampart.core, rampart.verity.*, rampart.epoch, ...
        layout.SLOT_PREFIX,
        layout.STATE_LV,
        layout.SWAP_LV,
        f"/dev/mapper/{layout.STATE_MAPPER}",
        f'"$dev" {layout.STATE_MAPPER}',
        layout.STATE_MOUNT.lstrip("/"),
        layout.VERITY_MAPPER_PREFIX,
        f"PARTNAME={layout.ESP_PARTLABEL}",
        f"named {layout.ESP_PARTLABEL}",
        layout.SEALED_DIR,
        layout.SEALED_PUB,
        layout.SEALED_PRIV,
        layout.SEALED_PCRS,
        f"{layout.COUNTER_INDEX:08x}",
        f"{layout.PRIMARY_HANDLE:08x}",
        str(cmdline.MAX_EPOCH),
    }
    for name in FILES:
        code = _code(initramfs.piece(name))
        for literal in literals:
            assert literal not in code, f"{name} writes {literal!r} itself"
    # ... and the placeholders bring them in.
    init = _code(initramfs.init_script(KVER, (), ()))
    installer = _code(initramfs.init_script(KVER, (), (), installer=True))
    line = cmdline.kernel_cmdline(
        "vg", "1.0.0", roothash="ab" * 32, hash_offset=0, data_blocks=1, fec_offset=0,
        fec_roots=2, epoch=1,
    )  # fmt: skip
    for key in cmdline.cmdline_params(line):
        if key.startswith(cmdline.PARAM_PREFIX):
            assert f"        {key}=*) " in init, key
    params = (
        cmdline.INSTALL_TARGET_PARAM,
        cmdline.INSTALL_PAYLOAD_PARAM,
        cmdline.INSTALL_STATE_SIZE_PARAM,
    )
    for key in params:
        assert f"        {key}=*) " in installer, key
    assert f"        {cmdline.INSTALL_WIPE_PARAM}=1) " in installer
    assert f"    {layout.STATE_LV} | {layout.SWAP_LV} | " in init
    assert f"state=/dev/mapper/{layout.STATE_MAPPER}\n" in init
    assert f"grep -qx PARTNAME={layout.ESP_PARTLABEL} " in init
    assert f'"$NEWROOT{layout.STATE_MOUNT}"' in init


def test_every_placeholder_has_a_value_and_every_value_a_use() -> None:
    used = set(re.findall(r"@[A-Z_]+@", initramfs.INIT + initramfs.INSTALLER_INIT))
    assert used == set(values())
    with pytest.raises(KeyError, match="@NOT_A_PLACEHOLDER@"):
        initramfs.render("x @NOT_A_PLACEHOLDER@", values())
