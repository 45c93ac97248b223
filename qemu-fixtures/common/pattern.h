/*
 * The memory pattern both fixture guests write and verify, in one place so
 * the microguest and the linuxguest cannot drift apart.
 *
 * A 4 KiB page holds 1024 32-bit words: [0] its page number, [1] its
 * generation, [2] mix(page, generation), [3..1023] static_word(page, j).
 * Re-dirtying a page bumps its generation (two stores); the guest keeps the
 * expected generation of every page in a separate table, so a page that an
 * upgrade brought over stale (a lost dirty update) fails verification too.
 * Freestanding: no libc, no headers.
 */
#ifndef LIVEUPGRADE_PATTERN_H
#define LIVEUPGRADE_PATTERN_H

#define PATTERN_PAGE_WORDS 1024u

static inline unsigned int pattern_mix(unsigned int page, unsigned int gen)
{
    unsigned int x = page * 0x85ebca6bu ^ gen * 0xc2b2ae35u;
    x ^= x >> 16;
    return x * 0x27d4eb2du;
}

static inline unsigned int pattern_static_word(unsigned int page, unsigned int j)
{
    return (page * 0x9e3779b9u) ^ (j * 0x7feb352du) ^ 0xa5a5a5a5u;
}

static inline void pattern_write(volatile unsigned int *w, unsigned int page, unsigned int gen)
{
    w[0] = page;
    w[1] = gen;
    w[2] = pattern_mix(page, gen);
    for (unsigned int j = 3; j < PATTERN_PAGE_WORDS; j++)
        w[j] = pattern_static_word(page, j);
}

static inline void pattern_dirty(volatile unsigned int *w, unsigned int page, unsigned int gen)
{
    w[1] = gen;
    w[2] = pattern_mix(page, gen);
}

/* The first wrong word of the page (PATTERN_PAGE_WORDS if none), with what
 * was expected and what was found. */
static inline unsigned int pattern_check(const volatile unsigned int *w, unsigned int page,
                                         unsigned int gen, unsigned int *expected,
                                         unsigned int *got)
{
    unsigned int e;
    for (unsigned int j = 0; j < PATTERN_PAGE_WORDS; j++) {
        e = j == 0 ? page : j == 1 ? gen : j == 2 ? pattern_mix(page, gen)
                                                  : pattern_static_word(page, j);
        if (w[j] != e) {
            *expected = e;
            *got = w[j];
            return j;
        }
    }
    return PATTERN_PAGE_WORDS;
}

#endif
