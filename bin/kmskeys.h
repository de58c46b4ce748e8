/* What the two parts of the `kmskeys` command share (bin/kmskeys.c, bin/unprotect.c). */
#ifndef KMSKEYS_H
#define KMSKEYS_H

#include <keyutils.h>
#include <stddef.h>

/* kmskeys.contract.USER_PAYLOAD_MAX: a `user` key holds 1..32767 bytes. */
#define PAYLOAD_MAX 32767
/* kmskeys/names.py: MAX_NAME_BYTES, MAX_PREFIX_BYTES. */
#define NAME_MAX_BYTES 200
#define PREFIX_MAX_BYTES 32

/* kmskeys.names.validate_prefix and validate_name, exactly: 1 if valid. */
int valid_prefix(const char *prefix);
int valid_name(const char *name);
/* kmskeys.cli._normal_path: str(pathlib.Path(p)) == p. */
int normal_path(const char *path);
/* The `user` key `desc` found without an upcall, owned by this fsuid, read into payload
 * (PAYLOAD_MAX + 1 bytes): its length, or -1 for anything else (the Python CLI answers). */
long cached_payload(const char *desc, key_serial_t dest, char *payload);
/* `kmskeys unprotect ARGS` of a blob whose master key is cached: the exit status, or -1 when
 * the Python CLI must answer (stdin then still holds all of its input). */
int unprotect(int argc, char **argv);

#endif
