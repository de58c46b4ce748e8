/* kmskeys/_hitpath_keys.h: the key calls of the hit-path extension (kmskeys/_hitpath.c), its
 * one includer: the three system calls it makes itself, this thread's memory of the serials
 * it checked in the last second, the owner check, and a payload read into a wiped buffer.
 * Included once, after Python.h, <linux/keyctl.h>, "_wipe.h" and "contract.h". */
#ifndef KMSKEYS_HITPATH_KEYS_H
#define KMSKEYS_HITPATH_KEYS_H

/* The `user` key type holds at most 32767 bytes (kmskeys.contract.USER_PAYLOAD_MAX). */
#define PAYLOAD_MAX KMSKEYS_USER_PAYLOAD_MAX
/* A description and its NUL, plus the "type;uid;gid;perm;" head. */
#define DESCRIBE_MAX (KMSKEYS_DESCRIPTION_MAX + 1 + 64)
#define RECENT 16

/* The three calls of the hit paths, as the system calls libkeyutils' wrappers make
 * (request_key(2), keyctl(2) KEYCTL_DESCRIBE and KEYCTL_READ), so that this extension links no
 * library: every process that imports kmskeys loads it, and a library costs a fresh process
 * (a CGI request) a lookup, an open and its mappings. The rest of the binding is libkeyutils'
 * (the cffi module). */
typedef int32_t key_serial_t;

static key_serial_t request_key(const char *type, const char *desc, const char *callout,
                                key_serial_t dest)
{
    return (key_serial_t)syscall(__NR_request_key, type, desc, callout, dest);
}

static long keyctl_describe(key_serial_t id, char *buffer, size_t buflen)
{
    return syscall(__NR_keyctl, KEYCTL_DESCRIBE, id, buffer, buflen, 0);
}

static long keyctl_read(key_serial_t id, char *buffer, size_t buflen)
{
    return syscall(__NR_keyctl, KEYCTL_READ, id, buffer, buflen, 0);
}
#define RECENT_NS 1000000000LL

static __thread struct {
    key_serial_t serial;
    uid_t fsuid;
    long long checked_ns;
} recent[RECENT];
static __thread unsigned recent_next;

static long long now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void remember(key_serial_t serial, uid_t fsuid)
{
    unsigned i;

    for (i = 0; i < RECENT; i++)
        if (recent[i].serial == serial)
            break;
    if (i == RECENT) {
        i = recent_next;
        recent_next = (recent_next + 1) % RECENT;
    }
    recent[i].serial = serial;
    recent[i].fsuid = fsuid;
    recent[i].checked_ns = now_ns();
}

static void forget(key_serial_t serial)
{
    unsigned i;

    for (i = 0; i < RECENT; i++)
        if (recent[i].serial == serial)
            recent[i].serial = 0;
}

/* The owner uid of `id`, from keyctl_describe's "type;uid;gid;perm;description", or -1.
 * keyctl_describe copies nothing into a buffer too small for the whole string. */
static long long owner_of(key_serial_t id)
{
    char d[DESCRIBE_MAX];
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

/* Most secrets are passwords and tokens: a first read asks for this many bytes. The kernel
 * copies a key's payload through a buffer of the size asked for when that is at most a page,
 * and asks the key for its size first (a second pass) when it is more (keyctl_read_key). */
#define READ_GUESS 1024

static PyObject *payload_of(key_serial_t serial, int *failed)
{
    char buf[PAYLOAD_MAX + 1];
    long n;
    size_t dirty; /* how much of buf a read has written: all of it is wiped */
    PyObject *payload;

    n = keyctl_read(serial, buf, READ_GUESS);
    /* keyctl_read returns the payload's whole size even when the buffer is smaller, and copies
     * what fits. */
    dirty = n <= 0 ? 0 : n < READ_GUESS ? (size_t)n : READ_GUESS;
    if (n > READ_GUESS && n <= PAYLOAD_MAX) {
        n = keyctl_read(serial, buf, sizeof(buf));
        if (n > 0 && (size_t)n > dirty)
            dirty = (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf);
    }
    if (n < 0 || n > PAYLOAD_MAX) {
        *failed = n < 0 ? errno : EMSGSIZE;
        kmsk_wipe(buf, dirty);
        return NULL;
    }
    payload = PyBytes_FromStringAndSize(buf, n);
    kmsk_wipe(buf, dirty);
    *failed = 0;
    return payload;
}

/* Whether this thread checked `serial` for fsuid `me` less than a second ago. */
static int checked_recently(key_serial_t serial, uid_t me)
{
    long long now = now_ns();
    unsigned i;

    for (i = 0; i < RECENT; i++)
        if (recent[i].serial == serial)
            return recent[i].fsuid == me && now - recent[i].checked_ns < RECENT_NS;
    return 0;
}

/* The owner check of the safe tier: 1 if `id` is owned by `me` (remembered for a second);
 * 0 if not, with `*owner` set (-1: its permissions hide it); -1 with errno set if the key
 * cannot be described for another reason (revoked, expired, gone). */
static int owned_by(key_serial_t id, uid_t me, long long *owner)
{
    if (checked_recently(id, me))
        return 1;
    errno = 0;
    *owner = owner_of(id);
    if (*owner < 0 && errno != 0 && errno != EACCES) {
        forget(id);
        return -1;
    }
    if (*owner != (long long)me) {
        forget(id);
        return 0;
    }
    remember(id, me);
    return 1;
}

#endif
