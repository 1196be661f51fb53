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
 *   payload_form(block, max_depth) -> record_form of the block under its own dag-cbor CID | None
 *   split_column(data, lengths_at, n, width, values_at, text) -> (list, end) | None  (a v2 block column)
 *   cid_str(cid bytes) -> str | None
 *   mst_invert(root, lookup, ops, verify) -> root cid bytes | None
 *   commit_event(blocks, commit, ops, invert) -> (did, rev, unsigned, sig, inverted root | None) | None
 *   ecdsa_verify_batch(verify, parse, ctx, [(pubkey, sig, data)]) -> [bool]  (see its comment)
 *
 * sha2-256 comes from OpenSSL's libcrypto (the same library CPython's hashlib uses).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CID_LEN 36        /* 0x01 codec 0x12 0x20 + 32-byte sha2-256 digest */
#define MAX_KEY_LEN 1024  /* mst.MAX_KEY_LEN */
#define MAX_HEADER_LEN (1 << 20)

typedef enum { OK = 0, BAIL = 1, FAIL = -1 } status;

static PyObject *S_LINK;  /* "$link" */
static PyObject *S_BYTES; /* "$bytes" */
static PyObject *S_ACTION, *S_PATH, *S_CID, *S_PREV; /* the keys of a firehose op */

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

/* Characters of a key segment ([A-Za-z0-9_~.:-]); '/' is 2. */
static uint8_t KEY_CHARS[256];

static void init_key_chars(void) {
    for (int c = 0; c < 256; c++)
        KEY_CHARS[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                       c == '~' || c == '.' || c == ':' || c == '-';
    KEY_CHARS['/'] = 2;
}

static int dots(const uint8_t *s, Py_ssize_t n) {
    return (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

/* mst.is_valid_key on ASCII bytes: <segment>/<segment>, neither "." nor "..", at most 1024 bytes. */
static int valid_key(const uint8_t *k, Py_ssize_t n) {
    if (n <= 0 || n > MAX_KEY_LEN) return 0;
    Py_ssize_t slash = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = KEY_CHARS[k[i]];
        if (c == 1) continue;
        if (c == 0 || slash >= 0) return 0;
        slash = i;
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

/* The JSON form of a record block d[0:len) whose CID (CID_LEN bytes, digest checked) is cid. */
static PyObject *form_of(const uint8_t *d, Py_ssize_t len, const uint8_t *cid, int max_depth) {
    PyObject *result = NULL, *record = NULL, *text = NULL, *json = NULL;
    jbuf_t j = {NULL, 0, 0, 1};
    Py_ssize_t pos = 0;
    if (len == 0 || d[0] >> 5 != 5) goto bail; /* a record is a map */
    record = json_item(d, len, &pos, 0, max_depth, &j);
    if (record == NULL) {
        if (PyErr_Occurred()) goto done;
        goto bail;
    }
    if (pos != len) goto bail;
    text = cid_string(cid);
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
    return result;
}

static PyObject *record_form(PyObject *self, PyObject *args) {
    Py_buffer block, cid;
    int max_depth;
    if (!PyArg_ParseTuple(args, "y*y*i", &block, &cid, &max_depth)) return NULL;
    PyObject *result;
    int matches;
    if (cid.len != CID_LEN || !fast_cid(cid.buf) || (matches = digest_matches(block.buf, block.len, cid.buf)) < 0)
        result = Py_NewRef(Py_None);
    else if (!matches)
        result = Py_NewRef(Py_False);
    else
        result = form_of(block.buf, block.len, cid.buf, max_depth);
    PyBuffer_Release(&block);
    PyBuffer_Release(&cid);
    return result;
}

/* record_form of a dag-cbor block whose CID is its own (CIDv1, dag-cbor, sha2-256): hashed once. */
static PyObject *payload_form(PyObject *self, PyObject *args) {
    Py_buffer block;
    int max_depth;
    if (!PyArg_ParseTuple(args, "y*i", &block, &max_depth)) return NULL;
    uint8_t cid[CID_LEN] = {0x01, 0x71, 0x12, 0x20};
    PyObject *result = sha256(block.buf, (size_t)block.len, cid + 4)
                           ? form_of(block.buf, block.len, cid, max_depth) : Py_NewRef(Py_None);
    PyBuffer_Release(&block);
    return result;
}

/* ----------------------------------------------------------------------------------- mst_invert */

/* Sync 1.1 operation inversion (mst.invert_ops) on a commit's CAR slice: the same algorithms as
 * mst.MST (get, add with split, update, delete with merge, then encoding the changed nodes), step
 * for step, so the result is the root the Python path computes. Any refusal of the Python path
 * (an op that disagrees with the tree, a repeated path, a missing or malformed node, a bad key)
 * is a bail, and so is anything this code does not take (a non-ASCII path, a CID of another form,
 * a lookup that is not a dict). All memory of one call lives in an arena freed at its end. */

#define ROOT_LAYER (-1000) /* mst._Loader.load(expected_layer=None) */
#define MAX_INVERT_OPS 4096
#define MAX_INVERT_LAYER 256

typedef struct inode inode_t;

typedef struct {
    inode_t *node;      /* a loaded or built node, or NULL */
    const uint8_t *cid; /* the node's CID (36 bytes) while not loaded, or NULL; both NULL: no subtree */
} ref_t;

typedef struct {
    const char *key;
    Py_ssize_t klen;
    const uint8_t *val; /* 36 bytes */
    ref_t right;
} ient_t;

struct inode {
    int layer;
    ref_t left;
    Py_ssize_t n, cap;
    ient_t *e;
    int has_cid; /* unchanged since loaded or encoded: cid is its CID (mst._Node.cid) */
    uint8_t cid[CID_LEN];
};

#define ARENA_CHUNK 16384
#define ARENA_STACK 8192 /* the first memory of a call: enough for a usual commit without malloc */
#define SMALL_INDEX 64   /* slots of a slice index kept on the stack */

typedef struct arena_block {
    struct arena_block *next;
    max_align_t data[];
} arena_block_t;

/* A CAR slice indexed in place: the sections' CIDs and blocks point into the caller's bytes. */
typedef struct {
    const uint8_t *cid;
    const uint8_t *block;
    Py_ssize_t len;
} slot_t;

typedef struct {
    slot_t *slots; /* open addressing on the digest's first bytes; cid NULL = free */
    size_t mask;
} car_idx_t;

typedef struct {
    PyObject *lookup; /* dict {cid bytes: block bytes}, or NULL with idx */
    car_idx_t *idx;
    PyObject *held;   /* list: the dict's blocks whose bytes nodes point into */
    arena_block_t *blocks;
    char *free_at; /* bump allocation inside the newest chunk */
    size_t free_left;
    int verify;
    int depth; /* recursion depth guard */
} inv_t;

static const ref_t NO_REF = {NULL, NULL};

static inline int ref_empty(ref_t r) { return r.node == NULL && r.cid == NULL; }

static inline ref_t node_ref(inode_t *n) {
    ref_t r = {n, NULL};
    return r;
}

/* Memory that lives until the call ends: bumped from 16 KiB chunks (larger requests get their own). */
static void *inv_alloc(inv_t *t, size_t n) {
    n = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
    if (n <= t->free_left) {
        void *p = t->free_at;
        t->free_at += n;
        t->free_left -= n;
        return p;
    }
    size_t size = n > ARENA_CHUNK / 4 ? n : ARENA_CHUNK;
    arena_block_t *b = PyMem_Malloc(sizeof(arena_block_t) + size);
    if (b == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    b->next = t->blocks;
    t->blocks = b;
    if (size == ARENA_CHUNK) {
        t->free_at = (char *)b->data + n;
        t->free_left = size - n;
    }
    return b->data;
}

static void inv_free(inv_t *t) {
    while (t->blocks != NULL) {
        arena_block_t *next = t->blocks->next;
        PyMem_Free(t->blocks);
        t->blocks = next;
    }
}

static inode_t *new_inode(inv_t *t, int layer, ref_t left, Py_ssize_t cap) {
    inode_t *nd = inv_alloc(t, sizeof(inode_t));
    if (nd == NULL) return NULL;
    if (cap < 4) cap = 4;
    nd->e = inv_alloc(t, sizeof(ient_t) * (size_t)cap);
    if (nd->e == NULL) return NULL;
    nd->layer = layer;
    nd->left = left;
    nd->n = 0;
    nd->cap = cap;
    nd->has_cid = 0;
    return nd;
}

static int reserve(inv_t *t, inode_t *nd, Py_ssize_t need) {
    if (need <= nd->cap) return 0;
    Py_ssize_t cap = nd->cap * 2;
    if (cap < need) cap = need;
    ient_t *grown = inv_alloc(t, sizeof(ient_t) * (size_t)cap);
    if (grown == NULL) return -1;
    if (nd->n) memcpy(grown, nd->e, sizeof(ient_t) * (size_t)nd->n);
    nd->e = grown; /* the old array stays in the arena until the call ends */
    nd->cap = cap;
    return 0;
}

static inline ref_t *gap_of(inode_t *nd, Py_ssize_t g) { return g == 0 ? &nd->left : &nd->e[g - 1].right; }

static inline int key_cmp(const char *a, Py_ssize_t an, const char *b, Py_ssize_t bn) {
    Py_ssize_t m = an < bn ? an : bn;
    int c = memcmp(a, b, (size_t)m);
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

/* bisect_left over the node's keys; *found when the key is there. */
static Py_ssize_t bisect(const inode_t *nd, const char *key, Py_ssize_t klen, int *found) {
    Py_ssize_t lo = 0, hi = nd->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (key_cmp(nd->e[mid].key, nd->e[mid].klen, key, klen) < 0) lo = mid + 1;
        else hi = mid;
    }
    *found = lo < nd->n && key_cmp(nd->e[lo].key, nd->e[lo].klen, key, klen) == 0;
    return lo;
}

/* mst._Loader.load + mst._parse_node; expected_layer ROOT_LAYER for the root. */
static inline size_t idx_hash(const uint8_t *cid) {
    size_t h;
    memcpy(&h, cid + 4, sizeof h);
    return h;
}

/* The first block stored under cid (a CAR keeps the first of duplicates), or NULL. */
static const slot_t *idx_find(const car_idx_t *idx, const uint8_t *cid) {
    for (size_t i = idx_hash(cid) & idx->mask;; i = (i + 1) & idx->mask) {
        const slot_t *s = &idx->slots[i];
        if (s->cid == NULL) return NULL;
        if (memcmp(s->cid, cid, CID_LEN) == 0) return s;
    }
}

/* The block of a node CID: OK with *d and *len, BAIL when absent (or not bytes), FAIL on an error. */
static status inv_get(inv_t *t, const uint8_t *cid, const uint8_t **d, Py_ssize_t *len) {
    if (t->idx != NULL) {
        const slot_t *s = idx_find(t->idx, cid);
        if (s == NULL) return BAIL;
        *d = s->block;
        *len = s->len;
        return OK;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)cid, CID_LEN);
    if (key == NULL) return FAIL;
    PyObject *obj = PyDict_GetItemWithError(t->lookup, key);
    Py_DECREF(key);
    if (obj == NULL) return PyErr_Occurred() ? FAIL : BAIL;
    if (!PyBytes_Check(obj)) return BAIL;
    if (PyList_Append(t->held, obj) < 0) return FAIL;
    *d = (const uint8_t *)PyBytes_AS_STRING(obj);
    *len = PyBytes_GET_SIZE(obj);
    return OK;
}

static status inv_load(inv_t *t, const uint8_t *cid, int expected_layer, inode_t **out) {
    if (expected_layer != ROOT_LAYER && expected_layer < 0) return BAIL;
    const uint8_t *d;
    Py_ssize_t end, pos = 0;
    status got = inv_get(t, cid, &d, &end);
    if (got != OK) return got;
    int major;
    uint64_t n;
    if (t->verify && digest_matches(d, end, cid) != 1) return BAIL;
    if (end < 4 || d[0] != 0xA2 || d[1] != 0x61 || d[2] != 'e') return BAIL;
    pos = 3;
    if (read_head(d, end, &pos, &major, &n) < 0 || major != 4 || n > (uint64_t)(end / 8)) return BAIL;
    Py_ssize_t count = (Py_ssize_t)n;
    inode_t *nd = new_inode(t, 0, NO_REF, count);
    if (nd == NULL) return FAIL;
    /* every key is at most its suffix plus the previous key: the node's size bounds them all */
    size_t room = 0;
    char *keys = NULL;
    const char *prev = NULL;
    Py_ssize_t prev_len = 0;
    int layer = expected_layer == ROOT_LAYER ? -1 : expected_layer;
    for (Py_ssize_t i = 0; i < count; i++) {
        ient_t *e = &nd->e[i];
        uint64_t klen, p;
        if (pos + 3 > end || d[pos] != 0xA4 || d[pos + 1] != 0x61 || d[pos + 2] != 'k') return BAIL;
        pos += 3;
        if (read_head(d, end, &pos, &major, &klen) < 0 || major != 2 || klen > (uint64_t)(end - pos)) return BAIL;
        const uint8_t *suffix = d + pos;
        pos += (Py_ssize_t)klen;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'p') return BAIL;
        pos += 2;
        if (read_head(d, end, &pos, &major, &p) < 0 || major != 0) return BAIL;
        if (p > (uint64_t)prev_len || (i == 0 && p != 0)) return BAIL;
        Py_ssize_t full = (Py_ssize_t)p + (Py_ssize_t)klen;
        if (full > MAX_KEY_LEN || full == 0) return BAIL;
        if (room < (size_t)full) {
            room = (size_t)full + (size_t)MAX_KEY_LEN * 4;
            keys = inv_alloc(t, room);
            if (keys == NULL) return FAIL;
        }
        char *kb = keys;
        if (p) memcpy(kb, prev, (size_t)p);
        memcpy(kb + p, suffix, (size_t)klen);
        if (prev != NULL && key_cmp(kb, full, prev, prev_len) <= 0) return BAIL;
        if (!valid_key((const uint8_t *)kb, full)) return BAIL;
        int depth = key_depth((const uint8_t *)kb, full);
        if (depth < 0) return BAIL;
        if (layer == -1) layer = depth;
        else if (depth != layer) return BAIL;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 't') return BAIL;
        pos += 2;
        e->right = NO_REF;
        if (pos < end && d[pos] == 0xF6) pos++;
        else if (read_link(d, end, &pos, &e->right.cid) < 0) return BAIL;
        if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'v') return BAIL;
        pos += 2;
        if (read_link(d, end, &pos, &e->val) < 0) return BAIL;
        e->key = kb;
        e->klen = full;
        prev = kb;
        prev_len = full;
        keys += full;
        room -= (size_t)full;
    }
    nd->n = count;
    if (pos + 2 > end || d[pos] != 0x61 || d[pos + 1] != 'l') return BAIL;
    pos += 2;
    if (pos < end && d[pos] == 0xF6) pos++;
    else if (read_link(d, end, &pos, &nd->left.cid) < 0) return BAIL;
    if (pos != end) return BAIL;
    if (layer == -1) { /* a root without entries: only the empty tree */
        if (!ref_empty(nd->left)) return BAIL;
        layer = 0;
    } else {
        if (count == 0 && ref_empty(nd->left)) return BAIL;
        if (layer == 0) {
            if (!ref_empty(nd->left)) return BAIL;
            for (Py_ssize_t i = 0; i < count; i++)
                if (!ref_empty(nd->e[i].right)) return BAIL;
        }
    }
    if (layer > MAX_INVERT_LAYER) return BAIL;
    nd->layer = layer;
    nd->has_cid = 1;
    memcpy(nd->cid, cid, CID_LEN);
    *out = nd;
    return OK;
}

/* MST._child: the subtree in slot g, loaded and kept in the node; *out NULL when there is none. */
static status inv_child(inv_t *t, inode_t *nd, Py_ssize_t g, inode_t **out) {
    ref_t *r = gap_of(nd, g);
    if (r->node != NULL || r->cid == NULL) {
        *out = r->node;
        return OK;
    }
    status st = inv_load(t, r->cid, nd->layer - 1, out);
    if (st != OK) return st;
    r->node = *out;
    r->cid = NULL;
    return OK;
}

/* mst._resolve_with (ref not empty). */
static status inv_resolve(inv_t *t, ref_t r, int layer, inode_t **out) {
    if (r.node != NULL) {
        *out = r.node;
        return OK;
    }
    return inv_load(t, r.cid, layer, out);
}

static inline inode_t *prune(inode_t *nd) { return nd->n == 0 && ref_empty(nd->left) ? NULL : nd; }

/* mst._wrap */
static status wrap(inv_t *t, inode_t *nd, int layer, int to_layer, inode_t **out) {
    while (nd != NULL && layer < to_layer) {
        layer++;
        nd = new_inode(t, layer, node_ref(nd), 0);
        if (nd == NULL) return FAIL;
    }
    *out = nd;
    return OK;
}

static inode_t *leaf(inv_t *t, int layer, const char *key, Py_ssize_t klen, const uint8_t *val) {
    inode_t *nd = new_inode(t, layer, NO_REF, 1);
    if (nd == NULL) return NULL;
    nd->e[0].key = key;
    nd->e[0].klen = klen;
    nd->e[0].val = val;
    nd->e[0].right = NO_REF;
    nd->n = 1;
    return nd;
}

#define DEEPER(t)                                                                                                  \
    do {                                                                                                           \
        if (++(t)->depth > 4 * MAX_INVERT_LAYER) return BAIL;                                                     \
    } while (0)

/* MST._split: the subtree's keys below and above `key` (which it must not hold). */
static status split(inv_t *t, ref_t ref, int layer, const char *key, Py_ssize_t klen, inode_t **lo, inode_t **hi) {
    inode_t *nd;
    status st = inv_resolve(t, ref, layer, &nd);
    if (st != OK) return st;
    int found;
    Py_ssize_t i = bisect(nd, key, klen, &found);
    if (found) return BAIL;
    ref_t gap = *gap_of(nd, i);
    inode_t *gl = NULL, *gr = NULL;
    if (!ref_empty(gap)) {
        DEEPER(t);
        st = split(t, gap, layer - 1, key, klen, &gl, &gr);
        t->depth--;
        if (st != OK) return st;
    }
    inode_t *left = new_inode(t, layer, nd->left, i);
    inode_t *right = new_inode(t, layer, node_ref(gr), nd->n - i);
    if (left == NULL || right == NULL) return FAIL;
    if (i) memcpy(left->e, nd->e, sizeof(ient_t) * (size_t)i);
    left->n = i;
    *gap_of(left, i) = node_ref(gl);
    if (nd->n - i) memcpy(right->e, nd->e + i, sizeof(ient_t) * (size_t)(nd->n - i));
    right->n = nd->n - i;
    *lo = prune(left);
    *hi = prune(right);
    return OK;
}

/* MST._insert */
static status insert(inv_t *t, inode_t *nd, int layer, const char *key, Py_ssize_t klen, const uint8_t *val,
                     int depth, inode_t **out) {
    int found;
    Py_ssize_t i = bisect(nd, key, klen, &found);
    if (found) return BAIL;
    status st;
    if (depth == layer) {
        ref_t gap = *gap_of(nd, i);
        inode_t *lo = NULL, *hi = NULL;
        if (!ref_empty(gap) && (st = split(t, gap, layer - 1, key, klen, &lo, &hi)) != OK) return st;
        *gap_of(nd, i) = node_ref(lo);
        if (reserve(t, nd, nd->n + 1) < 0) return FAIL;
        memmove(nd->e + i + 1, nd->e + i, sizeof(ient_t) * (size_t)(nd->n - i));
        nd->e[i].key = key;
        nd->e[i].klen = klen;
        nd->e[i].val = val;
        nd->e[i].right = node_ref(hi);
        nd->n++;
    } else {
        inode_t *child;
        if ((st = inv_child(t, nd, i, &child)) != OK) return st;
        if (child == NULL) {
            inode_t *lf = leaf(t, depth, key, klen, val), *wrapped;
            if (lf == NULL) return FAIL;
            if ((st = wrap(t, lf, depth, layer - 1, &wrapped)) != OK) return st;
            *gap_of(nd, i) = node_ref(wrapped);
        } else {
            inode_t *sub;
            DEEPER(t);
            st = insert(t, child, layer - 1, key, klen, val, depth, &sub);
            t->depth--;
            if (st != OK) return st;
            *gap_of(nd, i) = node_ref(sub);
        }
    }
    nd->has_cid = 0;
    *out = nd;
    return OK;
}

/* MST._update */
static status update(inv_t *t, inode_t *nd, const char *key, Py_ssize_t klen, const uint8_t *val) {
    int found;
    Py_ssize_t i = bisect(nd, key, klen, &found);
    status st;
    if (found) {
        nd->e[i].val = val;
    } else {
        inode_t *child;
        if ((st = inv_child(t, nd, i, &child)) != OK) return st;
        if (child == NULL) return BAIL; /* not present */
        DEEPER(t);
        st = update(t, child, key, klen, val);
        t->depth--;
        if (st != OK) return st;
        *gap_of(nd, i) = node_ref(child);
    }
    nd->has_cid = 0;
    return OK;
}

/* MST._merge: two adjacent subtrees of one layer (all keys of a below those of b). */
static status merge(inv_t *t, ref_t a, ref_t b, int layer, ref_t *out) {
    if (ref_empty(a)) {
        *out = b;
        return OK;
    }
    if (ref_empty(b)) {
        *out = a;
        return OK;
    }
    inode_t *na, *nb;
    status st;
    if ((st = inv_resolve(t, a, layer, &na)) != OK || (st = inv_resolve(t, b, layer, &nb)) != OK) return st;
    Py_ssize_t last = na->n;
    ref_t m;
    DEEPER(t);
    st = merge(t, *gap_of(na, last), nb->left, layer - 1, &m);
    t->depth--;
    if (st != OK) return st;
    *gap_of(na, last) = m;
    if (reserve(t, na, na->n + nb->n) < 0) return FAIL;
    if (nb->n) memcpy(na->e + na->n, nb->e, sizeof(ient_t) * (size_t)nb->n);
    na->n += nb->n;
    na->has_cid = 0;
    *out = node_ref(na);
    return OK;
}

/* MST._delete */
static status delete_key(inv_t *t, inode_t *nd, int layer, const char *key, Py_ssize_t klen, inode_t **out) {
    int found;
    Py_ssize_t i = bisect(nd, key, klen, &found);
    status st;
    if (found) {
        ref_t merged;
        if ((st = merge(t, *gap_of(nd, i), nd->e[i].right, layer - 1, &merged)) != OK) return st;
        memmove(nd->e + i, nd->e + i + 1, sizeof(ient_t) * (size_t)(nd->n - i - 1));
        nd->n--;
        *gap_of(nd, i) = merged;
    } else {
        inode_t *child, *sub;
        if ((st = inv_child(t, nd, i, &child)) != OK) return st;
        if (child == NULL) return BAIL; /* not present */
        DEEPER(t);
        st = delete_key(t, child, layer - 1, key, klen, &sub);
        t->depth--;
        if (st != OK) return st;
        *gap_of(nd, i) = node_ref(sub);
    }
    nd->has_cid = 0;
    *out = prune(nd);
    return OK;
}

static inline void put_head(uint8_t **o, int major, uint64_t n) {
    uint8_t *p = *o;
    if (n < 24) {
        *p++ = (uint8_t)(major | n);
    } else if (n < 0x100) {
        *p++ = (uint8_t)(major | 24);
        *p++ = (uint8_t)n;
    } else if (n < 0x10000) {
        *p++ = (uint8_t)(major | 25);
        *p++ = (uint8_t)(n >> 8);
        *p++ = (uint8_t)n;
    } else {
        *p++ = (uint8_t)(major | 26);
        *p++ = (uint8_t)(n >> 24);
        *p++ = (uint8_t)(n >> 16);
        *p++ = (uint8_t)(n >> 8);
        *p++ = (uint8_t)n;
    }
    *o = p;
}

static inline void put_link(uint8_t **o, const uint8_t *cid) {
    uint8_t *p = *o;
    if (cid == NULL) {
        *p++ = 0xF6;
    } else {
        *p++ = 0xD8;
        *p++ = 0x2A;
        *p++ = 0x58;
        *p++ = CID_LEN + 1;
        *p++ = 0;
        memcpy(p, cid, CID_LEN);
        p += CID_LEN;
    }
    *o = p;
}

/* mst._serialize + mst.encode_node: the node's CID, encoding it and every changed descendant. */
static status serialize(inv_t *t, inode_t *nd) {
    if (nd->has_cid) return OK;
    status st;
    const uint8_t *left = nd->left.cid;
    if (nd->left.node != NULL) {
        DEEPER(t);
        st = serialize(t, nd->left.node);
        t->depth--;
        if (st != OK) return st;
        left = nd->left.node->cid;
    }
    size_t size = 3 + 9 + 3 + 1 + 4 + CID_LEN;
    for (Py_ssize_t i = 0; i < nd->n; i++) {
        ient_t *e = &nd->e[i];
        size += 3 + 9 + (size_t)e->klen + 2 + 9 + 2 + 5 + CID_LEN + 2 + 5 + CID_LEN;
        if (e->right.node != NULL) {
            DEEPER(t);
            st = serialize(t, e->right.node);
            t->depth--;
            if (st != OK) return st;
        }
    }
    uint8_t *buf = PyMem_Malloc(size), *o = buf;
    if (buf == NULL) {
        PyErr_NoMemory();
        return FAIL;
    }
    *o++ = 0xA2;
    *o++ = 0x61;
    *o++ = 'e';
    put_head(&o, 0x80, (uint64_t)nd->n);
    const char *prev = NULL;
    Py_ssize_t prev_len = 0;
    for (Py_ssize_t i = 0; i < nd->n; i++) {
        ient_t *e = &nd->e[i];
        Py_ssize_t p = 0, m = e->klen < prev_len ? e->klen : prev_len;
        while (p < m && e->key[p] == prev[p]) p++;
        *o++ = 0xA4;
        *o++ = 0x61;
        *o++ = 'k';
        put_head(&o, 0x40, (uint64_t)(e->klen - p));
        memcpy(o, e->key + p, (size_t)(e->klen - p));
        o += e->klen - p;
        *o++ = 0x61;
        *o++ = 'p';
        put_head(&o, 0x00, (uint64_t)p);
        *o++ = 0x61;
        *o++ = 't';
        put_link(&o, e->right.node != NULL ? e->right.node->cid : e->right.cid);
        *o++ = 0x61;
        *o++ = 'v';
        put_link(&o, e->val);
        prev = e->key;
        prev_len = e->klen;
    }
    *o++ = 0x61;
    *o++ = 'l';
    put_link(&o, left);
    nd->cid[0] = 0x01;
    nd->cid[1] = 0x71;
    nd->cid[2] = 0x12;
    nd->cid[3] = 0x20;
    int ok = sha256(buf, (size_t)(o - buf), nd->cid + 4);
    PyMem_Free(buf);
    if (!ok) return BAIL;
    nd->has_cid = 1;
    return OK;
}

typedef struct {
    int action; /* 0 create, 1 update, 2 delete */
    const char *path;
    Py_ssize_t plen;
    const uint8_t *cid;  /* NULL: None */
    const uint8_t *prev; /* NULL: None */
} iop_t;

/* An op's link: None -> NULL; a 36-byte fast CID -> its bytes; anything else -> -1 (bail). */
static int op_link(PyObject *v, const uint8_t **out) {
    if (v == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != CID_LEN || !fast_cid((const uint8_t *)PyBytes_AS_STRING(v)))
        return -1;
    *out = (const uint8_t *)PyBytes_AS_STRING(v);
    return 0;
}

static status invert(inv_t *t, const uint8_t *root, iop_t *ops, Py_ssize_t n, uint8_t *out) {
    if (n == 0) { /* the tree is not even loaded (mst.MST.root_cid of an untouched tree) */
        memcpy(out, root, CID_LEN);
        return OK;
    }
    inode_t *top;
    status st = inv_load(t, root, ROOT_LAYER, &top);
    if (st != OK) return st;
    for (Py_ssize_t k = n - 1; k >= 0; k--) {
        iop_t *op = &ops[k];
        for (Py_ssize_t j = k + 1; j < n; j++) /* a path twice in one commit */
            if (ops[j].plen == op->plen && memcmp(ops[j].path, op->path, (size_t)op->plen) == 0) return BAIL;
        /* MST.get */
        const uint8_t *current = NULL;
        inode_t *nd = top;
        while (nd != NULL) {
            int found;
            Py_ssize_t i = bisect(nd, op->path, op->plen, &found);
            if (found) {
                current = nd->e[i].val;
                break;
            }
            if ((st = inv_child(t, nd, i, &nd)) != OK) return st;
        }
        if (op->action == 0) { /* undo a create: delete */
            if (op->cid == NULL || current == NULL || memcmp(current, op->cid, CID_LEN) != 0) return BAIL;
            inode_t *fresh;
            if ((st = delete_key(t, top, top->layer, op->path, op->plen, &fresh)) != OK) return st;
            while (fresh != NULL && fresh->n == 0 && !ref_empty(fresh->left)) {
                if ((st = inv_resolve(t, fresh->left, fresh->layer - 1, &fresh)) != OK) return st;
            }
            if (fresh == NULL && (fresh = new_inode(t, 0, NO_REF, 0)) == NULL) return FAIL;
            top = fresh;
        } else if (op->action == 1) { /* undo an update: restore prev */
            if (op->cid == NULL || current == NULL || memcmp(current, op->cid, CID_LEN) != 0) return BAIL;
            if (op->prev == NULL) return BAIL;
            if ((st = update(t, top, op->path, op->plen, op->prev)) != OK) return st;
        } else { /* undo a delete: add prev back */
            if (current != NULL || op->prev == NULL) return BAIL;
            if (!valid_key((const uint8_t *)op->path, op->plen)) return BAIL;
            int depth = key_depth((const uint8_t *)op->path, op->plen);
            if (depth < 0) return BAIL;
            if (top->n == 0 && ref_empty(top->left)) {
                if ((top = leaf(t, depth, op->path, op->plen, op->prev)) == NULL) return FAIL;
            } else if (depth > top->layer) {
                inode_t *lo, *hi, *wlo, *whi;
                if ((st = split(t, node_ref(top), top->layer, op->path, op->plen, &lo, &hi)) != OK) return st;
                if ((st = wrap(t, lo, top->layer, depth - 1, &wlo)) != OK) return st;
                if ((st = wrap(t, hi, top->layer, depth - 1, &whi)) != OK) return st;
                inode_t *grown = leaf(t, depth, op->path, op->plen, op->prev);
                if (grown == NULL) return FAIL;
                grown->left = node_ref(wlo);
                grown->e[0].right = node_ref(whi);
                top = grown;
            } else {
                if ((st = insert(t, top, top->layer, op->path, op->plen, op->prev, depth, &top)) != OK) return st;
            }
        }
    }
    if ((st = serialize(t, top)) != OK) return st;
    memcpy(out, top->cid, CID_LEN);
    return OK;
}

static PyObject *mst_invert(PyObject *self, PyObject *args) {
    Py_buffer root;
    PyObject *lookup, *ops_obj;
    int verify;
    if (!PyArg_ParseTuple(args, "y*OOp", &root, &lookup, &ops_obj, &verify)) return NULL;
    PyObject *result = NULL, *ops_fast = NULL;
    iop_t *ops = NULL;
    max_align_t stack_arena[ARENA_STACK / sizeof(max_align_t)];
    inv_t t;
    memset(&t, 0, sizeof t);
    t.free_at = (char *)stack_arena;
    t.free_left = sizeof stack_arena;
    t.lookup = lookup;
    t.verify = verify;
    if (root.len != CID_LEN || !fast_cid(root.buf) || !PyDict_CheckExact(lookup)) goto bail;
    ops_fast = PySequence_Fast(ops_obj, "ops must be a sequence");
    if (ops_fast == NULL) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ops_fast);
    if (n > MAX_INVERT_OPS) goto bail;
    ops = PyMem_Malloc(sizeof(iop_t) * (size_t)(n ? n : 1));
    if (ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *op = PySequence_Fast_GET_ITEM(ops_fast, k);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 4) goto bail;
        PyObject *action = PyTuple_GET_ITEM(op, 0), *path = PyTuple_GET_ITEM(op, 1);
        if (!PyUnicode_Check(action) || !PyUnicode_Check(path) || !PyUnicode_IS_ASCII(path)) goto bail;
        if (PyUnicode_CompareWithASCIIString(action, "create") == 0) ops[k].action = 0;
        else if (PyUnicode_CompareWithASCIIString(action, "update") == 0) ops[k].action = 1;
        else if (PyUnicode_CompareWithASCIIString(action, "delete") == 0) ops[k].action = 2;
        else goto bail;
        ops[k].path = (const char *)PyUnicode_1BYTE_DATA(path);
        ops[k].plen = PyUnicode_GET_LENGTH(path);
        if (op_link(PyTuple_GET_ITEM(op, 2), &ops[k].cid) < 0 || op_link(PyTuple_GET_ITEM(op, 3), &ops[k].prev) < 0)
            goto bail;
    }
    t.held = PyList_New(0);
    if (t.held == NULL) goto done;
    uint8_t out[CID_LEN];
    status st = invert(&t, root.buf, ops, n, out);
    if (st == FAIL) goto done;
    if (st == BAIL) goto bail;
    result = PyBytes_FromStringAndSize((const char *)out, CID_LEN);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    inv_free(&t);
    Py_XDECREF(t.held);
    PyMem_Free(ops);
    Py_XDECREF(ops_fast);
    PyBuffer_Release(&root);
    return result;
}

/* ---------------------------------------------------------------------------------- commit_event */

/* Index a CAR slice whose header is the canonical {roots: [commit, ...], version: 1}, checking every
 * block against its CID; BAIL for anything else (the Python reader then says what is wrong). */
static status index_slice(const uint8_t *d, Py_ssize_t end, const uint8_t *commit, car_idx_t *idx, slot_t **mem) {
    Py_ssize_t pos = 0;
    uint64_t header_len, len, nroots;
    int major;
    if (read_varint(d, end, &pos, &header_len) < 0 || header_len == 0 || header_len > MAX_HEADER_LEN ||
        (Py_ssize_t)header_len > end - pos)
        return BAIL;
    Py_ssize_t hend = pos + (Py_ssize_t)header_len, hp = pos;
    if (hend - hp < 7 || memcmp(d + hp, "\xa2\x65roots", 7) != 0) return BAIL;
    hp += 7;
    if (read_head(d, hend, &hp, &major, &nroots) < 0 || major != 4 || nroots == 0) return BAIL;
    for (uint64_t i = 0; i < nroots; i++) {
        const uint8_t *root;
        if (read_link(d, hend, &hp, &root) < 0) return BAIL;
        if (i == 0 && memcmp(root, commit, CID_LEN) != 0) return BAIL;
    }
    if (hend - hp != 9 || memcmp(d + hp, "\x67version\x01", 9) != 0) return BAIL;
    pos = hend;
    /* First pass: the sections' shape, and their count for the table's size. */
    Py_ssize_t first = pos, count = 0;
    while (pos < end) {
        if (read_varint(d, end, &pos, &len) < 0 || len < CID_LEN || len > (uint64_t)(end - pos)) return BAIL;
        if (!fast_cid(d + pos)) return BAIL;
        pos += (Py_ssize_t)len;
        count++;
    }
    size_t cap = 8;
    while (cap < (size_t)count * 2) cap *= 2;
    slot_t *slots = idx->slots; /* the caller's SMALL_INDEX slots, or memory of our own */
    if (cap > SMALL_INDEX) {
        slots = PyMem_Calloc(cap, sizeof(slot_t));
        if (slots == NULL) {
            PyErr_NoMemory();
            return FAIL;
        }
        *mem = slots;
    } else {
        memset(slots, 0, cap * sizeof(slot_t));
    }
    idx->slots = slots;
    idx->mask = cap - 1;
    for (pos = first; pos < end;) {
        read_varint(d, end, &pos, &len); /* checked above */
        const uint8_t *cid = d + pos;
        const uint8_t *block = cid + CID_LEN;
        Py_ssize_t block_len = (Py_ssize_t)len - CID_LEN;
        if (digest_matches(block, block_len, cid) != 1) return BAIL;
        size_t i = idx_hash(cid) & idx->mask;
        while (slots[i].cid != NULL && memcmp(slots[i].cid, cid, CID_LEN) != 0) i = (i + 1) & idx->mask;
        if (slots[i].cid == NULL) { /* a duplicate keeps the first */
            slots[i].cid = cid;
            slots[i].block = block;
            slots[i].len = block_len;
        }
        pos += (Py_ssize_t)len;
    }
    return OK;
}

/* A text string at *pos as a new str (NULL with no error set: not canonical or not UTF-8). */
static PyObject *read_text(const uint8_t *d, Py_ssize_t end, Py_ssize_t *pos) {
    int major;
    uint64_t n;
    Py_ssize_t p = *pos;
    if (read_head(d, end, &p, &major, &n) < 0 || major != 3 || n > (uint64_t)(end - p)) return NULL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)d + p, (Py_ssize_t)n, "strict");
    if (s == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
        return NULL;
    }
    *pos = p + (Py_ssize_t)n;
    return s;
}

/* The canonical signed commit {did, rev, sig, data, prev, version: 3} (keys in DAG-CBOR order):
 * (did, rev, data, unsigned bytes, sig), the unsigned bytes being the block without its sig entry
 * (what commit.UnsignedCommit.signing_bytes encodes). NULL: an error, or a bail (no error set). */
static PyObject *parse_signed_commit(const uint8_t *d, Py_ssize_t end, const uint8_t **data) {
    Py_ssize_t pos = 0, sig_start, sig_end;
    int major;
    uint64_t n;
    PyObject *did = NULL, *rev = NULL, *unsigned_bytes = NULL, *sig = NULL, *result = NULL;
    const uint8_t *prev;
    if (end < 5 || memcmp(d, "\xa6\x63" "did", 5) != 0) return NULL;
    pos = 5;
    if ((did = read_text(d, end, &pos)) == NULL) goto done;
    if (end - pos < 4 || memcmp(d + pos, "\x63rev", 4) != 0) goto done;
    pos += 4;
    if ((rev = read_text(d, end, &pos)) == NULL) goto done;
    sig_start = pos;
    if (end - pos < 4 || memcmp(d + pos, "\x63sig", 4) != 0) goto done;
    pos += 4;
    if (read_head(d, end, &pos, &major, &n) < 0 || major != 2 || n > (uint64_t)(end - pos)) goto done;
    sig = PyBytes_FromStringAndSize((const char *)d + pos, (Py_ssize_t)n);
    if (sig == NULL) goto done;
    pos += (Py_ssize_t)n;
    sig_end = pos;
    if (end - pos < 5 || memcmp(d + pos, "\x64" "data", 5) != 0) goto done;
    pos += 5;
    if (read_link(d, end, &pos, data) < 0) goto done;
    if (end - pos < 5 || memcmp(d + pos, "\x64prev", 5) != 0) goto done;
    pos += 5;
    if (pos < end && d[pos] == 0xF6) pos++;
    else if (read_link(d, end, &pos, &prev) < 0) goto done;
    if (end - pos != 9 || memcmp(d + pos, "\x67version\x03", 9) != 0) goto done;
    unsigned_bytes = PyBytes_FromStringAndSize(NULL, end - (sig_end - sig_start));
    if (unsigned_bytes == NULL) goto done;
    char *o = PyBytes_AS_STRING(unsigned_bytes);
    o[0] = (char)0xA5;
    memcpy(o + 1, d + 1, (size_t)(sig_start - 1));
    memcpy(o + sig_start, d + sig_end, (size_t)(end - sig_end));
    result = PyTuple_Pack(4, did, rev, unsigned_bytes, sig);
done:
    Py_XDECREF(did);
    Py_XDECREF(rev);
    Py_XDECREF(unsigned_bytes);
    Py_XDECREF(sig);
    return result;
}

/* An op map of a decoded #commit into iop_t: 0, or -1 to bail (anything RepoOp.from_firehose would
 * read differently or refuse). The strings and bytes stay owned by the ops list. */
static int read_op(PyObject *op, iop_t *out) {
    if (!PyDict_CheckExact(op)) return -1;
    /* str keys with str hashes: no Python code runs, no error can be set */
    PyObject *action = PyDict_GetItem(op, S_ACTION), *path = PyDict_GetItem(op, S_PATH);
    PyObject *cid = PyDict_GetItem(op, S_CID), *prev = PyDict_GetItem(op, S_PREV);
    if (action == NULL || path == NULL || !PyUnicode_CheckExact(action) || !PyUnicode_CheckExact(path) ||
        !PyUnicode_IS_ASCII(path))
        return -1;
    if (PyUnicode_CompareWithASCIIString(action, "create") == 0) out->action = 0;
    else if (PyUnicode_CompareWithASCIIString(action, "update") == 0) out->action = 1;
    else if (PyUnicode_CompareWithASCIIString(action, "delete") == 0) out->action = 2;
    else return -1;
    out->path = (const char *)PyUnicode_1BYTE_DATA(path);
    out->plen = PyUnicode_GET_LENGTH(path);
    if (op_link(cid == NULL ? Py_None : cid, &out->cid) < 0 || op_link(prev == NULL ? Py_None : prev, &out->prev) < 0)
        return -1;
    return 0;
}

static PyObject *commit_event(PyObject *self, PyObject *args) {
    Py_buffer blocks, commit;
    PyObject *ops_obj;
    int invert_ops;
    if (!PyArg_ParseTuple(args, "y*y*O!p", &blocks, &commit, &PyList_Type, &ops_obj, &invert_ops)) return NULL;
    PyObject *result = NULL, *parsed = NULL;
    iop_t *ops = NULL;
    slot_t *slots = NULL, small[SMALL_INDEX];
    car_idx_t idx = {small, 0};
    max_align_t stack_arena[ARENA_STACK / sizeof(max_align_t)];
    inv_t t;
    memset(&t, 0, sizeof t);
    t.idx = &idx;
    t.free_at = (char *)stack_arena;
    t.free_left = sizeof stack_arena;
    if (commit.len != CID_LEN || !fast_cid(commit.buf)) goto bail;
    Py_ssize_t n = PyList_GET_SIZE(ops_obj);
    if (n > MAX_INVERT_OPS) goto bail;
    ops = PyMem_Malloc(sizeof(iop_t) * (size_t)(n ? n : 1));
    if (ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        if (read_op(PyList_GET_ITEM(ops_obj, k), &ops[k]) < 0) goto bail;
    status st = index_slice(blocks.buf, blocks.len, commit.buf, &idx, &slots);
    if (st == FAIL) goto done;
    if (st == BAIL) goto bail;
    const slot_t *cs = idx_find(&idx, commit.buf);
    if (cs == NULL) goto bail;
    const uint8_t *data = NULL;
    parsed = parse_signed_commit(cs->block, cs->len, &data);
    if (parsed == NULL) {
        if (PyErr_Occurred()) goto done;
        goto bail;
    }
    for (Py_ssize_t k = 0; k < n; k++) /* the record of every create and update is in the slice */
        if (ops[k].action != 2 && ops[k].cid != NULL && idx_find(&idx, ops[k].cid) == NULL) goto bail;
    PyObject *inverted;
    if (invert_ops) {
        uint8_t root[CID_LEN];
        st = invert(&t, data, ops, n, root);
        if (st == FAIL) goto done;
        if (st == BAIL) goto bail;
        inverted = PyBytes_FromStringAndSize((const char *)root, CID_LEN);
        if (inverted == NULL) goto done;
    } else {
        inverted = Py_NewRef(Py_None);
    }
    result = Py_BuildValue("(OOOON)", PyTuple_GET_ITEM(parsed, 0), PyTuple_GET_ITEM(parsed, 1),
                           PyTuple_GET_ITEM(parsed, 2), PyTuple_GET_ITEM(parsed, 3), inverted);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    inv_free(&t);
    PyMem_Free(slots);
    PyMem_Free(ops);
    Py_XDECREF(parsed);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&commit);
    return result;
}

/* ---------------------------------------------------------------------------------- split_column */

/* One variable-length column of a Jetstream v2 block: n little-endian unsigned lengths of `width`
 * bytes (1, 2 or 4) at data[lengths_at:], their values concatenated at data[values_at:]. Returns
 * (list of str (text: each value UTF-8) or bytes, offset just past the values), or None when the
 * column overruns data or a text value is not UTF-8 (the Python path names the error). */
static PyObject *split_column(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t lengths_at, n, values_at;
    int width, text;
    if (!PyArg_ParseTuple(args, "y*nnini", &data, &lengths_at, &n, &width, &values_at, &text)) return NULL;
    PyObject *list = NULL, *result = NULL;
    const uint8_t *d = data.buf;
    Py_ssize_t size = data.len;
    if (n < 0 || lengths_at < 0 || values_at < 0 || lengths_at > size || (width != 1 && width != 2 && width != 4) ||
        n > (size - lengths_at) / width || values_at > size)
        goto bail;
    list = PyList_New(n);
    if (list == NULL) goto done;
    const uint8_t *lens = d + lengths_at;
    Py_ssize_t p = values_at;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *l = lens + i * width;
        Py_ssize_t len = width == 1 ? l[0] : width == 2 ? (Py_ssize_t)(l[0] | l[1] << 8)
                                                        : (Py_ssize_t)((uint32_t)l[0] | (uint32_t)l[1] << 8 |
                                                                       (uint32_t)l[2] << 16 | (uint32_t)l[3] << 24);
        if (len > size - p) goto bail;
        PyObject *item;
        if (!text) {
            item = PyBytes_FromStringAndSize((const char *)d + p, len);
        } else {
            int ascii = 1;
            for (Py_ssize_t k = 0; k < len; k++) {
                if (d[p + k] & 0x80) {
                    ascii = 0;
                    break;
                }
            }
            if (ascii) {
                item = PyUnicode_New(len, 127);
                if (item != NULL) memcpy(PyUnicode_DATA(item), d + p, (size_t)len);
            } else {
                item = PyUnicode_DecodeUTF8((const char *)d + p, len, "strict");
                if (item == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Clear();
                    goto bail;
                }
            }
        }
        if (item == NULL) goto done;
        PyList_SET_ITEM(list, i, item);
        p += len;
    }
    result = Py_BuildValue("(On)", list, p);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(list);
    PyBuffer_Release(&data);
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

/* ------------------------------------------------------------------------- signatures, batched */

/* libsecp256k1's secp256k1_ecdsa_verify and secp256k1_ecdsa_signature_parse_compact; their
 * signature and public key arguments are 64-byte opaque structs (unsigned char data[64]). */
typedef int (*ecdsa_verify_fn)(const void *ctx, const unsigned char *sig, const unsigned char *msg32,
                               const unsigned char *pubkey);
typedef int (*ecdsa_parse_fn)(const void *ctx, unsigned char *sig, const unsigned char *input64);

/* ecdsa_verify_batch(verify, parse, ctx, items) -> [bool]
 *
 * secp256k1 ECDSA over sha2-256 for every (pubkey, sig, data) of the list items, without the GIL:
 * pubkey is libsecp256k1's parsed public key (64 bytes, as coincurve holds it), sig the 64-byte
 * compact r || s, data the signed bytes. verify, parse and ctx are the addresses of libsecp256k1's
 * two functions and of a verification context (coincurve's, which outlives every call). A
 * high-S signature does not verify (libsecp256k1 refuses it); an item that is not three bytes
 * objects of those lengths is False. Like the rest of this module it only ever accepts: the caller
 * decides a False with the reference path. Items are read while the GIL is held; the list is
 * copied first, so the bytes stay alive whatever another thread does to it. */
static PyObject *ecdsa_verify_batch(PyObject *self, PyObject *args) {
    unsigned long long verify_addr, parse_addr, ctx_addr;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "KKKO!", &verify_addr, &parse_addr, &ctx_addr, &PyList_Type, &items)) return NULL;
    if (verify_addr == 0 || parse_addr == 0 || ctx_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "null libsecp256k1 address");
        return NULL;
    }
    ecdsa_verify_fn verify = (ecdsa_verify_fn)(uintptr_t)verify_addr;
    ecdsa_parse_fn parse = (ecdsa_parse_fn)(uintptr_t)parse_addr;
    const void *ctx = (const void *)(uintptr_t)ctx_addr;
    PyObject *held = PyList_GetSlice(items, 0, PyList_GET_SIZE(items));
    if (held == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(held);
    const unsigned char **keys = PyMem_Calloc((size_t)n + 1, sizeof(*keys));
    const unsigned char **sigs = PyMem_Calloc((size_t)n + 1, sizeof(*sigs));
    const unsigned char **data = PyMem_Calloc((size_t)n + 1, sizeof(*data));
    size_t *lens = PyMem_Calloc((size_t)n + 1, sizeof(*lens));
    char *ok = PyMem_Calloc((size_t)n + 1, 1);
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    PyObject *out = NULL;
    if (keys == NULL || sigs == NULL || data == NULL || lens == NULL || ok == NULL || mctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(held, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) continue;
        PyObject *k = PyTuple_GET_ITEM(t, 0), *s = PyTuple_GET_ITEM(t, 1), *d = PyTuple_GET_ITEM(t, 2);
        if (!PyBytes_Check(k) || PyBytes_GET_SIZE(k) != 64 || !PyBytes_Check(s) || PyBytes_GET_SIZE(s) != 64 ||
            !PyBytes_Check(d))
            continue;
        keys[i] = (const unsigned char *)PyBytes_AS_STRING(k);
        sigs[i] = (const unsigned char *)PyBytes_AS_STRING(s);
        data[i] = (const unsigned char *)PyBytes_AS_STRING(d);
        lens[i] = (size_t)PyBytes_GET_SIZE(d);
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (keys[i] == NULL) continue;
        unsigned char digest[DIGEST_LEN], sig[64];
        unsigned int len = 0;
        if (!EVP_DigestInit_ex2(mctx, SHA256_MD, NULL) || !EVP_DigestUpdate(mctx, data[i], lens[i]) ||
            !EVP_DigestFinal_ex(mctx, digest, &len) || len != DIGEST_LEN)
            continue;
        if (!parse(ctx, sig, sigs[i])) continue;
        ok[i] = verify(ctx, sig, digest, keys[i]) == 1;
    }
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = ok[i] ? Py_True : Py_False;
        Py_INCREF(b);
        PyList_SET_ITEM(out, i, b);
    }
done:
    if (mctx != NULL) EVP_MD_CTX_free(mctx);
    PyMem_Free(keys);
    PyMem_Free(sigs);
    PyMem_Free(data);
    PyMem_Free(lens);
    PyMem_Free(ok);
    Py_DECREF(held);
    return out;
}

static PyMethodDef methods[] = {
    {"car_index", car_index, METH_VARARGS, "car_index(data, verify, max_blocks) -> (header, blocks) | None"},
    {"mst_walk", mst_walk, METH_VARARGS,
     "mst_walk(root, lookup, verify, max_layer, limit) -> [(key, cid)] | count | None"},
    {"record_form", record_form, METH_VARARGS, "record_form(block, cid, max_depth) -> (cid str, dict, JSON bytes | None) | False | None"},
    {"payload_form", payload_form, METH_VARARGS,
     "payload_form(block, max_depth) -> (cid str, dict, JSON bytes | None) | None: its own dag-cbor CID"},
    {"split_column", split_column, METH_VARARGS,
     "split_column(data, lengths_at, n, width, values_at, text) -> (values, end) | None"},
    {"cid_str", cid_str, METH_O, "cid_str(cid bytes) -> str | None"},
    {"mst_invert", mst_invert, METH_VARARGS,
     "mst_invert(root, lookup, [(action, path, cid | None, prev | None)], verify) -> root cid | None"},
    {"commit_event", commit_event, METH_VARARGS,
     "commit_event(blocks, commit, ops, invert) -> (did, rev, unsigned, sig, inverted root | None) | None"},
    {"ecdsa_verify_batch", ecdsa_verify_batch, METH_VARARGS,
     "ecdsa_verify_batch(verify, parse, ctx, [(pubkey, sig, data)]) -> [bool], without the GIL"},
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
    init_key_chars();
    S_LINK = PyUnicode_InternFromString("$link");
    S_BYTES = PyUnicode_InternFromString("$bytes");
    S_ACTION = PyUnicode_InternFromString("action");
    S_PATH = PyUnicode_InternFromString("path");
    S_CID = PyUnicode_InternFromString("cid");
    S_PREV = PyUnicode_InternFromString("prev");
    if (S_LINK == NULL || S_BYTES == NULL || S_ACTION == NULL || S_PATH == NULL || S_CID == NULL || S_PREV == NULL)
        return NULL;
    return PyModule_Create(&module);
}
