"""cffi builder for libkeyutils, run at install time only.

The cdef below is copied from <keyutils.h> (keyutils 1.6); it is compiled out of line in API mode so
that importing kmskeys never parses C and never needs pycparser. Two small C helpers sit beside
it (HELPERS): the client's hit path in one FFI crossing, and disabling core dumps.
"""

from cffi import FFI

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

struct kmsk_fetched { key_serial_t serial; long long owner; long long fsuid; };
long kmsk_fetch(const char *desc, const char *callout, key_serial_t search_ring,
                key_serial_t dest, char *buf, size_t buflen, struct kmsk_fetched *out);
int kmsk_disable_core_dumps(void);
int setfsuid(uid_t fsuid);

int keyctl_describe_alloc(key_serial_t id, char **_buffer);

void free(void *ptr);
void explicit_bzero(void *s, size_t n);
"""

HELPERS = r"""
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <keyutils.h>

struct kmsk_fetched { key_serial_t serial; long long owner; long long fsuid; };

/* Serials this thread has seen owned by its fsuid. A key's owner changes only through
 * keyctl_chown, which needs CAP_SYS_ADMIN; the fsuid is part of the entry, so a process that
 * changes identity checks again. */
#define KMSK_OWNED 16
static __thread struct { key_serial_t serial; uid_t fsuid; } kmsk_owned[KMSK_OWNED];
static __thread unsigned kmsk_owned_next;

/* The owner uid of `id` from keyctl_describe's "type;uid;gid;perm;description", or -1. */
static long long kmsk_owner(key_serial_t id)
{
    /* A description is at most 4095 bytes; keyctl_describe copies nothing at all into a buffer
     * too small for the whole string (and returns the size it needs). */
    char d[4096 + 64];
    long n;
    char *end;
    unsigned long uid;

    n = keyctl_describe(id, d, sizeof(d));
    if (n < 0 || (size_t)n > sizeof(d))
        return -1;
    d[sizeof(d) - 1] = '\0';
    end = strchr(d, ';');
    if (end == NULL)
        return -1;
    uid = strtoul(end + 1, &end, 10);
    return *end == ';' ? (long long)uid : -1;
}

/* The hit path of kmskeys.get_secret: find (or have the kernel construct) the `user` key
 * `desc`, check that the caller's fsuid owns it, and read its payload into buf.
 * Returns the payload size (larger than buflen: read again with a bigger buffer), -1 with
 * errno set, or -2 for a key this fsuid does not own: nothing was read, out->owner is the
 * owner's uid (-1: its permissions hide it). out->serial is the key found. */
long kmsk_fetch(const char *desc, const char *callout, key_serial_t search_ring,
        key_serial_t dest, char *buf, size_t buflen, struct kmsk_fetched *out)
{
    key_serial_t id = -1;
    uid_t me;
    unsigned i;

    if (search_ring != 0) {
        id = keyctl_search(search_ring, "user", desc, 0);
        if (id < 0 && errno != ENOKEY)
            return -1;
    }
    if (id < 0) {
        id = request_key("user", desc, callout, dest);
        if (id < 0)
            return -1;
    }
    out->serial = id;
    /* The kernel checks key permissions and sets ownership by fsuid; setfsuid(-1) changes
     * nothing and returns it. */
    me = (uid_t)setfsuid((uid_t)-1);
    out->fsuid = me;
    for (i = 0; i < KMSK_OWNED; i++)
        if (kmsk_owned[i].serial == id && kmsk_owned[i].fsuid == me)
            break;
    if (i == KMSK_OWNED) {
        long long owner = kmsk_owner(id);

        if (owner != (long long)me) {
            out->owner = owner;
            return -2;
        }
        kmsk_owned[kmsk_owned_next].serial = id;
        kmsk_owned[kmsk_owned_next].fsuid = me;
        kmsk_owned_next = (kmsk_owned_next + 1) % KMSK_OWNED;
    }
    return keyctl_read(id, buf, buflen);
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kmskeys._keyutils_cffi", HELPERS, libraries=["keyutils"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
