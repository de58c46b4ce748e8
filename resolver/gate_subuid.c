/*
 * Subordinate uid ranges (rootless containers): the uid a request's limits are charged to.
 *
 * Every per-uid limit is per kernel uid, so a user with a range of subordinate uids in
 * /etc/subuid would multiply its own. With aggregate_subuids on (the default), a uid inside a
 * range is charged to the range's owner: its slots here, its token bucket and host-cache share
 * in the resolver (resolver/limits.py charged_uid applies exactly these rules):
 *
 * - each line is `OWNER:START:COUNT`; a uid in [START, START+COUNT) belongs to OWNER;
 * - OWNER is a numeric uid when it is all digits, else a user name looked up in /etc/passwd
 *   (the gate is static and never loads NSS modules, so only the files database; Python reads
 *   the same file);
 * - the first line that holds the uid and whose owner resolves wins; lines that do not parse
 *   are skipped;
 * - /etc/subuid (and /etc/passwd) must be regular files owned by root and not writable by group
 *   or others, else aggregation is off and the caller logs why. No /etc/subuid: no ranges.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "contract.h"
#include "gate.h"

/* A whole file of at most KMSKEYS_SUBUID_FILE_MAX bytes, NUL-terminated; NULL with `problem`
 * set when it is unsafe, NULL with an empty `problem` when it does not exist. */
static char *read_trusted(const char *path, char *problem, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
    if (fd < 0) {
        if (errno != ENOENT)
            snprintf(problem, size, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    char *text = NULL;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        snprintf(problem, size, "%s is not a regular file", path);
    } else if (st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))) {
        snprintf(problem, size, "%s is not root's alone (uid %ld, mode %04o)", path, (long)st.st_uid,
                 (unsigned)(st.st_mode & 07777));
    } else if (st.st_size > KMSKEYS_SUBUID_FILE_MAX) {
        snprintf(problem, size, "%s is larger than %d bytes", path, KMSKEYS_SUBUID_FILE_MAX);
    } else if ((text = malloc((size_t)st.st_size + 1)) != NULL) {
        size_t got = 0;
        ssize_t n;
        while (got < (size_t)st.st_size && (n = read(fd, text + got, (size_t)st.st_size - got)) > 0)
            got += (size_t)n;
        text[got] = '\0'; /* a NUL inside ends the text early: the rest is never read */
    }
    close(fd);
    return text;
}

/* A decimal number of digits only (no sign, no space), at most `max`; -1 otherwise. */
static long long decimal(const char *text, size_t len, long long max)
{
    if (len == 0 || len > 10)
        return -1;
    long long value = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        value = value * 10 + (text[i] - '0');
    }
    return value <= max ? value : -1;
}

/* The uid of user `name` in /etc/passwd (first entry of that name); -1 if none; -2 if unsafe. */
static long passwd_uid(const char *name, char *problem, size_t size)
{
    int fd = open(KMSKEYS_USERS_FILE, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_uid != 0 ||
        (st.st_mode & (S_IWGRP | S_IWOTH))) {
        snprintf(problem, size, "%s is missing or not root's alone", KMSKEYS_USERS_FILE);
        if (fd >= 0)
            close(fd);
        return -2;
    }
    FILE *file = fdopen(fd, "re");
    if (file == NULL) {
        close(fd);
        return -2;
    }
    long found = -1;
    struct passwd *entry;
    /* fgetpwent parses the passwd format itself: no NSS, nothing loaded. */
    while (found < 0 && (entry = fgetpwent(file)) != NULL) {
        if (strcmp(entry->pw_name, name) == 0)
            found = (long)entry->pw_uid;
    }
    fclose(file);
    return found;
}

/* The owner's uid if `line` (`OWNER:START:COUNT`, len bytes) holds `uid`; -1 if not; -2 unsafe. */
static long line_owner(const char *line, size_t len, long uid, char *problem, size_t size)
{
    const char *first = memchr(line, ':', len);
    if (first == NULL)
        return -1;
    const char *second = memchr(first + 1, ':', len - (size_t)(first + 1 - line));
    if (second == NULL || memchr(second + 1, ':', len - (size_t)(second + 1 - line)))
        return -1;
    size_t owner_len = (size_t)(first - line);
    long long start = decimal(first + 1, (size_t)(second - first - 1), 4294967295LL);
    long long count = decimal(second + 1, len - (size_t)(second + 1 - line), 4294967295LL);
    if (owner_len == 0 || owner_len > KMSKEYS_SUBUID_OWNER_MAX || start < 0 || count < 1 ||
        uid < start || uid >= start + count)
        return -1;
    long long numeric = decimal(line, owner_len, 4294967294LL);
    if (numeric >= 0)
        return (long)numeric;
    char name[KMSKEYS_SUBUID_OWNER_MAX + 1];
    memcpy(name, line, owner_len);
    name[owner_len] = '\0';
    if (strlen(name) != owner_len)
        return -1;
    return passwd_uid(name, problem, size);
}

long charged_uid(long uid, char *problem, size_t size)
{
    problem[0] = '\0';
    char *text = read_trusted(KMSKEYS_SUBUID_FILE, problem, size);
    if (text == NULL)
        return uid;
    long charged = uid;
    for (const char *line = text; *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        long owner = line_owner(line, len, uid, problem, size);
        if (owner == -2) {
            charged = uid; /* unsafe: no aggregation at all, and `problem` says why */
            break;
        }
        if (owner >= 0) {
            charged = owner;
            break;
        }
        line = end ? end + 1 : line + len;
    }
    free(text);
    return charged;
}
