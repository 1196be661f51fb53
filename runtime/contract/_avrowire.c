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
 * And one writer of a whole record value, returned as bytes (see the parts writer below):
 *
 *   compile_parts(fields, count, cls)        the program of a record schema (avrowrite.parts_program)
 *   encode_parts(program, header, e, u, t)   header + the record whose fields come from e's
 *                                            attributes, u (UTF-8) and t
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
#include <structmember.h>

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

/* The UTF-8 of str s (n bytes), or NULL with TypeError (not a str) or UnicodeEncodeError set. */
static const char *utf8_of(PyObject *s, Py_ssize_t *n) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(s)->tp_name);
        return NULL;
    }
    return PyUnicode_AsUTF8AndSize(s, n);
}

static int write_str(PyObject *out, PyObject *s, int branch) {
    Py_ssize_t n;
    const char *data = utf8_of(s, &n);
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


/* ------------------------------------------------------------------ the parts writer */

/* encode_parts(program, header, e, u, t): a whole record value as bytes, header first, its fields
 * taken from three places (runtime/contract/avrowrite.py's compile_parts_encoder says which): the
 * attributes of e, u (a string already encoded as UTF-8), and the tuple t in schema order.
 * `program` is compile_parts(fields, count, cls) of avrowrite.parts_program's fields: a tuple of
 * (source, ref, kind, arg) with source P_ATTR (ref: the attribute name), P_UTF8 or P_ITEM (ref: the
 * index in t), count the length t must have, and cls the class whose slots are read directly (an
 * e of another class is read by attribute lookup). The bytes are those of the compiled Python
 * parts encoder; a value that does not fit raises TypeError, ValueError, KeyError, IndexError or
 * AttributeError as that encoder does, so the codec's fallback explains it. */

enum { P_ATTR = 0, P_UTF8 = 1, P_ITEM = 2 };
enum { K_STRING = 0, K_OPT_STRING = 1, K_LONG = 2, K_OPT_LONG = 3, K_INT = 4, K_OPT_INT = 5, K_BOOL = 6,
       K_ENUM = 7, K_STRING_ARRAY = 8, K_UTF8 = 9, K_OPT_UTF8 = 10 };

typedef struct {
    char *p;
    Py_ssize_t len;
    Py_ssize_t cap;
    char local[1024];
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p;
    if (b->p == b->local) {
        p = PyMem_Malloc((size_t)cap);
        if (p != NULL) memcpy(p, b->local, (size_t)b->len);
    } else {
        p = PyMem_Realloc(b->p, (size_t)cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *data, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    if (n) memcpy(b->p + b->len, data, (size_t)n);
    b->len += n;
    return 0;
}

static int buf_byte(Buf *b, uint8_t v) { return buf_put(b, &v, 1); }

static int buf_zigzag(Buf *b, int64_t v) {
    uint8_t head[10];
    return buf_put(b, head, zigzag(v, head));
}

/* An Avro string of n bytes (length, then the bytes). */
static int buf_string(Buf *b, const char *data, Py_ssize_t n) {
    if (buf_zigzag(b, (int64_t)n) < 0) return -1;
    return buf_put(b, data, n);
}

static int put_str_value(Buf *b, PyObject *v) {
    Py_ssize_t n;
    const char *data = utf8_of(v, &n);
    if (data == NULL) return -1;
    return buf_string(b, data, n);
}

static int put_long_value(Buf *b, PyObject *v, int bits) {
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "expected int, got %.100s", Py_TYPE(v)->tp_name);
        return -1;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || (bits == 32 && (x < INT32_MIN || x > INT32_MAX))) {
        PyErr_Format(PyExc_ValueError, "%R does not fit an Avro %s", v, bits == 32 ? "int" : "long");
        return -1;
    }
    return buf_zigzag(b, (int64_t)x);
}

static int put_utf8_value(Buf *b, PyObject *v) {
    if (!PyBytes_Check(v)) {
        PyErr_Format(PyExc_TypeError, "expected bytes, got %.100s", Py_TYPE(v)->tp_name);
        return -1;
    }
    return buf_string(b, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
}

/* A program compiled for the calls: its fields as C values, and for attributes that are slots of
 * the event class, where the slot is (read directly when the event is of exactly that class). */
typedef struct {
    int source;
    int kind;
    int null_index;
    Py_ssize_t index;  /* P_ITEM */
    Py_ssize_t offset; /* P_ATTR: the slot's offset in an instance of cls, or -1 */
    PyObject *name;    /* P_ATTR */
    PyObject *arg;     /* K_ENUM: symbol -> index */
} Field;

typedef struct {
    Py_ssize_t nfields;
    Py_ssize_t count;
    PyTypeObject *cls;
    Field fields[];
} Program;

static const char *PROGRAM = "avrowire.parts_program";

static void program_free(PyObject *capsule) {
    Program *prog = PyCapsule_GetPointer(capsule, PROGRAM);
    if (prog == NULL) return;
    for (Py_ssize_t i = 0; i < prog->nfields; i++) {
        Py_XDECREF(prog->fields[i].name);
        Py_XDECREF(prog->fields[i].arg);
    }
    Py_XDECREF(prog->cls);
    PyMem_Free(prog);
}

/* The offset of slot `name` of cls (-1 when it is not a plain object slot). */
static Py_ssize_t slot_offset(PyTypeObject *cls, PyObject *name) {
    PyObject *descr = PyDict_GetItemWithError(cls->tp_dict, name); /* borrowed */
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) return -1;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
#ifdef Py_T_OBJECT_EX
    if (member->type != Py_T_OBJECT_EX) return -1;
#else
    if (member->type != T_OBJECT_EX) return -1;
#endif
    return member->offset;
}

/* compile_parts(fields, count, cls): the program encode_parts runs (see the parts writer above);
 * cls (or None) is the class whose instances' slots are read directly. */
static PyObject *w_compile_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 3, "compile_parts") < 0) return NULL;
    PyObject *fields = args[0], *cls = args[2];
    if (!PyTuple_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "fields must be a tuple");
        return NULL;
    }
    if (cls != Py_None && !PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a class or None");
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    Program *prog = PyMem_Calloc(1, sizeof(Program) + (size_t)n * sizeof(Field));
    if (prog == NULL) return PyErr_NoMemory();
    prog->count = count;
    PyObject *capsule = PyCapsule_New(prog, PROGRAM, program_free);
    if (capsule == NULL) {
        PyMem_Free(prog);
        return NULL;
    }
    if (cls != Py_None) {
        Py_INCREF(cls);
        prog->cls = (PyTypeObject *)cls;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyTuple_GET_ITEM(fields, i);
        Field *out = &prog->fields[i];
        prog->nfields = i + 1;
        out->offset = -1;
        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 4) {
            PyErr_SetString(PyExc_ValueError, "a program field is (source, ref, kind, arg)");
            goto fail;
        }
        long source = PyLong_AsLong(PyTuple_GET_ITEM(f, 0));
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(f, 2));
        if ((source == -1 || kind == -1) && PyErr_Occurred()) goto fail;
        if (source < P_ATTR || source > P_ITEM || kind < K_STRING || kind > K_OPT_UTF8) {
            PyErr_Format(PyExc_ValueError, "unknown field source %ld or kind %ld", source, kind);
            goto fail;
        }
        out->source = (int)source;
        out->kind = (int)kind;
        PyObject *ref = PyTuple_GET_ITEM(f, 1), *arg = PyTuple_GET_ITEM(f, 3);
        if (source == P_ATTR) {
            if (!PyUnicode_Check(ref)) {
                PyErr_SetString(PyExc_TypeError, "an attribute name must be a str");
                goto fail;
            }
            Py_INCREF(ref);
            out->name = ref;
            if (prog->cls != NULL) out->offset = slot_offset(prog->cls, ref);
        } else if (source == P_ITEM) {
            out->index = PyLong_AsSsize_t(ref);
            if (out->index == -1 && PyErr_Occurred()) goto fail;
            if (out->index < 0 || out->index >= count) {
                PyErr_SetString(PyExc_ValueError, "a value index beyond the count");
                goto fail;
            }
        }
        if (kind == K_OPT_STRING || kind == K_OPT_LONG || kind == K_OPT_INT || kind == K_OPT_UTF8) {
            long null_index = PyLong_AsLong(arg);
            if (null_index == -1 && PyErr_Occurred()) goto fail;
            if (null_index != 0 && null_index != 1) {
                PyErr_SetString(PyExc_ValueError, "null_index must be 0 or 1");
                goto fail;
            }
            out->null_index = (int)null_index;
        } else if (kind == K_ENUM) {
            if (!PyDict_Check(arg)) {
                PyErr_SetString(PyExc_TypeError, "an enum's symbols must be a dict");
                goto fail;
            }
            Py_INCREF(arg);
            out->arg = arg;
        }
    }
    return capsule;
fail:
    Py_DECREF(capsule);
    return NULL;
}

static int put_value(Buf *b, PyObject *v, const Field *f);

static int put_optional(Buf *b, PyObject *v, const Field *f, int inner) {
    if (v == Py_None) return buf_byte(b, (uint8_t)(f->null_index << 1));
    if (buf_byte(b, (uint8_t)((1 - f->null_index) << 1)) < 0) return -1;
    switch (inner) {
    case K_STRING: return put_str_value(b, v);
    case K_LONG: return put_long_value(b, v, 64);
    case K_INT: return put_long_value(b, v, 32);
    default: return put_utf8_value(b, v);
    }
}

static int put_value(Buf *b, PyObject *v, const Field *f) {
    switch (f->kind) {
    case K_STRING: return put_str_value(b, v);
    case K_LONG: return put_long_value(b, v, 64);
    case K_INT: return put_long_value(b, v, 32);
    case K_UTF8: return put_utf8_value(b, v);
    case K_OPT_STRING: return put_optional(b, v, f, K_STRING);
    case K_OPT_LONG: return put_optional(b, v, f, K_LONG);
    case K_OPT_INT: return put_optional(b, v, f, K_INT);
    case K_OPT_UTF8: return put_optional(b, v, f, K_UTF8);
    case K_BOOL:
        if (v == Py_True) return buf_byte(b, 1);
        if (v == Py_False) return buf_byte(b, 0);
        PyErr_Format(PyExc_TypeError, "expected bool, got %.100s", Py_TYPE(v)->tp_name);
        return -1;
    case K_ENUM: {
        PyObject *index = PyDict_GetItemWithError(f->arg, v); /* borrowed */
        if (index == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, v);
            return -1;
        }
        return put_long_value(b, index, 64);
    }
    case K_STRING_ARRAY: {
        if (!PyList_Check(v) && !PyTuple_Check(v)) {
            PyErr_Format(PyExc_TypeError, "expected a list, got %.100s", Py_TYPE(v)->tp_name);
            return -1;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
        if (n) {
            if (buf_zigzag(b, (int64_t)n) < 0) return -1;
            for (Py_ssize_t i = 0; i < n; i++) {
                if (put_str_value(b, PySequence_Fast_GET_ITEM(v, i)) < 0) return -1;
            }
        }
        return buf_byte(b, 0);
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown field kind %d", f->kind);
        return -1;
    }
}

static PyObject *w_encode_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_args(nargs, 5, "encode_parts") < 0) return NULL;
    Program *prog = PyCapsule_GetPointer(args[0], PROGRAM);
    if (prog == NULL) return NULL;
    PyObject *header = args[1], *e = args[2], *u = args[3], *t = args[4];
    if (!PyBytes_Check(header)) {
        PyErr_SetString(PyExc_TypeError, "header must be bytes");
        return NULL;
    }
    if (!PyTuple_Check(t)) {
        PyErr_Format(PyExc_TypeError, "values must be a tuple, got %.100s", Py_TYPE(t)->tp_name);
        return NULL;
    }
    if (PyTuple_GET_SIZE(t) != prog->count) {
        PyErr_Format(PyExc_IndexError, "%zd values expected", prog->count);
        return NULL;
    }
    int direct = prog->cls != NULL && Py_IS_TYPE(e, prog->cls);
    Buf b;
    b.p = b.local;
    b.len = 0;
    b.cap = (Py_ssize_t)sizeof b.local;
    PyObject *result = NULL;
    if (buf_put(&b, PyBytes_AS_STRING(header), PyBytes_GET_SIZE(header)) < 0) goto done;
    for (Py_ssize_t i = 0; i < prog->nfields; i++) {
        const Field *f = &prog->fields[i];
        int rc;
        if (f->source == P_ATTR) {
            if (direct && f->offset >= 0) {
                PyObject *v = *(PyObject **)((char *)e + f->offset); /* borrowed from the slot */
                if (v == NULL) {
                    PyErr_SetObject(PyExc_AttributeError, f->name);
                    goto done;
                }
                Py_INCREF(v);
                rc = put_value(&b, v, f);
                Py_DECREF(v);
            } else {
                PyObject *v = PyObject_GetAttr(e, f->name);
                if (v == NULL) goto done;
                rc = put_value(&b, v, f);
                Py_DECREF(v);
            }
        } else if (f->source == P_UTF8) {
            rc = put_value(&b, u, f);
        } else {
            rc = put_value(&b, PyTuple_GET_ITEM(t, f->index), f); /* a tuple: its items stay */
        }
        if (rc < 0) goto done;
    }
    result = PyBytes_FromStringAndSize(b.p, b.len);
done:
    if (b.p != b.local) PyMem_Free(b.p);
    return result;
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
    {"compile_parts", (PyCFunction)(void (*)(void))w_compile_parts, METH_FASTCALL,
     "compile_parts(fields, count, cls): the program of encode_parts, from avrowrite.parts_program's fields"},
    {"encode_parts", (PyCFunction)(void (*)(void))w_encode_parts, METH_FASTCALL,
     "encode_parts(program, header, e, u, t): header and a record value, by a program of compile_parts"},
    {"decode", (PyCFunction)(void (*)(void))r_decode, METH_FASTCALL,
     "decode(program, data): the datum the bytes hold, read by a program of avroread.native_program"},
    {"set_corrupt_error", r_set_corrupt_error, METH_O,
     "set_corrupt_error(cls): the exception raised for bytes that are not a value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_avrowire", "Native writers of common Avro values, and a reader of whole values.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__avrowire(void) { return PyModule_Create(&module); }
