/*
 * kmskeys-gate's parts (resolver/gate.c, gate_daemon.c, gate_subuid.c): what they share.
 */
#ifndef KMSKEYS_GATE_H
#define KMSKEYS_GATE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "contract.h"

struct args {
    const char *state_dir;
    long slots;
    long negative_ttl;
    const char *syslog_socket;
    long facility;
    const char *daemon_socket; /* NULL: no resolver daemon configured */
    long daemon_wait_ms;       /* how long the daemon may take to accept a request */
    int aggregate_subuids;     /* charge a subordinate uid's limits to its range's owner */
    long key;
    long uid;
    long keyrings[3]; /* the requester's thread, process and session keyrings (%T %P %S) */
    long long started_us; /* CLOCK_MONOTONIC when the gate started */
    char **program;       /* PROGRAM ARG... NULL */
};

/* The daemon answered the key (the gate is done), or the handler must run instead. */
enum { DAEMON_ANSWERED = 0, DAEMON_FALLBACK = 1 };

/* The wire's header (resolver/wire.py HEADER): magic, version, type, body length. */
#define HEADER_SIZE 12

/* A message being written: at most `size` bytes. */
struct buffer {
    unsigned char *data;
    size_t size, used;
};

/* Big-endian integers and bounded strings into a buffer: -1 when it would not fit. */
static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8), p[3] = (unsigned char)v;
}

static inline uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline int put_u32(struct buffer *b, uint32_t v)
{
    if (b->size - b->used < 4)
        return -1;
    put32(b->data + b->used, v);
    b->used += 4;
    return 0;
}

static inline int put_u64(struct buffer *b, unsigned long long v)
{
    return put_u32(b, (uint32_t)(v >> 32)) || put_u32(b, (uint32_t)v);
}

static inline int put_raw(struct buffer *b, const void *data, size_t len)
{
    if (b->size - b->used < len)
        return -1;
    memcpy(b->data + b->used, data, len);
    b->used += len;
    return 0;
}

static inline int put_string(struct buffer *b, const void *text, size_t len, size_t max)
{
    if (len > max || put_u32(b, (uint32_t)len))
        return -1;
    return put_raw(b, text, len);
}

static inline void put_header(unsigned char *p, int type, size_t length)
{
    memcpy(p, KMSKEYS_WIRE_MAGIC, 4);
    p[4] = (unsigned char)(KMSKEYS_WIRE_VERSION >> 8), p[5] = (unsigned char)KMSKEYS_WIRE_VERSION;
    p[6] = (unsigned char)(type >> 8), p[7] = (unsigned char)type;
    put32(p + 8, (uint32_t)length);
}

/* gate.c */
long monotonic_ms(void);
/* 1 if `fd` is root's and nobody else may write it (with `private_mode`, nor read it either). */
int trusted(int fd, int private_mode);
/* The state_dir, checked as root's alone (created if missing); -1 if it is not to be used. */
int open_state_dir(const struct args *a);
void log_line(const struct args *a, int severity, const char *outcome, const char *errno_name,
              const char *reason);
int reject_key(const struct args *a, long ttl, int error);

/* gate_daemon.c: hand the request to the resolver daemon, holding `slot`; carry out its answer. */
int ask_daemon(const struct args *a, int slot);

/* gate_request.c: the REQUEST for our key into `b`, header included, and the authorization
 * key's serial into `auth`: 0, or -1. */
int build_request(const struct args *a, struct buffer *b, long *auth);
/* gate_request.c: the VIEW of the request (its /proc/keys lines) into `b`, header included:
 * 0, or -1 if the authority cannot be taken back. */
int build_view(const struct args *a, long auth, struct buffer *b);

/* gate_subuid.c: the uid whose limits `uid` is charged to (/etc/subuid), or `uid` itself.
 * On an unsafe /etc/subuid, `problem` says why (aggregation is then off). */
long charged_uid(long uid, char *problem, size_t size);

#endif
