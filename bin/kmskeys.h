/* What the programs of the `kmskeys` command share (bin/common.c): `kmskeys` (bin/kmskeys.c)
 * and `kmskeys-unprotect` (bin/unprotect.c). */
#ifndef KMSKEYS_H
#define KMSKEYS_H

#include <stddef.h>
#include <stdint.h>

#include "../kmskeys/contract.h"

/* A key serial, as the kernel's key_serial_t (include/linux/key.h). */
typedef int32_t key_serial_t;

/* The generated facts (kmskeys/contract.h): a `user` key holds 1..32767 bytes; a NAME and a
 * prefix are at most these many bytes (kmskeys/names.py). */
#define PAYLOAD_MAX KMSKEYS_USER_PAYLOAD_MAX
#define NAME_MAX_BYTES KMSKEYS_NAME_MAX
#define PREFIX_MAX_BYTES KMSKEYS_PREFIX_MAX

/* The program `kmskeys unprotect` runs, beside `kmskeys` (setup.py). */
#define UNPROTECT_PROGRAM "kmskeys-unprotect"

/* Exec the program `name` installed beside this one, with argv (argv[0] replaced): returns,
 * with errno set and argv as it was, only if it cannot. */
void exec_beside(const char *name, char **argv);
/* Exec the Python CLI, kmskeys-py, with argv: everything the C programs do not answer. */
void python(char **argv) __attribute__((noreturn));
/* kmskeys.names.validate_prefix and validate_name, exactly: 1 if valid. */
int valid_prefix(const char *prefix);
int valid_name(const char *name);
/* kmskeys.cli._normal_path: str(pathlib.Path(p)) == p. */
int normal_path(const char *path);
/* request_key(2) and keyctl(2), by number: the program is static (setup.py), with no
 * libkeyutils to link. -1 and errno on failure, as the libkeyutils calls. */
key_serial_t kmsk_request_key(const char *type, const char *desc, const char *callout,
                              key_serial_t dest);
long kmsk_keyctl(int op, unsigned long a, unsigned long b, unsigned long c, unsigned long d);
/* The `user` key `desc` found without an upcall, owned by this fsuid, read into payload
 * (PAYLOAD_MAX + 1 bytes): its length, or -1 for anything else (the Python CLI answers). */
long cached_payload(const char *desc, key_serial_t dest, char *payload);

#endif
