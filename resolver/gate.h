/*
 * kmskeys-gate's parts (resolver/gate.c, gate_daemon.c, gate_subuid.c): what they share.
 */
#ifndef KMSKEYS_GATE_H
#define KMSKEYS_GATE_H

#include <stddef.h>

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

/* gate.c */
long monotonic_ms(void);
void log_line(const struct args *a, int severity, const char *outcome, const char *errno_name,
              const char *reason);
int reject_key(const struct args *a, long ttl, int error);

/* gate_daemon.c: hand the request to the resolver daemon, holding `slot`; carry out its answer. */
int ask_daemon(const struct args *a, int slot);

/* gate_subuid.c: the uid whose limits `uid` is charged to (/etc/subuid), or `uid` itself.
 * On an unsafe /etc/subuid, `problem` says why (aggregation is then off). */
long charged_uid(long uid, char *problem, size_t size);

#endif
