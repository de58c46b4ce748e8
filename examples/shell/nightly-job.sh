#!/bin/sh
# A cron-style job that needs a secret: `kmskeys get`, with one decision per exit code.
#
#   # /etc/cron.d/nightly-report: the deployer names the secret here, not in the script
#   KMSKEYS_SECRET=db-password
#   15 3 * * * report  /usr/local/bin/nightly-job.sh /usr/local/bin/make-report
#
# The secret goes to the job on stdin, never in argv or the environment (both are visible in
# /proc to the same user). With no job given, the script prints the secret's fingerprint.
#
# The key is cached in the user keyring, which every session of the job's uid shares: each run
# of a cron job may get a new session keyring (pam_keyinit), and a key cached there would be
# gone at the next run, which would ask the resolver again.
#
# Settings (environment): KMSKEYS_SECRET (the secret's name, required), KMSKEYS_PREFIX
# (default kms), KMSKEYS_KEYRING (default user; persistent also outlives the uid's last
# session; session only for a job whose runs share one), KMSKEYS (the kmskeys command),
# KMSKEYS_RETRIES and KMSKEYS_RETRY_DELAY (seconds) for a temporarily unavailable KMS. That
# failure (EAGAIN) is not cached: the resolver rejects the key with its negative_ttl as it does
# every failure, but the kernel never finds a key rejected with EAGAIN, so every retry runs the
# resolver and asks KMS again. The delay is a back-off for a throttled or unreachable KMS, not a
# wait for a cache to expire.
#
# Exit status (sysexits.h, which cron wrappers and monitoring understand), one per `kmskeys get`
# status (docs/cli.md):
#   0 done; 64 bad or missing name; 69 unknown secret (no blob deployed); 71 an error kmskeys
#   puts in none of its classes (its status 1; its own line says what); 75 still unavailable
#   after the retries; 77 refused, permission denied, or a cached key of another uid; 78 key
#   quota full, or no kmskeys command; 70 a status kmskeys does not document (or a flush that
#   did not help); otherwise the job's own status.

set -u

name=${KMSKEYS_SECRET:-}
prefix=${KMSKEYS_PREFIX:-kms}
keyring=${KMSKEYS_KEYRING:-user}
kmskeys=${KMSKEYS:-kmskeys}
retries=${KMSKEYS_RETRIES:-3}
delay=${KMSKEYS_RETRY_DELAY:-15}

log() { echo "nightly-job: $*" >&2; }

if [ -z "$name" ]; then
    log "KMSKEYS_SECRET is not set: name the secret in the job's environment"
    exit 64
fi

attempt=0
flushed=no
while :; do
    # $(...) drops trailing newlines; a secret that ends in one needs `kmskeys get > file` instead.
    secret=$("$kmskeys" get --prefix "$prefix" --keyring "$keyring" "$name")
    status=$?
    case $status in
    0) break ;;
    1)
        log "kmskeys get '$name' failed (its line above says why): run 'kmskeys doctor --prefix $prefix'"
        exit 71
        ;;
    2) log "invalid secret name '$name' (or KMSKEYS_KEYRING '$keyring')"; exit 64 ;;
    3) log "unknown secret '$name': deploy its blob on this host (see the resolver log)"; exit 69 ;;
    4) log "the resolver refused '$name': wrong name, user or key, or expired (see its log)"; exit 77 ;;
    5)
        attempt=$((attempt + 1))
        if [ "$attempt" -gt "$retries" ]; then
            log "KMS still unavailable for '$name' after $retries retries; giving up"
            exit 75
        fi
        log "KMS temporarily unavailable for '$name'; retry $attempt/$retries in ${delay}s"
        sleep "$delay"
        ;;
    6) log "the key quota of $(id -un) is full: run 'kmskeys doctor'"; exit 78 ;;
    7)
        log "permission denied for '$name' (keyctl blocked, or a key this uid may not use): run 'kmskeys doctor --prefix $prefix'"
        exit 77
        ;;
    8)
        # Expired or revoked while cached: drop it once and ask the resolver again.
        if [ "$flushed" = yes ]; then
            log "'$name' is still expired or revoked after a flush"
            exit 70
        fi
        flushed=yes
        "$kmskeys" flush --prefix "$prefix" "$name" || exit 70
        sleep 1 # the kernel drops the flushed key asynchronously; until then it reads as revoked
        ;;
    9)
        log "the cached '$name' belongs to another uid: cache it in a keyring of $(id -un)'s own (KMSKEYS_KEYRING=user)"
        exit 77
        ;;
    127) log "no kmskeys command '$kmskeys': set KMSKEYS or PATH"; exit 78 ;;
    *) log "kmskeys get '$name' failed with status $status, not one docs/cli.md lists"; exit 70 ;;
    esac
done

# printf is a shell builtin: the secret is never in the argv of any process.
if [ "$#" -eq 0 ]; then
    printf '%s' "$secret" | sha256sum | cut -c1-16
else
    printf '%s' "$secret" | "$@"
fi
