"""Semantic versions as the CLIP OS updater reads them (semver 2.0.0).

Build metadata (`+...`) is kept for display but ignored for ordering and
equality, as the CLIP OS updater strips it from VERSION_ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering

from rampart.errors import UsageError

_NUM = r"0|[1-9]\d*"
_PRE_ID = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD_ID = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_PRE_ID}(?:\.{_PRE_ID})*))?"
    rf"(?:\+(?P<build>{_BUILD_ID}(?:\.{_BUILD_ID})*))?",
    re.ASCII,
)
MAX_LENGTH = 128
# A release's version names its Core LV, core_<version>, and LVM allows 127 characters.
RELEASE_MAX_LENGTH = 127 - len("core_")


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed semantic version; compare with <, ==, as semver 2.0.0 orders them."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    build: str = field(default="", compare=False)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            text += "-" + ".".join(self.pre)
        if self.build:
            text += "+" + self.build
        return text

    @property
    def core(self) -> str:
        """The version without build metadata: what names slots and boot entries."""
        return str(Version(self.major, self.minor, self.patch, self.pre))

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all its pre-releases; numeric identifiers sort
        # before alphanumeric ones and compare numerically.
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre_key)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()


def check_release_length(version: Version, what: str = "version") -> None:
    """UsageError unless `version` (without build metadata) can name a release:
    at most RELEASE_MAX_LENGTH characters, so that core_<version> is a valid LV name."""
    length = len(version.core)
    if length > RELEASE_MAX_LENGTH:
        raise UsageError(
            f"{what} {version.core[:40]}... is {length} characters; a release version has at "
            f"most {RELEASE_MAX_LENGTH} (its Core LV core_<version> must fit LVM's 127)"
        )


def parse_version(text: str, what: str = "version") -> Version:
    """Parse `text` as semver; raise UsageError naming `what` if it is not one."""
    if len(text) > MAX_LENGTH:
        raise UsageError(f"{what} is longer than {MAX_LENGTH} characters")
    match = _SEMVER.fullmatch(text)
    if match is None:
        raise UsageError(f"{what} {text!r} is not a semantic version (like 1.2.3 or 5.0.0-beta.1)")
    pre = match.group("pre")
    return Version(
        int(match.group("major")),
        int(match.group("minor")),
        int(match.group("patch")),
        tuple(pre.split(".")) if pre else (),
        match.group("build") or "",
    )
