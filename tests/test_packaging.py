"""The package carries every data file the code reads: each directory under
src/rampart/data is in pyproject.toml's package data. data/roles was not, so an
installation that was not editable had no sshd.conf or sudoers to put in a Core."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_directory_is_in_the_package_data() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = doc["tool"]["setuptools"]["package-data"]["rampart"]
    data = ROOT / "src/rampart/data"
    directories = [path.name for path in sorted(data.iterdir()) if path.is_dir()]
    assert directories, data
    missing = [name for name in directories if f"data/{name}/*" not in patterns]
    assert missing == [], missing
