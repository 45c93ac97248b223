/*
 * microguest: a freestanding multiboot guest for live-upgrade tests.
 *
 * Why it exists: a Linux guest takes seconds to boot under TCG; this one is
 * ready in milliseconds and still exercises what an upgrade must preserve.
 * It fills a region of RAM with a per-page pattern that depends on the page
 * number and a per-page generation, re-dirties pages at a configured rate,
 * verifies every page continuously (against a generation table that is also
 * in guest RAM, so a stale page from a lost dirty update is caught too), and
 * prints a heartbeat line on COM1 every `hb` microseconds of guest time.
 *
 * Protocol (all numbers hex, one line each, '\n' terminated):
 *   BOOT <fill_mib> <rate_mib_s> <hb_us> <mem_upper_kib>
 *   READY <fill_us>                      fill finished, verification starts
 *   HB <seq> <guest_us> <dirtied> <passes> <errors>
 *   ERR <page> <word> <expected> <got>   a verification failure
 *
 * Kernel command line (QEMU -append): fill=MiB rate=MiB/s hb=us
 * Guest time is the ACPI PM timer (3.579545 MHz, QEMU's virtual clock): it
 * stops while the VM is stopped, so a host-seen gap is the guest's pause.
 */
#include "../common/pattern.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define PM_TIMER_PORT 0x608
#define PM_TIMER_HZ 3579545u
#define GEN_TABLE ((volatile u32 *)0x00800000) /* 8 MiB: one u32 per page */
#define PATTERN_BASE 0x01000000u                /* 16 MiB */
#define PAGE_WORDS PATTERN_PAGE_WORDS
#define VERIFY_PAGES_PER_STEP 4u
#define FILL_PAGES_PER_STEP 4u
#define MAX_ERR_LINES 16u

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* 64-bit division helpers gcc calls on i386; we have no libgcc. */
u64 __udivdi3(u64 n, u64 d)
{
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) { r -= d; q |= (u64)1 << i; }
    }
    return q;
}

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);    /* no interrupts */
    outb(COM1 + 3, 0x80);    /* DLAB */
    outb(COM1 + 0, 0x01);    /* 115200 baud (irrelevant for QEMU) */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);    /* 8N1 */
    outb(COM1 + 2, 0xc7);    /* FIFO on */
}

static void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void puthex(u64 v)
{
    char buf[17];
    int i = 16;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    puts(buf + i);
}

static void field(u64 v) { putc(' '); puthex(v); }

/* Guest clock: the 24-bit-safe PM timer extended to 64 bits by polling. */
static u32 pm_last;
static u64 pm_ticks;

static u64 guest_ticks(void)
{
    u32 now = inl(PM_TIMER_PORT);
    pm_ticks += (now - pm_last) & 0xffffff;
    pm_last = now;
    return pm_ticks;
}

static u64 ticks_to_us(u64 t) { return t * 1000000u / PM_TIMER_HZ; }

static u32 parse_arg(const char *cmdline, const char *key, u32 dflt)
{
    if (!cmdline)
        return dflt;
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=')
            continue;
        u32 v = 0;
        for (q++; *q >= '0' && *q <= '9'; q++)
            v = v * 10 + (u32)(*q - '0');
        return v;
    }
    return dflt;
}

static inline volatile u32 *page_ptr(u32 page) { return (volatile u32 *)(PATTERN_BASE + page * 4096u); }

static void write_page(u32 page, u32 gen)
{
    GEN_TABLE[page] = gen;
    pattern_write(page_ptr(page), page, gen);
}

static void dirty_page(u32 page)
{
    u32 gen = GEN_TABLE[page] + 1;
    GEN_TABLE[page] = gen;
    pattern_dirty(page_ptr(page), page, gen);
}

static u32 errors, err_lines;

static void report(u32 page, u32 word, u32 expected, u32 got)
{
    if (err_lines++ < MAX_ERR_LINES) {
        puts("ERR");
        field(page); field(word); field(expected); field(got);
        putc('\n');
    }
}

/* Verify one page; on a mismatch count one error and rewrite the page so a
 * single corruption is reported once, not on every pass. */
static void verify_page(u32 page)
{
    u32 gen = GEN_TABLE[page], expected = 0, got = 0;
    u32 bad_word = pattern_check(page_ptr(page), page, gen, &expected, &got);
    if (bad_word != PAGE_WORDS) {
        errors++;
        report(page, bad_word, expected, got);
        write_page(page, gen);
    }
}

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

void guest_main(u32 magic, struct multiboot_info *mbi)
{
    serial_init();
    const char *cmdline = (magic == 0x2BADB002 && (mbi->flags & 4)) ? (const char *)mbi->cmdline : 0;
    u32 mem_upper_kib = (magic == 0x2BADB002 && (mbi->flags & 1)) ? mbi->mem_upper : 0;
    u32 fill_mib = parse_arg(cmdline, "fill", 32);
    u32 rate_mib = parse_arg(cmdline, "rate", 0);
    u32 hb_us = parse_arg(cmdline, "hb", 2000);
    /* RAM above 1 MiB, minus the 16 MiB below the pattern, within 32-bit reach. */
    u32 avail_mib = mem_upper_kib / 1024 > 16 ? mem_upper_kib / 1024 - 16 : 0;
    if (avail_mib > 3000)
        avail_mib = 3000;
    if (fill_mib > avail_mib)
        fill_mib = avail_mib;
    if (hb_us < 100)
        hb_us = 100;
    u32 pages = fill_mib * 256u;

    puts("BOOT"); field(fill_mib); field(rate_mib); field(hb_us); field(mem_upper_kib); putc('\n');

    pm_last = inl(PM_TIMER_PORT);
    u64 hb_ticks = (u64)hb_us * PM_TIMER_HZ / 1000000u;
    u64 next_hb = 0, dirty_done = 0, fill_start = guest_ticks();
    u32 seq = 0, passes = 0, filled = 0, verify_at = 0, dirty_at = 0;
    u64 dirty_start = 0;
    u32 ready = pages == 0;

    for (;;) {
        u64 now = guest_ticks();
        if (now >= next_hb) {
            puts("HB"); field(seq++); field(ticks_to_us(now)); field(dirty_done);
            field(passes); field(errors); putc('\n');
            next_hb += hb_ticks;
            if (next_hb < now)
                next_hb = now + hb_ticks;
        }
        if (!ready) {
            for (u32 i = 0; i < FILL_PAGES_PER_STEP && filled < pages; i++, filled++)
                write_page(filled, 0);
            if (filled == pages) {
                ready = 1;
                dirty_start = guest_ticks();
                puts("READY"); field(ticks_to_us(dirty_start - fill_start)); putc('\n');
            }
            continue;
        }
        if (pages == 0)
            continue;
        if (rate_mib) {
            u64 owed = (now - dirty_start) * rate_mib * 256u / PM_TIMER_HZ;
            for (u32 i = 0; dirty_done < owed && i < 256; i++, dirty_done++) {
                dirty_page(dirty_at);
                if (++dirty_at == pages)
                    dirty_at = 0;
            }
        }
        for (u32 i = 0; i < VERIFY_PAGES_PER_STEP; i++) {
            verify_page(verify_at);
            if (++verify_at == pages) {
                verify_at = 0;
                passes++;
            }
        }
    }
}
