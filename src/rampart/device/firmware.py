"""What the firmware will start: an EFI image checked against db and dbx the way
UEFI Secure Boot checks it (docs/client.md "Secure Boot variable updates").

An image starts when dbx lists neither its Authenticode SHA-256 nor a certificate
of its signature, and its signature verifies with a certificate of db. The firmware
tries db's certificates in their order, and the first that verifies the image is
the entry its EV_EFI_VARIABLE_AUTHORITY event measures into PCR 7 (`pcr7`). The
signature check itself is `sbverify`'s (sbsigntool), one db certificate at a time:
nothing here verifies PKCS#7.

Both the databases in efivarfs (`read_database`) and the ones a staged update would
make (`efivars.appended`) are checked with `verify`, so that an update is refused
before it is written when it would stop an installed image from starting.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from rampart import run
from rampart.contracts import efivars, pe
from rampart.errors import FormatError, VerificationError


def read_database(efivars_dir: Path, name: str) -> list[efivars.Signature]:
    """The entries of db or dbx in efivarfs; a missing dbx is empty, a missing db a
    VerificationError (no Secure Boot keys: nothing would be checked)."""
    found = efivars.read_variable(efivars_dir, name, efivars.IMAGE_SECURITY_DATABASE)
    if found is None:
        if name == "db":
            raise VerificationError(
                f"{efivars_dir}: no db variable (not a UEFI machine with Secure Boot keys?)"
            )
        return []
    return efivars.parse_signature_lists(found[1], f"{efivars_dir}/{name}")


def verify(
    path: Path,
    data: bytes,
    db: Sequence[efivars.Signature],
    dbx: Sequence[efivars.Signature],
) -> efivars.Signature:
    """The db entry the firmware would start the EFI image `path` (its bytes `data`)
    with: the first X.509 entry of `db` its signature verifies with, once `dbx` lists
    neither its image hash nor a certificate of its signature. VerificationError
    saying why the firmware would refuse it."""
    certificates = [entry for entry in db if entry.type == efivars.CERT_X509]
    if not certificates:
        raise VerificationError(f"{path}: db holds no certificate; it would not start")
    image_hash = pe.authenticode_sha256(data, str(path))
    if any(s.type == efivars.CERT_SHA256 and s.data == image_hash for s in dbx):
        raise VerificationError(f"{path}: dbx revokes its image hash {image_hash.hex()}")
    signers = set(efivars.signer_certificates(pe.certificate_table(data, str(path)) or b""))
    for entry in dbx:
        if entry.type == efivars.CERT_X509 and entry.data in signers:
            raise VerificationError(
                f"{path}: dbx revokes the certificate of its signature ({subject(entry.data)})"
            )
    with tempfile.TemporaryDirectory(prefix="rampart-db-") as scratch:
        image = Path(scratch) / "image.efi"
        image.write_bytes(data)
        for number, entry in enumerate(certificates):
            pem = Path(scratch) / f"db-{number}.pem"
            pem.write_bytes(_pem(entry.data))
            done = run.run(["sbverify", "--cert", str(pem), str(image)], check=False, timeout=60)
            if done.returncode == 0:
                return entry
    raise VerificationError(
        f"{path}: its Secure Boot signature verifies with none of the {len(certificates)} "
        "certificates of db; the firmware would refuse it"
    )


def _pem(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
    except ValueError as exc:
        raise FormatError(f"db: a certificate does not parse ({exc})") from None


def subject(der: bytes) -> str:
    """A certificate's subject, for messages; `?` if it does not parse."""
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return "?"
