"""Small parsers for what `rampart gateway render` writes, to compare the structure
of two renderings: swanctl.conf (strongSwan's settings syntax), nftables rulesets,
the POSIX shell scripts, the systemd units and the sysusers.d line.

Each follows the real grammar closely enough to see what a value could change:
where a quoted string ends, where a statement or a command ends, what is a key and
what a section. Comments are dropped. A file that does not parse raises
`Unparsable`. strongSwan's lexer is src/libstrongswan/settings/settings_lexer.l,
nft's is src/scanner.l; the shell's is POSIX (XCU 2.3, token recognition).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass


class Unparsable(ValueError):
    """The text does not parse (a value broke the syntax)."""


# ---- strongSwan settings (swanctl.conf, strongswan.conf) ---------------------------


@dataclass(frozen=True)
class Setting:
    """One `key = value` or `include pattern`, with the keys of the sections
    around it (section names are values: they are kept apart in `sections`)."""

    depth: int
    key: str  # "include" for an include
    value: str


def _settings_string(text: str, i: int) -> tuple[str, int]:
    """A quoted string starting after its opening quote; returns (value, next index)."""
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\r":
            i += 1
            continue
        if c == "\\":
            if i + 1 >= len(text):
                raise Unparsable("unterminated string")
            nxt = text[i + 1]
            if nxt == "\n":
                i += 2
            elif nxt == "\r" and text[i + 2 : i + 3] == "\n":
                i += 3
            else:
                out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
                i += 2
            continue
        out.append(c)
        i += 1
    raise Unparsable("unterminated string")


def swanctl(text: str) -> tuple[list[Setting], list[tuple[int, str]]]:
    """(settings in order, sections in order as (depth, name))."""
    settings: list[Setting] = []
    sections: list[tuple[int, str]] = []
    depth = 0
    i = 0
    pending: str | None = None  # a NAME read, waiting for "=" or "{"
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "\n":
            if pending is not None:
                raise Unparsable(f"a name without = or {{: {pending!r}")
            i += 1
        elif c == "{":
            if pending is None:
                raise Unparsable("{ without a section name")
            sections.append((depth, pending))
            depth += 1
            pending = None
            i += 1
        elif c == "}":
            if pending is not None or depth == 0:
                raise Unparsable("unexpected }")
            depth -= 1
            i += 1
        elif c == "=":
            if pending is None:
                raise Unparsable("= without a key")
            i += 1
            parts: list[str] = []
            while i < n and text[i] not in "#}\n":
                if text[i] in " \t\r":
                    i += 1
                elif text[i] == '"':
                    value, i = _settings_string(text, i + 1)
                    parts.append(value)
                else:
                    m = re.compile(r'[^#}"\r\n\t ]+').match(text, i)
                    assert m is not None
                    parts.append(m.group())
                    i = m.end()
            settings.append(Setting(depth, pending, " ".join(parts)))
            pending = None
        elif c == '"':
            raise Unparsable("a string where a name is expected")
        else:
            m = re.compile(r'[^#{}="\r\n\t ]+').match(text, i)
            assert m is not None
            word = m.group()
            i = m.end()
            if pending is None and word == "include" and i < n and text[i] in " \t":
                while i < n and text[i] in " \t":
                    i += 1
                if i < n and text[i] != "=":
                    pattern, i = _include(text, i)
                    settings.append(Setting(depth, "include", pattern))
                    continue
            if pending is not None:
                raise Unparsable(f"two names in a row: {pending!r} {word!r}")
            pending = word
    if pending is not None or depth != 0:
        raise Unparsable("unexpected end")
    return settings, sections


def _include(text: str, i: int) -> tuple[str, int]:
    if text[i] == '"':
        return _settings_string(text, i + 1)
    out = []
    while i < len(text) and text[i] not in "#}\n\t ":
        if text[i] == "\r":
            i += 1
        elif text[i] == "\\" and text[i + 1 : i + 2] in ('"', "#", "}", " "):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out), i


# ---- nftables -------------------------------------------------------------------


def nft(text: str) -> list[tuple[str, ...]]:
    """The statements of a ruleset, each the tuple of its tokens (quoted strings
    keep their quotes; `{`, `}` and `,` are tokens). A statement ends at a newline
    or `;` outside braces of a set, and at `{` / `}` of a block."""
    statements: list[tuple[str, ...]] = []
    current: list[str] = []
    braces: list[str] = []  # "block" or "set", innermost last
    i = 0
    n = len(text)

    def end() -> None:
        if current:
            statements.append(tuple(current))
            current.clear()

    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\\" and text[i + 1 : i + 2] == "\n":
            i += 2
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "\n;":
            if not braces or braces[-1] == "block":
                end()
            i += 1
        elif c == '"':
            close = text.find('"', i + 1)
            if close < 0:
                raise Unparsable("unterminated string")
            current.append(text[i : close + 1])
            i = close + 1
        elif c == "{":
            # A block follows `table X`, `chain Y`; anything else opens a set.
            if current and current[0] in ("table", "chain") and len(current) <= 3:
                current.append("{")
                end()
                braces.append("block")
            else:
                current.append("{")
                braces.append("set")
            i += 1
        elif c == "}":
            if not braces:
                raise Unparsable("unexpected }")
            kind = braces.pop()
            if kind == "block":
                end()
                statements.append(("}",))
            else:
                current.append("}")
            i += 1
        elif c == ",":
            current.append(",")
            i += 1
        else:
            m = re.compile(r'[^\s"{},;#]+').match(text, i)
            assert m is not None
            current.append(m.group())
            i = m.end()
    end()
    if braces:
        raise Unparsable("unclosed {")
    return statements


# ---- POSIX shell ----------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One line of a script: its words with the quotes removed, and everything the
    shell would give a meaning to outside single quotes: operators, redirections,
    expansions, command substitutions."""

    words: tuple[str, ...]
    specials: tuple[str, ...]


_OPERATORS = ("&&", "||", ";;", ">>", "<<", ">&", "<&", "<>", ">|", ";", "&", "|", "<", ">")


def shell(text: str) -> list[Command]:
    """The commands of a script, one per line (the scripts here have no multi-line
    constructs; a newline inside quotes is reported as unparsable)."""
    commands = []
    for line in text.split("\n"):
        command = _shell_line(line)
        if command.words or command.specials:
            commands.append(command)
    return commands


def _shell_line(line: str) -> Command:
    words: list[str] = []
    specials: list[str] = []
    word: list[str] | None = None
    # Contexts: "top" (unquoted), "'", '"', "$(" (a command substitution, itself
    # unquoted inside), "`".
    stack = ["top"]
    i = 0
    n = len(line)

    def flush() -> None:
        nonlocal word
        if word is not None:
            words.append("".join(word))
            word = None

    def add(text: str) -> None:
        nonlocal word
        if word is None:
            word = []
        word.append(text)

    while i < n:
        c = line[i]
        top = stack[-1]
        if top == "'":
            if c == "'":
                stack.pop()
            else:
                add(c)
            i += 1
            continue
        if c == "\\":
            if i + 1 >= n:
                raise Unparsable("a line ends with a backslash")
            add(line[i + 1])
            i += 2
            continue
        if c == "$" and line[i + 1 : i + 2] == "(":
            specials.append("$(")
            stack.append("$(")
            add("$(")
            i += 2
            continue
        if c == "$" and i + 1 < n and (line[i + 1].isalnum() or line[i + 1] in "_{@*#?$!-"):
            m = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])").match(line, i)
            if m is None:
                raise Unparsable("a bad parameter expansion")
            specials.append(m.group())
            add(m.group())
            i = m.end()
            continue
        if c == "`":
            specials.append("`")
            if top == "`":
                stack.pop()
            else:
                stack.append("`")
            add(c)
            i += 1
            continue
        if top == '"':
            if c == '"':
                stack.pop()
            else:
                add(c)
            i += 1
            continue
        # Unquoted: at top level, or inside $( ) or ` `.
        if c == "'":
            stack.append("'")
            add("")
            i += 1
        elif c == '"':
            stack.append('"')
            add("")
            i += 1
        elif c == ")" and top == "$(":
            stack.pop()
            add(")")
            i += 1
        elif c in " \t":
            if top == "top":
                flush()
            else:
                add(c)
            i += 1
        elif c == "#" and word is None and top == "top":
            break
        elif c in "();&|<>":
            op = next(o for o in (*_OPERATORS, "(", ")") if line.startswith(o, i))
            specials.append(op)
            if top == "top":
                flush()
            else:
                add(op)
            i += len(op)
        else:
            add(c)
            i += 1
    if stack != ["top"]:
        raise Unparsable(f"unterminated {stack[-1]}")
    flush()
    return Command(tuple(words), tuple(specials))


# ---- systemd units, sysusers.d --------------------------------------------------


def unit(text: str) -> list[tuple[str, str, int]]:
    """(section, key, number of words in the value) per assignment; no line may
    continue onto the next."""
    out = []
    section = ""
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line.endswith("\\"):
            raise Unparsable("a continued line")
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        if not sep:
            raise Unparsable(f"not an assignment: {stripped!r}")
        out.append((section, key.strip(), len(value.split())))
    return out


def sysusers(text: str) -> list[list[str]]:
    """The lines of a sysusers.d file, each split into its fields."""
    return [
        shlex.split(line)
        for line in text.split("\n")
        if line.strip() and not line.lstrip().startswith("#")
    ]
