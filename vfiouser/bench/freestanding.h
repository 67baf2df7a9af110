/*
 * freestanding.h: the little a static, libc-free x86-64 Linux tool needs, shared by the guest
 * tools the project builds for the busybox initramfs (vfiouser/bench/iojob.c for the storage
 * bench, tests/guest/shmpoke.c for the ivshmem guest test).
 *
 * A tool defines PROGRAM (its name, for error lines) before including this file, and ends with
 * FREESTANDING_START(its_main), where its_main(long *sp) reads argc and argv from the initial
 * stack: argc = sp[0], argv = (char **)(sp + 1).
 */
#ifndef FREESTANDING_H
#define FREESTANDING_H

#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_lseek 8
#define SYS_mmap 9
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_exit 60
#define SYS_clock_gettime 228

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

static unsigned long len(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    return n;
}

static void out_n(int fd, const char *s, unsigned long n) { sys6(SYS_write, fd, (long)s, (long)n, 0, 0, 0); }

static void out(int fd, const char *s) { out_n(fd, s, len(s)); }

static void out_num(int fd, unsigned long v)
{
    char buf[24];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    out(fd, buf + i);
}

/* Exit with `code`; with `why`, first print "PROGRAM: why" (and " (errno N)" if err < 0). */
static __attribute__((noreturn, unused)) void quit(int code, const char *why, long err)
{
    if (why) {
        out(2, PROGRAM ": ");
        out(2, why);
        if (err < 0) {
            out(2, " (errno ");
            out_num(2, (unsigned long)-err);
            out(2, ")");
        }
        out(2, "\n");
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

/* A decimal or 0x-hex number; a usage error (exit 1) if it is not one. */
static unsigned long number(const char *s)
{
    unsigned long v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, s += 2;
    if (!*s)
        quit(1, "empty number", 0);
    for (; *s; s++) {
        unsigned long d;
        if (*s >= '0' && *s <= '9')
            d = (unsigned long)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (unsigned long)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (unsigned long)(*s - 'A' + 10);
        else
            quit(1, "bad number", 0);
        v = v * base + d;
    }
    return v;
}

#define FREESTANDING_START(main_fn)                                                                \
    __asm__(".globl _start\n"                                                                      \
            "_start:\n"                                                                            \
            "  xor %rbp, %rbp\n"                                                                   \
            "  mov %rsp, %rdi\n"                                                                   \
            "  and $-16, %rsp\n"                                                                   \
            "  call " #main_fn "\n"                                                                \
            "  hlt\n")

#endif
