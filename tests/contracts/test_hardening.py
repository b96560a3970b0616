"""The kernel hardening audit (rampart.contracts.hardening): the shipped data file, the
three inputs (kernel config, command line, sysctl files and /proc/sys), coverage of a
kernel option by another setting, and regressions against a recorded report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rampart.contracts import cmdline, hardening
from rampart.errors import FormatError, LocalError

SHIPPED_SYSCTL = Path(hardening.__file__).parents[1] / "data" / "hardening" / "sysctl.conf"


def _rec(kind: str, name: str) -> hardening.Recommendation:
    [rec] = [r for r in hardening.load() if (r.kind, r.name) == (kind, name)]
    return rec


def _status(findings: list[hardening.Finding], kind: str, name: str) -> str:
    [found] = [f for f in findings if f.key == f"{kind}:{name}"]
    return found.status


def test_the_shipped_recommendations_load_and_each_gives_its_reason() -> None:
    recs = hardening.load()
    kinds = {r.kind for r in recs}
    assert kinds == set(hardening.KINDS)
    assert all(r.why.endswith(".") for r in recs)
    assert len(recs) == len({(r.kind, r.name) for r in recs})


def test_a_kernel_option_is_met_covered_or_a_gap() -> None:
    config = hardening.parse_kconfig(
        "CONFIG_MODULE_SIG=y\n"
        "# CONFIG_MODULE_SIG_FORCE is not set\n"
        "CONFIG_DEVMEM=y\n"
        "CONFIG_DEFAULT_MMAP_MIN_ADDR=65536\n"
        "# CONFIG_BPF_JIT_ALWAYS_ON is not set\n"
    )
    recs = [
        _rec("kconfig", n)
        for n in (
            "CONFIG_MODULE_SIG",
            "CONFIG_MODULE_SIG_FORCE",
            "CONFIG_DEVMEM",
            "CONFIG_DEFAULT_MMAP_MIN_ADDR",
            "CONFIG_BPF_JIT_ALWAYS_ON",
            "CONFIG_DEVKMEM",
        )
    ]
    recs += [_rec("cmdline", "lockdown")]
    found = hardening.audit(recs, kconfig=config, cmdline="lockdown=confidentiality")
    assert _status(found, "kconfig", "CONFIG_MODULE_SIG") == hardening.MET
    assert _status(found, "kconfig", "CONFIG_DEFAULT_MMAP_MIN_ADDR") == hardening.MET
    # an option this kernel does not have at all is not set
    assert _status(found, "kconfig", "CONFIG_DEVKMEM") == hardening.MET
    assert _status(found, "kconfig", "CONFIG_MODULE_SIG_FORCE") == hardening.COVERED
    assert _status(found, "kconfig", "CONFIG_DEVMEM") == hardening.COVERED
    assert _status(found, "kconfig", "CONFIG_BPF_JIT_ALWAYS_ON") == hardening.GAP
    without = hardening.audit(recs, kconfig=config, cmdline="lockdown=integrity")
    assert _status(without, "kconfig", "CONFIG_MODULE_SIG_FORCE") == hardening.GAP
    assert _status(without, "kconfig", "CONFIG_DEVMEM") == hardening.GAP


def test_a_bare_flag_counts_and_the_last_value_of_a_parameter_wins() -> None:
    recs = [_rec("cmdline", "slab_nomerge"), _rec("cmdline", "init_on_free")]
    found = hardening.audit(recs, cmdline="init_on_free=1 slab_nomerge init_on_free=0")
    assert _status(found, "cmdline", "slab_nomerge") == hardening.MET
    assert _status(found, "cmdline", "init_on_free") == hardening.GAP
    assert [f.status for f in hardening.audit(recs)] == [hardening.UNCHECKED] * 2


def test_the_kernel_command_line_meets_every_cmdline_recommendation() -> None:
    line = cmdline.kernel_cmdline(
        "mainvg", "1.0.0", roothash="ab" * 32, hash_offset=4096, data_blocks=1
    )
    recs = [r for r in hardening.load() if r.kind == "cmdline"]
    gaps = [f.key for f in hardening.audit(recs, cmdline=line) if f.status != hardening.MET]
    assert gaps == []


def test_sysctl_files_apply_as_systemd_sysctl_applies_them(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/sysctl.d").mkdir(parents=True)
    (tmp_path / "etc/sysctl.d").mkdir(parents=True)
    (tmp_path / "usr/lib/sysctl.d/10-a.conf").write_text("kernel.sysrq = 1\nfs.suid_dumpable=1\n")
    (tmp_path / "usr/lib/sysctl.d/50-b.conf").write_text("kernel/sysrq = 2\n")
    # the same name in /etc replaces the vendor's file entirely
    (tmp_path / "etc/sysctl.d/10-a.conf").write_text("; a comment\n-fs.suid_dumpable = 0\n")
    # /etc/sysctl.conf only through Debian's link, its target in the tree
    (tmp_path / "etc/sysctl.conf").write_text("vm.mmap_min_addr = 4096\n")
    values = hardening.sysctl_tree(tmp_path)
    assert "vm.mmap_min_addr" not in values
    (tmp_path / "etc/sysctl.d/99-sysctl.conf").symlink_to("../sysctl.conf")
    values = hardening.sysctl_tree(tmp_path)
    assert values["fs.suid_dumpable"] == "0"
    assert values["vm.mmap_min_addr"] == "4096"
    # a file later in name order wins; `/` in a key is `.`
    assert values["kernel.sysrq"] == "2"


def test_debian_s_dangling_99_sysctl_conf_is_skipped_and_links_stay_in_the_tree(
    tmp_path: Path,
) -> None:
    """A link's target is the tree's own file, never this machine's; a dangling link
    is skipped and a link to /dev/null masks the file, as systemd-sysctl does."""
    conf = tmp_path / "etc/sysctl.d"
    conf.mkdir(parents=True)
    (tmp_path / "usr/lib/sysctl.d").mkdir(parents=True)
    (tmp_path / "usr/lib/sysctl.d/20-masked.conf").write_text("kernel.sysrq = 1\n")
    (tmp_path / "usr/lib/sysctl.d/30-v.conf").write_text("kernel.sysrq = 0\n")
    (tmp_path / "etc/hostname").write_text("vm.swappiness = 7\n")
    (conf / "10-abs.conf").symlink_to("/etc/hostname")  # the tree's, not the host's
    (conf / "11-up.conf").symlink_to("../../../../../etc/hostname")  # .. stops at the root
    (conf / "20-masked.conf").symlink_to("/dev/null")
    (conf / "99-sysctl.conf").symlink_to("../sysctl.conf")  # dangling: no procps
    assert hardening.sysctl_tree(tmp_path) == {"vm.swappiness": "7", "kernel.sysrq": "0"}
    (conf / "40-loop.conf").symlink_to("40-loop.conf")
    with pytest.raises(LocalError, match="too many levels"):
        hardening.sysctl_tree(tmp_path)


def test_the_core_s_sysctl_file_meets_every_sysctl_recommendation(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/sysctl.d").mkdir(parents=True)
    (tmp_path / "usr/lib/sysctl.d/50-rampart-hardening.conf").write_bytes(
        SHIPPED_SYSCTL.read_bytes()
    )
    recs = [r for r in hardening.load() if r.kind == "sysctl"]
    values = hardening.sysctl_tree(tmp_path)
    assert [f.key for f in hardening.audit(recs, sysctl=values) if f.status != "met"] == []
    assert set(values) == {r.name for r in recs}


def test_running_values_are_read_from_proc_sys(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/kptr_restrict").write_text("2\n")
    values = hardening.sysctl_running(["kernel.kptr_restrict", "dev.tty.legacy_tiocsti"], tmp_path)
    assert values == {"kernel.kptr_restrict": "2"}


def test_a_regression_is_what_passed_before_and_is_a_gap_now(tmp_path: Path) -> None:
    recs = [_rec("sysctl", "kernel.sysrq"), _rec("sysctl", "kernel.kptr_restrict")]
    before = hardening.audit(recs, sysctl={"kernel.sysrq": "0", "kernel.kptr_restrict": "1"})
    recorded = tmp_path / "hardening.json"
    recorded.write_text(json.dumps(hardening.report(before)))
    now = hardening.audit(recs, sysctl={"kernel.sysrq": "1", "kernel.kptr_restrict": "1"})
    # kptr_restrict was a gap already: no regression; sysrq was met
    assert [f.key for f in hardening.regressions(hardening.read_report(recorded), now)] == [
        "sysctl:kernel.sysrq"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("format = 2\n", "format = 2"),
        ('format = 1\n[[sysctl]]\nname = "kernel.sysrq"\nwant = "0"\n', "why is missing"),
        ('format = 1\n[[sysctl]]\nname = "kernel.sysrq"\nwhy = "x."\n', "want or one_of"),
        ('format = 1\n[[kconfig]]\nname = "DEVMEM"\nwant = "n"\nwhy = "x."\n', "CONFIG_"),
        (
            'format = 1\n[[kconfig]]\nname = "CONFIG_X"\nwant = "n"\nwhy = "x."\n'
            'covered_by = "kconfig:CONFIG_Y=y"\n',
            "covered_by",
        ),
        (
            'format = 1\n[[sysctl]]\nname = "kernel.sysrq"\nwant = "0 1"\nwhy = "x."\n',
            "not a value",
        ),
        ("format = 1\n[[other]]\n", "unknown key"),
    ],
)
def test_a_malformed_data_file_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message) as caught:
        hardening.load(text, "mine.toml")
    assert str(caught.value).startswith("mine.toml") and "\n" not in str(caught.value)
