/*
 * Native fast path of repository decoding: CAR indexing, the MST walk and record blocks to their
 * atproto JSON form, for the canonical encodings every real repository uses.
 *
 * Every function here either returns a result that the pure-Python reference implementation
 * (car.py, mst.py, dagcbor.py) would also return for the same input, or returns None ("bail"):
 * then the caller runs the Python implementation, which gives the same answer for valid input and
 * the precise error for broken input. So this module never raises a format error of its own and
 * holds no error messages; anything unusual (a non-canonical head, an unknown CID form, a hash that
 * does not match, a missing block, a bad key) is a bail. Only MemoryError and errors raised by a
 * caller's lookup function propagate.
 *
 * Functions:
 *   car_index(data, verify, max_blocks) -> (header bytes, {cid bytes: block bytes}) | None
 *   mst_walk(root, lookup, verify, max_layer, limit) -> [(key, cid bytes)] | int | None
 *   record_form(block, cid, max_depth) -> (cid str, JSON-form dict, JSON bytes | None) | False | None
 *   cid_str(cid bytes) -> str | None
 *
 * sha2-256 comes from OpenSSL's libcrypto (the same library CPython's hashlib uses).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define CID_LEN 36        /* 0x01 codec 0x12 0x20 + 32-byte sha2-256 digest */
#define MAX_KEY_LEN 1024  /* mst.MAX_KEY_LEN */
#define MAX_HEADER_LEN (1 << 20)

typedef enum { OK = 0, BAIL = 1, FAIL = -1 } status;

static PyObject *S_LINK;  /* "$link" */
static PyObject *S_BYTES; /* "$bytes" */

/* ------------------------------------------------------------------------------------- helpers */

static int fast_cid(const uint8_t *p) {
    return p[0] == 0x01 && (p[1] == 0x71 || p[1] == 0x55) && p[2] == 0x12 && p[3] == 0x20;
}

#define DIGEST_LEN 32

/* One digest context, fetched once: OpenSSL 3's one-shot SHA256() looks the algorithm up on every
 * call (about 1 us against 0.4 us here). Used with the GIL held, so never concurrently. */
static EVP_MD *SHA256_MD;
static EVP_MD_CTX *SHA256_CTX_;

/* sha2-256 of data into out; 0 if OpenSSL failed (callers then bail). */
static int sha256(const uint8_t *data, size_t len, uint8_t *out) {
    unsigned int n = 0;
    return EVP_DigestInit_ex2(SHA256_CTX_, SHA256_MD, NULL) && EVP_DigestUpdate(SHA256_CTX_, data, len) &&
           EVP_DigestFinal_ex(SHA256_CTX_, out, &n) && n == DIGEST_LEN;
}

/* 1: the data hash to the CID's digest; 0: they do not; -1: hashing failed. */
static int digest_matches(const uint8_t *data, Py_ssize_t len, const uint8_t *cid) {
    uint8_t out[DIGEST_LEN];
    if (!sha256(data, (size_t)len, out)) return -1;
    return memcmp(out, cid + 4, DIGEST_LEN) == 0;
}

/* Minimal unsigned LEB128 of at most 9 bytes (as _varint.read_uvarint); -1 on anything else. */
static int read_varint(const uint8_t *d, Py_ssize_t end, Py_ssize_t *pos, uint64_t *out) {
    uint64_t value = 0;
    int shift = 0;
    Py_ssize_t p = *pos;
    for (int i = 0; i < 9; i++) {
        if (p >= end) return -1;
        uint8_t b = d[p++];
        value |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && i > 0) return -1; /* not minimal */
            *pos = p;
            *out = value;
            return 0;
        }
        shift += 7;
    }
    return -1;
}

static const char B32[] = "abcdefghijklmnopqrstuvwxyz234567";

/* "b" + lowercase base32 (no padding) of a 36-byte CID: 59 characters. */
static PyObject *cid_string(const uint8_t *raw) {
    char buf[1 + (CID_LEN * 8 + 4) / 5];
    Py_ssize_t n = 0;
    buf[n++] = 'b';
    uint32_t acc = 0;
    int bits = 0;
    for (int i = 0; i < CID_LEN; i++) {
        acc = (acc << 8) | raw[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            buf[n++] = B32[(acc >> bits) & 31];
        }
    }
    if (bits > 0) buf[n++] = B32[(acc << (5 - bits)) & 31];
    return PyUnicode_FromStringAndSize(buf, n);
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 without "=" padding (dagcbor._b64). */
static PyObject *b64_string(const uint8_t *d, Py_ssize_t len) {
    Py_ssize_t out_len = (len / 3) * 4 + (len % 3 ? len % 3 + 1 : 0);
    PyObject *s = PyUnicode_New(out_len, 127);
    if (s == NULL) return NULL;
    Py_UCS1 *o = PyUnicode_1BYTE_DATA(s);
    Py_ssize_t i = 0, n = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = ((uint32_t)d[i] << 16) | ((uint32_t)d[i + 1] << 8) | d[i + 2];
        o[n++] = B64[v >> 18];
        o[n++] = B64[(v >> 12) & 63];
        o[n++] = B64[(v >> 6) & 63];
        o[n++] = B64[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)d[i] << 16;
        o[n++] = B64[v >> 18];
        o[n++] = B64[(v >> 12) & 63];
    } else if (len - i == 2) {
        uint32_t v = ((uint32_t)d[i] << 16) | ((uint32_t)d[i + 1] << 8);
        o[n++] = B64[v >> 18];
        o[n++] = B64[(v >> 12) & 63];
        o[n++] = B64[(v >> 6) & 63];
    }
    return s;
}

/* A canonical (shortest-form) CBOR head: major type and argument; -1 if not canonical/complete.
 * Indefinite lengths and reserved values are refused; 64-bit arguments are allowed. */
static int read_head(const uint8_t *d, Py_ssize_t end, Py_ssize_t *pos, int *major, uint64_t *arg) {
    Py_ssize_t p = *pos;
    if (p >= end) return -1;
    uint8_t ib = d[p++];
    int ai = ib & 0x1F;
    uint64_t v;
    *major = ib >> 5;
    if (ai < 24) {
        v = (uint64_t)ai;
    } else if (ai == 24) {
        if (p + 1 > end) return -1;
        v = d[p];
        p += 1;
        if (v < 24) return -1;
    } else if (ai == 25) {
        if (p + 2 > end) return -1;
        v = ((uint64_t)d[p] << 8) | d[p + 1];
        p += 2;
        if (v < 0x100) return -1;
    } else if (ai == 26) {
        if (p + 4 > end) return -1;
        v = ((uint64_t)d[p] << 24) | ((uint64_t)d[p + 1] << 16) | ((uint64_t)d[p + 2] << 8) | d[p + 3];
        p += 4;
        if (v < 0x10000) return -1;
    } else if (ai == 27) {
        if (p + 8 > end) return -1;
        v = 0;
        for (int i = 0; i < 8; i++) v = (v << 8) | d[p + i];
        p += 8;
        if (v < 0x100000000ULL) return -1;
    } else {
        return -1;
    }
    *pos = p;
    *arg = v;
    return 0;
}

/* A link at *pos in the one canonical form atproto writes: tag 42, bytes(37) = 0x00 + fast CID.
 * Sets *cid to the 36 CID bytes; -1 if anything else is there. */
static int read_link(const uint8_t *d, Py_ssize_t end, Py_ssize_t *pos, const uint8_t **cid) {
    Py_ssize_t p = *pos;
    if (p + 5 + CID_LEN > end) return -1;
    if (d[p] != 0xD8 || d[p + 1] != 0x2A || d[p + 2] != 0x58 || d[p + 3] != CID_LEN + 1 || d[p + 4] != 0)
        return -1;
    if (!fast_cid(d + p + 5)) return -1;
    *cid = d + p + 5;
    *pos = p + 5 + CID_LEN;
    return 0;
}

/* ------------------------------------------------------------------------------------ car_index */

static PyObject *car_index(PyObject *self, PyObject *args) {
    Py_buffer view;
    int verify;
    Py_ssize_t max_blocks;
    if (!PyArg_ParseTuple(args, "y*pn", &view, &verify, &max_blocks)) return NULL;
    const uint8_t *d = view.buf;
    Py_ssize_t end = view.len, pos = 0, count = 0;
    uint64_t header_len, len;
    PyObject *blocks = NULL, *header = NULL, *result = NULL;
    if (read_varint(d, end, &pos, &header_len) < 0 || header_len == 0 || header_len > MAX_HEADER_LEN ||
        (Py_ssize_t)header_len > end - pos)
        goto bail;
    header = PyBytes_FromStringAndSize((const char *)d + pos, (Py_ssize_t)header_len);
    if (header == NULL) goto done;
    pos += (Py_ssize_t)header_len;
    blocks = PyDict_New();
    if (blocks == NULL) goto done;
    while (pos < end) {
        if (read_varint(d, end, &pos, &len) < 0 || len < CID_LEN || len > (uint64_t)(end - pos)) goto bail;
        const uint8_t *cid = d + pos;
        if (!fast_cid(cid)) goto bail;
        const uint8_t *block = cid + CID_LEN;
        Py_ssize_t block_len = (Py_ssize_t)len - CID_LEN;
        if (verify && digest_matches(block, block_len, cid) != 1) goto bail;
        PyObject *key = PyBytes_FromStringAndSize((const char *)cid, CID_LEN);
        if (key == NULL) goto done;
        int has = PyDict_Contains(blocks, key);
        if (has == 0) {
            PyObject *value = PyBytes_FromStringAndSize((const char *)block, block_len);
            if (value == NULL || PyDict_SetItem(blocks, key, value) < 0) {
                Py_XDECREF(value);
                Py_DECREF(key);
                goto done;
            }
            Py_DECREF(value);
        }
        Py_DECREF(key);
        if (has < 0) goto done;
        pos += (Py_ssize_t)len;
        count++;
        if (max_blocks >= 0 && count > max_blocks) goto bail;
    }
    result = PyTuple_Pack(2, header, blocks);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(header);
    Py_XDECREF(blocks);
    PyBuffer_Release(&view);
    return result;
}

/* ------------------------------------------------------------------------------------- mst_walk */

typedef struct {
    const uint8_t *val;   /* value CID (36 bytes, inside the node block) */
    const uint8_t *right; /* right subtree CID or NULL */
    Py_ssize_t key_off;   /* offset of the full key in the node's key buffer */
    Py_ssize_t key_len;
} entry_t;

typedef struct {
    PyObject *lookup; /* dict {cid bytes: block} or a callable cid bytes -> block | None */
    int is_dict;
    int verify;
    int max_layer;
    Py_ssize_t limit;
    Py_ssize_t count;
    PyObject *out; /* list, or NULL once the limit is passed */
    char last[MAX_KEY_LEN];
    Py_ssize_t last_len;
    int have_last;
} walker_t;

static int key_char(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '~' ||
           c == '.' || c == ':' || c == '-';
}

static int dots(const uint8_t *s, Py_ssize_t n) {
    return (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

/* mst.is_valid_key on ASCII bytes: <segment>/<segment>, neither "." nor "..", at most 1024 bytes. */
static int valid_key(const uint8_t *k, Py_ssize_t n) {
    if (n <= 0 || n > MAX_KEY_LEN) return 0;
    Py_ssize_t slash = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (k[i] == '/') {
            if (slash >= 0) return 0;
            slash = i;
        } else if (!key_char(k[i])) {
            return 0;
        }
    }
    if (slash <= 0 || slash == n - 1) return 0;
    return !dots(k, slash) && !dots(k + slash + 1, n - slash - 1);
}

/* mst.key_depth: leading zero bits of sha256(key), halved; -1 if hashing failed. */
static int key_depth(const uint8_t *k, Py_ssize_t n) {
    uint8_t h[DIGEST_LEN];
    if (!sha256(k, (size_t)n, h)) return -1;
    int zeros = 0;
    for (int i = 0; i < DIGEST_LEN; i++) {
        if (h[i] == 0) {
            zeros += 8;
            continue;
        }
        zeros += __builtin_clz((unsigned)h[i]) - 24;
        break;
    }
    return zeros / 2;
}

/* The block of a CID from the walker's lookup, as a new reference; NULL with no error when absent. */
static PyObject *get_block(walker_t *w, const uint8_t *cid) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)cid, CID_LEN);
    if (key == NULL) return NULL;
    PyObject *block;
    if (w->is_dict) {
        block = PyDict_GetItemWithError(w->lookup, key);
        Py_XINCREF(block);
    } else {
        block = PyObject_CallOneArg(w->lookup, key);
        if (block == Py_None) Py_CLEAR(block);
    }
    Py_DECREF(key);
    if (block != NULL && !PyBytes_Check(block)) {
        Py_DECREF(block);
        return NULL; /* not bytes: treated as absent, so the Python walk reports it */
    }
    return block;
}

static status emit(walker_t *w, const char *key, Py_ssize_t n, const uint8_t *cid) {
    if (w->have_last) {
        Py_ssize_t m = n < w->last_len ? n : w->last_len;
        int c = memcmp(key, w->last, (size_t)m);
        if (c < 0 || (c == 0 && n <= w->last_len)) return BAIL; /* out of order in the tree */
    }
    memcpy(w->last, key, (size_t)n);
    w->last_len = n;
    w->have_last = 1;
    w->count++;
    if (w->out == NULL) return OK;
    if (w->count > w->limit) {
        Py_CLEAR(w->out);
        return OK;
    }
    PyObject *item = Py_BuildValue("(s#y#)", key, n, (const char *)cid, (Py_ssize_t)CID_LEN);
    if (item == NULL) return FAIL;
    int rc = PyList_Append(w->out, item);
    Py_DECREF(item);
    return rc < 0 ? FAIL : OK;
}

/* Walk the node `cid` (expected_layer -1 for the root). */
static status walk_node(walker_t *w, const uint8_t *cid, int expected_layer) {
    if (expected_layer != -1 && expected_layer < 0) return BAIL;
    PyObject *obj = get_block(w, cid);
    if (obj == NULL) return PyErr_Occurred() ? FAIL : BAIL;
    status st = BAIL;
    entry_t *entries = NULL;
    char *keys = NULL;
    const uint8_t *d = (const uint8_t *)PyBytes_AS_STRING(obj);
    Py_ssize_t end = PyBytes_GET_SIZE(obj), pos = 0;
    int major;
    uint64_t n;
    if (w->verify && digest_matches(d, end, cid) != 1) goto out;
    /* {"e": [...], "l": link|null} in canonical key order */
    if (end < 4 || d[0] != 0xA2 || d[1] != 0x61 || d[2] != 'e') goto out;
    pos = 3;
    if (read_head(d, end, &pos, &major, &n) < 0 || major != 4 || n > (uint64_t)(end / 8)) goto out;
    Py_ssize_t count = (Py_ssize_t)n;
    /* Full keys, one after another; a key is at most MAX_KEY_LEN, so room for one more is kept. */
    size_t cap = (size_t)count * 48 + MAX_KEY_LEN, used = 0;
    if (count) entries = PyMem_Malloc(sizeof(entry_t) * (size_t)count);
    keys = PyMem_Malloc(cap);
    if ((count && entries == NULL) || keys == NULL) {
        PyErr_NoMemory();
        st = FAIL;
        goto out;
    }
    Py_ssize_t prev_off = -1, prev_len = 0;
    int layer = expected_layer;
    for (Py_ssize_t i = 0; i < count; i++) {
        entry_t *e = &entries[i];
        uint64_t klen, p;
        /* {"k": bytes, "p": uint, "t": link|null, "v": link} */
        if (pos + 3 > end || d[pos] != 0xA4 || d[pos + 1] != 0x61 || d[pos + 2] != 'k') goto out;
        pos += 3;
        if (read_head(d, end, &pos, &major, &klen) < 0 || major != 2 || klen > (uint64_t)(end - pos)) goto out;
        const uint8_t *suffix = d + pos;
        pos += (Py_ssize_t)klen;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'p') goto out;
        pos += 2;
        if (read_head(d, end, &pos, &major, &p) < 0 || major != 0) goto out;
        if (p > (uint64_t)prev_len || (i == 0 && p != 0)) goto out;
        Py_ssize_t full = (Py_ssize_t)p + (Py_ssize_t)klen;
        if (full > MAX_KEY_LEN || full == 0) goto out;
        if (used + MAX_KEY_LEN > cap) {
            char *grown = PyMem_Realloc(keys, cap * 2);
            if (grown == NULL) {
                PyErr_NoMemory();
                st = FAIL;
                goto out;
            }
            keys = grown;
            cap *= 2;
        }
        char *kb = keys + used;
        const char *prev = prev_off < 0 ? NULL : keys + prev_off;
        if (p) memcpy(kb, prev, (size_t)p);
        memcpy(kb + p, suffix, (size_t)klen);
        if (prev != NULL) { /* strictly increasing within the node */
            Py_ssize_t m = full < prev_len ? full : prev_len;
            int c = memcmp(kb, prev, (size_t)m);
            if (c < 0 || (c == 0 && full <= prev_len)) goto out;
        }
        if (!valid_key((const uint8_t *)kb, full)) goto out; /* also refuses non-ASCII */
        int depth = key_depth((const uint8_t *)kb, full);
        if (depth < 0) goto out;
        if (layer == -1) layer = depth;
        else if (depth != layer) goto out;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 't') goto out;
        pos += 2;
        e->right = NULL;
        if (pos < end && d[pos] == 0xF6) pos++;
        else if (read_link(d, end, &pos, &e->right) < 0) goto out;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'v') goto out;
        pos += 2;
        if (read_link(d, end, &pos, &e->val) < 0) goto out;
        e->key_off = (Py_ssize_t)used;
        e->key_len = full;
        prev_off = (Py_ssize_t)used;
        prev_len = full;
        used += (size_t)full;
    }
    if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'l') goto out;
    pos += 2;
    const uint8_t *left = NULL;
    if (pos < end && d[pos] == 0xF6) pos++;
    else if (read_link(d, end, &pos, &left) < 0) goto out;
    if (pos != end) goto out;
    if (layer == -1) { /* a root without entries: only the empty tree */
        st = left == NULL ? OK : BAIL;
        goto out;
    }
    if (count == 0 && left == NULL) goto out;
    if (layer == 0) {
        if (left != NULL) goto out;
        for (Py_ssize_t i = 0; i < count; i++)
            if (entries[i].right != NULL) goto out;
    }
    if (expected_layer == -1 && layer > w->max_layer) goto out;
    if (left != NULL && (st = walk_node(w, left, layer - 1)) != OK) goto out;
    for (Py_ssize_t i = 0; i < count; i++) {
        entry_t *e = &entries[i];
        if ((st = emit(w, keys + e->key_off, e->key_len, e->val)) != OK) goto out;
        if (e->right != NULL && (st = walk_node(w, e->right, layer - 1)) != OK) goto out;
    }
    st = OK;
out:
    PyMem_Free(entries);
    PyMem_Free(keys);
    Py_DECREF(obj);
    return st;
}

static PyObject *mst_walk(PyObject *self, PyObject *args) {
    Py_buffer root;
    walker_t w;
    memset(&w, 0, sizeof w);
    if (!PyArg_ParseTuple(args, "y*Opin", &root, &w.lookup, &w.verify, &w.max_layer, &w.limit)) return NULL;
    PyObject *result = NULL;
    if (root.len != CID_LEN || !fast_cid(root.buf)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    w.is_dict = PyDict_CheckExact(w.lookup);
    if (!w.is_dict && !PyCallable_Check(w.lookup)) {
        PyErr_SetString(PyExc_TypeError, "lookup must be a dict or a callable");
        goto done;
    }
    w.out = PyList_New(0);
    if (w.out == NULL) goto done;
    status st = walk_node(&w, root.buf, -1);
    if (st == FAIL) goto done;
    if (st == BAIL) result = Py_NewRef(Py_None);
    else if (w.out != NULL) result = Py_NewRef(w.out);
    else result = PyLong_FromSsize_t(w.count);
done:
    Py_XDECREF(w.out);
    PyBuffer_Release(&root);
    return result;
}

/* ---------------------------------------------------------------------------------- record_form */

/* The record's JSON text, written while it is decoded, byte for byte what orjson.dumps writes for
 * the JSON form (compact; strings escape '"', '\\' and control characters only). A float stops the
 * text (`ok` = 0): its shortest decimal form is left to orjson. */
typedef struct {
    char *buf;
    size_t len, cap;
    int ok;
} jbuf_t;

static int jgrow(jbuf_t *j, size_t n) {
    size_t cap = j->cap ? j->cap : 256;
    while (cap < j->len + n) cap *= 2;
    char *grown = PyMem_Realloc(j->buf, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    j->buf = grown;
    j->cap = cap;
    return 0;
}

static inline int jput(jbuf_t *j, const char *s, size_t n) {
    if (!j->ok) return 0;
    if (j->len + n > j->cap && jgrow(j, n) < 0) return -1;
    memcpy(j->buf + j->len, s, n);
    j->len += n;
    return 0;
}

static inline int jchar(jbuf_t *j, char c) { return jput(j, &c, 1); }

static const char HEX[] = "0123456789abcdef";

static int jstring(jbuf_t *j, const uint8_t *s, Py_ssize_t n) {
    if (!j->ok) return 0;
    if (j->len + (size_t)n * 6 + 2 > j->cap && jgrow(j, (size_t)n * 6 + 2) < 0) return -1;
    char *o = j->buf + j->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = HEX[c >> 4];
            *o++ = HEX[c & 15];
        }
    }
    *o++ = '"';
    j->len = (size_t)(o - j->buf);
    return 0;
}

static int jint(jbuf_t *j, uint64_t v, int negative) {
    char tmp[24];
    int n = 0;
    do {
        tmp[sizeof tmp - 1 - n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (negative) tmp[sizeof tmp - 1 - n++] = '-';
    return jput(j, tmp + sizeof tmp - n, (size_t)n);
}

/* {"<key>": text} for links and byte strings, in both forms. */
static PyObject *special(PyObject *key, const char *jkey, PyObject *text, jbuf_t *j) {
    if (text == NULL) return NULL;
    PyObject *map = PyDict_New();
    if (map == NULL || PyDict_SetItem(map, key, text) < 0) goto fail;
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &n);
    if (utf8 == NULL || jput(j, jkey, strlen(jkey)) < 0 || jput(j, utf8, (size_t)n) < 0 || jput(j, "\"}", 2) < 0)
        goto fail;
    Py_DECREF(text);
    return map;
fail:
    Py_XDECREF(map);
    Py_DECREF(text);
    return NULL;
}

/* One canonical DAG-CBOR item at *pos as its JSON form (and its JSON text into `j`). Returns a new
 * reference, or NULL: with an exception set on a real error, without one for a bail. `depth`
 * counts the enclosing containers. */
static PyObject *json_item(const uint8_t *d, Py_ssize_t end, Py_ssize_t *pos, int depth, int max_depth, jbuf_t *j) {
    int major;
    uint64_t arg;
    Py_ssize_t p = *pos;
    if (p >= end) return NULL;
    uint8_t ib = d[p];
    if (ib >> 5 == 7) { /* simple values and floats */
        *pos = p + 1;
        if (ib == 0xF4) return jput(j, "false", 5) < 0 ? NULL : Py_NewRef(Py_False);
        if (ib == 0xF5) return jput(j, "true", 4) < 0 ? NULL : Py_NewRef(Py_True);
        if (ib == 0xF6) return jput(j, "null", 4) < 0 ? NULL : Py_NewRef(Py_None);
        if (ib == 0xFB && p + 9 <= end) {
            uint64_t bits = 0;
            for (int i = 1; i <= 8; i++) bits = (bits << 8) | d[p + i];
            double v;
            memcpy(&v, &bits, sizeof v);
            if (v != v || v - v != 0) return NULL; /* NaN or infinity */
            *pos = p + 9;
            j->ok = 0;
            return PyFloat_FromDouble(v);
        }
        return NULL;
    }
    if (read_head(d, end, &p, &major, &arg) < 0) return NULL;
    switch (major) {
    case 0:
        if (jint(j, arg, 0) < 0) return NULL;
        *pos = p;
        return PyLong_FromUnsignedLongLong(arg);
    case 1:
        if (arg > (uint64_t)INT64_MAX || jint(j, arg + 1, 1) < 0) return NULL;
        *pos = p;
        return PyLong_FromLongLong(-1 - (long long)arg);
    case 2: {
        if (arg > (uint64_t)(end - p)) return NULL;
        PyObject *map = special(S_BYTES, "{\"$bytes\":\"", b64_string(d + p, (Py_ssize_t)arg), j);
        if (map != NULL) *pos = p + (Py_ssize_t)arg;
        return map;
    }
    case 3: {
        if (arg > (uint64_t)(end - p)) return NULL;
        PyObject *s = PyUnicode_DecodeUTF8((const char *)d + p, (Py_ssize_t)arg, "strict");
        if (s == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
            return NULL;
        }
        if (jstring(j, d + p, (Py_ssize_t)arg) < 0) {
            Py_DECREF(s);
            return NULL;
        }
        *pos = p + (Py_ssize_t)arg;
        return s;
    }
    case 4: {
        if (depth + 1 >= max_depth || arg > (uint64_t)(end - p)) return NULL;
        PyObject *list = PyList_New((Py_ssize_t)arg);
        if (list == NULL || jchar(j, '[') < 0) goto list_fail;
        for (Py_ssize_t i = 0; i < (Py_ssize_t)arg; i++) {
            if (i && jchar(j, ',') < 0) goto list_fail;
            PyObject *v = json_item(d, end, &p, depth + 1, max_depth, j);
            if (v == NULL) goto list_fail;
            PyList_SET_ITEM(list, i, v);
        }
        if (jchar(j, ']') < 0) goto list_fail;
        *pos = p;
        return list;
    list_fail:
        Py_XDECREF(list);
        return NULL;
    }
    case 5: {
        if (depth + 1 >= max_depth || arg > (uint64_t)(end - p) / 2) return NULL;
        PyObject *map = PyDict_New();
        if (map == NULL || jchar(j, '{') < 0) goto map_fail;
        const uint8_t *prev = NULL;
        uint64_t prev_len = 0;
        for (uint64_t i = 0; i < arg; i++) {
            uint64_t klen;
            if (read_head(d, end, &p, &major, &klen) < 0 || major != 3 || klen > (uint64_t)(end - p)) goto map_fail;
            const uint8_t *kb = d + p;
            if (prev != NULL) { /* length first, then bytewise; strictly increasing */
                if (klen < prev_len) goto map_fail;
                if (klen == prev_len && memcmp(kb, prev, (size_t)klen) <= 0) goto map_fail;
            }
            prev = kb;
            prev_len = klen;
            PyObject *key = PyUnicode_DecodeUTF8((const char *)kb, (Py_ssize_t)klen, "strict");
            if (key == NULL) {
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
                goto map_fail;
            }
            p += (Py_ssize_t)klen;
            if ((i && jchar(j, ',') < 0) || jstring(j, kb, (Py_ssize_t)klen) < 0 || jchar(j, ':') < 0) {
                Py_DECREF(key);
                goto map_fail;
            }
            PyObject *v = json_item(d, end, &p, depth + 1, max_depth, j);
            if (v == NULL) {
                Py_DECREF(key);
                goto map_fail;
            }
            int rc = PyDict_SetItem(map, key, v);
            Py_DECREF(key);
            Py_DECREF(v);
            if (rc < 0) goto map_fail;
        }
        if (jchar(j, '}') < 0) goto map_fail;
        *pos = p;
        return map;
    map_fail:
        Py_XDECREF(map);
        return NULL;
    }
    case 6: {
        const uint8_t *cid;
        Py_ssize_t q = *pos;
        if (arg != 42 || read_link(d, end, &q, &cid) < 0) return NULL;
        PyObject *map = special(S_LINK, "{\"$link\":\"", cid_string(cid), j);
        if (map != NULL) *pos = q;
        return map;
    }
    default:
        return NULL;
    }
}

static PyObject *record_form(PyObject *self, PyObject *args) {
    Py_buffer block, cid;
    int max_depth;
    if (!PyArg_ParseTuple(args, "y*y*i", &block, &cid, &max_depth)) return NULL;
    PyObject *result = NULL, *record = NULL, *text = NULL, *json = NULL;
    jbuf_t j = {NULL, 0, 0, 1};
    const uint8_t *d = block.buf;
    Py_ssize_t pos = 0;
    if (cid.len != CID_LEN || !fast_cid(cid.buf)) goto bail;
    int matches = digest_matches(d, block.len, cid.buf);
    if (matches < 0) goto bail;
    if (!matches) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (block.len == 0 || d[0] >> 5 != 5) goto bail; /* a record is a map */
    record = json_item(d, block.len, &pos, 0, max_depth, &j);
    if (record == NULL) {
        if (PyErr_Occurred()) goto done;
        goto bail;
    }
    if (pos != block.len) goto bail;
    text = cid_string(cid.buf);
    if (text == NULL) goto done;
    json = j.ok ? PyBytes_FromStringAndSize(j.buf, (Py_ssize_t)j.len) : Py_NewRef(Py_None);
    if (json == NULL) goto done;
    result = PyTuple_Pack(3, text, record, json);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(j.buf);
    Py_XDECREF(record);
    Py_XDECREF(text);
    Py_XDECREF(json);
    PyBuffer_Release(&block);
    PyBuffer_Release(&cid);
    return result;
}

static PyObject *cid_str(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "bytes expected");
        return NULL;
    }
    if (PyBytes_GET_SIZE(arg) != CID_LEN || !fast_cid((const uint8_t *)PyBytes_AS_STRING(arg))) Py_RETURN_NONE;
    return cid_string((const uint8_t *)PyBytes_AS_STRING(arg));
}

static PyMethodDef methods[] = {
    {"car_index", car_index, METH_VARARGS, "car_index(data, verify, max_blocks) -> (header, blocks) | None"},
    {"mst_walk", mst_walk, METH_VARARGS,
     "mst_walk(root, lookup, verify, max_layer, limit) -> [(key, cid)] | count | None"},
    {"record_form", record_form, METH_VARARGS, "record_form(block, cid, max_depth) -> (cid str, dict, JSON bytes | None) | False | None"},
    {"cid_str", cid_str, METH_O, "cid_str(cid bytes) -> str | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastrepo", "Native fast path of repository decoding.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastrepo(void) {
    if (SHA256_MD == NULL) {
        SHA256_MD = EVP_MD_fetch(NULL, "SHA256", NULL);
        SHA256_CTX_ = EVP_MD_CTX_new();
        if (SHA256_MD == NULL || SHA256_CTX_ == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA256");
            return NULL;
        }
    }
    S_LINK = PyUnicode_InternFromString("$link");
    S_BYTES = PyUnicode_InternFromString("$bytes");
    if (S_LINK == NULL || S_BYTES == NULL) return NULL;
    return PyModule_Create(&module);
}
