"""The slot backends and `busy_reason`.

`LvmBackend` runs against the real LVM JSON reports recorded in data/lvm/ (LVM
2.03.16 on a loop device, see data/lvm/README.md), fed through a fake
`rampart.run.run`; `FileBackend` runs on a temporary directory; `busy_reason`
reads a fake mountinfo file and a fake mapper directory.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rampart import run as run_module
from rampart.contracts.version import parse_version
from rampart.device import slots as slots_module
from rampart.device.slots import (
    FileBackend,
    LvmBackend,
    Slot,
    busy_reason,
    mounted_sources,
    slot_name,
)
from rampart.errors import FormatError, LocalError, UsageError
from rampart.run import Completed

LVM_DATA = Path(__file__).parent / "data" / "lvm"
VG = "mainvg"
MiB = 1024 * 1024

LVS = (
    "lvs",
    "--reportformat",
    "json",
    "--units",
    "b",
    "--nosuffix",
    "-o",
    "lv_name,lv_size,lv_attr",
    VG,
)
VGS = (
    "vgs",
    "--reportformat",
    "json",
    "--units",
    "b",
    "--nosuffix",
    "-o",
    "vg_name,vg_free",
    VG,
)

# vg_free in the recorded reports.
VGS_FREE = 96468992  # vgs.json: 23 extents of 4 MiB
VGS_FULL_FREE = 8388608  # vgs-full.json: 2 extents of 4 MiB

INVALID_NAMES = ["-rf", "a/b", "", "a b", "x" * 128, "../x", "core_1.0.0\n"]


def recorded(name: str) -> bytes:
    return (LVM_DATA / name).read_bytes()


class FakeLvm:
    """Stands in for `rampart.run.run`: records each argv, answers from the recorded reports.

    `reports` maps a command name (argv[0]) to the stdout it prints; commands
    without an entry (lvcreate, lvrename, lvremove) print nothing. A command in
    `failing` fails the way `run.run` reports a non-zero exit (it raises).
    """

    def __init__(self, lvs: str = "lvs-three.json", vgs: str = "vgs.json") -> None:
        self.reports: dict[str, bytes] = {"lvs": recorded(lvs), "vgs": recorded(vgs)}
        self.after: dict[str, dict[str, bytes]] = {}
        self.failing: set[str] = set()
        self.calls: list[tuple[str, ...]] = []
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        argv = tuple(argv)
        assert all(isinstance(arg, str) for arg in argv)
        self.calls.append(argv)
        self.kwargs.append(kwargs)
        if argv[0] in self.failing and kwargs.get("check", True):
            raise LocalError(f"{argv[0]} failed with exit code 5: simulated failure")
        stdout = self.reports.get(argv[0], b"")
        # A state change (lvcreate ...) can swap the reports later commands see.
        self.reports.update(self.after.pop(argv[0], {}))
        return Completed(argv, 0, stdout, b"")

    @property
    def commands(self) -> list[str]:
        return [argv[0] for argv in self.calls]


@pytest.fixture
def lvm(monkeypatch: pytest.MonkeyPatch) -> FakeLvm:
    fake = FakeLvm()
    # slots.py does `from rampart import run` and calls `run.run(...)`: the
    # attribute is looked up on the rampart.run module at call time, so
    # patching it there is what LvmBackend sees.
    assert vars(slots_module)["run"] is run_module
    monkeypatch.setattr(run_module, "run", fake)
    return fake


def set_lvs(lvm: FakeLvm, doc: Any) -> None:
    lvm.reports["lvs"] = doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def set_vgs(lvm: FakeLvm, doc: Any) -> None:
    lvm.reports["vgs"] = doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def recorded_rows(name: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(recorded(name))["report"][0]["lv"]
    return rows


def lv_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"report": [{"lv": rows}]}


# An active LV that nothing holds: '-' at position 5 (the open flag) means "not open".
NOT_OPEN_ATTR = "-wi-a-----"


def not_open_rows(name: str) -> list[dict[str, str]]:
    """A recorded lvs report's rows as a host with device-mapper shows unused, active LVs.

    The recordings carry '-wi-XX----' (open state unknown: no device-mapper on the
    recording host), which counts as open; tests that need not-open slots use this.
    """
    rows = recorded_rows(name)
    for row in rows:
        row["lv_attr"] = NOT_OPEN_ATTR
    return rows


def not_open_report(name: str) -> bytes:
    return json.dumps(lv_report(not_open_rows(name))).encode()


# --- LvmBackend: where to patch --------------------------------------------------------


def test_patching_rampart_run_run_reaches_lvm_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []

    def fake(argv: Sequence[str], **kwargs: Any) -> Completed:
        seen.append(tuple(argv))
        return Completed(tuple(argv), 0, recorded("vgs.json"), b"")

    monkeypatch.setattr("rampart.device.slots.run.run", fake)
    assert LvmBackend(VG).free_space() == VGS_FREE
    assert seen == [VGS]
    assert run_module.run is fake


# --- LvmBackend: command lines ---------------------------------------------------------


def test_lvs_command_line(lvm: FakeLvm) -> None:
    LvmBackend(VG).slots()
    assert lvm.calls == [LVS]


def test_vgs_command_line(lvm: FakeLvm) -> None:
    LvmBackend(VG).free_space()
    assert lvm.calls == [VGS]


def test_commands_run_checked_with_a_timeout(lvm: FakeLvm) -> None:
    backend = LvmBackend(VG)
    backend.slots()
    backend.free_space()
    for kwargs in lvm.kwargs:
        assert kwargs.get("check", True) is True
        assert kwargs.get("timeout") is not None


def test_create_command_lines(lvm: FakeLvm) -> None:
    lvm.reports["lvs"] = recorded("lvs-two.json")
    lvm.after["lvcreate"] = {"lvs": recorded("lvs-renamed.json")}
    slot = LvmBackend(VG).create("core_1.0.1", 64 * MiB)
    assert lvm.calls == [
        VGS,
        (
            "lvcreate",
            "--yes",
            "--wipesignatures",
            "y",
            "-n",
            "core_1.0.1",
            "-L",
            f"{64 * MiB}b",
            VG,
        ),
        LVS,
    ]
    # The recorded lv_attr '-wi-XX----' leaves the open state unknown: it counts as open.
    assert slot == Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1"), open=True)


def test_create_returns_a_not_open_slot_when_lvs_says_so(lvm: FakeLvm) -> None:
    lvm.reports["lvs"] = recorded("lvs-two.json")
    # lvs-renamed.json with '-' at position 5: an active LV that nothing holds.
    lvm.after["lvcreate"] = {"lvs": not_open_report("lvs-renamed.json")}
    slot = LvmBackend(VG).create("core_1.0.1", 64 * MiB)
    assert slot == Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1"), open=False)


def test_create_passes_the_size_in_bytes_with_b_suffix(lvm: FakeLvm) -> None:
    lvm.reports["lvs"] = recorded("lvs-one.json")
    LvmBackend(VG).create("core_1.0.0", 12345)
    lvcreate = lvm.calls[1]
    assert lvcreate[0] == "lvcreate"
    assert lvcreate[lvcreate.index("-L") + 1] == "12345b"


def test_rename_command_line(lvm: FakeLvm) -> None:
    old = Slot("core_1.0.0", 67108864, Path("/dev/mainvg/core_1.0.0"))
    new = LvmBackend(VG).rename(old, "core_1.0.2")
    assert lvm.calls == [("lvrename", VG, "core_1.0.0", "core_1.0.2")]
    assert new == Slot("core_1.0.2", 67108864, Path("/dev/mainvg/core_1.0.2"))


@pytest.mark.parametrize("is_open", [True, False])
def test_rename_keeps_the_open_flag(lvm: FakeLvm, is_open: bool) -> None:
    old = Slot("core_1.0.0", 67108864, Path("/dev/mainvg/core_1.0.0"), open=is_open)
    new = LvmBackend(VG).rename(old, "core_1.0.2")
    assert new == Slot("core_1.0.2", 67108864, Path("/dev/mainvg/core_1.0.2"), open=is_open)


def test_remove_command_line(lvm: FakeLvm) -> None:
    LvmBackend(VG).remove(Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1")))
    assert lvm.calls == [("lvremove", "--yes", "mainvg/core_1.0.1")]


# --- LvmBackend: parsing the recorded reports ------------------------------------------


def test_slots_from_recorded_lvs_three(lvm: FakeLvm) -> None:
    # Recorded lv_attr '-wi-XX----': open state unknown, so both slots count as open.
    assert LvmBackend(VG).slots() == [
        Slot("core_1.0.0", 67108864, Path("/dev/mainvg/core_1.0.0"), open=True),
        Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1"), open=True),
    ]


def test_slots_from_lvs_three_with_lvs_not_open(lvm: FakeLvm) -> None:
    # lvs-three.json with '-' at position 5: active LVs that nothing holds.
    set_lvs(lvm, not_open_report("lvs-three.json"))
    assert LvmBackend(VG).slots() == [
        Slot("core_1.0.0", 67108864, Path("/dev/mainvg/core_1.0.0")),
        Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1")),
    ]


@pytest.mark.parametrize(
    ("report", "names"),
    [
        ("lvs-three.json", ["core_1.0.0", "core_1.0.1"]),
        ("lvs-renamed.json", ["core_1.0.1", "core_1.0.2"]),
        ("lvs-two.json", ["core_1.0.2"]),
        ("lvs-one.json", ["core_1.0.0"]),
    ],
)
def test_slots_are_the_core_version_lvs_of_each_recorded_report(
    lvm: FakeLvm, report: str, names: list[str]
) -> None:
    lvm.reports["lvs"] = recorded(report)
    found = LvmBackend(VG).slots()
    assert [s.name for s in found] == names
    assert "core_state" not in [s.name for s in found]
    for slot in found:
        assert slot.size == 67108864
        assert slot.path == Path(f"/dev/mainvg/{slot.name}")
        assert slot.version == parse_version(slot.name.removeprefix("core_"))


def test_lvs_lists_core_state_but_slots_do_not(lvm: FakeLvm) -> None:
    everything = LvmBackend(VG).lvs()
    assert [s.name for s in everything] == ["core_1.0.0", "core_1.0.1", "core_state"]
    state = everything[-1]
    assert state.size == 33554432
    assert state.path == Path("/dev/mainvg/core_state")
    assert state.version is None


def test_slots_exclude_core_swap_and_other_lvs(lvm: FakeLvm) -> None:
    rows = recorded_rows("lvs-three.json")
    template = rows[0]
    for name in ("core_swap", "filler", "core_notaversion"):
        rows.append({**template, "lv_name": name, "lv_path": f"/dev/mainvg/{name}"})
    set_lvs(lvm, lv_report(rows))
    assert [s.name for s in LvmBackend(VG).slots()] == [
        "core_1.0.0",
        "core_1.0.1",
        "core_notaversion",
    ]
    # A core_* LV that is not core_<semver> is listed, but has no version.
    assert LvmBackend(VG).slots()[-1].version is None


def test_recorded_unknown_open_state_parses_as_open(lvm: FakeLvm) -> None:
    # The recorded lv_attr is '-wi-XX----' (no device-mapper on the recording host):
    # not knowing whether an LV is open must not make it writable.
    assert [s.open for s in LvmBackend(VG).lvs()] == [True, True, True]


def test_device_path_is_derived_never_taken_from_the_report(lvm: FakeLvm) -> None:
    rows = recorded_rows("lvs-one.json")
    for row in rows:
        row["lv_path"] = "/etc/shadow"
    set_lvs(lvm, lv_report(rows))
    assert [s.path for s in LvmBackend(VG).lvs()] == [
        Path("/dev/mainvg/core_1.0.0"),
        Path("/dev/mainvg/core_state"),
    ]


def test_empty_lv_list_gives_no_slots(lvm: FakeLvm) -> None:
    set_lvs(lvm, lv_report([]))
    assert LvmBackend(VG).slots() == []


@pytest.mark.parametrize(("report", "free"), [("vgs.json", VGS_FREE), ("vgs-full.json", 8388608)])
def test_free_space_from_recorded_vgs(lvm: FakeLvm, report: str, free: int) -> None:
    lvm.reports["vgs"] = recorded(report)
    assert LvmBackend(VG).free_space() == free


# --- LvmBackend: open flag -------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "is_open"),
    [
        ("-wi-ao----", True),  # active and open
        ("-wi-a-----", False),  # active, not open
        ("-wi-------", False),  # inactive
        ("-wi-XX----", True),  # unknown (as recorded): counts as open
        ("-wi-aX----", True),  # open state unknown: counts as open
        ("-wi-X-----", False),  # state unknown, open flag '-': not open
        ("-wi-o-----", False),  # 'o' in the state position (5th char) does not count
        ("-wi-a?----", True),  # any other character than '-' counts as open
        ("-wi-ao", True),  # shortest attr that has the open position
        ("-wi-a-", False),  # shortest attr with '-' in the open position
        ("-wi-a", True),  # too short to carry an open flag: counts as open
        ("", True),
    ],
)
def test_open_flag_is_lv_attr_position_5(lvm: FakeLvm, attr: str, is_open: bool) -> None:
    # core_1.0.0 keeps '-' at position 5 (not open); only core_1.0.1 gets `attr`.
    rows = not_open_rows("lvs-three.json")
    rows[1]["lv_attr"] = attr
    set_lvs(lvm, lv_report(rows))
    found = {s.name: s.open for s in LvmBackend(VG).slots()}
    assert found == {"core_1.0.0": False, "core_1.0.1": is_open}


def test_open_flag_per_lv_in_synthetic_report(lvm: FakeLvm) -> None:
    # The recorded report as a host with device-mapper would show it: the
    # running Core mounted (open), the other slot active but unused.
    rows = recorded_rows("lvs-three.json")
    attrs = {"core_1.0.0": "-wi-ao----", "core_1.0.1": "-wi-a-----", "core_state": "-wi-ao----"}
    for row in rows:
        row["lv_attr"] = attrs[row["lv_name"]]
    set_lvs(lvm, lv_report(rows))
    assert {s.name: s.open for s in LvmBackend(VG).lvs()} == {
        "core_1.0.0": True,
        "core_1.0.1": False,
        "core_state": True,
    }


def test_missing_lv_attr_parses_as_open(lvm: FakeLvm) -> None:
    # lvs-one.json with '-' at position 5 (not open), then core_1.0.0 loses its lv_attr.
    rows = not_open_rows("lvs-one.json")
    del rows[0]["lv_attr"]
    set_lvs(lvm, lv_report(rows))
    assert [s.open for s in LvmBackend(VG).lvs()] == [True, False]


@pytest.mark.parametrize("attr", [None, 42])
def test_non_string_lv_attr_parses_as_open(lvm: FakeLvm, attr: object) -> None:
    rows: list[dict[str, Any]] = list(not_open_rows("lvs-one.json"))
    rows[0]["lv_attr"] = attr
    set_lvs(lvm, lv_report(rows))
    assert [s.open for s in LvmBackend(VG).lvs()] == [True, False]


def test_list_lv_attr_parses_as_open(lvm: FakeLvm) -> None:
    rows: list[dict[str, Any]] = list(not_open_rows("lvs-one.json"))
    rows[0]["lv_attr"] = ["-wi-a-----"]
    set_lvs(lvm, lv_report(rows))
    assert [s.open for s in LvmBackend(VG).lvs()] == [True, False]


# --- LvmBackend: free space ------------------------------------------------------------


def test_create_refuses_more_than_vg_free_without_running_lvcreate(lvm: FakeLvm) -> None:
    lvm.reports["vgs"] = recorded("vgs-full.json")
    with pytest.raises(LocalError, match="not enough free space") as info:
        LvmBackend(VG).create("core_1.0.2", 64 * MiB)
    assert not isinstance(info.value, FormatError)
    assert str(VGS_FULL_FREE) in str(info.value)
    assert lvm.calls == [VGS]
    assert "lvcreate" not in lvm.commands


def test_create_refuses_one_byte_over_vg_free(lvm: FakeLvm) -> None:
    lvm.reports["vgs"] = recorded("vgs-full.json")
    with pytest.raises(LocalError, match="not enough free space"):
        LvmBackend(VG).create("core_1.0.2", VGS_FULL_FREE + 1)
    assert "lvcreate" not in lvm.commands


def test_create_accepts_exactly_vg_free(lvm: FakeLvm) -> None:
    lvm.reports["vgs"] = recorded("vgs-full.json")
    lvm.reports["lvs"] = recorded("lvs-one.json")
    LvmBackend(VG).create("core_1.0.0", VGS_FULL_FREE)
    assert lvm.commands == ["vgs", "lvcreate", "lvs"]


def test_create_reports_lv_missing_after_lvcreate(lvm: FakeLvm) -> None:
    lvm.reports["lvs"] = recorded("lvs-one.json")
    with pytest.raises(LocalError, match=r"mainvg/core_9\.9\.9 was not created"):
        LvmBackend(VG).create("core_9.9.9", MiB)
    assert lvm.commands == ["vgs", "lvcreate", "lvs"]


def test_create_returns_the_size_lvm_reports(lvm: FakeLvm) -> None:
    # LVM rounds up to whole extents: the slot's size is what lvs says, not what was asked.
    lvm.reports["lvs"] = recorded("lvs-one.json")
    slot = LvmBackend(VG).create("core_1.0.0", 60 * MiB + 1)
    assert slot.size == 67108864


# --- LvmBackend: malformed reports -----------------------------------------------------


def _truncated(name: str) -> bytes:
    data = recorded(name)
    return data[: len(data) // 2]


def _combined_stdout_stderr() -> bytes:
    """The `lvs ... nosuchvg 2>&1` output from lvs-novg.txt: stderr lines inside the JSON."""
    text = recorded("lvs-novg.txt").decode()
    combined = text.split("--- combined (2>&1, as interleaved by the tool):\n", 1)[1]
    return combined.split("--- exit code:", 1)[0].encode()


GARBAGE_REPORTS = {
    "empty": b"",
    "not-json": b"  Volume group mainvg not found\n",
    "binary": b"\xff\xfe\x00garbage",
    "truncated-lvs-three": _truncated("lvs-three.json"),
    "truncated-vgs": _truncated("vgs.json"),
    "stdout-and-stderr-interleaved": _combined_stdout_stderr(),
    "json-null": b"null",
    "json-list": b"[]",
    "json-string": b'"report"',
    "json-number": b"42",
}


@pytest.mark.parametrize("stdout", GARBAGE_REPORTS.values(), ids=GARBAGE_REPORTS.keys())
def test_garbage_lvs_report_is_a_format_error(lvm: FakeLvm, stdout: bytes) -> None:
    set_lvs(lvm, stdout)
    with pytest.raises(FormatError, match="lvs"):
        LvmBackend(VG).slots()


@pytest.mark.parametrize("stdout", GARBAGE_REPORTS.values(), ids=GARBAGE_REPORTS.keys())
def test_garbage_vgs_report_is_a_format_error(lvm: FakeLvm, stdout: bytes) -> None:
    set_vgs(lvm, stdout)
    with pytest.raises(FormatError, match="vgs"):
        LvmBackend(VG).free_space()


MALFORMED_LV_DOCS = {
    "no-report-key": {"reports": [{"lv": []}]},
    "report-empty-list": {"report": []},
    "report-not-a-list": {"report": {"lv": []}},
    "report-a-string": {"report": "lv"},
    "no-lv-key": {"report": [{"vg": []}]},
    "lv-not-a-list": {"report": [{"lv": {"lv_name": "core_1.0.0"}}]},
    "lv-null": {"report": [{"lv": None}]},
    "row-not-an-object": {"report": [{"lv": ["core_1.0.0"]}]},
    "row-null": {"report": [{"lv": [None]}]},
}


@pytest.mark.parametrize("doc", MALFORMED_LV_DOCS.values(), ids=MALFORMED_LV_DOCS.keys())
def test_lvs_report_with_wrong_structure_is_a_format_error(lvm: FakeLvm, doc: Any) -> None:
    set_lvs(lvm, doc)
    with pytest.raises(FormatError):
        LvmBackend(VG).slots()


def test_vgs_report_missing_vg_key_is_a_format_error(lvm: FakeLvm) -> None:
    # An lvs report handed to the vgs parser.
    set_vgs(lvm, recorded("lvs-three.json"))
    with pytest.raises(FormatError):
        LvmBackend(VG).free_space()


def test_lvs_row_missing_lv_size_is_a_format_error(lvm: FakeLvm) -> None:
    rows = recorded_rows("lvs-three.json")
    del rows[1]["lv_size"]
    set_lvs(lvm, lv_report(rows))
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).slots()


def test_vgs_row_missing_vg_free_is_a_format_error(lvm: FakeLvm) -> None:
    set_vgs(lvm, {"report": [{"vg": [{"vg_name": VG, "vg_size": "264241152"}]}]})
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).free_space()


@pytest.mark.parametrize("count", [0, 2])
def test_vgs_report_without_exactly_one_vg_is_a_format_error(lvm: FakeLvm, count: int) -> None:
    row = json.loads(recorded("vgs.json"))["report"][0]["vg"][0]
    set_vgs(lvm, {"report": [{"vg": [row] * count}]})
    with pytest.raises(FormatError, match="expected one volume group"):
        LvmBackend(VG).free_space()


NON_NUMERIC_SIZES = {
    "empty": "",
    "suffix-b": "67108864B",
    "units": "64.00m",
    "float": "67108864.0",
    "negative": "-1",
    "plus": "+1",
    "spaces": " 67108864",
    "hex": "0x4000000",
    "words": "unknown",
    "json-number": 67108864,
    "json-null": None,
    "json-bool": True,
    "json-list": ["67108864"],
}


@pytest.mark.parametrize("size", NON_NUMERIC_SIZES.values(), ids=NON_NUMERIC_SIZES.keys())
def test_non_numeric_lv_size_is_a_format_error(lvm: FakeLvm, size: object) -> None:
    rows: list[dict[str, Any]] = list(recorded_rows("lvs-three.json"))
    rows[0]["lv_size"] = size
    set_lvs(lvm, lv_report(rows))
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).slots()


@pytest.mark.parametrize("free", NON_NUMERIC_SIZES.values(), ids=NON_NUMERIC_SIZES.keys())
def test_non_numeric_vg_free_is_a_format_error(lvm: FakeLvm, free: object) -> None:
    set_vgs(lvm, {"report": [{"vg": [{"vg_name": VG, "vg_free": free}]}]})
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).free_space()


def test_non_numeric_vg_free_stops_create_before_lvcreate(lvm: FakeLvm) -> None:
    set_vgs(lvm, {"report": [{"vg": [{"vg_name": VG, "vg_free": "lots"}]}]})
    with pytest.raises(FormatError):
        LvmBackend(VG).create("core_1.0.2", MiB)
    assert lvm.commands == ["vgs"]


# Superscript, circled, full-width (U+FF10..) and Arabic-Indic (U+0660..) digits.
UNICODE_DIGIT_SIZES = [
    "²",
    "6710886⁴",
    "①",
    "\uff16\uff17\uff11\uff10\uff18\uff18\uff16\uff14",
    "٦٧١٠٨٨٦٤",
]


@pytest.mark.parametrize("size", UNICODE_DIGIT_SIZES)
def test_unicode_digit_lv_size_is_a_format_error(lvm: FakeLvm, size: str) -> None:
    rows = recorded_rows("lvs-three.json")
    rows[0]["lv_size"] = size
    set_lvs(lvm, lv_report(rows))
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).slots()


@pytest.mark.parametrize("free", UNICODE_DIGIT_SIZES)
def test_unicode_digit_vg_free_is_a_format_error(lvm: FakeLvm, free: str) -> None:
    set_vgs(lvm, {"report": [{"vg": [{"vg_name": VG, "vg_free": free}]}]})
    with pytest.raises(FormatError, match="byte count"):
        LvmBackend(VG).free_space()


def test_lvs_row_missing_lv_name_is_a_format_error(lvm: FakeLvm) -> None:
    rows = recorded_rows("lvs-three.json")
    del rows[2]["lv_name"]
    set_lvs(lvm, lv_report(rows))
    with pytest.raises(FormatError, match="invalid LV name"):
        LvmBackend(VG).lvs()


@pytest.mark.parametrize(
    "name",
    [
        None,
        42,
        ["core_1.0.0"],
        *[name for name in INVALID_NAMES if not name.startswith("-")],
        "-rf",
        ".",
        "..",
    ],
)
def test_lvs_row_with_invalid_lv_name_is_a_format_error(lvm: FakeLvm, name: object) -> None:
    rows: list[dict[str, Any]] = list(recorded_rows("lvs-three.json"))
    rows[1]["lv_name"] = name
    set_lvs(lvm, lv_report(rows))
    with pytest.raises(FormatError, match="invalid LV name"):
        LvmBackend(VG).lvs()


# --- LvmBackend: failing commands ------------------------------------------------------


def _fake_tool(bindir: Path, name: str, stdout: bytes, stderr: bytes, code: int) -> None:
    script = bindir / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.stdout.buffer.write({stdout!r})\n"
        f"sys.stderr.buffer.write({stderr!r})\n"
        f"sys.exit({code})\n"
    )
    script.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH: the real `run.run` finds fake LVM tools there."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin')}")
    return bindir


NOVG_STDERR = b'  Volume group "nosuchvg" not found\n  Cannot process volume group nosuchvg\n'


def test_failing_lvs_is_a_local_error_through_real_run(fake_bin: Path) -> None:
    # As recorded in lvs-novg.txt: an empty report on stdout, exit code 5.
    empty = b'  {\n      "report": [\n          {\n              "lv": [\n              ]\n'
    empty += b"          }\n      ]\n  }\n"
    _fake_tool(fake_bin, "lvs", empty, NOVG_STDERR, 5)
    # The last stderr line, stripped of LVM's two-space indent.
    last = r"^lvs failed with exit code 5: Cannot process volume group nosuchvg$"
    with pytest.raises(LocalError, match=last) as info:
        LvmBackend("nosuchvg").slots()
    assert not isinstance(info.value, FormatError)


def test_failing_vgs_is_a_local_error_through_real_run(fake_bin: Path) -> None:
    _fake_tool(fake_bin, "vgs", b"", NOVG_STDERR, 5)
    with pytest.raises(LocalError, match=r"^vgs failed with exit code 5"):
        LvmBackend("nosuchvg").free_space()


def test_failing_lvcreate_is_a_local_error_through_real_run(fake_bin: Path) -> None:
    # lvcreate-nospace.txt, second command: exit code 3 without device-mapper.
    _fake_tool(fake_bin, "vgs", recorded("vgs.json"), b"", 0)
    stderr = b"  striped: Required device-mapper target(s) not detected in your kernel.\n"
    stderr += b"  Run `lvcreate --help' for more information.\n"
    _fake_tool(fake_bin, "lvcreate", b"", stderr, 3)
    last = r"^lvcreate failed with exit code 3: Run `lvcreate --help' for more information\.$"
    with pytest.raises(LocalError, match=last):
        LvmBackend(VG).create("core_1.0.2", 64 * MiB)


def test_real_run_reads_lvs_report_despite_stderr_warnings(fake_bin: Path) -> None:
    # On the recording host lvs warned on stderr and exited 0 with a complete report.
    stderr = b"  /dev/mapper/control: open failed: No such device\n"
    _fake_tool(fake_bin, "lvs", recorded("lvs-three.json"), stderr, 0)
    assert [s.name for s in LvmBackend(VG).slots()] == ["core_1.0.0", "core_1.0.1"]


def test_missing_lvm_tools_are_a_local_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalError, match="command not found"):
        LvmBackend(VG).slots()


@pytest.mark.parametrize("command", ["lvrename", "lvremove", "lvcreate", "lvs", "vgs"])
def test_failing_command_surfaces_as_local_error(lvm: FakeLvm, command: str) -> None:
    lvm.failing.add(command)
    backend = LvmBackend(VG)
    slot = Slot("core_1.0.1", 67108864, Path("/dev/mainvg/core_1.0.1"))
    with pytest.raises(LocalError, match=f"^{command} failed"):
        if command == "lvrename":
            backend.rename(slot, "core_1.0.2")
        elif command == "lvremove":
            backend.remove(slot)
        elif command == "lvs":
            backend.slots()
        else:
            backend.create("core_1.0.2", MiB)


def test_failing_vgs_stops_create_before_lvcreate(lvm: FakeLvm) -> None:
    lvm.failing.add("vgs")
    with pytest.raises(LocalError):
        LvmBackend(VG).create("core_1.0.2", MiB)
    assert lvm.commands == ["vgs"]


# --- LvmBackend: invalid names ---------------------------------------------------------


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_vg_name_is_refused(lvm: FakeLvm, name: str) -> None:
    with pytest.raises(UsageError, match="invalid logical volume name"):
        LvmBackend(name)
    assert lvm.calls == []


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_rename_to_invalid_name_is_refused_before_any_command(lvm: FakeLvm, name: str) -> None:
    slot = Slot("core_1.0.0", 67108864, Path("/dev/mainvg/core_1.0.0"))
    with pytest.raises(UsageError, match="invalid logical volume name"):
        LvmBackend(VG).rename(slot, name)
    assert lvm.calls == []


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_create_with_invalid_name_is_refused_with_usage_error(lvm: FakeLvm, name: str) -> None:
    with pytest.raises(UsageError, match="invalid logical volume name"):
        LvmBackend(VG).create(name, MiB)
    assert "lvcreate" not in lvm.commands


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_create_with_invalid_name_runs_no_command(lvm: FakeLvm, name: str) -> None:
    with pytest.raises(UsageError, match="invalid logical volume name"):
        LvmBackend(VG).create(name, MiB)
    assert lvm.calls == []


def test_create_with_invalid_name_and_too_large_size_is_a_usage_error(lvm: FakeLvm) -> None:
    lvm.reports["vgs"] = recorded("vgs-full.json")
    with pytest.raises(UsageError, match="invalid logical volume name"):
        LvmBackend(VG).create("-rf", 64 * MiB)
    assert lvm.calls == []


@pytest.mark.parametrize("name", INVALID_NAMES)
@pytest.mark.parametrize("operation", ["rename", "remove"])
def test_rename_or_remove_of_slot_with_invalid_name_runs_no_command(
    lvm: FakeLvm, name: str, operation: str
) -> None:
    slot = Slot(name, MiB, Path("/dev/mainvg") / (name or "x"))
    backend = LvmBackend(VG)
    with pytest.raises(UsageError, match="invalid logical volume name"):
        if operation == "rename":
            backend.rename(slot, "core_1.0.2")
        else:
            backend.remove(slot)
    assert lvm.calls == []


# --- FileBackend -----------------------------------------------------------------------


CAPACITY = 10 * MiB


@pytest.fixture
def vg_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "vg"
    directory.mkdir()
    return directory


def file_backend(directory: Path, capacity: int = CAPACITY) -> FileBackend:
    return FileBackend(directory, capacity)


def test_file_backend_missing_directory_is_a_local_error(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="not found"):
        FileBackend(tmp_path / "nope", CAPACITY)


def test_file_backend_create_makes_a_file_of_the_size(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    slot = backend.create("core_1.0.0", 3 * MiB)
    assert slot == Slot("core_1.0.0", 3 * MiB, vg_dir / "core_1.0.0")
    assert (vg_dir / "core_1.0.0").stat().st_size == 3 * MiB
    assert backend.slots() == [slot]


def test_file_backend_rename_moves_the_file(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    slot = backend.create("core_1.0.0", MiB)
    (vg_dir / "core_1.0.0").write_bytes(b"image" + bytes(MiB - 5))
    renamed = backend.rename(slot, "core_1.0.1")
    assert renamed == Slot("core_1.0.1", MiB, vg_dir / "core_1.0.1")
    assert not (vg_dir / "core_1.0.0").exists()
    assert (vg_dir / "core_1.0.1").read_bytes()[:5] == b"image"
    assert [s.name for s in backend.slots()] == ["core_1.0.1"]


def test_file_backend_remove_deletes_the_file(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    slot = backend.create("core_1.0.0", MiB)
    backend.remove(slot)
    assert not slot.path.exists()
    assert backend.slots() == []
    assert backend.free_space() == CAPACITY


def test_file_backend_free_space_is_capacity_minus_files(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    assert backend.free_space() == CAPACITY
    backend.create("core_1.0.0", 3 * MiB)
    assert backend.free_space() == CAPACITY - 3 * MiB
    backend.create("core_1.0.1", 2 * MiB)
    assert backend.free_space() == CAPACITY - 5 * MiB


@pytest.mark.parametrize("name", ["core_state", "core_swap", "filler"])
def test_file_backend_non_slot_lvs_count_against_capacity(vg_dir: Path, name: str) -> None:
    (vg_dir / name).write_bytes(bytes(4 * MiB))
    backend = file_backend(vg_dir)
    assert backend.free_space() == CAPACITY - 4 * MiB
    assert backend.slots() == []


def test_file_backend_free_space_never_negative(vg_dir: Path) -> None:
    (vg_dir / "core_state").write_bytes(bytes(2 * MiB))
    assert file_backend(vg_dir, capacity=MiB).free_space() == 0


def test_file_backend_refuses_creation_beyond_capacity(vg_dir: Path) -> None:
    (vg_dir / "core_state").write_bytes(bytes(4 * MiB))
    backend = file_backend(vg_dir)
    with pytest.raises(LocalError, match="not enough free space"):
        backend.create("core_1.0.0", 6 * MiB + 1)
    assert not (vg_dir / "core_1.0.0").exists()
    slot = backend.create("core_1.0.0", 6 * MiB)
    assert slot.size == 6 * MiB
    assert backend.free_space() == 0
    with pytest.raises(LocalError, match="not enough free space"):
        backend.create("core_1.0.1", 1)


def test_file_backend_refuses_creating_an_existing_lv(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    backend.create("core_1.0.0", MiB)
    (vg_dir / "core_1.0.0").write_bytes(b"keep")
    with pytest.raises(LocalError, match="already exists"):
        backend.create("core_1.0.0", MiB)
    assert (vg_dir / "core_1.0.0").read_bytes() == b"keep"


def test_file_backend_rename_of_a_vanished_file_is_a_local_error(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    slot = backend.create("core_1.0.0", MiB)
    slot.path.unlink()
    with pytest.raises(LocalError, match=r"cannot rename to core_1\.0\.1") as info:
        backend.rename(slot, "core_1.0.1")
    assert str(slot.path) in str(info.value)
    assert not (vg_dir / "core_1.0.1").exists()


def test_file_backend_remove_of_a_vanished_file_is_a_local_error(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    slot = backend.create("core_1.0.0", MiB)
    slot.path.unlink()
    with pytest.raises(LocalError, match="cannot remove") as info:
        backend.remove(slot)
    assert str(slot.path) in str(info.value)


def test_file_backend_remove_of_a_directory_is_a_local_error(vg_dir: Path) -> None:
    (vg_dir / "core_1.0.0").mkdir()
    slot = Slot("core_1.0.0", MiB, vg_dir / "core_1.0.0")
    with pytest.raises(LocalError, match="cannot remove"):
        file_backend(vg_dir).remove(slot)
    assert (vg_dir / "core_1.0.0").is_dir()


def test_file_backend_refuses_rename_onto_an_existing_name(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    old = backend.create("core_1.0.0", MiB)
    (vg_dir / "core_1.0.0").write_bytes(b"old")
    (vg_dir / "core_1.0.1").write_bytes(b"other")
    with pytest.raises(LocalError, match="already exists"):
        backend.rename(old, "core_1.0.1")
    assert (vg_dir / "core_1.0.0").read_bytes() == b"old"
    assert (vg_dir / "core_1.0.1").read_bytes() == b"other"


def test_file_backend_refuses_rename_onto_core_state(vg_dir: Path) -> None:
    backend = file_backend(vg_dir)
    old = backend.create("core_1.0.0", MiB)
    (vg_dir / "core_state").write_bytes(b"state")
    with pytest.raises(LocalError, match="already exists"):
        backend.rename(old, "core_state")
    assert (vg_dir / "core_state").read_bytes() == b"state"


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_file_backend_refuses_invalid_names(vg_dir: Path, name: str) -> None:
    backend = file_backend(vg_dir)
    with pytest.raises(UsageError, match="invalid logical volume name"):
        backend.create(name, MiB)
    slot = backend.create("core_1.0.0", MiB)
    with pytest.raises(UsageError, match="invalid logical volume name"):
        backend.rename(slot, name)
    assert sorted(p.name for p in vg_dir.iterdir()) == ["core_1.0.0"]


def test_file_backend_slots_exclude_reserved_and_non_lv_files(vg_dir: Path) -> None:
    for name in (
        "core_1.0.0",
        "core_2.0.0-rc.1",
        "core_state",
        "core_swap",
        "filler",
        "core 3.0.0",  # not an LV name (space)
        "core_4.0.0:x",  # not an LV name (:)
        "core_5.0.0.img~",  # not an LV name (~)
    ):
        (vg_dir / name).write_bytes(b"x")
    (vg_dir / "core_6.0.0").mkdir()  # a directory is not an LV
    names = [s.name for s in file_backend(vg_dir).slots()]
    assert "core_state" not in names
    assert "core_swap" not in names
    assert "filler" not in names
    assert "core 3.0.0" not in names
    assert "core_4.0.0:x" not in names
    assert "core_5.0.0.img~" not in names
    assert "core_6.0.0" not in names
    assert names == ["core_1.0.0", "core_2.0.0-rc.1"]


# --- busy_reason -----------------------------------------------------------------------


RUNNING = parse_version("1.0.0")
RUNNING_OTHER = parse_version("2.0.0")  # for checks on core_1.0.0 that must not stop at "running"


def slot(name: str, *, is_open: bool = False) -> Slot:
    return Slot(name, 64 * MiB, Path(f"/dev/mainvg/{name}"), open=is_open)


@pytest.fixture
def mapper(tmp_path: Path) -> Path:
    directory = tmp_path / "mapper"
    directory.mkdir()
    (directory / "control").touch()
    return directory


def write_mountinfo(tmp_path: Path, *sources: str) -> Path:
    lines = [
        "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
        "25 1 0:23 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755",
    ]
    for n, source in enumerate(sources):
        lines.append(
            f"{40 + n} 35 253:{n} / /mnt/m{n} ro,relatime shared:{30 + n} - ext4 {source} ro"
        )
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mounted_sources_reads_the_field_after_the_separator(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(
        "36 35 253:1 / / ro,relatime shared:1 - squashfs /dev/mapper/verity_core_1.0.0 ro\n"
        "37 36 0:5 / /dev rw shared:2 master:1 - devtmpfs udev rw\n"
        "38 36 253:3 / /mnt/with\\040space rw - ext4 /dev/my\\040disk rw\n"
        "garbage line without separator\n"
    )
    assert mounted_sources(path) == {
        "/dev/mapper/verity_core_1.0.0",
        "udev",
        "/dev/my disk",
    }


def test_mounted_sources_of_missing_file_is_a_local_error(tmp_path: Path) -> None:
    # Not knowing what is mounted is not "nothing is mounted".
    missing = tmp_path / "nope"
    with pytest.raises(LocalError, match="cannot read") as info:
        mounted_sources(missing)
    assert str(missing) in str(info.value)
    assert not isinstance(info.value, FormatError)


def test_mounted_sources_of_unreadable_path_is_a_local_error(tmp_path: Path) -> None:
    # A directory where the file should be: reading fails with an OSError too.
    with pytest.raises(LocalError, match="cannot read"):
        mounted_sources(tmp_path)


def test_busy_reason_unused_slot_is_none(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path, "/dev/mainvg/core_state")
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) is None


def test_busy_reason_running_version(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    reason = busy_reason(slot("core_1.0.0"), RUNNING, mapper, mountinfo)
    assert reason == "it holds the running version"


def test_busy_reason_running_version_ignores_build_metadata(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    running = parse_version("1.0.0+build.7")
    assert slot_name(running) == "core_1.0.0"
    assert busy_reason(slot("core_1.0.0"), running, mapper, mountinfo) is not None


def test_busy_reason_running_prerelease_is_not_the_release(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    running = parse_version("1.0.0-rc.1")
    assert busy_reason(slot("core_1.0.0"), running, mapper, mountinfo) is None
    assert busy_reason(slot("core_1.0.0-rc.1"), running, mapper, mountinfo) is not None


def test_busy_reason_open_lv(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    reason = busy_reason(slot("core_1.0.1", is_open=True), RUNNING, mapper, mountinfo)
    assert reason == "the logical volume is open"


def test_busy_reason_open_lv_from_lvs_report(lvm: FakeLvm, tmp_path: Path, mapper: Path) -> None:
    rows = recorded_rows("lvs-three.json")
    rows[1]["lv_attr"] = "-wi-ao----"
    set_lvs(lvm, lv_report(rows))
    other = next(s for s in LvmBackend(VG).slots() if s.name == "core_1.0.1")
    mountinfo = write_mountinfo(tmp_path)
    assert busy_reason(other, RUNNING, mapper, mountinfo) == "the logical volume is open"


def test_busy_reason_recorded_unknown_open_state_is_busy(
    lvm: FakeLvm, tmp_path: Path, mapper: Path
) -> None:
    # lvs-three.json as recorded: '-wi-XX----', open state unknown, so not writable.
    other = next(s for s in LvmBackend(VG).slots() if s.name == "core_1.0.1")
    mountinfo = write_mountinfo(tmp_path)
    assert busy_reason(other, RUNNING, mapper, mountinfo) == "the logical volume is open"


def test_busy_reason_not_open_lv_from_lvs_report_is_free(
    lvm: FakeLvm, tmp_path: Path, mapper: Path
) -> None:
    # lvs-three.json with '-' at position 5: the other slot is active but unused.
    set_lvs(lvm, not_open_report("lvs-three.json"))
    other = next(s for s in LvmBackend(VG).slots() if s.name == "core_1.0.1")
    mountinfo = write_mountinfo(tmp_path, "/dev/mainvg/core_state")
    assert busy_reason(other, RUNNING, mapper, mountinfo) is None


def test_busy_reason_lv_path_mounted(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path, "/dev/mainvg/core_1.0.1")
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) == "it is mounted"


def test_busy_reason_device_mapper_path_mounted(tmp_path: Path, mapper: Path) -> None:
    # mount(8) canonicalizes /dev/mainvg/core_1.0.0 (a symlink to /dev/dm-N) to the
    # device-mapper name, so that is what mountinfo shows.
    mountinfo = write_mountinfo(tmp_path, "/dev/mapper/mainvg-core_1.0.0")
    assert busy_reason(slot("core_1.0.0"), RUNNING_OTHER, mapper, mountinfo) == "it is mounted"
    assert busy_reason(slot("core_1.0.1"), RUNNING_OTHER, mapper, mountinfo) is None


def test_busy_reason_device_mapper_path_doubles_dashes_in_names(
    tmp_path: Path, mapper: Path
) -> None:
    # device-mapper names join VG and LV with '-' and double any '-' inside either name.
    used = Slot("core_1.0.0-rc.1", 64 * MiB, Path("/dev/main-vg/core_1.0.0-rc.1"))
    mountinfo = write_mountinfo(tmp_path, "/dev/mapper/main--vg-core_1.0.0--rc.1")
    assert busy_reason(used, RUNNING, mapper, mountinfo) == "it is mounted"
    # The undoubled spellings name other devices (or nothing): they do not count.
    for source in (
        "/dev/mapper/main-vg-core_1.0.0-rc.1",
        "/dev/mapper/main--vg-core_1.0.0-rc.1",
        "/dev/mapper/main-vg-core_1.0.0--rc.1",
    ):
        mountinfo = write_mountinfo(tmp_path, source)
        assert busy_reason(used, RUNNING, mapper, mountinfo) is None, source


def test_busy_reason_verity_device_mounted(tmp_path: Path, mapper: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "36 35 253:1 / / ro,relatime shared:1 - squashfs /dev/mapper/verity_core_1.0.1 ro\n"
    )
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) == "it is mounted"


def test_busy_reason_verity_mapping_present(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    (mapper / "verity_core_1.0.1").touch()
    reason = busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo)
    assert reason == f"it is mapped as {mapper / 'verity_core_1.0.1'}"


def test_busy_reason_verity_mapping_as_symlink(tmp_path: Path, mapper: Path) -> None:
    # With udev, /dev/mapper entries are symlinks to ../dm-N.
    (tmp_path / "dm-3").touch()
    (mapper / "verity_core_1.0.1").symlink_to("../dm-3")
    mountinfo = write_mountinfo(tmp_path)
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) is not None


def test_busy_reason_matches_names_exactly(tmp_path: Path, mapper: Path) -> None:
    # core_1.0.10 in use says nothing about core_1.0.1.
    mountinfo = write_mountinfo(
        tmp_path, "/dev/mainvg/core_1.0.10", "/dev/mapper/verity_core_1.0.10"
    )
    (mapper / "verity_core_1.0.10").touch()
    (mapper / "mainvg-core_1.0.1").touch()  # the LV's own dm node: not a verity mapping
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) is None
    assert busy_reason(slot("core_1.0.10"), RUNNING, mapper, mountinfo) == "it is mounted"


def test_busy_reason_mount_inside_another_source_does_not_count(
    tmp_path: Path, mapper: Path
) -> None:
    # The slot's path as a mount point (not a source) is not a use of the slot.
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "40 35 0:30 / /dev/mainvg/core_1.0.1 rw - tmpfs /dev/mainvg/core_1.0.1x rw\n"
    )
    assert busy_reason(slot("core_1.0.1"), RUNNING, mapper, mountinfo) is None


def test_busy_reason_with_missing_mapper_dir_is_none(tmp_path: Path) -> None:
    mountinfo = write_mountinfo(tmp_path)
    assert busy_reason(slot("core_1.0.1"), RUNNING, tmp_path / "nomapper", mountinfo) is None


def test_busy_reason_with_missing_mountinfo_is_a_local_error(tmp_path: Path, mapper: Path) -> None:
    missing = tmp_path / "nomi"
    with pytest.raises(LocalError, match="cannot read") as info:
        busy_reason(slot("core_1.0.1"), RUNNING, mapper, missing)
    assert str(missing) in str(info.value)


def test_busy_reason_running_and_open_need_no_mountinfo(tmp_path: Path, mapper: Path) -> None:
    # The running and open checks come first and decide without reading mountinfo.
    missing = tmp_path / "nomi"
    reason = busy_reason(slot("core_1.0.0"), RUNNING, mapper, missing)
    assert reason == "it holds the running version"
    reason = busy_reason(slot("core_1.0.1", is_open=True), RUNNING, mapper, missing)
    assert reason == "the logical volume is open"


def test_busy_reason_running_is_checked_first(tmp_path: Path, mapper: Path) -> None:
    mountinfo = write_mountinfo(tmp_path, "/dev/mainvg/core_1.0.0")
    (mapper / "verity_core_1.0.0").touch()
    running = slot("core_1.0.0", is_open=True)
    assert busy_reason(running, RUNNING, mapper, mountinfo) == "it holds the running version"


def test_busy_reason_file_backend_slot(vg_dir: Path, tmp_path: Path, mapper: Path) -> None:
    backend = file_backend(vg_dir)
    free = backend.create("core_1.0.1", MiB)
    mountinfo = write_mountinfo(tmp_path, str(vg_dir / "core_1.0.2"))
    assert busy_reason(free, RUNNING, mapper, mountinfo) is None
    used = backend.create("core_1.0.2", MiB)
    assert busy_reason(used, RUNNING, mapper, mountinfo) == "it is mounted"
