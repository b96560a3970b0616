"""`rampart remote show|set` (rampart.device.remote): what the admin role changes
through sudo. Every refusal leaves both files as they were."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest

from rampart.device import remote
from rampart.errors import FormatError, UsageError
from rampart.testbed import services
from tests.conftest import run_cli

URL = "https://updates.rampart.test:47443"


def _cert(directory: Path, name: str, *, ca: bool = True) -> bytes:
    """A CA's certificate (make_ca) or, with ca=False, a server's that it signed."""
    authority = services.make_ca(directory / name, "ca", common_name=name)
    if ca:
        return authority.cert.read_bytes()
    leaf = services.make_cert(directory / name, "leaf", authority, ["leaf.test"])
    return leaf.cert.read_bytes()


@pytest.fixture
def remote_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "remote"
    directory.mkdir()
    (directory / "remote.toml").write_text(
        f'update_url = "{URL}/update/v1"\ndist_url = "{URL}/dist"\n'
    )
    (directory / "rootca.pem").write_bytes(_cert(tmp_path, "Old CA"))
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_set_changes_the_url_and_show_reads_it_as_the_update_does(remote_dir: Path) -> None:
    new = "https://mirror.rampart.test/update/v1"
    result = remote.set_remote(remote_dir, {"update_url": new})
    assert result["changed"] == ["update_url"]
    assert result["before"]["update_url"] == f"{URL}/update/v1"
    shown = remote.show(remote_dir)
    assert shown["update_url"] == new and shown["dist_url"] == f"{URL}/dist"
    assert shown["root_ca"][0]["subject"] == "CN=Old CA"
    assert (remote_dir / "remote.toml").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in remote_dir.iterdir()) == ["remote.toml", "rootca.pem"]


def test_a_new_root_ca_replaces_the_pinned_one(remote_dir: Path) -> None:
    result = remote.set_remote(remote_dir, {}, _cert(remote_dir.parent, "New CA"))
    assert result["changed"] == ["root_ca"]
    assert remote.show(remote_dir)["root_ca"][0]["subject"] == "CN=New CA"


@pytest.mark.parametrize(
    ("changes", "root_ca", "error", "message"),
    [
        ({"update_url": "http://plain.test/update/v1"}, None, FormatError, "https"),
        ({"update_url": "https://user:pw@x.test/u"}, None, FormatError, "credentials"),
        ({"channel": "../etc"}, None, FormatError, "channel"),
        ({"pubkey": "x"}, None, UsageError, "cannot set 'pubkey'"),
        ({}, None, UsageError, "nothing to change"),
        ({}, b"not a certificate", FormatError, "not PEM"),
        ({"channel": "beta"}, "leaf", FormatError, "not a CA"),
    ],
)
def test_a_refused_change_leaves_both_files_as_they_were(
    remote_dir: Path,
    changes: dict[str, str],
    root_ca: bytes | str | None,
    error: type[Exception],
    message: str,
) -> None:
    if root_ca == "leaf":  # a server's certificate, not a CA's
        root_ca = _cert(remote_dir.parent, "Leaf", ca=False)
    assert not isinstance(root_ca, str)
    before = _snapshot(remote_dir)
    with pytest.raises(error, match=message):
        remote.set_remote(remote_dir, changes, root_ca)
    assert _snapshot(remote_dir) == before


def test_the_commands_take_the_ca_on_stdin_and_print_json(
    remote_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(_cert(tmp_path, "File CA"))
    done = run_cli("remote", "set", "-r", remote_dir, "--channel", "beta", "--root-ca", pem)
    assert done.code == 0 and "channel, root_ca" in done.out, done
    done = run_cli("remote", "show", "-r", remote_dir, "--json")
    doc = json.loads(done.out)
    assert doc["channel"] == "beta" and doc["root_ca"][0]["subject"] == "CN=File CA"
    stdin = io.TextIOWrapper(io.BytesIO(_cert(tmp_path, "Stdin CA")))
    monkeypatch.setattr(sys, "stdin", stdin)
    done = run_cli("remote", "set", "-r", remote_dir, "--root-ca", "-", "--json")
    assert done.code == 0 and json.loads(done.out)["changed"] == ["root_ca"], done
    assert remote.show(remote_dir)["root_ca"][0]["subject"] == "CN=Stdin CA"
    done = run_cli("remote", "set", "-r", remote_dir, "--dist-url", "ftp://x.test/dist")
    assert done.code == 10 and "dist_url" in done.err, done


def test_a_ca_bundle_loads_with_debian_12s_cryptography_38(
    remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault scenario 3 found: `remote show` called load_pem_x509_certificates,
    which cryptography 39 added; the Core has Debian 12's python3-cryptography 38, so
    the audit role's `sudo rampart remote show` failed with an AttributeError."""
    from cryptography import x509

    monkeypatch.delattr(x509, "load_pem_x509_certificates", raising=False)
    bundle = _cert(remote_dir.parent, "First CA") + b"\n" + _cert(remote_dir.parent, "Second CA")
    subjects = [c.subject.rfc4514_string() for c in remote.check_root_ca(bundle, "bundle")]
    assert subjects == ["CN=First CA", "CN=Second CA"]
    (remote_dir / "rootca.pem").write_bytes(bundle)
    assert [c["subject"] for c in remote.show(remote_dir)["root_ca"]] == subjects
    with pytest.raises(FormatError, match="not PEM"):
        remote.check_root_ca(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "x")


def test_the_end_of_validity_reads_with_debian_12s_cryptography_38() -> None:
    """The second fault scenario 3 found: `remote show` read not_valid_after_utc, which
    cryptography 42 added (Debian 12 has 38: naive not_valid_after, in UTC)."""
    old_style = types.SimpleNamespace(not_valid_after=datetime(2030, 1, 2, 3, 4, 5))
    assert remote.not_after(old_style).isoformat() == "2030-01-02T03:04:05+00:00"  # type: ignore[arg-type]


# Attributes of cryptography's API newer than Debian 12's python3-cryptography 38,
# which the Core runs: the device's code and the contracts it imports must not read
# them as attributes (remote.not_after asks getattr for the new name, by string).
NEWER_THAN_38 = (
    "load_pem_x509_certificates",  # 39
    "load_der_x509_certificates",
    "not_valid_after_utc",  # 42
    "not_valid_before_utc",
    "revocation_date_utc",
    "verification",  # 43: cryptography.x509.verification
)


def test_device_code_uses_no_cryptography_api_newer_than_debian_12s() -> None:
    src = Path(remote.__file__).resolve().parents[1]
    pattern = re.compile(rf"\.({'|'.join(NEWER_THAN_38)})\b")
    found = [
        f"{path}:{number}: {line.strip()}"
        for package in ("device", "contracts")
        for path in sorted((src / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
