/*
 * shmpoke: map a file (a PCI BAR's sysfs resourceN file) and read, write or fill bytes in it.
 * Built by the test-suite for the guest, freestanding and static, so the busybox initramfs needs
 * no C library:
 *
 *   shmpoke FILE read OFFSET LEN        print LEN bytes at OFFSET (as they are)
 *   shmpoke FILE write OFFSET TEXT      store TEXT at OFFSET
 *   shmpoke FILE fill OFFSET LEN BYTE   store LEN copies of BYTE at OFFSET
 *
 * Numbers are decimal or 0x-hex. Every access is a single-byte volatile load or store, as a
 * driver touching device memory would do. Exit status 0 on success, 1 on a usage error, 2 if the
 * file cannot be opened or mapped.
 */

#define PROGRAM "shmpoke"
#include "freestanding.h"

#define O_RDWR 2
#define O_SYNC 04010000
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_SHARED 1
#define PAGE 4096UL

static volatile unsigned char *map(const char *path, unsigned long end)
{
    long fd = sys6(SYS_open, (long)path, O_RDWR | O_SYNC, 0, 0, 0, 0);
    if (fd < 0)
        quit(2, "cannot open the file", fd);
    unsigned long size = (end + PAGE - 1) & ~(PAGE - 1);
    long p = sys6(SYS_mmap, 0, (long)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p < 0 && p > -4096)
        quit(2, "cannot map the file", p);
    return (volatile unsigned char *)p;
}

void shmpoke_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    if (argc < 5)
        quit(1, "usage: shmpoke FILE read|write|fill OFFSET LEN|TEXT [BYTE]", 0);
    unsigned long off = number(argv[3]);
    if (same(argv[2], "read")) {
        unsigned long n = number(argv[4]);
        volatile unsigned char *m = map(argv[1], off + n);
        char buf[256];
        unsigned long i = 0;
        while (i < n) {
            unsigned long k = 0;
            for (; k < sizeof(buf) && i < n; k++, i++)
                buf[k] = m[off + i];
            out_n(1, buf, k);
        }
        out(1, "\n");
    } else if (same(argv[2], "write")) {
        const char *text = argv[4];
        unsigned long n = len(text);
        volatile unsigned char *m = map(argv[1], off + n);
        for (unsigned long i = 0; i < n; i++)
            m[off + i] = (unsigned char)text[i];
    } else if (same(argv[2], "fill") && argc >= 6) {
        unsigned long n = number(argv[4]);
        unsigned char byte = (unsigned char)number(argv[5]);
        volatile unsigned char *m = map(argv[1], off + n);
        for (unsigned long i = 0; i < n; i++)
            m[off + i] = byte;
    } else {
        quit(1, "unknown operation", 0);
    }
    quit(0, 0, 0);
}

FREESTANDING_START(shmpoke_main);
