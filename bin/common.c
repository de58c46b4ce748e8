/*
 * What the two programs of the `kmskeys` command share (bin/kmskeys.c, bin/unprotect.c): the
 * way to the Python CLI, the name grammar, the kernel calls and the one way a cached key is read.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/keyctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_wipe.h"
#include "kmskeys.h"
#include "_names.h"

/* The Python CLI: bin/kmskeys-py, installed beside these programs (setup.py). */
#define PYTHON_CLI "kmskeys-py"
/* A description is at most 4095 bytes, plus keyctl_describe's "type;uid;gid;perm;" head. */
#define DESCRIBE_MAX (4096 + 64)

/* The program `name` beside this one: /proc/self/exe is this program's file, however it was
 * found (PATH, a symlink to it). 0, or -1 (path too long, no /proc). */
static int beside(const char *name, char *path, size_t size)
{
    char self[PATH_MAX];
    ssize_t n;
    char *slash;

    n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return -1;
    self[n] = '\0';
    slash = strrchr(self, '/');
    if (slash == NULL)
        return -1;
    slash[1] = '\0';
    return snprintf(path, size, "%s%s", self, name) < (int)size ? 0 : -1;
}

void exec_beside(const char *name, char **argv)
{
    static char path[PATH_MAX];
    char *self = argv[0];

    if (beside(name, path, sizeof(path)) != 0)
        return;
    argv[0] = path;
    execv(path, argv);
    argv[0] = self;
}

void python(char **argv)
{
    exec_beside(PYTHON_CLI, argv);
    fprintf(stderr, "kmskeys: cannot run %s beside this program: %s\n", PYTHON_CLI,
            strerror(errno));
    exit(1);
}

/* kmskeys.names.validate_prefix and validate_name: kmskeys/_names.h, the one C reading of the
 * grammar (the hit path's is the same). */
int valid_prefix(const char *prefix)
{
    return kmsk_valid_prefix(prefix, strlen(prefix));
}

int valid_name(const char *name)
{
    return kmsk_valid_name(name, strlen(name));
}

/* kmskeys.cli._normal_path: what str(pathlib.Path(p)) leaves as it is. */
int normal_path(const char *path)
{
    const char *part = path[0] == '/' ? path + 1 : path;

    for (;;) {
        const char *end = strchrnul(part, '/');
        size_t len = (size_t)(end - part);
        if (len == 0 || (len == 1 && part[0] == '.'))
            return 0;
        if (*end == '\0')
            return 1;
        part = end + 1;
    }
}

key_serial_t kmsk_request_key(const char *type, const char *desc, const char *callout,
                              key_serial_t dest)
{
    return (key_serial_t)syscall(SYS_request_key, type, desc, callout, dest);
}

long kmsk_keyctl(int op, unsigned long a, unsigned long b, unsigned long c, unsigned long d)
{
    return syscall(SYS_keyctl, op, a, b, c, d);
}

/* The owner uid of `id`, from keyctl_describe's "type;uid;gid;perm;description", or -1.
 * keyctl_describe copies nothing into a buffer too small for the whole string. */
static long long owner_of(key_serial_t id)
{
    char d[DESCRIBE_MAX];
    long n;
    char *end;
    unsigned long uid;

    n = kmsk_keyctl(KEYCTL_DESCRIBE, (unsigned long)id, (unsigned long)d, sizeof(d), 0);
    if (n < 0 || (size_t)n > sizeof(d))
        return -1;
    d[sizeof(d) - 1] = '\0';
    end = strchr(d, ';');
    if (end == NULL)
        return -1;
    errno = 0;
    uid = strtoul(end + 1, &end, 10);
    return *end == ';' && errno == 0 ? (long long)uid : -1;
}

long cached_payload(const char *desc, key_serial_t dest, char *payload)
{
    key_serial_t id;
    long n;

    /* No callout: a cached key is found exactly as with one, and a miss never upcalls here. */
    id = kmsk_request_key("user", desc, NULL, dest);
    if (id < 0)
        return -1;
    /* The kernel checks permissions and sets ownership by fsuid; setfsuid(-1) returns it. */
    if (owner_of(id) != (long long)(uid_t)setfsuid((uid_t)-1))
        return -1;
    /* The payload is about to be in this process: no core dump of it. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    n = kmsk_keyctl(KEYCTL_READ, (unsigned long)id, (unsigned long)payload, PAYLOAD_MAX + 1, 0);
    if (n < 0 || n > PAYLOAD_MAX) {
        kmsk_wipe(payload, PAYLOAD_MAX + 1);
        return -1;
    }
    return n;
}
