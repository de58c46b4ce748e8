"""The parts of the suite that run code as other uids pass from a checkout below a 0700 directory.

A clone in a `mktemp -d` folder or in /root lies below a directory other users cannot enter. The
test makes that case on any machine without touching the real directory: in a private mount
namespace, a 0700 tmpfs covers the checkout's parent and the checkout is bound back at its own
path, so every path (the venv's, the editable install's) stays the same and only the kernel's
walk through the parent is refused to other uids. In there, a nested pytest runs one test of
every way the suite becomes another uid; tests/support/reach.py is what lets them pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.reach import ROOT, cover, needed, private_mounts

pytestmark = pytest.mark.isolation

PARENT = ROOT.parent
# One or more tests of each way the suite runs code as another uid.
AS_OTHER_UIDS = [
    # stored/conftest.as_user: an fsuid child importing lazily (cryptography's kdf)
    "tests/stored/test_dpapi.py::test_b_cannot_unprotect_a_user_scope_blob",
    "tests/stored/test_dpapi.py::test_machine_scope_works_for_both_users",
    "tests/stored/test_dpapi.py::test_allow_users_keeps_others_out",
    "tests/stored/test_dpapi.py::test_rotation_keeps_old_blobs_readable",
    # requester setuid child: `kmskeys exec` as nobody, doctor in process as nobody
    "tests/upcall/test_exec.py::test_file_injection_as_a_non_root_user",
    "tests/upcall/test_doctor.py::test_doctor_as_non_root_says_what_it_cannot_tell",
    # requester fsuid children (the keyring tests' requesters), root and nobody
    "tests/upcall/test_doctor.py::test_doctors_fix_root_resolves_for_the_uid_and_the_app_hits",
    "tests/isolation/test_users.py::test_blob_bound_to_a_never_decrypts_for_b",
    "tests/isolation/test_hostflush.py::test_a_non_root_flush_stays_with_its_own_keys",
    # a forked child that drops to nobody by hand, and one that serves as nobody
    "tests/netns/test_firewall.py::test_not_root_is_a_clear_error",
    "tests/upcall/test_daemon_fakes.py::test_a_daemon_of_another_uid_is_never_believed",
    # doctor's own IMDS probe as nobody (kmskeys.imds.probe_as_user), setpriv'd keyctl
    "tests/netns/test_doctor_imds.py",
    "tests/kernel/test_upcall_probe.py",
]


def _behind_a_private_parent() -> None:
    """preexec_fn: the checkout's parent is a 0700 directory, as under `mktemp -d`."""
    private_mounts()
    cover(PARENT, [p for p in needed() if PARENT in p.parents], mode=0o700)


def _run(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    assert PARENT.parent != PARENT, "the checkout lies at /: clone it one directory deeper"
    return subprocess.run(
        argv,
        preexec_fn=_behind_a_private_parent,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# As root in the 0700 case: a child that becomes nobody imports a module nothing imported yet,
# once as it is and once through reach_checkout()'s view.
PROBE = textwrap.dedent(
    f"""
    import json, os, sys
    sys.path.insert(0, {str(ROOT)!r})
    from kmskeys.upcall_probe import become_user, nobody
    from tests.support import reach

    def imports(view):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if view:
                    reach.reach_checkout()
                become_user(*nobody())
                import encryptor, cryptography.hazmat.primitives.kdf.hkdf
                code = 0
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    mode = os.stat({str(PARENT)!r}).st_mode & 0o777
    print(json.dumps({{"mode": mode, "closed": imports(False), "view": imports(True),
                      "covers": [str(top) for top in reach.covers()]}}))
    """
)


def test_the_0700_parent_really_closes_the_checkout_and_the_view_opens_it() -> None:
    done = _run(sys.executable, "-c", PROBE, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["mode"] == 0o700
    assert seen["closed"] is False  # nobody cannot import from the checkout as it is...
    assert seen["view"] is True  # ...and can through the view
    assert str(PARENT) in seen["covers"]


# A fresh interpreter (nothing has loaded the cffi binding yet, as in `kmskeys doctor`) runs the
# upcall probe, whose children take other identities: each case's outcome, and whether the
# binding was loaded before the probe began.
PROBE_UPCALLS = textwrap.dedent(
    f"""
    import json, sys
    sys.path.insert(0, {str(ROOT)!r})
    from kmskeys import upcall_probe
    loaded = "kmskeys._keyutils_cffi" in sys.modules
    caps = upcall_probe.probe_upcalls()
    cases = {{name: [getattr(caps, name).ran, getattr(caps, name).uid, getattr(caps, name).error]
              for name in ("root", "non_root", "fsuid", "ruid_fsuid")}}
    print(json.dumps({{"loaded_before": loaded, "cases": cases}}))
    """
)


def test_the_upcall_probe_answers_the_same_from_below_a_0700_directory() -> None:
    """The probe's children become nobody (or act as it through the fsuid) and then call into
    the binding: loaded lazily after that, it could not be read from a closed checkout, and the
    probe said no requester could upcall (fixed by loading it first, as root)."""
    closed = _run(sys.executable, "-c", PROBE_UPCALLS, timeout=120)
    assert closed.returncode == 0, closed.stderr
    open_ = subprocess.run(
        [sys.executable, "-c", PROBE_UPCALLS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert open_.returncode == 0, open_.stderr
    behind, beside = json.loads(closed.stdout), json.loads(open_.stdout)
    assert behind["loaded_before"] is False  # the lazy binding's path, as doctor takes it
    assert behind["cases"] == beside["cases"], (behind, beside)
    # Root's own request and the suite's stand-in requester (euid 0, fsuid nobody) work on
    # every machine this suite runs on; an import error would show as a case's error.
    assert behind["cases"]["root"] == [True, 0, None], behind
    assert behind["cases"]["fsuid"][2] is None, behind


@pytest.mark.timeout(900)
def test_tests_that_run_as_other_uids_pass_from_below_a_0700_directory(tmp_path: Path) -> None:
    done = _run(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--basetemp={tmp_path / 'nested'}",
        *AS_OTHER_UIDS,
        timeout=840,
    )
    out = done.stdout
    assert f"other uids: {PARENT} (mode 700) is closed to them" in out, out[-3000:]
    summary = out.strip().splitlines()[-1]
    assert done.returncode == 0, out[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
