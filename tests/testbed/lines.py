"""What the testbed's guests print that the scenarios wait for (the initramfs's lines)."""

from __future__ import annotations

import re

CORE = "mainvg/core_{}"
UNLOCKED_TPM = "rampart: state partition unlocked with the TPM"
UNLOCKED_PASSPHRASE = "rampart: state partition unlocked with the recovery passphrase"
PROMPT = re.compile(r"rampart: (?P<reason>[^\n]*); enter the recovery passphrase[^\n]*\n")
