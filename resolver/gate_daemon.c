/*
 * The gate's half of the resolver daemon's wire (resolver/wire.py has the format): hand the
 * request to `kmskeys-resolver serve`, then answer the key as it says, exactly as
 * resolver/answer.py would (chown, setperm, set_timeout, instantiate; a full quota is EDQUOT,
 * any other failure EKEYREJECTED; or reject with the errno and ttl given, the refused key chowned
 * and masked first as a refusal's), and report what the kernel said, so that the daemon writes
 * the request's one log line. Right before it answers,
 * after the key's owner and mask are set, it reads the request's flush tokens again and
 * rejects EAGAIN if root flushed the name since the daemon read them (kmskeys/flushepoch.py).
 *
 * Trust: the daemon's socket must be root's, in a root-owned directory nobody else may write,
 * and its listener uid 0 (SO_PEERCRED); otherwise nothing it could say is believed and the
 * handler runs. Every field of its answer is checked against the request and the wire's
 * bounds before the key is touched. Anything else that goes wrong before an answer arrives
 * (no daemon, not accepted within DAEMON_WAIT_MS, the daemon gone) runs the handler too, which
 * has what is left of the deadline: a dead daemon costs latency, never a wrong answer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/keyctl.h>

#include "_wipe.h"
#include "contract.h"
#include "gate.h"

enum { READ_OK = 0, READ_TIMEOUT = -1, READ_CLOSED = -2, READ_BAD = -3 };

struct outcome {
    int32_t error;
    uint32_t uid, gid, perm, negative_perm, timeout, negative_ttl, length, tokens;
    int32_t keyring;
    const unsigned char *payload;
    const unsigned char *token_data; /* `tokens` flush tokens, checked by parse_tokens */
};

/* >0 when `fd` is ready for `events` before `deadline` (monotonic ms), 0 on timeout. */
static int wait_fd(int fd, short events, long deadline)
{
    for (;;) {
        long left = deadline - monotonic_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, (int)(left > 60000 ? 60000 : left));
        if (n > 0)
            return 1;
        if (n < 0 && errno != EINTR)
            return -1;
    }
}

/* 0 if every directory from / down to `dir` (links resolved) is root's and writable by nobody
 * else, or sticky on the way (then nobody else can rename the root-owned entry below it away);
 * -1 if it does not exist; -2 with `why` set otherwise. */
static int trusted_dir(const char *dir, char *why, size_t size)
{
    char real[PATH_MAX];
    if (realpath(dir, real) == NULL)
        return -1;
    size_t len = strlen(real);
    for (size_t end = 1; end <= len; end++) {
        if (end < len && real[end] != '/')
            continue;
        char saved = real[end];
        real[end] = '\0';
        struct stat st;
        int bad = lstat(real, &st) || !S_ISDIR(st.st_mode) || st.st_uid != 0 ||
                  ((st.st_mode & (S_IWGRP | S_IWOTH)) && (end == len || !(st.st_mode & S_ISVTX)));
        if (bad) {
            snprintf(why, size, "daemon socket directory %.200s is not root's alone", real);
            return -2;
        }
        real[end] = saved;
    }
    return 0;
}

/* Connected to a daemon the kernel says is root's; -1 if none answers; -2 with `why` set if the
 * socket or its listener is not to be believed. */
static int connect_daemon(const char *path, char *why, size_t size)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof addr.sun_path)
        return -1;
    memcpy(addr.sun_path, path, len + 1);
    char dir[sizeof addr.sun_path];
    memcpy(dir, path, len + 1);
    char *slash = strrchr(dir, '/');
    slash[slash == dir ? 1 : 0] = '\0';
    /* Only root may have put a listener here: directories only root may change down to the
     * socket, and a socket of root's (resolver/daemon.py binds it 0600). */
    int trusted = trusted_dir(dir, why, size);
    if (trusted < 0)
        return trusted; /* -1, no such directory: no daemon, the normal fallback */
    struct stat st;
    if (lstat(path, &st))
        return -1; /* no daemon: the normal fallback */
    if (!S_ISSOCK(st.st_mode) || st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))) {
        snprintf(why, size, "daemon socket %s is not a socket of root's alone", path);
        return -2;
    }
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0)
        return -1;
    /* A unix socket connects at once or fails at once (EAGAIN: its backlog is full). */
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr)) {
        close(sock);
        return -1;
    }
    struct ucred cred;
    socklen_t cred_len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) || cred_len != sizeof cred) {
        close(sock);
        return -1;
    }
    if (cred.uid != 0) {
        /* A daemon not run by root could answer with any payload: never believed. */
        snprintf(why, size, "daemon socket %s is served by uid %ld, not root", path, (long)cred.uid);
        close(sock);
        return -2;
    }
    return sock;
}

/* Send all of `data`, the slot fd riding with its first byte (SCM_RIGHTS). */
static int send_all(int sock, const unsigned char *data, size_t len, int fd, long deadline)
{
    size_t sent = 0;
    while (sent < len) {
        struct iovec iov = {.iov_base = (void *)(data + sent), .iov_len = len - sent};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (fd >= 0 && sent == 0) {
            memset(&control, 0, sizeof control);
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof control.buf;
            struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
        }
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            if (wait_fd(sock, POLLOUT, deadline) <= 0)
                return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

static int read_exact(int sock, unsigned char *buf, size_t len, long deadline)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(sock, buf + got, len - got, 0);
        if (n > 0) {
            got += (size_t)n;
        } else if (n == 0) {
            return READ_CLOSED;
        } else if (errno == EAGAIN || errno == EINTR) {
            int ready = wait_fd(sock, POLLIN, deadline);
            if (ready <= 0)
                return ready == 0 ? READ_TIMEOUT : READ_CLOSED;
        } else {
            return READ_CLOSED;
        }
    }
    return READ_OK;
}

/* One message of type `type` whose body is at most `max` bytes, before `deadline`; with
 * `asked` non-NULL, a VIEW_ASK (no body) may come instead, and sets it. */
static int read_message(int sock, int type, unsigned char *body, size_t max, size_t *len, long deadline,
                        int *asked)
{
    unsigned char head[HEADER_SIZE];
    int r = read_exact(sock, head, sizeof head, deadline);
    if (r != READ_OK)
        return r;
    int version = head[4] << 8 | head[5], kind = head[6] << 8 | head[7];
    *len = get32(head + 8);
    if (memcmp(head, KMSKEYS_WIRE_MAGIC, 4) || version != KMSKEYS_WIRE_VERSION)
        return READ_BAD;
    if (kind == KMSKEYS_WIRE_DECLINED)
        return READ_CLOSED; /* the daemon will not take it: the handler will */
    if (asked && kind == KMSKEYS_WIRE_VIEW_ASK && *len == 0) {
        *asked = 1;
        return READ_OK;
    }
    if (kind != type || *len > max)
        return READ_BAD;
    return read_exact(sock, body, *len, deadline);
}

/* The VIEW the daemon asked for, sent before `deadline`: 0, or -1 if it could not be made or
 * sent (the daemon answers EAGAIN without it, or the gate gave up the authority). */
static int send_view(const struct args *a, int sock, long auth, long deadline)
{
    static unsigned char view[HEADER_SIZE + KMSKEYS_WIRE_VIEW_MAX];
    struct buffer b = {.data = view, .size = sizeof view};
    int failed = build_view(a, auth, &b) || send_all(sock, view, b.used, -1, deadline);
    kmsk_wipe(view, sizeof view);
    return failed ? -1 : 0;
}

static void send_small(int sock, int type, const unsigned char *body, size_t len)
{
    unsigned char message[HEADER_SIZE + KMSKEYS_WIRE_REPORT_SIZE];
    put_header(message, type, len);
    if (len)
        memcpy(message + HEADER_SIZE, body, len);
    send_all(sock, message, HEADER_SIZE + len, -1, monotonic_ms() + KMSKEYS_WIRE_REPORT_WAIT_MS);
}

/* The flush tokens after the payload (resolver/wire.py OUTCOME): exactly `count` of them in
 * `len` bytes, each a file name of [a-z0-9-] within its bound and a content within its bound,
 * or absent. 0 if they are. */
static int parse_tokens(const unsigned char *p, size_t len, uint32_t count)
{
    if (count > KMSKEYS_WIRE_TOKEN_FILES_MAX)
        return -1;
    for (uint32_t i = 0; i < count; i++) {
        if (len < 4)
            return -1;
        uint32_t name = get32(p);
        if (name < 1 || name > KMSKEYS_WIRE_TOKEN_FILE_NAME_MAX || len - 4 < name + 4)
            return -1;
        for (uint32_t j = 0; j < name; j++)
            if (!((p[4 + j] >= 'a' && p[4 + j] <= 'z') || (p[4 + j] >= '0' && p[4 + j] <= '9') ||
                  p[4 + j] == '-'))
                return -1;
        p += 4 + name, len -= 4 + name;
        uint32_t content = get32(p);
        p += 4, len -= 4;
        if (content == KMSKEYS_WIRE_TOKEN_ABSENT)
            continue;
        if (content > KMSKEYS_WIRE_TOKEN_MAX || len < content)
            return -1;
        p += content, len -= content;
    }
    return len == 0 ? 0 : -1;
}

/* The OUTCOME fields, checked against the request and the wire's bounds: 0 if believable. */
static int parse_outcome(const struct args *a, const unsigned char *body, size_t len, struct outcome *o)
{
    if (len < KMSKEYS_WIRE_OUTCOME_FIXED)
        return -1;
    o->error = (int32_t)get32(body), o->uid = get32(body + 4), o->gid = get32(body + 8);
    o->perm = get32(body + 12), o->negative_perm = get32(body + 16), o->timeout = get32(body + 20);
    o->negative_ttl = get32(body + 24), o->keyring = (int32_t)get32(body + 28);
    o->length = get32(body + 32), o->tokens = get32(body + 36);
    o->payload = body + KMSKEYS_WIRE_OUTCOME_FIXED;
    o->token_data = o->payload + o->length;
    if (len - KMSKEYS_WIRE_OUTCOME_FIXED < (size_t)o->length ||
        parse_tokens(o->token_data, len - KMSKEYS_WIRE_OUTCOME_FIXED - o->length, o->tokens) ||
        o->negative_ttl < 1 || o->negative_ttl > KMSKEYS_MAX_NEGATIVE_TTL)
        return -1;
    /* The key is the requester's whatever the answer, and a rejected key's mask is a refusal's:
     * owner bits and the admin group's, never a possessor bit (a co-possessor's add_key would
     * instantiate it) nor write (contract.h NEGATIVE_PERM_ALLOWED). */
    if (o->uid != (uint32_t)a->uid || (o->negative_perm & ~(uint32_t)KMSKEYS_NEGATIVE_PERM_ALLOWED))
        return -1;
    if (o->error == 0)
        /* An answer: to the requester, within the key's bounds, never a mask that lets anyone
         * but the owner and possessors read or write it, linked into no keyring but the
         * request's destination. */
        return o->length >= 1 && o->length <= KMSKEYS_USER_PAYLOAD_MAX &&
                       o->timeout >= 1 && o->timeout <= KMSKEYS_WIRE_TIMEOUT_MAX &&
                       !(o->perm & ~(uint32_t)KMSKEYS_ANSWER_PERM_ALLOWED) && o->keyring <= 0 &&
                       o->keyring >= KEY_SPEC_REQUESTOR_KEYRING &&
                       o->keyring != KEY_SPEC_REQKEY_AUTH_KEY
                   ? 0
                   : -1;
    int known = o->error == KMSKEYS_ERRNO_UNKNOWN_SECRET || o->error == KMSKEYS_ERRNO_REFUSED ||
                o->error == KMSKEYS_ERRNO_UNAVAILABLE || o->error == KMSKEYS_ERRNO_QUOTA;
    return known && o->length == 0 && o->timeout >= 1 && o->timeout <= KMSKEYS_MAX_NEGATIVE_TTL ? 0 : -1;
}

/* 1 if token `name` (in the open flush directory `dir`, -1 if there is none) no longer holds
 * `want` bytes of `expected` (or is no longer absent), or cannot be read as the resolver reads
 * it (kmskeys/fileio.py PRIVATE: a regular file of root's that nobody else may read or write). */
static int token_changed(int dir, const char *name, uint32_t want, const unsigned char *expected)
{
    int fd = dir < 0 ? -1 : openat(dir, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
    if (fd < 0)
        return !((dir < 0 || errno == ENOENT) && want == KMSKEYS_WIRE_TOKEN_ABSENT);
    unsigned char got[KMSKEYS_WIRE_TOKEN_MAX + 1];
    struct stat st;
    ssize_t n = -1;
    if (!fstat(fd, &st) && S_ISREG(st.st_mode) && trusted(fd, 1))
        n = read(fd, got, sizeof got);
    close(fd);
    return want == KMSKEYS_WIRE_TOKEN_ABSENT || n != (ssize_t)want || memcmp(got, expected, want) != 0;
}

/* 1 if root flushed the request's name since the daemon read its tokens (kmskeys/flushepoch.py),
 * or its tokens cannot be read (as the resolver, that counts as flushed: EAGAIN); 0 if not. */
static int flushed(const struct args *a, const struct outcome *o)
{
    if (o->tokens == 0)
        return 0;
    int state = open_state_dir(a);
    if (state < 0)
        return 1;
    int dir = openat(state, KMSKEYS_WIRE_FLUSH_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    int missing = dir < 0 && errno == ENOENT;
    close(state);
    if ((dir < 0 && !missing) || (dir >= 0 && !trusted(dir, 1))) {
        if (dir >= 0)
            close(dir);
        return 1;
    }
    const unsigned char *p = o->token_data; /* as parse_tokens checked it */
    int changed = 0;
    for (uint32_t i = 0; i < o->tokens && !changed; i++) {
        char name[KMSKEYS_WIRE_TOKEN_FILE_NAME_MAX + 1];
        uint32_t len = get32(p);
        memcpy(name, p + 4, len);
        name[len] = '\0';
        p += 4 + len;
        uint32_t want = get32(p);
        p += 4;
        changed = token_changed(dir, name, want, p);
        if (want != KMSKEYS_WIRE_TOKEN_ABSENT)
            p += want;
    }
    if (dir >= 0)
        close(dir);
    return changed;
}

/* Before a rejection, the refused key's owner, group and mask (resolver/answer.py negative_mask):
 * no possessor bits, so a co-possessor's add_key cannot instantiate it and the client tells the
 * resolver's refusal from the kernel's own negation; the admin group's SETATTR, so root's flush
 * can expire it. The answer matters more than its mask: a failure leaves the kernel's default. */
static void negative_mask(unsigned long key, const struct outcome *o)
{
    if (o->negative_perm == 0)
        return;
    if (syscall(SYS_keyctl, KEYCTL_CHOWN, key, (unsigned long)o->uid, (unsigned long)o->gid) == 0)
        syscall(SYS_keyctl, KEYCTL_SETPERM, key, (unsigned long)o->negative_perm);
}

/* Answer the key as resolver/answer.py does; REPORT's body says what the kernel said. */
static void carry_out(const struct args *a, const struct outcome *o, unsigned char report[16])
{
    unsigned long key = (unsigned long)a->key;
    int step = KMSKEYS_WIRE_STEP_NONE, failed = 0, reject = 0, result = 0;
    unsigned long ttl = o->timeout;
    if (o->error == 0) {
        /* Owner, mask and expiry first, so that no waiter ever sees the kernel's defaults. */
        if (syscall(SYS_keyctl, KEYCTL_CHOWN, key, (unsigned long)o->uid, (unsigned long)o->gid))
            step = KMSKEYS_WIRE_STEP_CHOWN;
        else if (syscall(SYS_keyctl, KEYCTL_SETPERM, key, (unsigned long)o->perm))
            step = KMSKEYS_WIRE_STEP_SETPERM;
        else if (syscall(SYS_keyctl, KEYCTL_SET_TIMEOUT, key, (unsigned long)o->timeout))
            step = KMSKEYS_WIRE_STEP_TIMEOUT;
        /* After the owner, admin group and mask (a flush from now on finds the key and
         * invalidates it), before the payload (a flush before now is seen here). */
        else if (flushed(a, o))
            step = KMSKEYS_WIRE_STEP_FLUSHED;
        else if (syscall(SYS_keyctl, KEYCTL_INSTANTIATE, key, o->payload, (size_t)o->length,
                         (long)o->keyring))
            step = KMSKEYS_WIRE_STEP_INSTANTIATE;
        if (step == KMSKEYS_WIRE_STEP_FLUSHED) {
            /* The answer may hold what the flush removed: EAGAIN, which the kernel never
             * caches; the requester asks again. */
            reject = KMSKEYS_ERRNO_UNAVAILABLE;
            ttl = o->negative_ttl;
        } else if (step != KMSKEYS_WIRE_STEP_NONE) {
            failed = errno;
            /* A full key quota is said as such (doctor explains it); anything else refuses. */
            reject = failed == EDQUOT ? KMSKEYS_ERRNO_QUOTA : KMSKEYS_ERRNO_REFUSED;
            ttl = o->negative_ttl;
        }
    } else {
        /* The refusal's owner and mask first, then the flush tokens, as the handler's _reject. */
        negative_mask(key, o);
        reject = o->error;
        if (flushed(a, o)) {
            /* A refusal decided before the flush (of a blob deployed since, say): never cached. */
            step = KMSKEYS_WIRE_STEP_FLUSHED;
            reject = KMSKEYS_ERRNO_UNAVAILABLE;
            ttl = o->negative_ttl;
        }
    }
    if (reject && o->error == 0)
        negative_mask(key, o); /* an answer the kernel refused, or root flushed meanwhile */
    if (reject && syscall(SYS_keyctl, KEYCTL_REJECT, key, ttl, (unsigned long)reject, 0))
        result = errno;
    put32(report, (uint32_t)step), put32(report + 4, (uint32_t)failed);
    put32(report + 8, (uint32_t)reject), put32(report + 12, (uint32_t)result);
}

/* A request the daemon accepted: serve its one VIEW_ASK, wait for its OUTCOME and carry it out. */
static int answer_from(const struct args *a, int sock, long auth, long wait)
{
    long deadline = monotonic_ms() + wait;
    static unsigned char body[KMSKEYS_WIRE_OUTCOME_MAX];
    size_t len = 0;
    struct outcome o;
    char why[160];
    int asked = 0, r;
    /* At most one VIEW_ASK, before the OUTCOME: a second is not the wire's (READ_BAD). */
    while ((r = read_message(sock, KMSKEYS_WIRE_OUTCOME, body, sizeof body, &len, deadline,
                             asked ? NULL : &asked)) == READ_OK &&
           asked == 1) {
        asked = 2;
        if (send_view(a, sock, auth, deadline)) {
            /* The authority could not be taken back, or the daemon stopped reading: the
             * handler answers (or says why it cannot). */
            send_small(sock, KMSKEYS_WIRE_ABANDON, NULL, 0);
            return DAEMON_FALLBACK;
        }
    }
    if (r == READ_CLOSED)
        return DAEMON_FALLBACK; /* the daemon is gone: the handler has what is left of the deadline */
    if (r == READ_TIMEOUT) {
        send_small(sock, KMSKEYS_WIRE_ABANDON, NULL, 0);
        snprintf(why, sizeof why,
                 "the resolver daemon accepted the request but did not answer within %ld ms", wait);
        reject_key(a, a->negative_ttl, KMSKEYS_ERRNO_UNAVAILABLE);
        log_line(a, KMSKEYS_LOG_ERR, KMSKEYS_OUTCOME_UNAVAILABLE, KMSKEYS_ERRNO_UNAVAILABLE_NAME, why);
        return DAEMON_ANSWERED;
    }
    if (r != READ_OK || parse_outcome(a, body, len, &o)) {
        send_small(sock, KMSKEYS_WIRE_ABANDON, NULL, 0);
        kmsk_wipe(body, sizeof body);
        log_line(a, KMSKEYS_LOG_ERR, "fallback", NULL,
                 "the resolver daemon's answer is not one the gate accepts: the handler answers");
        return DAEMON_FALLBACK;
    }
    unsigned char report[KMSKEYS_WIRE_REPORT_SIZE];
    carry_out(a, &o, report);
    kmsk_wipe(body, sizeof body);
    send_small(sock, KMSKEYS_WIRE_REPORT, report, sizeof report);
    return DAEMON_ANSWERED;
}

int ask_daemon(const struct args *a, int slot)
{
    long accept_by = monotonic_ms() + a->daemon_wait_ms;
    char why[512];
    int sock = connect_daemon(a->daemon_socket, why, sizeof why);
    if (sock == -2)
        log_line(a, KMSKEYS_LOG_ERR, "fallback", NULL, why);
    if (sock < 0)
        return DAEMON_FALLBACK;
    static unsigned char request[HEADER_SIZE + KMSKEYS_WIRE_REQUEST_MAX];
    struct buffer b = {.data = request, .size = sizeof request};
    unsigned char accepted[4];
    size_t len = 0;
    long auth = 0;
    int result = DAEMON_FALLBACK;
    /* request-key assumed the authority already; assuming it again is harmless. */
    if (syscall(SYS_keyctl, KEYCTL_ASSUME_AUTHORITY, a->key) < 0 || build_request(a, &b, &auth) ||
        send_all(sock, request, b.used, slot, accept_by))
        goto out;
    int r = read_message(sock, KMSKEYS_WIRE_ACCEPTED, accepted, sizeof accepted, &len, accept_by, NULL);
    if (r != READ_OK || len != sizeof accepted) {
        /* Not accepted in time: the daemon must not go on with it, the handler answers. */
        send_small(sock, KMSKEYS_WIRE_ABANDON, NULL, 0);
        goto out;
    }
    long wait = get32(accepted);
    result = answer_from(a, sock, auth, wait < KMSKEYS_WIRE_OUTCOME_WAIT_MAX_MS ? wait : KMSKEYS_WIRE_OUTCOME_WAIT_MAX_MS);
out:
    kmsk_wipe(request, sizeof request);
    close(sock);
    return result;
}
