"""rampart gateway render: deterministic output, strict content, and every file
accepted by the real tools (nft -c, a scratch-namespace load, a running charon,
systemd-analyze)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rampart import cli
from rampart.gateway import check, description, render
from tests.conftest import assert_offline_exposure_within_goal
from tests.gateway import pki

SECOND_PEER = """
[[peer]]
name = "gw-c"
address = "gw-c.example.org"
id = "gw-c.example.org"
local_subnets = ["10.1.0.0/24", "fd00:1::/64"]
remote_subnets = ["10.3.0.0/24", "fd00:3::/64"]
if_id = 7

[[tunnel.allow]]
direction = "in"
protocol = "udp"
port = [6000, 6010]
peer = "gw-c"
"""
PSK_PEER = """
[[peer]]
name = "gw-d"
address = "192.0.2.4"
id = "gw-d.example.org"
local_subnets = ["10.1.0.0/24"]
remote_subnets = ["10.4.0.0/24"]
auth = "psk"
psk_file = "/etc/rampart/gateway/gw-d.psk"

[ike]
allow_psk = true
proposals = ["aes256ctr-sha256-prfsha256-ecp256", "aes256gcm16-prfsha256-ecp256bp"]
esp_proposals = ["aes256ctr-sha256-ecp256-esn"]
"""
LAN = """
[log]
level = 2
drops = false
"""
VARIANTS = {
    "one-peer": pki.gateway_toml(),
    "two-peers-ipv6": pki.gateway_toml() + SECOND_PEER,
    "psk-ctr": pki.gateway_toml() + PSK_PEER,
    "lan-forwarding": pki.gateway_toml().replace(
        'address = "10.1.0.1"\n', 'address = "10.1.0.1"\nlan_interface = "lan0"\n'
    )
    + LAN,
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pki.make_pki(tmp_path_factory.mktemp("pki"), ("gw-a", "gw-b", "gw-c"))


def _gateway(keys: Path, variant: str) -> description.Gateway:
    path = keys / f"{variant}.toml"
    path.write_text(VARIANTS[variant])
    return description.load(path)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(
    request: pytest.FixtureRequest, keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[description.Gateway, Path]:
    gw = _gateway(keys, request.param)
    out = tmp_path_factory.mktemp(request.param)
    render.write(gw, out)
    return gw, out


def _tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_rendering_is_deterministic(keys: Path, tmp_path: Path) -> None:
    for variant in VARIANTS:
        first = tmp_path / f"{variant}-1"
        second = tmp_path / f"{variant}-2"
        render.write(_gateway(keys, variant), first)
        # A second load of the same text, into another directory.
        render.write(_gateway(keys, variant), second)
        assert _tree(first) == _tree(second), variant
        # Rendering again over the same directory changes nothing.
        render.write(_gateway(keys, variant), first)
        assert _tree(first) == _tree(second), variant


def test_manifest_lists_every_file_with_its_sha256(
    rendered: tuple[description.Gateway, Path],
) -> None:
    _, out = rendered
    manifest = check.read_manifest(out)
    files = {rel for rel in _tree(out) if rel != render.MANIFEST}
    assert set(manifest) == files
    for rel, digest in manifest.items():
        assert (
            subprocess.run(
                ["sha256sum", str(out / rel)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
            == digest
        )


def test_every_ruleset_passes_nft_check(rendered: tuple[description.Gateway, Path]) -> None:
    _, out = rendered
    rulesets = sorted(out.rglob("*.nft"))
    assert [p.name for p in rulesets] == ["public.nft", "tunnel.nft"]
    for path in rulesets:
        done = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_rulesets_drop_by_default_and_open_ike_only_to_strongswan(
    rendered: tuple[description.Gateway, Path],
) -> None:
    gw, out = rendered
    for name in ("public.nft", "tunnel.nft"):
        text = (out / "etc/rampart/gateway" / name).read_text()
        hooks = re.findall(r"type filter hook (\w+) priority filter; policy (\w+);", text)
        assert sorted(hooks) == [("forward", "drop"), ("input", "drop"), ("output", "drop")]
    public = (out / render.PUBLIC_NFT).read_text()
    ike = [line.strip() for line in public.splitlines() if "{ 500, 4500 }" in line]
    iface = f'"{gw.public_interface}"'
    if any(not p.address[0].isdigit() for p in gw.peers):  # a peer by host name: any address
        assert ike == [
            f"iifname {iface} udp dport {{ 500, 4500 }} accept",
            f'oifname {iface} meta skuid "{gw.user}" udp sport {{ 500, 4500 }} '
            "udp dport { 500, 4500 } accept",
        ]
    else:  # every peer by address: IKE pinned to them, both ways
        peers = sorted(f"{p.address}/32" for p in gw.peers)
        match = peers[0] if len(peers) == 1 else "{ " + ", ".join(peers) + " }"
        assert ike == [
            f"iifname {iface} ip saddr {match} udp dport {{ 500, 4500 }} accept",
            f'oifname {iface} ip daddr {match} meta skuid "{gw.user}" '
            "udp sport { 500, 4500 } udp dport { 500, 4500 } accept",
        ]
    # Nothing else in the public ruleset mentions the IKE ports.
    assert public.count("4500") == 3  # the comment line, the input rule, the output rule
    # In the tunnel namespace, every accept of new traffic names an XFRM interface.
    tunnel = (out / render.TUNNEL_NFT).read_text()
    interfaces = {f'"{peer.interface}"' for peer in gw.peers}
    for line in tunnel.splitlines():
        rule = line.strip()
        if rule.endswith("accept") or " accept comment " in rule:
            if rule.startswith(("ct state established", 'iif "lo"', 'oif "lo"')):
                continue
            assert any(f"ifname {i}" in rule for i in interfaces), rule


def test_swanctl_conf_is_strict(rendered: tuple[description.Gateway, Path]) -> None:
    gw, out = rendered
    text = (out / render.SWANCTL_CONF).read_text()
    assert text.count("version = 2") == len(gw.peers)
    for key in ("encap = yes", "mobike = yes", "childless = force"):
        assert text.count(key) == len(gw.peers), key
    assert text.count("start_action = trap") == len(gw.peers)
    assert text.count("dpd_action = trap") == len(gw.peers)
    for peer in gw.peers:
        assert text.count(f"if_id_in = {peer.if_id}") == 2
        assert text.count(f"if_id_out = {peer.if_id}") == 2
    for value in re.findall(r"^\s*proposals = (.*)$", text, re.MULTILINE):
        assert set(value.split(",")) <= set(description.IKE_PROPOSALS)
    for value in re.findall(r"^\s*esp_proposals = (.*)$", text, re.MULTILINE):
        assert set(value.split(",")) <= set(description.ESP_PROPOSALS)
        assert all(p.endswith("-esn") for p in value.split(","))
    # The private key is neither named nor copied; the PSK is included from its file.
    assert "private" not in text and ".key" not in text
    assert not any("private" in rel or rel.endswith(".key") for rel in _tree(out))
    for peer in gw.peers:
        if peer.psk_file is not None:
            assert f'include "{peer.psk_file}"' in text
            assert "secret =" not in text


def test_swanctl_conf_loads_into_a_running_charon(
    rendered: tuple[description.Gateway, Path],
) -> None:
    gw, out = rendered
    report = check.check(out)
    assert report.problems == []
    count = len(gw.peers)
    assert (
        f"{render.SWANCTL_CONF}: loaded into charon ({count} connection{'s' if count > 1 else ''})"
        in report.checked
    )
    assert (
        f"{render.PUBLIC_NFT}: nft -c, and loaded into a scratch network namespace"
        in report.checked
    )


def test_units_pass_systemd_analyze_verify(
    rendered: tuple[description.Gateway, Path], tmp_path: Path
) -> None:
    _, out = rendered
    service = (out / render.SERVICE).read_text()
    true = shutil.which("true") or "/bin/true"
    unit = tmp_path / "rampart-gateway.service"
    unit.write_text(
        service.replace("/etc/rampart/gateway/tunnel-up", true).replace(
            "/etc/rampart/gateway/tunnel-down", true
        )
    )
    # The drop-in, on a stand-in for Debian's strongswan.service (charon-systemd).
    base = tmp_path / "strongswan.service"
    base.write_text(
        f"[Unit]\nDescription=strongSwan\n[Service]\nType=notify\nExecStart={true}\n"
        f"ExecStartPost={true}\n[Install]\nWantedBy=multi-user.target\n"
    )
    dropins = tmp_path / "strongswan.service.d"
    dropins.mkdir()
    (dropins / "50-rampart.conf").write_text(
        (out / render.DROPIN).read_text().replace("/usr/sbin/swanctl", true)
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit), str(base)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [
        line
        for line in done.stderr.splitlines()
        if ("rampart" in line or "strongswan" in line) and "BPF" not in line
    ]
    assert done.returncode == 0 and not problems, done.stderr


@pytest.mark.parametrize("unit", ["rampart-gateway.service", "strongswan.service"])
def test_the_units_score_within_their_exposure_goals(
    rendered: tuple[description.Gateway, Path], tmp_path: Path, unit: str
) -> None:
    """systemd-analyze's offline score of the rendered unit, and of Debian's
    strongswan.service (charon-systemd, installed by `make setup`) with the rendered
    drop-in, against their goals in exposure.toml. test_gateway.py runs both, so
    confined, in a guest."""
    _, out = rendered
    root = tmp_path / "root"
    shutil.copytree(out, root)
    debian = root / "lib/systemd/system"
    debian.mkdir(parents=True)
    shutil.copy("/lib/systemd/system/strongswan.service", debian)
    assert_offline_exposure_within_goal(unit, root)


def test_tunnel_scripts_create_the_namespace_and_xfrm_interfaces(
    rendered: tuple[description.Gateway, Path],
) -> None:
    gw, out = rendered
    up = (out / render.TUNNEL_UP).read_text()
    for peer in gw.peers:
        assert (
            f"ip link add {peer.interface} type xfrm dev {gw.public_interface} "
            f"if_id {peer.if_id:#x}" in up
        )
        assert f'ip link set {peer.interface} netns "$ns"' in up
    # The ruleset is loaded before any interface is up.
    assert up.index("nft -f") < up.index("link set lo up")
    assert f"ns={gw.namespace}" in up


def test_cli_render_json_and_check(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = keys / "cli.toml"
    path.write_text(VARIANTS["one-peer"])
    out = tmp_path / "out"
    assert cli.main(["gateway", "render", str(path), "--out", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "gw-a" and shown["peers"] == ["gw-b"]
    assert render.SWANCTL_CONF in shown["files"]
    assert cli.main(["gateway", "check", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["problems"] == []


def test_cli_bad_description_is_one_line_exit_6(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = keys / "weak.toml"
    path.write_text(VARIANTS["one-peer"] + '\n[ike]\nproposals = ["3des-md5-modp1024"]\n')
    out = tmp_path / "out"
    assert cli.main(["gateway", "render", str(path), "--out", str(out)]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ike.proposals: '3des-md5-modp1024' is not one of the allowed suites" in err
    assert not out.exists()
