/*
 * kmskeys-gate: the program /sbin/request-key runs first for a kmskeys description.
 *
 * Every miss of every local user starts a root process. The Python handler costs about 10 MiB
 * and tens of milliseconds of CPU before it can even look at the requester's per-uid limit, so
 * one uid firing hundreds of concurrent upcalls would cost the host gigabytes and starve every
 * other user's misses. This program takes one of the requesting uid's slots first (an flock(2)
 * on the same state_dir files as resolver/limits.py; a subordinate uid's are its range owner's,
 * gate_subuid.c). With every slot taken it rejects the key EAGAIN and logs one line, as the
 * handler would, at the cost of one small C process that imports nothing.
 *
 * Holding the slot, it hands the request to the resolver daemon when one is configured
 * (gate_daemon.c: `kmskeys-resolver serve` resolves it in a warm process and says how to
 * answer) and answers the key itself, so that no interpreter starts on a miss. Without a
 * daemon, or when the daemon does not accept the request within DAEMON_WAIT_MS, it execs the
 * handler (today's cold path) holding the slot.
 *
 * It is only a shortcut in front of the handler: on anything unexpected (an unsafe state_dir, an
 * fd it cannot open) it execs the handler without a slot, and the handler applies its own
 * checks and answers with its own error.
 *
 * usage (written by `kmskeys-resolver install`, one request-key.conf line):
 *   kmskeys-gate STATE_DIR SLOTS NEGATIVE_TTL SYSLOG_SOCKET FACILITY DAEMON_SOCKET DAEMON_WAIT_MS
 *                SUBUIDS %k %u %T %P %S -- PROGRAM ARG...
 *     DAEMON_SOCKET is `-` for none; SUBUIDS is 1 (aggregate_subuids) or 0; %T %P %S, the
 *     requester's keyrings, go to the daemon (the identification's, issue 24). A rule written
 *     before the daemon (`FACILITY %k %u --`) still works: no daemon, no aggregation.
 *   kmskeys-gate --stamp          (prints the build stamp: `kmskeys-resolver check` compares it)
 *
 * Every fact it shares with the Python side (the slot files and fd variable, the log line's
 * ident, field rules and words, the errnos, the wire to the daemon) comes from
 * kmskeys/contract.h, which scripts/generate.py writes from kmskeys/contract.py and the
 * resolver; the build stamp in it is passed to the handler and the daemon, which refuse a gate
 * built from other sources.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/keyctl.h>

#include "contract.h"
#include "gate.h"

#define MAX_FIELD KMSKEYS_LOG_FIELD_MAX
static const char SAFE[] = KMSKEYS_LOG_SAFE;

static int parse_long(const char *text, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

static int parse_args(int argc, char **argv, struct args *a)
{
    /* The settings, then the macros, then `--`: 5 settings and `%k %u` in rules written before
     * the daemon, 8 settings and `%k %u %T %P %S` since. */
    int old = argc > 9 && strcmp(argv[8], "--") == 0;
    int settings = old ? 5 : 8, end = old ? 8 : 14;
    long aggregate = 0;
    if (argc < end + 2 || strcmp(argv[end], "--") != 0)
        return -1;
    a->state_dir = argv[1];
    a->syslog_socket = argv[4];
    a->daemon_socket = NULL;
    a->daemon_wait_ms = 0;
    a->keyrings[0] = a->keyrings[1] = a->keyrings[2] = 0;
    a->program = &argv[end + 1];
    if (parse_long(argv[2], 1, KMSKEYS_MAX_SLOTS, &a->slots) ||
        parse_long(argv[3], 1, KMSKEYS_MAX_NEGATIVE_TTL, &a->negative_ttl) ||
        parse_long(argv[5], 0, 23, &a->facility) ||
        parse_long(argv[settings + 1], 1, INT_MAX, &a->key) ||
        parse_long(argv[settings + 2], 0, UINT_MAX - 1L, &a->uid))
        return -1;
    /* request-key passes 0 for a keyring the requester does not have. */
    for (int i = 0; !old && i < 3; i++)
        if (parse_long(argv[settings + 3 + i], 0, INT_MAX, &a->keyrings[i]))
            return -1;
    if (!old) {
        if (strcmp(argv[6], "-") != 0)
            a->daemon_socket = argv[6];
        if (parse_long(argv[7], 1, KMSKEYS_DAEMON_WAIT_MAX_MS, &a->daemon_wait_ms) ||
            parse_long(argv[8], 0, 1, &aggregate))
            return -1;
        if (a->daemon_socket && a->daemon_socket[0] != '/')
            return -1;
    }
    a->aggregate_subuids = (int)aggregate;
    return a->state_dir[0] == '/' && a->program[0][0] == '/' ? 0 : -1;
}

long monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* kmskeys/trust.py unsafe_reason, plus the state_dir's own rule: root-only. */
int trusted(int fd, int private_mode)
{
    struct stat st;
    if (fstat(fd, &st) || st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH)))
        return 0;
    return !private_mode || !(st.st_mode & (S_IRWXG | S_IRWXO));
}

int open_state_dir(const struct args *a)
{
    if (mkdir(a->state_dir, 0700) && errno != EEXIST)
        return -1;
    int dir = open(a->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    if (dir >= 0 && !trusted(dir, 1)) {
        close(dir);
        return -1;
    }
    return dir;
}

/* An fd holding one of `charged`'s slots; -1 if every slot is taken; -2 if something is off. */
static int take_slot(const struct args *a, long charged)
{
    int dir = open_state_dir(a);
    if (dir < 0)
        return -2;
    int result = -1;
    for (long index = 0; index < a->slots; index++) {
        char name[64];
        snprintf(name, sizeof name, KMSKEYS_SLOT_PREFIX "%ld-%ld", charged, index);
        int fd = openat(dir, name, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (fd < 0 || !trusted(fd, 0)) {
            if (fd >= 0)
                close(fd);
            result = -2;
            break;
        }
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
            result = fd;
            break;
        }
        close(fd);
        if (errno != EWOULDBLOCK) {
            result = -2;
            break;
        }
    }
    close(dir);
    return result;
}

/* Append `text` to buf as resolver/log.py field() renders it: bare when plain, else quoted. */
static void append_field(char *buf, size_t size, const char *text)
{
    size_t len = strnlen(text, MAX_FIELD + 1), used = strlen(buf);
    int truncated = len > MAX_FIELD;
    if (truncated)
        len = MAX_FIELD;
    int plain = len > 0 && strspn(text, SAFE) >= len;
    if (plain) {
        snprintf(buf + used, size - used, "%.*s%s", (int)len, text, truncated ? "..." : "");
        return;
    }
    used += (size_t)snprintf(buf + used, size - used, "\"");
    for (size_t i = 0; i < len && used + 8 < size; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch < 0x20 || ch >= 0x7f || ch == '"' || ch == '\\')
            used += (size_t)snprintf(buf + used, size - used, "\\x%02x", ch);
        else
            buf[used++] = (char)ch, buf[used] = '\0';
    }
    snprintf(buf + used, size - used, "%s\"", truncated ? "..." : "");
}

/* The key's name as the handler logs it (after its prefix), or "?". Read while the gate holds
 * the authority, which lets it describe a key of any uid: once the key is answered, a key of
 * another uid is no longer root's to describe. The first call keeps it for the later ones. */
static const char *key_name(const struct args *a)
{
    static char described[KMSKEYS_DESCRIPTION_MAX + 1 + 64];
    static const char *name;
    if (name)
        return name;
    /* "type;uid;gid;perm;description" */
    long n = syscall(SYS_keyctl, KEYCTL_DESCRIBE, a->key, described, sizeof described - 1);
    const char *description = described;
    for (int field = 0; n > 0 && field < 4 && description; field++)
        description = strchr(description, ';') ? strchr(description, ';') + 1 : NULL;
    const char *colon = n > 0 && description ? strchr(description, ':') : NULL;
    name = colon ? colon + 1 : "?";
    return name;
}

/* One RFC 3164 line to the syslog socket, as resolver/log.py SyslogWriter sends it:
 * `uid=U name=N key=K outcome=O [errno=E] reason=R`. */
void log_line(const struct args *a, int severity, const char *outcome, const char *errno_name,
              const char *reason)
{
    char message[1024] = "";
    snprintf(message, sizeof message, "uid=%ld name=", a->uid);
    append_field(message, sizeof message, key_name(a));
    snprintf(message + strlen(message), sizeof message - strlen(message), " key=%ld outcome=%s",
             a->key, outcome);
    if (errno_name)
        snprintf(message + strlen(message), sizeof message - strlen(message), " errno=%s",
                 errno_name);
    snprintf(message + strlen(message), sizeof message - strlen(message), " reason=");
    append_field(message, sizeof message, reason);

    char stamp[32], line[1280];
    time_t now = time(NULL);
    struct tm tm;
    strftime(stamp, sizeof stamp, "%b %d %H:%M:%S", localtime_r(&now, &tm));
    int len = snprintf(line, sizeof line, "<%ld>%s %s[%d]: %s", a->facility * 8 + severity, stamp,
                       KMSKEYS_LOG_IDENT, (int)getpid(), message);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(a->syslog_socket) >= sizeof addr.sun_path)
        return;
    strcpy(addr.sun_path, a->syslog_socket);
    /* Never wait for a slow syslog daemon: the requester stays blocked until this exits. */
    int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) || send(sock, line, (size_t)len, 0) < 0)
        dprintf(STDERR_FILENO, "%s[%d]: %s\n", KMSKEYS_LOG_IDENT, (int)getpid(), message);
    close(sock);
}

int reject_key(const struct args *a, long ttl, int error)
{
    /* request-key assumed the authority already; assuming it again is harmless. */
    syscall(SYS_keyctl, KEYCTL_ASSUME_AUTHORITY, a->key);
    key_name(a); /* for the line that follows: after the reject it may not be readable */
    return (int)syscall(SYS_keyctl, KEYCTL_REJECT, a->key, (unsigned long)ttl, error, 0);
}

static void reject_busy(const struct args *a, long charged)
{
    char reason[256];
    int len = snprintf(reason, sizeof reason,
                       "uid %ld already has %ld requests being resolved (max_concurrent_per_uid)",
                       charged, a->slots);
    if (charged != a->uid)
        snprintf(reason + len, sizeof reason - (size_t)len,
                 "; uid %ld is charged to it, the owner of its " KMSKEYS_SUBUID_FILE " range", a->uid);
    reject_key(a, a->negative_ttl, KMSKEYS_ERRNO_UNAVAILABLE);
    log_line(a, KMSKEYS_LOG_ERR, KMSKEYS_OUTCOME_UNAVAILABLE, KMSKEYS_ERRNO_UNAVAILABLE_NAME, reason);
}

/* An unsafe /etc/subuid turns aggregation off: say so, at most once a minute per state_dir. */
static void warn_subuids(const struct args *a, const char *problem)
{
    int dir = open_state_dir(a);
    if (dir < 0)
        return;
    /* The note's mtime is when the last line was written; a note made now says so at once. */
    int fresh = 1, flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW;
    int fd = openat(dir, KMSKEYS_SUBUID_WARNED, flags | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno == EEXIST) {
        fresh = 0;
        fd = openat(dir, KMSKEYS_SUBUID_WARNED, flags);
    }
    close(dir);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !trusted(fd, 0) || (!fresh && time(NULL) - st.st_mtime < 60) ||
        futimens(fd, NULL)) {
        if (fd >= 0)
            close(fd);
        return;
    }
    close(fd);
    char reason[PATH_MAX + 200];
    snprintf(reason, sizeof reason, "aggregate_subuids is off until this is fixed: %s", problem);
    log_line(a, KMSKEYS_LOG_WARNING, "warning", NULL, reason);
}

int main(int argc, char **argv)
{
    struct args a;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    a.started_us = (long long)start.tv_sec * 1000000 + start.tv_nsec / 1000;
    if (argc == 2 && strcmp(argv[1], "--stamp") == 0) {
        printf("%s\n", KMSKEYS_BUILD_STAMP);
        return 0;
    }
    if (parse_args(argc, argv, &a)) {
        dprintf(STDERR_FILENO, "usage: kmskeys-gate STATE_DIR SLOTS NEGATIVE_TTL SYSLOG_SOCKET FACILITY "
                               "DAEMON_SOCKET DAEMON_WAIT_MS SUBUIDS KEY UID THREAD PROCESS SESSION "
                               "-- PROGRAM ARG...\n");
        return 2;
    }
    long charged = a.uid;
    if (a.aggregate_subuids) {
        char problem[PATH_MAX + 100];
        charged = charged_uid(a.uid, problem, sizeof problem);
        if (problem[0])
            warn_subuids(&a, problem);
    }
    int slot = take_slot(&a, charged);
    if (slot == -1) {
        reject_busy(&a, charged);
        return 1;
    }
    if (slot >= 0 && a.daemon_socket && ask_daemon(&a, slot) == DAEMON_ANSWERED)
        return 0;
    /* The handler refuses a gate built from other sources than itself (kmskeys/contract.h). */
    if (setenv(KMSKEYS_GATE_STAMP_ENV, KMSKEYS_BUILD_STAMP, 1))
        return 1;
    if (slot >= 0) {
        /* The handler inherits the locked fd and holds the slot until it and its worker exit. */
        char value[16];
        snprintf(value, sizeof value, "%d", slot);
        if (fcntl(slot, F_SETFD, 0) || setenv(KMSKEYS_SLOT_FD_ENV, value, 1))
            return 1;
    }
    execv(a.program[0], a.program);
    /* No handler to answer: rather EAGAIN now than the kernel's 60 s ENOKEY negation. */
    char reason[PATH_MAX + 160];
    snprintf(reason, sizeof reason, "cannot run the handler %s: %s", a.program[0], strerror(errno));
    reject_key(&a, a.negative_ttl, KMSKEYS_ERRNO_UNAVAILABLE);
    log_line(&a, KMSKEYS_LOG_ERR, KMSKEYS_OUTCOME_UNAVAILABLE, KMSKEYS_ERRNO_UNAVAILABLE_NAME, reason);
    return 1;
}
