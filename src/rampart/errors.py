"""The exception tree. Every error a user can meet is a `RampartError`.

Each class carries the exit code the CLI returns for it (documented in
docs/exit-codes.md). Messages are one line: what, where, why.

    RampartError                 1  anything else that went wrong
    ├── UsageError               2  a flag or argument is invalid (not semver, bad name)
    ├── LocalError               3  the local system or operator: missing file, no permission,
    │   │                           full disk, wrong password
    │   └── ConflictError        4  refused to overwrite or to go backwards (--force)
    ├── AuditError               5  an audit (webroot check, gateway check) found problems
    ├── ConfigError              6  a description file (gateway.toml) is invalid or asks
    │                               for something refused (a weak suite, IKEv1)
    ├── IncompleteError          7  TUF metadata lacks signatures to meet a threshold: not
    │                               published (a ceremony's signatures wait in staged/)
    ├── TransportError          12  the network failed: connection, TLS, timeout, HTTP status
    └── RemoteDataError             data that may come from an attacker
        ├── FormatError         10  a key, signature or metadata file is malformed
        └── VerificationError   11  a signature does not verify, or carries the wrong version
            ├── FreezeError     13  signed update metadata has expired: the server or a
            │                       mirror may be freezing this device on old metadata
            ├── RollbackAttackError 14  signed update metadata went back to an older version
            └── OfferError      15  the server offers a version its signed channel does
                                    not allow
"""

from __future__ import annotations


class RampartError(Exception):
    """Root of every error Rampart raises on purpose."""

    exit_code = 1


class UsageError(RampartError):
    """An argument or option value is invalid."""

    exit_code = 2


class LocalError(RampartError):
    """The local system or the operator is wrong: missing file, permission, space, password."""

    exit_code = 3


class ConflictError(LocalError):
    """Refused: the operation would overwrite data or move a channel backwards."""

    exit_code = 4


class AuditError(RampartError):
    """An audit found problems; `problems` lists them, one line each."""

    exit_code = 5

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class ConfigError(RampartError):
    """A description file is malformed, or asks for something Rampart refuses."""

    exit_code = 6


class IncompleteError(RampartError):
    """Metadata is short of the signatures a threshold needs: nothing was published
    (what a key ceremony collected so far waits in the repository's staged/)."""

    exit_code = 7


class TransportError(RampartError):
    """The network failed: refused connection, TLS or certificate error, timeout, HTTP error."""

    exit_code = 12


class RemoteDataError(RampartError):
    """Data that can come from an attacker (network, webroot, vendor files) is bad."""

    exit_code = 10


class FormatError(RemoteDataError):
    """A key, signature or metadata file is malformed."""

    exit_code = 10


class VerificationError(RemoteDataError):
    """A signature does not verify, or verifies but names the wrong version."""

    exit_code = 11


class FreezeError(VerificationError):
    """Signed update metadata has expired: the server or a mirror may be freezing
    this device on an old view of the repository (TUF's indefinite freeze attack)."""

    exit_code = 13


class RollbackAttackError(VerificationError):
    """Signed update metadata is older than what this device already trusts."""

    exit_code = 14


class OfferError(VerificationError):
    """The server offers a version that its signed channel head does not allow."""

    exit_code = 15
