/* kmskeys/_names.h: the name grammar of kmskeys/names.py in C, for the hit path's describe
 * (kmskeys/_hitpath.c) and the `kmskeys` programs (bin/common.c): a secret's NAME, a description
 * prefix, and the selectors of a reference's common shapes (`sm:prod/db#password`,
 * `ssm:app/db#3`). Each accepts exactly what the Python grammar accepts as spelled, and nothing
 * else: tests/unit/test_names.py and test_common_reference.py hold them to it. Lengths are
 * explicit, so a NUL inside a Python string is a character outside every alphabet.
 * Included after "contract.h". */
#ifndef KMSKEYS_NAMES_H
#define KMSKEYS_NAMES_H

#include <string.h>

static inline int kmsk_alnum(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static inline int kmsk_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* `c` is a letter, a digit or one of `punctuation` (never NUL). */
static inline int kmsk_in(char c, const char *punctuation)
{
    return kmsk_alnum(c) || (c != '\0' && strchr(punctuation, c) != NULL);
}

/* The `len` bytes at `s` spell `word`. */
static inline int kmsk_is(const char *s, size_t len, const char *word)
{
    return len == strlen(word) && memcmp(s, word, len) == 0;
}

/* The `len` bytes at `s` start with `word` (lower case), in any case. */
static inline int kmsk_starts_nocase(const char *s, size_t len, const char *word)
{
    size_t i, n = strlen(word);

    if (len < n)
        return 0;
    for (i = 0; i < n; i++)
        if ((s[i] | 0x20) != word[i])
            return 0;
    return 1;
}

/* kmskeys.names.validate_prefix: [a-z][a-z0-9_-]{0,31}. */
static inline int kmsk_valid_prefix(const char *s, size_t len)
{
    size_t i;

    if (len == 0 || len > KMSKEYS_PREFIX_MAX || s[0] < 'a' || s[0] > 'z')
        return 0;
    for (i = 0; i < len; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || kmsk_digit(s[i]) || s[i] == '_' || s[i] == '-'))
            return 0;
    return 1;
}

/* kmskeys.names.validate_name: [A-Za-z0-9][A-Za-z0-9_./@+-]*, at most 200 bytes, no "..",
 * no empty or "." path segment (a NAME is a path below the resolver's blob_dir). */
static inline int kmsk_valid_name(const char *s, size_t len)
{
    size_t i, segment = 0;

    if (len == 0 || len > KMSKEYS_NAME_MAX || !kmsk_alnum(s[0]))
        return 0;
    for (i = 0; i <= len; i++) {
        if (i == len || s[i] == '/') {
            if (i == segment || (i == segment + 1 && s[segment] == '.'))
                return 0;
            segment = i + 1;
        } else if (!kmsk_in(s[i], "_.@+-") || (s[i] == '.' && i + 1 < len && s[i + 1] == '.')) {
            return 0;
        }
    }
    return 1;
}

/* What may follow the first `#` of a reference of a common shape under `prefix`, as the full
 * grammars accept it (kmskeys/awsname.py): under `ssm:` a VERSION (1..18 digits, no leading
 * zero) or a LABEL (1..100 of A-Z a-z 0-9 _ . -, not starting with a digit, nor with aws or ssm
 * in any case); nothing under the prefixes whose selectors have grammars of their own (`kms:`,
 * `token:`, `pass:`, `stored:`: kmskeys/secretref.py reads them); under `sm:` or a prefix of
 * the operator's naming, a FIELD (1..128 of A-Z a-z 0-9 _ . @ + -), which the sm: grammar
 * accepts as spelled. 0 leaves the reference to kmskeys/secretref.py. */
static inline int kmsk_common_selector(const char *prefix, size_t plen, const char *s, size_t len)
{
    size_t i, digits = 0;

    if (kmsk_is(prefix, plen, KMSKEYS_SSM_PREFIX)) {
        while (digits < len && kmsk_digit(s[digits]))
            digits++;
        if (len > 0 && digits == len)
            return len <= 18 && s[0] != '0';
        if (len == 0 || len > KMSKEYS_LABEL_MAX || digits > 0)
            return 0;
        for (i = 0; i < len; i++)
            if (!kmsk_in(s[i], "_.-"))
                return 0;
        return !kmsk_starts_nocase(s, len, "aws") && !kmsk_starts_nocase(s, len, "ssm");
    }
    if (kmsk_is(prefix, plen, KMSKEYS_DEFAULT_PREFIX) || kmsk_is(prefix, plen, KMSKEYS_TOKEN_PREFIX) ||
        kmsk_is(prefix, plen, KMSKEYS_PASS_PREFIX) || kmsk_is(prefix, plen, KMSKEYS_STORED_PREFIX))
        return 0;
    if (len == 0 || len > KMSKEYS_FIELD_MAX)
        return 0;
    for (i = 0; i < len; i++)
        if (!kmsk_in(s[i], "_.@+-"))
            return 0;
    return 1;
}

#endif
