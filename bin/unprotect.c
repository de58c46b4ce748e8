/*
 * kmskeys-unprotect: `kmskeys unprotect`, the common case in C (the `kmskeys` command execs this
 * program for it): a blob in binary form of at most one default chunk (1 MiB), read from a
 * regular file or a pipe whose writer is done, whose master key is cached in the kernel for this
 * fsuid. A fresh `kmskeys unprotect` in Python costs an interpreter start and the import of
 * `cryptography`, several times `systemd-creds decrypt` (docs/dpapi.md).
 *
 * Everything else goes to the Python CLI, as for `get` (bin/kmskeys.c): the text form, a larger
 * blob, any option this does not parse exactly as argparse does, a blob of another uid, a miss
 * (the Python CLI asks the resolver), and every failure to parse or authenticate: the Python
 * CLI then starts over and answers with its own message, exit code and diagnosis (truncation,
 * wrong entropy, unknown version). For that, stdin is not consumed until this program has
 * answered: a regular file is read with pread(2) at its offset, a pipe is looked at with tee(2),
 * which copies what the pipe holds without taking it. Output is written only once every chunk
 * has authenticated, and stdin is consumed after that.
 *
 * The format and its key derivation are kmskeys/protectblob.py's and kmskeys/dpapi.py's:
 * HKDF-SHA256(master key, salt, "kmskeys dpapi v1\0" || SHA-256(entropy) || header) and
 * AES-256-GCM chunks with nonce = prefix || u32 index || last flag. tests/stored/
 * test_unprotect_compiled.py holds this program to the Python CLI, answer for answer.
 *
 * The crypto is OpenSSL's libcrypto, linked in statically (setup.py): the program is static, as
 * the resolver's gate is, so that the wheel needs no glibc newer than 2.17 (docs/packaging.md),
 * and a static program can load no shared libcrypto. It uses the EVP calls of OpenSSL 3 and
 * its built-in default provider, without reading openssl.cnf (a provider that file names would
 * be a shared module, which a static program cannot load either).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "_wipe.h"
#include "kmskeys.h"

/* kmskeys/protectblob.py: the header is magic, u8 format, u8 scope, u32 key version, u32 uid,
 * u32 chunk size, salt, nonce prefix, u8 name length (FIXED_BYTES), then the name, a u16
 * description length and the description; all big-endian. */
#define MAGIC "kmsdpapi"
#define MAGIC_BYTES 8
#define FORMAT 1
#define FIXED_BYTES 62
#define SALT_BYTES 32
#define NONCE_PREFIX_BYTES 7
#define NONCE_BYTES 12
#define TAG_BYTES 16
#define MIN_CHUNK 4096
#define MAX_CHUNK (16 << 20)
#define MAX_DESCRIPTION_BYTES 1024
#define NO_UID 0xFFFFFFFFu
#define MAX_VERSION 0x7FFFFFFFu
#define SCOPE_USER 1
#define SCOPE_MACHINE 2
/* kmskeys/dpapi.py: the HKDF info's head (with its NUL) and the master key's size. */
static const unsigned char HKDF_INFO[] = "kmskeys dpapi v1";
#define HKDF_INFO_BYTES sizeof(HKDF_INFO)
#define MASTER_KEY_BYTES 32
#define SHA256_BYTES 32
/* kmskeys/dpapi_cli.py MAX_ENTROPY_BYTES; kmskeys.contract.DEFAULT_STORED_PREFIX. */
#define MAX_ENTROPY_BYTES (1 << 20)
#define DEFAULT_STORED_PREFIX "stored"
/* The largest input answered here: one default chunk (kmskeys.protectblob.DEFAULT_CHUNK) with
 * the largest header. */
#define INPUT_MAX ((1 << 20) + TAG_BYTES + FIXED_BYTES + 255 + 2 + MAX_DESCRIPTION_BYTES)

struct options {
    const char *prefix;
    const char *entropy_file;
    int show_description;
};

struct input {
    unsigned char *data;
    size_t len;
    int pipe; /* stdin is a pipe (consume len bytes), else a regular file (seek past them) */
    off_t offset;
};

struct header {
    int scope;
    uint32_t version, uid, chunk;
    const unsigned char *salt, *nonce_prefix;
    char name[256];
    char description[MAX_DESCRIPTION_BYTES + 1];
    size_t raw_len;
};

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* argparse's reading of unprotect's options, for the argument lists it takes as given: each
 * option at most once, spelt in full, `--opt V` or `--opt=V`; 0 for anything else. */
static int parse_options(int argc, char **argv, struct options *o)
{
    static const char *const names[] = {"--prefix", "--entropy-file"};
    const char **slot[] = {&o->prefix, &o->entropy_file};
    int i, k;

    memset(o, 0, sizeof(*o));
    for (i = 0; i < argc; i++) {
        const char *arg = argv[i], *eq = strchr(arg, '=');
        size_t len = eq != NULL ? (size_t)(eq - arg) : strlen(arg);

        if (strcmp(arg, "--show-description") == 0) {
            if (o->show_description)
                return 0;
            o->show_description = 1;
            continue;
        }
        for (k = 0; k < 2; k++)
            if (strlen(names[k]) == len && strncmp(arg, names[k], len) == 0)
                break;
        if (k == 2 || *slot[k] != NULL)
            return 0;
        if (eq != NULL) {
            *slot[k] = eq + 1;
        } else {
            if (i + 1 == argc || argv[i + 1][0] == '-')
                return 0;
            *slot[k] = argv[++i];
        }
    }
    if (o->prefix == NULL)
        o->prefix = DEFAULT_STORED_PREFIX;
    /* type=Path: a path it would rewrite is the Python CLI's. */
    return valid_prefix(o->prefix) && (o->entropy_file == NULL || normal_path(o->entropy_file));
}

/* HMAC-SHA256 of data keyed with key into out (32 bytes): 0, or -1. */
static int hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *data,
                       size_t len, unsigned char *out)
{
    size_t out_len = 0;

    return EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, key, key_len, data, len, out,
                     SHA256_BYTES, &out_len) != NULL &&
                   out_len == SHA256_BYTES
               ? 0
               : -1;
}

/* SHA-256 of --entropy-file, as dpapi_cli._read_entropy reads it (a regular file only). */
static int entropy_hash(const char *path, unsigned char *hash)
{
    static unsigned char data[MAX_ENTROPY_BYTES + 1];
    struct stat before, st;
    size_t got = 0;
    ssize_t n;
    int fd, ok = -1;

    if (stat(path, &before) != 0 || !S_ISREG(before.st_mode) || before.st_size > MAX_ENTROPY_BYTES)
        return -1;
    fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_dev == before.st_dev &&
        st.st_ino == before.st_ino) {
        while (got < sizeof(data) && (n = read(fd, data + got, sizeof(data) - got)) != 0) {
            if (n < 0 && errno != EINTR)
                break;
            got += n > 0 ? (size_t)n : 0;
        }
        if (n == 0 && got <= MAX_ENTROPY_BYTES)
            ok = EVP_Q_digest(NULL, "SHA256", NULL, data, got, hash, NULL) == 1 ? 0 : -1;
    }
    kmsk_wipe(data, got);
    close(fd);
    return ok;
}

/* stdin, read without taking it: a regular file from its offset with pread(2), a pipe whose
 * writer has closed it with tee(2) into a pipe of ours. 0, or -1 for the Python CLI. */
static int peek_stdin(struct input *in)
{
    struct stat st;
    struct pollfd hup = {.fd = STDIN_FILENO, .events = POLLIN};
    ssize_t n;
    int avail, copy[2];

    memset(in, 0, sizeof(*in));
    if (fstat(STDIN_FILENO, &st) != 0)
        return -1;
    in->data = malloc(INPUT_MAX + 1);
    if (in->data == NULL)
        return -1;
    if (S_ISREG(st.st_mode)) {
        in->offset = lseek(STDIN_FILENO, 0, SEEK_CUR);
        if (in->offset < 0)
            return -1;
        while (in->len <= INPUT_MAX &&
               (n = pread(STDIN_FILENO, in->data + in->len, INPUT_MAX + 1 - in->len,
                          in->offset + (off_t)in->len)) != 0) {
            if (n < 0 && errno != EINTR)
                return -1;
            in->len += n > 0 ? (size_t)n : 0;
        }
        return in->len <= INPUT_MAX ? 0 : -1;
    }
    /* A pipe: all of it is in the pipe once no writer is left (POLLHUP); a writer still at work
     * is the Python CLI's, which reads as it comes. */
    if (!S_ISFIFO(st.st_mode) || poll(&hup, 1, 0) != 1 || !(hup.revents & POLLHUP) ||
        ioctl(STDIN_FILENO, FIONREAD, &avail) != 0 || avail < 0 || (size_t)avail > INPUT_MAX)
        return -1;
    in->pipe = 1;
    if (avail == 0)
        return 0;
    if (pipe2(copy, O_CLOEXEC) != 0)
        return -1;
    n = -1;
    if (fcntl(copy[1], F_SETPIPE_SZ, avail) >= avail)
        n = tee(STDIN_FILENO, copy[1], (size_t)avail, SPLICE_F_NONBLOCK);
    close(copy[1]);
    if (n == avail) {
        for (in->len = 0; in->len < (size_t)avail; in->len += (size_t)n) {
            n = read(copy[0], in->data + in->len, (size_t)avail - in->len);
            if (n <= 0)
                break;
        }
    }
    close(copy[0]);
    return in->len == (size_t)avail ? 0 : -1;
}

/* Take what peek_stdin looked at, as the Python CLI's reads would have: to the end. */
static void consume_stdin(const struct input *in)
{
    char sink[4096];
    size_t done = 0;
    ssize_t n;

    if (!in->pipe) {
        lseek(STDIN_FILENO, in->offset + (off_t)in->len, SEEK_SET);
        return;
    }
    while (done < in->len && (n = read(STDIN_FILENO, sink, sizeof(sink))) != 0) {
        if (n < 0 && errno != EINTR)
            return;
        done += n > 0 ? (size_t)n : 0;
    }
}

/* protectblob.read_header and ProtectHeader's checks, for the headers answered here: an ASCII
 * printable description (Python's isprintable() covers more: those go to it). */
static int parse_header(const unsigned char *d, size_t len, struct header *h)
{
    size_t name_len, desc_len, i;

    if (len < FIXED_BYTES || memcmp(d, MAGIC, MAGIC_BYTES) != 0 || d[8] != FORMAT)
        return -1;
    h->scope = d[9];
    h->version = be32(d + 10);
    h->uid = be32(d + 14);
    h->chunk = be32(d + 18);
    h->salt = d + 22;
    h->nonce_prefix = d + 22 + SALT_BYTES;
    name_len = d[FIXED_BYTES - 1];
    if (len < FIXED_BYTES + name_len + 2)
        return -1;
    desc_len = (size_t)d[FIXED_BYTES + name_len] << 8 | d[FIXED_BYTES + name_len + 1];
    h->raw_len = FIXED_BYTES + name_len + 2 + desc_len;
    if (desc_len > MAX_DESCRIPTION_BYTES || len < h->raw_len)
        return -1;
    memcpy(h->name, d + FIXED_BYTES, name_len);
    h->name[name_len] = '\0';
    for (i = 0; i < desc_len; i++) {
        unsigned char c = d[FIXED_BYTES + name_len + 2 + i];
        if (c < 0x20 || c > 0x7e)
            return -1;
        h->description[i] = (char)c;
    }
    h->description[desc_len] = '\0';
    if (strlen(h->name) != name_len || !valid_name(h->name))
        return -1;
    if (h->scope != SCOPE_USER && h->scope != SCOPE_MACHINE)
        return -1;
    if (h->version < 1 || h->version > MAX_VERSION)
        return -1;
    if ((h->scope == SCOPE_USER) != (h->uid != NO_UID))
        return -1;
    return h->chunk >= MIN_CHUNK && h->chunk <= MAX_CHUNK ? 0 : -1;
}

/* dpapi._blob_cipher's key: HKDF-SHA256 for 32 bytes, one block: extract, then expand. */
static int blob_key(const unsigned char *master, const struct header *h, const unsigned char *raw,
                    const unsigned char *entropy_sha, unsigned char *key)
{
    unsigned char prk[SHA256_BYTES];
    unsigned char *info;
    size_t info_len = HKDF_INFO_BYTES + SHA256_BYTES + h->raw_len + 1;
    int ok;

    info = malloc(info_len);
    if (info == NULL)
        return -1;
    memcpy(info, HKDF_INFO, HKDF_INFO_BYTES);
    memcpy(info + HKDF_INFO_BYTES, entropy_sha, SHA256_BYTES);
    memcpy(info + HKDF_INFO_BYTES + SHA256_BYTES, raw, h->raw_len);
    info[info_len - 1] = 1;
    ok = hmac_sha256(h->salt, SALT_BYTES, master, MASTER_KEY_BYTES, prk) == 0 &&
         hmac_sha256(prk, SHA256_BYTES, info, info_len, key) == 0;
    kmsk_wipe(prk, sizeof(prk));
    kmsk_wipe(info, info_len); /* it holds the entropy's hash */
    free(info);
    return ok ? 0 : -1;
}

/* Authenticate and decrypt every chunk of body into out: the plaintext's length, or -1. */
static long open_chunks(const unsigned char *key, const struct header *h,
                        const unsigned char *body, size_t len, unsigned char *out)
{
    size_t sealed = (size_t)h->chunk + TAG_BYTES, at, done = 0;
    unsigned char nonce[NONCE_BYTES];
    uint32_t index;
    EVP_CIPHER_CTX *ctx;
    int n, ok = 1;

    if (len == 0 || (ctx = EVP_CIPHER_CTX_new()) == NULL)
        return -1;
    memcpy(nonce, h->nonce_prefix, NONCE_PREFIX_BYTES);
    for (at = 0, index = 0; ok && at < len; at += sealed, index++) {
        size_t piece = len - at < sealed ? len - at : sealed;
        nonce[7] = (unsigned char)(index >> 24);
        nonce[8] = (unsigned char)(index >> 16);
        nonce[9] = (unsigned char)(index >> 8);
        nonce[10] = (unsigned char)index;
        nonce[11] = (unsigned char)(at + piece == len); /* the last chunk */
        ok = piece >= TAG_BYTES &&
             EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_BYTES, NULL) == 1 &&
             EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) == 1 &&
             EVP_DecryptUpdate(ctx, out + done, &n, body + at, (int)(piece - TAG_BYTES)) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_BYTES,
                                 (void *)(body + at + piece - TAG_BYTES)) == 1 &&
             EVP_DecryptFinal_ex(ctx, out + done + n, &n) == 1;
        done += piece - TAG_BYTES;
    }
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) {
        kmsk_wipe(out, done);
        return -1;
    }
    return (long)done;
}

/* Write the plaintext to stdout: 0; -1 if nothing was written (the Python CLI then meets the
 * same failure, from the start); else, as dpapi_cli.unprotect_main does, truncate a regular
 * file back to where it was, say why in Python's words for an OSError, and exit 1 (7 for a
 * permission error, as kmskeys.cli's table has it). */
static int write_out(const unsigned char *buf, size_t len)
{
    struct stat st;
    off_t start = -1;
    size_t done = 0;
    ssize_t n;
    int err;

    if (fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode))
        start = fcntl(STDOUT_FILENO, F_GETFL) & O_APPEND ? st.st_size
                                                          : lseek(STDOUT_FILENO, 0, SEEK_CUR);
    while (done < len) {
        n = write(STDOUT_FILENO, buf + done, len - done);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        err = n < 0 ? errno : EIO;
        if (done == 0)
            return -1;
        if (start >= 0 && ftruncate(STDOUT_FILENO, start) == 0)
            lseek(STDOUT_FILENO, start, SEEK_SET);
        fprintf(stderr, "kmskeys unprotect: [Errno %d] %s\n", err, strerror(err));
        return err == EACCES || err == EPERM ? 7 : 1;
    }
    return 0;
}

/* The checks, key and decryption, with stdin in memory: the exit status, or -1. */
static int answer(const struct options *o, const struct input *in)
{
    static const unsigned char empty_sha[SHA256_BYTES] = {
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4,
        0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b,
        0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55};
    char desc[PREFIX_MAX_BYTES + 1 + 255 + 32];
    char master[PAYLOAD_MAX + 1];
    unsigned char entropy_sha[SHA256_BYTES], key[SHA256_BYTES], *out;
    struct header h;
    long plain;
    int status = -1;

    if (parse_header(in->data, in->len, &h) != 0)
        return -1;
    /* dpapi._key_for: a user-scope blob of another uid is WrongUserError, before any request. */
    if (h.scope == SCOPE_USER && h.uid != (uint32_t)setfsuid((uid_t)-1))
        return -1;
    /* The built-in default provider only: openssl.cnf could name shared modules. */
    if (OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, NULL) != 1)
        return -1;
    memcpy(entropy_sha, empty_sha, sizeof(empty_sha));
    if (o->entropy_file != NULL && entropy_hash(o->entropy_file, entropy_sha) != 0)
        return -1;
    /* stored.stored_description of version N in the blob's scope: PREFIX:NAME#SCOPE#vN. */
    snprintf(desc, sizeof(desc), "%s:%s#%s#v%u", o->prefix, h.name,
             h.scope == SCOPE_USER ? "user" : "machine", h.version);
    if (cached_payload(desc, 0, master) != MASTER_KEY_BYTES) {
        kmsk_wipe(master, sizeof(master));
        return -1;
    }
    out = malloc(in->len + 1); /* + 1: never malloc(0) */
    if (out != NULL && blob_key((unsigned char *)master, &h, in->data, entropy_sha, key) == 0) {
        plain = open_chunks(key, &h, in->data + h.raw_len, in->len - h.raw_len, out);
        if (plain >= 0) {
            signal(SIGPIPE, SIG_IGN); /* a closed pipe is an error to report, as in Python */
            status = write_out(out, (size_t)plain);
            if (status < 0)
                signal(SIGPIPE, SIG_DFL);
            kmsk_wipe(out, (size_t)plain);
        }
    }
    kmsk_wipe(master, sizeof(master));
    kmsk_wipe(key, sizeof(key));
    kmsk_wipe(entropy_sha, sizeof(entropy_sha));
    free(out);
    if (status == 0 && o->show_description)
        fprintf(stderr, "description: %s\n", h.description);
    return status;
}

/* `kmskeys unprotect ARGS`: the exit status, or -1 when the Python CLI must answer (stdin then
 * still holds all of its input). */
static int unprotect(int argc, char **argv)
{
    struct options o;
    struct input in = {0};
    int status = -1;

    if (parse_options(argc, argv, &o) && peek_stdin(&in) == 0) {
        status = answer(&o, &in);
        if (status >= 0)
            consume_stdin(&in);
    }
    free(in.data);
    return status;
}

/* Run by `kmskeys` for `kmskeys unprotect ...`, with the same argv. */
int main(int argc, char **argv)
{
    int status;

    if (argc >= 2 && strcmp(argv[1], "unprotect") == 0) {
        status = unprotect(argc - 2, argv + 2);
        if (status >= 0)
            return status;
    }
    python(argv);
}
