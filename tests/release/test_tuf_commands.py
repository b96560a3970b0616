"""The `rampart tuf` verbs as a user meets them: help, --json, key files, passwords, one
error line and a documented exit code for bad input with nothing written, `publish`'s
TUF hook, and the timer's units."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from rampart.commands import build_parser
from rampart.commands import tuf as tuf_verbs
from rampart.contracts import tuf
from rampart.contracts.tufrepo import PASSWORD_ENV, load_signer, sign_channels
from rampart.contracts.version import parse_version
from rampart.release import secureboot
from tests.conftest import KeyPair, make_keypair, run_cli
from tests.device.conftest import OS, make_release
from tests.device.test_units import verify_units
from tests.release import bootkit
from tests.release.tufkit import PASSWORD, Repo, make_repository, mode, one_line, tree

VERBS = [
    ("keygen",),
    ("init",),
    ("key", "add"),
    ("key", "revoke"),
    ("key", "rotate"),
    ("root", "rotate"),
    ("sign", "export"),
    ("sign", "add"),
    ("sign", "import"),
    ("sign", "discard"),
    ("add-release",),
    ("timestamp",),
    ("prune",),
    ("status",),
]


@pytest.fixture
def repo(tmp_path: Path, keypair: KeyPair) -> Repo:
    return make_repository(tmp_path, keypair)


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help_explains_every_tuf_verb(verb: tuple[str, ...]) -> None:
    assert tuf_verbs.PASSWORD_ENV == PASSWORD_ENV  # the help names the variable read
    result = run_cli("tuf", *verb, "--help")
    assert result.code == 0
    assert "exit codes" in result.out and "7 TUF metadata short of" in result.out
    assert len(result.out.split("\n\n")[1]) > 80  # a description, not a name
    if verb != ("sign", "discard") and verb != ("status",):
        assert PASSWORD_ENV in result.out or verb == ("sign", "export")


def test_keygen_writes_an_encrypted_0600_key_and_its_public_key_and_never_overwrites(
    tmp_path: Path,
) -> None:
    key = tmp_path / "k.key"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    result = run_cli("tuf", "keygen", key, "--password-file", password_file, "--json")
    assert result.code == 0, result.err
    made = json.loads(result.out)
    assert made["encrypted"] is True and len(made["keyid"]) == 64
    assert (mode(key), mode(tmp_path / "k.key.pub")) == (0o600, 0o644)
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert PASSWORD.encode() not in key.read_bytes()
    assert PASSWORD not in result.out + result.err
    assert bytes.fromhex(made["public"]).hex() in (result.out)
    before = tree(tmp_path)
    again = run_cli("tuf", "keygen", key, "--password-file", password_file)
    assert again.code == 4
    assert "already exists" in one_line(again)
    assert tree(tmp_path) == before


def test_keygen_without_a_password_source_writes_nothing_unless_no_password(
    tmp_path: Path,
) -> None:
    key = tmp_path / "k.key"
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "rampart", "tuf", "keygen", str(key)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env={**env, "PYTHONPATH": ":".join(sys.path)},
    )
    assert done.returncode == 3, done.stderr
    assert "--no-password" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    result = run_cli("tuf", "keygen", key, "--no-password", "--json")
    assert result.code == 0 and json.loads(result.out)["encrypted"] is False
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(key) == 0o600


def test_a_password_file_readable_by_others_is_refused(repo: Repo, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o644)
    before = tree(repo.metadata)
    result = run_cli(
        "tuf", "timestamp", repo.webroot, "--online-key", repo.key("o0"),
        "--password-file", password_file,
    )  # fmt: skip
    assert result.code == 3
    assert "readable by its owner only" in one_line(result)
    assert tree(repo.metadata) == before
    password_file.chmod(0o600)
    result = run_cli(
        "tuf", "timestamp", repo.webroot, "--online-key", repo.key("o0"),
        "--password-file", password_file, "--expires", "3600", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    expires = datetime.datetime.fromisoformat(json.loads(result.out)["timestamp_expires"])
    left = expires - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=58) < left <= datetime.timedelta(hours=1)


def _bad_inputs(repo: Repo) -> list[tuple[str, list[object], int, str, dict[str, str]]]:
    """(case, argv, exit code, in the message, extra environment)."""
    w, key, pub = repo.webroot, repo.key, repo.pub
    roots = ["--key", key("r0"), "--key", key("r1"), "--key", key("o0")]
    return [
        (
            "wrong password",
            ["tuf", "timestamp", w, "--online-key", key("o0")],
            3,
            "cannot open the TUF key",
            {"RAMPART_TUF_PASSWORD": "wrong"},
        ),
        (
            "missing key file",
            ["tuf", "key", "add", w, "targets", w / "nope.key", *roots],
            3,
            "nope.key: TUF key not found",
            {},
        ),
        (
            "not a key",
            ["tuf", "key", "add", w, "targets", w / "tuf" / "1.root.json", *roots],
            10,
            "not a PEM key",
            {},
        ),
        (
            "threshold too high",
            ["tuf", "key", "add", w, "targets", pub("t1"), "--threshold", "3", *roots],
            2,
            "targets would have 2 key(s) for a threshold of 3",
            {},
        ),
        (
            "root threshold too high",
            ["tuf", "root", "rotate", w, "--threshold", "4", *roots],
            2,
            "root would have 3 key(s) for a threshold of 4",
            {},
        ),
        (
            "unknown role",
            ["tuf", "key", "add", w, "mirrors", pub("t1"), *roots],
            2,
            "'mirrors': not a role",
            {},
        ),
        (
            "unknown keyid",
            ["tuf", "key", "revoke", w, "targets", "0123456789abcdef", *roots],
            2,
            "no key of targets has this keyid",
            {},
        ),
        (
            "keyid of another role",
            ["tuf", "key", "revoke", w, "targets", repo.keyid("r0"), *roots],
            2,
            "no key of targets has this keyid",
            {},
        ),
        (
            "keyid too short",
            ["tuf", "key", "revoke", w, "targets", repo.keyid("t0")[:6], *roots],
            2,
            "at least 8 hex digits",
            {},
        ),
        (
            "the last key of a role",
            ["tuf", "key", "revoke", w, "targets", repo.keyid("t0"), *roots],
            2,
            "targets would have 0 key(s) for a threshold of 1",
            {},
        ),
        (
            "a key already there",
            ["tuf", "key", "add", w, "root", pub("r2"), *roots],
            4,
            "already a key of root",
            {},
        ),
        (
            "an online key as a root key",
            ["tuf", "key", "add", w, "root", pub("o0"), *roots],
            2,
            "an online key must be its own",
            {},
        ),
        (
            "not enough root keys",
            ["tuf", "key", "add", w, "root", pub("r3"), "--key", key("r0"), "--key", key("o0")],
            7,
            "1 more signature(s) of the root keys of root 1",
            {},
        ),
        (
            "no online key",
            ["tuf", "key", "revoke", w, "timestamp", repo.keyid("o0"), "--key", key("r0")],
            2,
            "timestamp would have 0 key(s)",
            {},
        ),
        (
            "no repository",
            ["tuf", "status", w.parent],
            3,
            "no TUF repository",
            {},
        ),
        (
            "init over a repository",
            ["tuf", "init", w, "--root-key", key("r0"), "--threshold", "1",
             "--targets-key", key("t0"), "--online-key", key("o0")],
            4,
            "a TUF repository is already there",
            {},
        ),
        (
            "nothing staged to import",
            ["tuf", "sign", "import", w, "--key", key("o0")],
            4,
            "no key ceremony is staged",
            {},
        ),
        (
            "a metadata file that is not one",
            ["tuf", "sign", "import", w, key("r0")],
            10,
            "not TUF metadata",
            {},
        ),
        (
            "export of an online role",
            ["tuf", "sign", "export", w, "snapshot", "--out", w.parent / "x.json"],
            2,
            "only root and targets are signed offline",
            {},
        ),
        (
            "add-release of a version not published",
            ["tuf", "add-release", w, "9.9.9", "--os", OS, "--targets-key", key("t0"),
             "--online-key", key("o0")],
            3,
            "not published",
            {},
        ),
        (
            "add-release with the wrong targets key",
            ["tuf", "add-release", w, "1.0.0", "--os", OS, "--targets-key", key("t1"),
             "--online-key", key("o0")],
            7,
            "targets: 1 more signature(s) of the targets keys",
            {},
        ),
    ]  # fmt: skip


def test_bad_input_gives_one_line_and_its_exit_code_and_changes_nothing(repo: Repo) -> None:
    """Each case on the same repository: one error line, the documented exit code, the
    password never shown, and the repository byte for byte as it was."""
    before = tree(repo.webroot)
    failures = []
    for case, argv, code, said, env in _bad_inputs(repo):
        result = repo.run(*argv, env=env)
        line = one_line(result) if result.code else ""
        if result.code != code or said not in line:
            failures.append(f"{case}: exit {result.code}, {result.err.strip()!r}")
        if tree(repo.webroot) != before:
            failures.append(f"{case}: changed the webroot")
            before = tree(repo.webroot)
    assert failures == [], "\n".join(failures)


def test_a_private_key_readable_by_others_is_refused(repo: Repo) -> None:
    repo.key("o0").chmod(0o640)
    before = tree(repo.metadata)
    result = repo.run("tuf", "timestamp", repo.webroot, "--online-key", repo.key("o0"))
    assert result.code == 3
    assert "readable by its owner only (0600)" in one_line(result)
    assert tree(repo.metadata) == before


def test_a_ceremony_waits_while_another_is_staged_and_discard_drops_it(repo: Repo) -> None:
    w = repo.webroot
    staged = repo.ok("tuf", "root", "rotate", w, "--stage")
    assert staged["staged"] == ["2.root.json"]
    before = tree(repo.metadata)
    result = repo.run("tuf", "key", "add", w, "targets", repo.pub("t1"), "--stage")
    assert result.code == 4
    assert "a key ceremony is staged (2.root.json)" in one_line(result)
    assert tree(repo.metadata) == before
    status = repo.ok("tuf", "status", w)
    assert status["staged"] == ["2.root.json"] and status["missing"][0]["missing"] == 2
    assert repo.ok("tuf", "sign", "discard", w)["discarded"] == ["2.root.json"]
    assert not (repo.metadata / "staged").exists()


def test_import_refuses_a_copy_that_signs_something_else(repo: Repo, tmp_path: Path) -> None:
    """A copy changed on its way (a key added to root), or a signature that does not
    verify: refused, nothing merged."""
    w = repo.webroot
    repo.ok("tuf", "root", "rotate", w, "--stage")
    copy = tmp_path / "copy.json"
    repo.ok("tuf", "sign", "export", w, "root", "--out", copy)
    repo.ok("tuf", "sign", "add", copy, "--key", repo.key("r0"))
    data = json.loads(copy.read_bytes())
    changed = json.loads(json.dumps(data))
    changed["signed"]["roles"]["root"]["threshold"] = 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    before = tree(repo.metadata)
    result = repo.run("tuf", "sign", "import", w, tmp_path / "changed.json")
    assert result.code == 11
    assert "not the staged root 2: what it signs differs" in one_line(result)
    bad = json.loads(json.dumps(data))
    signature = bad["signatures"][0]["sig"]
    bad["signatures"][0]["sig"] = ("0" if signature[0] != "0" else "1") + signature[1:]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = repo.run("tuf", "sign", "import", w, tmp_path / "bad.json")
    assert result.code == 11
    assert "does not verify" in one_line(result)
    assert tree(repo.metadata) == before
    result = repo.run("tuf", "sign", "export", w, "root", "--out", copy)
    assert result.code == 4  # never overwritten


def test_status_shows_every_role_and_its_keys(repo: Repo) -> None:
    found = repo.ok("tuf", "status", repo.webroot)
    assert found["ok"] is True and found["root_versions"] == 1
    roles = found["roles"]
    assert set(roles) == {"root", "targets", "snapshot", "timestamp", "channels"}
    assert roles["root"]["threshold"] == 2
    assert roles["root"]["keyids"] == [repo.keyid(n) for n in ("r0", "r1", "r2")]
    assert roles["channels"]["keyids"] == [repo.keyid("o0")]
    assert roles["targets"]["version"] == 2
    text = repo.run("tuf", "status", repo.webroot)
    assert text.code == 0 and "the chain verifies" in text.out


def test_status_finds_a_tampered_timestamp(repo: Repo) -> None:
    path = repo.metadata / "timestamp.json"
    data = json.loads(path.read_bytes())
    data["signed"]["version"] += 1  # the signature no longer covers it
    path.write_text(json.dumps(data))
    result = repo.run("tuf", "status", repo.webroot)
    assert result.code == 5
    assert "timestamp 3: signed by 0 of the 1 keys needed" in result.err


def test_publish_adds_the_release_to_the_tuf_targets(
    repo: Repo, keypair: KeyPair, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "r1.0.1", "1.0.1")
    argv = [
        "publish", "--webroot", repo.webroot, "--os", OS, "--version", "1.0.1",
        "--core", release.core, "--efiboot", release.efiboot, "--secret-key", keypair.secret,
    ]  # fmt: skip
    tuf_keys = ["--tuf-targets-key", repo.key("t0"), "--tuf-online-key", repo.key("o0")]
    before = tree(repo.webroot)
    wrong = repo.run(*argv, *tuf_keys, env={"RAMPART_TUF_PASSWORD": "wrong"})
    assert wrong.code == 3
    assert "cannot open the TUF key" in one_line(wrong)
    assert tree(repo.webroot) == before  # the keys are read before anything is published
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = repo.run(*[elsewhere if a == repo.webroot else a for a in argv], *tuf_keys)
    assert result.code == 3
    assert "no TUF repository" in one_line(result)
    assert list(elsewhere.iterdir()) == []
    done = repo.ok(*argv, *tuf_keys)
    assert done["tuf"]["added"] is True and done["tuf"]["targets_version"] == 3
    assert (repo.webroot / "dist" / "1.0.1" / f"{OS}-core.sig").is_file()  # minisign too
    client = repo.client()
    client.download("1.0.1")
    path = tuf.payload_target(OS, parse_version("1.0.1"), "efiboot")
    assert path in json.loads((repo.metadata / "3.targets.json").read_bytes())["signed"]["targets"]
    # Publishing it again changes nothing in TUF.
    again = repo.ok(*argv, *tuf_keys)
    assert again["tuf"]["added"] is False
    without = repo.ok(*argv)
    assert without["tuf"] is None


def test_add_release_is_refused_while_a_ceremony_has_targets_staged(repo: Repo) -> None:
    w = repo.webroot
    repo.ok("tuf", "key", "rotate", w, "targets", repo.keyid("t0"), repo.pub("t1"), "--stage")
    release = make_release(w.parent / "r1.0.1", "1.0.1")
    other = make_keypair(w.parent / "minisign")
    publish_argv = [
        "publish", "--webroot", w, "--os", OS, "--version", "1.0.1",
        "--core", release.core, "--efiboot", release.efiboot, "--secret-key", other.secret,
        "--tuf-targets-key", repo.key("t0"), "--tuf-online-key", repo.key("o0"),
    ]  # fmt: skip
    before = tree(w)
    result = repo.run(*publish_argv)
    assert result.code == 4
    assert "a key ceremony has targets 3 staged" in one_line(result)
    assert tree(w) == before


# --- the timer's units ---------------------------------------------------------------------

UNITS = ("rampart-tuf-timestamp.service", "rampart-tuf-timestamp.timer")


def _unit(name: str) -> str:
    return (resources.files("rampart") / "data" / "systemd" / name).read_text()


def test_tuf_timestamp_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name in UNITS:
        (tmp_path / name).write_text(_unit(name))
    assert verify_units(tmp_path, list(UNITS)) == []


def test_tuf_timestamp_service_runs_the_verb_and_is_sandboxed(tmp_path: Path) -> None:
    """Its command line, with the default options, is one the `rampart` parser takes
    for `tuf timestamp`; systemd rates its sandbox safe; the timer runs it well within
    the timestamp's lifetime."""
    text = _unit(UNITS[0])
    settings = [line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"]
    (options,) = [v for k, v in settings if k == "Environment"]
    defaults = options.strip('"').split("=", 1)[1]
    (exec_start,) = [v for k, v in settings if k == "ExecStart"]
    line = exec_start.replace("$RAMPART_TUF_TIMESTAMP_OPTIONS", defaults).replace(
        "${CREDENTIALS_DIRECTORY}", "/run/credentials/rampart-tuf-timestamp.service"
    )
    argv = line.split()
    assert argv[0] == "/usr/bin/rampart"
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_timestamp" and args.expires == 86400
    assert args.webroot == Path("/srv/rampart/webroot")
    assert f"ReadWritePaths=-{args.webroot}/tuf" in text
    assert "LoadCredential=tuf-password:" in text
    unit = tmp_path / UNITS[0]
    unit.write_text(text.replace("/usr/bin/rampart", shutil.which("true") or ""))
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 1.0, proc.stdout
    timer = _unit(UNITS[1])
    assert "OnCalendar=hourly" in timer and "Persistent=true" in timer


def test_release_adds_the_tuf_targets_too(repo: Repo, keypair: KeyPair, tmp_path: Path) -> None:
    """`rampart release` with the TUF keys: built, published, and TUF targets a device's
    client downloads: the payloads, the chunk index and the delta from 1.0.0."""
    tree_dir = tmp_path / "rootfs"
    (tree_dir / "etc").mkdir(parents=True)
    (tree_dir / "etc/os-release").write_text('NAME="CLIP OS"\nID=clipos\nVERSION_ID=2.0.0\n')
    keys = secureboot.generate_keys(tmp_path / "sb")
    inputs = {
        "tree": tree_dir,
        "kernel": bootkit.kernel(),
        "initrd": bootkit.tiny_initrd(tmp_path / "initrd.img"),
        "db_key": keys.key("db"),
        "db_cert": keys.cert("db"),
    }
    result = repo.run(
        "release", inputs["tree"], "--version", "2.0.0", "--os", OS,
        "--kernel", inputs["kernel"], "--initrd", inputs["initrd"],
        "--sign-key", inputs["db_key"], "--sign-cert", inputs["db_cert"],
        "--secret-key", keypair.secret, "--webroot", repo.webroot, "--out", tmp_path / "build",
        "--tuf-targets-key", repo.key("t0"), "--tuf-online-key", repo.key("o0"), "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads(result.out)["tuf"] == {
        "added": True,
        "targets": [
            *(f"dist/2.0.0/{OS}-{kind}" for kind in ("core", "efiboot")),
            f"dist/2.0.0/{OS}-core.caibx",
            f"dist/2.0.0/{OS}-core.from-1.0.0.delta",
        ],
        "targets_version": 3,
    }
    repo.client().download("2.0.0")


def test_init_needs_the_root_threshold_of_private_keys_and_writes_nothing_without(
    tmp_path: Path, keypair: KeyPair
) -> None:
    repo = make_repository(tmp_path / "first", keypair)  # for its keys
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    key, pub = repo.key, repo.pub
    common = ["--targets-key", key("t0"), "--online-key", key("o0"), "--json"]
    result = repo.run(
        "tuf", "init", webroot, "--root-key", key("r0"), "--root-key", pub("r1"),
        "--threshold", "2", *common,
    )  # fmt: skip
    assert result.code == 7
    assert "root: 1 more signature(s) of the root keys" in one_line(result)
    assert list(webroot.iterdir()) == []
    result = repo.run(
        "tuf", "init", webroot, "--root-key", key("r0"), "--root-key", pub("r1"),
        "--threshold", "1", "--targets-key", key("t0"), "--online-key", key("r0"),
    )  # fmt: skip
    assert result.code == 2
    assert "an online key must be its own" in one_line(result)
    assert list(webroot.iterdir()) == []
    done = repo.ok(
        "tuf", "init", webroot, "--root-key", key("r0"), "--root-key", pub("r1"),
        "--threshold", "1", *common[:-1],
    )  # fmt: skip
    assert done["roles"]["root"] == {
        "keyids": [repo.keyid("r0"), repo.keyid("r1")],
        "threshold": 1,
    }
    assert repo.run("tuf", "status", webroot).code == 0


def test_sign_add_signs_only_offline_metadata_with_private_keys(repo: Repo, tmp_path: Path) -> None:
    snapshot = repo.metadata / "2.snapshot.json"
    result = repo.run("tuf", "sign", "add", snapshot, "--key", repo.key("r0"))
    assert result.code == 2
    assert "signed online" in one_line(result)
    repo.ok("tuf", "root", "rotate", repo.webroot, "--stage")
    copy = tmp_path / "root.json"
    repo.ok("tuf", "sign", "export", repo.webroot, "root", "--out", copy)
    exported = copy.read_bytes()
    result = repo.run("tuf", "sign", "add", copy, "--key", repo.pub("r0"))
    assert result.code == 2
    assert "a public key cannot sign" in one_line(result)
    assert copy.read_bytes() == exported
    shown = repo.run("tuf", "sign", "add", copy, "--key", repo.key("r0"))
    assert shown.code == 0
    assert "root version 2" in shown.out and "root      2 of 3" in shown.out


def test_prune_keeps_the_newest_releases_and_those_a_channel_head_names(
    tmp_path: Path, keypair: KeyPair
) -> None:
    """The targets metadata grows by about 1 kB a release and a device fetches it whole
    after each one: `tuf prune` bounds it, never dropping what a channel offers."""
    repo = make_repository(tmp_path, keypair)
    keys = ("--targets-key", repo.key("t0"), "--online-key", repo.key("o0"))
    for version in ("1.0.1", "1.0.2", "1.0.3"):
        repo.publish(version, keypair)
        repo.ok("tuf", "add-release", repo.webroot, version, "--os", OS, *keys)
    online = load_signer(repo.key("o0"), PASSWORD.encode())
    signers = {"snapshot": [online], "timestamp": [online], "channels": [online]}
    sign_channels(repo.webroot, [tuf.ChannelHead(OS, "lts", "1.0.0")], signers)
    client = repo.client()
    client.refresh()
    before = tree(repo.webroot / "dist")
    done = repo.ok("tuf", "prune", repo.webroot, "--os", OS, "--keep", "2", *keys)
    assert done["removed"] == ["1.0.1"]
    updater = repo.client("fresh").refresh()
    for version, listed in (("1.0.0", True), ("1.0.1", False), ("1.0.2", True), ("1.0.3", True)):
        path = tuf.payload_target(OS, parse_version(version), "core")
        assert (updater.get_targetinfo(path) is not None) is listed, version
    client.refresh()  # a device that followed along accepts the new targets too
    assert tree(repo.webroot / "dist") == before  # the files stay
    again = repo.ok("tuf", "prune", repo.webroot, "--os", OS, "--keep", "2", *keys)
    assert again == {**again, "removed": [], "targets_version": None}
    refused = repo.run("tuf", "prune", repo.webroot, "--os", OS, "--keep", "0", *keys)
    assert refused.code == 2
    assert "keep at least the newest release" in one_line(refused)
