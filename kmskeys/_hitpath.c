/* kmskeys._hitpath: the hit paths of kmskeys.get_secret and of Key.request().read(), in C.
 *
 * The rest of the binding is cffi (kmskeys/_build_keyutils.py). These functions are a
 * CPython extension (limited API, abi3) because the hit path's budget is 1.5x a C program that
 * does request_key + keyctl_read: a cffi call releases and retakes the GIL and converts its
 * arguments and result in Python, which alone costs about as much as the C program.
 *
 * fetch(desc, callout, dest) -> (serial, payload) or (serial, None, owner, fsuid)
 *     The full path: find the `user` key with request_key(2), which may upcall and wait (with
 *     the GIL released) and links it into dest (0: the kernel's default), check that this
 *     thread's fsuid owns it (keyctl_describe), read it. A key owned by someone else is never
 *     read: the 4-tuple names its owner (-1: its permissions hide it). Errors raise OSError.
 *     A key found and checked here is remembered for this thread, for one second.
 *
 * read_recent(serial) -> payload or None
 *     The hit: one keyctl_read of a serial this thread checked less than a second ago, or None
 *     (then the caller takes the full path). The kernel still checks the permissions, and a
 *     revoked, expired or invalidated key fails the read at once. The one-second bound caps how
 *     long a serial freed by the key GC and reused by an unrelated key could be trusted.
 *
 * key_request(cls, description, callout_info=None, destination=None, type=b"user") -> Key
 *     Key.request of the safe tier, whole (kmskeys.Key.request is this, as a classmethod):
 *     request_key(2) as given, then the same owner check as fetch, unless this thread checked
 *     the serial for this fsuid less than a second ago; a new `cls` with the serial. Anything
 *     but bytes (without NUL) and an int (or no) destination goes to kmskeys/_request.py,
 *     which converts it and calls again; a key owned by someone else goes to its failed_hook,
 *     which raises the client's error, and a failed request_key(2) to its destination_hook,
 *     which raises it too, or gives the serial of the key already in the destination when
 *     the kernel would not link it there (then checked as above; get_secret's code too). METH_FASTCALL: an argument tuple and its parsing would
 *     cost a good part of the few hundred nanoseconds the budget leaves above C.
 *
 * describe(ref, prefix) -> description or None
 *     The key description get_secret asks for, as bytes, when `ref` (str or bytes) is a valid
 *     NAME or a reference of a common shape (`PREFIX:NAME`, `sm:prod/db#password`,
 *     `ssm:app/db#3`, kmskeys/_names.h) and `prefix` a valid prefix: exactly the description
 *     kmskeys/names.py and kmskeys/secretref.py give it. None for anything else, valid or not,
 *     which kmskeys/secretref.py `described` reads (and refuses, saying why): so a cached
 *     secret in a fresh process loads no module to check its name.
 *
 * read(serial) -> payload or (owner, fsuid)
 *     Key.read of the safe tier: the owner check (skipped within the second, as above), then
 *     one keyctl_read. A payload over 32767 bytes (a big_key, a large keyring) raises OSError
 *     EMSGSIZE after the check passed: the caller reads it another way.
 *
 * Payloads are read into a stack buffer that is wiped before returning.
 *
 * BUILD_STAMP: the stamp of the sources this was built from (kmskeys/contract.h); kmskeys's
 * binding refuses to import a build whose stamp differs from kmskeys.BUILD_STAMP.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/keyctl.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>

#include "_wipe.h"
#include "contract.h"
#include "_names.h"

#include "_hitpath_keys.h"

static PyObject *fetch(PyObject *self, PyObject *args)
{
    const char *desc;
    PyObject *callout_obj;
    const char *callout = NULL;
    int dest, err = 0, failed;
    key_serial_t id = -1;
    long long owner;
    uid_t me;
    PyObject *payload;

    (void)self;
    if (!PyArg_ParseTuple(args, "yOi", &desc, &callout_obj, &dest))
        return NULL;
    if (callout_obj != Py_None) {
        callout = PyBytes_AsString(callout_obj);
        if (callout == NULL)
            return NULL;
    }
    /* request_key may upcall and wait for the resolver: other threads run meanwhile. The
     * arguments stay alive: the caller holds references to them. */
    Py_BEGIN_ALLOW_THREADS
    id = request_key("user", desc, callout, dest);
    if (id < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* The kernel checks permissions and sets ownership by fsuid; setfsuid(-1) changes nothing
     * and returns it. */
    me = (uid_t)setfsuid((uid_t)-1);
    owner = owner_of(id);
    if (owner != (long long)me) {
        forget(id);
        return Py_BuildValue("(iOLL)", id, Py_None, owner, (long long)me);
    }
    payload = payload_of(id, &failed);
    if (payload == NULL) {
        if (failed == 0)
            return NULL; /* no memory for the bytes object */
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    remember(id, me);
    return Py_BuildValue("(iN)", id, payload);
}

/* A bytes argument as a C string: 0, or 1 when it holds a NUL byte (the kernel takes C strings
 * and would see less than was asked for: the Python side refuses it). */
static int nul_in(PyObject *obj, const char **out)
{
    char *s;
    Py_ssize_t n;

    if (PyBytes_AsStringAndSize(obj, &s, &n) < 0)
        return -1;
    *out = s;
    return strlen(s) != (size_t)n;
}

/* Key.request of the safe tier, whole: a classmethod of kmskeys.Key (kmskeys/key.py), so that
 * a hit costs no Python frame. Bytes arguments and an int (or no) destination take the fast
 * path here; anything else goes to kmskeys._request.request_slow, a failed request to its
 * destination_hook and a failed check to its failed_hook, which raise the client's errors.
 * That module is imported the first time it is needed, never by `import kmskeys`. */
static PyObject *hook_slow, *hook_failed, *hook_dest, *serial_name;

static int load_hooks(void)
{
    PyObject *mod;

    if (hook_slow != NULL && hook_failed != NULL && hook_dest != NULL)
        return 0;
    mod = PyImport_ImportModule("kmskeys._request");
    if (mod == NULL)
        return -1;
    Py_XDECREF(hook_slow);
    Py_XDECREF(hook_failed);
    Py_XDECREF(hook_dest);
    hook_slow = PyObject_GetAttrString(mod, "request_slow");
    hook_failed = PyObject_GetAttrString(mod, "failed_hook");
    hook_dest = PyObject_GetAttrString(mod, "destination_hook");
    Py_DECREF(mod);
    if (hook_slow == NULL || hook_failed == NULL || hook_dest == NULL) {
        Py_CLEAR(hook_slow);
        Py_CLEAR(hook_failed);
        Py_CLEAR(hook_dest);
        return -1;
    }
    return 0;
}

static PyObject *slow_path(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *pos, *kw = NULL, *result = NULL;
    Py_ssize_t i, nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);

    if (load_hooks() < 0)
        return NULL;
    pos = PyTuple_New(nargs);
    if (pos == NULL)
        return NULL;
    for (i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(pos, i, args[i]);
    }
    if (nkw > 0) {
        kw = PyDict_New();
        for (i = 0; kw != NULL && i < nkw; i++)
            if (PyDict_SetItem(kw, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0)
                Py_CLEAR(kw);
        if (kw == NULL)
            goto done;
    }
    result = PyObject_Call(hook_slow, pos, kw);
done:
    Py_DECREF(pos);
    Py_XDECREF(kw);
    return result;
}

/* Call failed_hook with a Py_BuildValue format and its arguments: it raises the client's
 * error. */
#define FAILED(...) \
    (load_hooks() < 0 ? NULL : raised(PyObject_CallFunction(hook_failed, __VA_ARGS__)))

/* failed_hook raises the client's error; it returning is a bug of ours. */
static PyObject *raised(PyObject *result)
{
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    PyErr_SetString(PyExc_RuntimeError, "kmskeys: the failure hook did not raise");
    return NULL;
}

/* request_key(2) of arg[1] (callout arg[2], type arg[4]) into `dest` failed with `err`: the
 * serial of the key already in `dest`, which the kernel found but would not link there (a key
 * bound to a program grants LINK to nobody), from kmskeys._request.destination_hook; otherwise
 * -1 with the client's error raised. get_secret's failure path is the same Python code. */
static key_serial_t in_destination(PyObject **arg, int err, int dest)
{
    PyObject *found;
    long serial;

    if (load_hooks() < 0)
        return -1;
    found = PyObject_CallFunction(hook_dest, "OOiiO", arg[1], arg[2], err, dest,
                                  arg[4] == NULL ? Py_None : arg[4]);
    if (found == NULL)
        return -1;
    serial = PyLong_AsLong(found);
    Py_DECREF(found);
    if (serial <= 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "kmskeys: the failure hook gave no serial");
    return serial <= 0 ? -1 : (key_serial_t)serial;
}

static PyObject *key_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    /* cls, description, callout_info, destination, type */
    PyObject *arg[5] = {NULL, NULL, Py_None, Py_None, NULL};
    static const char *const names[5] = {"", "description", "callout_info", "destination", "type"};
    const char *type = "user", *desc, *callout = NULL;
    Py_ssize_t i, j, nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    int err = 0, dest;
    key_serial_t id = -1;
    long long owner = -1;
    uid_t me;
    allocfunc alloc;
    PyObject *key, *serial;

    (void)self;
    if (nargs < 1 || nargs > 5)
        return slow_path(args, nargs, kwnames);
    for (i = 0; i < nargs; i++)
        arg[i] = args[i];
    for (i = 0; i < nkw; i++) {
        for (j = 1; j < 5; j++)
            if (PyUnicode_CompareWithASCIIString(PyTuple_GetItem(kwnames, i), names[j]) == 0)
                break;
        if (j == 5 || j < nargs)
            return slow_path(args, nargs, kwnames); /* Python says what is wrong */
        arg[j] = args[nargs + i];
    }
    if (arg[1] == NULL || !PyType_Check(arg[0]) || !PyBytes_CheckExact(arg[1]) ||
        (arg[2] != Py_None && !PyBytes_CheckExact(arg[2])) ||
        (arg[3] != Py_None && !PyLong_CheckExact(arg[3])) ||
        (arg[4] != NULL && !PyBytes_CheckExact(arg[4])))
        return slow_path(args, nargs, kwnames);
    dest = arg[3] == Py_None ? 0 : (int)PyLong_AsLong(arg[3]);
    if (dest == -1 && PyErr_Occurred())
        return NULL;
    err = nul_in(arg[1], &desc);
    if (err == 0 && arg[2] != Py_None)
        err = nul_in(arg[2], &callout);
    if (err == 0 && arg[4] != NULL)
        err = nul_in(arg[4], &type);
    if (err != 0)
        return err < 0 ? NULL : slow_path(args, nargs, kwnames);
    Py_BEGIN_ALLOW_THREADS
    id = request_key(type, desc, callout, dest);
    if (id < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (err != 0 && (id = in_destination(arg, err, dest)) < 0)
        return NULL;
    me = (uid_t)setfsuid((uid_t)-1);
    switch (owned_by(id, me, &owner)) {
    case 1:
        break;
    case 0:
        return FAILED("OOi(iOLL)", arg[1], arg[2], 0, id, Py_None, owner, (long long)me);
    default:
        err = errno;
        return FAILED("OOiO", arg[1], arg[2], err, Py_None);
    }
    /* A plain slotted class: what object.__new__ does, then the one slot. */
    alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)arg[0], Py_tp_alloc);
    key = alloc((PyTypeObject *)arg[0], 0);
    if (key == NULL)
        return NULL;
    serial = PyLong_FromLong(id);
    if (serial == NULL || PyObject_SetAttr(key, serial_name, serial) < 0) {
        Py_XDECREF(serial);
        Py_DECREF(key);
        return NULL;
    }
    Py_DECREF(serial);
    return key;
}

static PyObject *read_checked(PyObject *self, PyObject *arg)
{
    long serial = PyLong_AsLong(arg);
    long long owner = -1;
    int failed;
    uid_t me;
    PyObject *payload;

    (void)self;
    if (serial == -1 && PyErr_Occurred())
        return NULL;
    me = (uid_t)setfsuid((uid_t)-1);
    switch (owned_by((key_serial_t)serial, me, &owner)) {
    case 1:
        break;
    case 0:
        return Py_BuildValue("(LL)", owner, (long long)me);
    default:
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    payload = payload_of((key_serial_t)serial, &failed);
    if (payload == NULL) {
        if (failed == 0)
            return NULL;
        if (failed != EMSGSIZE)
            forget((key_serial_t)serial);
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return payload;
}

static PyObject *read_recent(PyObject *self, PyObject *arg)
{
    long serial = PyLong_AsLong(arg);
    long long now;
    unsigned i;
    int failed;
    PyObject *payload;

    (void)self;
    if (serial == -1 && PyErr_Occurred())
        return NULL;
    now = now_ns();
    for (i = 0; i < RECENT; i++)
        if (recent[i].serial == (key_serial_t)serial && now - recent[i].checked_ns < RECENT_NS)
            break;
    /* Checked for the identity this thread had then: a process that changed its fsuid since
     * (setuid after fork, say) takes the full path, so it never reads a key it does not own. */
    if (i < RECENT && recent[i].fsuid != (uid_t)setfsuid((uid_t)-1))
        i = RECENT;
    if (i == RECENT)
        Py_RETURN_NONE;
    payload = payload_of((key_serial_t)serial, &failed);
    if (payload == NULL) {
        if (failed == 0)
            return NULL;
        recent[i].serial = 0;
        Py_RETURN_NONE;
    }
    return payload;
}

/* The bytes of a str (as UTF-8: any character beyond ASCII is outside every alphabet) or of
 * a bytes object: 0, or -1 for anything else, a subclass too (with no exception set). */
static int text_of(PyObject *obj, const char **out, Py_ssize_t *len)
{
    if (PyBytes_CheckExact(obj)) {
        if (PyBytes_AsStringAndSize(obj, (char **)out, len) == 0)
            return 0;
    } else if (PyUnicode_CheckExact(obj)) {
        *out = PyUnicode_AsUTF8AndSize(obj, len);
        if (*out != NULL)
            return 0;
    } else {
        return -1;
    }
    PyErr_Clear(); /* a lone surrogate, say: kmskeys/names.py says what is wrong */
    return -1;
}

static PyObject *describe(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *ref, *prefix, *colon, *hash;
    Py_ssize_t reflen, plen;
    size_t namelen, sellen, n;
    char out[KMSKEYS_PREFIX_MAX + 1 + KMSKEYS_NAME_MAX + 1 + KMSKEYS_FIELD_MAX];

    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "describe(ref, prefix) takes 2 arguments");
        return NULL;
    }
    if (!PyUnicode_CheckExact(args[1]) || text_of(args[0], &ref, &reflen) < 0 ||
        text_of(args[1], &prefix, &plen) < 0)
        Py_RETURN_NONE;
    /* kmskeys/secretref.py: `PREFIX:REST` names its own prefix, which may only differ from the
     * one asked for when that is the default. */
    colon = memchr(ref, ':', (size_t)reflen);
    if (colon != NULL) {
        size_t head = (size_t)(colon - ref);
        if (!kmsk_is(prefix, (size_t)plen, KMSKEYS_DEFAULT_PREFIX) &&
            ((size_t)plen != head || memcmp(prefix, ref, head) != 0))
            Py_RETURN_NONE;
        prefix = ref;
        plen = (Py_ssize_t)head;
        reflen -= (Py_ssize_t)head + 1;
        ref = colon + 1;
    }
    namelen = (size_t)reflen;
    hash = memchr(ref, '#', (size_t)reflen);
    if (hash != NULL) {
        namelen = (size_t)(hash - ref);
        sellen = (size_t)reflen - namelen - 1;
        if (!kmsk_common_selector(prefix, (size_t)plen, hash + 1, sellen))
            Py_RETURN_NONE;
    }
    if (!kmsk_valid_prefix(prefix, (size_t)plen) || !kmsk_valid_name(ref, namelen))
        Py_RETURN_NONE;
    /* Checked above: at most 32 + 1 + 200 + 1 + 128 bytes, none of them NUL. */
    n = (size_t)plen + 1 + (size_t)reflen;
    if (n > sizeof(out))
        Py_RETURN_NONE;
    memcpy(out, prefix, (size_t)plen);
    out[plen] = ':';
    memcpy(out + plen + 1, ref, (size_t)reflen);
    return PyBytes_FromStringAndSize(out, (Py_ssize_t)n);
}

static PyMethodDef methods[] = {
    {"fetch", fetch, METH_VARARGS,
     "fetch(desc, callout, dest): the full path of get_secret."},
    {"read_recent", read_recent, METH_O,
     "read_recent(serial): the payload of a key checked in the last second, or None."},
    {"read", read_checked, METH_O, "read(serial): Key.read with the owner check."},
    {"describe", (PyCFunction)(void (*)(void))describe, METH_FASTCALL,
     "describe(ref, prefix): the description of a name or common reference, or None."},
    {"key_request", (PyCFunction)(void (*)(void))key_request, METH_FASTCALL | METH_KEYWORDS,
     "key_request(cls, description, callout_info=None, destination=None, type=b'user')\n"
     "--\n\n"
     "Find a key, or have the kernel upcall to construct it when callout_info is not None;\n"
     "KeyOwnershipError if the key found is not owned by this process's fsuid.\n\n"
     "request_key(2) never upcalls with a NULL callout: pass b\"\" to upcall without one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kmskeys._hitpath", "The hit paths of get_secret and Key.request.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hitpath(void)
{
    PyObject *m;

    serial_name = PyUnicode_InternFromString("serial");
    if (serial_name == NULL)
        return NULL;
    m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "BUILD_STAMP", KMSKEYS_BUILD_STAMP) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
