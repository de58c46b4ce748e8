/* kmsk_wipe: zero a buffer that held a secret so that the compiler cannot drop the stores.
 *
 * Not glibc's explicit_bzero: that symbol is versioned GLIBC_2.25, and the wheel must load on
 * glibc 2.17 (manylinux2014, docs/packaging.md). A plain memset of a buffer that is never read
 * again is a dead store the compiler may remove; the empty asm below takes the pointer and
 * clobbers memory, so the compiler must assume the zeroes are read, and keeps them.
 */
#ifndef KMSK_WIPE_H
#define KMSK_WIPE_H

#include <string.h>

static inline void kmsk_wipe(void *s, size_t n)
{
    memset(s, 0, n);
    __asm__ __volatile__("" : : "r"(s) : "memory");
}

#endif
