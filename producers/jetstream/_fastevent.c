/*
 * The common Jetstream message, decoded natively: a commit event whose every field has the exact
 * type orjson gives it. producers/jetstream/decode.py calls it first for each uncompressed message;
 * on None it decodes the message itself, which gives the same event or the precise error. So this
 * code only speeds up, never decides: anything unusual (another kind, a subclass, a collection not
 * yet known to be an NSID, malformed JSON, a time out of range) is None.
 *
 *   configure(loads, cls, collections, max_time_us, source, slots)
 *       loads: orjson.loads; cls: RecordEvent (called with decode_event's positional arguments);
 *       collections: the set of collection names already checked as NSIDs (read, never changed);
 *       max_time_us: the largest time_us a sink can store; source: the events' source ("jetstream");
 *       slots: None, or cls's slot names when cls is a plain slotted class whose first 11 slots are
 *       those arguments and whose others are None by default: the event is then made by filling
 *       its slots, as its generated __init__ does, without running it
 *   commit(data, job)   the RecordEvent of the message data (str or bytes), or None
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#define ARGS 11
#define MAX_SLOTS 32

static PyObject *loads = NULL, *event_cls = NULL, *collections = NULL, *source = NULL;
static long long max_time_us = 0;
static Py_ssize_t slot_offsets[MAX_SLOTS];
static Py_ssize_t nslots = 0; /* 0: call the class */
static PyObject *s_kind, *s_commit, *s_did, *s_time_us, *s_operation, *s_collection, *s_rkey, *s_rev, *s_record,
    *s_cid, *s_create, *s_update, *s_delete;

/* The offset of cls's object slot `name`, or -1 with an error set. */
static Py_ssize_t slot_offset(PyTypeObject *cls, PyObject *name) {
    PyObject *descr = PyDict_GetItemWithError(cls->tp_dict, name); /* borrowed */
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
#ifdef Py_T_OBJECT_EX
        if (member->type == Py_T_OBJECT_EX && !(member->flags & Py_READONLY)) return member->offset;
#else
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY)) return member->offset;
#endif
    }
    if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%R is not an object slot", name);
    return -1;
}

static PyObject *configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "configure(loads, cls, collections, max_time_us, source, slots)");
        return NULL;
    }
    PyObject *slots = args[5];
    Py_ssize_t offsets[MAX_SLOTS], n = 0;
    if (slots != Py_None) {
        if (!PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) < ARGS || PyTuple_GET_SIZE(slots) > MAX_SLOTS ||
            !PyType_Check(args[1])) {
            PyErr_SetString(PyExc_ValueError, "slots: a tuple of 11 to 32 slot names of the class");
            return NULL;
        }
        n = PyTuple_GET_SIZE(slots);
        for (Py_ssize_t i = 0; i < n; i++) {
            offsets[i] = slot_offset((PyTypeObject *)args[1], PyTuple_GET_ITEM(slots, i));
            if (offsets[i] < 0) return NULL;
        }
    }
    if (!PyCallable_Check(args[0]) || !PyType_Check(args[1]) || !PyAnySet_Check(args[2]) ||
        !PyUnicode_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "configure: a callable, a class, a set, an int, a str");
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[3]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(loads, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(event_cls, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(collections, args[2]);
    Py_INCREF(args[4]);
    Py_XSETREF(source, args[4]);
    max_time_us = limit;
    memcpy(slot_offsets, offsets, sizeof offsets);
    nslots = n;
    Py_RETURN_NONE;
}

/* obj[key] if it is exactly of type `type` (borrowed), else NULL (no error set). */
static PyObject *exact(PyObject *obj, PyObject *key, PyTypeObject *type) {
    PyObject *v = PyDict_GetItemWithError(obj, key);
    if (v == NULL || !Py_IS_TYPE(v, type)) return NULL;
    return v;
}

/* 1 when s is exactly the str c (an interned constant), comparing contents. */
static int is(PyObject *s, PyObject *c) { return s == c || PyUnicode_Compare(s, c) == 0; }

static PyObject *decode(PyObject *obj, PyObject *job) {
    if (!PyDict_CheckExact(obj)) Py_RETURN_NONE;
    PyObject *kind = exact(obj, s_kind, &PyUnicode_Type);
    if (kind == NULL || !is(kind, s_commit)) goto none;
    PyObject *did = exact(obj, s_did, &PyUnicode_Type);
    PyObject *time_us = exact(obj, s_time_us, &PyLong_Type);
    PyObject *commit = exact(obj, s_commit, &PyDict_Type);
    if (did == NULL || time_us == NULL || commit == NULL) goto none;
    int overflow;
    long long t = PyLong_AsLongLongAndOverflow(time_us, &overflow);
    if (overflow || t < 0 || t > max_time_us) goto none;
    PyObject *op = exact(commit, s_operation, &PyUnicode_Type);
    PyObject *collection = exact(commit, s_collection, &PyUnicode_Type);
    PyObject *rkey = exact(commit, s_rkey, &PyUnicode_Type);
    if (op == NULL || collection == NULL || rkey == NULL) goto none;
    int deleted = is(op, s_delete);
    if (!deleted && !is(op, s_create) && !is(op, s_update)) goto none;
    int known = PySet_Contains(collections, collection);
    if (known != 1) goto none;
    PyObject *rev = PyDict_GetItemWithError(commit, s_rev);
    if (rev == NULL) {
        if (PyErr_Occurred()) goto none;
        rev = Py_None;
    } else if (rev != Py_None && !PyUnicode_CheckExact(rev)) {
        goto none;
    }
    PyObject *record = Py_None, *cid = Py_None;
    if (!deleted) {
        record = exact(commit, s_record, &PyDict_Type);
        cid = exact(commit, s_cid, &PyUnicode_Type);
        if (record == NULL || cid == NULL) goto none;
    }
    /* decode_event's call: RecordEvent(did, collection, rkey, op, rev, cid, record, src, time_us, time_us, job) */
    PyObject *args[ARGS] = {did, collection, rkey, op, rev, cid, record, source, time_us, time_us, job};
    if (nslots == 0) return PyObject_Vectorcall(event_cls, args, ARGS, NULL);
    PyTypeObject *cls = (PyTypeObject *)event_cls;
    PyObject *event = cls->tp_alloc(cls, 0);
    if (event == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nslots; i++) {
        PyObject *v = i < ARGS ? args[i] : Py_None;
        Py_INCREF(v);
        *(PyObject **)((char *)event + slot_offsets[i]) = v;
    }
    return event;
none:
    PyErr_Clear();
    Py_RETURN_NONE;
}

static PyObject *commit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "commit(data, job)");
        return NULL;
    }
    if (loads == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    PyObject *obj = PyObject_CallOneArg(loads, args[0]);
    if (obj == NULL) {
        PyErr_Clear(); /* malformed: the Python path names the error */
        Py_RETURN_NONE;
    }
    PyObject *event = decode(obj, args[1]);
    Py_DECREF(obj);
    return event;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(loads, cls, collections, max_time_us, source): what commit() decodes with"},
    {"commit", (PyCFunction)(void (*)(void))commit, METH_FASTCALL,
     "commit(data, job): the RecordEvent of a plain commit message, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastevent", "Jetstream commit messages, decoded natively.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastevent(void) {
    const char *names[] = {"kind", "commit", "did", "time_us", "operation", "collection", "rkey",
                           "rev", "record", "cid", "create", "update", "delete"};
    PyObject **slots[] = {&s_kind, &s_commit, &s_did, &s_time_us, &s_operation, &s_collection, &s_rkey,
                          &s_rev, &s_record, &s_cid, &s_create, &s_update, &s_delete};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *slots[i] = PyUnicode_InternFromString(names[i]);
        if (*slots[i] == NULL) return NULL;
    }
    return PyModule_Create(&module);
}
