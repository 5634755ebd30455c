/* Per-segment (per-document) attention on the CPU, forward and backward, for the "native" backend; at the end, the
 * allowed-pair counts and the document segments of planning.
 *
 * Built on first use by attnmask/backends/_clib.py (cc -O3 -march=native -fopenmp -shared) and called through
 * ctypes; no Python or torch headers. One segment is (row, q_start, q_len, k_start, k_len, offset), as
 * attnmask.backends._common.segments_from_varlen gives: inside it, query i may see key j when 0 <= j < k_len and, if
 * causal, j <= i + offset and, with a window w > 0, i + offset - j < w. Rows with no allowed key are written as 0 and get
 * lse = -inf, which the backward skips: their gradient is exactly 0. Query rows in no segment are not touched.
 *
 * Layouts: q, k, v, out, dout are (B, H, L, D) arrays addressed through element strides for B, H and L; the last
 * dimension must be contiguous. lse is (B, H, Q) contiguous float32 / float64. A forward may take q, k, v in bfloat16
 * (dtype_bits 16; a row form's item widened to float32 once, else each element as it is loaded) with out and lse in
 * float32, or out in bfloat16 (dtype_bits 19, rounded to nearest even); on AMX tiles (dtype_bits 17, at the end)
 * forward and backward take them so, the backward with dout in bfloat16 and float32 gradients. The backward of
 * dtype_bits 16 takes q, k, v and dout in bfloat16 and out in float32 and writes bfloat16 gradients, each item's
 * rows whole (backward_item_bf16). The gradients dq, dk, dv are contiguous (B, H, L, D) and zero on entry, or zeroed
 * by the items that own them (dims[5]: zero_grads).
 * Grouped-query attention: query head h reads key/value head h / (H / Hkv).
 *
 * Work is split into items (segment, head) in the forward and (segment, key/value head) in the backward, so that no
 * two items write the same output row: the backward's dk / dv rows belong to one segment only when the segments' key
 * ranges are disjoint, which the caller checks (else it passes threads = 1). Items are handed out to `threads` threads
 * through an atomic counter, 8 at a time (1 when there are fewer than 64 per thread): an OpenMP team when built with
 * -fopenmp (GCC's runtime is then the one torch loaded, one per process, whose threads are already awake after torch's
 * last parallel region), else pthreads started for the call. Memory: two scratch vectors of max(k_len) scores and one
 * of Dv + D per thread; in the blocked form (below) also the item's keys transposed, in the backward its values too
 * ((D [+ Dv]) x the item's keys, rounded up to LANES plus LANES, elements), and a panel's tile of scores and rows:
 * forward PANEL_ROWS x (9 / 8 TILE_KEYS + 3 LANES + D + Dv + LANES + 1) plus 16 int64 per four rows, backward
 * 2 PANEL_ROWS x (TILE_KEYS + 2 LANES) + PANEL_ROWS x (D + Dv + 1) elements per thread, grown to the largest item (a
 * causal segment of 8,192 keys at D = Dv = 64 in float32: 4.2 MiB in the backward, 2.2 MiB in the forward).
 *
 * Score modifiers, in this order on each score s = scale * q.k: softcap c > 0 (0: none): s -> c tanh(s / c); ALiBi
 * slopes (NULL: none), one per query head: s -> s - slope_h (i + offset - j), the query's minus the key's position;
 * sinks (NULL: none), one logit per query head added to the softmax denominator only (a key whose value is 0): lse then
 * includes it, so the backward's probabilities exp(s - lse) are right as they are, and the sinks' own gradient,
 * -sum_i exp(sink_h - lse_i) (dout_i . out_i), is left to the caller (one vectorised pass over the rows). Rows with no
 * allowed key stay exactly 0 with lse = -inf, sinks or not.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *q, *k, *v, *dout;
    void *res, *dq, *dk, *dv;          /* res: the forward output */
    void *lse;
    const int64_t *st;                 /* (b, h, l) strides of q, k, v, out, dout; then K */
    const int64_t *segs;
    int64_t nseg, H, Hkv, Q, D, Dv, kmax, window;
    int causal;
    int64_t block_keys; /* segments of at least this many keys take the blocked form */
    int64_t tile_keys, panel_rows; /* the blocked form's tiles of keys and panels of rows (a multiple of 4) */
    double scale, softcap;
    const void *sinks, *slopes;        /* (H,) each in the kernel's dtype, or NULL */
    int64_t n_items, next, chunk;      /* next: shared counter; chunk: items per pull */
    int backward;
    int zero_grads; /* the backward zeroes each item's gradient rows before adding into them (dims[5] = 1) */
    int out_bf16; /* the bfloat16 forward writes res in bfloat16 (dtype_bits 18 and 19), else float32 */
} job_t;

/* Keys [lo, hi) of query i. The caller keeps |off| <= 2^40 and window <= 2^60, so a = i + off never overflows, and
 * no expression below leaves the int64 range (a + 1 only when a < kl, a - window + 1 only when a >= window). */
static void key_range(const job_t *J, int64_t i, int64_t off, int64_t kl, int64_t *lo, int64_t *hi) {
    int64_t a = i + off; /* the query's position minus the segment's first key */
    int64_t h_ = !J->causal || a >= kl ? kl : a + 1;
    *lo = J->window > 0 && a >= J->window ? a - J->window + 1 : 0;
    *hi = h_ < 0 ? 0 : h_;
}

/* exp(x) for float32 in a form the compiler vectorises (libm's expf is one scalar call per value; this made documents
 * of 128-512 tokens 1.4x faster, tiny ones unchanged). Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, a
 * degree-6 polynomial for exp(r) (relative error ~2e-7, about 1 ulp), and 2^n assembled in the exponent bits. n is
 * rounded by adding 1.5 * 2^23, after which t's low bits hold n itself: the exponent is built from t's bits, with no
 * conversion to an integer (none of a NaN either) and no blend per lane for the cases below, ~15 vector instructions
 * where the clamps and blends of the form before took ~35 (rows of 8K with a window of 512 ~5% faster; RESULTS.md,
 * issue 15, "native's softmax step and exponential"). Inputs below -87 give 0 (-inf too) through the select at the
 * end alone: whatever the lanes below -87 compute before it is dropped, so they need no clamp (a quarter of the
 * vectorised loop's time; the values are the same bit for bit); the softmax only passes x <= 0 (clamped at 88 all the
 * same, so 2^n stays a normal float); a NaN (a NaN score: a NaN in a key the query may see) comes back as NaN, carried
 * through the polynomial. */
#pragma omp declare simd notinbranch
static inline float exp_f32(float x) {
    const float c = x > 88.0f ? 88.0f : x; /* a NaN stays NaN; below -87 the select at the end gives 0 */
    const float shift = 12582912.0f; /* 1.5 * 2^23: t = shift + n, n = round(c / ln2) */
    float t = c * 1.44269504088896341f + shift;
    float n = t - shift;
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        float f;
        uint32_t u;
    } bits = {.f = t}, scale;
    scale.u = (bits.u + 127u) << 23; /* t's bits are 0x4B400000 + n: the shift drops the upper ones, (n + 127) << 23 */
    return x < -87.0f ? 0.0f : p * scale.f;
}

/* tanh(x) for float32 through exp_f32, so that the softcap loop vectorises: (e^2x - 1) / (e^2x + 1) with x clamped to
 * [-9, 9], where tanh is +-1 to float32 precision (absolute error ~1e-7, relative ~1e-7 away from 0). */
#pragma omp declare simd notinbranch
static inline float tanh_f32(float x) {
    float y = x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x);
    float e = exp_f32(2.0f * y);
    return (e - 1.0f) / (e + 1.0f);
}

/* bfloat16 to float32: the 16 bits are the float's upper half (exact). */
#pragma omp declare simd notinbranch
static inline float bf16_f32(uint16_t x) {
    union {
        uint32_t u;
        float f;
    } c = {.u = (uint32_t)x << 16};
    return c.f;
}
#define SAME(x) (x)

/* n float32 values to bfloat16, rounded to nearest even, a NaN as 0x7fc0: as torch converts one (c10::BFloat16). */
static inline void put_bf16(uint16_t *restrict dst, const float *restrict x, int64_t n) {
    _Pragma("omp simd") for (int64_t d = 0; d < n; d++) {
        uint32_t u;
        __builtin_memcpy(&u, x + d, sizeof u);
        const uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        dst[d] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
    }
}
/* never called: a float64 forward writes float64 (the macros below call it only where the output is bfloat16) */
static inline void put_bf16_f64(uint16_t *restrict dst, const double *restrict x, int64_t n) {
    (void)dst, (void)x, (void)n;
}
#define PUT_BF16(dst, x, n) _Generic((x), float *: put_bf16, double *: put_bf16_f64)(dst, x, n)

/* The blocked form, on segments of at least dims[8] keys (the caller sets it from a few queries a call up, and never
 * for a decoding step, whose keys are each read by a few queries, where copying them would cost more than it saves): an
 * item's keys (and in the backward its values) are transposed once into blocks of LANES keys and four query rows at a
 * time take their scores from them, four vectors of keys per step (sixteen sums in flight), accumulated over d: no
 * horizontal sum per score, and each key element loaded once for four queries. The rows go in panels of PANEL_ROWS
 * (dims[10], a multiple of four) and a panel walks its keys in tiles of TILE_KEYS (dims[9]; the caller passes larger
 * ones for the forward), so that a tile's keys and values (and in the backward their dk and dv rows) stay in cache
 * while the panel's rows use them: the forward keeps an online softmax per row across its tiles (running max, sum and
 * weighted values, rescaled when the max grows), the backward recomputes P from the saved lse. Sums over the four rows'
 * common keys keep a slice of four rows' outputs in registers (pv4): the forward's weighted values and the backward's
 * dq, and the backward's dk and dv of four keys over the rows all four see. A block's rows are the item's rows 0-3,
 * 4-7, ...; the backward's tiles start at multiples of TILE_KEYS of the segment's keys, the forward's at the block's
 * first key, a last piece under TILE_KEYS / 8 keys joining the tile before it (a window's block then walks one tile,
 * not two: RESULTS.md, issue 15, "Tiles from a block's first key"). The caller cuts a segment for the threads at
 * multiples of four rows, so a row has the same partners and tiles, and the same sums, whatever the cut. */
#define LANES(T) ((int64_t)(64 / sizeof(T)))
/* The blocked forward takes its scores and its value sums SUB_KEYS keys at a time for every four rows of a panel, so
 * that those keys (32 KiB at D = 64 in float32 for the scores, the values likewise) stay in L1 while the panel's rows
 * use them; each four rows' scores of a tile wait in their own rows of the scratch until their softmax step. Rows of
 * 8,192, two threads: windows of 512-4,096, chunks, causal rows and long documents 3-7% faster, documents of 40-64
 * keys 2% slower; 64 keys at a time read 2-3% slower than 128, 256 2-8% (RESULTS.md, issue 15, "Scores and values a
 * sub-tile at a time"). A multiple of four LANES of float and of double. */
#define SUB_KEYS 128
/* The row form's backward on segments of at most SMALL_KEYS keys (documents of 8-32 tokens) keeps the P and dS of
 * SMALL_ROWS rows at a time and sums each key's dk and dv over them key-major (keyed_sums): 2 x SMALL_ROWS x SMALL_KEYS
 * elements of scratch a thread. */
#define SMALL_KEYS 64
#define SMALL_ROWS 32
/* The row form's backward asks for the q, out and dO rows PREFETCH_ROWS rows ahead: each row's first reads of them
 * waited on memory (documents of 8-32 tokens, rows of 8,192, forward + backward: 0.92-0.95x at one thread, 0.97-0.99x
 * at two; 2 rows ahead 0.94-0.95x / 1.00x; the same in the forward's row form was 0.98-1.03x, so it has none). */
#define PREFETCH_ROWS 4
typedef float vec_float __attribute__((vector_size(64)));
typedef double vec_double __attribute__((vector_size(64)));
#define VEC(T) vec_##T

/* One vector of LANES elements from x (unaligned), widened to float32 for bfloat16. */
static inline vec_float ldv_f32(const float *x) {
    vec_float r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
}
static inline vec_double ldv_f64(const double *x) {
    vec_double r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
}
typedef uint16_t vec_half __attribute__((vector_size(32)));
typedef uint32_t vec_word __attribute__((vector_size(64)));
#if defined(__AVX512F__)
#include <immintrin.h>
/* one 256-bit load widened to 512 bits in one instruction: the generic form below compiles, under GCC's preference
 * for 256-bit vectors, to two half-width widenings and a shuffle (bfloat16 documents of 8-32 tokens read as stored:
 * a fifth of the row form's time) */
static inline vec_float ldv_bf16(const uint16_t *x) {
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16);
    vec_float r;
    __builtin_memcpy(&r, &w, sizeof r);
    return r;
}
#else
static inline vec_float ldv_bf16(const uint16_t *x) {
    vec_half h;
    vec_float r;
    __builtin_memcpy(&h, x, sizeof h);
    vec_word w = __builtin_convertvector(h, vec_word) << 16;
    __builtin_memcpy(&r, &w, sizeof r);
    return r;
}
#endif

/* dst[d * 16 + c] = r[c][d] for 16 rows r of 16 floats: a 16 x 16 transpose in four rounds of two-vector shuffles
 * (interleave pairs of rows, then pairs of pairs, then 128-bit quarters twice), where element-wise copies took ~150
 * cycles a key, a twentieth of a window's forward and more once the threads cut a segment into blocks that each copy
 * their keys (RESULTS.md, issue 15, "native's key copies, tiles and pulls"). Compilers without __builtin_shufflevector
 * copy element by element. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define TRANSPOSE16 1
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void transpose16(float *dst, const vec_float *r) {
    vec_float t[16], u[16];
    for (int i = 0; i < 16; i += 2) { /* t[i] lane m: r[i][4m], r[i+1][4m], r[i][4m+1], r[i+1][4m+1]; t[i+1]: +2 */
        t[i] = SHUF(r[i], r[i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
        t[i + 1] = SHUF(r[i], r[i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
    }
    for (int g = 0; g < 16; g += 4) { /* u[g + c] lane m: column 4m + c of rows g .. g + 3 */
        u[g] = SHUF(t[g], t[g + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
        u[g + 1] = SHUF(t[g], t[g + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        u[g + 2] = SHUF(t[g + 1], t[g + 3], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
        u[g + 3] = SHUF(t[g + 1], t[g + 3], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
    for (int c = 0; c < 4; c++) { /* column 4m + c: lane m of u[c], u[4 + c], u[8 + c], u[12 + c] */
        const vec_float xl = SHUF(u[c], u[4 + c], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        const vec_float xh = SHUF(u[c], u[4 + c], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        const vec_float yl = SHUF(u[8 + c], u[12 + c], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        const vec_float yh = SHUF(u[8 + c], u[12 + c], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        const vec_float out[4] = {SHUF(xl, yl, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                                  SHUF(xl, yl, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31),
                                  SHUF(xh, yh, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                                  SHUF(xh, yh, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)};
        for (int m = 0; m < 4; m++) __builtin_memcpy(dst + (4 * m + c) * 16, &out[m], sizeof out[m]);
    }
}
#undef SHUF
#else
#define TRANSPOSE16 0
static inline void transpose16(float *dst, const vec_float *r) {
    for (int c = 0; c < 16; c++)
        for (int d = 0; d < 16; d++) dst[d * 16 + c] = r[c][d];
}
#endif

/* The sums of the lanes of each of four vectors, into out[0 .. 4): one tree of shuffles and adds for the four (pairs
 * of vectors folded into one, then halves of lanes into each other), where a horizontal sum per vector takes about
 * four times the instructions (the row form sums four dot products at a time: dot4). */
#if TRANSPOSE16
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline vec_float sum4v_float(vec_float v0, vec_float v1, vec_float v2, vec_float v3) {
    const vec_float a = SHUF(v0, v1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                        SHUF(v0, v1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31); /* v0 | v1 */
    const vec_float b = SHUF(v2, v3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                        SHUF(v2, v3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31); /* v2 | v3 */
    const vec_float c = SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                        SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31); /* 4 lanes each */
    const vec_float e = SHUF(c, c, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                        SHUF(c, c, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15); /* 2 lanes each */
    return SHUF(e, e, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
           SHUF(e, e, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
}
static inline void sum4_float(vec_float v0, vec_float v1, vec_float v2, vec_float v3, float *out) {
    const vec_float f = sum4v_float(v0, v1, v2, v3);
    out[0] = f[0], out[1] = f[1], out[2] = f[2], out[3] = f[3];
}
typedef int32_t vec_int __attribute__((vector_size(64)));
/* The scores of query q (D elements, a multiple of 16) against the n <= 16 keys from k (ld apart), four at a time as
 * dot4 takes them (a last group of fewer repeats its last key), gathered in the lanes of one vector, the lanes past n
 * -inf, and stored to s in one store: the softmax's whole-vector loads of s then read that one store, where scores
 * stored four at a time and a fill of -inf past n made each wait for the stores to drain (store forwarding fails
 * on a load wider than the store). */
#define DEFINE_SCORES16(SUF, KV)                                                                                       \
    static inline void scores16_##SUF(const float *q, const KV *k, int64_t ld, int64_t D, int64_t n, float *s) {       \
        vec_float S = {0};                                                                                             \
        for (int64_t g = 0; g < n; g += 4) {                                                                           \
            const KV *b0 = k + g * ld, *b1 = k + (g + 1 < n ? g + 1 : n - 1) * ld;                                     \
            const KV *b2 = k + (g + 2 < n ? g + 2 : n - 1) * ld, *b3 = k + (g + 3 < n ? g + 3 : n - 1) * ld;           \
            vec_float v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};                                                          \
            for (int64_t d = 0; d < D; d += 16) {                                                                      \
                vec_float x;                                                                                           \
                __builtin_memcpy(&x, q + d, sizeof x);                                                                 \
                v0 += x * ldv_##SUF(b0 + d), v1 += x * ldv_##SUF(b1 + d);                                              \
                v2 += x * ldv_##SUF(b2 + d), v3 += x * ldv_##SUF(b3 + d);                                              \
            }                                                                                                          \
            const vec_float f = sum4v_float(v0, v1, v2, v3);                                                           \
            if (g == 0)                                                                                                \
                S = SHUF(S, f, 16, 17, 18, 19, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);                              \
            else if (g == 4)                                                                                           \
                S = SHUF(S, f, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 12, 13, 14, 15);                              \
            else if (g == 8)                                                                                           \
                S = SHUF(S, f, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15);                                \
            else                                                                                                       \
                S = SHUF(S, f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19);                                  \
        }                                                                                                              \
        const vec_int lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};                                   \
        const vec_int keep = lane < (int32_t)n;                                                                        \
        const vec_float none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,           \
                                -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,           \
                                -INFINITY, -INFINITY};                                                                 \
        vec_int bits, inf;                                                                                             \
        __builtin_memcpy(&bits, &S, sizeof bits), __builtin_memcpy(&inf, &none, sizeof inf);                           \
        bits = (bits & keep) | (inf & ~keep);                                                                          \
        __builtin_memcpy(s, &bits, sizeof bits);                                                                       \
    }
DEFINE_SCORES16(f32, float)
DEFINE_SCORES16(bf16, uint16_t)
#define SCORES16 1
static inline void sum4_double(vec_double v0, vec_double v1, vec_double v2, vec_double v3, double *out) {
    const vec_double a = SHUF(v0, v1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(v0, v1, 4, 5, 6, 7, 12, 13, 14, 15);
    const vec_double b = SHUF(v2, v3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(v2, v3, 4, 5, 6, 7, 12, 13, 14, 15);
    const vec_double c = SHUF(a, b, 0, 1, 4, 5, 8, 9, 12, 13) + SHUF(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
    const vec_double f = SHUF(c, c, 0, 2, 4, 6, 0, 2, 4, 6) + SHUF(c, c, 1, 3, 5, 7, 1, 3, 5, 7);
    out[0] = f[0], out[1] = f[1], out[2] = f[2], out[3] = f[3];
}
/* The sum of one vector's lanes, halves folded into each other (a reduction in lane order is a chain of one scalar
 * add a lane: ~64 cycles at 16 lanes, a fifth of a row of a tiny document). */
static inline float sum1_float(vec_float v) {
    v += SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUF(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
}
static inline double sum1_double(vec_double v) {
    v += SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUF(v, v, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
}
#undef SHUF
#else
static inline float sum1_float(vec_float v) {
    float out = 0;
    for (int c = 0; c < 16; c++) out += v[c];
    return out;
}
static inline double sum1_double(vec_double v) {
    double out = 0;
    for (int c = 0; c < 8; c++) out += v[c];
    return out;
}
#define SCORES16 0
static inline void scores16_f32(const float *q, const float *k, int64_t ld, int64_t D, int64_t n, float *s) {
    (void)q, (void)k, (void)ld, (void)D, (void)n, (void)s;
}
static inline void scores16_bf16(const float *q, const uint16_t *k, int64_t ld, int64_t D, int64_t n, float *s) {
    (void)q, (void)k, (void)ld, (void)D, (void)n, (void)s;
}
static inline void sum4_float(vec_float v0, vec_float v1, vec_float v2, vec_float v3, float *out) {
    out[0] = out[1] = out[2] = out[3] = 0;
    for (int c = 0; c < 16; c++) out[0] += v0[c], out[1] += v1[c], out[2] += v2[c], out[3] += v3[c];
}
static inline void sum4_double(vec_double v0, vec_double v1, vec_double v2, vec_double v3, double *out) {
    out[0] = out[1] = out[2] = out[3] = 0;
    for (int c = 0; c < 8; c++) out[0] += v0[c], out[1] += v1[c], out[2] += v2[c], out[3] += v3[c];
}
#endif

/* never called (the row form takes scores16 for float32 compute only) */
static inline void scores16_f64(const double *q, const double *k, int64_t ld, int64_t D, int64_t n, double *s) {
    (void)q, (void)k, (void)ld, (void)D, (void)n, (void)s;
}

typedef struct {
    void *kt, *vt, *s4, *p4, *q4, *rows;
    size_t kt_size, vt_size, s4_size, p4_size, q4_size, rows_size;
    void *wk, *wq; /* a bfloat16 backward item's keys and query rows widened to float32 (backward_item_bf16) */
    size_t wk_size, wq_size;
} scratch_t;

/* The gradient rows item `it` of the backward owns, zeroed before it adds into them (zero_grads; elements of `elem`
 * bytes): its segment's dq rows for the query heads of its key/value head and its keys' dk and dv rows. The caller
 * passes zero_grads only when no two segments share a key (nor, as always, a query row), and adds items for the
 * query and key rows in no segment (q_len or k_len 0), so that every gradient row is zeroed once, by the thread that
 * then writes it, in cache, and not by a pass over the whole gradients first. */
static void zero_grads(const job_t *J, int64_t it, size_t elem) {
    const int64_t *g = J->segs + 6 * (it / J->Hkv), kvh = it % J->Hkv, rep = J->H / J->Hkv, K = J->st[15];
    const int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4];
    if (ql > 0)
        for (int64_t h = kvh * rep; h < (kvh + 1) * rep; h++)
            memset((char *)J->dq + ((b * J->H + h) * J->Q + qs) * J->D * elem, 0, (size_t)(ql * J->D) * elem);
    if (kl > 0) {
        memset((char *)J->dk + ((b * J->Hkv + kvh) * K + ks) * J->D * elem, 0, (size_t)(kl * J->D) * elem);
        memset((char *)J->dv + ((b * J->Hkv + kvh) * K + ks) * J->Dv * elem, 0, (size_t)(kl * J->Dv) * elem);
    }
}

#define WIDEN_MAX_KEYS 256 /* the most keys a row-form item widens (a call of 4 queries or more: segments under 32) */
#define WIDEN_ROWS 64       /* the query rows it widens at a time */
#define WIDEN_AHEAD 8 /* rows the widening asks for ahead of the one it converts (past the item: the next one's) */
/* Asks for the cache lines of the row `on` rows (stride bytes apart) past row x, bytes long: a hint, which never faults
 * whatever the address (past the tensor's end too: the address is computed as an integer). */
static inline void ahead(const void *x, int64_t on, int64_t stride, size_t bytes) {
    const uintptr_t at = (uintptr_t)x + (uintptr_t)(on * stride);
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch((const void *)(at + b));
}

/* *buf holding at least `bytes` (kept between items; NULL when the allocation fails, the old buffer then freed). */
static void *grow(void **buf, size_t *size, size_t bytes) {
    if (bytes <= *size && *buf) return *buf;
    free(*buf);
    *buf = malloc(bytes ? bytes : 1);
    *size = *buf ? bytes : 0;
    return *buf;
}

/* The vector helpers and the forward item for compute type T reading q, k and v stored as KV (loaded through LD, a
   conversion to T): KV = T for float32 / float64, uint16_t bfloat16 (bf16_f32) for the forward of bfloat16 inputs,
   which then needs no float32 copies of them (a row-form item of two rows or more widened into the thread's scratch
   once and run by WIDE's functions, the ones on T stored as T; a single row converts as it loads; the blocked form
   widens k into its transposed copy and v as it loads; RESULTS.md, issue 15, "bfloat16 rows widened once and written
   as bfloat16"). */
#define DEFINE_FORWARD(T, SUF, KV, LD, EXP, LOG, TANH, WIDE)                                                           \
    static inline const T *row_##SUF(const KV *restrict x, T *restrict buf, int64_t n) {                               \
        if (sizeof(KV) == sizeof(T)) return (const T *)(const void *)x; /* stored as computed: no copy */              \
        _Pragma("omp simd") for (int64_t d = 0; d < n; d++) buf[d] = LD(x[d]);                                         \
        return buf;                                                                                                    \
    }                                                                                                                  \
    /* Products over whole vectors of d, their lanes summed in a tree (sum1), then the elements past them one by one   \
       (an omp simd reduction summed the lanes in order: 16 dependent adds a dot product). */                          \
    static inline T dot_##SUF(const T *restrict a, const KV *restrict b, int64_t n) {                                  \
        VEC(T) v = {0};                                                                                                \
        int64_t d = 0;                                                                                                 \
        for (; d + LANES(T) <= n; d += LANES(T)) {                                                                     \
            VEC(T) x;                                                                                                  \
            __builtin_memcpy(&x, a + d, sizeof x);                                                                     \
            v += x * ldv_##SUF(b + d);                                                                                 \
        }                                                                                                              \
        T acc = sum1_##T(v);                                                                                           \
        for (; d < n; d++) acc += a[d] * LD(b[d]);                                                                     \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static inline void axpy_##SUF(T *restrict y, T a, const KV *restrict x, int64_t n) {                               \
        _Pragma("omp simd") for (int64_t d = 0; d < n; d++) y[d] += a * LD(x[d]);                                      \
    }                                                                                                                  \
    /* Four keys at once (rows b, b + ld, b + 2 ld, b + 3 ld): four vectors of products over whole vectors of d (four  \
       independent chains keep the FMA units busy), their lanes summed together (sum4), then the elements of n past    \
       the last whole vector one by one. */                                                                            \
    static inline void dot4_##SUF(const T *restrict a, const KV *restrict b, int64_t ld, int64_t n, T *out) {          \
        const KV *b0 = b, *b1 = b + ld, *b2 = b + 2 * ld, *b3 = b + 3 * ld;                                            \
        VEC(T) v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};                                                                 \
        int64_t d = 0;                                                                                                 \
        for (; d + LANES(T) <= n; d += LANES(T)) {                                                                     \
            VEC(T) x;                                                                                                  \
            __builtin_memcpy(&x, a + d, sizeof x);                                                                     \
            v0 += x * ldv_##SUF(b0 + d), v1 += x * ldv_##SUF(b1 + d);                                                  \
            v2 += x * ldv_##SUF(b2 + d), v3 += x * ldv_##SUF(b3 + d);                                                  \
        }                                                                                                              \
        sum4_##T(v0, v1, v2, v3, out);                                                                                 \
        for (; d < n; d++) {                                                                                           \
            const T x = a[d];                                                                                          \
            out[0] += x * LD(b0[d]), out[1] += x * LD(b1[d]), out[2] += x * LD(b2[d]), out[3] += x * LD(b3[d]);        \
        }                                                                                                              \
    }                                                                                                                  \
    /* The score modifiers on n scores s of one row (keys from rel relative to the query's position): the scale, or the\
       softcap c tanh(scale s / c), then the row's ALiBi slope times the key's distance. */                            \
    static inline void modify_##SUF(T *restrict s, int64_t n, int64_t rel, const T *mod) {                             \
        const T scale = mod[0], cap = mod[1], inv_cap = mod[2], slope = mod[3];                                        \
        int64_t j;                                                                                                     \
        if (cap > 0) {                                                                                                 \
            _Pragma("omp simd simdlen(16)") for (j = 0; j < n; j++) s[j] = cap * TANH(s[j] * scale * inv_cap);         \
        } else {                                                                                                       \
            _Pragma("omp simd simdlen(16)") for (j = 0; j < n; j++) s[j] *= scale;                                     \
        }                                                                                                              \
        if (slope != 0) {                                                                                              \
            _Pragma("omp simd simdlen(16)") for (j = 0; j < n; j++) s[j] += slope * (T)(j + rel);                      \
        }                                                                                                              \
    }                                                                                                                  \
    /* The end of one query row once its scores s[0 .. n) are in (keys lo .. hi of the segment; rel = lo - a, a the    \
       query's position minus the segment's first key): the modifiers, the softmax and the weighted sum of the         \
       value rows v (from key lo, ld apart) into oi, and the row's log-sum-exp. */                                     \
    static inline T softmax_row_##SUF(T *restrict s, int64_t n, int64_t rel, const T *mod, T *m_out, int padded) {     \
        const T sink = mod[4];                                                                                         \
        const int sunk = mod[5] != 0;                                                                                  \
        const int64_t W = LANES(T), nv = (n + W - 1) / W * W;                                                          \
        int64_t j;                                                                                                     \
        /* a modifier, or a scale that is not positive, applied first (the scale then 1: exact); else the scale goes   \
           into the weights' pass, as in tile_row (the max of scale s is scale times the max of s) */                  \
        T scale = mod[0];                                                                                              \
        if (mod[1] > 0 || mod[3] != 0 || !(scale > 0)) {                                                               \
            modify_##SUF(s, n, rel, mod);                                                                              \
            scale = 1;                                                                                                 \
        }                                                                                                              \
        /* whole vectors: the scores past n up to the multiple of LANES are -inf, whose weights are exactly 0, so no   \
           pass has a scalar remainder (documents of 8-32 tokens on a row of 8,192, D = 64, processes alternated       \
           four times: one thread 5.9-7.2 -> 5.7-6.9 ms, two 3.3-3.7 -> 3.2-3.5 ms; RESULTS.md, issue 15, "native's    \
           row form: softmax on whole vectors, values summed in registers") */                                         \
        if (!padded) /* (scores16 stored them so: -inf again here would be stores its loads wait on) */                \
            for (j = n; j < nv; j++) s[j] = -INFINITY;                                                                 \
        T raw = -INFINITY; /* the largest score before the scale (a NaN score skipped, its weight then NaN) */         \
        _Pragma("omp simd simdlen(16) reduction(max : raw)") for (j = 0; j < nv; j++) raw = s[j] > raw ? s[j] : raw;   \
        const T m = sunk && !(raw * scale >= sink) ? sink : raw * scale;                                               \
        /* the weights and their per-lane sums in one pass, the lanes summed once in a tree (sum1) */                  \
        VEC(T) sums = {0};                                                                                             \
        for (j = 0; j < nv; j += W) {                                                                                  \
            T *restrict x = s + j;                                                                                     \
            _Pragma("omp simd simdlen(16)") for (int c = 0; c < (int)W; c++) x[c] = EXP(x[c] * scale - m);             \
            VEC(T) e;                                                                                                  \
            __builtin_memcpy(&e, x, sizeof e);                                                                         \
            sums += e;                                                                                                 \
        }                                                                                                              \
        T sum = sum1_##T(sums);                                                                                        \
        if (sunk) sum += EXP(sink - m);                                                                                \
        *m_out = m;                                                                                                    \
        return sum;                                                                                                    \
    }                                                                                                                  \
    /* y[0 .. Dv) += the n value rows v (ld apart) weighted by p, each element's sum in key order; or, fresh, y = that \
       sum times inv, from registers at zero (a row's end: no zeroed accumulator to store and load back, and its       \
       scaled copy written once). A slice of up to 4 LANES elements stays in registers across all n keys and is stored \
       once: axpys of four keys and then of one loaded and stored the row again for every four keys and every key past \
       them (most of a row's time on documents of 8-32 tokens). */                                                     \
    static inline __attribute__((always_inline)) void weigh_##SUF(T *restrict y, const T *p, int64_t n, const KV *v,   \
                                                                  int64_t ld, int64_t Dv, int fresh, T inv) {          \
        const int64_t W = LANES(T);                                                                                    \
        int64_t d0 = 0;                                                                                                \
        for (; d0 + 4 * W <= Dv; d0 += 4 * W) {                                                                        \
            VEC(T) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                             \
            if (!fresh) {                                                                                              \
                __builtin_memcpy(&a0, y + d0, sizeof a0), __builtin_memcpy(&a1, y + d0 + W, sizeof a1);                \
                __builtin_memcpy(&a2, y + d0 + 2 * W, sizeof a2), __builtin_memcpy(&a3, y + d0 + 3 * W, sizeof a3);    \
            }                                                                                                          \
            for (int64_t j = 0; j < n; j++) {                                                                          \
                const KV *x = v + j * ld + d0;                                                                         \
                const T c = p[j];                                                                                      \
                a0 += c * ldv_##SUF(x), a1 += c * ldv_##SUF(x + W);                                                    \
                a2 += c * ldv_##SUF(x + 2 * W), a3 += c * ldv_##SUF(x + 3 * W);                                        \
            }                                                                                                          \
            if (fresh) a0 *= inv, a1 *= inv, a2 *= inv, a3 *= inv;                                                     \
            __builtin_memcpy(y + d0, &a0, sizeof a0), __builtin_memcpy(y + d0 + W, &a1, sizeof a1);                    \
            __builtin_memcpy(y + d0 + 2 * W, &a2, sizeof a2), __builtin_memcpy(y + d0 + 3 * W, &a3, sizeof a3);        \
        }                                                                                                              \
        for (; d0 + W <= Dv; d0 += W) {                                                                                \
            VEC(T) a = {0};                                                                                            \
            if (!fresh) __builtin_memcpy(&a, y + d0, sizeof a);                                                        \
            for (int64_t j = 0; j < n; j++) a += p[j] * ldv_##SUF(v + j * ld + d0);                                    \
            if (fresh) a *= inv;                                                                                       \
            __builtin_memcpy(y + d0, &a, sizeof a);                                                                    \
        }                                                                                                              \
        for (; d0 < Dv; d0++) { /* the last Dv % LANES elements */                                                     \
            T t = fresh ? 0 : y[d0];                                                                                   \
            for (int64_t j = 0; j < n; j++) t += p[j] * LD(v[j * ld + d0]);                                            \
            y[d0] = fresh ? t * inv : t;                                                                               \
        }                                                                                                              \
    }                                                                                                                  \
    static inline void weigh_values_##SUF(T *restrict acc, const T *p, int64_t n, const KV *v, int64_t ld,             \
                                          int64_t Dv) {                                                                \
        weigh_##SUF(acc, p, n, v, ld, Dv, 0, 1);                                                                       \
    }                                                                                                                  \
    /* One row's scores s[0 .. n) of a key tile (keys from rel relative to the query's position, as in softmax_row),   \
       s readable and writable up to the multiple of LANES past n: the modifiers, then a step of the row's online      \
       softmax: its running max *m, its sum kept as LANES partial sums l[0 .. LANES) (and its weighted values y)       \
       rescaled when the max grows (a max starts at -inf, or at the sink's logit with one partial sum at 1), the       \
       tile's weights exp(scale s - max) in place, and 0 past n. With a positive scale and no modifier, the max of     \
       scale s is scale times the max of s (rounding keeps the order), so the first pass only reads s and the scale    \
       goes into the weights' pass (one multiply-add). Whole vectors throughout, their lanes checked against n on the  \
       last vector only: no scalar remainder, and no sum across lanes per tile. Comparisons skip a NaN score, whose    \
       weight is then NaN, as in softmax_row. (Before: a pass that stored the scaled scores, and a lane check on       \
       every vector; RESULTS.md, issue 15, "native's weights".) */                                                     \
    static inline void tile_row_##SUF(T *restrict s, int64_t n, int64_t rel, const T *mod, T *m, T *l, T *restrict y,  \
                                      int64_t Dv) {                                                                    \
        const int64_t W = LANES(T), nf = n / W * W, nv = (n + W - 1) / W * W;                                          \
        const int rem = (int)(n - nf); /* scores in the last, partial vector (0: none) */                              \
        int64_t j;                                                                                                     \
        /* the modifiers, if any, or a scale that is not positive, applied in place first (the scale then 1: exact) */ \
        T scale = mod[0];                                                                                              \
        if (mod[1] > 0 || mod[3] != 0) {                                                                               \
            modify_##SUF(s, nv, rel, mod);                                                                             \
            scale = 1;                                                                                                 \
        } else if (!(scale > 0)) {                                                                                     \
            _Pragma("omp simd simdlen(16)") for (j = 0; j < nv; j++) s[j] *= scale;                                    \
            scale = 1;                                                                                                 \
        }                                                                                                              \
        T raw = -INFINITY; /* the tile's largest score before the scale */                                             \
        _Pragma("omp simd simdlen(16) reduction(max : raw)") for (j = 0; j < nf; j++) raw = s[j] > raw ? s[j] : raw;   \
        if (rem) {                                                                                                     \
            const T *restrict x = s + nf;                                                                              \
            _Pragma("omp simd simdlen(16) reduction(max : raw)") for (int c = 0; c < (int)W; c++)                      \
                raw = c < rem && x[c] > raw ? x[c] : raw;                                                              \
        }                                                                                                              \
        const T top = raw * scale > *m ? raw * scale : *m;                                                             \
        if (top != *m) {                                                                                               \
            const T alpha = EXP(*m - top);                                                                             \
            for (int64_t c = 0; c < W; c++) l[c] *= alpha;                                                             \
            for (int64_t d = 0; d < Dv; d++) y[d] *= alpha;                                                            \
            *m = top;                                                                                                  \
        }                                                                                                              \
        VEC(T) sum;                                                                                                    \
        __builtin_memcpy(&sum, l, sizeof sum);                                                                         \
        for (j = 0; j < nv; j += W) { /* the weights and their per-lane sums in one pass */                            \
            T *restrict x = s + j;                                                                                     \
            if (j < nf) {                                                                                              \
                _Pragma("omp simd simdlen(16)") for (int c = 0; c < (int)W; c++) x[c] = EXP(x[c] * scale - top);       \
            } else {                                                                                                   \
                _Pragma("omp simd simdlen(16)") for (int c = 0; c < (int)W; c++)                                       \
                    x[c] = c < rem ? EXP(x[c] * scale - top) : 0;                                                      \
            }                                                                                                          \
            VEC(T) e;                                                                                                  \
            __builtin_memcpy(&e, x, sizeof e);                                                                         \
            sum += e;                                                                                                  \
        }                                                                                                              \
        __builtin_memcpy(l, &sum, sizeof sum);                                                                         \
    }                                                                                                                  \
    static inline void finish_row_##SUF(T *restrict s, int64_t n, int64_t rel, const KV *v, int64_t ld, int64_t Dv,    \
                                        T *restrict oi, T *lse_i, const T *mod, int padded) {                          \
        T m, sum = softmax_row_##SUF(s, n, rel, mod, &m, padded);                                                      \
        weigh_##SUF(oi, s, n, v, ld, Dv, 1, 1 / sum);                                                                  \
        *lse_i = m + LOG(sum);                                                                                         \
    }                                                                                                                  \
    /* Four query rows (qi: D elements each, D a multiple of 16) of 1 to 16 keys each (n; from kr, ldk apart, values   \
       vr, ldv apart), float32 compute, no modifier but a positive scale (sinks too): finish_row's steps for the four  \
       at once, one step for all four before the next, so that their chains overlap (scores, max, exponentials, sum,   \
       division and value sums each wait on the one before; a row at a time left the core waiting on them: documents   \
       of 8-32 tokens: with weigh's fresh sums 0.80-0.89x the forward's time; RESULTS.md, issue 15, "Rows four at a    \
       time"). Each row's operations and their order are softmax_row's and weigh's: its results bit for bit. */        \
    static inline void rows4_##SUF(const T *const *qi, const KV *const *kr, const int64_t *n, const KV *const *vr,     \
                                   int64_t ldk, int64_t ldv, int64_t D, int64_t Dv, T *const *oi, T *lse,              \
                                   const T *mod) {                                                                     \
        const int64_t W = LANES(T);                                                                                    \
        const T scale = mod[0], sink = mod[4];                                                                         \
        const int sunk = mod[5] != 0;                                                                                  \
        T sc[4][64 / sizeof(T)] __attribute__((aligned(64))), m[4], sum[4];                                            \
        for (int r = 0; r < 4; r++) scores16_##SUF(qi[r], kr[r], ldk, D, n[r], sc[r]);                                 \
        for (int r = 0; r < 4; r++) {                                                                                  \
            T raw = -INFINITY;                                                                                         \
            _Pragma("omp simd simdlen(16) reduction(max : raw)") for (int64_t j = 0; j < W; j++)                       \
                raw = sc[r][j] > raw ? sc[r][j] : raw;                                                                 \
            m[r] = sunk && !(raw * scale >= sink) ? sink : raw * scale;                                                \
        }                                                                                                              \
        for (int r = 0; r < 4; r++) {                                                                                  \
            T *restrict x = sc[r];                                                                                     \
            const T top = m[r];                                                                                        \
            _Pragma("omp simd simdlen(16)") for (int c = 0; c < (int)W; c++) x[c] = EXP(x[c] * scale - top);           \
            VEC(T) e;                                                                                                  \
            __builtin_memcpy(&e, x, sizeof e);                                                                         \
            sum[r] = sum1_##T(e);                                                                                      \
            if (sunk) sum[r] += EXP(sink - top);                                                                       \
        }                                                                                                              \
        for (int r = 0; r < 4; r++) weigh_##SUF(oi[r], sc[r], n[r], vr[r], ldv, Dv, 1, 1 / sum[r]);                    \
        for (int r = 0; r < 4; r++) lse[r] = m[r] + LOG(sum[r]);                                                       \
    }                                                                                                                  \
    /* y[r][0 .. Dv) += the sum over the n keys j of p[r][j * ps] times value row j (v, ld apart), for four rows: a    \
       slice of up to 4 LANES elements of the four rows' sums stays in registers across the keys, each value element   \
       loaded once for the four rows. Each row's sum runs in key order, whatever its partners. (The backward also sums \
       the rows of q into four keys' dk rows with it, the weights then a column of dS: ps its row length.) */          \
    static inline void pv4_##SUF(T *const *y, const T *const *p, int64_t ps, const KV *v, int64_t ld, int64_t n,       \
                                 int64_t Dv) {                                                                         \
        const int64_t W = LANES(T);                                                                                    \
        int64_t d0 = 0;                                                                                                \
        for (; d0 + 4 * W <= Dv; d0 += 4 * W) {                                                                        \
            VEC(T) a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};             \
            VEC(T) a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};             \
            for (int64_t j = 0; j < n; j++) {                                                                          \
                const KV *x = v + j * ld + d0;                                                                         \
                const VEC(T) x0 = ldv_##SUF(x), x1 = ldv_##SUF(x + W);                                                 \
                const VEC(T) x2 = ldv_##SUF(x + 2 * W), x3 = ldv_##SUF(x + 3 * W);                                     \
                const T c0 = p[0][j * ps], c1 = p[1][j * ps], c2 = p[2][j * ps], c3 = p[3][j * ps];                    \
                a00 += c0 * x0, a01 += c0 * x1, a02 += c0 * x2, a03 += c0 * x3;                                        \
                a10 += c1 * x0, a11 += c1 * x1, a12 += c1 * x2, a13 += c1 * x3;                                        \
                a20 += c2 * x0, a21 += c2 * x1, a22 += c2 * x2, a23 += c2 * x3;                                        \
                a30 += c3 * x0, a31 += c3 * x1, a32 += c3 * x2, a33 += c3 * x3;                                        \
            }                                                                                                          \
            const VEC(T) sums[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23},               \
                                       {a30, a31, a32, a33}};                                                          \
            for (int r = 0; r < 4; r++)                                                                                \
                for (int c = 0; c < 4; c++) {                                                                          \
                    VEC(T) t;                                                                                          \
                    __builtin_memcpy(&t, y[r] + d0 + c * W, sizeof t);                                                 \
                    t += sums[r][c];                                                                                   \
                    __builtin_memcpy(y[r] + d0 + c * W, &t, sizeof t);                                                 \
                }                                                                                                      \
        }                                                                                                              \
        for (; d0 + W <= Dv; d0 += W) {                                                                                \
            VEC(T) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                             \
            for (int64_t j = 0; j < n; j++) {                                                                          \
                const VEC(T) x0 = ldv_##SUF(v + j * ld + d0);                                                          \
                a0 += p[0][j * ps] * x0, a1 += p[1][j * ps] * x0, a2 += p[2][j * ps] * x0, a3 += p[3][j * ps] * x0;    \
            }                                                                                                          \
            const VEC(T) sums[4] = {a0, a1, a2, a3};                                                                   \
            for (int r = 0; r < 4; r++) {                                                                              \
                VEC(T) t;                                                                                              \
                __builtin_memcpy(&t, y[r] + d0, sizeof t);                                                             \
                t += sums[r];                                                                                          \
                __builtin_memcpy(y[r] + d0, &t, sizeof t);                                                             \
            }                                                                                                          \
        }                                                                                                              \
        for (; d0 < Dv; d0++) /* the last Dv % LANES elements */                                                       \
            for (int r = 0; r < 4; r++) {                                                                              \
                T t = 0;                                                                                               \
                for (int64_t j = 0; j < n; j++) t += p[r][j * ps] * LD(v[j * ld + d0]);                                \
                y[r][d0] += t;                                                                                         \
            }                                                                                                          \
    }                                                                                                                  \
    /* kt: the n key rows k[0 .. n) (src apart) widened to T in blocks of LANES keys, each block (D, LANES): key j's   \
       element d at kt[(j / LANES) * D * LANES + d * LANES + j % LANES], so that a vector of keys at one d is one load \
       and the next d is the next one; zero up to key ld (a multiple of LANES). */                                     \
    static void transpose_##SUF(T *restrict kt, int64_t ld, const KV *restrict k, int64_t src, int64_t n, int64_t D) { \
        const int64_t W = LANES(T);                                                                                    \
        for (int64_t j = 0; j < ld; j += W) {                                                                          \
            T *restrict blk = kt + j * D;                                                                              \
            const int64_t m = n - j >= W ? W : n - j > 0 ? n - j : 0;                                                  \
            if (m == W) {                                                                                              \
                int64_t d0 = 0;                                                                                        \
                if (TRANSPOSE16 && W == 16) /* float32 blocks: 16 keys x 16 elements at a time, in registers */        \
                    for (; d0 + 16 <= D; d0 += 16) {                                                                   \
                        vec_float rows[16];                                                                            \
                        for (int c = 0; c < 16; c++) {                                                                 \
                            const VEC(T) x = ldv_##SUF(k + (j + c) * src + d0);                                        \
                            __builtin_memcpy(&rows[c], &x, sizeof x);                                                  \
                        }                                                                                              \
                        transpose16((float *)(void *)(blk + d0 * W), rows);                                            \
                    }                                                                                                  \
                for (int64_t d = d0; d < D; d++) {                                                                     \
                    _Pragma("omp simd") for (int64_t c = 0; c < W; c++) blk[d * W + c] = LD(k[(j + c) * src + d]);     \
                }                                                                                                      \
            } else {                                                                                                   \
                for (int64_t d = 0; d < D; d++)                                                                        \
                    for (int64_t c = 0; c < W; c++) blk[d * W + c] = c < m ? LD(k[(j + c) * src + d]) : 0;             \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
    /* S (4, lds): the scores q_r . k_j of four query rows (D elements each, q[r]) against the keys j0 .. j1 of kt (as \
       transpose writes it; j0 a multiple of LANES), at S[r * lds + j - j0], whole vectors up to the multiple of LANES \
       past j1. Each score is summed over d in order in its own lane, whichever rows share the block: a row's scores   \
       are the same in any grouping. */                                                                                \
    static void scores4_##SUF(const T *const *q, const T *kt, int64_t D, int64_t j0, int64_t j1, T *S, int64_t lds) {  \
        const int64_t W = LANES(T);                                                                                    \
        int64_t j = j0;                                                                                                \
        for (; j + 3 * W < j1; j += 4 * W) { /* four vectors of keys (rows of 8K 3-6% faster than two) */              \
            const T *b0 = kt + j * D, *b1 = b0 + W * D, *b2 = b1 + W * D, *b3 = b2 + W * D;                            \
            VEC(T) a[4][4] = {{{0}}};                                                                                  \
            for (int64_t d = 0; d < D; d++) {                                                                          \
                VEC(T) k0, k1, k2, k3;                                                                                 \
                __builtin_memcpy(&k0, b0 + d * W, sizeof k0), __builtin_memcpy(&k1, b1 + d * W, sizeof k1);            \
                __builtin_memcpy(&k2, b2 + d * W, sizeof k2), __builtin_memcpy(&k3, b3 + d * W, sizeof k3);            \
                for (int r = 0; r < 4; r++) {                                                                          \
                    const T c = q[r][d];                                                                               \
                    a[r][0] += c * k0, a[r][1] += c * k1, a[r][2] += c * k2, a[r][3] += c * k3;                        \
                }                                                                                                      \
            }                                                                                                          \
            for (int r = 0; r < 4; r++)                                                                                \
                for (int c = 0; c < 4; c++) __builtin_memcpy(S + r * lds + j - j0 + c * W, &a[r][c], sizeof a[r][c]);  \
        }                                                                                                              \
        for (; j + W < j1; j += 2 * W) { /* two vectors of keys a step: each row's element of q loaded once for both */\
            const T *b0 = kt + j * D, *b1 = b0 + W * D;                                                                \
            VEC(T) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0};                     \
            for (int64_t d = 0; d < D; d++) {                                                                          \
                VEC(T) k0, k1;                                                                                         \
                __builtin_memcpy(&k0, b0 + d * W, sizeof k0);                                                          \
                __builtin_memcpy(&k1, b1 + d * W, sizeof k1);                                                          \
                const T c0 = q[0][d], c1 = q[1][d], c2 = q[2][d], c3 = q[3][d];                                        \
                a0 += c0 * k0, a1 += c1 * k0, a2 += c2 * k0, a3 += c3 * k0;                                            \
                e0 += c0 * k1, e1 += c1 * k1, e2 += c2 * k1, e3 += c3 * k1;                                            \
            }                                                                                                          \
            T *s = S + j - j0;                                                                                         \
            __builtin_memcpy(s, &a0, sizeof a0), __builtin_memcpy(s + W, &e0, sizeof e0);                              \
            __builtin_memcpy(s + lds, &a1, sizeof a1), __builtin_memcpy(s + lds + W, &e1, sizeof e1);                  \
            __builtin_memcpy(s + 2 * lds, &a2, sizeof a2), __builtin_memcpy(s + 2 * lds + W, &e2, sizeof e2);          \
            __builtin_memcpy(s + 3 * lds, &a3, sizeof a3), __builtin_memcpy(s + 3 * lds + W, &e3, sizeof e3);          \
        }                                                                                                              \
        for (; j < j1; j += W) {                                                                                       \
            const T *b0 = kt + j * D;                                                                                  \
            VEC(T) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                             \
            for (int64_t d = 0; d < D; d++) {                                                                          \
                VEC(T) kv;                                                                                             \
                __builtin_memcpy(&kv, b0 + d * W, sizeof kv);                                                          \
                a0 += q[0][d] * kv, a1 += q[1][d] * kv, a2 += q[2][d] * kv, a3 += q[3][d] * kv;                        \
            }                                                                                                          \
            T *s = S + j - j0;                                                                                         \
            __builtin_memcpy(s, &a0, sizeof a0), __builtin_memcpy(s + lds, &a1, sizeof a1);                            \
            __builtin_memcpy(s + 2 * lds, &a2, sizeof a2), __builtin_memcpy(s + 3 * lds, &a3, sizeof a3);              \
        }                                                                                                              \
    }                                                                                                                  \
    /* The row form of an item's ql query rows (q, k, v: rows ldq, ldk, ldv apart, k and v from the segment's key      \
       k0): one dot product per pair, no copy of k. Rows written to o, or where ob is not NULL in bfloat16 to ob       \
       (through tmp, 4 Dv elements). */                                                                                \
    static void rows_##SUF(const job_t *J, const KV *q, int64_t ldq, const KV *k, int64_t ldk, const KV *v,            \
                           int64_t ldv, int64_t k0, T *o, uint16_t *ob, T *lse, int64_t ql, int64_t kl, int64_t off,   \
                           const T *mod, T *s, T *qrow, T *tmp) {                                                      \
        const int64_t D = J->D, Dv = J->Dv, ldo = J->st[11];                                                           \
        /* rows4's case: float32 stored as computed, no modifier but a positive scale */                               \
        const int plain = SCORES16 && sizeof(T) == 4 && sizeof(KV) == sizeof(T) && D % 16 == 0 && mod[0] > 0 &&        \
                          !(mod[1] > 0) && mod[3] == 0;                                                                \
        for (int64_t i = 0; i < ql; i++) {                                                                             \
            int64_t lo, hi;                                                                                            \
            if (plain && i + 4 <= ql) { /* four rows of 1 to 16 keys each at once */                                   \
                int64_t lo4[4], n4[4], fit = 1;                                                                        \
                for (int r = 0; r < 4; r++) {                                                                          \
                    key_range(J, i + r, off, kl, &lo4[r], &hi);                                                        \
                    n4[r] = hi - lo4[r], fit &= n4[r] >= 1 && n4[r] <= 16;                                             \
                }                                                                                                      \
                if (fit) {                                                                                             \
                    const T *q4[4];                                                                                    \
                    const KV *k4[4], *v4[4];                                                                           \
                    T *o4[4];                                                                                          \
                    for (int r = 0; r < 4; r++) {                                                                      \
                        q4[r] = (const T *)(const void *)(q + (i + r) * ldq);                                          \
                        k4[r] = k + (lo4[r] - k0) * ldk, v4[r] = v + (lo4[r] - k0) * ldv;                              \
                        o4[r] = ob ? tmp + r * Dv : o + (i + r) * ldo;                                                 \
                    }                                                                                                  \
                    rows4_##SUF(q4, k4, n4, v4, ldk, ldv, D, Dv, o4, lse + i, mod);                                    \
                    if (ob)                                                                                            \
                        for (int r = 0; r < 4; r++) PUT_BF16(ob + (i + r) * ldo, o4[r], Dv);                           \
                    i += 3;                                                                                            \
                    continue;                                                                                          \
                }                                                                                                      \
            }                                                                                                          \
            key_range(J, i, off, kl, &lo, &hi);                                                                        \
            T *oi = ob ? tmp : o + i * ldo;                                                                            \
            if (hi <= lo) { /* no allowed key: exactly 0, and the backward skips the row */                            \
                for (int64_t d = 0; d < Dv; d++) oi[d] = 0;                                                            \
                if (ob) PUT_BF16(ob + i * ldo, oi, Dv);                                                                \
                lse[i] = -INFINITY;                                                                                    \
                continue;                                                                                              \
            }                                                                                                          \
            const T *qi = row_##SUF(q + i * ldq, qrow, D);                                                             \
            const KV *kl0 = k + (lo - k0) * ldk;                                                                       \
            const int padded = SCORES16 && sizeof(T) == 4 && hi - lo <= 32 && D % 16 == 0;                             \
            if (padded) { /* the scores in one vector or two, -inf past hi, one store each */                          \
                scores16_##SUF(qi, kl0, ldk, D, hi - lo < 16 ? hi - lo : 16, s + lo);                                  \
                if (hi - lo > 16) scores16_##SUF(qi, kl0 + 16 * ldk, ldk, D, hi - lo - 16, s + lo + 16);               \
            } else {                                                                                                   \
                int64_t j = 0;                                                                                         \
                for (; j + 4 <= hi - lo; j += 4) dot4_##SUF(qi, kl0 + j * ldk, ldk, D, s + lo + j);                    \
                for (; j < hi - lo; j++) s[lo + j] = dot_##SUF(qi, kl0 + j * ldk, D);                                  \
            }                                                                                                          \
            finish_row_##SUF(s + lo, hi - lo, lo - i - off, v + (lo - k0) * ldv, ldv, Dv, oi, lse + i, mod,            \
                             padded);                                                                                  \
            if (ob) PUT_BF16(ob + i * ldo, oi, Dv);                                                                    \
        }                                                                                                              \
    }                                                                                                                  \
    static int forward_item_##SUF(const job_t *J, int64_t item, T *s, T *qrow, scratch_t *X) {                         \
        /* head-major order: a thread walks one head's rows of q, k, v and the output front to back */                 \
        const int64_t *st = J->st, *g = J->segs + 6 * (item % J->nseg);                                                \
        int64_t h = item / J->nseg, kvh = h / (J->H / J->Hkv);                                                         \
        int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];                                      \
        const KV *q = (const KV *)J->q + b * st[0] + h * st[1] + qs * st[2];                                           \
        const KV *k = (const KV *)J->k + b * st[3] + kvh * st[4] + ks * st[5];                                         \
        const KV *v = (const KV *)J->v + b * st[6] + kvh * st[7] + ks * st[8];                                         \
        /* the output in T, or in bfloat16 (J->out_bf16: each row through tmp, Dv elements of T) */                    \
        T *o = J->out_bf16 ? NULL : (T *)J->res + b * st[9] + h * st[10] + qs * st[11];                                \
        uint16_t *ob = J->out_bf16 ? (uint16_t *)J->res + b * st[9] + h * st[10] + qs * st[11] : NULL;                 \
        T *lse = (T *)J->lse + (b * J->H + h) * J->Q + qs;                                                             \
        const T mod[6] = {(T)J->scale, (T)J->softcap, J->softcap > 0 ? (T)(1 / J->softcap) : 0,                        \
                          J->slopes ? ((const T *)J->slopes)[h] : 0, J->sinks ? ((const T *)J->sinks)[h] : 0,          \
                          J->sinks != NULL};                                                                           \
        const int64_t D = J->D;                                                                                        \
        if (ql <= 0) return 0;                                                                                         \
        if (kl < J->block_keys) { /* the row form */                                                                   \
            T *tmp = ob ? (T *)grow(&X->p4, &X->p4_size, sizeof(T) * (4 * J->Dv + 1)) : NULL;                          \
            if (ob && !tmp) return 1;                                                                                  \
            if (sizeof(KV) == sizeof(T) || ql < 2 || kl > WIDEN_MAX_KEYS) {                                            \
                rows_##SUF(J, q, st[2], k, st[5], v, st[8], 0, o, ob, lse, ql, kl, off, mod, s, qrow, tmp);            \
                return 0;                                                                                              \
            }                                                                                                          \
            /* bfloat16 read as stored: the item's q, k and v widened to T once, each key then read by its rows in T   \
               (widened as each pair loaded it, a key row was converted once for every row that sees it); not a        \
               decoding step's long cache (a row form of one to three queries against any number of keys), whose       \
               float32 copy would leave the cache for fewer reads than it took to write */                             \
            int64_t klo, khi, lo, hi;                                                                                  \
            key_range(J, 0, off, kl, &klo, &hi);                                                                       \
            key_range(J, ql - 1, off, kl, &lo, &khi);                                                                  \
            const int64_t n = khi > klo ? khi - klo : 0, Dv = J->Dv;                                                   \
            T *qw = (T *)grow(&X->q4, &X->q4_size, sizeof(T) * (ql < WIDEN_ROWS ? ql : WIDEN_ROWS) * D);               \
            T *kw = (T *)grow(&X->kt, &X->kt_size, sizeof(T) * (n * D + 1));                                           \
            T *vw = (T *)grow(&X->vt, &X->vt_size, sizeof(T) * (n * Dv + 1));                                          \
            if (!qw || !kw || !vw) return 1;                                                                           \
            for (int64_t j = 0; j < n; j++) {                                                                          \
                ahead(k + (klo + j) * st[5], WIDEN_AHEAD, st[5] * sizeof(KV), D * sizeof(KV));                         \
                ahead(v + (klo + j) * st[8], WIDEN_AHEAD, st[8] * sizeof(KV), Dv * sizeof(KV));                        \
                row_##SUF(k + (klo + j) * st[5], kw + j * D, D);                                                       \
                row_##SUF(v + (klo + j) * st[8], vw + j * Dv, Dv);                                                     \
            }                                                                                                          \
            for (int64_t c0 = 0; c0 < ql; c0 += WIDEN_ROWS) { /* q by chunks of rows: each row is read once */         \
                const int64_t c = ql - c0 < WIDEN_ROWS ? ql - c0 : WIDEN_ROWS, at = c0 * st[11];                       \
                for (int64_t i = 0; i < c; i++) {                                                                      \
                    ahead(q + (c0 + i) * st[2], WIDEN_AHEAD, st[2] * sizeof(KV), D * sizeof(KV));                      \
                    row_##SUF(q + (c0 + i) * st[2], qw + i * D, D);                                                    \
                }                                                                                                      \
                rows_##WIDE(J, qw, D, kw, D, vw, Dv, klo, o ? o + at : NULL, ob ? ob + at : NULL, lse + c0, c, kl,     \
                            off + c0, mod, s, qrow, tmp);                                                              \
            }                                                                                                          \
            return 0;                                                                                                  \
        }                                                                                                              \
        /* the blocked form: panels of PANEL_ROWS query rows; each four rows of a panel walk the keys they see in      \
           tiles of TILE_KEYS from their first key (a last piece under TILE_KEYS / 8 joins the tile before: merge),    \
           against the item's transposed copy; the panel takes its groups' t-th tiles together, scores and value       \
           sums SUB_KEYS keys at a time for every group, so that those keys stay in L1; each row keeps an online       \
           softmax (its running max, sum and weighted values) across its tiles */                                      \
        int64_t klo, khi, lo, hi;                                                                                      \
        key_range(J, 0, off, kl, &klo, &hi);                                                                           \
        key_range(J, ql - 1, off, kl, &lo, &khi);                                                                      \
        const int64_t n = khi > klo ? khi - klo : 0, Dv = J->Dv;                                                       \
        const int64_t ld = (n + LANES(T) - 1) / LANES(T) * LANES(T) + LANES(T);                                        \
        const int64_t merge = J->tile_keys / 8, tk = J->tile_keys + merge < n ? J->tile_keys + merge : n;              \
        const int64_t lds = (tk + LANES(T) - 1) / LANES(T) * LANES(T) + 2 * LANES(T);                                  \
        const int64_t panel = J->panel_rows, groups = (panel + 3) / 4;                                                 \
        T *kt = (T *)grow(&X->kt, &X->kt_size, sizeof(T) * D * ld);                                                    \
        const int fresh = !(X->s4 && sizeof(T) * 4 * groups * lds <= X->s4_size); /* a new buffer: zeroed below */     \
        T *S = (T *)grow(&X->s4, &X->s4_size, sizeof(T) * 4 * groups * lds);                                           \
        T *q4 = (T *)grow(&X->q4, &X->q4_size, sizeof(T) * panel * D);                                                 \
        /* the panel's rows: their weighted values, max and LANES partial sums */                                      \
        T *A = (T *)grow(&X->p4, &X->p4_size, sizeof(T) * panel * (Dv + 1 + LANES(T)));                                \
        /* each group of four rows: its tile's keys u0 .. u1, S's column 0 (a0), the four rows' common keys, whether   \
           all four see a key of the tile, and each row's keys in the tile */                                          \
        int64_t *G = (int64_t *)grow(&X->rows, &X->rows_size, sizeof(int64_t) * groups * 16);                          \
        if (!kt || !S || !q4 || !A || !G) return 1;                                                                    \
        /* tile_row reads whole vectors past a row's scores and masks them: a new buffer is zeroed once; what later    \
           items leave there is masked alike */                                                                        \
        if (fresh)                                                                                                     \
            for (int64_t c = 0; c < 4 * groups * lds; c++) S[c] = 0;                                                   \
        T *M = A + panel * Dv, *Lsum = M + panel;                                                                      \
        transpose_##SUF(kt, ld, k + klo * st[5], st[5], n, D);                                                         \
        for (int64_t p0 = 0; p0 < ql; p0 += panel) {                                                                   \
            const int64_t pn = ql - p0 < panel ? ql - p0 : panel, ng = (pn + 3) / 4;                                   \
            for (int64_t r = 0; r < pn; r++) {                                                                         \
                M[r] = mod[5] != 0 ? mod[4] : -INFINITY;                                                               \
                for (int64_t c = 0; c < LANES(T); c++) Lsum[r * LANES(T) + c] = c == 0 && mod[5] != 0 ? 1 : 0;         \
                for (int64_t d = 0; d < Dv; d++) A[r * Dv + d] = 0;                                                    \
            }                                                                                                          \
            const T *qp = sizeof(KV) == sizeof(T) ? (const T *)(const void *)(q + p0 * st[2]) : q4;                    \
            const int64_t qld = sizeof(KV) == sizeof(T) ? st[2] : D;                                                   \
            if (sizeof(KV) != sizeof(T))                                                                               \
                for (int64_t r = 0; r < pn; r++) row_##SUF(q + (p0 + r) * st[2], q4 + r * D, D);                       \
            for (int64_t t = 0, more = 1; more; t++) {                                                                 \
                more = 0;                                                                                              \
                int64_t span0 = khi, span1 = klo; /* the keys of the groups' t-th tiles */                             \
                for (int64_t m = 0; m < ng; m++) {                                                                     \
                    int64_t *gm = G + 16 * m, g0, g1;                                                                  \
                    const int64_t i0 = p0 + 4 * m, R = p0 + pn - i0 < 4 ? p0 + pn - i0 : 4;                            \
                    key_range(J, i0, off, kl, &g0, &hi);                                                               \
                    key_range(J, i0 + R - 1, off, kl, &lo, &g1);                                                       \
                    const int64_t u0 = g0 + t * J->tile_keys;                                                          \
                    gm[0] = gm[1] = gm[5] = 0;                                                                         \
                    if (u0 >= g1 || (t > 0 && g1 - u0 < merge)) continue; /* the group's tiles are done */             \
                    more = 1;                                                                                          \
                    gm[0] = u0, gm[1] = g1 - (u0 + J->tile_keys) < merge ? g1 : u0 + J->tile_keys;                     \
                    gm[2] = klo + (u0 - klo) / LANES(T) * LANES(T); /* the key of S's column 0 */                      \
                    span0 = gm[2] < span0 ? gm[2] : span0, span1 = gm[1] > span1 ? gm[1] : span1;                      \
                }                                                                                                      \
                if (!more) break;                                                                                      \
                /* a panel whose groups' keys span at most SUB_KEYS takes its groups one at a time (the L1 holds       \
                   their keys either way), a wider one all of them in each step */                                     \
                const int64_t step = span1 - span0 <= SUB_KEYS ? 1 : ng;                                               \
                for (int64_t mb = 0; mb < ng; mb += step) {                                                            \
                    const int64_t me = mb + step < ng ? mb + step : ng;                                                \
                    /* the scores, SUB_KEYS keys at a time for every group, so that those keys stay in L1 */           \
                    for (int64_t s0 = span0; s0 < span1; s0 += SUB_KEYS) {                                             \
                        for (int64_t m = mb; m < me; m++) {                                                            \
                            const int64_t *gm = G + 16 * m;                                                            \
                            if (gm[1] <= gm[0]) continue;                                                              \
                            const int64_t j0 = s0 > gm[2] ? s0 : gm[2];                                                \
                            const int64_t j1 = s0 + SUB_KEYS < gm[1] ? s0 + SUB_KEYS : gm[1];                          \
                            if (j1 <= j0) continue;                                                                    \
                            const int64_t i0 = p0 + 4 * m, R = p0 + pn - i0 < 4 ? p0 + pn - i0 : 4;                    \
                            const T *qr[4];                                                                            \
                            for (int64_t r = 0; r < 4; r++) /* past the item's last row: its first again */            \
                                qr[r] = qp + (4 * m + (r < R ? r : 0)) * qld;                                          \
                            scores4_##SUF(qr, kt, D, j0 - klo, j1 - klo, S + 4 * lds * (m - mb) + j0 - gm[2],          \
                                          lds);                                                                        \
                        }                                                                                              \
                    }                                                                                                  \
                    /* each row's softmax step, and the values its group's rows do not all see */                      \
                    for (int64_t m = mb; m < me; m++) {                                                                \
                        int64_t *gm = G + 16 * m, *x0 = gm + 6, *x1 = gm + 10;                                         \
                        if (gm[1] <= gm[0]) continue;                                                                  \
                        const int64_t i0 = p0 + 4 * m, R = p0 + pn - i0 < 4 ? p0 + pn - i0 : 4, u0 = gm[0], u1 = gm[1];\
                        const int64_t a0 = gm[2];                                                                      \
                        T *Sm = S + 4 * lds * (m - mb);                                                                \
                        int64_t clo = u0, chi = u1, full = R == 4;                                                     \
                        for (int64_t r = 0; r < R; r++) {                                                              \
                            const int64_t w = i0 + r - p0;                                                             \
                            key_range(J, i0 + r, off, kl, &x0[r], &x1[r]);                                             \
                            x0[r] = x0[r] > u0 ? x0[r] : u0, x1[r] = x1[r] < u1 ? x1[r] : u1;                          \
                            if (x1[r] <= x0[r]) {                                                                      \
                                full = 0;                                                                              \
                                continue;                                                                              \
                            }                                                                                          \
                            clo = x0[r] > clo ? x0[r] : clo, chi = x1[r] < chi ? x1[r] : chi;                          \
                            tile_row_##SUF(Sm + r * lds + x0[r] - a0, x1[r] - x0[r], x0[r] - i0 - r - off, mod, M + w, \
                                           Lsum + w * LANES(T), A + w * Dv, Dv);                                       \
                        }                                                                                              \
                        if (!full || chi - clo < 4) { /* a row at a time */                                            \
                            for (int64_t r = 0; r < R; r++)                                                            \
                                if (x1[r] > x0[r])                                                                     \
                                    weigh_values_##SUF(A + (i0 + r - p0) * Dv, Sm + r * lds + x0[r] - a0,              \
                                                       x1[r] - x0[r], v + x0[r] * st[8], st[8], Dv);                   \
                            gm[3] = gm[4] = 0, gm[5] = 0;                                                              \
                            continue;                                                                                  \
                        }                                                                                              \
                        for (int64_t r = 0; r < 4; r++) /* the keys only some rows see, at most three at each end */   \
                            weigh_values_##SUF(A + (i0 + r - p0) * Dv, Sm + r * lds + x0[r] - a0, clo - x0[r],         \
                                               v + x0[r] * st[8], st[8], Dv);                                          \
                        gm[3] = clo, gm[4] = chi, gm[5] = 1;                                                           \
                    }                                                                                                  \
                    /* the four rows' common keys: each value row loaded once for the four, SUB_KEYS keys at a time for\
                       every group (from multiples of SUB_KEYS of the segment's keys, whatever the threads' cut) */    \
                    for (int64_t s0 = span0 / SUB_KEYS * SUB_KEYS; s0 < span1; s0 += SUB_KEYS) {                       \
                        for (int64_t m = mb; m < me; m++) {                                                            \
                            const int64_t *gm = G + 16 * m;                                                            \
                            if (!gm[5]) continue;                                                                      \
                            const int64_t c0 = s0 > gm[3] ? s0 : gm[3];                                                \
                            const int64_t c1 = s0 + SUB_KEYS < gm[4] ? s0 + SUB_KEYS : gm[4];                          \
                            if (c1 <= c0) continue;                                                                    \
                            T *y[4];                                                                                   \
                            const T *p[4];                                                                             \
                            for (int64_t r = 0; r < 4; r++)                                                            \
                                y[r] = A + (4 * m + r) * Dv, p[r] = S + (4 * (m - mb) + r) * lds + c0 - gm[2];         \
                            pv4_##SUF(y, p, 1, v + c0 * st[8], st[8], c1 - c0, Dv);                                    \
                        }                                                                                              \
                    }                                                                                                  \
                    for (int64_t m = mb; m < me; m++) {                                                                \
                        const int64_t *gm = G + 16 * m, *x1 = gm + 10;                                                 \
                        if (!gm[5]) continue;                                                                          \
                        for (int64_t r = 0; r < 4; r++)                                                                \
                            weigh_values_##SUF(A + (4 * m + r) * Dv, S + (4 * (m - mb) + r) * lds + gm[4] - gm[2],     \
                                               x1[r] - gm[4], v + gm[4] * st[8], st[8], Dv);                           \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            for (int64_t r = 0; r < pn; r++) {                                                                         \
                T *oi = ob ? A + r * Dv : o + (p0 + r) * st[11]; /* bfloat16 out: the row in place in A first */       \
                key_range(J, p0 + r, off, kl, &lo, &hi);                                                               \
                if (hi <= lo) { /* no allowed key: exactly 0, and the backward skips the row */                        \
                    for (int64_t d = 0; d < Dv; d++) oi[d] = 0;                                                        \
                    if (ob) PUT_BF16(ob + (p0 + r) * st[11], oi, Dv);                                                  \
                    lse[p0 + r] = -INFINITY;                                                                           \
                    continue;                                                                                          \
                }                                                                                                      \
                T sum = 0;                                                                                             \
                for (int64_t c = 0; c < LANES(T); c++) sum += Lsum[r * LANES(T) + c];                                  \
                const T inv = 1 / sum;                                                                                 \
                for (int64_t d = 0; d < Dv; d++) oi[d] = A[r * Dv + d] * inv;                                          \
                if (ob) PUT_BF16(ob + (p0 + r) * st[11], oi, Dv);                                                      \
                lse[p0 + r] = M[r] + LOG(sum);                                                                         \
            }                                                                                                          \
        }                                                                                                              \
        return 0;                                                                                                      \
    }

#define DEFINE_WORKER(T, SUF, BACKWARD, GRAD)                                                                          \
    static void *worker_##SUF(void *arg) {                                                                             \
        job_t *J = (job_t *)arg;                                                                                       \
        scratch_t X = {0};                                                                                             \
        /* (malloc's placement: a cache-line-aligned buffer made a window of 256 at two threads 1.06-1.16x slower) */  \
        T *s = (T *)malloc(sizeof(T) * (2 * (J->kmax + 1) + LANES(T))); /* softmax_row pads a row to LANES */          \
        T *qrow = (T *)malloc(sizeof(T) * (J->D + 1)); /* a bfloat16 query row widened (row_) */                       \
        int failed = !s || !qrow;                                                                                      \
        while (!failed) {                                                                                              \
            int64_t first = __atomic_fetch_add(&J->next, J->chunk, __ATOMIC_RELAXED);                                  \
            if (first >= J->n_items) break;                                                                            \
            int64_t last = first + J->chunk < J->n_items ? first + J->chunk : J->n_items;                              \
            for (int64_t it = first; it < last && !failed; it++) {                                                     \
                if (J->backward) {                                                                                     \
                    const int64_t *g = J->segs + 6 * (it / J->Hkv);                                                    \
                    if (J->zero_grads) zero_grads(J, it, sizeof(GRAD));                                                \
                    if (g[2] > 0 && g[4] > 0) /* an item of no query or no key adds nothing */                         \
                        failed = BACKWARD(J, it, s, s + J->kmax + 1, &X);                                              \
                } else                                                                                                 \
                    failed = forward_item_##SUF(J, it, s, qrow, &X);                                                   \
            }                                                                                                          \
        }                                                                                                              \
        free(s);                                                                                                       \
        free(qrow);                                                                                                    \
        free(X.kt), free(X.vt), free(X.s4), free(X.p4), free(X.q4), free(X.rows), free(X.wk), free(X.wq);              \
        return failed ? (void *)1 : NULL;                                                                              \
    }


#define DEFINE_KERNELS(T, SUF, EXP, LOG, TANH)                                                                         \
    DEFINE_FORWARD(T, SUF, T, SAME, EXP, LOG, TANH, SUF)                                                               \
    /* What the backward of an item of segment g reads and writes of query head h: its rows of q, the output, dO,      \
       lse and dq, and its ALiBi slope. */                                                                             \
    typedef struct {                                                                                                   \
        const T *q, *o, *dO, *lse;                                                                                     \
        T *dq, slope;                                                                                                  \
    } head_##SUF;                                                                                                      \
    static inline head_##SUF head_rows_##SUF(const job_t *J, const int64_t *g, int64_t h) {                            \
        const int64_t *st = J->st, b = g[0], qs = g[1];                                                                \
        head_##SUF r;                                                                                                  \
        r.q = (const T *)J->q + b * st[0] + h * st[1] + qs * st[2];                                                    \
        r.o = (const T *)J->res + b * st[9] + h * st[10] + qs * st[11];                                                \
        r.dO = (const T *)J->dout + b * st[12] + h * st[13] + qs * st[14];                                             \
        r.lse = (const T *)J->lse + (b * J->H + h) * J->Q + qs;                                                        \
        r.dq = (T *)J->dq + ((b * J->H + h) * J->Q + qs) * J->D;                                                       \
        r.slope = J->slopes ? ((const T *)J->slopes)[h] : 0;                                                           \
        return r;                                                                                                      \
    }                                                                                                                  \
    /* The backward of one item in the blocked form: k and v transposed once for the item's heads; per head, panels of \
       PANEL_ROWS query rows (their q and dO rows copied, zero for a row without a share: no allowed key, or an        \
       infinite lse), and in each panel the keys its rows see in tiles of TILE_KEYS (from multiples of TILE_KEYS of the\
       segment's keys). In a tile: first the probabilities P and dS = P (dP - di) of four rows at a time (scores4 on   \
       the tile's keys) and their dq (the four rows' common keys through pv4, a key only some rows see row by row);    \
       then each key's dk and dv from the panel's rows that see it, four keys at a time over the rows all four see (pv4\
       on a column of dS and P), the others key by key. A row adds to exactly the keys it sees, and a key's sums run in\
       row order. */                                                                                                   \
    static int backward_block_##SUF(const job_t *J, int64_t item, scratch_t *X) {                                      \
        const int64_t *st = J->st, *g = J->segs + 6 * (item / J->Hkv);                                                 \
        int64_t kvh = item % J->Hkv, rep = J->H / J->Hkv, D = J->D, Dv = J->Dv, K = st[15];                            \
        int64_t b = g[0], ql = g[2], ks = g[3], kl = g[4], off = g[5];                                                 \
        if (ql <= 0) return 0;                                                                                         \
        const T *k = (const T *)J->k + b * st[3] + kvh * st[4] + ks * st[5];                                           \
        const T *v = (const T *)J->v + b * st[6] + kvh * st[7] + ks * st[8];                                           \
        T *dk = (T *)J->dk + ((b * J->Hkv + kvh) * K + ks) * D;                                                        \
        T *dv = (T *)J->dv + ((b * J->Hkv + kvh) * K + ks) * Dv;                                                       \
        const T scale = (T)J->scale, cap = (T)J->softcap, inv_cap = J->softcap > 0 ? (T)(1 / J->softcap) : 0;          \
        const int64_t W = LANES(T);                                                                                    \
        int64_t klo, khi, lo, hi;                                                                                      \
        key_range(J, 0, off, kl, &klo, &hi);                                                                           \
        key_range(J, ql - 1, off, kl, &lo, &khi);                                                                      \
        if (khi <= klo) return 0;                                                                                      \
        const int64_t n = khi - klo, ld = (n + W - 1) / W * W + W, lds = J->tile_keys + 2 * W, panel = J->panel_rows;  \
        T *kt = (T *)grow(&X->kt, &X->kt_size, sizeof(T) * D * ld);                                                    \
        T *vt = (T *)grow(&X->vt, &X->vt_size, sizeof(T) * Dv * ld);                                                   \
        T *PP = (T *)grow(&X->s4, &X->s4_size, sizeof(T) * 2 * panel * lds);                                           \
        T *Qp = (T *)grow(&X->q4, &X->q4_size, sizeof(T) * panel * (D + Dv + 1));                                      \
        int64_t *rlo = (int64_t *)grow(&X->rows, &X->rows_size, sizeof(int64_t) * 3 * panel);                          \
        if (!kt || !vt || !PP || !Qp || !rlo) return 1;                                                                \
        T *DS = PP + panel * lds, *dOp = Qp + panel * D, *di = dOp + panel * Dv;                                       \
        int64_t *rhi = rlo + panel, *share = rhi + panel; /* the panel's rows: their keys, whether they have a share */\
        transpose_##SUF(kt, ld, k + klo * st[5], st[5], n, D);                                                         \
        transpose_##SUF(vt, ld, v + klo * st[8], st[8], n, Dv);                                                        \
        for (int64_t h = kvh * rep; h < (kvh + 1) * rep; h++) {                                                        \
            const head_##SUF hd = head_rows_##SUF(J, g, h);                                                            \
            const T slope = hd.slope, *lse = hd.lse;                                                                   \
            for (int64_t p0 = 0; p0 < ql; p0 += panel) {                                                               \
                const int64_t pn = ql - p0 < panel ? ql - p0 : panel;                                                  \
                int64_t plo = khi, phi = klo;                                                                          \
                for (int64_t w = 0; w < pn; w++) {                                                                     \
                    const int64_t i = p0 + w;                                                                          \
                    key_range(J, i, off, kl, &rlo[w], &rhi[w]);                                                        \
                    share[w] = rhi[w] > rlo[w] && !isinf(lse[i]);                                                      \
                    di[w] = share[w] ? dot_##SUF(hd.dO + i * st[14], hd.o + i * st[11], Dv) : 0;                       \
                    for (int64_t d = 0; d < D; d++) Qp[w * D + d] = share[w] ? hd.q[i * st[2] + d] : 0;                \
                    for (int64_t d = 0; d < Dv; d++) dOp[w * Dv + d] = share[w] ? hd.dO[i * st[14] + d] : 0;           \
                    if (!share[w]) continue;                                                                           \
                    plo = rlo[w] < plo ? rlo[w] : plo, phi = rhi[w] > phi ? rhi[w] : phi;                              \
                }                                                                                                      \
                for (int64_t t0 = plo / J->tile_keys * J->tile_keys; t0 < phi; t0 += J->tile_keys) {                   \
                    const int64_t ta = t0 > plo ? t0 : plo, t1 = t0 + J->tile_keys < phi ? t0 + J->tile_keys : phi;    \
                    const int64_t a0 = klo + (ta - klo) / W * W; /* the key of PP's and DS's column 0 */               \
                    for (int64_t g0 = 0; g0 < pn; g0 += 4) { /* P, dS and dq of four rows */                           \
                        const int64_t G = pn - g0 < 4 ? pn - g0 : 4;                                                   \
                        int64_t x0[4], x1[4], u0 = rlo[g0] > ta ? rlo[g0] : ta, u1 = rhi[g0 + G - 1];                  \
                        u1 = u1 < t1 ? u1 : t1;                                                                        \
                        if (u1 <= u0) continue;                                                                        \
                        const int64_t ga = klo + (u0 - klo) / W * W;                                                   \
                        const T *qr[4], *dr[4];                                                                        \
                        T *dqr[4], *ps[4];                                                                             \
                        for (int64_t r = 0; r < 4; r++) {                                                              \
                            /* rows past the panel's last: its row again, unused */                                    \
                            const int64_t w = g0 + (r < G ? r : 0);                                                    \
                            qr[r] = Qp + w * D, dr[r] = dOp + w * Dv, dqr[r] = hd.dq + (p0 + w) * D;                   \
                        }                                                                                              \
                        scores4_##SUF(qr, kt, D, ga - klo, u1 - klo, PP + g0 * lds + ga - a0, lds);                    \
                        scores4_##SUF(dr, vt, Dv, ga - klo, u1 - klo, DS + g0 * lds + ga - a0, lds);                   \
                        int64_t clo = u0, chi = u1, full = G == 4;                                                     \
                        for (int64_t r = 0; r < G; r++) {                                                              \
                            const int64_t w = g0 + r, i = p0 + w, a = i + off;                                         \
                            T *pr = PP + w * lds - a0, *sr = DS + w * lds - a0; /* key j at pr[j] */                   \
                            int64_t j;                                                                                 \
                            x0[r] = rlo[w] > u0 ? rlo[w] : u0, x1[r] = rhi[w] < u1 ? rhi[w] : u1;                      \
                            if (x1[r] <= x0[r] || !share[w]) {                                                         \
                                for (j = x0[r]; j < x1[r]; j++) pr[j] = sr[j] = 0; /* no share: zero weights */        \
                                full = 0;                                                                              \
                                continue;                                                                              \
                            }                                                                                          \
                            clo = x0[r] > clo ? x0[r] : clo, chi = x1[r] < chi ? x1[r] : chi;                          \
                            const T lse_i = lse[i], d_i = di[w];                                                       \
                            if (cap > 0) { /* d(c tanh(x / c)) / dx = 1 - tanh^2, folded into dP - di */               \
                                _Pragma("omp simd simdlen(16)") for (j = x0[r]; j < x1[r]; j++) {                      \
                                    T t = TANH(scale * pr[j] * inv_cap);                                               \
                                    pr[j] = EXP(cap * t + slope * (T)(j - a) - lse_i);                                 \
                                    sr[j] = pr[j] * ((sr[j] - d_i) * (1 - t * t)) * scale;                             \
                                }                                                                                      \
                            } else {                                                                                   \
                                _Pragma("omp simd simdlen(16)") for (j = x0[r]; j < x1[r]; j++) {                      \
                                    pr[j] = EXP(scale * pr[j] + slope * (T)(j - a) - lse_i);                           \
                                    sr[j] = pr[j] * (sr[j] - d_i) * scale;                                             \
                                }                                                                                      \
                            }                                                                                          \
                        }                                                                                              \
                        if (!full || chi - clo < 4) { /* a row at a time */                                            \
                            for (int64_t r = 0; r < G; r++)                                                            \
                                if (x1[r] > x0[r] && share[g0 + r])                                                    \
                                    weigh_values_##SUF(dqr[r], DS + (g0 + r) * lds + x0[r] - a0, x1[r] - x0[r],        \
                                               k + x0[r] * st[5], st[5], D);                                           \
                            continue;                                                                                  \
                        }                                                                                              \
                        for (int64_t r = 0; r < 4; r++) {                                                              \
                            T *sr = DS + (g0 + r) * lds - a0;                                                          \
                            weigh_values_##SUF(dqr[r], sr + x0[r], clo - x0[r], k + x0[r] * st[5], st[5], D);          \
                            ps[r] = sr + clo;                                                                          \
                        }                                                                                              \
                        pv4_##SUF(dqr, (const T *const *)ps, 1, k + clo * st[5], st[5], chi - clo, D);                 \
                        for (int64_t r = 0; r < 4; r++)                                                                \
                            weigh_values_##SUF(dqr[r], DS + (g0 + r) * lds + chi - a0, x1[r] - chi, k + chi * st[5],   \
                                               st[5], D);                                                              \
                    }                                                                                                  \
                    /* dk and dv of the tile's keys: the panel's rows [A, B) see key j, A the first whose keys end     \
                       after j, B the first whose keys start after it (both ends only move forward with the row) */    \
                    int64_t ra = 0, rb = 0;                                                                            \
                    for (int64_t j = ta; j < t1; j += 4) {                                                             \
                        const int64_t nk = t1 - j < 4 ? t1 - j : 4;                                                    \
                        int64_t A[4], B[4];                                                                            \
                        for (int64_t c = 0; c < nk; c++) {                                                             \
                            while (ra < pn && rhi[ra] <= j + c) ra++;                                                  \
                            while (rb < pn && rlo[rb] <= j + c) rb++;                                                  \
                            A[c] = ra, B[c] = rb;                                                                      \
                        }                                                                                              \
                        const int64_t col = j - a0;                                                                    \
                        if (nk == 4 && B[0] - A[3] >= 4) { /* rows A[3] .. B[0] see all four keys */                   \
                            T *yk[4], *yv[4];                                                                          \
                            const T *wk[4], *wv[4];                                                                    \
                            for (int64_t c = 0; c < 4; c++) {                                                          \
                                yk[c] = dk + (j + c) * D, yv[c] = dv + (j + c) * Dv;                                   \
                                for (int64_t w = A[c]; w < A[3]; w++) {                                                \
                                    axpy_##SUF(yk[c], DS[w * lds + col + c], Qp + w * D, D);                           \
                                    axpy_##SUF(yv[c], PP[w * lds + col + c], dOp + w * Dv, Dv);                        \
                                }                                                                                      \
                                wk[c] = DS + A[3] * lds + col + c, wv[c] = PP + A[3] * lds + col + c;                  \
                            }                                                                                          \
                            pv4_##SUF(yk, wk, lds, Qp + A[3] * D, D, B[0] - A[3], D);                                  \
                            pv4_##SUF(yv, wv, lds, dOp + A[3] * Dv, Dv, B[0] - A[3], Dv);                              \
                            for (int64_t c = 0; c < 4; c++)                                                            \
                                for (int64_t w = B[0]; w < B[c]; w++) {                                                \
                                    axpy_##SUF(yk[c], DS[w * lds + col + c], Qp + w * D, D);                           \
                                    axpy_##SUF(yv[c], PP[w * lds + col + c], dOp + w * Dv, Dv);                        \
                                }                                                                                      \
                            continue;                                                                                  \
                        }                                                                                              \
                        for (int64_t c = 0; c < nk; c++)                                                               \
                            for (int64_t w = A[c]; w < B[c]; w++) {                                                    \
                                axpy_##SUF(dk + (j + c) * D, DS[w * lds + col + c], Qp + w * D, D);                    \
                                axpy_##SUF(dv + (j + c) * Dv, PP[w * lds + col + c], dOp + w * Dv, Dv);                \
                            }                                                                                          \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        return 0;                                                                                                      \
    }                                                                                                                  \
    /* dk and dv of the keys of a segment of at most SMALL_KEYS keys from a chunk of its rows r0 .. r0 + n (query      \
       rows of head hd; their P and dS in rows of P and S, ps apart, indexed by key; [rlo, rhi): a row's keys, empty   \
       for a row that adds to none), key-major: four keys at a time, each run of consecutive rows that see all four    \
       through pv4 (each key element loaded and stored once a run, where a key took a load-add-store of its dk and dv  \
       rows for every pair), a row that sees some of the four key by key. A row adds to exactly the keys it sees, each \
       key's sums in row order. */                                                                                     \
    static void keyed_sums_##SUF(const job_t *J, const head_##SUF *hd, int64_t r0, int64_t n, const int64_t *rlo,      \
                                 const int64_t *rhi, const T *P, const T *S, int64_t ps, int64_t kl, T *dk, T *dv) {   \
        const int64_t *st = J->st, D = J->D, Dv = J->Dv;                                                               \
        for (int64_t jb = 0; jb < kl; jb += 4) {                                                                       \
            const int64_t je = jb + 4;                                                                                 \
            T *yv[4], *yk[4];                                                                                          \
            for (int c = 0; c < 4; c++) yv[c] = dv + (jb + c) * Dv, yk[c] = dk + (jb + c) * D;                         \
            int64_t run = -1; /* the first row of the current run of rows that see all four keys (-1: none) */         \
            for (int64_t r = 0; r <= n; r++) {                                                                         \
                const int full = r < n && rlo[r] <= jb && rhi[r] >= je;                                                \
                if (run >= 0 && !full) { /* the run r_run .. r - 1 */                                                  \
                    const T *pv[4], *pk[4];                                                                            \
                    for (int c = 0; c < 4; c++) pv[c] = P + run * ps + jb + c, pk[c] = S + run * ps + jb + c;          \
                    pv4_##SUF(yv, pv, ps, hd->dO + (r0 + run) * st[14], st[14], r - run, Dv);                          \
                    pv4_##SUF(yk, pk, ps, hd->q + (r0 + run) * st[2], st[2], r - run, D);                              \
                    run = -1;                                                                                          \
                }                                                                                                      \
                if (r == n) break;                                                                                     \
                if (full) {                                                                                            \
                    if (run < 0) run = r;                                                                              \
                    continue;                                                                                          \
                }                                                                                                      \
                const int64_t a = rlo[r] > jb ? rlo[r] : jb, z = rhi[r] < je ? rhi[r] : je;                            \
                for (int64_t j = a; j < z; j++) {                                                                      \
                    axpy_##SUF(dv + j * Dv, P[r * ps + j], hd->dO + (r0 + r) * st[14], Dv);                            \
                    axpy_##SUF(dk + j * D, S[r * ps + j], hd->q + (r0 + r) * st[2], D);                                \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
    static int backward_item_##SUF(const job_t *J, int64_t item, T *s, T *dp, scratch_t *X) {                          \
        if (J->segs[6 * (item / J->Hkv) + 4] >= J->block_keys) return backward_block_##SUF(J, item, X);                \
        const int64_t *st = J->st, *g = J->segs + 6 * (item / J->Hkv);                                                 \
        int64_t kvh = item % J->Hkv, rep = J->H / J->Hkv, D = J->D, Dv = J->Dv, K = st[15];                            \
        int64_t b = g[0], ql = g[2], ks = g[3], kl = g[4], off = g[5];                                                 \
        const T *k = (const T *)J->k + b * st[3] + kvh * st[4] + ks * st[5];                                           \
        const T *v = (const T *)J->v + b * st[6] + kvh * st[7] + ks * st[8];                                           \
        T *dk = (T *)J->dk + ((b * J->Hkv + kvh) * K + ks) * D;                                                        \
        T *dv = (T *)J->dv + ((b * J->Hkv + kvh) * K + ks) * Dv;                                                       \
        const T scale = (T)J->scale, cap = (T)J->softcap, inv_cap = J->softcap > 0 ? (T)(1 / J->softcap) : 0;          \
        /* a segment of at most SMALL_KEYS keys keeps its rows' P and dS a chunk of SMALL_ROWS rows at a time for      \
           keyed_sums; a longer one adds each pair into dk and dv as it goes */                                        \
        const int keyed = kl <= SMALL_KEYS;                                                                            \
        const int64_t ps = keyed ? (kl + LANES(T) - 1) / LANES(T) * LANES(T) : 0, chunk = keyed ? SMALL_ROWS : 1;      \
        int64_t rlo[SMALL_ROWS], rhi[SMALL_ROWS];                                                                      \
        T *P = s, *S = dp;                                                                                             \
        if (keyed) {                                                                                                   \
            P = (T *)grow(&X->s4, &X->s4_size, sizeof(T) * 2 * SMALL_ROWS * ps);                                       \
            if (!P) return 1;                                                                                          \
            S = P + SMALL_ROWS * ps;                                                                                   \
        }                                                                                                              \
        for (int64_t h = kvh * rep; h < (kvh + 1) * rep; h++) {                                                        \
            const head_##SUF hd = head_rows_##SUF(J, g, h);                                                            \
            const T slope = hd.slope, *q = hd.q, *o = hd.o, *dO = hd.dO, *lse = hd.lse;                                \
            T *dq = hd.dq;                                                                                             \
            for (int64_t i0 = 0; i0 < ql; i0 += chunk) {                                                               \
                const int64_t n = ql - i0 < chunk ? ql - i0 : chunk;                                                   \
                for (int64_t r = 0; r < n; r++) {                                                                      \
                    const int64_t i = i0 + r;                                                                          \
                    int64_t lo, hi;                                                                                    \
                    if (i + PREFETCH_ROWS < ql) /* a later row's q, out and dO, whose first reads waited on memory */  \
                        for (int64_t d = 0; d < D || d < Dv; d += LANES(T)) {                                          \
                            __builtin_prefetch(q + (i + PREFETCH_ROWS) * st[2] + d);                                   \
                            __builtin_prefetch(o + (i + PREFETCH_ROWS) * st[11] + d);                                  \
                            __builtin_prefetch(dO + (i + PREFETCH_ROWS) * st[14] + d);                                 \
                        }                                                                                              \
                    key_range(J, i, off, kl, &lo, &hi);                                                                \
                    rlo[r] = rhi[r] = 0; /* a row that adds to no key */                                               \
                    if (hi <= lo || isinf(lse[i])) continue;                                                           \
                    rlo[r] = lo, rhi[r] = hi;                                                                          \
                    T *si = P + r * ps, *dpi = S + r * ps;                                                             \
                    const T *qi = q + i * st[2], *doi = dO + i * st[14];                                               \
                    T di = dot_##SUF(doi, o + i * st[11], Dv), *dqi = dq + i * D;                                      \
                    int64_t j = lo;                                                                                    \
                    for (; j + 4 <= hi; j += 4) {                                                                      \
                        dot4_##SUF(qi, k + j * st[5], st[5], D, si + j);                                               \
                        dot4_##SUF(doi, v + j * st[8], st[8], Dv, dpi + j);                                            \
                    }                                                                                                  \
                    for (; j < hi; j++) {                                                                              \
                        si[j] = dot_##SUF(qi, k + j * st[5], D);                                                       \
                        dpi[j] = dot_##SUF(doi, v + j * st[8], Dv);                                                    \
                    }                                                                                                  \
                    const T lse_i = lse[i];                                                                            \
                    const int64_t a = i + off;                                                                         \
                    if (cap > 0) { /* d(c tanh(x / c)) / dx = 1 - tanh^2, folded into dP - di */                       \
                        _Pragma("omp simd") for (j = lo; j < hi; j++) {                                                \
                            T t = TANH(scale * si[j] * inv_cap);                                                       \
                            si[j] = EXP(cap * t + slope * (T)(j - a) - lse_i); /* P */                                 \
                            dpi[j] = (dpi[j] - di) * (1 - t * t);                                                      \
                        }                                                                                              \
                    } else {                                                                                           \
                        _Pragma("omp simd") for (j = lo; j < hi; j++) {                                                \
                            si[j] = EXP(scale * si[j] + slope * (T)(j - a) - lse_i); /* P */                           \
                            dpi[j] -= di;                                                                              \
                        }                                                                                              \
                    }                                                                                                  \
                    if (keyed) {                                                                                       \
                        _Pragma("omp simd") for (j = lo; j < hi; j++) dpi[j] = si[j] * dpi[j] * scale; /* dS */        \
                        weigh_values_##SUF(dqi, dpi + lo, hi - lo, k + lo * st[5], st[5], D);                          \
                        continue;                                                                                      \
                    }                                                                                                  \
                    for (j = lo; j < hi; j++) {                                                                        \
                        axpy_##SUF(dv + j * Dv, si[j], doi, Dv);                                                       \
                        si[j] = si[j] * dpi[j] * scale; /* dS */                                                       \
                        axpy_##SUF(dk + j * D, si[j], qi, D);                                                          \
                    }                                                                                                  \
                    weigh_values_##SUF(dqi, si + lo, hi - lo, k + lo * st[5], st[5], D);                               \
                }                                                                                                      \
                if (keyed) keyed_sums_##SUF(J, &hd, i0, n, rlo, rhi, P, S, ps, kl, dk, dv);                            \
            }                                                                                                          \
        }                                                                                                              \
        return 0;                                                                                                      \
    }                                                                                                                  \
    DEFINE_WORKER(T, SUF, backward_item_##SUF, T)

DEFINE_KERNELS(float, f32, exp_f32, logf, tanh_f32)
DEFINE_KERNELS(double, f64, exp, log, tanh)
DEFINE_FORWARD(float, bf16, uint16_t, bf16_f32, exp_f32, logf, tanh_f32, f32)
/* The backward of bfloat16 inputs read as stored (dtype_bits 16, backward = 1: q, k, v and dout in bfloat16, out and
 * lse in float32, dq, dk and dv written in bfloat16, rounded to nearest even as torch rounds them). An item's keys and
 * values are widened to float32 in the thread's scratch once, and each of its query heads' q and dO rows WIDEN_ROWS
 * at a time (the blocked form's panel); the float32 backward item (row form or blocked form) runs on them as a
 * segment of its own, a head and a chunk of rows at a time; its gradients, summed in float32 scratch, are rounded
 * once into the item's rows, which it owns: the caller passes segments that share no key, each of at most
 * WIDEN_MAX_KEYS keys (attnmask_segattn checks both). The float32 copies' backward's arithmetic, bit for bit (each
 * pair's products and each sum in the same order, grouped heads included), without the five conversions of the
 * inputs and three of the gradients around it (RESULTS.md, issue 15, "bfloat16 training read as stored"). Scratch
 * per thread: the item's keys x 2 (D + Dv) and WIDEN_ROWS x (2 D + Dv + 1) floats. */
static int backward_item_bf16(const job_t *J, int64_t item, float *s, float *dp, scratch_t *X) {
    const int64_t *st = J->st, *g = J->segs + 6 * (item / J->Hkv);
    const int64_t kvh = item % J->Hkv, rep = J->H / J->Hkv, D = J->D, Dv = J->Dv, K = st[15];
    const int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];
    const int64_t rows = ql < WIDEN_ROWS ? ql : WIDEN_ROWS; /* the query rows in scratch */
    float *kw = (float *)grow(&X->wk, &X->wk_size, sizeof(float) * (size_t)(kl * 2 * (D + Dv)));
    float *qw = (float *)grow(&X->wq, &X->wq_size, sizeof(float) * (size_t)(rows * (2 * D + Dv + 1)));
    if (!kw || !qw) return 1;
    float *vw = kw + kl * D, *dkw = vw + kl * Dv, *dvw = dkw + kl * D; /* dk and dv together, zeroed at once */
    float *dow = qw + rows * D, *dqw = dow + rows * Dv, *lw = dqw + rows * D;
    const uint16_t *k = (const uint16_t *)J->k + b * st[3] + kvh * st[4] + ks * st[5];
    const uint16_t *v = (const uint16_t *)J->v + b * st[6] + kvh * st[7] + ks * st[8];
    for (int64_t j = 0; j < kl; j++) {
        row_bf16(k + j * st[5], kw + j * D, D);
        row_bf16(v + j * st[8], vw + j * Dv, Dv);
    }
    memset(dkw, 0, sizeof(float) * (size_t)(kl * (D + Dv)));
    /* a head's chunk of rows as a job of its own: one segment (row 0, its queries and keys from 0) of one head; the
       heads outermost and each head's rows in order, as the float32 item sums them into dk and dv */
    const int64_t lst[16] = {0, 0, D, 0, 0, D, 0, 0, Dv, 0, 0, st[11], 0, 0, Dv, kl};
    int64_t seg[6] = {0, 0, 0, 0, kl, 0};
    job_t L = *J;
    L.q = qw, L.k = kw, L.v = vw, L.dout = dow, L.lse = lw, L.dq = dqw, L.dk = dkw, L.dv = dvw;
    L.st = lst, L.segs = seg, L.nseg = 1, L.H = 1, L.Hkv = 1, L.Q = rows, L.zero_grads = 0;
    for (int64_t h = kvh * rep; h < (kvh + 1) * rep; h++) {
        L.slopes = J->slopes ? (const float *)J->slopes + h : NULL;
        for (int64_t c0 = 0; c0 < ql; c0 += WIDEN_ROWS) {
            const int64_t c = ql - c0 < WIDEN_ROWS ? ql - c0 : WIDEN_ROWS, at = qs + c0;
            const uint16_t *q = (const uint16_t *)J->q + b * st[0] + h * st[1] + at * st[2];
            const uint16_t *dO = (const uint16_t *)J->dout + b * st[12] + h * st[13] + at * st[14];
            const float *lse = (const float *)J->lse + (b * J->H + h) * J->Q + at;
            for (int64_t i = 0; i < c; i++) {
                row_bf16(q + i * st[2], qw + i * D, D);
                row_bf16(dO + i * st[14], dow + i * Dv, Dv);
                lw[i] = lse[i];
            }
            memset(dqw, 0, sizeof(float) * (size_t)(c * D));
            L.res = (float *)J->res + b * st[9] + h * st[10] + at * st[11];
            seg[2] = c, seg[5] = off + c0;
            if (backward_item_f32(&L, 0, s, dp, X)) return 1;
            put_bf16((uint16_t *)J->dq + ((b * J->H + h) * J->Q + at) * D, dqw, c * D);
        }
    }
    put_bf16((uint16_t *)J->dk + ((b * J->Hkv + kvh) * K + ks) * D, dkw, kl * D);
    put_bf16((uint16_t *)J->dv + ((b * J->Hkv + kvh) * K + ks) * Dv, dvw, kl * Dv);
    return 0;
}
DEFINE_WORKER(float, bf16, backward_item_bf16, uint16_t)

/* The bfloat16 forward on AMX tiles (dtype_bits 17: CPUs with AMX-BF16, built with -march=native there; Linux, which
 * must grant the process the tiles' state first: attnmask_amx_ready). q, k and v are read as stored; out and lse are
 * float32 (dtype_bits 18: out in bfloat16, rounded to nearest even, as the row form then writes it too). An item's
 * segment of at least block_keys keys (the blocked form's ground) takes the tiles; any other item takes the bfloat16
 * forward above, as does one with score modifiers, or D not a multiple of 32 or Dv not of 16. A value that is not
 * finite goes into the tiles as 0 (a tile multiplies every value of its keys, and 0 times an infinite or NaN value of
 * a key a row may not see would reach that row) and each row that sees one is computed again by the row form, which
 * multiplies it as it is.
 *
 * Transposed, so that the softmax runs across the rows, one vector lane per query row, with no sum across lanes:
 * per block of 16 query rows and step of AMX_STEP keys, S^T = k . q^T in two tiles (16 keys x 16 rows, float32 sums of
 * exact bfloat16 products), each key's scores one vector; the scores outside a row's keys -inf; a step of each row's
 * online softmax (max, sum, and the weighted values rescaled when the max moves: AMX_SLACK); the weights rounded to
 * bfloat16 (to nearest even, as torch's bfloat16 kernels round theirs) into P^T with each two keys' weights
 * interleaved, and O^T += v^T . P^T, 16 value elements x 16 rows a tile, held in tiles across the steps (over four
 * tiles' worth, Dv > 64: AMX_GROUP). An item's keys are copied once (k as stored, from the first multiple of
 * AMX_STEP of the segment's keys at or before its first row's first key; v transposed into 16 x 32 blocks); a
 * block's q once (transposed by pairs of elements). A block walks its rows' keys AMX_STEP at a time from multiples of
 * AMX_STEP. A row's keys and steps do not depend on the block or thread that holds it, but when its tile sums are
 * added into float32 memory does (a rescale any row of its block needs), so threads that cut a segment differently
 * agree to float32 rounding, not bit for bit. Scratch per thread: the item's keys x (D + Dv) bfloat16, and a block's
 * 16 x (D / 2 + 2 Dv + (AMX_GROUP + 2) AMX_STEP / 2 + 2) words. */
/* (AVX512-BF16 converts the weights: every CPU with AMX-BF16 has it, but a compiler or VM may hide one without the
   other, and the kernel must build either way.) */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BF16__) &&               \
    defined(__linux__)
#define AMX_BUILT 1
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_STEP 32
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config_t;

/* Every tile 16 rows of 64 bytes (32 bfloat16 or 16 float32 a row). */
static void amx_configure(void) {
    amx_config_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

/* exp_f32 on 16 lanes, the same steps, in the lanes of `keep` (0 in the others, and where x < -87). No clamp at 88:
   every x here is at most AMX_SLACK (a weight's score minus its row's max) or below 0 (a rescale); a NaN stays NaN. */
static inline __m512 exp16(__m512 x, __mmask16 keep) {
    const __m512 shift = _mm512_set1_ps(12582912.0f);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift);
    const __m512 n = _mm512_sub_ps(t, shift);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    return _mm512_maskz_mul_ps(keep & (__mmask16)~low, p, _mm512_castsi512_ps(bits));
}

/* exp16 for weights rounded to bfloat16 next (8 bits): one constant for ln 2 (|n| <= 126: under 3e-7 of error) and
   a degree-4 polynomial on [-ln 2 / 2, ln 2 / 2] (fitted to the least largest relative error: under 3e-6, where
   bfloat16's rounding is up to 2e-3). Four instructions fewer than exp16 on every pair; the same lanes and limits. */
static inline __m512 exp16_weight(__m512 x, __mmask16 keep) {
    const __m512 shift = _mm512_set1_ps(12582912.0f);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift);
    const __m512 n = _mm512_sub_ps(t, shift);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182f), x);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0414841175f), r, _mm512_set1_ps(0.167910516f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.500040591f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999963284f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999285f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    return _mm512_maskz_mul_ps(keep & (__mmask16)~low, p, _mm512_castsi512_ps(bits));
}

/* v rows [0, n) (src apart, Dv elements) into blocks of AMX_STEP keys x 16 elements, transposed: step p, chunk e
   (elements 16e ..) at vt + (p * Dv / 16 + e) * 512, its row d the step's keys' element 16e + d; keys past n zero up
   to np steps. Two keys' elements interleaved into words, then 16 x 16 words transposed (transpose16: bits as they
   are). With `bad`, a value that is not finite (its exponent all ones) is written as 0 and its key counted: bad[j] is
   the number of such keys before key j (j = 0 .. n); returns their number. Without (NULL: the caller knows the rows
   finite, as the backward's k) the bits go as they are and it returns 0. */
static int64_t amx_values(uint16_t *restrict vt, const uint16_t *restrict v, int64_t src, int64_t n, int64_t np,
                          int64_t Dv, int32_t *restrict bad) {
    const int64_t chunks = Dv / 16;
    const __m512i low = _mm512_set1_epi32(0x7f80), high = _mm512_set1_epi32(0x7f800000);
    const __m512i keep_low = _mm512_set1_epi32(0xffff), keep_high = _mm512_set1_epi32((int)0xffff0000u);
    int64_t count = 0;
    if (bad) /* first the bad keys themselves, then their running count */
        for (int64_t j = 0; j <= n; j++) bad[j] = 0;
    for (int64_t p = 0; p < np; p++)
        for (int64_t e = 0; e < chunks; e++) {
            vec_float rows[16];
            for (int64_t r = 0; r < 16; r++) {
                const int64_t k0 = p * AMX_STEP + 2 * r;
                const uint16_t *x0 = v + k0 * src + 16 * e, *x1 = x0 + src;
                const __m256i zero = _mm256_setzero_si256();
                const __m256i a = k0 < n ? _mm256_loadu_si256((const void *)x0) : zero;
                const __m256i c = k0 + 1 < n ? _mm256_loadu_si256((const void *)x1) : zero;
                __m512i x = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(c), 16));
                const __mmask16 bad0 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, low), low);
                const __mmask16 bad1 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, high), high);
                if (bad && (bad0 | bad1)) {
                    x = _mm512_mask_and_epi32(x, bad0, x, keep_high);
                    x = _mm512_mask_and_epi32(x, bad1, x, keep_low);
                    if (bad0) bad[k0] = 1;
                    if (bad1) bad[k0 + 1] = 1;
                }
                memcpy(&rows[r], &x, sizeof x);
            }
            transpose16((float *)(void *)(vt + (p * chunks + e) * 512), rows);
        }
    if (!bad) return 0;
    for (int64_t j = 0; j < n; j++) { /* running count: keys [a, b) hold bad[b] - bad[a] of them */
        const int32_t here = bad[j];
        bad[j] = (int32_t)count;
        count += here;
    }
    bad[n] = (int32_t)count;
    return count;
}

/* 32 weights (keys 2r and 2r + 1 of each row: e0, e1) as bfloat16 pairs, lane m row m's (low: key 2r). */
static inline __m512i pairs16(__m512 e0, __m512 e1) { /* rounded to nearest even */
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
}

/* The block's weighted values so far (tiles 4 .. 4 + n - 1, 16 elements x 16 rows each) added into O^T, all of it
   then times alpha (one lane per row); the tiles zeroed. */
static inline void amx_flush(float *restrict OT, float *restrict CT, int64_t n, __m512 alpha) {
    _tile_stored(4, CT, 64);
    if (n > 1) _tile_stored(5, CT + 256, 64);
    if (n > 2) _tile_stored(6, CT + 512, 64);
    if (n > 3) _tile_stored(7, CT + 768, 64);
    for (int64_t d = 0; d < 16 * n; d++) {
        const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(OT + 16 * d), _mm512_loadu_ps(CT + 16 * d));
        _mm512_storeu_ps(OT + 16 * d, _mm512_mul_ps(sum, alpha));
    }
    _tile_zero(4);
    if (n > 1) _tile_zero(5);
    if (n > 2) _tile_zero(6);
    if (n > 3) _tile_zero(7);
}

/* v^T . P^T for value chunks e .. e + n - 1 (n <= 4) into tiles 4 .. 4 + n - 1 (P^T in tile 0). */
static inline void amx_weigh(const uint16_t *vs, int64_t e, int64_t n) {
    _tile_loadd(1, vs + e * 512, 64);
    _tile_dpbf16ps(4, 1, 0);
    if (n > 1) {
        _tile_loadd(2, vs + (e + 1) * 512, 64);
        _tile_dpbf16ps(5, 2, 0);
    }
    if (n > 2) {
        _tile_loadd(3, vs + (e + 2) * 512, 64);
        _tile_dpbf16ps(6, 3, 0);
    }
    if (n > 3) {
        _tile_loadd(1, vs + (e + 3) * 512, 64);
        _tile_dpbf16ps(7, 1, 0);
    }
}

/* S^T of the 32 rows from x (`width` bfloat16 each, contiguous: keys, or values) against a block's 16 rows given by
   pairs of elements (XT, as amx_pairs_t writes them), over chunks of 32 elements, into S (32 vectors of 16). */
static inline void amx_scores(float *S, const uint32_t *XT, const uint16_t *x, int64_t width) {
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < width / 32; c++) {
        _tile_loadd(0, XT + c * 256, 64);
        _tile_loadd(1, x + 32 * c, width * 2);
        _tile_dpbf16ps(2, 1, 0);
        _tile_loadd(1, x + 16 * width + 32 * c, width * 2);
        _tile_dpbf16ps(3, 1, 0);
    }
    _tile_stored(2, S, 64);
    _tile_stored(3, S + 256, 64);
}

/* Rows x[0 .. 16) (ld apart; those at or past n zero) transposed by pairs of elements: chunk c (elements 32c ..) at
   out + c * 256 words, its row r the rows' elements 2r, 2r + 1 (one word a row): the B operand of k . x^T. */
static void amx_pairs_t(uint32_t *restrict out, const uint16_t *x, int64_t ld, int64_t n, int64_t width) {
    for (int64_t c = 0; c < width / 32; c++) {
        vec_float rows[16];
        for (int64_t r = 0; r < 16; r++) {
            if (r < n)
                memcpy(&rows[r], x + r * ld + 32 * c, 64);
            else
                memset(&rows[r], 0, 64);
        }
        transpose16((float *)(void *)(out + c * 256), rows);
    }
}

/* A row's running max is moved only when a step's max passes it by more than AMX_SLACK (the weights exp(s - max) then
   stay below e^8, which float32 sums and bfloat16 hold with the same relative rounding): the weighted values, which
   the tiles hold across steps, are rescaled only then, not at almost every step (16 rows a block, each growing its
   max about ln(steps) times). The log-sum-exp is max + log(sum) whichever max the row keeps. */
#define AMX_SLACK 8.0f
/* With Dv over 64 the weighted values take more than the four tiles there are: a block's steps go in groups of
   AMX_GROUP, each group's softmax weighs the first four chunks of 16 value elements (their sums in the tiles across the
   group), and the group's weights (P^T) and rescales, kept, weigh each next four chunks in turn, their sums moved to
   memory once a group, not once a step. */
#define AMX_GROUP 8

static int forward_item_amx(const job_t *J, int64_t item, float *s, float *qrow, scratch_t *X) {
    const int64_t *st = J->st, *g = J->segs + 6 * (item % J->nseg);
    const int64_t h = item / J->nseg, kvh = h / (J->H / J->Hkv), D = J->D, Dv = J->Dv;
    const int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];
    if (ql <= 0) return 0;
    if (kl <= 0) { /* a query range in no segment: its rows 0 and lse -inf, as the row form writes a row with no key */
        float *lse0 = (float *)J->lse + (b * J->H + h) * J->Q + qs;
        for (int64_t i = 0; i < ql; i++) {
            const int64_t at = b * st[9] + h * st[10] + (qs + i) * st[11];
            if (J->out_bf16)
                memset((uint16_t *)J->res + at, 0, sizeof(uint16_t) * Dv);
            else
                memset((float *)J->res + at, 0, sizeof(float) * Dv);
            lse0[i] = -INFINITY;
        }
        return 0;
    }
    if (kl < J->block_keys || D % 32 || Dv % 16 || kl >= (1LL << 30) || !(J->scale > 0) || J->softcap > 0 ||
        J->slopes || J->sinks)
        return forward_item_bf16(J, item, s, qrow, X); /* the row form, its output as the tiles' */
    const uint16_t *q = (const uint16_t *)J->q + b * st[0] + h * st[1] + qs * st[2];
    const uint16_t *k = (const uint16_t *)J->k + b * st[3] + kvh * st[4] + ks * st[5];
    const uint16_t *v = (const uint16_t *)J->v + b * st[6] + kvh * st[7] + ks * st[8];
    float *o = J->out_bf16 ? NULL : (float *)J->res + b * st[9] + h * st[10] + qs * st[11];
    uint16_t *ob = J->out_bf16 ? (uint16_t *)J->res + b * st[9] + h * st[10] + qs * st[11] : NULL;
    float *lse = (float *)J->lse + (b * J->H + h) * J->Q + qs;
    int64_t klo, khi, lo, hi;
    key_range(J, 0, off, kl, &klo, &hi);
    key_range(J, ql - 1, off, kl, &lo, &khi);
    const int64_t k0 = klo / AMX_STEP * AMX_STEP; /* the copies' first key */
    const int64_t n = khi > k0 ? khi - k0 : 0, steps = (n + AMX_STEP - 1) / AMX_STEP, keys = steps * AMX_STEP;
    const int64_t chunks = D / 32, vchunks = Dv / 16, resident = vchunks <= 4, lead = resident ? vchunks : 4;
    uint16_t *kc = (uint16_t *)grow(&X->kt, &X->kt_size, sizeof(uint16_t) * (keys * D + 1));
    uint16_t *vt = (uint16_t *)grow(&X->vt, &X->vt_size, sizeof(uint16_t) * (keys * Dv + 1));
    /* q^T by pairs (chunks x 256 words), O^T and the products (Dv x 16 each), max, sum, S^T (AMX_STEP x 16), P^T
       of a group's steps (AMX_GROUP x AMX_STEP / 2 x 16 words) */
    const int64_t words = chunks * 256 + 2 * Dv * 16 + 32 + AMX_STEP * 16 + AMX_GROUP * AMX_STEP * 8;
    uint32_t *W = (uint32_t *)grow(&X->p4, &X->p4_size, sizeof(uint32_t) * words);
    int32_t *bad = (int32_t *)grow(&X->rows, &X->rows_size, sizeof(int32_t) * (n + 1));
    if (!kc || !vt || !W || !bad) return 1;
    /* values that are not finite go in as 0, so that no row reads them through a weight of 0; a row that sees one
       is computed again below by the row form, which multiplies them as they are (NaN or infinite results, as on
       every path) */
    const int64_t poisoned = amx_values(vt, v + k0 * st[8], st[8], n, steps, Dv, bad);
    for (int64_t j = 0; j < keys; j++) {
        if (j < n)
            memcpy(kc + j * D, k + (k0 + j) * st[5], sizeof(uint16_t) * D);
        else
            memset(kc + j * D, 0, sizeof(uint16_t) * D);
    }
    uint32_t *QT = W;
    float *OT = (float *)(W + chunks * 256), *CT = OT + Dv * 16, *M = CT + Dv * 16, *L = M + 16, *ST = L + 16;
    uint32_t *PTs = (uint32_t *)(ST + AMX_STEP * 16);
    const __m512 scale = _mm512_set1_ps((float)J->scale), ninf = _mm512_set1_ps(-INFINITY), one = _mm512_set1_ps(1);
    const float mod[6] = {(float)J->scale, 0, 0, 0, 0, 0}; /* the row form's: the scale, no modifier */
    amx_configure();
    for (int64_t i0 = 0; i0 < ql; i0 += 16) {
        int32_t LO[16], HI[16];
        int64_t span0 = khi, span1 = k0;
        for (int64_t r = 0; r < 16; r++) {
            int64_t a = 0, z = 0;
            if (i0 + r < ql) key_range(J, i0 + r, off, kl, &a, &z);
            if (z <= a)
                a = z = k0;
            else
                span0 = a < span0 ? a : span0, span1 = z > span1 ? z : span1;
            LO[r] = (int32_t)(a - k0), HI[r] = (int32_t)(z - k0);
        }
        amx_pairs_t(QT, q + i0 * st[2], st[2], ql - i0, D); /* q^T by pairs of elements */
        for (int64_t d = 0; d < Dv * 16; d++) OT[d] = 0;
        __m512 m = ninf, l = _mm512_setzero_ps();
        const __m512i lov = _mm512_loadu_si512(LO), hiv = _mm512_loadu_si512(HI);
        _tile_zero(4);
        if (lead > 1) _tile_zero(5);
        if (lead > 2) _tile_zero(6);
        if (lead > 3) _tile_zero(7);
        for (int64_t g0 = span0 / AMX_STEP * AMX_STEP; g0 < span1; g0 += AMX_GROUP * AMX_STEP) {
            const int64_t g1 = g0 + AMX_GROUP * AMX_STEP < span1 ? g0 + AMX_GROUP * AMX_STEP : span1;
            __m512 rescale[AMX_GROUP]; /* the group's steps' rescales, for the later chunks */
            __mmask16 grown[AMX_GROUP];
            for (int64_t j0 = g0; j0 < g1; j0 += AMX_STEP) {
                const int64_t rel = j0 - k0, step = (j0 - g0) / AMX_STEP;
                uint32_t *PT = PTs + step * AMX_STEP * 8;
                grown[step] = 0;
                amx_scores(ST, QT, kc + rel * D, D); /* S^T: the step's 32 keys against the block's rows */
                /* one lane per row: the keys each row sees, and the step's largest score among them */
                __mmask16 seen[AMX_STEP];
                __m512 raw = ninf;
                const __m512i first = _mm512_set1_epi32((int32_t)rel);
                const __m512i end = _mm512_set1_epi32((int32_t)(rel + AMX_STEP));
                const __mmask16 whole =
                    _mm512_cmp_epi32_mask(lov, first, _MM_CMPINT_LE) & _mm512_cmp_epi32_mask(hiv, end, _MM_CMPINT_NLT);
                if (whole == 0xffff) {
                    for (int64_t j = 0; j < AMX_STEP; j++) {
                        seen[j] = 0xffff;
                        raw = _mm512_max_ps(raw, _mm512_loadu_ps(ST + 16 * j));
                    }
                } else {
                    for (int64_t j = 0; j < AMX_STEP; j++) {
                        const __m512i key = _mm512_set1_epi32((int32_t)(rel + j));
                        seen[j] = _mm512_cmp_epi32_mask(lov, key, _MM_CMPINT_LE) &
                                  _mm512_cmp_epi32_mask(hiv, key, _MM_CMPINT_NLE);
                        raw = _mm512_mask_max_ps(raw, seen[j], raw, _mm512_loadu_ps(ST + 16 * j));
                    }
                }
                /* a row's max moves when the step's passes it by AMX_SLACK (never for a NaN score, its weight NaN) */
                const __m512 top = _mm512_mul_ps(raw, scale);
                const __mmask16 grew = _mm512_cmp_ps_mask(top, _mm512_add_ps(m, _mm512_set1_ps(AMX_SLACK)), _CMP_GT_OQ);
                if (grew) {
                    const __m512 moved = _mm512_mask_mov_ps(m, grew, top);
                    const __m512 alpha = _mm512_mask_blend_ps(grew, one, exp16(_mm512_sub_ps(m, moved), grew));
                    amx_flush(OT, CT, lead, alpha);
                    rescale[step] = alpha, grown[step] = grew;
                    l = _mm512_mul_ps(l, alpha);
                    m = moved;
                }
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < AMX_STEP; j += 2) {
                    if (!(seen[j] | seen[j + 1])) { /* two keys no row of the block sees (a window or diagonal edge) */
                        _mm512_storeu_si512(PT + 8 * j, _mm512_setzero_si512());
                        continue;
                    }
                    const __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(ST + 16 * j), scale, m);
                    const __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(ST + 16 * j + 16), scale, m);
                    const __m512 e0 = exp16_weight(x0, seen[j]), e1 = exp16_weight(x1, seen[j + 1]);
                    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                    _mm512_storeu_si512(PT + 8 * j, pairs16(e0, e1));
                }
                l = _mm512_add_ps(l, sum);
                /* O^T += v^T . P^T for the first four chunks, in the tiles across steps */
                _tile_loadd(0, PT, 64);
                amx_weigh(vt + (rel / AMX_STEP) * vchunks * 512, 0, lead);
            }
            if (!resident) { /* Dv > 64: the group's steps again for each next four chunks, from its P^T and rescales */
                amx_flush(OT, CT, lead, one);
                for (int64_t e = 4; e < vchunks; e += 4) {
                    const int64_t ne = vchunks - e < 4 ? vchunks - e : 4;
                    for (int64_t j0 = g0; j0 < g1; j0 += AMX_STEP) {
                        const int64_t step = (j0 - g0) / AMX_STEP;
                        if (grown[step]) amx_flush(OT + e * 256, CT, ne, rescale[step]); /* as the first chunks did */
                        _tile_loadd(0, PTs + step * AMX_STEP * 8, 64);
                        amx_weigh(vt + ((j0 - k0) / AMX_STEP) * vchunks * 512, e, ne);
                    }
                    amx_flush(OT + e * 256, CT, ne, one);
                }
            }
        }
        if (resident) amx_flush(OT, CT, vchunks, one);
        _mm512_storeu_ps(M, m);
        _mm512_storeu_ps(L, l);
        for (int64_t e = 0; e < vchunks; e++) { /* O^T back to rows: CT (16, Dv), 16 x 16 at a time */
            vec_float cols[16];
            float rows[256];
            memcpy(cols, OT + 256 * e, sizeof cols);
            transpose16(rows, cols);
            for (int64_t r = 0; r < 16; r++) memcpy(CT + r * Dv + 16 * e, rows + 16 * r, 64);
        }
        for (int64_t r = 0; r < 16 && i0 + r < ql; r++) {
            float *oi = ob ? CT + r * Dv : o + (i0 + r) * st[11]; /* bfloat16 out: the row in float32 first */
            if (HI[r] <= LO[r]) { /* no allowed key: exactly 0, and the backward skips the row */
                for (int64_t d = 0; d < Dv; d++) oi[d] = 0;
                lse[i0 + r] = -INFINITY;
            } else if (poisoned && bad[HI[r]] > bad[LO[r]]) { /* the row sees a value that is not finite */
                const int64_t i = i0 + r, a = LO[r] + k0, z = HI[r] + k0;
                const float *qi = row_bf16(q + i * st[2], qrow, D);
                int64_t j = a;
                for (; j + 4 <= z; j += 4) dot4_bf16(qi, k + j * st[5], st[5], D, s + j);
                for (; j < z; j++) s[j] = dot_bf16(qi, k + j * st[5], D);
                finish_row_bf16(s + a, z - a, a - i - off, v + a * st[8], st[8], Dv, oi, lse + i, mod, 0);
            } else {
                const float inv = 1 / L[r], *y = CT + r * Dv;
                _Pragma("omp simd") for (int64_t d = 0; d < Dv; d++) oi[d] = y[d] * inv;
                lse[i0 + r] = M[r] + logf(L[r]);
            }
            if (ob) /* rounded to nearest even, as torch rounds float32 to bfloat16 */
                for (int64_t d = 0; d < Dv; d += 16)
                    _mm256_storeu_si256((void *)(ob + (i0 + r) * st[11] + d),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(oi + d)));
        }
    }
    _tile_release();
    return 0;
}
/* The bfloat16 backward on AMX tiles (dtype_bits 17, backward 1): q, k, v and dout read as stored (bfloat16), out and
 * lse float32 (the forward's), dq, dk, dv float32 (zero on entry). The caller takes it only where q, k and dout are
 * finite (a tile multiplies every element of its operands, and 0 times an infinite or NaN element of a key or row
 * that may not meet would reach the other), with D and Dv multiples of 32 and no score modifier. One item is a
 * segment and key/value head (as the float32 backward's: its dk and dv rows are its own). Per query head of the group
 * and block of 16 rows, per step of AMX_STEP keys: S^T = k . q^T and dP^T = v . dO^T in tiles (one vector lane per
 * row), then per key P = exp(scale s - lse) and dS = P (dP - di) on the keys each row sees (0 elsewhere), rounded to
 * bfloat16, and three tile products: dV += P^T . dO and dK += dS^T . q on 16 keys at a time (the rows as the inner
 * dimension: tiles 6 and 7 hold 16 x 16 and 8 x (16 pairs)), dQ^T += k^T . dS^T (pairs of keys). dq and dk are
 * scaled in dS. Scratch per thread: the item's keys x (2 D + Dv) bfloat16 and a block's rows. */
static void amx_configure_backward(void) {
    amx_config_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) c.colsb[t] = 64, c.rows[t] = 16;
    c.colsb[6] = 32, c.rows[6] = 16; /* A: 16 keys x 16 rows of P^T or dS^T */
    c.colsb[7] = 64, c.rows[7] = 8;  /* B: 8 pairs of rows x 16 elements of dO or q */
    _tile_loadconfig(&c);
}

/* Rows x[0 .. 16) (ld apart, `width` bfloat16 each; those at or past n zero) by pairs of rows: chunk e (elements
   16e ..) at out + e * 128 words, its word r, d the elements d of rows 2r and 2r + 1 (low: 2r). */
static void amx_row_pairs(uint32_t *restrict out, const uint16_t *x, int64_t ld, int64_t n, int64_t width) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t e = 0; e < width / 16; e++)
        for (int64_t r = 0; r < 8; r++) {
            const __m256i a = 2 * r < n ? _mm256_loadu_si256((const void *)(x + 2 * r * ld + 16 * e)) : zero;
            const __m256i c = 2 * r + 1 < n ? _mm256_loadu_si256((const void *)(x + (2 * r + 1) * ld + 16 * e)) : zero;
            const __m512i w =
                _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(c), 16));
            _mm512_storeu_si512(out + e * 128 + r * 16, w);
        }
}

/* y (16 keys' rows, `width` float32 each, contiguous) += a . b: a the 16 keys' weights over a block's 16 rows in
   bfloat16 (16 x 16), b those rows' elements by pairs of rows (amx_row_pairs), 16 elements a tile. */
static inline void amx_add_keys(float *y, int64_t width, const uint16_t *a, const uint32_t *b) {
    _tile_loadd(6, a, 32);
    for (int64_t e = 0; e < width / 16; e++) {
        _tile_loadd(4, y + 16 * e, width * 4);
        _tile_loadd(7, b + e * 128, 64);
        _tile_dpbf16ps(4, 6, 7);
        _tile_stored(4, y + 16 * e, width * 4);
    }
}

static int backward_item_amx(const job_t *J, int64_t item, float *s, float *dp, scratch_t *X) {
    (void)s, (void)dp;
    const int64_t *st = J->st, *g = J->segs + 6 * (item / J->Hkv);
    const int64_t kvh = item % J->Hkv, rep = J->H / J->Hkv, D = J->D, Dv = J->Dv, K = st[15];
    const int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];
    if (ql <= 0) return 0;
    const uint16_t *k = (const uint16_t *)J->k + b * st[3] + kvh * st[4] + ks * st[5];
    const uint16_t *v = (const uint16_t *)J->v + b * st[6] + kvh * st[7] + ks * st[8];
    float *dk = (float *)J->dk + ((b * J->Hkv + kvh) * K + ks) * D;
    float *dv = (float *)J->dv + ((b * J->Hkv + kvh) * K + ks) * Dv;
    int64_t klo, khi, lo, hi;
    key_range(J, 0, off, kl, &klo, &hi);
    key_range(J, ql - 1, off, kl, &lo, &khi);
    const int64_t k0 = klo / AMX_STEP * AMX_STEP;
    const int64_t n = khi > k0 ? khi - k0 : 0, steps = (n + AMX_STEP - 1) / AMX_STEP, keys = steps * AMX_STEP;
    if (!n) return 0;
    const int64_t dch = D / 16;
    uint16_t *kc = (uint16_t *)grow(&X->kt, &X->kt_size, sizeof(uint16_t) * (keys * (2 * D + Dv) + 1));
    /* per block: q^T and dO^T by pairs of elements, q and dO by pairs of rows, dQ^T, lse, di, S^T, dP^T, P^T and
       dS^T in bfloat16 (keys x rows), dS^T by pairs of keys */
    const int64_t words =
        D * 8 + Dv * 8 + D * 8 + Dv * 8 + D * 16 + 32 + 2 * AMX_STEP * 16 + AMX_STEP * 16 + 256 + 16 * (D + Dv);
    uint32_t *W = (uint32_t *)grow(&X->p4, &X->p4_size, sizeof(uint32_t) * words);
    if (!kc || !W) return 1;
    uint16_t *vc = kc + keys * D, *kt = vc + keys * Dv;
    for (int64_t j = 0; j < keys; j++) {
        if (j < n) {
            memcpy(kc + j * D, k + (k0 + j) * st[5], sizeof(uint16_t) * D);
            memcpy(vc + j * Dv, v + (k0 + j) * st[8], sizeof(uint16_t) * Dv);
        } else {
            memset(kc + j * D, 0, sizeof(uint16_t) * D);
            memset(vc + j * Dv, 0, sizeof(uint16_t) * Dv);
        }
    }
    amx_values(kt, kc, D, n, steps, D, NULL); /* k^T in blocks of AMX_STEP keys x 16 elements, as v's (k is finite) */
    uint32_t *QT = W, *OT = QT + D * 8, *QV = OT + Dv * 8, *OV = QV + D * 8;
    float *DQ = (float *)(OV + Dv * 8), *LS = DQ + D * 16, *DI = LS + 16, *ST = DI + 16, *DP = ST + AMX_STEP * 16;
    uint16_t *P16 = (uint16_t *)(DP + AMX_STEP * 16), *S16 = P16 + AMX_STEP * 16;
    uint32_t *DSP = (uint32_t *)(S16 + AMX_STEP * 16);
    float *TAIL = (float *)(DSP + 256); /* 16 keys' dv and dk rows past a segment's end */
    const __m512 scale = _mm512_set1_ps((float)J->scale);
    amx_configure_backward();
    for (int64_t h = kvh * rep; h < (kvh + 1) * rep; h++) {
        const uint16_t *q = (const uint16_t *)J->q + b * st[0] + h * st[1] + qs * st[2];
        const uint16_t *dO = (const uint16_t *)J->dout + b * st[12] + h * st[13] + qs * st[14];
        const float *o = (const float *)J->res + b * st[9] + h * st[10] + qs * st[11];
        const float *lse = (const float *)J->lse + (b * J->H + h) * J->Q + qs;
        float *dq = (float *)J->dq + ((b * J->H + h) * J->Q + qs) * D;
        for (int64_t i0 = 0; i0 < ql; i0 += 16) {
            const int64_t rows = ql - i0 < 16 ? ql - i0 : 16;
            int32_t LO[16], HI[16];
            int64_t span0 = khi, span1 = k0;
            for (int64_t r = 0; r < 16; r++) {
                int64_t a = 0, z = 0;
                if (r < rows) key_range(J, i0 + r, off, kl, &a, &z);
                if (z <= a || isinf(lse[i0 + (r < rows ? r : 0)]))
                    a = z = k0; /* no share: no key, or an infinite lse */
                else
                    span0 = a < span0 ? a : span0, span1 = z > span1 ? z : span1;
                LO[r] = (int32_t)(a - k0), HI[r] = (int32_t)(z - k0);
                float di = 0;
                if (r < rows && z > a)
                    for (int64_t d = 0; d < Dv; d++)
                        di += bf16_f32(dO[(i0 + r) * st[14] + d]) * o[(i0 + r) * st[11] + d];
                DI[r] = di, LS[r] = r < rows ? lse[i0 + r] : 0;
            }
            if (span1 <= span0) continue;
            amx_pairs_t(QT, q + i0 * st[2], st[2], rows, D);
            amx_pairs_t(OT, dO + i0 * st[14], st[14], rows, Dv);
            amx_row_pairs(QV, q + i0 * st[2], st[2], rows, D);
            amx_row_pairs(OV, dO + i0 * st[14], st[14], rows, Dv);
            for (int64_t d = 0; d < D * 16; d++) DQ[d] = 0;
            const __m512i lov = _mm512_loadu_si512(LO), hiv = _mm512_loadu_si512(HI);
            const __m512 lsv = _mm512_loadu_ps(LS), div = _mm512_loadu_ps(DI);
            for (int64_t j0 = span0 / AMX_STEP * AMX_STEP; j0 < span1; j0 += AMX_STEP) {
                const int64_t rel = j0 - k0;
                amx_scores(ST, QT, kc + rel * D, D);   /* S^T, 32 keys x 16 rows */
                amx_scores(DP, OT, vc + rel * Dv, Dv); /* dP^T */
                /* P and dS on the keys each row sees, 0 elsewhere */
                __m512 ds_prev = _mm512_setzero_ps();
                for (int64_t j = 0; j < AMX_STEP; j++) {
                    const __m512i key = _mm512_set1_epi32((int32_t)(rel + j));
                    const __mmask16 seen =
                        _mm512_cmp_epi32_mask(lov, key, _MM_CMPINT_LE) &
                        _mm512_cmp_epi32_mask(hiv, key, _MM_CMPINT_NLE);
                    const __m512 p = exp16_weight(_mm512_fmsub_ps(_mm512_loadu_ps(ST + 16 * j), scale, lsv), seen);
                    const __m512 dd = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(DP + 16 * j), div), scale);
                    const __m512 ds = _mm512_maskz_mul_ps(seen, p, dd); /* scale dS: what dq and dk take */
                    _mm256_storeu_si256((void *)(P16 + 16 * j), (__m256i)_mm512_cvtneps_pbh(p));
                    _mm256_storeu_si256((void *)(S16 + 16 * j), (__m256i)_mm512_cvtneps_pbh(ds));
                    if (j & 1) _mm512_storeu_si512(DSP + 8 * (j - 1), pairs16(ds_prev, ds));
                    ds_prev = ds;
                }
                /* dV and dK of the step's keys, 16 keys x 16 elements a tile, added in memory: the item's own rows,
                   or for a last 16 keys that pass the segment's end a copy of those it has (no row of another
                   segment is touched) */
                for (int64_t half = 0; half < 2; half++) {
                    const int64_t key = k0 + rel + 16 * half, have = kl - key < 16 ? kl - key : 16;
                    if (have <= 0) break;
                    float *gv = dv + key * Dv, *gk = dk + key * D;
                    if (have < 16) {
                        memset(TAIL, 0, sizeof(float) * 16 * (D + Dv));
                        memcpy(TAIL, gv, sizeof(float) * have * Dv);
                        memcpy(TAIL + 16 * Dv, gk, sizeof(float) * have * D);
                        gv = TAIL, gk = TAIL + 16 * Dv;
                    }
                    amx_add_keys(gv, Dv, P16 + 256 * half, OV); /* dV += P^T . dO */
                    amx_add_keys(gk, D, S16 + 256 * half, QV);  /* dK += dS^T . q */
                    if (have < 16) {
                        memcpy(dv + key * Dv, TAIL, sizeof(float) * have * Dv);
                        memcpy(dk + key * D, TAIL + 16 * Dv, sizeof(float) * have * D);
                    }
                }
                /* dQ^T += k^T . dS^T */
                _tile_loadd(0, DSP, 64);
                for (int64_t e = 0; e < dch; e++) {
                    _tile_loadd(4, DQ + e * 256, 64);
                    _tile_loadd(1, kt + ((rel / AMX_STEP) * dch + e) * 512, 64);
                    _tile_dpbf16ps(4, 1, 0);
                    _tile_stored(4, DQ + e * 256, 64);
                }
            }
            for (int64_t e = 0; e < dch; e++) { /* dq rows += scale dQ^T, 16 x 16 at a time */
                vec_float cols[16];
                float out[256];
                memcpy(cols, DQ + 256 * e, sizeof cols);
                transpose16(out, cols);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t d = 0; d < 16; d++) dq[(i0 + r) * D + 16 * e + d] += out[16 * r + d];
            }
        }
    }
    _tile_release();
    return 0;
}
DEFINE_WORKER(float, amx, backward_item_amx, float)
#else
#define AMX_BUILT 0
#endif

static int run(job_t *J, int threads, void *(*worker)(void *)) {
    if (threads < 1) threads = 1;
    if (threads > J->n_items) threads = J->n_items > 0 ? (int)J->n_items : 1;
    /* 8 consecutive items a pull (one head's neighbouring segments: fewer atomics, warm rows); one at a time when
       there are too few items for every thread to make 8 pulls of 8, so that they still balance */
    J->chunk = J->n_items >= 64 * (int64_t)threads ? 8 : 1;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
        failed |= worker(J) != NULL;
        return failed ? 1 : 0;
    }
#endif
    pthread_t tid[64];
    if (threads > 64) threads = 64;
    int started = 0, failed = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[started], NULL, worker, J) == 0) started++;
    }
    failed |= worker(J) != NULL;
    for (int t = 0; t < started; t++) {
        void *r = NULL;
        pthread_join(tid[t], &r);
        failed |= r != NULL;
    }
    return failed ? 1 : 0;
}

/* dims: H, Hkv, Q, D, Dv, zero_grads (the backward zeroes the gradients, see zero_grads; the longest segment's keys
 * are found here), window, causal, block_keys (see the blocked form above); strides: 16 int64, the
 * (b, h, l) element strides of q, k, v, out and dout, then K (the key length of the contiguous dk / dv); softcap (0:
 * none), sinks and slopes ((H,) or NULL): the score modifiers. Returns 0, or 1 when a thread's scratch allocation
 * failed, 2 for an unknown dtype or pass, or segments the bfloat16 backward does not take. */
int attnmask_keys_disjoint(const int64_t *segs, int64_t n);
int attnmask_segattn(int dtype_bits, int backward, const void *q, const void *k, const void *v, void *res,
                     const void *dout, void *lse, void *dq, void *dk, void *dv, const int64_t *strides,
                     const int64_t *dims, const int64_t *segs, int64_t nseg, double scale, double softcap,
                     const void *sinks, const void *slopes, int threads) {
    job_t J = {0};
    J.q = q, J.k = k, J.v = v, J.res = res, J.dout = dout, J.lse = lse, J.dq = dq, J.dk = dk, J.dv = dv;
    J.st = strides, J.segs = segs, J.nseg = nseg, J.scale = scale, J.backward = backward;
    J.softcap = softcap, J.sinks = sinks, J.slopes = slopes;
    J.H = dims[0], J.Hkv = dims[1], J.Q = dims[2], J.D = dims[3], J.Dv = dims[4], J.kmax = 0;
    for (int64_t i = 0; i < nseg; i++) /* over the items with queries (one of no query only zeroes rows) */
        if (segs[6 * i + 2] > 0 && segs[6 * i + 4] > J.kmax) J.kmax = segs[6 * i + 4];
    J.zero_grads = backward && dims[5] != 0;
    J.window = dims[6], J.causal = (int)dims[7], J.block_keys = dims[8];
    /* scratch is sized from these: a tile of at least one key, panels of whole blocks of four rows */
    J.tile_keys = dims[9] > 0 ? dims[9] : 1, J.panel_rows = dims[10] >= 4 ? dims[10] / 4 * 4 : 4;
    J.n_items = nseg * (backward ? J.Hkv : J.H);
    J.next = 0;
    if (dtype_bits == 32) return run(&J, threads, worker_f32);
    if (dtype_bits == 64) return run(&J, threads, worker_f64);
    if (dtype_bits == 16 && !backward) return run(&J, threads, worker_bf16); /* bfloat16 q, k, v; float32 out, lse */
    if (dtype_bits == 16) { /* the backward reading them as stored: segments that share no key, each widened whole */
        int64_t *walked = malloc(sizeof(int64_t) * 6 * (size_t)(nseg ? nseg : 1)), n = 0;
        if (walked == NULL) return 1;
        for (int64_t i = 0; i < nseg; i++) /* the items that add (the others only zero rows) */
            if (segs[6 * i + 2] > 0 && segs[6 * i + 4] > 0) memcpy(walked + 6 * n++, segs + 6 * i, 6 * sizeof(int64_t));
        int taken = attnmask_keys_disjoint(walked, n) == 1;
        for (int64_t i = 0; i < n && taken; i++) taken = walked[6 * i + 4] <= WIDEN_MAX_KEYS;
        free(walked);
        return taken ? run(&J, threads, worker_bf16) : 2;
    }
    if (dtype_bits == 19 && !backward) { /* the same forward writing out in bfloat16 */
        J.out_bf16 = 1;
        return run(&J, threads, worker_bf16);
    }
#if AMX_BUILT
    if (dtype_bits == 17) return run(&J, threads, worker_amx); /* bfloat16 on AMX tiles; float32 out, lse, grads */
    if (dtype_bits == 18 && !backward) { /* the same forward writing out in bfloat16 */
        J.out_bf16 = 1;
        return run(&J, threads, worker_amx);
    }
#endif
    return 2;
}

/* 1 when the bfloat16 forward may run on AMX tiles (dtype_bits 17): the kernel was built with them and Linux granted
 * this process their state (ARCH_REQ_XCOMP_PERM, 0x1023, for XFEATURE_XTILEDATA, 18; once per process, for every
 * thread), else 0. */
int attnmask_amx_ready(void) {
#if AMX_BUILT
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* 1 when every element of a bfloat16 tensor of shape (B, H, L, D) is finite (its exponent not all ones), else 0: its
 * (b, h, l) strides sb, sh, sl in elements, each row of D contiguous. One read of each element, stopping at the first
 * row that holds one that is not (native._finite: where torch's isfinite on bfloat16 makes five passes, 3.5 ms for
 * 2M elements at two threads). */
int attnmask_finite_bf16(const uint16_t *x, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sb, int64_t sh,
                         int64_t sl) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t l = 0; l < L; l++) {
                const uint16_t *row = x + b * sb + h * sh + l * sl;
                uint16_t seen = 0; /* (exponent bits) + 0x80 reaches 0x8000 only from all ones */
                _Pragma("omp simd reduction(|:seen)") for (int64_t d = 0; d < D; d++) {
                    seen |= (uint16_t)((row[d] & 0x7f80) + 0x80);
                }
                if (seen & 0x8000) return 0;
            }
    return 1;
}

/* The kernel's float32 exp over an array, for the tests (tests/test_native.py holds it to ~1 ulp of exp). */
void attnmask_exp_f32(const float *x, float *y, int64_t n) {
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] = exp_f32(x[i]);
}

/* Allowed (query, key) pairs, for planning (attnmask.backends._common.allowed_fraction, which holds the numpy form of
 * the same counts and the tests hold both to the naive dense mask): one pass over a (rows, length) array addressed
 * through element strides, where numpy takes eight calls (each 20-90 us right after an attention kernel).
 *
 * attnmask_run_pairs: document ids (negative: no document). Inside a run of equal ids, the query `within` positions
 * from the run's start sees min(within + 1, window) keys if causal, else the whole run: 2 within + 1 summed over a run
 * of n gives n^2 (each run counted as a document of its own). attnmask_real_pairs: a key padding mask (bool bytes); a
 * real key j is seen by min(window, length - j) queries if causal (query i sees the keys in (i - window, i]), by every
 * query otherwise. window >= length means none. */
int64_t attnmask_run_pairs(const int64_t *ids, int64_t rows, int64_t length, int64_t row_stride, int64_t col_stride,
                           int64_t window, int causal) {
    int64_t total = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *row = ids + r * row_stride;
        int64_t start = 0, prev = 0;
        for (int64_t j = 0; j < length; j++) {
            int64_t id = row[j * col_stride], within;
            if (j == 0 || id != prev) start = j;
            prev = id;
            if (id < 0) continue;
            within = j - start;
            total += causal ? (within < window ? within + 1 : window) : 2 * within + 1;
        }
    }
    return total;
}

int64_t attnmask_real_pairs(const uint8_t *real, int64_t rows, int64_t length, int64_t row_stride, int64_t col_stride,
                            int64_t window, int causal) {
    int64_t total = 0;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = real + r * row_stride;
        for (int64_t j = 0; j < length; j++) {
            if (row[j * col_stride]) total += !causal ? length : (length - j < window ? length - j : window);
        }
    }
    return total;
}

/* Whether no two segments of a row share a key, for planning (attnmask.backends.native._keys_disjoint, whose numpy
 * form the tests hold this one to): the segments (b, q_start, q_len, k_start, k_len, offset) taken by row, then first
 * key, ties in their order (already so for the plans of packed and padded rows: one pass), each against the next of
 * its row: 1 when none starts inside the one before it, else 0; -2 when the scratch array cannot be allocated. */
typedef struct {
    int64_t row, first, index;
} row_first;

static int cmp_row_first(const void *a, const void *b) {
    const row_first *x = a, *y = b;
    if (x->row != y->row) return x->row < y->row ? -1 : 1;
    if (x->first != y->first) return x->first < y->first ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

int attnmask_keys_disjoint(const int64_t *segs, int64_t n) {
    int64_t s = 1;
    for (; s < n; s++) {
        const int64_t *a = segs + 6 * (s - 1), *g = segs + 6 * s;
        if (g[0] < a[0] || (g[0] == a[0] && g[3] < a[3])) break;
        if (g[0] == a[0] && g[3] < a[3] + a[4]) return 0;
    }
    if (s >= n) return 1;
    row_first *order = malloc((size_t)n * sizeof(row_first));
    if (order == NULL) return -2;
    for (int64_t i = 0; i < n; i++) order[i] = (row_first){segs[6 * i], segs[6 * i + 3], i};
    qsort(order, (size_t)n, sizeof(row_first), cmp_row_first);
    int disjoint = 1;
    for (int64_t i = 1; i < n && disjoint; i++) {
        const int64_t *a = segs + 6 * order[i - 1].index;
        disjoint = !(order[i].row == order[i - 1].row && order[i].first < a[3] + a[4]);
    }
    free(order);
    return disjoint;
}

/* The (query, key) pairs the n segments (b, q_start, q_len, k_start, k_len, offset) allow, for the run and planning
 * (attnmask.backends.native.allowed_pairs, whose numpy form the tests hold this one to): q_len * k_len each if not
 * causal; else, F(x) = sum_{a=1..x} clamp(a, 0, k_len), F(offset + q_len) - F(offset), less the same shifted by the
 * window where window > 0. In double, as the numpy form sums. */
static double pairs_upto(double x, double kl) {
    if (x <= 0) return 0;
    const double inside = x < kl ? x : kl;
    return inside * (inside + 1) / 2 + (x - inside) * kl;
}

double attnmask_allowed_pairs(const int64_t *segs, int64_t n, int causal, int64_t window) {
    double total = 0;
    for (int64_t i = 0; i < n; i++) {
        const double ql = (double)segs[6 * i + 2], kl = (double)segs[6 * i + 4], off = (double)segs[6 * i + 5];
        if (!causal) {
            total += ql * kl;
            continue;
        }
        double pairs = pairs_upto(off + ql, kl) - pairs_upto(off, kl);
        if (window > 0) pairs -= pairs_upto(off + ql - (double)window, kl) - pairs_upto(off - (double)window, kl);
        total += pairs;
    }
    return total;
}

/* The query ranges in none of the n segments (b, q_start, q_len, ...; their non-empty query ranges disjoint) on B rows
 * of Q queries, for the run (attnmask.backends.native._uncovered, whose numpy form the tests hold this one to): each as
 * a segment of no key (b, start, length, 0, 0, 0) written to `out` (room for n + B), by row, then start; returns
 * their count, -2 when the scratch array cannot be allocated. The segments taken by row, then query start (one pass
 * where they are so already, as the plans' are), else sorted. */
static int cmp_row_start(const void *a, const void *b) {
    const row_first *x = a, *y = b;
    if (x->row != y->row) return x->row < y->row ? -1 : 1;
    return (x->first > y->first) - (x->first < y->first);
}

int64_t attnmask_uncovered(const int64_t *segs, int64_t n, int64_t B, int64_t Q, int64_t *out) {
    int64_t sorted = 1, covered = 0;
    for (int64_t i = 0; i < n; i++) {
        covered += segs[6 * i + 2];
        if (i && (segs[6 * i] < segs[6 * i - 6] || (segs[6 * i] == segs[6 * i - 6] && segs[6 * i + 1] < segs[6 * i - 5])))
            sorted = 0;
    }
    if (covered == B * Q) return 0;
    row_first *order = NULL;
    if (!sorted) {
        order = malloc((size_t)(n ? n : 1) * sizeof(row_first));
        if (order == NULL) return -2;
        for (int64_t i = 0; i < n; i++) order[i] = (row_first){segs[6 * i], segs[6 * i + 1], i};
        qsort(order, (size_t)n, sizeof(row_first), cmp_row_start);
    }
    int64_t count = 0, row = 0, at = 0; /* the next query not yet covered: (row, at) */
    for (int64_t i = 0; i <= n; i++) {
        const int64_t *g = i < n ? segs + 6 * (order ? order[i].index : i) : NULL;
        if (g && g[2] <= 0) continue;
        const int64_t r = g ? g[0] : B, start = g ? g[1] : 0;
        for (; row < r; row++, at = 0) /* the rest of each row before this segment's */
            if (at < Q) {
                int64_t *o = out + 6 * count++;
                o[0] = row, o[1] = at, o[2] = Q - at, o[3] = o[4] = o[5] = 0;
            }
        if (!g) break;
        if (start > at) {
            int64_t *o = out + 6 * count++;
            o[0] = row, o[1] = at, o[2] = start - at, o[3] = o[4] = o[5] = 0;
        }
        at = start + g[2];
    }
    free(order);
    return count;
}

/* The forward's items, for planning and the run (attnmask.backends.native.forward_items, whose numpy form the tests
 * hold this one to): each of the n segments (b, q_start, q_len, k_start, k_len, offset) cut into blocks of `rows`
 * queries (the last shorter; rows = the most of `min_rows` and ceil(sum of q_len * heads / want), rounded up to a
 * multiple of 4), each block keeping its segment's keys and shifting its query start and offset by its first query,
 * then ordered by q_len times the keys a causal block's last query reaches (at least 1), most first, ties in cut
 * order. Writes at most `cap` blocks to `out`; returns their count, 0 when no segment is cut (the caller keeps the
 * segments), -2 when the scratch array cannot be allocated, -3 when `cap` is too small. */
typedef struct {
    int64_t key, index;
} keyed_block;

static int cmp_heaviest_first(const void *a, const void *b) {
    const keyed_block *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? 1 : -1;
    return (x->index > y->index) - (x->index < y->index);
}

int64_t attnmask_forward_items(const int64_t *segs, int64_t n, int64_t heads, int64_t want, int64_t min_rows,
                               int64_t *out, int64_t cap) {
    int64_t total = 0, count = 0, cut = 0;
    for (int64_t s = 0; s < n; s++) total += segs[6 * s + 2];
    int64_t rows = (total * heads + want - 1) / want;
    rows = rows > min_rows ? rows : min_rows;
    rows = (rows + 3) / 4 * 4;
    for (int64_t s = 0; s < n; s++) {
        int64_t q_len = segs[6 * s + 2], blocks = q_len > 0 ? (q_len + rows - 1) / rows : 1;
        cut |= blocks > 1;
        count += blocks;
    }
    if (!cut) return 0;
    if (count > cap) return -3;
    keyed_block *order = malloc((size_t)count * sizeof(keyed_block));
    int64_t *made = malloc((size_t)count * 6 * sizeof(int64_t));
    if (order == NULL || made == NULL) {
        free(order);
        free(made);
        return -2;
    }
    int64_t i = 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        int64_t blocks = g[2] > 0 ? (g[2] + rows - 1) / rows : 1;
        for (int64_t t = 0; t < blocks; t++, i++) {
            int64_t start = t * rows, *m = made + 6 * i;
            int64_t q_len = g[2] - start < rows ? g[2] - start : rows;
            m[0] = g[0], m[1] = g[1] + start, m[2] = q_len, m[3] = g[3], m[4] = g[4], m[5] = g[5] + start;
            int64_t reach = m[5] + q_len < m[4] ? m[5] + q_len : m[4];
            order[i].key = q_len * (reach > 1 ? reach : 1);
            order[i].index = i;
        }
    }
    qsort(order, (size_t)count, sizeof(keyed_block), cmp_heaviest_first);
    for (int64_t j = 0; j < count; j++) {
        for (int c = 0; c < 6; c++) out[6 * j + c] = made[6 * order[j].index + c];
    }
    free(order);
    free(made);
    return count;
}

/* Padded rows' segments, for planning (attnmask.backends._common._padded_cut, whose numpy form the tests hold this one
 * to): from the padding mask `mask` of `rows` rows (1 or `batch`), bytes (bool) addressed through element strides,
 * whose first `length` columns are read (a position is real where its byte is not 0), one segment
 * (b, first, n, first, n, 0) per batch row with n > 0 real keys, row-major, into `out` (`batch` rows); a spec of one
 * row serves every batch row. A row's padding queries that see a real key (`banded`, a causal mask or a window: those
 * after the run, unless the window is 1; otherwise those on either side) join its segment: banded, queries first ..
 * length - 1; otherwise all `length` queries at offset -first. Returns 2 * count + (1 if any padding query sees a
 * real key, else 0), or -1 when some row's real keys are not one run. window < 0: none. */
int64_t attnmask_padded_segments(const uint8_t *mask, int64_t rows, int64_t length, int64_t row_stride,
                                 int64_t col_stride, int64_t batch, int banded, int64_t window, int64_t *out) {
    int attends = 0;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = mask + r * row_stride;
        int64_t first = 0, end;
        while (first < length && !row[first * col_stride]) first++;
        end = first;
        while (end < length && row[end * col_stride]) end++;
        for (int64_t j = end; j < length; j++) {
            if (row[j * col_stride]) return -1;
        }
        int64_t n = end - first;
        int right = n > 0 && end < length, left = n > 0 && first > 0;
        int wide = banded ? right && (window < 0 || window > 1) : right || left;
        attends |= wide;
        int64_t *s = out + 6 * r; /* rows <= batch: row r's segment (n first), moved or repeated below */
        s[0] = n, s[1] = first, s[2] = n, s[3] = first, s[4] = n, s[5] = 0;
        if (wide) {
            if (banded) {
                s[2] = length - first;
            } else {
                s[1] = 0, s[2] = length, s[5] = -first;
            }
        }
    }
    int64_t count = 0;
    if (rows == 1) {
        if (out[0] == 0) return attends;
        for (int64_t b = batch - 1; b >= 0; b--) { /* the last first: row 0 holds the template until the end */
            for (int i = 1; i < 6; i++) out[6 * b + i] = out[i];
            out[6 * b] = b;
        }
        return 2 * batch + attends;
    }
    for (int64_t r = 0; r < rows; r++) { /* the rows with real keys to the front, in order (count <= r) */
        const int64_t *s = out + 6 * r;
        if (s[0] == 0) continue;
        int64_t *t = out + 6 * count++;
        int64_t keep[6] = {r, s[1], s[2], s[3], s[4], s[5]};
        for (int i = 0; i < 6; i++) t[i] = keep[i];
    }
    return 2 * count + attends;
}

/* Document segments, for planning (attnmask.backends._common.varlen_plan, whose general form, through
 * lowering.varlen_args, the tests hold this one to): the runs of equal non-negative ids of a (rows, length) array
 * addressed through element strides, as segments (b, start, n, start, n, 0) of `batch` rows, row-major; a spec of one
 * row (rows == 1) serves every batch row. It checks that no id forms two runs of a row (sorting each row's run ids in
 * a scratch array) and writes the first `cap` segments to `out`. Returns the number of segments (the caller calls
 * again with a larger `out` when it passes `cap`), -1 for an id in several runs of a row, -2 when the scratch array
 * cannot be allocated. */
static int cmp_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int64_t attnmask_doc_segments(const int64_t *ids, int64_t rows, int64_t length, int64_t row_stride,
                              int64_t col_stride, int64_t batch, int64_t *out, int64_t cap) {
    int64_t count = 0;
    int64_t *seen = NULL;
    if (length > 0) {
        seen = malloc((size_t)length * sizeof(int64_t));
        if (seen == NULL) return -2;
    }
    for (int64_t b = 0; b < batch; b++) {
        const int64_t *row = ids + (rows == 1 ? 0 : b) * row_stride;
        int64_t runs = 0;
        int check = seen != NULL && (rows != 1 || b == 0); /* one spec row serves every batch row: checked once */
        for (int64_t j = 0; j < length;) {
            int64_t id = row[j * col_stride], start = j;
            while (j < length && row[j * col_stride] == id) j++;
            if (id < 0) continue;
            if (check) seen[runs++] = id;
            if (count < cap) {
                int64_t *s = out + 6 * count;
                s[0] = b, s[1] = start, s[2] = j - start, s[3] = start, s[4] = j - start, s[5] = 0;
            }
            count++;
        }
        if (check && runs > 1) {
            qsort(seen, (size_t)runs, sizeof(int64_t), cmp_int64);
            for (int64_t i = 1; i < runs; i++) {
                if (seen[i] == seen[i - 1]) {
                    free(seen);
                    return -1;
                }
            }
        }
    }
    free(seen);
    return count;
}

/* Planning (attnmask.backends.blocksparse._segment_pairs, whose numpy form the tests hold this one to): over the query
 * tiles of `bs` rows of `batch` rows of `q_len` queries, the pairs of the most key tiles of `bs` one segment
 * (b, q_start, q_len, k_start, k_len, offset) needs in the tile: its queries there see one contiguous key range
 * (causal: up to the last query's own key; a window: from the first query's first key), each tile counted with its
 * own rows and keys (the last query and key tiles may be short: the last key tile counts its own keys where a range
 * ends in it). `most` is caller-zeroed scratch of batch * ceil(q_len / bs) key counts. window < 0: none. */
int64_t attnmask_segment_tile_pairs(const int64_t *segs, int64_t n, int64_t bs, int64_t batch, int64_t q_len,
                                    int64_t kv_len, int causal, int64_t window, int64_t *most) {
    int64_t n_q = (q_len + bs - 1) / bs, n_k = (kv_len + bs - 1) / bs, short_keys = n_k * bs - kv_len, total = 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];
        if (ql <= 0) continue;
        for (int64_t t = qs / bs; t <= (qs + ql - 1) / bs; t++) {
            int64_t a = (t * bs > qs ? t * bs : qs) - qs;
            int64_t e = ((t + 1) * bs < qs + ql ? (t + 1) * bs : qs + ql) - qs - 1;
            int64_t lo = 0, hi = kl, count, keys;
            if (causal || window >= 0) {
                hi = e + off + 1;
                hi = hi < 0 ? 0 : hi > kl ? kl : hi;
                if (window >= 0) {
                    lo = a + off + 1 - window;
                    lo = lo < 0 ? 0 : lo > kl ? kl : lo;
                }
            }
            count = hi > lo ? (ks + hi - 1) / bs - (ks + lo) / bs + 1 : 0;
            keys = count * bs - (count > 0 && (ks + hi - 1) / bs == n_k - 1 ? short_keys : 0);
            if (keys > most[b * n_q + t]) most[b * n_q + t] = keys;
        }
    }
    for (int64_t i = 0; i < batch * n_q; i++) {
        int64_t t = i % n_q, rows = t == n_q - 1 ? q_len - t * bs : bs;
        total += rows * most[i];
    }
    return total;
}

/* Planning (attnmask.backends.blocksparse._layout, whose generic form, lowering.block_layout, the tests hold this one
 * to): the classes (NONE 0, PARTIAL 1, FULL 2) of the (batch, n_q, n_k) tiles of bs x bs of a call whose allowed pairs
 * are exactly those of the segments (b, q_start, q_len, k_start, k_len, offset) under their rule: local key j of
 * local query i when j <= i + offset (causal or window >= 0) and i + offset - j < window (window >= 0). The keys row i
 * of a segment sees are [lo(i), hi(i)), both non-decreasing in i, with lo(i + 1) <= lo(i) + 1 <= hi(i) for a row that
 * sees any: in a query tile (rows a..e of the segment) the rows together see every key of [lo(a), hi(e)), and a key
 * tile sees all of its keys (FULL for the segment) iff the tile's rows and keys are all the segment's, lo(e) is at most
 * its first key and hi(a) at least its end (so a tile that two segments reach is PARTIAL from each). `out` is
 * caller-zeroed (NONE). */
static int64_t seg_clamp(int64_t x, int64_t hi) { return x < 0 ? 0 : x > hi ? hi : x; }

void attnmask_segment_tile_classes(const int64_t *segs, int64_t n, int64_t bs, int64_t q_len, int64_t kv_len,
                                   int causal, int64_t window, int8_t *out) {
    int64_t n_q = (q_len + bs - 1) / bs, n_k = (kv_len + bs - 1) / bs;
    int ruled = causal || window >= 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        int64_t b = g[0], qs = g[1], ql = g[2], ks = g[3], kl = g[4], off = g[5];
        if (ql <= 0 || kl <= 0) continue;
        for (int64_t t = qs / bs; t <= (qs + ql - 1) / bs; t++) {
            int64_t t_first = t * bs, t_end = t_first + bs < q_len ? t_first + bs : q_len;
            int64_t a = (t_first > qs ? t_first : qs) - qs, e = (t_end < qs + ql ? t_end : qs + ql) - qs - 1;
            int all_rows = t_first >= qs && t_end <= qs + ql;
            int64_t lo_a = window >= 0 ? seg_clamp(a + off + 1 - window, kl) : 0;
            int64_t lo_e = window >= 0 ? seg_clamp(e + off + 1 - window, kl) : 0;
            int64_t hi_a = ruled ? seg_clamp(a + off + 1, kl) : kl, hi_e = ruled ? seg_clamp(e + off + 1, kl) : kl;
            if (hi_e <= lo_a) continue; /* no row of the tile sees a key */
            for (int64_t j = (ks + lo_a) / bs; j <= (ks + hi_e - 1) / bs && j < n_k; j++) {
                int64_t k_first = j * bs, k_end = k_first + bs < kv_len ? k_first + bs : kv_len;
                int64_t c0 = (k_first > ks ? k_first : ks) - ks, c1 = (k_end < ks + kl ? k_end : ks + kl) - ks;
                int full = all_rows && k_first >= ks && k_end <= ks + kl && lo_e <= c0 && hi_a >= c1;
                out[(b * n_q + t) * n_k + j] = (int8_t)(full ? 2 : 1);
            }
        }
    }
}

/* The "native" estimate's work of each segment on one head (native._item_work, whose per-query numpy form this equals
 * up to rounding). Query i of a segment walks its run of keys, r = clamp(a, 0, k_len) - clamp(a - window, 0, k_len)
 * with a = i + offset + 1 where causal (the second term only under a window), else all k_len; each pair of a run of r
 * keys is charged c(r), rising linearly from pair_cost to long_pair_cost as the run's key_bytes per key grow from
 * short_bytes to long_bytes, times pair_w; plus the segment's query rows at row_cost per element of `width`. The sum
 * over queries of r * c(r) is in closed form (run_charge_sum: c is linear in r between two breakpoints; the runs of
 * a segment's queries rise by one, stay flat, and fall by one). window < 0: none. out: n + 2 doubles, the n works,
 * then their sum and the segments' query rows. */
typedef struct {
    double pair_cost, long_pair_cost, first, last, base, slope;
} run_charge_t;

static double attnmask_sum_to(double n) { return n * (n + 1.0) / 2.0; }             /* sum_{r=1..n} r */
static double attnmask_squares_to(double n) { return n * (n + 1.0) * (2.0 * n + 1.0) / 6.0; } /* sum r^2 */

static double run_charge(const run_charge_t *c, double r) { /* c(r) */
    return r <= c->first ? c->pair_cost : r > c->last ? c->long_pair_cost : c->base + c->slope * r;
}

static double run_charge_sum(const run_charge_t *c, double x) { /* sum_{r=1..x} r * c(r), x a whole number */
    double n1, n2;
    if (x <= 0.0) return 0.0;
    n1 = c->first < x ? c->first : x;
    n2 = c->last < x ? c->last : x;
    n2 = n2 > n1 ? n2 : n1;
    return c->pair_cost * attnmask_sum_to(n1) + c->base * (attnmask_sum_to(n2) - attnmask_sum_to(n1)) +
           c->slope * (attnmask_squares_to(n2) - attnmask_squares_to(n1)) +
           c->long_pair_cost * (attnmask_sum_to(x) - attnmask_sum_to(n2));
}

/* sum over a = 1..x of r(a) * c(r(a)), r(a) rising 1..m, then m up to a = top, then falling m - 1, m - 2, ..., 1 */
static double run_sums_to(const run_charge_t *c, double x, double m, double top) {
    double rise, flat;
    if (x <= 0.0) return 0.0;
    if (x <= m) return run_charge_sum(c, x);
    rise = run_charge_sum(c, m);
    flat = m * run_charge(c, m);
    if (x <= top) return rise + (x - m) * flat;
    if (x < top + m) return rise + (top - m) * flat + run_charge_sum(c, m - 1.0) - run_charge_sum(c, top + m - 1.0 - x);
    return rise + (top - m) * flat + run_charge_sum(c, m - 1.0);
}

static run_charge_t run_charges(double pair_cost, double long_pair_cost, double short_bytes, double long_bytes,
                                double key_bytes) {
    double slope = (long_pair_cost - pair_cost) * key_bytes / (long_bytes - short_bytes);
    run_charge_t c = {pair_cost, long_pair_cost, floor(short_bytes / key_bytes), floor(long_bytes / key_bytes),
                      pair_cost - slope * short_bytes / key_bytes, slope};
    return c;
}

/* block_pair_cost / block_long_pair_cost: the two charges of a segment of at least block_keys keys (the kernel's
 * blocked form) in place of pair_cost / long_pair_cost, block_row_cost in place of row_cost, and block_key_cost per
 * element of width of each of its keys (their transposed copy). */
void attnmask_item_work(const int64_t *segs, int64_t n, int causal, int64_t window, double width, double key_bytes,
                        double pair_cost, double long_pair_cost, double short_bytes, double long_bytes, double pair_w,
                        double row_cost, double block_pair_cost, double block_long_pair_cost, double block_key_cost,
                        double block_row_cost, int64_t block_keys, double *out) {
    double total = 0.0, rows = 0.0;
    const run_charge_t row_form = run_charges(pair_cost, long_pair_cost, short_bytes, long_bytes, key_bytes);
    const run_charge_t blocked = run_charges(block_pair_cost, block_long_pair_cost, short_bytes, long_bytes, key_bytes);
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        const run_charge_t *c = g[4] >= block_keys ? &blocked : &row_form;
        double ql = (double)g[2], kl = (double)g[4], off = (double)g[5], charged;
        if (!causal) {
            charged = ql * kl * run_charge(c, kl);
        } else {
            double w = window >= 0 ? (double)window : INFINITY, m = w < kl ? w : kl, top = w < kl ? kl : w;
            charged = run_sums_to(c, off + ql, m, top) - run_sums_to(c, off, m, top);
        }
        out[s] = charged * pair_w + (c == &blocked ? ql * block_row_cost * width + kl * width * block_key_cost
                                                    : ql * row_cost * width);
        total += out[s];
        rows += ql;
    }
    out[n] = total;
    out[n + 1] = rows;
}

static int attnmask_descending(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The longest of `threads` loads when the items `items` (n doubles), repeated `repeat` times end to end and summed
 * in runs of `chunk` (the last run short), are dealt largest run first to the least loaded thread (the first such on
 * ties): native._threads_gain's deal, as _workers.expected_speedup makes it. `scratch`: ceil(n * repeat / chunk)
 * + threads + 1 doubles, the last of which receives the runs' sum. threads >= 1, chunk >= 1. */
double attnmask_pull_makespan(const double *items, int64_t n, int64_t repeat, int64_t chunk, int64_t threads,
                              double *scratch) {
    int64_t count = n * repeat, n_pulls = (count + chunk - 1) / chunk, i;
    double *pulls = scratch, *loads = scratch + n_pulls, *total = scratch + n_pulls + threads, most = 0.0;
    for (i = 0; i <= n_pulls + threads; i++) scratch[i] = 0.0;
    for (i = 0; i < count; i++) pulls[i / chunk] += items[i % n];
    for (i = 0; i < n_pulls; i++) *total += pulls[i];
    qsort(pulls, (size_t)n_pulls, sizeof(double), attnmask_descending);
    if (threads > n_pulls) threads = n_pulls;
    for (i = 0; i < n_pulls; i++) {
        int64_t least = 0;
        for (int64_t t = 1; t < threads; t++)
            if (loads[t] < loads[least]) least = t;
        loads[least] += pulls[i];
    }
    for (i = 0; i < threads; i++) most = loads[i] > most ? loads[i] : most;
    return most;
}

/* attnmask_item_work, then attnmask_pull_makespan over the n works it wrote (native.cost where the forward deals the
 * segments themselves, uncut): one call in place of two. Returns the makespan; out and scratch as theirs. */
double attnmask_item_work_makespan(const int64_t *segs, int64_t n, int causal, int64_t window, double width,
                                   double key_bytes, double pair_cost, double long_pair_cost, double short_bytes,
                                   double long_bytes, double pair_w, double row_cost, double block_pair_cost,
                                   double block_long_pair_cost, double block_key_cost, double block_row_cost,
                                   int64_t block_keys, double *out, int64_t repeat, int64_t chunk, int64_t threads,
                                   double *scratch) {
    attnmask_item_work(segs, n, causal, window, width, key_bytes, pair_cost, long_pair_cost, short_bytes, long_bytes,
                       pair_w, row_cost, block_pair_cost, block_long_pair_cost, block_key_cost, block_row_cost,
                       block_keys, out);
    return attnmask_pull_makespan(out, n, repeat, chunk, threads, scratch);
}

/* The sums the "varlen" floor charges (varlen._floor_sums, whose numpy form this equals up to rounding), per class
 * of segment: out[0] / out[1] the pairs torch's SDPA kernel computes in the tiny ones (k_len <= small_max) / the
 * others (every q_len * k_len pair up to `block` keys; past that, causal: about half plus `extra` keys per query,
 * never more than q_len * k_len), each capped at 2 * window per query under a window (window < 0: none); out[2] /
 * out[3] their query rows; out[4] the tiny segments; out[5] / out[6] every segment's query rows / keys. */
void attnmask_varlen_floor_sums(const int64_t *segs, int64_t n, int causal, int64_t window, int64_t small_max,
                                double block, double extra, double *out) {
    for (int i = 0; i < 7; i++) out[i] = 0.0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        double ql = (double)g[2], kl = (double)g[4], pairs = ql * kl;
        int tiny = g[4] <= small_max;
        if (causal && kl > block) {
            double half = ql * (kl + 1.0) / 2.0 + ql * extra;
            pairs = half < pairs ? half : pairs;
        }
        if (window >= 0 && ql * (double)window * 2.0 < pairs) pairs = ql * (double)window * 2.0;
        out[tiny ? 0 : 1] += pairs;
        out[tiny ? 2 : 3] += ql;
        out[4] += tiny;
        out[5] += ql;
        out[6] += kl;
    }
}

/* Planning (attnmask.backends._common.most_keys_seen, whose numpy form the tests hold this one to): the most keys
 * any query of a varlen plan's segments (N, 6) sees: per segment its last query's keys,
 * min(k_len, max(q_len + offset, 0)) where causal (or under a window), else k_len; capped by the window (>= 0). */
int64_t attnmask_most_keys_seen(const int64_t *segs, int64_t n, int causal, int64_t window) {
    int64_t most = 0;
    for (int64_t s = 0; s < n; s++) {
        const int64_t *g = segs + 6 * s;
        int64_t seen = g[4];
        if (causal || window >= 0) {
            int64_t last = g[2] + g[5];
            last = last > 0 ? last : 0;
            seen = last < seen ? last : seen;
        }
        most = seen > most ? seen : most;
    }
    return window >= 0 && window < most ? window : most;
}
