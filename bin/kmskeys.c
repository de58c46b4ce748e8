/*
 * kmskeys: the `kmskeys` command. A cached `kmskeys get NAME` is answered here, in C; `kmskeys
 * unprotect` goes to kmskeys-unprotect (bin/unprotect.c), which answers the common case; every
 * other command, option and outcome is the Python CLI's (kmskeys/cli.py), run by exec'ing
 * `kmskeys-py` (bin/kmskeys-py) from this program's own directory with the same arguments.
 *
 * Why: a shell or cron user compares `kmskeys get` with `keyctl pipe` (about 1.5 ms) and
 * `systemd-creds decrypt` (6-9 ms); an interpreter start alone costs 10-15 ms (docs/cli.md).
 *
 * What is answered here, and only this: `get` with the argument lists kmskeys.cli._get_plain
 * accepts (NAME; --prefix, --keyring, --blob once each, --blob-file of a regular file), for a
 * key already cached, owned by this process's fsuid and read without error. The lookup passes
 * no callout, so the kernel never upcalls from here (request_key(2) with a NULL callout only
 * searches): a miss, an error of any kind, a key of another uid, or anything this program does
 * not parse exactly as the Python CLI does goes to kmskeys-py, which starts over and answers
 * with its own message and exit code. So the messages and their advice have one implementation,
 * and a case handled here must be one where the Python CLI would print the same payload: the
 * tests run every form both ways (tests/kernel/test_cli_compiled.py).
 *
 * It writes the payload and nothing else to stdout, and wipes every buffer that held it. A key
 * description is built only from a name and prefix that passed the grammar of kmskeys/names.py.
 *
 * It is linked static (setup.py), as the resolver's gate is: no glibc symbol version, so the
 * wheel stays manylinux2014 (docs/packaging.md), and nothing for the dynamic loader to do at
 * each start. So it calls request_key(2) and keyctl(2) by number instead of through
 * libkeyutils, and wipes with kmskeys/_wipe.h (glibc's explicit_bzero needs glibc 2.25).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "_wipe.h"
#include "kmskeys.h"

/* kmskeys.contract.DEFAULT_PREFIX. */
#define DEFAULT_PREFIX "kms"
/* A --blob-file larger than this goes to the Python CLI (a blob is at most a few KiB). */
#define BLOB_FILE_MAX (1 << 20)

struct get {
    const char *name;
    const char *prefix;
    const char *blob;
    const char *blob_file;
    const char *keyring;
};

/* The argument lists kmskeys.cli._get_plain accepts, parsed as it parses them; 0 for any
 * other (argparse's usage and errors are the Python CLI's). */
static int parse_get(int argc, char **argv, struct get *get)
{
    static const char *const options[] = {"--prefix", "--blob", "--blob-file", "--keyring"};
    const char **slot[] = {&get->prefix, &get->blob, &get->blob_file, &get->keyring};
    int i = 0, k;

    memset(get, 0, sizeof(*get));
    while (i < argc) {
        char *arg = argv[i++], *eq;
        const char *value;
        size_t len;

        if (strcmp(arg, "--") == 0) {
            if (get->name != NULL || i != argc - 1)
                return 0;
            get->name = argv[i];
            break;
        }
        if (arg[0] != '-') {
            if (get->name != NULL)
                return 0;
            get->name = arg;
            continue;
        }
        eq = strchr(arg, '=');
        len = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
        for (k = 0; k < 4; k++)
            if (strlen(options[k]) == len && strncmp(arg, options[k], len) == 0)
                break;
        if (k == 4 || *slot[k] != NULL)
            return 0;
        if (eq != NULL) {
            value = eq + 1;
        } else {
            if (i == argc)
                return 0;
            value = argv[i++];
            if (value[0] == '-' && strcmp(value, "-") != 0)
                return 0;
        }
        *slot[k] = value;
    }
    if (get->name == NULL || (get->blob != NULL && get->blob_file != NULL))
        return 0;
    if (get->keyring != NULL && strcmp(get->keyring, "session") != 0 &&
        strcmp(get->keyring, "user") != 0 && strcmp(get->keyring, "persistent") != 0)
        return 0;
    if (get->blob_file != NULL && strcmp(get->blob_file, "-") != 0 && !normal_path(get->blob_file))
        return 0;
    if (get->prefix == NULL)
        get->prefix = DEFAULT_PREFIX;
    return 1;
}

/* request_key(2) copies a callout of at most PAGE_SIZE bytes with its NUL (strndup_user), before
 * it searches: a longer one fails with EINVAL even when the key is cached. */
static int callout_fits(size_t len)
{
    long page = sysconf(_SC_PAGESIZE);

    return page > 0 && len < (size_t)page;
}

/* --blob: the Python CLI passes it encoded as UTF-8 (a non-UTF-8 argument fails there); a blob
 * is ASCII, so any other byte goes to the Python CLI. */
static int blob_fits(const char *blob)
{
    const char *c;

    for (c = blob; *c != '\0'; c++)
        if (*c < 0x20 || *c > 0x7e)
            return 0;
    return callout_fits((size_t)(c - blob));
}

/* bytes.strip()'s whitespace. */
static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* --blob-file PATH: the Python CLI reads the file and strips ASCII whitespace (bytes.strip),
 * and the kernel takes the callout up to its first NUL. Only a regular file is read here:
 * reading a pipe or a device would take what the Python CLI then could not read again. */
static int blob_file_fits(const char *path)
{
    static char data[BLOB_FILE_MAX + 1];
    struct stat before, st;
    size_t got = 0, start, end;
    ssize_t n;
    int fd, ok = 0;

    if (stat(path, &before) != 0 || !S_ISREG(before.st_mode) || before.st_size > BLOB_FILE_MAX)
        return 0;
    fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_dev != before.st_dev ||
        st.st_ino != before.st_ino)
        goto out;
    while (got < sizeof(data) && (n = read(fd, data + got, sizeof(data) - got)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        got += (size_t)n;
    }
    if (got == sizeof(data))
        goto out;
    for (start = 0; start < got && is_space(data[start]); start++)
        ;
    for (end = got; end > start && is_space(data[end - 1]); end--)
        ;
    ok = callout_fits(strnlen(data + start, end - start));
out:
    close(fd);
    return ok;
}

/* The keyring request_key links the key into, as kmskeys.key._destination chooses it for a new
 * process, in *dest: 0, or -1 on any error (the Python CLI then reports it). */
static int destination(const char *keyring, key_serial_t *dest)
{
    *dest = 0;
    if (keyring == NULL)
        return 0;
    if (strcmp(keyring, "session") == 0) {
        *dest = KEY_SPEC_SESSION_KEYRING;
        return 0;
    }
    if (strcmp(keyring, "user") == 0) {
        /* The user keyring, linked into the process keyring so that the search sees it. */
        *dest = (key_serial_t)kmsk_keyctl(KEYCTL_GET_KEYRING_ID,
                                          (unsigned long)KEY_SPEC_USER_KEYRING, 1, 0, 0);
        return *dest < 0 || kmsk_keyctl(KEYCTL_LINK, (unsigned long)*dest,
                                        (unsigned long)KEY_SPEC_PROCESS_KEYRING, 0, 0) < 0
                   ? -1
                   : 0;
    }
    /* Also restarts its expiry timer, as the Python CLI's request does. */
    *dest = (key_serial_t)kmsk_keyctl(KEYCTL_GET_PERSISTENT, (unsigned long)-1,
                                      (unsigned long)KEY_SPEC_PROCESS_KEYRING, 0, 0);
    return *dest < 0 ? -1 : 0;
}

/* Write all of buf to stdout: 0, or -1 if nothing could be written (the Python CLI then runs
 * into the same failure and answers as it does), or exit 1 after a partial write. */
static int write_all(const char *buf, size_t len)
{
    size_t done = 0;
    ssize_t n;
    struct pollfd out = {.fd = STDOUT_FILENO, .events = POLLOUT};

    while (done < len) {
        n = write(STDOUT_FILENO, buf + done, len - done);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN && done > 0) {
            poll(&out, 1, -1);
        } else if (done == 0) {
            return -1;
        } else {
            fprintf(stderr, "kmskeys get: stdout: %s\n", n < 0 ? strerror(errno) : "short write");
            return 1;
        }
    }
    return 0;
}

/* `kmskeys get` of a cached key owned by this fsuid: the exit status, or -1 for the Python CLI. */
static int get(const struct get *get)
{
    char desc[PREFIX_MAX_BYTES + 1 + NAME_MAX_BYTES + 1];
    char payload[PAYLOAD_MAX + 1];
    key_serial_t dest;
    long n;
    int status;

    if (!valid_prefix(get->prefix) || !valid_name(get->name))
        return -1;
    if (get->blob_file != NULL &&
        (strcmp(get->blob_file, "-") == 0 || !blob_file_fits(get->blob_file)))
        return -1;
    if (get->blob != NULL && !blob_fits(get->blob))
        return -1;
    snprintf(desc, sizeof(desc), "%s:%s", get->prefix, get->name);
    if (destination(get->keyring, &dest) < 0)
        return -1;
    n = cached_payload(desc, dest, payload);
    if (n < 0)
        return -1;
    /* A closed pipe is an error to report, as the Python CLI does, not a signal. */
    signal(SIGPIPE, SIG_IGN);
    status = write_all(payload, (size_t)n);
    kmsk_wipe(payload, sizeof(payload));
    if (status < 0)
        signal(SIGPIPE, SIG_DFL);
    return status;
}

int main(int argc, char **argv)
{
    struct get args;
    int status;

    if (argc >= 3 && strcmp(argv[1], "get") == 0 && parse_get(argc - 2, argv + 2, &args)) {
        status = get(&args);
        if (status >= 0)
            return status;
    }
    /* OpenSSL, linked in for unprotect, would triple this program's start: a program of its own
     * (and where it is missing, the Python CLI answers). */
    if (argc >= 2 && strcmp(argv[1], "unprotect") == 0)
        exec_beside(UNPROTECT_PROGRAM, argv);
    python(argv);
}
