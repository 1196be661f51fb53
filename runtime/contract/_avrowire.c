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
 *
 * And one reader, the twin of runtime/contract/avroread.py's compiled decoders:
 *
 *   decode(program, data)          the datum of a record schema, as a dict
 *
 * `program` is the schema flattened by avroread.native_program into nested tuples (op, a, b); the
 * reader walks it. Bytes that are not a value of the schema raise the error class given to
 * set_corrupt_error (CorruptError) or UnicodeDecodeError; the codec then lets fastavro decide,
 * as it does for the pure-Python decoders. Trailing bytes are ignored, as fastavro does.
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


/* ------------------------------------------------------------------ the reader */

enum { OP_NULL = 0, OP_BOOL = 1, OP_LONG = 2, OP_FLOAT = 3, OP_DOUBLE = 4, OP_STRING = 5, OP_BYTES = 6,
       OP_ENUM = 7, OP_FIXED = 8, OP_ARRAY = 9, OP_MAP = 10, OP_RECORD = 11, OP_OPT = 12 };

static PyObject *corrupt_error = NULL; /* avroread.CorruptError, set once at import */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    Py_ssize_t size;
} Reader;

static PyObject *corrupt(const char *why) {
    PyErr_SetString(corrupt_error ? corrupt_error : PyExc_ValueError, why);
    return NULL;
}

/* A zigzag varint; at most 10 bytes whose value fits 64 bits. Returns -1 with an error set. */
static int read_varint(Reader *r, int64_t *out) {
    uint64_t n = 0;
    int shift = 0;
    for (;;) {
        if (r->p >= r->end) {
            corrupt("value truncated");
            return -1;
        }
        uint8_t b = *r->p++;
        if (shift == 63 && (b & 0x7E)) {
            corrupt("varint beyond 64 bits");
            return -1;
        }
        n |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) break;
        shift += 7;
        if (shift > 63) {
            corrupt("varint longer than 10 bytes");
            return -1;
        }
    }
    *out = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
    return 0;
}

/* A length (string, bytes) that the rest of the value holds. */
static int read_length(Reader *r, Py_ssize_t *out) {
    int64_t n;
    if (read_varint(r, &n) < 0) return -1;
    if (n < 0) {
        corrupt("negative length");
        return -1;
    }
    if (n > (int64_t)(r->end - r->p)) {
        corrupt("value truncated");
        return -1;
    }
    *out = (Py_ssize_t)n;
    return 0;
}

static int op_of(PyObject *node, PyObject **a, PyObject **b) {
    if (!PyTuple_CheckExact(node) || PyTuple_GET_SIZE(node) != 3) {
        PyErr_SetString(PyExc_TypeError, "a program node is a tuple (op, a, b)");
        return -1;
    }
    *a = PyTuple_GET_ITEM(node, 1);
    *b = PyTuple_GET_ITEM(node, 2);
    long op = PyLong_AsLong(PyTuple_GET_ITEM(node, 0));
    if (op == -1 && PyErr_Occurred()) return -1;
    return (int)op;
}

static PyObject *read_value(Reader *r, PyObject *node, int depth);

static PyObject *read_block(Reader *r, int map, PyObject *item, int depth) {
    PyObject *out = map ? PyDict_New() : PyList_New(0);
    if (out == NULL) return NULL;
    for (;;) {
        int64_t count;
        if (read_varint(r, &count) < 0) goto fail;
        if (count == 0) break;
        if (count < 0) {
            int64_t ignored; /* the block's size in bytes */
            if (count == INT64_MIN) {
                corrupt("bad block count");
                goto fail;
            }
            count = -count;
            if (read_varint(r, &ignored) < 0) goto fail;
        }
        if (count > r->size) {
            corrupt("block count beyond the value");
            goto fail;
        }
        for (int64_t i = 0; i < count; i++) {
            if (map) {
                Py_ssize_t n;
                if (read_length(r, &n) < 0) goto fail;
                PyObject *key = PyUnicode_DecodeUTF8((const char *)r->p, n, NULL);
                if (key == NULL) goto fail;
                r->p += n;
                PyObject *v = read_value(r, item, depth + 1);
                if (v == NULL) {
                    Py_DECREF(key);
                    goto fail;
                }
                int rc = PyDict_SetItem(out, key, v);
                Py_DECREF(key);
                Py_DECREF(v);
                if (rc < 0) goto fail;
            } else {
                PyObject *v = read_value(r, item, depth + 1);
                if (v == NULL) goto fail;
                int rc = PyList_Append(out, v);
                Py_DECREF(v);
                if (rc < 0) goto fail;
            }
        }
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *read_record(Reader *r, PyObject *names, PyObject *fields, int depth) {
    if (!PyTuple_CheckExact(names) || !PyTuple_CheckExact(fields) ||
        PyTuple_GET_SIZE(names) != PyTuple_GET_SIZE(fields)) {
        PyErr_SetString(PyExc_TypeError, "a record node holds a tuple of names and one of programs");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = read_value(r, PyTuple_GET_ITEM(fields, i), depth + 1);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        int rc = PyDict_SetItem(out, PyTuple_GET_ITEM(names, i), v);
        Py_DECREF(v);
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *read_value(Reader *r, PyObject *node, int depth) {
    PyObject *a, *b;
    if (depth > 64) {
        PyErr_SetString(PyExc_ValueError, "program nested deeper than 64");
        return NULL;
    }
    int op = op_of(node, &a, &b);
    if (op < 0) return NULL;
    switch (op) {
    case OP_NULL:
        Py_RETURN_NONE;
    case OP_BOOL:
        if (r->p >= r->end) return corrupt("value truncated");
        if (*r->p++ == 1) Py_RETURN_TRUE;
        Py_RETURN_FALSE;
    case OP_LONG: {
        int64_t v;
        if (read_varint(r, &v) < 0) return NULL;
        return PyLong_FromLongLong((long long)v);
    }
    case OP_FLOAT: {
        if (r->end - r->p < 4) return corrupt("value truncated");
        double v = PyFloat_Unpack4((const char *)r->p, 1);
        if (v == -1.0 && PyErr_Occurred()) return NULL;
        r->p += 4;
        return PyFloat_FromDouble(v);
    }
    case OP_DOUBLE: {
        if (r->end - r->p < 8) return corrupt("value truncated");
        double v = PyFloat_Unpack8((const char *)r->p, 1);
        if (v == -1.0 && PyErr_Occurred()) return NULL;
        r->p += 8;
        return PyFloat_FromDouble(v);
    }
    case OP_STRING:
    case OP_BYTES: {
        Py_ssize_t n;
        if (read_length(r, &n) < 0) return NULL;
        const char *start = (const char *)r->p;
        r->p += n;
        return op == OP_STRING ? PyUnicode_DecodeUTF8(start, n, NULL) : PyBytes_FromStringAndSize(start, n);
    }
    case OP_ENUM: {
        int64_t i;
        if (read_varint(r, &i) < 0) return NULL;
        if (!PyTuple_CheckExact(a)) {
            PyErr_SetString(PyExc_TypeError, "an enum node holds its symbols' tuple");
            return NULL;
        }
        if (i < 0 || i >= PyTuple_GET_SIZE(a)) return corrupt("enum index out of range");
        PyObject *symbol = PyTuple_GET_ITEM(a, (Py_ssize_t)i);
        Py_INCREF(symbol);
        return symbol;
    }
    case OP_FIXED: {
        Py_ssize_t n = PyLong_AsSsize_t(a);
        if (n == -1 && PyErr_Occurred()) return NULL;
        if (n < 0 || n > r->end - r->p) return corrupt("value truncated");
        const char *start = (const char *)r->p;
        r->p += n;
        return PyBytes_FromStringAndSize(start, n);
    }
    case OP_ARRAY:
    case OP_MAP:
        return read_block(r, op == OP_MAP, a, depth);
    case OP_RECORD:
        return read_record(r, a, b, depth);
    case OP_OPT: {
        /* a union of null and one other branch: a = null's index (0 or 1), b = the other's program */
        if (r->p >= r->end) return corrupt("value truncated");
        uint8_t index = *r->p++;
        long null_index = PyLong_AsLong(a);
        if (null_index == -1 && PyErr_Occurred()) return NULL;
        if (index == 2 * null_index) Py_RETURN_NONE;
        if (index == 2 * (1 - null_index)) return read_value(r, b, depth + 1);
        return corrupt("bad union index");
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown program op %d", op);
        return NULL;
    }
}

static PyObject *r_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 2, "decode") < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {(const uint8_t *)view.buf, (const uint8_t *)view.buf + view.len, view.len};
    PyObject *out = read_value(&r, args[0], 0);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *r_set_corrupt_error(PyObject *self, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "an exception class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(corrupt_error, cls);
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
    {"decode", (PyCFunction)(void (*)(void))r_decode, METH_FASTCALL,
     "decode(program, data): the datum the bytes hold, read by a program of avroread.native_program"},
    {"set_corrupt_error", r_set_corrupt_error, METH_O,
     "set_corrupt_error(cls): the exception raised for bytes that are not a value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_avrowire", "Native writers of common Avro values, and a reader of whole values.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__avrowire(void) { return PyModule_Create(&module); }
