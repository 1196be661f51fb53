/*
 * BLAKE2b (RFC 7693, unkeyed, any digest size from 1 to 64 bytes) of an event key, without the
 * Python objects hashlib makes per call. The producers hash one key per event (de-duplication
 * identities, checkpointed fingerprints); runtime/contract/keyhash.py wraps this module and falls back
 * to hashlib when it is not built. The tests compare both on random input.
 *
 *   digest(data, size)   the digest (bytes) of data: a str (its UTF-8, strict) or bytes
 *   hash64(data)         the 8-byte digest as an int, little-endian
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* The message word schedule of each round (rounds 10 and 11 repeat rounds 0 and 1). */
static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define G(a, b, c, d, x, y)          \
    do {                             \
        v[a] = v[a] + v[b] + (x);    \
        v[d] = rotr(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);    \
        v[d] = rotr(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 63); \
    } while (0)

/* Mix one 128-byte block into h; t is the byte count so far (this block included). */
static void compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t; /* the high word of the 128-bit counter stays 0: keys are far below 2^64 bytes */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b of data (n bytes) with an outlen-byte digest (1..64) into out. */
static void blake2b(const uint8_t *data, size_t n, int outlen, uint8_t *out) {
    uint64_t h[8];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen; /* parameter block: fanout 1, depth 1, no key */
    uint64_t t = 0;
    while (n > 128) {
        t += 128;
        compress(h, data, t, 0);
        data += 128;
        n -= 128;
    }
    uint8_t block[128] = {0};
    if (n) memcpy(block, data, n);
    t += n;
    compress(h, block, t, 1);
    for (int i = 0; i < outlen; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
}

/* The bytes to hash: a str's UTF-8 (strict: a lone surrogate raises, as str.encode does) or bytes. */
static int data_of(PyObject *obj, const char **data, Py_ssize_t *n) {
    if (PyUnicode_Check(obj)) {
        *data = PyUnicode_AsUTF8AndSize(obj, n);
        return *data == NULL ? -1 : 0;
    }
    if (PyBytes_Check(obj)) {
        *data = PyBytes_AS_STRING(obj);
        *n = PyBytes_GET_SIZE(obj);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "expected str or bytes, got %.100s", Py_TYPE(obj)->tp_name);
    return -1;
}

static PyObject *k_digest(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "digest(data, size)");
        return NULL;
    }
    const char *data;
    Py_ssize_t n;
    if (data_of(args[0], &data, &n) < 0) return NULL;
    long size = PyLong_AsLong(args[1]);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 1 || size > 64) {
        PyErr_SetString(PyExc_ValueError, "size must be 1 to 64");
        return NULL;
    }
    uint8_t out[64];
    blake2b((const uint8_t *)data, (size_t)n, (int)size, out);
    return PyBytes_FromStringAndSize((const char *)out, size);
}

static PyObject *k_hash64(PyObject *self, PyObject *obj) {
    const char *data;
    Py_ssize_t n;
    if (data_of(obj, &data, &n) < 0) return NULL;
    uint8_t out[8];
    blake2b((const uint8_t *)data, (size_t)n, 8, out);
    return PyLong_FromUnsignedLongLong(load64(out));
}

static PyMethodDef methods[] = {
    {"digest", (PyCFunction)(void (*)(void))k_digest, METH_FASTCALL,
     "digest(data, size): BLAKE2b of data (a str's UTF-8, or bytes) with a size-byte digest"},
    {"hash64", k_hash64, METH_O, "hash64(data): the 8-byte BLAKE2b digest of data as an int, little-endian"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keyhash", "BLAKE2b of event keys.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__keyhash(void) { return PyModule_Create(&module); }
