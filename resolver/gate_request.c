/*
 * The gate's REQUEST to the resolver daemon (resolver/wire.py GateRequest): what the kernel says
 * of the request, read while the gate holds the authority, in bounded buffers; and its VIEW
 * (resolver/wire.py GateView), the authority's view of the request with the lines of /proc/keys,
 * only when the daemon asks for it (a request whose requester must be identified): the kernel
 * generates /proc/keys by walking every key on the host. The gate judges nothing of either: the
 * daemon re-validates every field with the handler's own code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/keyctl.h>

#include "contract.h"
#include "gate.h"

/* The lines of /proc/keys that start with the authorization key's serial, without their
 * newlines, in order, but for lines over KMSKEYS_AUTH_LINE_MAX bytes (only a description makes
 * one so long) and past KMSKEYS_AUTH_LINES_MAX + 1 (enough to refuse): resolver/requester.py
 * auth_lines, whose rules the daemon applies. Read without the assumed authority (with it, keys
 * only the requester possesses would show too) and as an fsuid and fsgid that own no keys: the
 * authorization key shows through possession, root's own keys are not read. 0, or -1 when the
 * authority cannot be taken back. */
static int proc_keys(const struct args *a, long auth, struct buffer *b, uint32_t *seen, uint32_t *flags)
{
    char head[16], line[KMSKEYS_AUTH_LINE_MAX + 1], chunk[8192];
    size_t head_len = (size_t)snprintf(head, sizeof head, "%08lx ", auth), pos = 0, kept = 0;
    int match = 1, too_long = 0;
    size_t start = b->used;
    if (put_u32(b, 0))
        return -1;
    syscall(SYS_keyctl, KEYCTL_ASSUME_AUTHORITY, 0);
    int old_uid = setfsuid(KMSKEYS_PROC_KEYS_READER_ID), old_gid = setfsgid(KMSKEYS_PROC_KEYS_READER_ID);
    int fd = open("/proc/keys", O_RDONLY | O_CLOEXEC);
    size_t total = 0;
    ssize_t n;
    while (fd >= 0 && (n = read(fd, chunk, sizeof chunk)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            char ch = chunk[i];
            if (ch == '\n') {
                if (pos >= head_len && match && !too_long) {
                    (*seen)++;
                    /* Within the wire's bound: at most AUTH_LINES_MAX + 1 lines, each short. */
                    if (kept <= KMSKEYS_AUTH_LINES_MAX) {
                        if (kept++ > 0)
                            put_raw(b, "\n", 1);
                        put_raw(b, line, pos);
                    }
                }
                pos = 0, match = 1, too_long = 0;
                continue;
            }
            if (pos < head_len)
                match = match && ch == head[pos];
            if (pos < sizeof line - 1)
                line[pos] = ch;
            else
                too_long = 1;
            pos++;
        }
        total += (size_t)n;
        if (total > KMSKEYS_WIRE_PROC_KEYS_SCAN_MAX) {
            *flags |= KMSKEYS_WIRE_FLAG_PROC_KEYS_CUT;
            break;
        }
    }
    if (fd >= 0)
        close(fd);
    setfsgid((gid_t)old_gid);
    setfsuid((uid_t)old_uid);
    put32(b->data + start, (uint32_t)(b->used - start - 4));
    return syscall(SYS_keyctl, KEYCTL_ASSUME_AUTHORITY, a->key) < 0 ? -1 : 0;
}

/* The requester's destination keyring, and its `type;uid;gid;perm;description`, as the holder of
 * the authority sees them (resolver/requester.py requestor_keyring): 0 and "" if there is none. */
static int destination(struct buffer *b, uint32_t *dest)
{
    char described[KMSKEYS_DESCRIPTION_MAX + 64];
    long serial = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_REQUESTOR_KEYRING, 0);
    long n = serial > 0 ? syscall(SYS_keyctl, KEYCTL_DESCRIBE, KEY_SPEC_REQUESTOR_KEYRING, described,
                                  sizeof described)
                        : -1;
    if (n <= 0 || (size_t)n > sizeof described) {
        *dest = 0;
        return put_string(b, "", 0, 0);
    }
    *dest = (uint32_t)serial;
    return put_string(b, described, strnlen(described, (size_t)n), sizeof described);
}

/* The config the rule's handler would read (`PROGRAM handle --config PATH ...`, as install writes
 * it), or "" for its default: a daemon serves the misses of its own config only. */
static const char *config_path(const struct args *a)
{
    char **p = a->program;
    if (p[0] && p[1] && strcmp(p[1], "handle") == 0 && p[2] && strcmp(p[2], "--config") == 0 && p[3])
        return p[3];
    return "";
}

/* REQUEST (resolver/wire.py GateRequest) for our key, and the authorization key's serial in
 * `auth`: 0, or -1 if the kernel says no. */
int build_request(const struct args *a, struct buffer *b, long *auth)
{
    /* "type;uid;gid;perm;description", as the kernel holds them. */
    char described[KMSKEYS_DESCRIPTION_MAX + 64];
    long n = syscall(SYS_keyctl, KEYCTL_DESCRIBE, a->key, described, sizeof described);
    if (n <= 0 || (size_t)n > sizeof described)
        return -1;
    described[sizeof described - 1] = '\0';
    char *field[4], *rest = described;
    for (int i = 0; i < 4; i++) {
        char *semi = strchr(rest, ';');
        if (semi == NULL)
            return -1;
        *semi = '\0';
        field[i] = rest, rest = semi + 1;
    }
    char *end;
    errno = 0;
    unsigned long uid = strtoul(field[1], &end, 10), gid;
    if (errno || *end || uid != (unsigned long)a->uid || strcmp(field[0], "user") != 0)
        return -1;
    gid = strtoul(field[2], &end, 10);
    if (errno || *end || gid > UINT32_MAX)
        return -1;
    /* After assuming authority, the authorization key reads as the callout. */
    unsigned char callout[KMSKEYS_CALLOUT_MAX + 1];
    long callout_len = syscall(SYS_keyctl, KEYCTL_READ, KEY_SPEC_REQKEY_AUTH_KEY, callout, sizeof callout);
    *auth = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_REQKEY_AUTH_KEY, 0);
    if (callout_len < 0 || callout_len > KMSKEYS_CALLOUT_MAX || *auth <= 0)
        return -1;
    b->used = HEADER_SIZE;
    const char *config = config_path(a);
    if (put_u32(b, (uint32_t)a->key) || put_u32(b, (uint32_t)a->uid) || put_u32(b, (uint32_t)gid) ||
        put_u32(b, (uint32_t)*auth) || put_u64(b, (unsigned long long)a->started_us) ||
        put_u32(b, (uint32_t)a->keyrings[0]) || put_u32(b, (uint32_t)a->keyrings[1]) ||
        put_u32(b, (uint32_t)a->keyrings[2]) ||
        put_string(b, KMSKEYS_BUILD_STAMP, strlen(KMSKEYS_BUILD_STAMP), KMSKEYS_WIRE_STAMP_MAX) ||
        put_string(b, config, strlen(config), KMSKEYS_WIRE_CONFIG_PATH_MAX) ||
        put_string(b, rest, strlen(rest), KMSKEYS_DESCRIPTION_MAX) ||
        put_string(b, callout, (size_t)callout_len, KMSKEYS_CALLOUT_MAX))
        return -1;
    put_header(b->data, KMSKEYS_WIRE_REQUEST, b->used - HEADER_SIZE);
    return 0;
}

/* VIEW (resolver/wire.py GateView) of the request whose authorization key is `auth`: 0, or -1
 * when the authority cannot be taken back (the gate must not answer then). */
int build_view(const struct args *a, long auth, struct buffer *b)
{
    uint32_t seen = 0, flags = 0, dest = 0;
    b->used = HEADER_SIZE;
    /* flags, seen and dest are filled in once the strings are written */
    if (put_u32(b, 0) || put_u32(b, 0) || put_u32(b, 0) || destination(b, &dest) ||
        proc_keys(a, auth, b, &seen, &flags))
        return -1;
    put32(b->data + HEADER_SIZE, flags);
    put32(b->data + HEADER_SIZE + 4, seen);
    put32(b->data + HEADER_SIZE + 8, dest);
    put_header(b->data, KMSKEYS_WIRE_VIEW, b->used - HEADER_SIZE);
    return 0;
}
