/*
 * iojob: one direct-I/O job against a block device, for the storage bench's guest.
 * Built by vfiouser.bench.storage with the host's gcc, static and freestanding (no C
 * library), so it runs in the busybox initramfs as it is:
 *
 *   iojob DEVICE seqread|seqwrite|randread BLOCK SECONDS [SEED]
 *
 * Opens DEVICE with O_DIRECT and, for about SECONDS seconds, reads or writes BLOCK bytes at
 * a time, one request in flight (queue depth 1): sequential jobs walk the device from offset
 * 0 and wrap at its end; randread picks a BLOCK-aligned offset from a xorshift generator
 * seeded with SEED. Writes store a pattern that changes with every block. Prints one line:
 *
 *   iojob MODE BLOCK ops=N bytes=N ns=N
 *
 * Exit status 0 on success, 1 on a usage error, 2 if the device cannot be opened or sized,
 * 3 if an I/O fails (the failing call's errno is printed).
 */

#define PROGRAM "iojob"
#include "freestanding.h"

#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECT 040000
#define SEEK_END 2
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20
#define CLOCK_MONOTONIC 1

static unsigned long now_ns(void)
{
    long ts[2];
    sys6(SYS_clock_gettime, CLOCK_MONOTONIC, (long)ts, 0, 0, 0, 0);
    return (unsigned long)ts[0] * 1000000000UL + (unsigned long)ts[1];
}

void iojob_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    if (argc < 5)
        quit(1, "usage: iojob DEVICE seqread|seqwrite|randread BLOCK SECONDS [SEED]", 0);
    const char *mode = argv[2];
    int writing = same(mode, "seqwrite");
    int random = same(mode, "randread");
    if (!writing && !random && !same(mode, "seqread"))
        quit(1, "unknown mode", 0);
    unsigned long block = number(argv[3]);
    unsigned long limit = number(argv[4]) * 1000000000UL;
    unsigned long state = argc > 5 ? number(argv[5]) : 88172645463325252UL;
    if (block == 0 || block % 512)
        quit(1, "BLOCK must be a multiple of 512", 0);
    if (state == 0)
        state = 1;

    long fd = sys6(SYS_open, (long)argv[1], (writing ? O_RDWR : O_RDONLY) | O_DIRECT, 0, 0, 0, 0);
    if (fd < 0)
        quit(2, "cannot open the device", fd);
    long size = sys6(SYS_lseek, fd, 0, SEEK_END, 0, 0, 0);
    if (size < (long)block)
        quit(2, "cannot size the device, or it is smaller than BLOCK", size < 0 ? size : 0);
    unsigned long blocks = (unsigned long)size / block;
    long p = sys6(SYS_mmap, 0, (long)block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p < 0 && p > -4096)
        quit(2, "cannot allocate the buffer", p);
    unsigned long *buf = (unsigned long *)p;

    unsigned long ops = 0, bytes = 0, next = 0;
    unsigned long start = now_ns(), elapsed = 0;
    while (elapsed < limit) {
        unsigned long index;
        if (random) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            index = state % blocks;
        } else {
            index = next;
            next = (next + 1) % blocks;
        }
        long done;
        if (writing) {
            for (unsigned long i = 0; i < block / sizeof(*buf); i += 512 / sizeof(*buf))
                buf[i] = ops * 0x9E3779B97F4A7C15UL + i;
            done = sys6(SYS_pwrite64, fd, (long)buf, (long)block, (long)(index * block), 0, 0);
        } else {
            done = sys6(SYS_pread64, fd, (long)buf, (long)block, (long)(index * block), 0, 0);
        }
        if (done != (long)block)
            quit(3, writing ? "a write failed or was short" : "a read failed or was short", done < 0 ? done : 0);
        ops++;
        bytes += block;
        elapsed = now_ns() - start;
    }
    sys6(SYS_close, fd, 0, 0, 0, 0, 0);
    out(1, "iojob ");
    out(1, mode);
    out(1, " ");
    out_num(1, block);
    out(1, " ops=");
    out_num(1, ops);
    out(1, " bytes=");
    out_num(1, bytes);
    out(1, " ns=");
    out_num(1, elapsed);
    out(1, "\n");
    quit(0, 0, 0);
}

FREESTANDING_START(iojob_main);
