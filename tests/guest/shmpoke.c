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

#define SYS_write 1
#define SYS_open 2
#define SYS_mmap 9
#define SYS_exit 60
#define O_RDWR 2
#define O_SYNC 04010000
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_SHARED 1
#define PAGE 4096UL

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static void out(const char *s, unsigned long n) { sys6(SYS_write, 1, (long)s, (long)n, 0, 0, 0); }

static unsigned long len(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    return n;
}

static __attribute__((noreturn)) void quit(int code, const char *why)
{
    if (why) {
        sys6(SYS_write, 2, (long)why, (long)len(why), 0, 0, 0);
        sys6(SYS_write, 2, (long)"\n", 1, 0, 0, 0);
    }
    sys6(SYS_exit, code, 0, 0, 0, 0, 0);
    for (;;)
        ;
}

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static unsigned long number(const char *s)
{
    unsigned long v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, s += 2;
    if (!*s)
        quit(1, "shmpoke: empty number");
    for (; *s; s++) {
        unsigned long d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            quit(1, "shmpoke: bad number");
        if (d >= base)
            quit(1, "shmpoke: bad number");
        v = v * base + d;
    }
    return v;
}

static volatile unsigned char *map(const char *path, unsigned long end)
{
    long fd = sys6(SYS_open, (long)path, O_RDWR | O_SYNC, 0, 0, 0, 0);
    if (fd < 0)
        quit(2, "shmpoke: cannot open the file");
    unsigned long size = (end + PAGE - 1) & ~(PAGE - 1);
    long p = sys6(SYS_mmap, 0, (long)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p < 0 && p > -4096)
        quit(2, "shmpoke: cannot map the file");
    return (volatile unsigned char *)p;
}

void shmpoke_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    if (argc < 5)
        quit(1, "usage: shmpoke FILE read|write|fill OFFSET LEN|TEXT [BYTE]");
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
            out(buf, k);
        }
        out("\n", 1);
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
        quit(1, "shmpoke: unknown operation");
    }
    quit(0, 0);
}

__asm__(".globl _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call shmpoke_main\n"
        "  hlt\n");
