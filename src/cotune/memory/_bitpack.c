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
    }                                                                                    \
                                                                                         \
    /* bits of (0 < key <= hi) over a flat array */                                      \
    static void positive_##T(const T *keys, Py_ssize_t n, T hi, uint8_t *bits) {         \
        memset(bits, 0, (size_t)((n + 7) >> 3));                                         \
        for (Py_ssize_t i = 0; i < n; i++)                                               \
            bits[i >> 3] |= (uint8_t)((unsigned)(keys[i] > 0 && keys[i] <= hi) << (i & 7)); \
    }                                                                                    \
                                                                                         \
    /* src where the bit is set, else 0, over a flat array */                            \
    static void masked_##T(const T *src, Py_ssize_t n, const uint8_t *bits, T *out) {    \
        for (Py_ssize_t i = 0; i < n; i++)                                               \
            out[i] = src[i] & (T) - (T)((bits[i >> 3] >> (i & 7)) & 1);                  \
    }

DEFINE_KERNELS(int8_t)
DEFINE_KERNELS(int16_t)
DEFINE_KERNELS(int32_t)
DEFINE_KERNELS(int64_t)

/* ------------------------------------------------------------------------------------
 * AVX2 versions of the 4-byte (float32) kernels, chosen at run time when the CPU has AVX2
 * (`set_simd(False)` forces the portable loops above, for tests). Eight elements per mask
 * byte: a compare gives the byte (movemask), a 256-entry table turns it into the lane
 * permutation that packs the kept lanes to the front (compress) or spreads consecutive
 * values onto the set lanes (expand), and the write position advances by its popcount.
 * Results are bit-identical to the portable loops; stores and loads that would cross
 * the end of a buffer go through a small stack buffer instead.
 * --------------------------------------------------------------------------------- */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

static uint8_t LUT_PACK[256][8];   /* lane indices of the set bits, in order */
static uint8_t LUT_SPREAD[256][8]; /* per lane: the rank of its bit among the set bits */
static int use_simd = 0;

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

static void init_simd(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int i = 0; i < 8; i++) {
            LUT_SPREAD[m][i] = (uint8_t)c;
            LUT_PACK[m][i] = 0;
            if ((m >> i) & 1) LUT_PACK[m][c++] = (uint8_t)i;
        }
    }
    use_simd = cpu_has_avx2();
}

#define AVX2 __attribute__((target("avx2,popcnt")))

AVX2 static inline __m256i lane_mask(unsigned byte) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)byte), bit), bit);
}

AVX2 static inline __m256i lut(const uint8_t table[8]) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)table));
}

/* store the first `cnt` lanes of v at out[pos..], never past out[m - 1] */
AVX2 static inline void store_kept(int32_t *out, Py_ssize_t pos, Py_ssize_t m, __m256i v,
                                   int cnt) {
    if (pos + 8 <= m) {
        _mm256_storeu_si256((__m256i *)(out + pos), v);
        return;
    }
    int32_t tmp[8];
    _mm256_storeu_si256((__m256i *)tmp, v);
    for (int i = 0; i < cnt && pos + i < m; i++) out[pos + i] = tmp[i];
}

/* eight values from vals[pos..], zero past vals[m - 1] */
AVX2 static inline __m256i load_kept(const int32_t *vals, Py_ssize_t pos, Py_ssize_t m) {
    if (pos + 8 <= m) return _mm256_loadu_si256((const __m256i *)(vals + pos));
    int32_t tmp[8] = {0};
    for (int i = 0; pos + i < m && i < 8; i++) tmp[i] = vals[pos + i];
    return _mm256_loadu_si256((const __m256i *)tmp);
}

/* the byte-aligned case (F % 8 == 0) of select_compress_int32_t */
AVX2 static Py_ssize_t select_compress32_avx2(const int32_t *keys, Py_ssize_t b_n,
                                              Py_ssize_t n, int32_t absmask,
                                              const int64_t *thr, const uint8_t *valid,
                                              Py_ssize_t rows, uint8_t *bits, int32_t *vals,
                                              Py_ssize_t m) {
    Py_ssize_t pos = 0, nbytes = n >> 3, f = n / rows;
    const __m256i am = _mm256_set1_epi32(absmask);
    for (Py_ssize_t b = 0; b < b_n; b++) {
        const int32_t *x = keys + b * n;
        uint8_t *bb = bits + b * nbytes;
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t t = valid[b * rows + r] ? thr[b] : INT64_MAX;
            t = t > INT32_MAX ? INT32_MAX : (t < INT32_MIN ? INT32_MIN : t);
            const __m256i tv = _mm256_set1_epi32((int32_t)t);
            for (Py_ssize_t j = (r * f) >> 3; j < ((r + 1) * f) >> 3; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(x + j * 8));
                const __m256i k = _mm256_cmpgt_epi32(_mm256_and_si256(v, am), tv);
                const unsigned byte = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(k));
                const int cnt = __builtin_popcount(byte);
                store_kept(vals, pos, m, _mm256_permutevar8x32_epi32(v, lut(LUT_PACK[byte])),
                           cnt);
                pos += cnt;
                bb[j] = (uint8_t)byte;
            }
        }
    }
    return pos;
}

AVX2 static Py_ssize_t compress32_avx2(const int32_t *src, Py_ssize_t b_n, Py_ssize_t n,
                                       const uint8_t *bits, int32_t *out, Py_ssize_t m) {
    Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, full = n >> 3;
    for (Py_ssize_t b = 0; b < b_n; b++) {
        const int32_t *x = src + b * n;
        const uint8_t *bb = bits + b * nbytes;
        for (Py_ssize_t j = 0; j < full; j++) {
            const unsigned byte = bb[j];
            const int cnt = __builtin_popcount(byte);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(x + j * 8));
            store_kept(out, pos, m, _mm256_permutevar8x32_epi32(v, lut(LUT_PACK[byte])), cnt);
            pos += cnt;
        }
        for (Py_ssize_t i = full * 8; i < n; i++) {
            if ((bb[full] >> (i & 7)) & 1) {
                if (pos < m) out[pos] = x[i];
                pos++;
            }
        }
    }
    return pos;
}

AVX2 static void expand32_avx2(const int32_t *vals, Py_ssize_t m, Py_ssize_t b_n,
                               Py_ssize_t n, const uint8_t *bits, int32_t *out) {
    Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, full = n >> 3;
    if (m == 0) {
        memset(out, 0, (size_t)(b_n * n) * sizeof(int32_t));
        return;
    }
    for (Py_ssize_t b = 0; b < b_n; b++) {
        int32_t *o = out + b * n;
        const uint8_t *bb = bits + b * nbytes;
        for (Py_ssize_t j = 0; j < full; j++) {
            const unsigned byte = bb[j];
            const __m256i v = _mm256_permutevar8x32_epi32(load_kept(vals, pos, m),
                                                          lut(LUT_SPREAD[byte]));
            _mm256_storeu_si256((__m256i *)(o + j * 8), _mm256_and_si256(v, lane_mask(byte)));
            pos += __builtin_popcount(byte);
        }
        for (Py_ssize_t i = full * 8; i < n; i++) {
            const int k = (bb[full] >> (i & 7)) & 1;
            o[i] = k && pos < m ? vals[pos] : 0;
            pos += k;
        }
    }
}

AVX2 static void overwrite32_avx2(int32_t *dst, Py_ssize_t b_n, Py_ssize_t n,
                                  const uint8_t *bits, const int32_t *vals, Py_ssize_t m) {
    Py_ssize_t pos = 0, nbytes = (n + 7) >> 3, full = n >> 3;
    if (m == 0) return;
    for (Py_ssize_t b = 0; b < b_n; b++) {
        int32_t *o = dst + b * n;
        const uint8_t *bb = bits + b * nbytes;
        for (Py_ssize_t j = 0; j < full; j++) {
            const unsigned byte = bb[j];
            if (byte == 0) continue;
            const __m256i v = _mm256_permutevar8x32_epi32(load_kept(vals, pos, m),
                                                          lut(LUT_SPREAD[byte]));
            const __m256i d = _mm256_loadu_si256((const __m256i *)(o + j * 8));
            _mm256_storeu_si256((__m256i *)(o + j * 8),
                                _mm256_blendv_epi8(d, v, lane_mask(byte)));
            pos += __builtin_popcount(byte);
        }
        for (Py_ssize_t i = full * 8; i < n; i++) {
            const int k = (bb[full] >> (i & 7)) & 1;
            if (k && pos < m) o[i] = vals[pos];
            pos += k;
        }
    }
}

/* bits of (0 < key <= hi) over a flat array (x > 0 for floats: hi is +inf's pattern) */
AVX2 static void positive32_avx2(const int32_t *keys, Py_ssize_t n, int32_t hi, uint8_t *bits) {
    const __m256i zero = _mm256_setzero_si256(), h = _mm256_set1_epi32(hi);
    Py_ssize_t full = n >> 3;
    for (Py_ssize_t j = 0; j < full; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(keys + j * 8));
        const __m256i k = _mm256_andnot_si256(_mm256_cmpgt_epi32(v, h), _mm256_cmpgt_epi32(v, zero));
        bits[j] = (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(k));
    }
    if (full * 8 < n) {
        unsigned acc = 0;
        for (Py_ssize_t i = full * 8; i < n; i++) acc |= (unsigned)(keys[i] > 0 && keys[i] <= hi) << (i & 7);
        bits[full] = (uint8_t)acc;
    }
}

/* src where the bit is set, else 0, over a flat array */
AVX2 static void masked32_avx2(const int32_t *src, Py_ssize_t n, const uint8_t *bits, int32_t *out) {
    Py_ssize_t full = n >> 3;
    for (Py_ssize_t j = 0; j < full; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(src + j * 8));
        _mm256_storeu_si256((__m256i *)(out + j * 8), _mm256_and_si256(v, lane_mask(bits[j])));
    }
    for (Py_ssize_t i = full * 8; i < n; i++) out[i] = ((bits[full] >> (i & 7)) & 1) ? src[i] : 0;
}
#else
static int use_simd = 0;
static int cpu_has_avx2(void) { return 0; }
static void init_simd(void) {}
#endif

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
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4 && ((n / rows) & 7) == 0)
            count = select_compress32_avx2(keys.buf, b, n, (int32_t)absmask, thr.buf, valid.buf,
                                           rows, bits.buf, vals.buf, m);
        else
#endif
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
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4)
            pos = compress32_avx2(src.buf, b, n, bits.buf, out.buf, m);
        else
#endif
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
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4)
            expand32_avx2(vals.buf, m, b, n, bits.buf, out.buf);
        else
#endif
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
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4)
            overwrite32_avx2(dst.buf, b, n, bits.buf, vals.buf, m);
        else
#endif
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

/* positive(keys, n, width, hi, bits): bit i = 0 < keys[i] <= hi (x > 0 for a float x,
 * hi = the pattern of +inf), bits holding ceil(n / 8) bytes */
static PyObject *py_positive(PyObject *self, PyObject *args) {
    Py_buffer keys, bits;
    Py_ssize_t n, width;
    long long hi;
    if (!PyArg_ParseTuple(args, "y*nnLw*", &keys, &n, &width, &hi, &bits)) return NULL;
    int bad = check_width(width) || check(&keys, n * width, "keys") ||
              check(&bits, (n + 7) >> 3, "bits");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4)
            positive32_avx2(keys.buf, n, (int32_t)hi, bits.buf);
        else
#endif
        DISPATCH(width, positive_int8_t(keys.buf, n, (int8_t)hi, bits.buf),
                 positive_int16_t(keys.buf, n, (int16_t)hi, bits.buf),
                 positive_int32_t(keys.buf, n, (int32_t)hi, bits.buf),
                 positive_int64_t(keys.buf, n, (int64_t)hi, bits.buf))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&keys); PyBuffer_Release(&bits);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* masked(src, n, width, bits, out): out[i] = src[i] where bit i is set, else 0 */
static PyObject *py_masked(PyObject *self, PyObject *args) {
    Py_buffer src, bits, out;
    Py_ssize_t n, width;
    if (!PyArg_ParseTuple(args, "y*nny*w*", &src, &n, &width, &bits, &out)) return NULL;
    int bad = check_width(width) || check(&src, n * width, "src") ||
              check(&bits, (n + 7) >> 3, "bits") || check(&out, n * width, "out");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
        if (use_simd && width == 4)
            masked32_avx2(src.buf, n, bits.buf, out.buf);
        else
#endif
        DISPATCH(width, masked_int8_t(src.buf, n, bits.buf, out.buf),
                 masked_int16_t(src.buf, n, bits.buf, out.buf),
                 masked_int32_t(src.buf, n, bits.buf, out.buf),
                 masked_int64_t(src.buf, n, bits.buf, out.buf))
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src); PyBuffer_Release(&bits); PyBuffer_Release(&out);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

/* set_simd(on) -> whether the AVX2 loops are now used (only if the CPU has AVX2) */
static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    use_simd = on && cpu_has_avx2();
    return PyBool_FromLong(use_simd);
}

static PyMethodDef methods[] = {
    {"positive", py_positive, METH_VARARGS, "positive(keys, n, width, hi, bits)"},
    {"masked", py_masked, METH_VARARGS, "masked(src, n, width, bits, out)"},
    {"set_simd", py_set_simd, METH_VARARGS, "set_simd(on) -> whether AVX2 loops are used"},
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

PyMODINIT_FUNC PyInit__bitpack(void) {
    init_simd();
    return PyModule_Create(&module);
}
