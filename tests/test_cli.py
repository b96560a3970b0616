"""The CLI: exit codes, one-line errors, --json, keys never overwritten, nothing half-written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rampart import cli, commands
from tests.conftest import KeyPair, Payloads, publish_args, run_cli, tree_snapshot


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rampart: error: ")
    return lines[0]


def test_help_explains_every_verb() -> None:
    for verb in ("keygen", "sign", "verify", "publish"):
        result = run_cli(verb, "--help")
        assert result.code == 0
        assert "exit codes" in result.out
    assert run_cli("webroot", "check", "--help").code == 0


def test_keygen_encrypted_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    sk, pk = tmp_path / "k.key", tmp_path / "k.pub"
    env = {"RAMPART_PASSWORD": "correct-horse-battery-staple"}  # '-' is not in base64
    result = run_cli("keygen", "--secret-key", sk, "--public-key", pk, "--json", env=env)
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert info["encrypted"] is True
    assert stat.S_IMODE(sk.stat().st_mode) == 0o600
    assert b"correct-horse" not in sk.read_bytes()
    before = (sk.read_bytes(), pk.read_bytes())
    result = run_cli("keygen", "--secret-key", sk, "--public-key", pk, env=env)
    assert result.code == 4
    assert "already exists" in one_line_error(result.err)
    assert (sk.read_bytes(), pk.read_bytes()) == before


def test_keygen_without_password_source_fails_cleanly(tmp_path: Path) -> None:
    sk, pk = tmp_path / "k.key", tmp_path / "k.pub"
    proc = subprocess.run(
        [sys.executable, "-m", "rampart.cli", "keygen", "--secret-key", sk, "--public-key", pk],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "RAMPART_PASSWORD"},
    )
    assert proc.returncode == 3
    assert "no password" in one_line_error(proc.stderr)
    assert not sk.exists() and not pk.exists()


def test_sign_and_verify_print_the_version(keypair: KeyPair, tmp_path: Path) -> None:
    f = tmp_path / "payload"
    f.write_bytes(b"payload")
    assert run_cli("sign", f, "--secret-key", keypair.secret, "--version", "1.2.3").code == 0
    result = run_cli("verify", f, "--public-key", keypair.public)
    assert (result.code, result.out) == (0, "1.2.3\n")
    result = run_cli("verify", f, "--public-key", keypair.public, "--version", "1.2.4")
    assert result.code == 11
    assert "not '1.2.4'" in one_line_error(result.err)


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0+build", "é"])
def test_sign_refuses_a_version_that_is_not_semver(
    keypair: KeyPair, tmp_path: Path, version: str
) -> None:
    f = tmp_path / "payload"
    f.write_bytes(b"payload")
    result = run_cli("sign", f, "--secret-key", keypair.secret, "--version", version)
    assert result.code == 2
    one_line_error(result.err)
    assert not Path(f"{f}.sig").exists()


def test_missing_file_names_the_file(keypair: KeyPair, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = run_cli("sign", missing, "--secret-key", keypair.secret, "--version", "1.0.0")
    assert result.code == 3
    assert str(missing) in one_line_error(result.err)
    result = run_cli("verify", missing, "--public-key", tmp_path / "no.pub")
    assert result.code == 3
    assert "no.pub: public key not found" in one_line_error(result.err)


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", 10),
        (b"untrusted comment: x\n", 10),
        (b"untrusted comment: x\nnot base64!\n", 10),
        (b"\x00\xff" * 100, 10),
        (b"x" * 100_000, 10),
    ],
)
def test_garbage_public_key_gives_format_error(tmp_path: Path, content: bytes, code: int) -> None:
    f = tmp_path / "payload"
    f.write_bytes(b"payload")
    (tmp_path / "payload.sig").write_bytes(b"whatever")
    pk = tmp_path / "bad.pub"
    pk.write_bytes(content)
    result = run_cli("verify", f, "--public-key", pk)
    assert result.code == code
    assert str(pk) in one_line_error(result.err)


def test_publish_json_and_webroot_check(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    result = run_cli(*publish_args(root, keypair, payloads, "1.0.0"), "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert info["version"] == "1.0.0" and info["channel"] == "default"
    assert info["previous"] is None
    result = run_cli(*publish_args(root, keypair, payloads, "1.0.1"), "--json")
    assert json.loads(result.out)["previous"] == "1.0.0"
    result = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["ok"] is True
    assert report["channels"] == [{"channel": "default", "os": "clipos", "version": "1.0.1"}]


def test_webroot_check_exit_code_and_problem_lines(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads
) -> None:
    root = tmp_path / "webroot"
    assert run_cli(*publish_args(root, keypair, payloads, "1.0.0")).code == 0
    (root / "dist/1.0.0/clipos-core.sig").write_text("garbage")
    result = run_cli("webroot", "check", root, "--public-key", keypair.public)
    assert result.code == 5
    lines = result.err.strip().splitlines()
    assert any("clipos-core.sig: truncated signature" in line for line in lines)
    assert lines[-1].startswith("rampart: error: ")
    result = run_cli("webroot", "check", root, "--public-key", keypair.public, "--json")
    assert result.code == 5
    assert json.loads(result.out)["ok"] is False


@pytest.mark.parametrize(
    "breakage",
    ["wrong-password", "garbage-key", "downgrade", "not-semver", "missing-core", "bad-os"],
)
def test_failed_publish_leaves_the_webroot_as_it_was(
    tmp_path: Path, keypair: KeyPair, payloads: Payloads, breakage: str
) -> None:
    root = tmp_path / "webroot"
    assert run_cli(*publish_args(root, keypair, payloads, "1.0.1")).code == 0
    before = tree_snapshot(root)
    args = [str(a) for a in publish_args(root, keypair, payloads, "1.0.2")]
    env: dict[str, str] = {}
    if breakage == "wrong-password":
        enc_sk, enc_pk = tmp_path / "enc.key", tmp_path / "enc.pub"
        run_cli(
            "keygen",
            "--secret-key",
            enc_sk,
            "--public-key",
            enc_pk,
            env={"RAMPART_PASSWORD": "right"},
        )
        args[args.index("--secret-key") + 1] = str(enc_sk)
        env["RAMPART_PASSWORD"] = "wrong"
        expected = 3
    elif breakage == "garbage-key":
        bad = tmp_path / "bad.key"
        bad.write_bytes(b"untrusted comment: x\nAAAA\n")
        args[args.index("--secret-key") + 1] = str(bad)
        expected = 10
    elif breakage == "downgrade":
        args[args.index("--version") + 1] = "1.0.0"
        args[args.index("--core") + 1] = str(payloads["1.0.0"][0])
        args[args.index("--efiboot") + 1] = str(payloads["1.0.0"][1])
        expected = 4
    elif breakage == "not-semver":
        args[args.index("--version") + 1] = "1.0.2.1"
        expected = 2
    elif breakage == "missing-core":
        args[args.index("--core") + 1] = str(tmp_path / "nope")
        expected = 3
    else:
        args[args.index("--os") + 1] = "../etc"
        expected = 2
    result = run_cli(*args, env=env)
    assert result.code == expected, result.err
    one_line_error(result.err)
    assert tree_snapshot(root) == before


def test_console_script_is_installed() -> None:
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [bindir / "rampart", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("rampart ")


def test_every_top_level_verb_is_declared_by_the_area_listing_names() -> None:
    whole = commands.declarations()
    assert [d.path[0] for d in whole if len(d.path) == 1] == list(commands.LISTING)
    for verb in commands.LISTING:
        assert commands.declarations(verb) == [d for d in whole if d.path[0] == verb]


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["mark-good"], "mark-good"),
        (["--debug", "tpm", "status"], "tpm"),
        (["--help"], None),
        (["-h", "status"], None),
        (["--version"], None),
        (["nosuchverb", "status"], None),
        ([], None),
    ],
)
def test_the_named_verb_is_the_first_word_after_rampart_options(
    argv: list[str], verb: str | None
) -> None:
    assert commands.named_verb(argv) == verb


def test_a_device_verb_imports_neither_the_vendor_nor_the_server_verbs() -> None:
    """Under the testbed's emulated CPU, importing every area and building every parser
    was more than a second of each `rampart` command a device runs at boot."""
    probe = (
        "import sys\n"
        "from rampart.cli import main\n"
        "try:\n"
        "    main(['mark-good', '--help'])\n"
        "finally:\n"
        "    print(' '.join(m for m in sys.modules if m.startswith('rampart.commands.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: rampart mark-good" in done.stdout
    imported = set(done.stdout.splitlines()[-1].split())
    assert imported == {"rampart.commands.common", "rampart.commands.device"}


def test_a_bad_flag_after_a_verb_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["status", "--no-such-flag"])
    assert raised.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
