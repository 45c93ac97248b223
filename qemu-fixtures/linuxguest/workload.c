/*
 * linuxguest workload: PID 1's only job inside the Linux test guest.
 *
 * It speaks the microguest's heartbeat protocol (see ../microguest/main.c) on
 * the virtio-serial port named "liveupgrade.hb", so the host rig reads both
 * guests the same way, and adds two disk fields: every 100 ms it writes a
 * sequence record to the virtio-blk disk (O_DIRECT, O_SYNC) and reads it back.
 *
 *   BOOT <fill_mib> <rate_mib_s> <hb_us> <disk_seq_found>
 *   READY <fill_us>
 *   HB <seq> <guest_us> <dirtied> <passes> <errors> <disk_seq> <disk_errors>
 *   ERR <page> <word> <expected> <got>
 *
 * Settings come from the kernel command line: lg.fill= lg.rate= lg.hb=
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../common/pattern.h"

#define PAGE_WORDS PATTERN_PAGE_WORDS
#define DISK_MAGIC 0x4c55504752414445ull /* "LUPGRADE" */
#define DISK_PERIOD_US 100000u

static FILE *port;
static uint32_t *gen_table;
static uint32_t *pattern;
static uint32_t errors, err_lines;

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint32_t arg(const char *cmdline, const char *key, uint32_t dflt)
{
    const char *p = strstr(cmdline, key);
    return p ? (uint32_t)strtoul(p + strlen(key), NULL, 10) : dflt;
}

static volatile uint32_t *page_ptr(uint32_t page)
{
    return pattern + (size_t)page * PAGE_WORDS;
}

static void write_page(uint32_t page, uint32_t gen)
{
    gen_table[page] = gen;
    pattern_write(page_ptr(page), page, gen);
}

/* As the microguest: count a bad page once, then rewrite it. */
static void verify_page(uint32_t page)
{
    uint32_t gen = gen_table[page], exp = 0, got = 0;
    uint32_t bad = pattern_check(page_ptr(page), page, gen, &exp, &got);
    if (bad != PAGE_WORDS) {
        errors++;
        if (err_lines++ < 16)
            fprintf(port, "ERR %x %x %x %x\n", page, bad, exp, got);
        write_page(page, gen);
    }
}

/* The heartbeat port's /dev name, found by its virtio-serial name. */
static FILE *open_port(void)
{
    for (int tries = 0; tries < 500; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[600], name[64] = "";
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            FILE *f = fopen(path, "r");
            if (!f)
                continue;
            if (fgets(name, sizeof name, f) && strncmp(name, "liveupgrade.hb", 14) == 0) {
                fclose(f);
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(d);
                FILE *p = fopen(path, "w");
                if (p)
                    setvbuf(p, NULL, _IOLBF, 0);
                return p;
            }
            fclose(f);
        }
        if (d)
            closedir(d);
        usleep(10000);
    }
    return NULL;
}

struct disk {
    int fd;
    void *buf;
    uint64_t seq;
    uint32_t errors;
};

static uint64_t disk_read_seq(struct disk *dk)
{
    if (dk->fd < 0 || pread(dk->fd, dk->buf, 4096, 0) != 4096)
        return 0;
    uint64_t *r = dk->buf;
    return r[0] == DISK_MAGIC && r[2] == ~r[1] ? r[1] : 0;
}

/* Write the next record, read it back, and count any difference. */
static void disk_step(struct disk *dk)
{
    if (dk->fd < 0)
        return;
    uint64_t *r = dk->buf;
    memset(dk->buf, 0, 4096);
    r[0] = DISK_MAGIC;
    r[1] = dk->seq + 1;
    r[2] = ~r[1];
    if (pwrite(dk->fd, dk->buf, 4096, 0) != 4096 || disk_read_seq(dk) != dk->seq + 1)
        dk->errors++;
    else
        dk->seq++;
}

int main(void)
{
    char cmdline[1024] = "";
    FILE *c = fopen("/proc/cmdline", "r");
    if (c) {
        if (!fgets(cmdline, sizeof cmdline, c))
            cmdline[0] = 0;
        fclose(c);
    }
    uint32_t fill_mib = arg(cmdline, "lg.fill=", 32);
    uint32_t rate_mib = arg(cmdline, "lg.rate=", 0);
    uint32_t hb_us = arg(cmdline, "lg.hb=", 10000);
    port = open_port();
    if (!port) {
        fprintf(stderr, "workload: no virtio-serial port named liveupgrade.hb\n");
        return 1;
    }
    struct disk dk = { .fd = open("/dev/vda", O_RDWR | O_DIRECT | O_SYNC) };
    if (posix_memalign(&dk.buf, 4096, 4096))
        return 1;
    dk.seq = disk_read_seq(&dk);
    fprintf(port, "BOOT %x %x %x %llx\n", fill_mib, rate_mib, hb_us, (unsigned long long)dk.seq);

    uint32_t pages = fill_mib * 256u;
    gen_table = calloc(pages ? pages : 1, sizeof *gen_table);
    pattern = mmap(NULL, (size_t)pages * 4096u + 4096u, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (!gen_table || pattern == MAP_FAILED)
        return 1;

    uint64_t start = now_us(), next_hb = start, next_disk = start, dirty_start = 0;
    uint64_t dirtied = 0;
    uint32_t seq = 0, passes = 0, filled = 0, verify_at = 0, dirty_at = 0;
    int ready = pages == 0;
    for (;;) {
        uint64_t now = now_us();
        if (now >= next_hb) {
            fprintf(port, "HB %x %llx %llx %x %x %llx %x\n", seq++, (unsigned long long)now,
                    (unsigned long long)dirtied, passes, errors, (unsigned long long)dk.seq, dk.errors);
            next_hb += hb_us;
            if (next_hb < now)
                next_hb = now + hb_us;
        }
        if (now >= next_disk) {
            disk_step(&dk);
            next_disk = now + DISK_PERIOD_US;
        }
        if (!ready) {
            for (int i = 0; i < 16 && filled < pages; i++, filled++)
                write_page(filled, 0);
            if (filled == pages) {
                ready = 1;
                dirty_start = now_us();
                fprintf(port, "READY %llx\n", (unsigned long long)(dirty_start - start));
            }
            continue;
        }
        if (!pages)
            continue;
        if (rate_mib) {
            uint64_t owed = (now - dirty_start) * rate_mib * 256u / 1000000u;
            for (int i = 0; dirtied < owed && i < 256; i++, dirtied++) {
                uint32_t gen = gen_table[dirty_at] + 1;
                gen_table[dirty_at] = gen;
                pattern_dirty(page_ptr(dirty_at), dirty_at, gen);
                if (++dirty_at == pages)
                    dirty_at = 0;
            }
        }
        for (int i = 0; i < 4; i++) {
            verify_page(verify_at);
            if (++verify_at == pages) {
                verify_at = 0;
                passes++;
            }
        }
    }
}
