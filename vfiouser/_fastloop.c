/*
 * vfiouser._fastloop: the serving thread's hot loop in C.
 *
 * The pure-Python loop (vfiouser/server.py, transport.py, dispatch.py) costs
 * about 30,000 interpreter instructions per small REGION_READ on top of the
 * device model's own work; this module does the same for the messages the
 * Python fast path takes, and nothing else:
 *
 *   loop:
 *     recvmsg() into our buffer           (GIL released; blocking, or spinning
 *                                          spin_us first when asked)
 *     control data (fds) arrived?         -> hand everything to Python
 *     worker.hold()                        (the port's batch, as Session.process;
 *                                          a DeviceWorker's uncontended hold is
 *                                          done here, on its own attributes)
 *     for each whole message at the head:
 *       REGION_READ of 16 payload bytes, or REGION_WRITE of 1/2/4/8 data
 *       bytes, flags 0 or NO_REPLY, count within max_xfer:
 *         a shortcut of the port for it (devices/shortcut.py), kept per
 *         (region, offset, size, direction) while its guards hold: run it
 *         here, under the port's lock (a register's value, its read hook,
 *         its store and write hooks, or a handler's read/write);
 *         none, or SLOW: port.region_read(region, offset, bytearray(count)) /
 *         port.region_write(region, offset, bytes)
 *         reply (unless NO_REPLY) appended to the outbox's queue;
 *         an exception: dispatcher.failed(msg_id, cmd, flags, exc), as Python
 *       anything else, or a message not all here: stop
 *     send the queue (under the transport's send lock; what the socket does
 *     not take goes through transport.send)
 *     worker.release()                     (likewise)
 *     bytes left over (a message Python must handle) -> hand them to Python
 *
 * It returns to Python only to hand over: ("data", bytes, ancdata, msg_flags),
 * ("eof", None, None, 0) or ("error", errno, None, 0). Python's transport then
 * frames the bytes exactly as if it had received them (Transport.feed), so the
 * full path and everything it checks stay in one place; tests/test_hot_path.py
 * and tests/test_shortcuts.py run the same streams with and without this
 * module. For idio16's input register the whole wake-up calls two Python
 * functions, both the model's: its read hook and the property it reads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define HEADER_SIZE 16
#define ACCESS_SIZE 32 /* header + offset u64, region u32, count u32 */
#define CMD_REGION_READ 9
#define CMD_REGION_WRITE 10
#define FLAG_NO_REPLY 0x10
#define FLAG_REPLY 0x1
#define BUF_SIZE (64 * 1024)

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t max_xfer;
    double spin; /* seconds to poll after a batch before blocking */
    Py_ssize_t anc_size;
    PyObject *region_read;
    PyObject *region_write;
    PyObject *hold;
    PyObject *release;
    PyObject *outbox;
    PyObject *failed;
    PyObject *lock_acquire;
    PyObject *lock_release;
    PyObject *send_rest;
    PyObject *watchdog;
    PyObject *shortcut;   /* port.shortcut, or NULL: every access through region_read/region_write */
    PyObject *lock;       /* port.shortcut_lock, held around a shortcut */
    PyObject *cache;      /* {key: shortcut or None}, see find_shortcut */
    PyObject *gate;       /* the port's DeviceWorker: its uncontended hold and release done here */
    unsigned char *buf;
    unsigned char *anc;
} FastLoop;

static PyObject *str_queue, *str_since, *str_value, *str_acquire, *str_release, *str_gate, *str_holder, *str_held;

/* The kinds of devices/shortcut.py, and how long each one's tuple is. */
enum { SC_SLOW, SC_CALL, SC_VALUE, SC_HOOK, SC_SW_READ, SC_STORE, SC_SW_WRITE, SC_COMPOSE, SC_KINDS };
static const Py_ssize_t sc_length[SC_KINDS] = {2, 5, 4, 5, 4, 5, 4, 4};
#define CACHE_MAX 4096 /* shortcuts kept per session: a client scanning a BAR cannot grow it further */

static inline uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The cyclic GC must see what the loop refers to: a session's objects may form cycles through
 * it (it holds bound methods of the session's outbox, dispatcher and port, and a frame that holds
 * the loop can be reachable from the session, e.g. through a stored exception's traceback).
 * Without tp_traverse such a cycle looks externally referenced and is never freed. */
static int
fastloop_traverse(FastLoop *self, visitproc visit, void *arg)
{
    Py_VISIT(self->region_read);
    Py_VISIT(self->region_write);
    Py_VISIT(self->hold);
    Py_VISIT(self->release);
    Py_VISIT(self->outbox);
    Py_VISIT(self->failed);
    Py_VISIT(self->lock_acquire);
    Py_VISIT(self->lock_release);
    Py_VISIT(self->send_rest);
    Py_VISIT(self->watchdog);
    Py_VISIT(self->shortcut);
    Py_VISIT(self->lock);
    Py_VISIT(self->cache);
    Py_VISIT(self->gate);
    return 0;
}

static int
fastloop_clear(FastLoop *self)
{
    Py_CLEAR(self->region_read);
    Py_CLEAR(self->region_write);
    Py_CLEAR(self->hold);
    Py_CLEAR(self->release);
    Py_CLEAR(self->outbox);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->lock_acquire);
    Py_CLEAR(self->lock_release);
    Py_CLEAR(self->send_rest);
    Py_CLEAR(self->watchdog);
    Py_CLEAR(self->shortcut);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->gate);
    return 0;
}

static void
fastloop_dealloc(FastLoop *self)
{
    PyObject_GC_UnTrack(self);
    fastloop_clear(self);
    PyMem_Free(self->buf);
    PyMem_Free(self->anc);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
fastloop_init(FastLoop *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "region_read", "region_write", "hold", "release", "outbox", "failed",
                             "send_lock", "send_rest", "watchdog", "max_xfer", "anc_size", "spin", "shortcut",
                             "shortcut_lock", "gate", NULL};
    PyObject *region_read, *region_write, *hold, *release, *outbox, *failed, *lock, *send_rest, *watchdog;
    PyObject *shortcut = Py_None, *shortcut_lock = Py_None, *gate = Py_None;
    int fd;
    Py_ssize_t max_xfer, anc_size;
    double spin;
    /* parsed into locals (borrowed): the object's fields own references, also after a failure */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOOOOOOOnnd|OOO", kwlist, &fd, &region_read, &region_write,
                                     &hold, &release, &outbox, &failed, &lock, &send_rest, &watchdog, &max_xfer,
                                     &anc_size, &spin, &shortcut, &shortcut_lock, &gate))
        return -1;
    if (anc_size < 0 || anc_size > 4096) {
        PyErr_SetString(PyExc_ValueError, "anc_size out of range");
        return -1;
    }
    PyObject *acquire = PyObject_GetAttrString(lock, "acquire");
    PyObject *unlock = acquire == NULL ? NULL : PyObject_GetAttrString(lock, "release");
    if (unlock == NULL) {
        Py_XDECREF(acquire);
        return -1;
    }
    fastloop_clear(self); /* __init__ called again: drop what the first call took */
    PyMem_Free(self->buf);
    PyMem_Free(self->anc);
    self->buf = self->anc = NULL;
    self->fd = fd;
    self->max_xfer = max_xfer;
    self->anc_size = anc_size;
    self->spin = spin;
    self->region_read = Py_NewRef(region_read);
    self->region_write = Py_NewRef(region_write);
    self->hold = Py_NewRef(hold);
    self->release = Py_NewRef(release);
    self->outbox = Py_NewRef(outbox);
    self->failed = Py_NewRef(failed);
    self->send_rest = Py_NewRef(send_rest);
    self->watchdog = Py_NewRef(watchdog);
    self->lock_acquire = acquire;
    self->lock_release = unlock;
    if (gate != Py_None)
        self->gate = Py_NewRef(gate);
    if (shortcut != Py_None && shortcut_lock != Py_None) { /* both, or no shortcuts */
        self->shortcut = Py_NewRef(shortcut);
        self->lock = Py_NewRef(shortcut_lock);
        self->cache = PyDict_New();
        if (self->cache == NULL)
            return -1;
    }
    self->buf = PyMem_Malloc(BUF_SIZE);
    self->anc = PyMem_Malloc(anc_size ? anc_size : 1);
    if (self->buf == NULL || self->anc == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Set watchdog.since (0.0: idle). */
static int
set_since(FastLoop *self, double value)
{
    PyObject *v = PyFloat_FromDouble(value);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(self->watchdog, str_since, v);
    Py_DECREF(v);
    return r;
}

/* The control messages of one recvmsg as socket.recvmsg returns them: [(level, type, data)]. */
static PyObject *
ancillary(struct msghdr *msg)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        Py_ssize_t len = (Py_ssize_t)c->cmsg_len - (Py_ssize_t)CMSG_LEN(0);
        if (len < 0)
            len = 0;
        PyObject *item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, (char *)CMSG_DATA(c), len);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* Receive into the buffer: spinning (GIL released) for self->spin seconds first if asked. */
static ssize_t
receive(FastLoop *self, struct msghdr *msg, int *err)
{
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    if (self->spin > 0) {
        double until = monotonic() + self->spin;
        for (;;) {
            n = recvmsg(self->fd, msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                break;
            if (monotonic() >= until) {
                n = recvmsg(self->fd, msg, MSG_CMSG_CLOEXEC);
                break;
            }
            sched_yield();
        }
    } else {
        n = recvmsg(self->fd, msg, MSG_CMSG_CLOEXEC);
    }
    *err = errno;
    Py_END_ALLOW_THREADS
    return n;
}

/* Call port.region_read/region_write(region, offset, data) with vectorcall. */
static PyObject *
call3(PyObject *fn, uint32_t region, uint64_t offset, PyObject *data)
{
    PyObject *args[3];
    args[0] = PyLong_FromUnsignedLong(region);
    args[1] = PyLong_FromUnsignedLongLong(offset);
    args[2] = data;
    PyObject *result = NULL;
    if (args[0] != NULL && args[1] != NULL)
        result = PyObject_Vectorcall(fn, args, 3, NULL);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    return result;
}

/* A reply header and region access (msg_size = ACCESS_SIZE + extra) for the request at m. */
static void
reply_head(char *r, const unsigned char *m, uint32_t extra)
{
    uint32_t total = ACCESS_SIZE + extra, one = FLAG_REPLY, zero = 0;
    memcpy(r, m, 4); /* msg_id, cmd */
    memcpy(r + 4, &total, 4);
    memcpy(r + 8, &one, 4);
    memcpy(r + 12, &zero, 4);
    memcpy(r + 16, m + 16, 16); /* offset, region, count */
}

/* The model raised: dispatcher.failed(msg_id, cmd, flags, exc) logs it (with its traceback: the
 * exception is made the one being handled, as in Python's ``except`` clause) and queues the error
 * reply. 0, or -1 if that failed too. */
static int
model_failed(FastLoop *self, uint16_t msg_id, uint16_t cmd, uint32_t flags)
{
    PyObject *type, *value, *tb, *old_type, *old_value, *old_tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyErr_GetExcInfo(&old_type, &old_value, &old_tb);
    Py_XINCREF(type);
    Py_XINCREF(value);
    Py_XINCREF(tb);
    PyErr_SetExcInfo(type, value, tb); /* steals */
    PyObject *r = PyObject_CallFunction(self->failed, "IIIO", (unsigned)msg_id, (unsigned)cmd, (unsigned)flags,
                                        value ? value : Py_None);
    PyErr_SetExcInfo(old_type, old_value, old_tb); /* steals */
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* -- shortcuts (devices/shortcut.py) ------------------------------------------------------ */

/* 1 if every guard (obj, name, expected) of the shortcut has getattr(obj, name) is expected, 0 if
 * one does not, -1 on an error. */
static int
guards_hold(PyObject *cut)
{
    PyObject *guards = PyTuple_GET_ITEM(cut, 1);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(guards); i++) {
        PyObject *g = PyTuple_GET_ITEM(guards, i);
        PyObject *now = PyObject_GetAttr(PyTuple_GET_ITEM(g, 0), PyTuple_GET_ITEM(g, 1));
        if (now == NULL)
            return -1;
        int same = now == PyTuple_GET_ITEM(g, 2);
        Py_DECREF(now);
        if (!same)
            return 0;
    }
    return 1;
}

/* Whether a shortcut the port made is one this loop can run for this direction and size (the
 * loop indexes its tuple without further checks); depth 1: a COMPOSE's part. */
static int
well_formed(PyObject *cut, int write, uint32_t count, int depth)
{
    if (!PyTuple_CheckExact(cut) || PyTuple_GET_SIZE(cut) < 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(cut, 0))
        || !PyTuple_CheckExact(PyTuple_GET_ITEM(cut, 1)))
        return 0;
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(cut, 0));
    if (kind < 0 || kind >= SC_KINDS || PyTuple_GET_SIZE(cut) != sc_length[kind])
        return 0;
    if (write ? (kind == SC_VALUE || kind == SC_HOOK || kind == SC_SW_READ) : (kind == SC_STORE || kind == SC_SW_WRITE))
        return 0;
    if (depth > 0 && (kind == SC_SLOW || kind == SC_CALL || kind == SC_COMPOSE))
        return 0;
    PyObject *guards = PyTuple_GET_ITEM(cut, 1);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(guards); i++) {
        PyObject *g = PyTuple_GET_ITEM(guards, i);
        if (!PyTuple_CheckExact(g) || PyTuple_GET_SIZE(g) != 3 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(g, 1)))
            return 0;
    }
    if (kind == SC_COMPOSE) { /* (COMPOSE, guards, fill, ((pos, nbytes, part), ...)) */
        PyObject *parts = PyTuple_GET_ITEM(cut, 3);
        long fill = PyLong_Check(PyTuple_GET_ITEM(cut, 2)) ? PyLong_AsLong(PyTuple_GET_ITEM(cut, 2)) : -1;
        if (fill < 0 || fill > 255 || !PyTuple_CheckExact(parts))
            return 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
            PyObject *part = PyTuple_GET_ITEM(parts, i);
            if (!PyTuple_CheckExact(part) || PyTuple_GET_SIZE(part) != 3 || !PyLong_CheckExact(PyTuple_GET_ITEM(part, 0))
                || !PyLong_CheckExact(PyTuple_GET_ITEM(part, 1)))
                return 0;
            long pos = PyLong_AsLong(PyTuple_GET_ITEM(part, 0)), n = PyLong_AsLong(PyTuple_GET_ITEM(part, 1));
            if (pos < 0 || n < 1 || n > 8 || pos + n > (long)count
                || !well_formed(PyTuple_GET_ITEM(part, 2), write, (uint32_t)n, depth + 1))
                return 0;
        }
    }
    if (PyErr_Occurred()) { /* an int too large for a long */
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The shortcut for an access (a new reference): from the cache while its guards hold, else asked
 * of port.shortcut and kept. Py_None: go through the port's region_read/region_write. NULL: an
 * error (the port's, answered as the model's). */
static PyObject *
find_shortcut(FastLoop *self, uint32_t region, uint64_t offset, uint32_t count, int write)
{
    if (self->shortcut == NULL || region > 15 || offset >= ((uint64_t)1 << 40) || count > 8)
        Py_RETURN_NONE;
    PyObject *key = PyLong_FromUnsignedLongLong(offset << 9 | (uint64_t)write << 8 | (uint64_t)region << 4 | count);
    if (key == NULL)
        return NULL;
    PyObject *cut = PyDict_GetItemWithError(self->cache, key); /* borrowed */
    if (cut != NULL) {
        Py_INCREF(cut);
        int h = cut == Py_None ? 1 : guards_hold(cut);
        if (h != 0) {
            Py_DECREF(key);
            if (h < 0)
                Py_CLEAR(cut);
            return cut;
        }
        Py_DECREF(cut);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    cut = PyObject_CallFunction(self->shortcut, "IKIO", (unsigned)region, (unsigned long long)offset,
                                (unsigned)count, write ? Py_True : Py_False);
    if (cut != NULL && cut != Py_None && !well_formed(cut, write, count, 0)) {
        PyErr_Format(PyExc_TypeError, "port.shortcut returned %R for a %s: not a shortcut of %s", cut,
                     write ? "write" : "read", write ? "a write" : "a read");
        Py_CLEAR(cut);
    }
    if (cut != NULL && PyDict_GET_SIZE(self->cache) >= CACHE_MAX)
        PyDict_Clear(self->cache);
    if (cut != NULL && PyDict_SetItem(self->cache, key, cut) < 0)
        Py_CLEAR(cut);
    Py_DECREF(key);
    return cut;
}

/* lock.acquire() / lock.release(); the release keeps an exception already set. */
static int
lock_take(FastLoop *self)
{
    PyObject *r = PyObject_CallMethodNoArgs(self->lock, str_acquire);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
lock_drop(FastLoop *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodNoArgs(self->lock, str_release);
    if (r == NULL) {
        if (type != NULL) {
            PyErr_WriteUnraisable(self->lock);
            PyErr_Restore(type, value, tb);
        }
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return type == NULL ? 0 : -1;
}

/* Call fn(base, offset, data) (a CALL shortcut). */
static PyObject *
call_handler(PyObject *cut, PyObject *data)
{
    PyObject *args[3] = {PyTuple_GET_ITEM(cut, 3), PyTuple_GET_ITEM(cut, 4), data};
    return PyObject_Vectorcall(PyTuple_GET_ITEM(cut, 2), args, 3, NULL);
}

/* A read shortcut's value: the value of a VALUE, HOOK or SW_READ shortcut, as an int (new ref). */
static PyObject *
read_value(PyObject *cut, long kind)
{
    if (kind == SC_SW_READ)
        return PyObject_CallOneArg(PyTuple_GET_ITEM(cut, 2), PyTuple_GET_ITEM(cut, 3));
    PyObject *reg = PyTuple_GET_ITEM(cut, 2);
    PyObject *value = PyObject_GetAttr(reg, str_value); /* before the hook, as Register.sw_read */
    if (value == NULL)
        return NULL;
    PyObject *rmask = PyTuple_GET_ITEM(cut, kind == SC_HOOK ? 4 : 3);
    if (kind == SC_HOOK) {
        PyObject *computed = PyObject_CallOneArg(PyTuple_GET_ITEM(cut, 3), reg);
        if (computed == NULL) {
            Py_DECREF(value);
            return NULL;
        }
        if (computed != Py_None)
            Py_SETREF(value, computed);
        else
            Py_DECREF(computed);
    }
    Py_SETREF(value, PyNumber_And(value, rmask));
    return value;
}

/* Fill out[count] by the read shortcut cut (lock held). 0, or -1 with an exception. */
static int
run_read(PyObject *cut, long kind, unsigned char *out, uint32_t count)
{
    if (kind == SC_COMPOSE) {
        memset(out, (int)PyLong_AsLong(PyTuple_GET_ITEM(cut, 2)), count);
        PyObject *parts = PyTuple_GET_ITEM(cut, 3);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
            PyObject *part = PyTuple_GET_ITEM(parts, i), *sub = PyTuple_GET_ITEM(part, 2);
            if (run_read(sub, PyLong_AsLong(PyTuple_GET_ITEM(sub, 0)), out + PyLong_AsLong(PyTuple_GET_ITEM(part, 0)),
                         (uint32_t)PyLong_AsLong(PyTuple_GET_ITEM(part, 1))) < 0)
                return -1;
        }
        return 0;
    }
    if (kind == SC_CALL) {
        PyObject *data = PyByteArray_FromStringAndSize(NULL, count);
        if (data == NULL)
            return -1;
        memset(PyByteArray_AS_STRING(data), 0, count);
        PyObject *view = PyMemoryView_FromObject(data);
        PyObject *r = view == NULL ? NULL : call_handler(cut, view);
        Py_XDECREF(view);
        if (r != NULL && PyByteArray_GET_SIZE(data) == (Py_ssize_t)count)
            memcpy(out, PyByteArray_AS_STRING(data), count);
        Py_DECREF(data);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    PyObject *value = read_value(cut, kind);
    if (value == NULL)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(value); /* a non-int or negative raises, as struct would */
    Py_DECREF(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (count < 8 && v >> (8 * count)) {
        PyErr_Format(PyExc_OverflowError, "register value %#llx does not fit in %u bytes", v, (unsigned)count);
        return -1;
    }
    for (uint32_t i = 0; i < count; i++)
        out[i] = (unsigned char)(v >> (8 * i));
    return 0;
}

/* Apply the write shortcut cut to the count data bytes at p (lock held). 0, or -1. */
static int
run_write(PyObject *cut, long kind, const unsigned char *p, uint32_t count)
{
    if (kind == SC_COMPOSE) {
        PyObject *parts = PyTuple_GET_ITEM(cut, 3);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
            PyObject *part = PyTuple_GET_ITEM(parts, i), *sub = PyTuple_GET_ITEM(part, 2);
            if (run_write(sub, PyLong_AsLong(PyTuple_GET_ITEM(sub, 0)), p + PyLong_AsLong(PyTuple_GET_ITEM(part, 0)),
                          (uint32_t)PyLong_AsLong(PyTuple_GET_ITEM(part, 1))) < 0)
                return -1;
        }
        return 0;
    }
    if (kind == SC_CALL) {
        PyObject *data = PyBytes_FromStringAndSize((const char *)p, count);
        PyObject *r = data == NULL ? NULL : call_handler(cut, data);
        Py_XDECREF(data);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    unsigned long long v = 0;
    for (uint32_t i = 0; i < count; i++)
        v |= (unsigned long long)p[i] << (8 * i);
    PyObject *value = PyLong_FromUnsignedLongLong(v);
    if (value == NULL)
        return -1;
    PyObject *r = NULL;
    if (kind == SC_SW_WRITE) {
        PyObject *args[2] = {value, PyTuple_GET_ITEM(cut, 3)};
        r = PyObject_Vectorcall(PyTuple_GET_ITEM(cut, 2), args, 2, NULL);
    } else { /* STORE: reg.value = reg.value & keep | value & ~keep, then the hooks */
        PyObject *reg = PyTuple_GET_ITEM(cut, 2), *keep = PyTuple_GET_ITEM(cut, 3);
        PyObject *old = PyObject_GetAttr(reg, str_value);
        PyObject *kept = old == NULL ? NULL : PyNumber_And(old, keep);
        PyObject *mask = kept == NULL ? NULL : PyNumber_Invert(keep);
        PyObject *put = mask == NULL ? NULL : PyNumber_And(value, mask);
        PyObject *now = put == NULL ? NULL : PyNumber_Or(kept, put);
        int ok = now != NULL && PyObject_SetAttr(reg, str_value, now) == 0;
        Py_XDECREF(old);
        Py_XDECREF(kept);
        Py_XDECREF(mask);
        Py_XDECREF(put);
        Py_XDECREF(now);
        PyObject *hooks = PyTuple_GET_ITEM(cut, 4);
        if (ok && PyTuple_CheckExact(hooks) && PyTuple_GET_SIZE(hooks) == 0) {
            r = Py_NewRef(Py_None);
        } else if (ok) { /* iterated live, as Python's for loop over the register's list */
            PyObject *it = PyObject_GetIter(hooks), *fn;
            ok = it != NULL;
            while (ok && (fn = PyIter_Next(it)) != NULL) {
                PyObject *args[2] = {reg, value};
                PyObject *res = PyObject_Vectorcall(fn, args, 2, NULL);
                Py_DECREF(fn);
                if (res == NULL)
                    ok = 0;
                else
                    Py_DECREF(res);
            }
            Py_XDECREF(it);
            if (ok && !PyErr_Occurred())
                r = Py_NewRef(Py_None);
        }
    }
    Py_DECREF(value);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The access by shortcut: 1 if there is none to run (SLOW or None: the port's method serves it),
 * 0 done (out filled for a read), -1 an exception (the model's, or the port's). */
static int
by_shortcut(FastLoop *self, uint32_t region, uint64_t offset, uint32_t count, int write, const unsigned char *in,
            unsigned char *out)
{
    if (self->shortcut == NULL)
        return 1;
    /* The guards are checked with the lock held, as region_read reads the BAR and the IoManager
     * with it held: a thread that holds the lock may be changing where accesses go. */
    if (lock_take(self) < 0)
        return -1;
    int r = -1;
    PyObject *cut = find_shortcut(self, region, offset, count, write);
    if (cut != NULL) {
        long kind = cut == Py_None ? SC_SLOW : PyLong_AsLong(PyTuple_GET_ITEM(cut, 0));
        if (kind == SC_SLOW)
            r = 1;
        else
            r = write ? run_write(cut, kind, in, count) : run_read(cut, kind, out, count);
        Py_DECREF(cut);
    }
    if (lock_drop(self) < 0)
        r = -1;
    return r;
}

/* -- the messages ---------------------------------------------------------------------------- */

/* One message the Python fast path would take: handle it, queue its reply. 0 handled, 1 not
 * ours (stop here), -1 a Python error that is not the model's (propagate). */
static int
handle(FastLoop *self, const unsigned char *m, uint32_t size, PyObject *queue)
{
    uint16_t msg_id = rd16(m), cmd = rd16(m + 2);
    uint32_t flags = rd32(m + 8);
    if (flags != 0 && flags != FLAG_NO_REPLY)
        return 1;
    if (size < ACCESS_SIZE)
        return 1;
    uint64_t offset = rd64(m + 16);
    uint32_t region = rd32(m + 24), count = rd32(m + 28);
    PyObject *result, *reply = NULL;
    if (cmd == CMD_REGION_READ) {
        if (size != ACCESS_SIZE || count == 0 || count > (uint64_t)self->max_xfer)
            return 1;
        unsigned char small[8];
        int s = by_shortcut(self, region, offset, count, 0, NULL, small);
        if (s <= 0) {
            if (s < 0)
                return model_failed(self, msg_id, cmd, flags);
            if (flags)
                return 0;
            reply = PyBytes_FromStringAndSize(NULL, ACCESS_SIZE + count);
            if (reply == NULL)
                return -1;
            reply_head(PyBytes_AS_STRING(reply), m, count);
            memcpy(PyBytes_AS_STRING(reply) + ACCESS_SIZE, small, count);
            result = Py_NewRef(Py_None);
        } else {
            PyObject *data = PyByteArray_FromStringAndSize(NULL, count);
            if (data == NULL)
                return -1;
            memset(PyByteArray_AS_STRING(data), 0, count);
            PyObject *view = PyMemoryView_FromObject(data); /* what the Python path passes: a memoryview */
            if (view == NULL) {
                Py_DECREF(data);
                return -1;
            }
            result = call3(self->region_read, region, offset, view);
            Py_DECREF(view);
            if (result != NULL && !flags) {
                reply = PyBytes_FromStringAndSize(NULL, ACCESS_SIZE + count);
                if (reply != NULL) {
                    reply_head(PyBytes_AS_STRING(reply), m, count);
                    memcpy(PyBytes_AS_STRING(reply) + ACCESS_SIZE, PyByteArray_AS_STRING(data), count);
                }
            }
            Py_DECREF(data);
        }
    } else if (cmd == CMD_REGION_WRITE) {
        if (count != size - ACCESS_SIZE || (count != 1 && count != 2 && count != 4 && count != 8)
            || count > (uint64_t)self->max_xfer)
            return 1;
        int s = by_shortcut(self, region, offset, count, 1, m + ACCESS_SIZE, NULL);
        if (s < 0)
            return model_failed(self, msg_id, cmd, flags);
        if (s == 0) {
            result = Py_NewRef(Py_None);
        } else {
            PyObject *data = PyBytes_FromStringAndSize((const char *)m + ACCESS_SIZE, count);
            if (data == NULL)
                return -1;
            result = call3(self->region_write, region, offset, data);
            Py_DECREF(data);
        }
        if (result != NULL && !flags) {
            reply = PyBytes_FromStringAndSize(NULL, ACCESS_SIZE);
            if (reply != NULL)
                reply_head(PyBytes_AS_STRING(reply), m, 0);
        }
    } else {
        return 1;
    }
    if (result == NULL)
        return model_failed(self, msg_id, cmd, flags);
    Py_DECREF(result);
    if (!flags) {
        if (reply == NULL)
            return -1;
        int r = PyList_Append(queue, reply);
        Py_DECREF(reply);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* Send what the outbox queued, as Outbox.flush would: one send under the transport's send lock;
 * what the socket does not take (or an error) goes through transport.send, the general path. */
static int
flush(FastLoop *self, PyObject *queue)
{
    Py_ssize_t n = PyList_GET_SIZE(queue);
    if (n == 0)
        return 0;
    PyObject *data;
    if (n == 1) {
        data = PyList_GET_ITEM(queue, 0);
        Py_INCREF(data);
    } else {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        if (empty == NULL)
            return -1;
        data = _PyBytes_Join(empty, queue);
        Py_DECREF(empty);
        if (data == NULL)
            return -1;
    }
    if (PyList_SetSlice(queue, 0, n, NULL) < 0) {
        Py_DECREF(data);
        return -1;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
        Py_DECREF(data);
        return -1;
    }
    ssize_t sent = -1;
    int err = 0;
    PyObject *r = PyObject_CallNoArgs(self->lock_acquire);
    if (r != NULL) {
        Py_DECREF(r);
        sent = send(self->fd, buf.buf, buf.len, MSG_DONTWAIT | MSG_NOSIGNAL);
        err = errno;
        r = PyObject_CallNoArgs(self->lock_release);
        if (r != NULL)
            Py_DECREF(r);
    }
    Py_ssize_t len = buf.len;
    PyBuffer_Release(&buf);
    if (r == NULL) {
        Py_DECREF(data);
        return -1;
    }
    if (sent == len) {
        Py_DECREF(data);
        return 0;
    }
    PyObject *rest;
    if (sent < 0 && err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
        rest = data; /* the general path meets the same error and raises ConnectionClosed */
        Py_INCREF(rest);
    } else {
        PyObject *view = PyMemoryView_FromObject(data);
        rest = view == NULL ? NULL : PySequence_GetSlice(view, sent > 0 ? sent : 0, len);
        Py_XDECREF(view);
    }
    Py_DECREF(data);
    if (rest == NULL)
        return -1;
    r = PyObject_CallOneArg(self->send_rest, rest);
    Py_DECREF(rest);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Whether gate.<name> is the int `value` (-1 on an error). */
static int
gate_is(FastLoop *self, PyObject *name, long value)
{
    PyObject *v = PyObject_GetAttr(self->gate, name);
    if (v == NULL)
        return -1;
    int r = PyLong_CheckExact(v) && PyLong_AsLong(v) == value;
    Py_DECREF(v);
    if (PyErr_Occurred())
        return -1;
    return r;
}

/* worker.hold(). Uncontended (gate._gate == 0), what DeviceWorker.hold does, done here:
 * _holder = this thread, _gate = 1. ident: this thread's threading.get_ident(). */
static int
hold(FastLoop *self, PyObject *ident)
{
    if (self->gate != NULL) {
        int idle = gate_is(self, str_gate, 0);
        if (idle < 0)
            return -1;
        if (idle) {
            PyObject *one = PyLong_FromLong(1);
            int r = one == NULL || PyObject_SetAttr(self->gate, str_holder, ident) < 0
                    || PyObject_SetAttr(self->gate, str_gate, one) < 0 ? -1 : 0;
            Py_XDECREF(one);
            return r;
        }
    }
    PyObject *r = PyObject_CallNoArgs(self->hold);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The release proper: when the gate is held once and nothing was held back (gate._gate == 1,
 * gate._held an empty list), what DeviceWorker.release does, done here: _gate = 0; otherwise
 * worker.release(). */
static int
release_once(FastLoop *self)
{
    if (self->gate != NULL) {
        int once = gate_is(self, str_gate, 1);
        if (once < 0)
            return -1;
        if (once) {
            PyObject *held = PyObject_GetAttr(self->gate, str_held);
            if (held == NULL)
                return -1;
            int empty = PyList_CheckExact(held) && PyList_GET_SIZE(held) == 0;
            Py_DECREF(held);
            if (empty) {
                PyObject *zero = PyLong_FromLong(0);
                int r = zero == NULL || PyObject_SetAttr(self->gate, str_gate, zero) < 0 ? -1 : 0;
                Py_XDECREF(zero);
                return r;
            }
        }
    }
    PyObject *r = PyObject_CallNoArgs(self->release);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* worker.release(); an exception already set is kept (the release's own is reported). */
static int
release(FastLoop *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (release_once(self) < 0) {
        if (type != NULL) {
            PyErr_WriteUnraisable(self->release);
            PyErr_Restore(type, value, tb);
        }
        return -1;
    }
    PyErr_Restore(type, value, tb);
    return type == NULL ? 0 : -1;
}

static PyObject *
serve(FastLoop *self, PyObject *ident)
{
    struct iovec iov;
    struct msghdr msg;
    for (;;) {
        memset(&msg, 0, sizeof(msg));
        iov.iov_base = self->buf;
        iov.iov_len = BUF_SIZE;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self->anc_size ? self->anc : NULL;
        msg.msg_controllen = self->anc_size;
        int err = 0;
        ssize_t n = receive(self, &msg, &err);
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            return Py_BuildValue("(siOi)", "error", err, Py_None, 0);
        }
        if (n == 0)
            return Py_BuildValue("(sOOi)", "eof", Py_None, Py_None, 0);
        if (msg.msg_controllen > 0 || (msg.msg_flags & MSG_CTRUNC)) {
            PyObject *anc = ancillary(&msg);
            if (anc == NULL)
                return NULL;
            PyObject *out = Py_BuildValue("(sy#Ni)", "data", (char *)self->buf, (Py_ssize_t)n, anc, msg.msg_flags);
            return out;
        }
        if (set_since(self, monotonic()) < 0)
            return NULL;
        if (hold(self, ident) < 0)
            return NULL;
        PyObject *queue = PyObject_GetAttr(self->outbox, str_queue);
        int failed = queue == NULL || !PyList_Check(queue);
        if (queue != NULL && !PyList_Check(queue))
            PyErr_SetString(PyExc_TypeError, "outbox.queue is not a list");
        ssize_t pos = 0;
        while (!failed && n - pos >= HEADER_SIZE) {
            uint32_t size = rd32(self->buf + pos + 4);
            if (size < HEADER_SIZE || (ssize_t)size > n - pos)
                break;
            int h = handle(self, self->buf + pos, size, queue);
            if (h < 0)
                failed = 1;
            else if (h > 0)
                break;
            else
                pos += size;
        }
        if (!failed && flush(self, queue) < 0)
            failed = 1;
        Py_XDECREF(queue);
        if (release(self) < 0)
            failed = 1;
        if (failed) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (set_since(self, 0.0) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
            return NULL;
        }
        if (set_since(self, 0.0) < 0)
            return NULL;
        if (pos < n)
            return Py_BuildValue("(sy#Oi)", "data", (char *)self->buf + pos, (Py_ssize_t)(n - pos), Py_None, 0);
    }
}

static PyObject *
fastloop_cached(FastLoop *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->cache == NULL ? 0 : PyDict_GET_SIZE(self->cache));
}

static PyGetSetDef fastloop_getset[] = {
    {"cached", (getter)fastloop_cached, NULL, "How many shortcuts the loop keeps now (at most 4096).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *
fastloop_run(FastLoop *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buf == NULL || self->anc == NULL || self->hold == NULL) { /* not initialised, or cleared by the GC */
        PyErr_SetString(PyExc_RuntimeError, "FastLoop is not initialised");
        return NULL;
    }
    PyObject *ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident()); /* threading.get_ident() */
    if (ident == NULL)
        return NULL;
    PyObject *out = serve(self, ident);
    Py_DECREF(ident);
    return out;
}

static PyMethodDef fastloop_methods[] = {
    {"run", (PyCFunction)fastloop_run, METH_NOARGS,
     "Serve fast-path messages until something must go to Python: returns (kind, data, ancdata, msg_flags)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfiouser._fastloop.FastLoop",
    .tp_doc = PyDoc_STR("The serving thread's hot loop for one session (see the module docstring)."),
    .tp_basicsize = sizeof(FastLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)fastloop_traverse,
    .tp_clear = (inquiry)fastloop_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fastloop_init,
    .tp_dealloc = (destructor)fastloop_dealloc,
    .tp_methods = fastloop_methods,
    .tp_getset = fastloop_getset,
};

static struct PyModuleDef fastloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vfiouser._fastloop",
    .m_doc = PyDoc_STR("The serving thread's hot loop in C: the messages the Python fast path takes, nothing else."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastloop(void)
{
    str_queue = PyUnicode_InternFromString("queue");
    str_since = PyUnicode_InternFromString("since");
    str_value = PyUnicode_InternFromString("value");
    str_acquire = PyUnicode_InternFromString("acquire");
    str_release = PyUnicode_InternFromString("release");
    str_gate = PyUnicode_InternFromString("_gate");
    str_holder = PyUnicode_InternFromString("_holder");
    str_held = PyUnicode_InternFromString("_held");
    if (str_queue == NULL || str_since == NULL || str_value == NULL || str_acquire == NULL || str_release == NULL
        || str_gate == NULL || str_holder == NULL || str_held == NULL || PyType_Ready(&FastLoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastloop_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastLoopType);
    if (PyModule_AddObject(m, "FastLoop", (PyObject *)&FastLoopType) < 0) {
        Py_DECREF(&FastLoopType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
