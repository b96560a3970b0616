"""swtpm, a TPM 2.0 simulator, on two consecutive loopback TCP ports (the TPM and its
control channel), its persistent state in a directory of its own.

    with Swtpm(tmp_path / "tpm") as swtpm:
        swtpm.tpm.seal(...)          # a rampart.device.tpm.Tpm reaching it
        swtpm.tcti                   # swtpm:host=127.0.0.1,port=P (a [tpm] tcti)

It is started with `not-need-init,startup-clear`: ready for commands at once, as a
TPM after the firmware's TPM2_Startup.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from rampart.device import tpm
from rampart.testbed.services.base import (
    START_TIMEOUT,
    Service,
    ServiceError,
    port_open,
)


def free_port_pair(host: str = "127.0.0.1") -> tuple[int, int]:
    """Two consecutive free TCP ports: the swtpm TCTI finds the control channel at
    the TPM's port + 1."""
    while True:
        with socket.socket() as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if port == 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
                return port, port + 1


class Swtpm(Service):
    """A TPM 2.0 simulator keeping its state in `state` (made if missing); its output
    goes to `log` (default: STATE.log beside the directory)."""

    def __init__(
        self, state: Path, *, log: Path | None = None, timeout: float = START_TIMEOUT
    ) -> None:
        binary = shutil.which("swtpm")
        if binary is None:
            raise ServiceError("swtpm is not installed: run `make setup`")
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.port, self.ctrl_port = free_port_pair()
        argv = [
            binary,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--server",
            f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
        ]
        super().__init__(
            "swtpm",
            argv,
            log or state.with_name(f"{state.name}.log"),
            ready=lambda: port_open(self.port),
            timeout=timeout,
        )

    @property
    def tcti(self) -> str:
        """The TCTI reaching it, for tpm2-tools and a device's [tpm] tcti."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def tpm(self) -> tpm.Tpm:
        return tpm.Tpm(self.tcti)
