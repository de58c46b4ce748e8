"""The kmskeys-admin group that every install creates (resolver/install.py ensure_admin_group).

`kmskeys-resolver uninstall` keeps it on purpose: live keys carry its gid. A test session or a
bench run that created it removes it at the end, when its keys are gone.
"""

from __future__ import annotations

import grp
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from kmskeys.contract import ADMIN_GROUP


def _exists() -> bool:
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        return False
    return True


@contextmanager
def removed_if_created() -> Iterator[None]:
    """Run the body; afterwards remove the admin group if it did not exist before."""
    had = _exists()
    try:
        yield
    finally:
        if not had and _exists() and os.geteuid() == 0:
            subprocess.run(["groupdel", ADMIN_GROUP], check=False, capture_output=True)
