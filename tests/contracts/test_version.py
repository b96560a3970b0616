from __future__ import annotations

from itertools import pairwise

import pytest

from rampart.contracts.version import parse_version
from rampart.errors import UsageError


def test_semver_precedence_follows_the_spec() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
        "10.0.0",
    ]
    parsed = [parse_version(v) for v in ordered]
    assert parsed == sorted(parsed)
    assert all(a < b for a, b in pairwise(parsed))


def test_build_metadata_is_ignored_for_ordering_and_kept_for_display() -> None:
    a = parse_version("5.0.0-beta.1+20191010")
    b = parse_version("5.0.0-beta.1")
    assert a == b
    assert str(a) == "5.0.0-beta.1+20191010"
    assert a.core == "5.0.0-beta.1"


@pytest.mark.parametrize(
    "text",
    [
        "1.0",
        "01.0.0",
        "1.0.0-",
        "1.0.0-01",
        "v1.0.0",
        "1.0.0 ",
        "",
        "1.0.0+",
        "1.0.0-a..b",
        "x" * 200,
    ],
)
def test_invalid_versions_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_version(text)


def test_non_ascii_digits_are_not_digits() -> None:
    with pytest.raises(UsageError):
        parse_version("1\u0662.0.0")  # ARABIC-INDIC DIGIT TWO
