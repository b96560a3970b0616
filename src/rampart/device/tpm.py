"""The TPM 2.0 side of trusted boot: seal a secret to PCR values,
unseal it, and the monotonic NV counter that holds the lowest security epoch allowed
to boot. Through tpm2-tools, which the initramfs uses too; the same calls work on the
device (`device:/dev/tpmrm0`) and against swtpm on the host (`swtpm:host=H,port=P`).

Layout in the TPM (CLIP OS: the sealed object itself lives on the ESP):

    PRIMARY_HANDLE  0x81000001  an ECC P-256 storage primary key in the owner
                                hierarchy, persisted (created once, by `ensure_primary`)
    COUNTER_INDEX   0x01500016  an 8-byte NV counter (TPM_NT_COUNTER): owner read and
                                write, no dictionary-attack lockout; it only counts up
    IDENTITY_HANDLE 0x81000002  the device's identity: an ECC P-256 restricted signing
                                primary key (it signs only quotes), persisted (created
                                once, by `ensure_identity`; contracts/identity.py)

A sealed object is the pair `sealed.pub`/`sealed.priv` (tpm2_create's TPM2B files):
a keyed-hash object holding the secret, `fixedtpm|fixedparent|noda`, no user
authorisation, and the policy `PolicyPCR(sha256:<pcrs>)` computed from the PCR values
at sealing time. It is useless on another TPM (it is wrapped by that TPM's primary
key) and unsealable only while the PCRs hold the same values.

Secrets pass through pipes (stdin of tpm2_create, stdout of tpm2_unseal) and are never
written to disk or logged; session files go to a private temporary directory.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rampart import run
from rampart.contracts.layout import (
    COUNTER_INDEX,
    DEFAULT_PCRS,
    IDENTITY_HANDLE,
    PRIMARY_HANDLE,
    RECOVERY_KEYSLOT,
    SEALED_BRANCH,
    SEALED_DIR,
    SEALED_PCRS,
    SEALED_PRIV,
    SEALED_PUB,
    TPM_KEYSLOT,
)
from rampart.errors import LocalError, UsageError

__all__ = [
    "COUNTER_INDEX",
    "DEFAULT_PCRS",
    "PRIMARY_HANDLE",
    "RECOVERY_KEYSLOT",
    "SEALED_BRANCH",
    "SEALED_DIR",
    "SEALED_PCRS",
    "SEALED_PRIV",
    "SEALED_PUB",
    "TPM_KEYSLOT",
]

MAX_SECRET = 128  # a keyed-hash object holds at most 128 bytes
MAX_BRANCHES = 8  # TPM2_PolicyOR takes 2 to 8 branches
# tpm2_createprimary's default storage key attributes, plus noda (see ensure_primary).
PRIMARY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"
# The identity key: restricted signing (the TPM signs only what it made: quotes).
IDENTITY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
_TIMEOUT = 60.0
_HEX_VALUE = re.compile(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", re.M)


DEFAULT_TCTI = "device:/dev/tpmrm0"


class TpmPolicyError(LocalError):
    """The TPM refused to unseal: the PCRs differ from the sealing time."""


def pcr_selection(pcrs: Sequence[int]) -> str:
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs) or len(set(pcrs)) != len(pcrs):
        raise UsageError(f"PCR list {list(pcrs)}: give distinct PCR numbers from 0 to 23")
    return "sha256:" + ",".join(str(p) for p in sorted(pcrs))


EFIVARS = Path("/sys/firmware/efi/efivars")
EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def secure_boot_enabled(efivars: Path = EFIVARS) -> bool:
    """True if the firmware says Secure Boot is on (the SecureBoot variable is 1)."""
    path = efivars / f"SecureBoot-{EFI_GLOBAL_GUID}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the Secure Boot state: {exc.strerror}") from None
    return len(data) == 5 and data[4] == 1


def present(tcti: str) -> bool:
    """False only for a `device:` TCTI whose device node does not exist (no TPM)."""
    kind, _, where = tcti.partition(":")
    if kind != "device":
        return True
    return Path(where or "/dev/tpmrm0").exists()


def device_tpm(tcti: str = DEFAULT_TCTI, *, required: bool = False) -> Tpm | None:
    """The machine's TPM as configured ([tpm] tcti), or None when it has none and
    `required` is false; LocalError when it has none and `required` is true."""
    if present(tcti):
        return Tpm(tcti)
    if required:
        raise LocalError(f"{tcti.partition(':')[2]}: no TPM on this machine, and [tpm] required")
    return None


class Tpm:
    """One TPM, reached through the TCTI `tcti` (None: tpm2-tools' default, /dev/tpmrm0)."""

    def __init__(self, tcti: str | None = None) -> None:
        self.env = {} if tcti is None else {"TPM2TOOLS_TCTI": tcti}

    def _tool(self, *argv: str, input: bytes | None = None, check: bool = True) -> run.Completed:
        return run.run(argv, input=input, env=self.env, check=check, timeout=_TIMEOUT)

    def _flush_transient(self) -> None:
        self._tool("tpm2_flushcontext", "--transient-object")

    # --- PCRs -----------------------------------------------------------------------

    def pcr_values(self, pcrs: Sequence[int] = DEFAULT_PCRS) -> dict[int, bytes]:
        out = self._tool("tpm2_pcrread", pcr_selection(pcrs)).stdout.decode()
        values = {int(m[1]): bytes.fromhex(m[2]) for m in _HEX_VALUE.finditer(out)}
        if set(values) != set(pcrs):
            raise LocalError(f"tpm2_pcrread: unexpected output for PCRs {list(pcrs)}")
        return values

    # --- the primary key --------------------------------------------------------------

    def persistent_handles(self) -> set[int]:
        out = self._tool("tpm2_getcap", "handles-persistent").stdout.decode()
        return {int(h, 16) for h in re.findall(r"0x[0-9A-Fa-f]+", out)}

    def ensure_primary(self) -> None:
        """Create and persist the storage primary key unless it is there."""
        if PRIMARY_HANDLE in self.persistent_handles():
            return
        with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
            ctx = f"{tmp}/primary.ctx"
            # noda: using the key is never counted by dictionary-attack protection.
            # Without it each power cut after an unseal (an unorderly shutdown) raised
            # the lockout counter, and after maxTries of them (3 on swtpm) the TPM would
            # not load the sealed key: the recovery passphrase at every boot.
            self._tool(
                "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc",
                "-a", PRIMARY_ATTRIBUTES, "-c", ctx,
            )  # fmt: skip
            self._tool("tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, hex(PRIMARY_HANDLE))
        self._flush_transient()

    # --- the identity key (contracts/identity.py) ------------------------------------

    def ensure_identity(self) -> bytes:
        """Create and persist the identity key unless it is there; its public part
        (SubjectPublicKeyInfo, DER)."""
        if IDENTITY_HANDLE not in self.persistent_handles():
            with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
                ctx = f"{tmp}/identity.ctx"
                self._tool(
                    "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256",
                    "-G", "ecc256:ecdsa-sha256:null", "-a", IDENTITY_ATTRIBUTES, "-c", ctx,
                )  # fmt: skip
                self._tool("tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, hex(IDENTITY_HANDLE))
            self._flush_transient()
        spki = self.identity_key()
        if spki is None:
            raise LocalError(
                f"TPM: the identity key is not at {hex(IDENTITY_HANDLE)} after its creation"
            )
        return spki

    def identity_key(self) -> bytes | None:
        """The identity key's public part (DER), None if it was never created."""
        if IDENTITY_HANDLE not in self.persistent_handles():
            return None
        with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
            self._tool(
                "tpm2_readpublic", "-Q", "-c", hex(IDENTITY_HANDLE), "-f", "der",
                "-o", f"{tmp}/key.der",
            )  # fmt: skip
            return Path(f"{tmp}/key.der").read_bytes()

    def quote(self, qualifying: bytes, pcr: int = 7) -> tuple[bytes, bytes, bytes]:
        """A quote of PCR `pcr` (SHA-256 bank) by the identity key, for `qualifying`:
        (the TPMS_ATTEST, its signature (DER ECDSA), the PCR's value quoted)."""
        with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
            out = self._tool(
                "tpm2_quote", "-c", hex(IDENTITY_HANDLE), "-l", f"sha256:{pcr}",
                "-q", qualifying.hex(), "-g", "sha256", "-f", "plain",
                "-m", f"{tmp}/quote", "-s", f"{tmp}/signature", "-o", f"{tmp}/pcrs",
            ).stdout.decode()  # fmt: skip
            values = {int(m[1]): bytes.fromhex(m[2]) for m in _HEX_VALUE.finditer(out)}
            if set(values) != {pcr} or len(values[pcr]) != 32:
                raise LocalError(f"tpm2_quote: unexpected output for PCR {pcr}")
            quote = Path(f"{tmp}/quote").read_bytes()
            return quote, Path(f"{tmp}/signature").read_bytes(), values[pcr]

    # --- sealing ----------------------------------------------------------------------

    def seal(
        self,
        secret: bytes,
        pub: Path,
        priv: Path,
        pcrs: Sequence[int] = DEFAULT_PCRS,
        values: Sequence[bytes] = (),
    ) -> list[bytes]:
        """Seal `secret` so that it unseals while `pcrs` hold their current values (no
        `values`), or any one of `values` (each the SHA-256 digests of `pcrs`, in order,
        concatenated: what `tpm2_policypcr -f` reads): a PolicyOR of one PolicyPCR per
        value when there are 2 to 8 of them. Writes the object to pub/priv; returns the
        branches' policy digests, which `unseal` needs (none for a single branch)."""
        if not 1 <= len(secret) <= MAX_SECRET:
            raise UsageError(f"a sealed secret holds 1 to {MAX_SECRET} bytes")
        if len(values) > MAX_BRANCHES or any(len(v) != 32 * len(pcrs) for v in values):
            raise UsageError(
                f"seal to at most {MAX_BRANCHES} sets of PCR values, each {32 * len(pcrs)} bytes"
            )
        selection = pcr_selection(pcrs)
        self.ensure_primary()
        with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
            branches = [
                self._trial(tmp, ["tpm2_policypcr", "-Q", "-l", selection, "-f", value_file])
                for value_file in _files(tmp, "values", values)
            ] or [self._trial(tmp, ["tpm2_policypcr", "-Q", "-l", selection])]
            if len(branches) == 1:
                policy = branches[0]
            else:
                listed = ",".join(_files(tmp, "branch", branches))
                policy = self._trial(tmp, ["tpm2_policyor", "-l", f"sha256:{listed}"])
            policy_file = Path(tmp) / "policy"
            policy_file.write_bytes(policy)
            tmp_pub, tmp_priv = f"{tmp}/sealed.pub", f"{tmp}/sealed.priv"
            self._tool(
                "tpm2_create",
                "-Q",
                "-C",
                hex(PRIMARY_HANDLE),
                "-L",
                str(policy_file),
                "-a",
                "fixedtpm|fixedparent|noda",
                "-i",
                "-",
                "-u",
                tmp_pub,
                "-r",
                tmp_priv,
                input=secret,
            )
            self._flush_transient()
            for src, dst in ((tmp_pub, pub), (tmp_priv, priv)):
                data = Path(src).read_bytes()
                tmp_dst = dst.with_name(f".{dst.name}.tmp")
                tmp_dst.write_bytes(data)
                tmp_dst.chmod(0o600)
                tmp_dst.replace(dst)
        return branches if len(branches) > 1 else []

    def _trial(self, tmp: str, command: list[str]) -> bytes:
        """The policy digest `command` (a tpm2_policy* taking -S and -L) gives in a
        trial session."""
        session, policy = f"{tmp}/trial.ctx", f"{tmp}/trial.policy"
        self._tool("tpm2_startauthsession", "-S", session)
        try:
            self._tool(command[0], *command[1:], "-S", session, "-L", policy)
        finally:
            self._tool("tpm2_flushcontext", session, check=False)
        return Path(policy).read_bytes()

    def unseal(
        self,
        pub: Path,
        priv: Path,
        pcrs: Sequence[int] = DEFAULT_PCRS,
        branches: Sequence[bytes] = (),
    ) -> bytes:
        """The sealed secret; TpmPolicyError when the PCRs hold none of the values it
        was sealed to, LocalError when the object does not belong to this TPM.
        `branches`: what `seal` returned (a PolicyOR's branches), else nothing."""
        selection = pcr_selection(pcrs)
        for path in (pub, priv):
            if not path.is_file():
                raise LocalError(f"{path}: sealed object not found")
        with tempfile.TemporaryDirectory(prefix="rampart-tpm-") as tmp:
            obj, session = f"{tmp}/sealed.ctx", f"{tmp}/session.ctx"
            loaded = self._tool(
                "tpm2_load",
                "-Q",
                "-C",
                hex(PRIMARY_HANDLE),
                "-u",
                str(pub),
                "-r",
                str(priv),
                "-c",
                obj,
                check=False,
            )
            if loaded.returncode != 0:
                self._tool("tpm2_flushcontext", "--transient-object", check=False)
                raise LocalError(
                    f"{priv}: this TPM cannot load the sealed object (sealed by another TPM, "
                    "or its primary key was replaced)"
                )
            try:
                self._tool("tpm2_startauthsession", "--policy-session", "-S", session)
                try:
                    self._tool("tpm2_policypcr", "-Q", "-S", session, "-l", selection)
                    ored = True
                    if branches:
                        listed = ",".join(_files(tmp, "branch", branches))
                        ored = (
                            self._tool(
                                "tpm2_policyor", "-S", session, "-l", f"sha256:{listed}",
                                check=False,
                            ).returncode
                            == 0
                        )  # fmt: skip
                    done = self._tool(
                        "tpm2_unseal", "-c", obj, "-p", f"session:{session}", check=False
                    )
                finally:
                    self._tool("tpm2_flushcontext", session, check=False)
            finally:
                self._tool("tpm2_flushcontext", "--transient-object", check=False)
        if not ored or done.returncode != 0:
            raise TpmPolicyError(
                f"the TPM refuses to unseal {priv.name}: PCR {selection} differs from when it "
                "was sealed (Secure Boot disabled or its keys changed)"
            )
        return done.stdout

    # --- the rollback counter ------------------------------------------------------------

    def counter(self) -> int | None:
        """The NV counter's value, or None before it is defined or first incremented."""
        done = self._tool("tpm2_nvread", "-C", "o", "-s", "8", hex(COUNTER_INDEX), check=False)
        if done.returncode != 0 or len(done.stdout) != 8:
            return None
        return int.from_bytes(done.stdout, "big")

    def define_counter(self) -> None:
        listed = self._tool("tpm2_getcap", "handles-nv-index").stdout.decode()
        if int(COUNTER_INDEX) in {int(h, 16) for h in re.findall(r"0x[0-9A-Fa-f]+", listed)}:
            return
        self._tool(
            "tpm2_nvdefine",
            "-Q",
            hex(COUNTER_INDEX),
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|nt=counter|no_da",
        )

    def advance_counter(self, epoch: int) -> int:
        """Raise the counter to at least `epoch` (never lowers it); the new value.

        Before its first increment the counter reads as 0, and is left alone for
        epoch 0. A TPM counter's first increment takes it to one more than the highest
        value any counter of that TPM ever had, so it may go above `epoch`."""
        if epoch < 0:
            raise UsageError(f"epoch {epoch}: must not be negative")
        value = self.counter()
        current = 0 if value is None else value
        if current >= epoch:
            return current
        self.define_counter()
        while current < epoch:
            self._tool("tpm2_nvincrement", "-Q", "-C", "o", hex(COUNTER_INDEX))
            value = self.counter()
            if value is None:
                raise LocalError("the TPM NV counter cannot be read after an increment")
            current = value
        return current


def _files(tmp: str, stem: str, datas: Sequence[bytes]) -> list[str]:
    """Each of `datas` in a file of its own in `tmp`: their paths."""
    paths = []
    for number, data in enumerate(datas):
        path = Path(tmp) / f"{stem}-{number}"
        path.write_bytes(data)
        paths.append(str(path))
    return paths
