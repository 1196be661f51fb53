/*
 * Native writers of the Avro values every event has many of: strings, ["null", "string"] unions,
 * strings already encoded as UTF-8, and longs. The encoders compiled by runtime/contract/avrowrite.py call
 * them, one call per field, instead of four or five Python operations per field; the bytes are the
 * same (the tests compare against fastavro and against the pure-Python code).
 *
 * Every function appends to a bytearray `out`. A value that does not fit raises TypeError (wrong
 * type) or ValueError (a long beyond 64 bits, a string with a lone surrogate), as the Python code
 * does, so the codec's fallback to fastavro explains it.
 *
 *   string(out, s)                 Avro string (zigzag length + UTF-8)
 *   opt_string(out, s, null_index) union of null and string; null_index is null's branch (0 or 1)
 *   utf8(out, b)                   Avro string whose UTF-8 bytes are given
 *   opt_utf8(out, b, null_index)   union of null and such a string
 *   long(out, v)                   Avro long
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* varint(zigzag(v)) into buf (at most 10 bytes); returns its length. */
static int zigzag(int64_t v, uint8_t *buf) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    int n = 0;
    while (z > 0x7F) {
        buf[n++] = (uint8_t)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    buf[n++] = (uint8_t)z;
    return n;
}

/* Append head (hn bytes) then data (n bytes) to the bytearray with one resize. */
static int append(PyObject *out, const uint8_t *head, int hn, const char *data, Py_ssize_t n) {
    if (!PyByteArray_CheckExact(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a bytearray");
        return -1;
    }
    Py_ssize_t len = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, len + hn + n) < 0) return -1;
    char *dst = PyByteArray_AS_STRING(out) + len;
    memcpy(dst, head, (size_t)hn);
    if (n) memcpy(dst + hn, data, (size_t)n);
    return 0;
}

/* A union branch index (0 or 1) followed by a string of n bytes. */
static int put_string(PyObject *out, int branch, const char *data, Py_ssize_t n) {
    uint8_t head[12];
    int hn = 0;
    if (branch >= 0) head[hn++] = (uint8_t)(branch << 1);
    hn += zigzag((int64_t)n, head + hn);
    return append(out, head, hn, data, n);
}

static int null_index_arg(PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return -1;
    if (i != 0 && i != 1) {
        PyErr_SetString(PyExc_ValueError, "null_index must be 0 or 1");
        return -1;
    }
    return (int)i;
}

static int write_str(PyObject *out, PyObject *s, int branch) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(s)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *data = PyUnicode_AsUTF8AndSize(s, &n);
    if (data == NULL) return -1;
    return put_string(out, branch, data, n);
}

static int write_utf8(PyObject *out, PyObject *b, int branch) {
    if (!PyBytes_Check(b)) {
        PyErr_Format(PyExc_TypeError, "expected bytes, got %.100s", Py_TYPE(b)->tp_name);
        return -1;
    }
    return put_string(out, branch, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
}

static int check_args(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
        return -1;
    }
    return 0;
}

static PyObject *w_string(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 2, "string") < 0 || write_str(args[0], args[1], -1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *w_utf8(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 2, "utf8") < 0 || write_utf8(args[0], args[1], -1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *optional(PyObject *const *args, Py_ssize_t nargs, const char *name,
                          int (*write)(PyObject *, PyObject *, int)) {
    if (check_args(nargs, 3, name) < 0) return NULL;
    int null_index = null_index_arg(args[2]);
    if (null_index < 0) return NULL;
    if (args[1] == Py_None) {
        uint8_t head = (uint8_t)(null_index << 1);
        if (append(args[0], &head, 1, NULL, 0) < 0) return NULL;
    } else if (write(args[0], args[1], 1 - null_index) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *w_opt_string(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return optional(args, nargs, "opt_string", write_str);
}

static PyObject *w_opt_utf8(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return optional(args, nargs, "opt_utf8", write_utf8);
}

static PyObject *w_long(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 2, "long") < 0) return NULL;
    PyObject *v = args[1];
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "expected int, got %.100s", Py_TYPE(v)->tp_name);
        return NULL;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return NULL;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%R does not fit an Avro long", v);
        return NULL;
    }
    uint8_t head[10];
    int hn = zigzag((int64_t)x, head);
    if (append(args[0], head, hn, NULL, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"string", (PyCFunction)(void (*)(void))w_string, METH_FASTCALL, "string(out, s): an Avro string"},
    {"opt_string", (PyCFunction)(void (*)(void))w_opt_string, METH_FASTCALL,
     "opt_string(out, s, null_index): a union of null and string"},
    {"utf8", (PyCFunction)(void (*)(void))w_utf8, METH_FASTCALL, "utf8(out, b): an Avro string given as UTF-8"},
    {"opt_utf8", (PyCFunction)(void (*)(void))w_opt_utf8, METH_FASTCALL,
     "opt_utf8(out, b, null_index): a union of null and a string given as UTF-8"},
    {"long", (PyCFunction)(void (*)(void))w_long, METH_FASTCALL, "long(out, v): an Avro long"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_avrowire", "Native writers of common Avro values.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__avrowire(void) { return PyModule_Create(&module); }
