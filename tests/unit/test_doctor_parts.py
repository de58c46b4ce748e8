"""Doctor's parts that need no kernel: fixes for config mistakes, messages, the log fallback.

The whole doctor, on real broken set-ups, is tests/upcall/test_doctor.py.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kmskeys import errors
from kmskeys.cached import flush_command
from kmskeys.doctor.config import _config_fix
from kmskeys.doctor.finding import Finding
from kmskeys.prockeys import ProcKey
from resolver import config as config_mod
from resolver.errors import ConfigError
from resolver.install import default_config_text
from resolver.log import SyslogWriter

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_the_generated_config_and_the_docs_list_every_key() -> None:
    text = default_config_text("kms", config_mod.DEFAULT_BLOB_DIR)
    docs = (REPO / "docs" / "resolver.md").read_text()
    for key in config_mod.known_keys():
        assert re.search(rf"^# ?{key} = |^# \[{key}\.", text, re.M), key
        assert f"`{key}`" in docs or f'[{key}."' in docs, key
    # Commented out, it is the defaults: the file as written loads.
    assert config_mod.parse_text(text.encode()).ttl == config_mod.Config().ttl


def test_a_config_error_names_its_key() -> None:
    for data, key in (({"endpoint": "https://x"}, "endpoint"), ({"ttl": "300"}, "ttl")):
        with pytest.raises(ConfigError) as caught:
            config_mod.parse(data)
        assert caught.value.key == key


def _sed(fix: str, path: Path) -> str:
    subprocess.run(["sh", "-c", fix], check=True)
    return path.read_text()


def test_config_fixes_rename_a_typo_or_comment_out_a_bad_value(tmp_path: Path) -> None:
    known = config_mod.known_keys()
    path = tmp_path / "resolver.toml"
    path.write_text('endpoint = "https://kms.example"\n[names."a"]\nttl = 5\n')
    assert "endpoint_url" in _sed(_config_fix(path, "endpoint", known), path)
    config_mod.parse_text(path.read_bytes())  # loads now
    # Already set under its right name: renaming would make a duplicate, so comment it out.
    path.write_text('endpoint_url = "https://a"\nendpont = "https://b"\n')
    assert _sed(_config_fix(path, "endpont", known), path).splitlines()[1].startswith("# ")
    path.write_text('ttl = "300"\n')
    assert _sed(_config_fix(path, "ttl", known), path) == '# ttl = "300"\n'
    # A value over several lines cannot be edited with one sed: open an editor.
    path.write_text('key_arns = [\n  "x",\n]\n')
    assert _config_fix(path, "key_arns", known).startswith("${EDITOR:-vi} ")
    assert _config_fix(path, None, known).startswith("${EDITOR:-vi} ")


def test_finding_text_and_json_are_the_same_finding() -> None:
    found = Finding("FAIL", "config", "config /x is bad", "chmod 644 /x")
    assert found.line() == "FAIL config /x is bad; fix: chmod 644 /x"
    assert found.as_dict() == {
        "level": "FAIL",
        "check": "config",
        "message": "config /x is bad",
        "fix": "chmod 644 /x",
    }


def test_proc_keys_lines_and_expiry() -> None:
    neg = ProcKey("1a2b3c4d I--QN--     1  53s 3f010000     0     0 user      kms:db\n")
    assert (neg.serial, neg.negative, neg.description, neg.expires) == (
        0x1A2B3C4D,
        True,
        "kms:db",
        "in 53 s",
    )
    ok = ProcKey("0000002a I--Q---     1   2m 3f0b0000  1000  1000 user      kms:a/b: 12\n")
    assert (ok.negative, ok.description, ok.expires) == (False, "kms:a/b", "in 2 min")
    assert flush_command("kms:db") == "kmskeys flush db"
    assert flush_command("app:a b") == "kmskeys flush 'a b' --prefix app"


@pytest.mark.parametrize(
    ("err", "says", "doctor"),
    [
        (errno.ENOKEY, "no rule routes this prefix", True),
        (errno.EKEYREJECTED, "journalctl -t kmskeys-resolver", True),
        (errno.EAGAIN, "journalctl -t kmskeys-resolver", False),
        (errno.ENOENT, "request-key never ran", True),
        (errno.EPERM, "Docker's default profile", True),
        (errno.ENOSYS, "Docker's default profile", True),
    ],
)
def test_upcall_errors_say_where_to_look(err: int, says: str, doctor: bool) -> None:
    message = str(
        errors.error_for_errno(err, "request_key app:x", upcall=True, description="app:x")
    )
    assert says in message
    assert ("run `kmskeys doctor --prefix app`" in message) is doctor
    if err == errno.EPERM:  # not "run as root": nobody may make the call here
        assert "run as root" not in message


def test_without_a_syslog_socket_the_line_goes_to_kmsg_saying_so(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    writer = SyslogWriter(tmp_path / "no-such.sock", 10, kmsg=kmsg)
    writer.emit(4, "uid=0 name=x outcome=refused")
    (line,) = kmsg.read_text().splitlines(keepends=True)
    assert line.startswith("<84>kmskeys-resolver[") and line.endswith("\n")
    assert "uid=0 name=x outcome=refused (syslog socket " in line
    assert "No such file or directory; logged to " + str(kmsg) + " instead)" in line


def test_without_kmsg_either_the_line_goes_to_stderr(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from resolver.log import SyslogWriter\n"
        f"SyslogWriter(Path('{tmp_path}/none.sock'), 10, kmsg=Path('{tmp_path}/none'))"
        ".emit(4, 'name=x outcome=refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == ""
    assert "name=x outcome=refused (syslog socket " in done.stderr


def test_a_syslog_daemon_that_is_behind_does_not_flood_kmsg(tmp_path: Path) -> None:
    import socket

    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    path = tmp_path / "slow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as slow:
        slow.bind(str(path))  # never reads: its queue fills (net.unix.max_dgram_qlen)
        writer = SyslogWriter(path, 10, kmsg=kmsg)
        for _ in range(200):
            writer.emit(6, "name=x outcome=ok")
    assert kmsg.read_text() == ""
