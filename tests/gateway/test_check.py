"""rampart gateway check: what it catches in a rendered tree, each problem one line."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from rampart.errors import AuditError, LocalError
from rampart.gateway import check, description, render
from tests.gateway import pki


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = pki.make_pki(tmp_path_factory.mktemp("pki"))
    path = keys / "gateway.toml"
    path.write_text(pki.gateway_toml())
    out = tmp_path_factory.mktemp("rendered")
    render.write(description.load(path), out)
    return out


@pytest.fixture
def tree(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy


def _edit(tree: Path, rel: str, old: str, new: str, *, update_manifest: bool = True) -> None:
    path = tree / rel
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    if update_manifest:
        manifest = tree / render.MANIFEST
        lines = []
        for line in manifest.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name == rel:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append(f"{digest}  {name}")
        manifest.write_text("\n".join(lines) + "\n")


def _problems(tree: Path) -> list[str]:
    with pytest.raises(AuditError) as caught:
        check.check(tree)
    assert caught.value.exit_code == 5
    for problem in caught.value.problems:
        assert "\n" not in problem
    return caught.value.problems


def test_an_edited_file_is_caught_by_the_manifest(tree: Path) -> None:
    _edit(tree, render.PUBLIC_NFT, "policy drop;", "policy accept;", update_manifest=False)
    assert _problems(tree) == [
        f"{render.PUBLIC_NFT}: changed since it was rendered (SHA-256 differs)"
    ]


def test_a_missing_file_is_caught(tree: Path) -> None:
    (tree / render.TUNNEL_NFT).unlink()
    assert _problems(tree) == [f"{render.TUNNEL_NFT}: missing (listed in MANIFEST)"]


def test_a_bad_rule_fails_nft_check_with_its_line(tree: Path) -> None:
    _edit(tree, render.TUNNEL_NFT, "ct state invalid drop", "ct state bogus drop")
    [problem] = _problems(tree)
    assert problem.startswith(f"{render.TUNNEL_NFT}: nft -c: {tree / render.TUNNEL_NFT}:")
    assert "Error:" in problem


def test_an_expression_in_the_wrong_hook_is_caught_by_the_scratch_load(tree: Path) -> None:
    """nft -c accepts `ipsec in` in an output chain; the kernel does not."""
    _edit(tree, render.TUNNEL_NFT, '        oif "lo" accept', "        ipsec in reqid 1 accept")
    [problem] = _problems(tree)
    assert problem.startswith(f"{render.TUNNEL_NFT}: loading into a scratch network namespace: "), (
        problem
    )
    assert "Operation not supported" in problem


def test_an_unknown_user_in_a_ruleset_is_caught(tree: Path) -> None:
    _edit(tree, render.PUBLIC_NFT, 'meta skuid "strongswan"', 'meta skuid "nosuchuser"')
    [problem] = _problems(tree)
    assert "User does not exist" in problem


def test_a_weak_suite_edited_into_swanctl_conf_is_caught(tree: Path) -> None:
    """charon would accept it: the policy is checked on the file too."""
    _edit(
        tree,
        render.SWANCTL_CONF,
        "proposals = aes256gcm16-prfsha256-ecp256bp",
        "proposals = aes128-sha1-modp1024",
    )
    assert _problems(tree) == [
        f"{render.SWANCTL_CONF}:6: proposals: 'aes128-sha1-modp1024' is not an allowed suite"
    ]


def test_ikev1_edited_into_swanctl_conf_is_caught(tree: Path) -> None:
    _edit(tree, render.SWANCTL_CONF, "version = 2", "version = 1")
    problems = _problems(tree)
    assert f"{render.SWANCTL_CONF}:5: version = 1: only IKEv2 is allowed" in problems


def test_a_value_charon_refuses_is_caught(tree: Path) -> None:
    _edit(tree, render.SWANCTL_CONF, "childless = force", "childless = sometimes")
    [problem] = _problems(tree)
    assert problem.startswith(f"{render.SWANCTL_CONF}: swanctl --load-conns into charon: ")
    assert "invalid value for: childless" in problem


def test_a_syntax_error_is_caught_although_swanctl_exits_0(tree: Path) -> None:
    _edit(tree, render.SWANCTL_CONF, "mobike = yes", "mobike yes")
    [problem] = _problems(tree)
    assert "syntax error" in problem, problem


def test_a_script_syntax_error_is_caught(tree: Path) -> None:
    _edit(tree, render.TUNNEL_UP, "set -eu", "if then")
    [problem] = _problems(tree)
    assert problem.startswith(f"{render.TUNNEL_UP}: sh -n: ")


def test_a_directory_that_is_not_rendered_output_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match=r"MANIFEST: no such file \(is .* the output of"):
        check.check(tmp_path)


def test_a_manifest_path_escaping_the_directory_is_refused(tree: Path) -> None:
    (tree / render.MANIFEST).write_text(f"{'0' * 64}  ../../etc/passwd\n")
    with pytest.raises(LocalError, match=r"MANIFEST:1: not '<sha256>  <relative path>'"):
        check.check(tree)


@pytest.mark.parametrize("daemon", ["/usr/lib/ipsec/charon", "/usr/sbin/charon-systemd"])
def test_check_loads_into_either_daemon(
    pristine: Path, daemon: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """strongswan-charon's charon, or charon-systemd (all a device with the gateway has)."""
    monkeypatch.setattr(check, "CHARONS", (Path(daemon),))
    report = check.check(pristine)
    assert f"{render.SWANCTL_CONF}: loaded into charon (1 connection)" in report.checked


def _charons_running() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() in (
                "charon",
                "charon-systemd",
            ):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def test_check_leaves_no_charon_running(pristine: Path) -> None:
    """The throwaway charon is stopped and reaped, not orphaned in its namespaces."""
    before = _charons_running()
    check.check(pristine)
    assert _charons_running() - before == set()


def test_no_charon_at_all_is_one_line(pristine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "CHARONS", (Path("/nonexistent/charon"),))
    with pytest.raises(LocalError, match=r"no charon here \(/nonexistent/charon\): install"):
        check.check(pristine)
