"""Secure Boot keys, an OVMF variable store that enrolls them, and the ESP tree
(docs/build.md, "Secure Boot keys" and "The ESP").

The three keys of the UEFI hierarchy, each an RSA 2048 key and a self-signed
X.509 certificate made with `cryptography`:

    PK   platform key: authorises changes to KEK (and to itself)
    KEK  key-exchange key: authorises changes to db and dbx
    db   signature database: the key that signs systemd-boot and the UKIs

written into one directory as PK.key/PK.crt, KEK.key/KEK.crt, db.key/db.crt
and `owner.guid` (the EFI_SIGNATURE_DATA owner recorded with each enrolled
certificate). Secret keys are mode 0600; nothing is ever overwritten.

`ovmf_vars` enrolls the certificates (and no Microsoft key) into a copy of
Debian's empty OVMF_VARS_4M.fd with `virt-fw-vars ... --sb`, so the secboot
OVMF build boots only what db signed. `build_esp` lays out an ESP tree:
systemd-boot signed with db as the removable-media loader, loader.conf, and
the UKIs under EFI/Linux (Boot Loader Specification type #2).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from rampart import files, run
from rampart.contracts import efivars, pe
from rampart.contracts.layout import FALLBACK_LOADER_PATH
from rampart.errors import ConflictError, FormatError, LocalError, UsageError
from rampart.files import fsync_dir, write_new_file
from rampart.release import uki

KEY_NAMES = ("PK", "KEK", "db")
OWNER_GUID_FILE = "owner.guid"
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
RSA_BITS = 2048
VALIDITY_DAYS = 20 * 365  # firmware ignores validity; sbverify and tools do not

# systemd-boot's menu: no editing of the command line (it would bypass the
# signed one), a short timeout, no "reboot into firmware" entry.
MENU_TIMEOUT = 3


def loader_conf(timeout: int = MENU_TIMEOUT) -> str:
    """loader.conf: the menu shown for `timeout` seconds (0: hidden, a key held at
    boot shows it), no editor, no firmware entry."""
    if timeout < 0:
        raise UsageError(f"menu timeout {timeout}: must be 0 or more seconds")
    return f"timeout {timeout}\neditor no\nauto-firmware no\n"


_BLS_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-_.")


@dataclass(frozen=True)
class KeySet:
    """Where the Secure Boot keys of one directory are."""

    directory: Path

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    @property
    def owner_file(self) -> Path:
        return self.directory / OWNER_GUID_FILE

    def files(self) -> list[Path]:
        out = [self.owner_file]
        for name in KEY_NAMES:
            out += [self.key(name), self.cert(name)]
        return out

    def owner_guid(self) -> uuid.UUID:
        """The owner GUID recorded in the directory; LocalError or FormatError if unusable."""
        try:
            text = self.owner_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise LocalError(
                f"{self.owner_file}: not found; create the keys with `rampart keys secureboot`"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalError(f"{self.owner_file}: cannot read: {exc}") from None
        try:
            return uuid.UUID(text)
        except ValueError:
            raise FormatError(f"{self.owner_file}: not a GUID") from None

    def check(self, names: Sequence[str] = KEY_NAMES, secrets: bool = True) -> None:
        """LocalError naming the first missing file among the wanted ones."""
        for name in names:
            for path in (self.key(name), self.cert(name)) if secrets else (self.cert(name),):
                if not path.is_file():
                    raise LocalError(
                        f"{path}: not found; create the keys with `rampart keys secureboot`"
                    )


def _certificate(name: str, common_name: str, key: rsa.RSAPrivateKey) -> bytes:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {name}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, common_name),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        # What `openssl req -x509` makes, the form UEFI tooling expects: a
        # self-signed CA certificate with key identifiers.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_keys(out_dir: Path, common_name: str = "Rampart") -> KeySet:
    """Create PK, KEK and db (keys 0600, certificates 0644) and owner.guid in `out_dir`.

    Refuses (ConflictError) before writing anything if any of the files exists;
    on a failure part-way, removes what it wrote. LocalError if the directory
    cannot be made or written.
    """
    if not common_name or any(c in common_name for c in "\n\r\0"):
        raise UsageError(f"common name {common_name!r} is invalid")
    keys = KeySet(out_dir)
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"{out_dir}: cannot create the key directory: {exc.strerror}") from None
    existing = [p for p in keys.files() if p.exists() or p.is_symlink()]
    if existing:
        raise ConflictError(f"{existing[0]}: already exists; refusing to overwrite a key")
    written: list[Path] = []
    try:
        guid = str(uuid.uuid4())
        write_new_file(keys.owner_file, (guid + "\n").encode(), 0o644)
        written.append(keys.owner_file)
        for name in KEY_NAMES:
            key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
            secret = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_new_file(keys.key(name), secret, 0o600)
            written.append(keys.key(name))
            write_new_file(keys.cert(name), _certificate(name, common_name, key), 0o644)
            written.append(keys.cert(name))
        fsync_dir(out_dir)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return keys


def virt_fw_vars() -> list[str]:
    """argv prefix for virt-fw-vars: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "virt-fw-vars"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("virt-fw-vars")
    if found:
        return [found]
    raise LocalError(
        "virt-fw-vars: command not found (pip install 'rampart[build]', or run `make setup`)"
    )


def _der(cert_pem: Path) -> bytes:
    try:
        data = cert_pem.read_bytes()
    except OSError as exc:
        raise LocalError(f"{cert_pem}: cannot read: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FormatError(f"{cert_pem}: not a PEM X.509 certificate") from None
    return cert.public_bytes(serialization.Encoding.DER)


def enrolled_certificates(store_json: dict[str, object], name: str) -> list[tuple[str, bytes]]:
    """(owner GUID, DER certificate) of each X.509 entry of variable `name`.

    `store_json` is `virt-fw-vars --output-json`'s document; the variable's data
    is a list of EFI_SIGNATURE_LISTs (UEFI 2.10 §32.4.1, contracts/efivars.py).
    """
    variables = store_json.get("variables")
    if not isinstance(variables, list):
        raise FormatError("varstore JSON has no variables list")
    found: list[tuple[str, bytes]] = []
    for var in variables:
        if not isinstance(var, dict) or var.get("name") != name:
            continue
        data = bytes.fromhex(str(var.get("data", "")))
        for entry in efivars.parse_signature_lists(data, f"variable {name}"):
            if entry.type == efivars.CERT_X509:
                found.append((str(entry.owner), entry.data))
    return found


# The attributes of a signed append to db or dbx (sbvarsign --attr), the only kind of
# write Rampart makes: an append needs no timestamp newer than the variable's (edk2
# checks the order only for replacing writes), and never drops an entry.
APPEND_ATTRIBUTES = "NON_VOLATILE,BOOTSERVICE_ACCESS,RUNTIME_ACCESS,APPEND_WRITE"


def signed_append(
    keys_dir: Path,
    variable: str,
    out: Path,
    certificates: Sequence[Path] = (),
    images: Sequence[Path] = (),
) -> efivars.AuthenticatedWrite:
    """A time-based authenticated append to `variable` (db or dbx), signed with the
    KEK of `keys_dir`, written to `out` as efivarfs takes it (`sbvarsign
    --include-attrs`: the attributes, the signature, the new signature lists). Each
    of `certificates` (PEM) becomes an X.509 entry, each of `images` (EFI binaries,
    dbx only) a SHA-256 entry of its Authenticode hash, all owned by the key set's
    owner GUID (`sbsiglist`). Checked before it lands; never overwrites `out`."""
    if variable not in ("db", "dbx"):
        raise UsageError(f"{variable}: only db and dbx take signed appends here")
    if images and variable != "dbx":
        raise UsageError("image hashes go into dbx (revoking an image), not into db")
    if not certificates and not images:
        raise UsageError("give at least one certificate or image to append")
    keys = KeySet(keys_dir)
    keys.check(names=("KEK",))
    owner = str(keys.owner_guid())
    with tempfile.TemporaryDirectory(prefix="rampart-sbvar-") as work:
        lists = b""
        entries: list[tuple[str, bytes]] = [("x509", _der(c)) for c in certificates]
        for image in images:
            data = files.read_small(image, "EFI image", 1 << 30)
            entries.append(("sha256", pe.authenticode_sha256(data, str(image))))
        for number, (kind, data) in enumerate(entries):
            raw, esl = Path(work) / f"{number}.bin", Path(work) / f"{number}.esl"
            raw.write_bytes(data)
            run.run(["sbsiglist", "--owner", owner, "--type", kind, "--output", str(esl), str(raw)])
            lists += esl.read_bytes()
        payload, signed = Path(work) / "append.esl", Path(work) / "append.auth"
        payload.write_bytes(lists)
        run.run(
            ["sbvarsign", "--key", str(keys.key("KEK")), "--cert", str(keys.cert("KEK")),
             "--attr", APPEND_ATTRIBUTES, "--include-attrs", "--output", str(signed),
             variable, str(payload)],
            timeout=120,
        )  # fmt: skip
        data = signed.read_bytes()
    write = efivars.parse_authenticated_write(data, str(out))
    if write.payload != lists or not write.attributes & efivars.APPEND_WRITE:
        raise LocalError(f"{out}: sbvarsign made another write than asked for")
    write_new_file(out, data, 0o644)
    return write


def read_varstore(path: Path) -> dict[str, object]:
    """An OVMF variable store as `virt-fw-vars --output-json` describes it."""
    with tempfile.TemporaryDirectory(prefix="rampart-vars-") as work:
        out = Path(work) / "vars.json"
        run.run([*virt_fw_vars(), "-i", str(path), "--output-json", str(out)], timeout=120)
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: virt-fw-vars gave no readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: virt-fw-vars gave no JSON object")
    return doc


def secure_boot_enabled(store_json: dict[str, object]) -> bool:
    """Whether SecureBootEnable is set in a varstore JSON document."""
    variables = store_json.get("variables")
    for var in variables if isinstance(variables, list) else []:
        if isinstance(var, dict) and var.get("name") == "SecureBootEnable":
            return str(var.get("data", "")).lower() == "01"
    return False


def ovmf_vars(keys_dir: Path, out: Path, template: Path = OVMF_VARS_TEMPLATE) -> Path:
    """Write `out`: `template` with our PK, KEK and db enrolled and Secure Boot on.

    No Microsoft or distribution key is enrolled: the firmware trusts only what
    our db signed. The result is read back and checked before it is renamed
    into place. ConflictError if `out` exists; LocalError if a file is missing
    or virt-fw-vars fails.
    """
    keys = KeySet(keys_dir)
    keys.check(secrets=False)
    guid = str(keys.owner_guid())
    if not template.is_file():
        raise LocalError(f"{template}: OVMF variable template not found (install ovmf)")
    if out.exists() or out.is_symlink():
        raise ConflictError(f"{out}: already exists; refusing to overwrite")
    if not out.parent.is_dir():
        raise LocalError(f"{out.parent}: output directory not found")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        run.run(
            [
                *virt_fw_vars(),
                "--input",
                str(template),
                "--output",
                str(tmp),
                "--set-pk",
                guid,
                str(keys.cert("PK")),
                "--add-kek",
                guid,
                str(keys.cert("KEK")),
                "--add-db",
                guid,
                str(keys.cert("db")),
                "--sb",
            ],
            timeout=120,
        )
        store = read_varstore(tmp)
        if not secure_boot_enabled(store):
            raise LocalError(f"{out}: virt-fw-vars did not turn Secure Boot on")
        for name in KEY_NAMES:
            wanted = (guid, _der(keys.cert(name)))
            if wanted not in enrolled_certificates(store, name):
                raise LocalError(f"{out}: virt-fw-vars did not enroll {keys.cert(name)}")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        uki.publish_new(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_entry_name(name: str) -> str:
    """A UKI file name systemd-boot accepts: `[A-Za-z0-9+-_.]`, ending in .efi."""
    if (
        not name.endswith(".efi")
        or not 5 <= len(name) <= 255
        or not set(name) <= _BLS_NAME_CHARS
        or name.startswith(".")
    ):
        raise UsageError(
            f"boot entry name {name!r}: use letters, digits, '+-_.' and end in .efi "
            "(Boot Loader Specification)"
        )
    return name


def _check_ukis(ukis: Sequence[Path], keys: KeySet, require_signed: bool) -> None:
    """Each UKI has a unique entry name and a version (and verifies with db, if asked)."""
    names: set[str] = set()
    for path in ukis:
        name = check_entry_name(path.name)
        if name in names:
            raise UsageError(f"two UKIs are named {name}")
        names.add(name)
        info = uki.inspect(path)
        if require_signed:
            uki.verify_signature(path, keys.cert("db"))
        if info.version is None:
            raise FormatError(f"{path}: .osrel has no version; systemd-boot would skip it")


def build_esp(
    out_dir: Path,
    keys_dir: Path,
    ukis: Sequence[Path] = (),
    *,
    systemd_boot: Path = SYSTEMD_BOOT,
    require_signed: bool = True,
    menu_timeout: int = MENU_TIMEOUT,
) -> Path:
    """Lay out an ESP tree in `out_dir` (which must not exist):

        EFI/BOOT/BOOTX64.EFI   systemd-boot, signed with db
        loader/loader.conf     editor no, timeout `menu_timeout`, auto-firmware no
        EFI/Linux/<name>.efi   each UKI, copied

    With `require_signed`, each UKI must verify with db.crt (VerificationError
    otherwise). Built in a temporary sibling directory renamed last: a failure
    leaves nothing. ConflictError if `out_dir` exists.
    """
    conf = loader_conf(menu_timeout)
    keys = KeySet(keys_dir)
    keys.check(names=("db",))
    if out_dir.exists() or out_dir.is_symlink():
        raise ConflictError(f"{out_dir}: already exists; refusing to overwrite")
    if not out_dir.parent.is_dir():
        raise LocalError(f"{out_dir.parent}: parent directory not found")
    if not systemd_boot.is_file():
        raise LocalError(f"{systemd_boot}: systemd-boot not found (install systemd-boot-efi)")
    _check_ukis(ukis, keys, require_signed)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        (tmp / "EFI" / "BOOT").mkdir(parents=True)
        (tmp / "EFI" / "Linux").mkdir()
        (tmp / "loader").mkdir()
        uki.sign_copy(systemd_boot, tmp / FALLBACK_LOADER_PATH, keys.key("db"), keys.cert("db"))
        (tmp / "loader" / "loader.conf").write_text(conf)
        for path in ukis:
            shutil.copyfile(path, tmp / "EFI" / "Linux" / path.name)
        for directory in (tmp / "EFI" / "BOOT", tmp / "EFI" / "Linux", tmp / "loader"):
            for entry in directory.iterdir():
                with entry.open("rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(directory)
        if out_dir.exists() or out_dir.is_symlink():
            raise ConflictError(f"{out_dir}: appeared while building; refusing to overwrite")
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    except OSError as exc:
        raise LocalError(f"{out_dir}: cannot build the ESP tree: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
