"""cffi builder for libkeyutils, run at install time only.

The cdef below is copied from <keyutils.h> (keyutils 1.6); it is compiled out of line in API mode so
that importing kmskeys never parses C and never needs pycparser. One small C helper sits beside
it (HELPERS): disabling core dumps. get_secret's hit path is a CPython extension of its own,
kmskeys/_hitpath.c.
"""

import os
import re

from cffi import FFI

# The build stamp of kmskeys/contract.h (scripts/generate.py), compiled into the module as text:
# a new stamp changes the generated source, so cffi rebuilds the module (an #include would not).
_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contract.h")
with open(_HEADER) as _file:
    _found = re.search(r'^#define KMSKEYS_BUILD_STAMP "([^"]*)"$', _file.read(), re.M)
if _found is None:
    raise RuntimeError(f"{_HEADER} names no KMSKEYS_BUILD_STAMP")
BUILD_STAMP = _found.group(1)

CDEF = """
typedef int32_t key_serial_t;
typedef uint32_t key_perm_t;
typedef uint32_t uid_t;  /* 32-bit on every Linux ABI */
typedef uint32_t gid_t;

#define KEY_SPEC_THREAD_KEYRING ...
#define KEY_SPEC_PROCESS_KEYRING ...
#define KEY_SPEC_SESSION_KEYRING ...
#define KEY_SPEC_USER_KEYRING ...
#define KEY_SPEC_USER_SESSION_KEYRING ...
#define KEY_SPEC_GROUP_KEYRING ...
#define KEY_SPEC_REQKEY_AUTH_KEY ...

key_serial_t add_key(const char *type, const char *description,
                     const void *payload, size_t plen, key_serial_t ringid);
key_serial_t request_key(const char *type, const char *description,
                         const char *callout_info, key_serial_t destringid);

key_serial_t keyctl_get_keyring_ID(key_serial_t id, int create);
key_serial_t keyctl_join_session_keyring(const char *name);
long keyctl_update(key_serial_t id, const void *payload, size_t plen);
long keyctl_revoke(key_serial_t id);
long keyctl_chown(key_serial_t id, uid_t uid, gid_t gid);
long keyctl_setperm(key_serial_t id, key_perm_t perm);
long keyctl_clear(key_serial_t ringid);
long keyctl_link(key_serial_t id, key_serial_t ringid);
long keyctl_unlink(key_serial_t id, key_serial_t ringid);
long keyctl_search(key_serial_t ringid, const char *type, const char *description,
                   key_serial_t destringid);
long keyctl_read(key_serial_t id, char *buffer, size_t buflen);
long keyctl_instantiate(key_serial_t id, const void *payload, size_t plen,
                        key_serial_t ringid);
long keyctl_negate(key_serial_t id, unsigned timeout, key_serial_t ringid);
long keyctl_set_timeout(key_serial_t key, unsigned timeout);
long keyctl_assume_authority(key_serial_t key);
long keyctl_reject(key_serial_t id, unsigned timeout, unsigned error, key_serial_t ringid);
long keyctl_invalidate(key_serial_t id);
long keyctl_describe(key_serial_t id, char *buffer, size_t buflen);
long keyctl_get_persistent(uid_t uid, key_serial_t id);

const char *kmsk_build_stamp(void);
int kmsk_disable_core_dumps(void);
int kmsk_private_fs(const char *fstype, const char *size);
int kmsk_unshare(int flags);
#define CLONE_NEWUSER ...
#define CLONE_NEWNS ...
int setfsuid(uid_t fsuid);
int setfsgid(gid_t fsgid);

int keyctl_describe_alloc(key_serial_t id, char **_buffer);

void free(void *ptr);
void explicit_bzero(void *s, size_t n);
"""

HELPERS = r"""
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <keyutils.h>

/* Python calls it lib.explicit_bzero, but glibc's needs glibc 2.25 and the wheel targets 2.17:
 * the name is ours (kmskeys/_wipe.h). */
#include "_wipe.h"
#define explicit_bzero kmsk_wipe

/* fsopen(2), fsconfig(2) and fsmount(2) (Linux 5.2) have glibc wrappers only from glibc 2.36,
 * and the wheel must load on glibc 2.34 (Amazon Linux 2023): raw syscalls. Their numbers are
 * the same on every architecture (the unified syscall table from 424 on). */
#ifndef __NR_fsopen
#define __NR_fsopen 430
#define __NR_fsconfig 431
#define __NR_fsmount 432
#endif
#define KMSK_FSOPEN_CLOEXEC 0x1
#define KMSK_FSCONFIG_SET_STRING 1
#define KMSK_FSCONFIG_CMD_CREATE 6
#define KMSK_FSMOUNT_CLOEXEC 0x1
#define KMSK_MOUNT_ATTR_NOSUID 0x2
#define KMSK_MOUNT_ATTR_NODEV 0x4
#define KMSK_MOUNT_ATTR_NOEXEC 0x8

/* The stamp of the sources this module was built from (kmskeys.BUILD_STAMP). */
const char *kmsk_build_stamp(void)
{
    return "@BUILD_STAMP@";
}

/* No core file, no ptrace by other root-less processes, no /proc/PID/mem of this process:
 * a crash must never write served plaintext to disk. */
int kmsk_disable_core_dumps(void)
{
    struct rlimit none = { 0, 0 };

    if (setrlimit(RLIMIT_CORE, &none) != 0)
        return -1;
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

/* A new filesystem of `fstype` (ramfs or tmpfs), root mode 0700, mounted nowhere: the returned
 * fd (O_PATH, close-on-exec) is the only way to it, and the kernel frees it with the last fd.
 * `size` caps a tmpfs (NULL for ramfs, which has no such option). Needs CAP_SYS_ADMIN over the
 * caller's mount namespace: root, or a fresh user + mount namespace of one's own. */
int kmsk_private_fs(const char *fstype, const char *size)
{
    int fs, mnt, saved;

    fs = (int)syscall(__NR_fsopen, fstype, KMSK_FSOPEN_CLOEXEC);
    if (fs < 0)
        return -1;
    if (syscall(__NR_fsconfig, fs, KMSK_FSCONFIG_SET_STRING, "mode", "0700", 0) != 0 ||
        (size != NULL &&
         syscall(__NR_fsconfig, fs, KMSK_FSCONFIG_SET_STRING, "size", size, 0) != 0) ||
        syscall(__NR_fsconfig, fs, KMSK_FSCONFIG_CMD_CREATE, NULL, NULL, 0) != 0) {
        saved = errno;
        close(fs);
        errno = saved;
        return -1;
    }
    mnt = (int)syscall(__NR_fsmount, fs, KMSK_FSMOUNT_CLOEXEC,
                       KMSK_MOUNT_ATTR_NOSUID | KMSK_MOUNT_ATTR_NODEV | KMSK_MOUNT_ATTR_NOEXEC);
    saved = errno;
    close(fs);
    errno = saved;
    return mnt;
}

int kmsk_unshare(int flags)
{
    return unshare(flags);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
# include_dirs: for _wipe.h, from the project root, where setup.py and `__main__` run.
ffibuilder.set_source(
    "kmskeys._keyutils_cffi",
    HELPERS.replace("@BUILD_STAMP@", BUILD_STAMP),
    libraries=["keyutils"],
    include_dirs=["kmskeys"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
