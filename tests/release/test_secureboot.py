"""Secure Boot keys (never overwritten, secrets 0600), the OVMF variable store that
enrolls them, and the ESP tree with a signed systemd-boot."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rampart.contracts import cmdline
from rampart.errors import ConflictError, LocalError, UsageError, VerificationError
from rampart.release import secureboot, uki
from tests.release import bootkit

VIRT_FW_VARS = str(Path(sys.executable).parent / "virt-fw-vars")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture(scope="module")
def signed_uki(tmp_path_factory: pytest.TempPathFactory, keys: secureboot.KeySet) -> Path:
    work = tmp_path_factory.mktemp("uki")
    out = work / "clipos-1.0.0.efi"
    uki.build(
        out,
        kernel=bootkit.kernel(),
        initrd=bootkit.tiny_initrd(work / "initrd"),
        os_name="clipos",
        version="1.0.0",
        cmdline=cmdline.kernel_cmdline("mainvg", "1.0.0", roothash="ab" * 32, hash_offset=0,
                                   data_blocks=1),
        sign_key=keys.key("db"),
        sign_cert=keys.cert("db"),
    )  # fmt: skip
    return out


# --- keys ------------------------------------------------------------------------------


def test_keys_are_rsa2048_self_signed_with_secrets_0600(keys: secureboot.KeySet) -> None:
    names = sorted(p.name for p in keys.directory.iterdir())
    assert names == sorted(
        ["PK.key", "PK.crt", "KEK.key", "KEK.crt", "db.key", "db.crt", "owner.guid"]
    )
    uuid.UUID(keys.owner_file.read_text().strip())
    for name in secureboot.KEY_NAMES:
        assert stat.S_IMODE(keys.key(name).stat().st_mode) == 0o600
        assert stat.S_IMODE(keys.cert(name).stat().st_mode) == 0o644
        secret = serialization.load_pem_private_key(keys.key(name).read_bytes(), None)
        assert isinstance(secret, rsa.RSAPrivateKey)
        assert secret.key_size == 2048
        cert = x509.load_pem_x509_certificate(keys.cert(name).read_bytes())
        assert cert.subject == cert.issuer
        assert cert.subject.rfc4514_string() == f"O=Rampart,CN=Rampart {name}"
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.public_numbers() == secret.public_key().public_numbers()
        cert.verify_directly_issued_by(cert)
    serials = {
        x509.load_pem_x509_certificate(keys.cert(n).read_bytes()).serial_number
        for n in secureboot.KEY_NAMES
    }
    assert len(serials) == 3


def test_keys_are_never_overwritten(keys: secureboot.KeySet) -> None:
    before = {p.name: p.read_bytes() for p in keys.directory.iterdir()}
    with pytest.raises(ConflictError, match="refusing to overwrite"):
        secureboot.generate_keys(keys.directory)
    assert {p.name: p.read_bytes() for p in keys.directory.iterdir()} == before


@pytest.mark.parametrize("existing", ["db.crt", "PK.key", "owner.guid"])
def test_one_existing_file_stops_before_anything_is_written(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"mine")
    with pytest.raises(ConflictError, match=existing):
        secureboot.generate_keys(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"mine"


def test_a_dangling_symlink_counts_as_existing(tmp_path: Path) -> None:
    (tmp_path / "db.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConflictError):
        secureboot.generate_keys(tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_keys_directory_is_created_private(tmp_path: Path) -> None:
    keys = secureboot.generate_keys(tmp_path / "new" / "keys", "ACME Fleet")
    assert stat.S_IMODE(keys.directory.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(keys.cert("db").read_bytes())
    assert cert.subject.rfc4514_string() == "O=ACME Fleet,CN=ACME Fleet db"


def test_keys_cli(tmp_path: Path) -> None:
    code, stdout, stderr = bootkit.image_cli(
        "keys", "secureboot", "--out", tmp_path / "k", "--json"
    )
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["owner_guid"] == (tmp_path / "k" / "owner.guid").read_text().strip()
    assert len(doc["files"]) == 7
    code, _, stderr = bootkit.image_cli("keys", "secureboot", "--out", tmp_path / "k")
    assert code == 4
    assert "refusing to overwrite" in stderr


# --- OVMF variables --------------------------------------------------------------------


def _vars_json(path: Path, work: Path) -> dict[str, object]:
    out = work / "vars.json"
    subprocess.run(
        [VIRT_FW_VARS, "-i", str(path), "--output-json", str(out)], check=True, capture_output=True
    )
    doc: dict[str, object] = json.loads(out.read_text())
    return doc


def test_ovmf_vars_enroll_our_keys_and_turn_secure_boot_on(
    tmp_path: Path, keys: secureboot.KeySet
) -> None:
    out = tmp_path / "VARS.fd"
    secureboot.ovmf_vars(keys.directory, out)
    assert out.stat().st_size == secureboot.OVMF_VARS_TEMPLATE.stat().st_size
    printed = subprocess.run(
        [VIRT_FW_VARS, "-i", str(out), "--print"], check=True, capture_output=True, text=True
    ).stdout
    assert "SecureBootEnable" in printed and "ON" in printed
    doc = _vars_json(out, tmp_path)
    by_name = {v["name"]: v for v in doc["variables"]}  # type: ignore[attr-defined]
    assert by_name["SecureBootEnable"]["data"] == "01"
    assert by_name["CustomMode"]["data"] == "00"
    guid = str(keys.owner_guid())
    for name in secureboot.KEY_NAMES:
        der = x509.load_pem_x509_certificate(keys.cert(name).read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        # Exactly our certificate: no Microsoft or distribution key.
        assert secureboot.enrolled_certificates(doc, name) == [(guid, der)]
        assert der.hex() in by_name[name]["data"]


def test_ovmf_vars_never_overwrites_and_leaves_nothing_on_failure(
    tmp_path: Path, keys: secureboot.KeySet
) -> None:
    out = tmp_path / "VARS.fd"
    out.write_bytes(b"existing")
    with pytest.raises(ConflictError):
        secureboot.ovmf_vars(keys.directory, out)
    assert out.read_bytes() == b"existing"
    bad_template = tmp_path / "template.fd"
    bad_template.write_bytes(b"\0" * 4096)
    target = tmp_path / "sub"
    target.mkdir()
    with pytest.raises(LocalError, match="virt-fw-vars failed"):
        secureboot.ovmf_vars(keys.directory, target / "VARS.fd", bad_template)
    assert list(target.iterdir()) == []


def test_ovmf_vars_needs_the_certificates(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="rampart keys secureboot"):
        secureboot.ovmf_vars(tmp_path, tmp_path / "VARS.fd")
    assert list(tmp_path.iterdir()) == []


def test_ovmf_vars_cli(tmp_path: Path, keys: secureboot.KeySet) -> None:
    out = tmp_path / "VARS.fd"
    code, stdout, stderr = bootkit.image_cli(
        "keys", "ovmf-vars", "--keys", keys.directory, "--out", out, "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["secure_boot"] is True
    assert secureboot.secure_boot_enabled(_vars_json(out, tmp_path))


# --- the ESP --------------------------------------------------------------------------


def test_esp_layout_with_signed_systemd_boot(
    tmp_path: Path, keys: secureboot.KeySet, signed_uki: Path
) -> None:
    esp = secureboot.build_esp(tmp_path / "esp", keys.directory, [signed_uki])
    files = sorted(str(p.relative_to(esp)) for p in esp.rglob("*") if p.is_file())
    assert files == [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/Linux/clipos-1.0.0.efi",
        "loader/loader.conf",
    ]
    conf = (esp / "loader" / "loader.conf").read_text().splitlines()
    assert sorted(conf) == ["auto-firmware no", "editor no", "timeout 3"]
    loader = esp / "EFI" / "BOOT" / "BOOTX64.EFI"
    ok = bootkit.sbverify(loader, keys.cert("db"))
    assert ok.returncode == 0 and "Signature verification OK" in ok.stdout
    assert bootkit.sbverify(loader, keys.cert("KEK")).returncode != 0
    assert b"systemd-boot" in loader.read_bytes()
    assert ".sdmagic" in bootkit.pe_sections(loader)
    assert (esp / "EFI" / "Linux" / signed_uki.name).read_bytes() == signed_uki.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esp"]


def test_esp_menu_timeout_is_chosen_and_a_negative_one_is_refused(
    tmp_path: Path, keys: secureboot.KeySet
) -> None:
    esp = secureboot.build_esp(tmp_path / "esp", keys.directory, menu_timeout=0)
    assert "timeout 0" in (esp / "loader" / "loader.conf").read_text().splitlines()
    with pytest.raises(UsageError, match="menu timeout -1: must be 0 or more"):
        secureboot.build_esp(tmp_path / "bad", keys.directory, menu_timeout=-1)
    assert not (tmp_path / "bad").exists()


def test_esp_refuses_an_unsigned_uki_unless_allowed(
    tmp_path: Path, keys: secureboot.KeySet, signed_uki: Path
) -> None:
    unsigned = tmp_path / "clipos-2.0.0.efi"
    uki.build(
        unsigned,
        kernel=bootkit.kernel(),
        initrd=bootkit.tiny_initrd(tmp_path / "initrd"),
        os_name="clipos",
        version="2.0.0",
        cmdline="console=ttyS0",
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VerificationError):
        secureboot.build_esp(out / "esp", keys.directory, [signed_uki, unsigned])
    assert list(out.iterdir()) == []
    esp = secureboot.build_esp(
        out / "esp", keys.directory, [signed_uki, unsigned], require_signed=False
    )
    assert sorted(p.name for p in (esp / "EFI" / "Linux").iterdir()) == [
        "clipos-1.0.0.efi",
        "clipos-2.0.0.efi",
    ]


def test_esp_refuses_to_overwrite_and_bad_entry_names(
    tmp_path: Path, keys: secureboot.KeySet, signed_uki: Path
) -> None:
    (tmp_path / "esp").mkdir()
    with pytest.raises(ConflictError):
        secureboot.build_esp(tmp_path / "esp", keys.directory, [signed_uki])
    odd = tmp_path / "clip os.efi"
    odd.write_bytes(signed_uki.read_bytes())
    with pytest.raises(UsageError, match="boot entry name"):
        secureboot.build_esp(tmp_path / "esp2", keys.directory, [odd])
    assert not (tmp_path / "esp2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_esp_failure_while_signing_leaves_nothing(
    tmp_path: Path, keys: secureboot.KeySet, signed_uki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_sign(path: Path, key: Path, cert: Path) -> None:
        raise LocalError("sbsign failed with exit code 1: injected")

    monkeypatch.setattr(uki, "sign", broken_sign)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LocalError, match="injected"):
        secureboot.build_esp(out / "esp", keys.directory, [signed_uki])
    assert list(out.iterdir()) == []


def test_esp_cli(tmp_path: Path, keys: secureboot.KeySet, signed_uki: Path) -> None:
    out = tmp_path / "esp"
    code, stdout, stderr = bootkit.image_cli(
        "build", "esp", "--keys", keys.directory, "--out", out, signed_uki, "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["entries"] == ["EFI/Linux/clipos-1.0.0.efi"]
    assert (out / "EFI" / "BOOT" / "BOOTX64.EFI").is_file()


def test_image_verbs_are_on_the_rampart_command() -> None:
    from tests.conftest import run_cli

    for argv in (
        ("build", "core"),
        ("build", "efiboot"),
        ("build", "esp"),
        ("inspect", "efiboot"),
        ("keys", "secureboot"),
        ("keys", "ovmf-vars"),
        ("release",),
    ):
        result = run_cli(*argv, "--help")
        assert result.code == 0, argv


# --- signed appends to db and dbx ----------------------------------------------------------


def _der_of(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_db_append_is_what_efivarfs_takes_signed_by_the_kek(
    tmp_path: Path, keys: secureboot.KeySet
) -> None:
    from rampart.contracts import efivars

    new = secureboot.generate_keys(tmp_path / "new")
    out = tmp_path / "db.auth"
    write = secureboot.signed_append(keys.directory, "db", out, [new.cert("db")])
    parsed = efivars.parse_authenticated_write(out.read_bytes(), str(out))
    assert parsed == write
    assert write.attributes == 0x67  # NV, BS, RT, time-based authenticated, append
    entries = efivars.parse_signature_lists(write.payload, "payload")
    assert [(e.type, e.owner, e.data) for e in entries] == [
        (efivars.CERT_X509, keys.owner_guid(), _der_of(new.cert("db")))
    ]
    assert efivars.signer_certificates(write.pkcs7) == [_der_of(keys.cert("KEK"))]
    with pytest.raises(ConflictError):
        secureboot.signed_append(keys.directory, "db", out, [new.cert("db")])


def test_a_dbx_append_revokes_a_certificate_and_an_image_by_its_authenticode_hash(
    tmp_path: Path, keys: secureboot.KeySet
) -> None:
    from rampart.contracts import efivars, pe

    out = tmp_path / "dbx.auth"
    loader = secureboot.SYSTEMD_BOOT
    write = secureboot.signed_append(keys.directory, "dbx", out, [keys.cert("db")], [loader])
    entries = efivars.parse_signature_lists(write.payload, "payload")
    assert [(e.type, e.data) for e in entries] == [
        (efivars.CERT_X509, _der_of(keys.cert("db"))),
        (efivars.CERT_SHA256, pe.authenticode_sha256(loader.read_bytes())),
    ]


@pytest.mark.parametrize(
    ("variable", "images", "message"),
    [
        ("KEK", False, "only db and dbx"),
        ("db", True, "image hashes go into dbx"),
        ("dbx", None, "at least one certificate or image"),
    ],
)
def test_a_signed_append_refuses_what_it_does_not_make(
    tmp_path: Path, keys: secureboot.KeySet, variable: str, images: bool | None, message: str
) -> None:
    certs = [] if images is None else [keys.cert("db")]
    with pytest.raises(UsageError, match=message):
        secureboot.signed_append(
            keys.directory, variable, tmp_path / "x.auth", certs,
            [secureboot.SYSTEMD_BOOT] if images else [],
        )  # fmt: skip
    assert not (tmp_path / "x.auth").exists()
