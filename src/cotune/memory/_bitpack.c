/* Element kernels for backrazor packs (see kernels.py): select + compress in one pass,
 * compress with a bit mask, expand, and overwrite at the set bits.
 *
 * Arrays arrive as C-contiguous buffers of signed integers of 1, 2, 4 or 8 bytes: the bit
 * patterns of the tensors, so one kernel serves every float dtype (bfloat16 included) and
 * values are copied bit for bit. The magnitude of a float is its pattern with the sign bit
 * cleared (`absmask`); for non-negative floats integer order is numeric order. Bit masks
 * are (B, ceil(n / 8)) bytes, least significant bit first.
 *
 * The loops are branch-free on the data: a value is always written and the write
 * position only advances when the element is kept. Outputs are allocated by the caller
 * at (an estimate of) their size and trimmed, so no worst-case buffer is ever touched. A plain C extension rather than a JIT
 * (numba) because the point of these kernels is device memory: numba and llvmlite add
 * about 180 MiB of resident memory to the process, this module a few kilobytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define RADIX_BITS 11

/* The k-th smallest (0-based) of a[0..n-1], reordering a (Hoare quickselect, median of
 * three pivots). */
static int64_t select_kth(int64_t *a, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        int64_t x = a[lo], y = a[mid], z = a[hi];
        int64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                int64_t t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

#define DEFINE_KERNELS(T)                                                                \
    /* select and write the kept values in one pass into vals (capacity m; stores past  \
       it go to a scratch, and the caller falls back to compress if the count exceeds m) */ \
    static Py_ssize_t select_compress_##T(const T *keys, Py_ssize_t b_n, Py_ssize_t n,   \
                                          T absmask, const int64_t *thr,                 \
                                          const uint8_t *valid, Py_ssize_t rows,         \
                                          uint8_t *bits, T *vals, Py_ssize_t m) {        \
        Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, f = n / rows;                         \
        T scratch;                                                                       \
        for (Py_ssize_t b = 0; b < b_n; b++) {                                           \
            const T *x = keys + b * n;                                                   \
            uint8_t *bb = bits + b * nbytes;                                             \
            if ((f & 7) == 0) {                                                          \
                for (Py_ssize_t r = 0; r < rows; r++) {                                  \
                    const int64_t t = valid[b * rows + r] ? thr[b] : INT64_MAX;          \
                    for (Py_ssize_t j = (r * f) >> 3; j < ((r + 1) * f) >> 3; j++) {     \
                        unsigned acc = 0;                                                \
                        for (int bit = 0; bit < 8; bit++) {                              \
                            const T v = x[j * 8 + bit];                                  \
                            const unsigned k = (int64_t)(v & absmask) > t;               \
                            *(pos < m ? vals + pos : &scratch) = v;                      \
                            pos += k;                                                    \
                            acc |= k << bit;                                             \
                        }                                                                \
                        bb[j] = (uint8_t)acc;                                            \
                    }                                                                    \
                }                                                                        \
                continue;                                                                \
            }                                                                            \
            memset(bb, 0, (size_t)nbytes);                                               \
            for (Py_ssize_t r = 0; r < rows; r++) {                                      \
                const int64_t t = valid[b * rows + r] ? thr[b] : INT64_MAX;              \
                for (Py_ssize_t i = r * f; i < (r + 1) * f; i++) {                       \
                    const T v = x[i];                                                    \
                    const unsigned k = (int64_t)(v & absmask) > t;                       \
                    *(pos < m ? vals + pos : &scratch) = v;                              \
                    pos += k;                                                            \
                    bb[i >> 3] |= (uint8_t)(k << (i & 7));                               \
                }                                                                        \
            }                                                                            \
        }                                                                                \
        (void)scratch;                                                                   \
        return pos;                                                                      \
    }                                                                                    \
                                                                                         \
    /* per sample, the rank-th smallest magnitude key among s probed elements (invalid   \
       rows count as -1): a histogram of the keys' top RADIX_BITS bits finds the bucket   \
       holding the rank, and a quickselect among that bucket's keys finishes the job     \
       (branchy quickselect over all s keys is several times slower) */                  \
    static void kth_##T(const T *keys, Py_ssize_t b_n, Py_ssize_t n, T absmask,          \
                        const int64_t *probe, Py_ssize_t s, const uint8_t *valid,        \
                        Py_ssize_t rows, Py_ssize_t rank, int64_t *buf, int64_t *out) {  \
        const Py_ssize_t f = n / rows;                                                   \
        const int shift = (int)(sizeof(T) * 8 - 1) - RADIX_BITS;                         \
        Py_ssize_t hist[1 << RADIX_BITS];                                                \
        for (Py_ssize_t b = 0; b < b_n; b++) {                                           \
            const T *x = keys + b * n;                                                   \
            const int64_t *p = probe + b * s;                                            \
            Py_ssize_t invalid = 0;                                                      \
            memset(hist, 0, sizeof(hist));                                               \
            for (Py_ssize_t i = 0; i < s; i++) {                                         \
                const int64_t idx = p[i];                                                \
                const int64_t key = valid[b * rows + idx / f] ? (int64_t)(x[idx] & absmask) \
                                                              : -1;                      \
                buf[i] = key;                                                            \
                if (key < 0) invalid++;                                                  \
                else hist[shift > 0 ? key >> shift : key << -shift]++;                   \
            }                                                                            \
            if (rank < invalid) {                                                        \
                out[b] = -1;                                                             \
                continue;                                                                \
            }                                                                            \
            Py_ssize_t r = rank - invalid, bucket = 0;                                   \
            while (r >= hist[bucket]) r -= hist[bucket++];                               \
            Py_ssize_t c = 0;                                                            \
            for (Py_ssize_t i = 0; i < s; i++) {                                         \
                const int64_t key = buf[i];                                              \
                if (key >= 0 && (shift > 0 ? key >> shift : key << -shift) == bucket)    \
                    buf[c++] = key;                                                      \
            }                                                                            \
            out[b] = select_kth(buf, c, r);                                              \
        }                                                                                \
    }                                                                                    \
                                                                                         \
    /* out holds m elements; once it is full the (branch-free) stores go to a scratch */  \
    static Py_ssize_t compress_##T(const T *src, Py_ssize_t b_n, Py_ssize_t n,           \
                                   const uint8_t *bits, T *out, Py_ssize_t m) {          \
        Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, full = n >> 3;                        \
        T scratch;                                                                       \
        for (Py_ssize_t b = 0; b < b_n; b++) {                                           \
            const T *x = src + b * n;                                                    \
            const uint8_t *bb = bits + b * nbytes;                                       \
            for (Py_ssize_t j = 0; j < full; j++) {                                      \
                const unsigned byte = bb[j];                                             \
                for (int bit = 0; bit < 8; bit++) {                                      \
                    *(pos < m ? out + pos : &scratch) = x[j * 8 + bit];                  \
                    pos += (byte >> bit) & 1;                                            \
                }                                                                        \
            }                                                                            \
            for (Py_ssize_t i = full * 8; i < n; i++) {                                  \
                *(pos < m ? out + pos : &scratch) = x[i];                                \
                pos += (bb[full] >> (i & 7)) & 1;                                        \
            }                                                                            \
        }                                                                                \
        (void)scratch;                                                                   \
        return pos;                                                                      \
    }                                                                                    \
                                                                                         \
    /* v = vals[min(pos, last)] keeps every read in bounds without a branch */           \
    static void expand_##T(const T *vals, Py_ssize_t m, Py_ssize_t b_n, Py_ssize_t n,    \
                           const uint8_t *bits, T *out) {                                \
        Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, full = n >> 3, last = m - 1;          \
        if (m == 0) {                                                                    \
            memset(out, 0, (size_t)(b_n * n) * sizeof(T));                               \
            return;                                                                      \
        }                                                                                \
        for (Py_ssize_t b = 0; b < b_n; b++) {                                           \
            T *o = out + b * n;                                                          \
            const uint8_t *bb = bits + b * nbytes;                                       \
            for (Py_ssize_t j = 0; j < full; j++) {                                      \
                const unsigned byte = bb[j];                                             \
                for (int bit = 0; bit < 8; bit++) {                                      \
                    const T k = (T)((byte >> bit) & 1);                                  \
                    o[j * 8 + bit] = vals[pos < last ? pos : last] & (T)-k;              \
                    pos += k;                                                            \
                }                                                                        \
            }                                                                            \
            for (Py_ssize_t i = full * 8; i < n; i++) {                                  \
                const T k = (T)((bb[full] >> (i & 7)) & 1);                              \
                o[i] = vals[pos < last ? pos : last] & (T)-k;                            \
                pos += k;                                                                \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
                                                                                         \
    static void overwrite_##T(T *dst, Py_ssize_t b_n, Py_ssize_t n, const uint8_t *bits, \
                              const T *vals, Py_ssize_t m) {                             \
        Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, last = m - 1;                         \
        if (m == 0) return;                                                              \
        for (Py_ssize_t b = 0; b < b_n; b++) {                                           \
            T *o = dst + b * n;                                                          \
            const uint8_t *bb = bits + b * nbytes;                                       \
            for (Py_ssize_t j = 0; j < nbytes; j++) {                                    \
                const unsigned byte = bb[j];                                             \
                if (byte == 0) continue;                                                 \
                const Py_ssize_t stop = n - j * 8 < 8 ? n - j * 8 : 8;                   \
                for (Py_ssize_t bit = 0; bit < stop; bit++) {                            \
                    const T k = (T)((byte >> bit) & 1);                                  \
                    T *p = o + j * 8 + bit;                                              \
                    *p = *p ^ ((*p ^ vals[pos < last ? pos : last]) & (T)-k);            \
                    pos += k;                                                            \
                }                                                                        \
            }                                                                            \
        }                                                                                \
    }

DEFINE_KERNELS(int8_t)
DEFINE_KERNELS(int16_t)
DEFINE_KERNELS(int32_t)
DEFINE_KERNELS(int64_t)

#define DISPATCH(width, call8, call16, call32, call64)                                   \
    switch (width) {                                                                     \
    case 1: call8; break;                                                                \
    case 2: call16; break;                                                               \
    case 4: call32; break;                                                               \
    case 8: call64; break;                                                               \
    default: break;                                                                      \
    }

static int check_width(Py_ssize_t width) {
    if (width == 1 || width == 2 || width == 4 || width == 8) return 0;
    PyErr_SetString(PyExc_ValueError, "element width must be 1, 2, 4 or 8");
    return -1;
}

static int check(Py_buffer *buf, Py_ssize_t need, const char *name) {
    if (buf->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", name, buf->len, need);
        return -1;
    }
    return 0;
}

/* select_compress(keys, b, n, width, absmask, thr, valid, rows, bits, vals) -> kept; the
 * values beyond len(vals) / width are not stored (the caller compresses again) */
static PyObject *py_select_compress(PyObject *self, PyObject *args) {
    Py_buffer keys, thr, valid, bits, vals;
    Py_ssize_t b, n, width, rows, count = 0;
    unsigned long long absmask;
    if (!PyArg_ParseTuple(args, "y*nnnKy*y*nw*w*", &keys, &b, &n, &width, &absmask, &thr,
                          &valid, &rows, &bits, &vals))
        return NULL;
    int bad = check_width(width);
    if (!bad && (rows <= 0 || n % rows != 0)) {
        PyErr_SetString(PyExc_ValueError, "rows must divide n");
        bad = 1;
    }
    if (!bad)
        bad = check(&keys, b * n * width, "keys") || check(&thr, b * 8, "thr") ||
              check(&valid, b * rows, "valid") || check(&bits, b * ((n + 7) >> 3), "bits");
    if (!bad) {
        Py_ssize_t m = vals.len / width;
        Py_BEGIN_ALLOW_THREADS
        DISPATCH(width,
                 count = select_compress_int8_t(keys.buf, b, n, (int8_t)absmask, thr.buf,
                                                valid.buf, rows, bits.buf, vals.buf, m),
                 count = select_compress_int16_t(keys.buf, b, n, (int16_t)absmask, thr.buf,
                                                 valid.buf, rows, bits.buf, vals.buf, m),
                 count = select_compress_int32_t(keys.buf, b, n, (int32_t)absmask, thr.buf,
                                                 valid.buf, rows, bits.buf, vals.buf, m),
                 count = select_compress_int64_t(keys.buf, b, n, (int64_t)absmask, thr.buf,
                                                 valid.buf, rows, bits.buf, vals.buf, m))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&keys); PyBuffer_Release(&thr); PyBuffer_Release(&valid);
    PyBuffer_Release(&bits); PyBuffer_Release(&vals);
    if (bad) return NULL;
    return PyLong_FromSsize_t(count);
}

/* kth(keys, b, n, width, absmask, probe, s, valid, rows, rank, out): per sample the rank-th
 * smallest (0-based) magnitude key of the s probed elements, into out (int64, b) */
static PyObject *py_kth(PyObject *self, PyObject *args) {
    Py_buffer keys, probe, valid, out;
    Py_ssize_t b, n, width, s, rows, rank;
    unsigned long long absmask;
    if (!PyArg_ParseTuple(args, "y*nnnKy*ny*nnw*", &keys, &b, &n, &width, &absmask, &probe, &s,
                          &valid, &rows, &rank, &out))
        return NULL;
    int bad = check_width(width);
    if (!bad && (rows <= 0 || n % rows != 0 || s <= 0 || rank < 0 || rank >= s)) {
        PyErr_SetString(PyExc_ValueError, "need rows | n and 0 <= rank < s");
        bad = 1;
    }
    if (!bad)
        bad = check(&keys, b * n * width, "keys") || check(&probe, b * s * 8, "probe") ||
              check(&valid, b * rows, "valid") || check(&out, b * 8, "out");
    if (!bad) {  /* every probe index must lie in [0, n) */
        const int64_t *p = probe.buf;
        for (Py_ssize_t i = 0; i < b * s; i++)
            if (p[i] < 0 || p[i] >= n) {
                PyErr_SetString(PyExc_ValueError, "probe index out of range");
                bad = 1;
                break;
            }
    }
    int64_t *buf = bad ? NULL : PyMem_RawMalloc((size_t)s * sizeof(int64_t));
    if (!bad && buf == NULL) {
        PyErr_NoMemory();
        bad = 1;
    }
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        DISPATCH(width,
                 kth_int8_t(keys.buf, b, n, (int8_t)absmask, probe.buf, s, valid.buf, rows, rank,
                            buf, out.buf),
                 kth_int16_t(keys.buf, b, n, (int16_t)absmask, probe.buf, s, valid.buf, rows,
                             rank, buf, out.buf),
                 kth_int32_t(keys.buf, b, n, (int32_t)absmask, probe.buf, s, valid.buf, rows,
                             rank, buf, out.buf),
                 kth_int64_t(keys.buf, b, n, (int64_t)absmask, probe.buf, s, valid.buf, rows,
                             rank, buf, out.buf))
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(buf);
    PyBuffer_Release(&keys); PyBuffer_Release(&probe); PyBuffer_Release(&valid);
    PyBuffer_Release(&out);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* popcount(bits) -> number of set bits */
static PyObject *py_popcount(PyObject *self, PyObject *args) {
    Py_buffer bits;
    if (!PyArg_ParseTuple(args, "y*", &bits)) return NULL;
    const uint8_t *p = bits.buf;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < bits.len; i++) {
        unsigned v = p[i];
        v = v - ((v >> 1) & 0x55u);
        v = (v & 0x33u) + ((v >> 2) & 0x33u);
        count += (v + (v >> 4)) & 0x0Fu;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bits);
    return PyLong_FromSsize_t(count);
}

/* compress(src, b, n, width, bits, out) -> number of set bits (out holds len(out) / width) */
static PyObject *py_compress(PyObject *self, PyObject *args) {
    Py_buffer src, bits, out;
    Py_ssize_t b, n, width, pos = 0;
    if (!PyArg_ParseTuple(args, "y*nnny*w*", &src, &b, &n, &width, &bits, &out)) return NULL;
    int bad = check_width(width) || check(&src, b * n * width, "src") ||
              check(&bits, b * ((n + 7) >> 3), "bits");
    if (!bad) {
        Py_ssize_t m = out.len / width;
        Py_BEGIN_ALLOW_THREADS
        DISPATCH(width, pos = compress_int8_t(src.buf, b, n, bits.buf, out.buf, m),
                 pos = compress_int16_t(src.buf, b, n, bits.buf, out.buf, m),
                 pos = compress_int32_t(src.buf, b, n, bits.buf, out.buf, m),
                 pos = compress_int64_t(src.buf, b, n, bits.buf, out.buf, m))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src); PyBuffer_Release(&bits); PyBuffer_Release(&out);
    if (bad) return NULL;
    return PyLong_FromSsize_t(pos);
}

/* expand(vals, m, b, n, width, bits, out) */
static PyObject *py_expand(PyObject *self, PyObject *args) {
    Py_buffer vals, bits, out;
    Py_ssize_t m, b, n, width;
    if (!PyArg_ParseTuple(args, "y*nnnny*w*", &vals, &m, &b, &n, &width, &bits, &out))
        return NULL;
    int bad = check_width(width) || check(&vals, m * width, "vals") || check(&bits, b * ((n + 7) >> 3), "bits") ||
              check(&out, b * n * width, "out");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        DISPATCH(width, expand_int8_t(vals.buf, m, b, n, bits.buf, out.buf),
                 expand_int16_t(vals.buf, m, b, n, bits.buf, out.buf),
                 expand_int32_t(vals.buf, m, b, n, bits.buf, out.buf),
                 expand_int64_t(vals.buf, m, b, n, bits.buf, out.buf))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&vals); PyBuffer_Release(&bits); PyBuffer_Release(&out);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* overwrite(dst, b, n, width, bits, vals, m) */
static PyObject *py_overwrite(PyObject *self, PyObject *args) {
    Py_buffer dst, bits, vals;
    Py_ssize_t b, n, width, m;
    if (!PyArg_ParseTuple(args, "w*nnny*y*n", &dst, &b, &n, &width, &bits, &vals, &m))
        return NULL;
    int bad = check_width(width) || check(&dst, b * n * width, "dst") || check(&bits, b * ((n + 7) >> 3), "bits") ||
              check(&vals, m * width, "vals");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        DISPATCH(width, overwrite_int8_t(dst.buf, b, n, bits.buf, vals.buf, m),
                 overwrite_int16_t(dst.buf, b, n, bits.buf, vals.buf, m),
                 overwrite_int32_t(dst.buf, b, n, bits.buf, vals.buf, m),
                 overwrite_int64_t(dst.buf, b, n, bits.buf, vals.buf, m))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&dst); PyBuffer_Release(&bits); PyBuffer_Release(&vals);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"select_compress", py_select_compress, METH_VARARGS,
     "select_compress(keys, b, n, width, absmask, thr, valid, rows, bits, vals) -> kept"},
    {"kth", py_kth, METH_VARARGS,
     "kth(keys, b, n, width, absmask, probe, s, valid, rows, rank, out)"},
    {"popcount", py_popcount, METH_VARARGS, "popcount(bits) -> number of set bits"},
    {"compress", py_compress, METH_VARARGS,
     "compress(src, b, n, width, bits, out) -> number of set bits"},
    {"expand", py_expand, METH_VARARGS, "expand(vals, m, b, n, width, bits, out)"},
    {"overwrite", py_overwrite, METH_VARARGS, "overwrite(dst, b, n, width, bits, vals, m)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitpack",
                                    "Element kernels for backrazor packs.", -1, methods};

PyMODINIT_FUNC PyInit__bitpack(void) { return PyModule_Create(&module); }
