/*
 * ce_body.h -- fused log-softmax cross-entropy (and the softmax family), written once.
 *
 * Included by each isa_*.c after pointwise_body.h (same target pragma), which defines
 * FL_TABLE_NAME's pointwise members; this file adds the row kernels.
 *
 * Shapes: logits (rows..., V) with the class axis contiguous; the row dims have any
 * byte strides.  target (n_rows) int64, class_weight (V) and sample_weight (n_rows)
 * double.  Per-row outputs are double arrays of n_rows; the caller reduces them.
 *
 * Math for one row (x = logits, optionally softcapped: x <- c tanh(x / c)):
 *   lse   = log sum_j exp(x_j)                                  (online: Milakov & Gimelshein 2018)
 *   loss  = sw [ (1 - eps) w_t (lse - x_t) + eps (W lse - sum_j w_j x_j) / V ] + z sw w_t lse^2
 *           (w = class weights, W = sum_j w_j, sw = sample weight, t = target, eps = label
 *           smoothing, z = z-loss scale; torch's formula for weights with label smoothing)
 *   dloss/dx_j = sw { p_j [(1 - eps) w_t + eps W / V + 2 z w_t lse] - eps w_j / V
 *                     - (1 - eps) w_t [j == t] } * (1 - tanh^2(x_j / c) if softcapped),  p = softmax(x)
 * Soft targets (a row q of class probabilities instead of t; q' = (1 - eps) q + eps / V,
 * Q = sum_j w_j q'_j, QX = sum_j w_j q'_j x_j, both accumulated in double in the stats pass):
 *   loss  = sw [ lse Q - QX + z lse^2 ]             (= sw [sum_j w_j q'_j (lse - x_j) + z lse^2])
 *   dloss/dx_j = sw { p_j (Q + 2 z lse) - w_j q'_j } * (1 - tanh^2(x_j / c) if softcapped)
 *
 * Design
 * ------
 * 1. A row is cut into PARTS of CE_PART elements (fixed: independent of the thread count).
 *    Each part is read in BLOCKS of CE_BLOCK elements small enough for L1: the block max
 *    is taken first, then sum exp(x - block max) and sum w_j x_j from L1, so memory is read
 *    once.  Blocks merge into the part's (max, sumexp) pair by rescaling with one exp.
 * 2. Parts merge in order into the row's (max, sumexp) -> lse; so the result never
 *    depends on how rows or parts were spread over threads (bitwise).
 * 3. The gradient (or log_softmax / softmax output) is a second pass over the row, while
 *    it is still in cache for rows up to a few hundred KB.  The gradient of a row of one part
 *    (V <= CE_PART; class-index target, no softcap) reuses the exponentials of the stats pass,
 *    stored there: one exp per element for the whole call, not two ("GRAD mode with stored
 *    exponentials" below).
 * 4. Threads take whole rows when there are enough rows; otherwise (e.g. one row of 256k
 *    classes) they take parts: stats of all parts in parallel, a merge per row, then the
 *    output pass over parts in parallel.
 * float16/bfloat16 rows are converted block by block into a stack buffer and computed in
 * float32; float32 rows are used in place (unless softcapped); float64 computes in double.
 * exp is our own vectorizable polynomial (see ce_expf / ce_exp) for arguments <= 0: the
 * polynomial's relative error is 2.0 ulp (float, degree 5; 2.4 ulp in the AVX-512 variant) /
 * < 0.1 ulp (double, degree 13) plus the rounding of the reduced argument; results below
 * 2^-125 (float; 2^-126 with AVX-512) / 2^-1022
 * (double) are flushed to 0.
 */
#include "fl_internal.h"

#ifndef CE_BLOCK
#define CE_BLOCK 2048
#endif
#define CE_PART 32768
#define CE_STACK_PARTS 64          /* rows up to 64 parts (2M classes) keep their stats on the stack */


/* ---- exp: 2^(y log2 e) = 2^n 2^f, n = round, f in [-1/2, 1/2], 2^f by a polynomial -------- */

/* exp(y) for y <= 0 (callers pass x - max or x - lse), in ~16 vector ops:
 * t = y log2(e), clamped at -125 (a NaN t stays NaN); n = round(t) by the 1.5 * 2^23 trick,
 * whose float's low bits are n; f = t - n in [-1/2, 1/2]; 2^f by a degree-5 polynomial
 * (weighted least-squares fit: 2.0 ulp); times 2^n, a float built from n's bits.  Multiplying
 * (rather than adding n to the exponent bits) keeps a NaN a NaN without a select, and the
 * clamp at -125 keeps the product normal (>= 2^-125.5): no subnormal results, which are slow.
 * ce_expf flushes results below 2^-125 (t < -125, y = -inf included) to exactly 0;
 * ce_expf_sum leaves them at ~2^-125 (harmless in a sum one of whose terms is 1). */
#define CE_EXP_LO (-125.0f)
static inline float ce_exp2_poly(float t)
{
    const float magic = 12582912.0f;                 /* 1.5 * 2^23 */
    float tc = t < CE_EXP_LO ? CE_EXP_LO : t;
    float big = tc + magic;
    float f = tc - (big - magic);
    float p = 1.3278163969516754e-3f;
    p = p * f + 9.675555862486362e-3f;
    p = p * f + 5.5507078766822815e-2f;
    p = p * f + 2.4022118747234344e-1f;
    p = p * f + 6.931469440460205e-1f;
    p = p * f + 1.0f;
    /* big's bits are 0x4B400000 + n: shifted by 23 they are n << 23 (mod 2^32) */
    return p * fl_bits_to_f32((fl_f32_to_bits(big) << 23) + 0x3F800000u);
}

static inline float ce_expf(float y)
{
    float t = y * 1.44269504088896341f;
    float r = ce_exp2_poly(t);
    return t < CE_EXP_LO ? 0.0f : r;
}

/* exp(x - m) inside sums, without the flush.  (x - m) is formed first: folding it into
 * x log2(e) - m log2(e) saves an op but rounds m log2(e), an error of ~ulp(m) in every
 * exponent (5e-5 relative loss error at logits of 1e4, measured). */
static inline float ce_expf_sum(float x, float m) { return ce_exp2_poly((x - m) * 1.44269504088896341f); }

static inline uint64_t ce_f64_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
static inline double ce_bits_f64(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

static inline double ce_exp(double y)
{
    const double magic = 6755399441055744.0;        /* 1.5 * 2^52 */
    double t = y * 1.4426950408889634;               /* y <= 0, as for ce_expf */
    double tc = t < -1022.0 ? -1022.0 : t;
    double big = tc + magic;
    double r = big - magic;
    double f = tc - r;
    /* 2^f = e^(f ln 2): Taylor to degree 13, truncation < 5e-18 on [-0.5, 0.5] */
    double p = 1.3691488853904124e-12;
    p = p * f + 2.5678435993488196e-11;
    p = p * f + 4.44553827187081e-10;
    p = p * f + 7.054911620801121e-09;
    p = p * f + 1.0178086009239696e-07;
    p = p * f + 1.3215486790144305e-06;
    p = p * f + 1.5252733804059838e-05;
    p = p * f + 1.5403530393381606e-04;
    p = p * f + 1.3333558146428441e-03;
    p = p * f + 9.618129107628477e-03;
    p = p * f + 5.5504108664821576e-02;
    p = p * f + 2.402265069591007e-01;
    p = p * f + 6.931471805599453e-01;
    p = p * f + 1.0;
    double res = ce_bits_f64(ce_f64_bits(p) + (ce_f64_bits(big) << 52));
    res = t != t ? t : res;                          /* NaN stays NaN (see ce_exp2_poly) */
    return t < -1022.0 ? 0.0 : res;
}

/* tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|), has an absolute error of ~1 ulp of 1:
 * a relative one only away from 0.  For small |z| (a softcap c much larger than the logits,
 * c tanh(x / c) ~ x) that formula cancels -- float32 lost 0.6 % of the loss at c = 1e6 -- so
 * there the odd Taylor series z + z^3 P(z^2) is used (coefficients 2^2n (2^2n - 1) B_2n / (2n)!):
 * to z^15 below 0.55 in float32, to z^17 below 0.2 in double, both within 1.5 ulp (checked
 * against mpmath).  Branch-free: the select vectorizes. */
static inline float ce_tanhf(float z)
{
    float a = fabsf(z);
    float e = ce_expf(-2.0f * a);
    float m = (1.0f - e) / (1.0f + e);
    float s = z * z;
    float p = -1.4558343870513183e-03f;
    p = p * s + 3.592128036572481e-03f;
    p = p * s - 8.863235529902197e-03f;
    p = p * s + 2.1869488536155203e-02f;
    p = p * s - 5.396825396825397e-02f;
    p = p * s + 1.3333333333333333e-01f;
    p = p * s - 3.333333333333333e-01f;
    float small = z + z * s * p;
    m = z < 0.0f ? -m : m;
    return a < 0.55f ? small : m;                    /* NaN: the comparison is false, m is NaN */
}
static inline double ce_tanh(double z)
{
    double a = fabs(z);
    double e = ce_exp(-2.0 * a);
    double m = (1.0 - e) / (1.0 + e);
    double s = z * z;
    double p = 5.90027440945586e-04;
    p = p * s - 1.4558343870513183e-03;
    p = p * s + 3.592128036572481e-03;
    p = p * s - 8.863235529902197e-03;
    p = p * s + 2.1869488536155203e-02;
    p = p * s - 5.396825396825397e-02;
    p = p * s + 1.3333333333333333e-01;
    p = p * s - 3.333333333333333e-01;
    double small = z + z * s * p;
    m = z < 0.0 ? -m : m;
    return a < 0.2 ? small : m;
}

/* ---- per-dtype block loaders: a block as compute-type values (softcap applied) --------- */

#define CE_LOADER(DT, T, R, LD, TANH)                                                          \
    static inline const R *ce_load_##DT(const T *src, R *buf, int64_t n, R cap, R inv_cap)    \
    {                                                                                          \
        if (cap > 0) {                                                                         \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < n; i++) buf[i] = cap * TANH((R)LD(src[i]) * inv_cap);     \
            return buf;                                                                        \
        }                                                                                      \
        if (sizeof(T) == sizeof(R)) return (const R *)(const void *)src;                      \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < n; i++) buf[i] = (R)LD(src[i]);                                \
        return buf;                                                                            \
    }

#define CE_LD_f16(v) fl_half_to_f32(v)
#define CE_LD_bf16(v) fl_bf16_to_f32(v)
#define CE_LD_f32(v) (v)
#define CE_LD_f64(v) (v)
#define CE_ST_f16(v) fl_f32_to_half(v)
#define CE_ST_bf16(v) fl_f32_to_bf16(v)
#define CE_ST_f32(v) (v)
#define CE_ST_f64(v) (v)

#if defined(FL_CE_F16C)
/* float16 rows with the F16C conversion instruction (exact, like fl_half_to_f32; AVX2 and
 * AVX-512 builds): 8 values per instruction instead of ~10 integer ops per value. */
#include <immintrin.h>
static inline const float *ce_load_f16(const fl_half *src, float *buf, int64_t n, float cap, float inv_cap)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(src + i))));
    for (; i < n; i++) buf[i] = fl_half_to_f32(src[i]);
    if (cap > 0) {
        _Pragma("omp simd")
        for (i = 0; i < n; i++) buf[i] = cap * ce_tanhf(buf[i] * inv_cap);
    }
    return buf;
}
#else
CE_LOADER(f16, fl_half, float, CE_LD_f16, ce_tanhf)
#endif
CE_LOADER(bf16, fl_bf16, float, CE_LD_bf16, ce_tanhf)
CE_LOADER(f32, float, float, CE_LD_f32, ce_tanhf)
CE_LOADER(f64, double, double, CE_LD_f64, ce_tanh)

/* Prefetch the next block (up to CE_BLOCK elements of `size` bytes) while this one is
 * computed: one core keeps too few cache misses in flight on its own (as in
 * pointwise_body.h); measured +40-60 % on large row sets. */
static inline void ce_prefetch_next(const void *next, int64_t remaining, size_t size)
{
    int64_t bytes = (remaining < CE_BLOCK ? remaining : CE_BLOCK) * (int64_t)size;
    for (int64_t k = 0; k < bytes; k += 64) FL_PREFETCH(next, k);
}

/* Statistics of one part: max, sum exp(x - max), sum w_j x_j (w = 1 without class weights),
 * and the target logit if the target falls in this part; with soft targets instead of the
 * last two, sum w_j q'_j and sum w_j q'_j x_j. */
typedef struct {
    double max, sumexp, wx, xt;
    double wq, wqx;             /* soft targets only; with a hard target and row_rank, wq holds the
                                   part's count toward the target's rank (an integer, exact) */
} ce_stats;
/* the few-long-rows path keeps FL_CE_STATS_DOUBLES doubles per part in the scratch */
typedef char ce_stats_size_check[sizeof(ce_stats) == FL_CE_STATS_DOUBLES * sizeof(double) ? 1 : -1];

/* Merge (m2, s2) into (m1, s1): the max, and the sums rescaled to it.  -inf maxima (all
 * entries -inf) contribute nothing; NaN propagates. */
static inline void ce_merge(double *m1, double *s1, double m2, double s2)
{
    if (m2 == -INFINITY) return;
    if (*m1 == -INFINITY) { *m1 = m2; *s1 = s2; return; }
    if (*m1 == INFINITY || m2 == INFINITY) {  /* a +inf logit: lse = +inf (NaN if a NaN too) */
        int nan = m2 != m2 || *s1 != *s1 || s2 != s2;
        *m1 = nan ? NAN : INFINITY;
        *s1 = nan ? NAN : 1.0;
        return;
    }
    if (m2 > *m1) {
        *s1 = *s1 * ce_exp(*m1 - m2) + s2;
        *m1 = m2;
    } else if (m2 <= *m1) {
        *s1 += s2 * ce_exp(m2 - *m1);
    } else {                                  /* a NaN max */
        *m1 = NAN;
        *s1 = NAN;
    }
}

#if defined(FL_CE_AVX512)
/* ---- AVX-512: the float block kernels with intrinsics ----------------------------------------
 * Compiled only into isa_avx512.c (FL_CE_AVX512).  The generic loops above cost ~18 vector ops
 * per 16 exps (the 2^n exponent add, the clamp and NaN selects) and a max pass bound by the
 * latency of one accumulator.  Here:
 *   t = (x - m) log2(e); tc = max(t, -126) (vmaxps keeps a NaN t);
 *   f = tc - floor(tc) in [0, 1) in one vreduceps; 2^f by a degree-5 polynomial (relative
 *   error 8e-8 in exact arithmetic, 2.4 ulp evaluated in float, measured over 2e6 points);
 *   2^floor(tc) applied by vscalefps, which also keeps NaN;
 * 10 ops per 16 exps; the max pass keeps four accumulators.  Results stay within the
 * documented exp error of the generic path (not bitwise equal to it: different polynomial and
 * summation order); for a given ISA they do not depend on the thread count. */
#include <immintrin.h>

static inline __m512 ce_v_exp2_poly(__m512 tc)     /* 2^tc for tc >= -126 or NaN */
{
    const __m512 f = _mm512_reduce_ps(tc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(1.8671315629035234e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.017026983201504e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.579991638660431e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4016444385051727e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931512951850891e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, tc);
}

/* exp(y) for y <= 0 or NaN; results below 2^-126 (y = -inf included) flushed to 0 (ce_expf: 2^-125) */
static inline __m512 ce_v_expf(__m512 y)
{
    const __m512 lo = _mm512_set1_ps(-126.0f);
    const __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f));
    const __mmask16 keep = _mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ);     /* t >= -126 or NaN */
    return _mm512_maskz_mov_ps(keep, ce_v_exp2_poly(_mm512_max_ps(lo, t)));
}

static inline __mmask16 ce_v_tail(int64_t n) { return (__mmask16)((1u << n) - 1u); }  /* n < 16 */

/* sum exp(x - m) over a block for a finite m, in float.
 * exact = 1: t = (x - m) log2(e): the entries equal to m give exactly 1 (a row whose other
 * entries are -inf has loss exactly 0).  exact = 0 (m a reference, not the block's max): one op
 * fewer, t = x log2(e) - mhi by one fma, with mhi = m log2(e) rounded and delta = m log2(e) - mhi
 * its exact residual: t = (x - m) log2(e) + delta rounded once, and the common factor 2^delta is
 * divided out of the sum at the end (one more rounding of the sum). */
static inline float ce_v_sumexp(const float *v, int64_t nb, float m, int exact)
{
    const float L = 1.44269504088896341f;
    const float mhi = m * L, delta = fmaf(m, L, -mhi);
    const __m512 Lv = _mm512_set1_ps(L), mv = _mm512_set1_ps(m), nmhi = _mm512_set1_ps(-mhi),
                 lo = _mm512_set1_ps(-126.0f);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
#define CE_V_SUMLOOP(T)                                                                          \
    for (; i + 32 <= nb; i += 32) {                                                              \
        s0 = _mm512_add_ps(s0, ce_v_exp2_poly(_mm512_max_ps(lo, T(_mm512_loadu_ps(v + i)))));      \
        s1 = _mm512_add_ps(s1, ce_v_exp2_poly(_mm512_max_ps(lo, T(_mm512_loadu_ps(v + i + 16))))); \
    }                                                                                            \
    for (; i + 16 <= nb; i += 16)                                                                \
        s0 = _mm512_add_ps(s0, ce_v_exp2_poly(_mm512_max_ps(lo, T(_mm512_loadu_ps(v + i)))));      \
    if (i < nb) {                                                                                \
        const __mmask16 k = ce_v_tail(nb - i);                                                   \
        const __m512 e = ce_v_exp2_poly(_mm512_max_ps(lo, T(_mm512_maskz_loadu_ps(k, v + i))));  \
        s1 = _mm512_mask_add_ps(s1, k, s1, e);                                                   \
    }
#define CE_V_T_EXACT(x) _mm512_mul_ps(_mm512_sub_ps((x), mv), Lv)
#define CE_V_T_FOLD(x) _mm512_fmadd_ps((x), Lv, nmhi)
    if (exact) {
        CE_V_SUMLOOP(CE_V_T_EXACT)
    } else {
        CE_V_SUMLOOP(CE_V_T_FOLD)
    }
#undef CE_V_SUMLOOP
#undef CE_V_T_EXACT
#undef CE_V_T_FOLD
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    return exact || delta == 0.0f ? s : (float)((double)s * exp2(-(double)delta));
}

/* Block (max, sum exp(x - max)).  With a finite `mref` (the running max of the part's earlier
 * blocks) the max pass is skipped: the block is summed against mref and (mref, s) returned if
 * s < 2^8, i.e. if no entry exceeds mref by more than ln(256) = 5.5 -- the usual case once a
 * row's first block is read.  The pair then stands for the block as well as its exact max
 * would (the part merges pairs by rescaling; the row's lse is the same), and the row's final
 * reference stays within 5.5 of its true max, so the output pass (which shifts to the lse, see
 * ce_finish_row) loses nothing.  Otherwise -- a larger entry, +inf, NaN (s is NaN), or the first
 * block -- the exact path below. */
static __attribute__((noinline)) void ce_block_maxsum_f32(const float *v, int64_t nb, float mref, float *mp,
                                                          float *sp)
{
    if (mref > -INFINITY && mref < INFINITY) {
        const float s = ce_v_sumexp(v, nb, mref, 0);
        if (s < 256.0f) {
            *mp = mref;
            *sp = s;
            return;
        }
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    /* max(x, m) returns m when x is NaN: NaN is skipped here, caught by the sum */
    for (; i + 64 <= nb; i += 64) {
        m0 = _mm512_max_ps(_mm512_loadu_ps(v + i), m0);
        m1 = _mm512_max_ps(_mm512_loadu_ps(v + i + 16), m1);
        m2 = _mm512_max_ps(_mm512_loadu_ps(v + i + 32), m2);
        m3 = _mm512_max_ps(_mm512_loadu_ps(v + i + 48), m3);
    }
    for (; i + 16 <= nb; i += 16) m0 = _mm512_max_ps(_mm512_loadu_ps(v + i), m0);
    if (i < nb) m1 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, ce_v_tail(nb - i), v + i), m1);
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    float s;
    if (m > -INFINITY && m < INFINITY) {
        s = ce_v_sumexp(v, nb, m, 1);
    } else {                          /* all -inf (s = 0) or a +inf (s = 1): unless a NaN */
        s = m > 0 ? 1.0f : 0.0f;
        for (i = 0; i < nb; i++)
            if (v[i] != v[i]) { s = NAN; m = NAN; break; }
    }
    *mp = m;
    *sp = s;
}

/* Store e = exp(t) for the gradient pass (see "GRAD mode with stored exponentials" below):
 * e is flushed to 0 where t < -126 (y = -inf included), as ce_v_expf; into ef (float), else
 * rounded to 24 bits and split into eh (high 16 bits) and el (the next 8). */
static inline void ce_v_store_e(float *ef, uint16_t *eh, uint8_t *el, int64_t i, __mmask16 k, __m512 t,
                                __m512 e)
{
    const __m512 ev = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ), e);
    if (ef) {
        _mm512_mask_storeu_ps(ef + i, k, ev);            /* k: the lanes of this block */
        return;
    }
    const __m512i u = _mm512_add_epi32(_mm512_castps_si512(ev), _mm512_set1_epi32(0x80));
    _mm512_mask_cvtepi32_storeu_epi16(eh + i, k, _mm512_srli_epi32(u, 16));
    _mm512_mask_cvtepi32_storeu_epi8(el + i, k, _mm512_srli_epi32(u, 8));
}

/* ce_v_sumexp, storing each term (flushed) as ce_v_store_e: the sum is bitwise the same. */
static inline float ce_v_sumexp_st(const float *v, int64_t nb, float m, int exact, float *ef, uint16_t *eh,
                                   uint8_t *el)
{
    const float L = 1.44269504088896341f;
    const float mhi = m * L, delta = fmaf(m, L, -mhi);
    const __m512 Lv = _mm512_set1_ps(L), mv = _mm512_set1_ps(m), nmhi = _mm512_set1_ps(-mhi),
                 lo = _mm512_set1_ps(-126.0f);
    const __mmask16 all = (__mmask16)0xFFFF;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    /* a masked-off lane's store is masked too: eh, el, ef hold nb entries exactly */
#define CE_V_SUMLOOP_ST(T)                                                                       \
    for (; i + 32 <= nb; i += 32) {                                                              \
        const __m512 t0 = T(_mm512_loadu_ps(v + i)), t1 = T(_mm512_loadu_ps(v + i + 16));        \
        const __m512 e0 = ce_v_exp2_poly(_mm512_max_ps(lo, t0));                                  \
        const __m512 e1 = ce_v_exp2_poly(_mm512_max_ps(lo, t1));                                  \
        s0 = _mm512_add_ps(s0, e0);                                                              \
        s1 = _mm512_add_ps(s1, e1);                                                              \
        ce_v_store_e(ef, eh, el, i, all, t0, e0);                                                \
        ce_v_store_e(ef, eh, el, i + 16, all, t1, e1);                                           \
    }                                                                                            \
    for (; i + 16 <= nb; i += 16) {                                                              \
        const __m512 t0 = T(_mm512_loadu_ps(v + i));                                             \
        const __m512 e0 = ce_v_exp2_poly(_mm512_max_ps(lo, t0));                                  \
        s0 = _mm512_add_ps(s0, e0);                                                              \
        ce_v_store_e(ef, eh, el, i, all, t0, e0);                                                \
    }                                                                                            \
    if (i < nb) {                                                                                \
        const __mmask16 k = ce_v_tail(nb - i);                                                   \
        const __m512 t0 = T(_mm512_maskz_loadu_ps(k, v + i));                                    \
        const __m512 e = ce_v_exp2_poly(_mm512_max_ps(lo, t0));                                  \
        s1 = _mm512_mask_add_ps(s1, k, s1, e);                                                   \
        ce_v_store_e(ef, eh, el, i, k, t0, e);                                                   \
    }
#define CE_V_T_EXACT(x) _mm512_mul_ps(_mm512_sub_ps((x), mv), Lv)
#define CE_V_T_FOLD(x) _mm512_fmadd_ps((x), Lv, nmhi)
    if (exact) {
        CE_V_SUMLOOP_ST(CE_V_T_EXACT)
    } else {
        CE_V_SUMLOOP_ST(CE_V_T_FOLD)
    }
#undef CE_V_SUMLOOP_ST
#undef CE_V_T_EXACT
#undef CE_V_T_FOLD
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    return exact || delta == 0.0f ? s : (float)((double)s * exp2(-(double)delta));
}

/* ce_block_maxsum_f32 storing the block's terms e_j (ce_v_sumexp_st) for the gradient pass:
 * on return e_j = exp(x_j - *mp) / *fp (*fp = 2^-delta when the block was summed against the
 * reference by the folded exponent, else 1).  A non-finite block stores zeros (it makes the row
 * NaN, or, all -inf, has p = 0). */
static __attribute__((noinline)) void ce_block_maxsum_st_f32(const float *v, int64_t nb, float mref, float *mp,
                                                             float *sp, double *fp, float *ef, uint16_t *eh,
                                                             uint8_t *el)
{
    *fp = 1.0;
    if (mref > -INFINITY && mref < INFINITY) {
        const float s = ce_v_sumexp_st(v, nb, mref, 0, ef, eh, el);
        if (s < 256.0f) {
            const float L = 1.44269504088896341f;
            const float mhi = mref * L, delta = fmaf(mref, L, -mhi);
            *fp = delta == 0.0f ? 1.0 : exp2(-(double)delta);
            *mp = mref;
            *sp = s;
            return;
        }
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    for (; i + 64 <= nb; i += 64) {
        m0 = _mm512_max_ps(_mm512_loadu_ps(v + i), m0);
        m1 = _mm512_max_ps(_mm512_loadu_ps(v + i + 16), m1);
        m2 = _mm512_max_ps(_mm512_loadu_ps(v + i + 32), m2);
        m3 = _mm512_max_ps(_mm512_loadu_ps(v + i + 48), m3);
    }
    for (; i + 16 <= nb; i += 16) m0 = _mm512_max_ps(_mm512_loadu_ps(v + i), m0);
    if (i < nb) m1 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, ce_v_tail(nb - i), v + i), m1);
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    float s;
    if (m > -INFINITY && m < INFINITY) {
        s = ce_v_sumexp_st(v, nb, m, 1, ef, eh, el);
    } else {
        s = m > 0 ? 1.0f : 0.0f;
        for (i = 0; i < nb; i++)
            if (v[i] != v[i]) { s = NAN; m = NAN; break; }
        if (ef) {
            memset(ef, 0, (size_t)nb * sizeof(float));
        } else {
            memset(eh, 0, (size_t)nb * sizeof(uint16_t));
            memset(el, 0, (size_t)nb);
        }
    }
    *mp = m;
    *sp = s;
}

/* ce_block_out_f32 (see CE_BLOCK_OUT below for the contract), 16 classes at a time */
#define CE_V_LOOP(BODY)                                                                         \
    for (int64_t i = 0; i < nb; i += 16) {                                                      \
        const __mmask16 k = nb - i >= 16 ? (__mmask16)0xFFFF : ce_v_tail(nb - i);              \
        const __m512 x = _mm512_maskz_loadu_ps(k, v + i);                                       \
        const __m512 y = _mm512_sub_ps(_mm512_sub_ps(x, Mv), lSv);                             \
        __m512 r;                                                                               \
        BODY                                                                                    \
        _mm512_mask_storeu_ps(o + i, k, r);                                                     \
    }

static inline __m512 ce_v_load_cw(const double *cw, int64_t i, __mmask16 k)
{
    const __m256 lo = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd((__mmask8)k, cw + i));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd((__mmask8)(k >> 8), cw + i + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

static __attribute__((noinline)) void ce_block_out_f32(const float *v, float *o, int64_t nb, int mode,
                                                       const double *cw, float cap, float inv_cap, float M,
                                                       float lS, float a, float bb)
{
    const __m512 Mv = _mm512_set1_ps(M), lSv = _mm512_set1_ps(lS), av = _mm512_set1_ps(a),
                 bv = _mm512_set1_ps(bb), icv = _mm512_set1_ps(inv_cap), one = _mm512_set1_ps(1.0f);
    if (mode == FL_CE_OUT_LOGSOFTMAX) {
        CE_V_LOOP(r = y;)
    } else if (mode == FL_CE_OUT_SOFTMAX) {
        CE_V_LOOP(r = ce_v_expf(y);)
    } else if (cap > 0) {
        CE_V_LOOP(const __m512 w = cw ? ce_v_load_cw(cw, i, k) : one;
                  const __m512 th = _mm512_mul_ps(x, icv);
                  r = _mm512_fmadd_ps(av, ce_v_expf(y), _mm512_mul_ps(bv, w));
                  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(th, th, one));)
    } else if (cw) {
        CE_V_LOOP(r = _mm512_fmadd_ps(av, ce_v_expf(y), _mm512_mul_ps(bv, ce_v_load_cw(cw, i, k)));)
    } else {
        CE_V_LOOP(r = _mm512_fmadd_ps(av, ce_v_expf(y), bv);)
    }
}
#undef CE_V_LOOP
#endif /* FL_CE_AVX512 */

/* max and sum exp(v - max) of one block.  A separate, non-inlined function: inlined into
 * the block loop, GCC 12 vectorized these loops only in the first iteration of that loop
 * (measured: 6x slower from the second block on). */
/* Max of a block, NaN skipped.  CE_MAX_LANES independent running maxima: a single vector
 * accumulator is bound by the latency of max (4 cycles per vector), which made this pass
 * ~40 % of the AVX2 forward; with 64 lanes (4-8 vectors) it runs at the load rate. */
#define CE_MAX_LANES 64
#define CE_BLOCK_MAX(DT, R)                                                                    \
    static inline R ce_block_max_##DT(const R *v, int64_t nb)                                  \
    {                                                                                          \
        R lane[CE_MAX_LANES];                                                                  \
        for (int j = 0; j < CE_MAX_LANES; j++) lane[j] = -INFINITY;                            \
        int64_t i = 0;                                                                         \
        for (; i + CE_MAX_LANES <= nb; i += CE_MAX_LANES) {                                    \
            _Pragma("omp simd")                                                                \
            for (int j = 0; j < CE_MAX_LANES; j++) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j]; \
        }                                                                                      \
        for (int j = 0; i + j < nb; j++) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j];    \
        R m = -INFINITY;                                                                       \
        for (int j = 0; j < CE_MAX_LANES; j++) m = lane[j] > m ? lane[j] : m;                  \
        return m;                                                                              \
    }
CE_BLOCK_MAX(f32, float)
CE_BLOCK_MAX(f64, double)

#define CE_BLOCK_MAXSUM(DT, R, EXP, EXPSUM)                                                    \
    static __attribute__((noinline)) void ce_block_maxsum_##DT(const R *v, int64_t nb, R mref, \
                                                               R *mp, R *sp)                   \
    {                                                                                          \
        (void)mref;                   /* (a hint the AVX-512 variant uses) */                  \
        R m = -INFINITY, s = 0;                                                                \
        m = ce_block_max_##DT(v, nb);                                                          \
        if (m > -INFINITY && m < INFINITY) {  /* a NaN in the block makes s NaN (exp) */  \
            _Pragma("omp simd reduction(+:s)")                                                 \
            for (int64_t i = 0; i < nb; i++) s += EXPSUM;                                      \
        } else {                      /* all -inf (s = 0) or a +inf (s = 1): unless a NaN */   \
            s = m > 0 ? (R)1 : (R)0;                                                           \
            for (int64_t i = 0; i < nb; i++)                                                   \
                if (v[i] != v[i]) { s = NAN; m = NAN; break; }                                 \
        }                                                                                      \
        *mp = m;                                                                               \
        *sp = s;                                                                               \
    }

#if !defined(FL_CE_AVX512)
CE_BLOCK_MAXSUM(f32, float, ce_expf, ce_expf_sum(v[i], m))
#endif
CE_BLOCK_MAXSUM(f64, double, ce_exp, ce_exp(v[i] - m))
#define ce_block_maxsum_f16 ce_block_maxsum_f32     /* 16-bit rows are computed in float */
#define ce_block_maxsum_bf16 ce_block_maxsum_f32

/* ce_block_maxsum storing each term of the sum for the gradient pass (see "GRAD mode with
 * stored exponentials" below): e_j = exp(x_j - *mp) flushed as ce_expf / ce_exp, into ef (the
 * compute type), else (float) rounded to 24 bits and split into eh (high 16 bits) and el (the
 * next 8).  The sum is computed exactly as ce_block_maxsum's (same terms, same loop), so the
 * loss does not depend on the mode.  A non-finite block stores zeros.  *fp = 1 (the AVX-512
 * variant may sum against a shifted reference, see there). */
static inline void ce_split_e(float e, uint16_t *eh, uint8_t *el)
{
    const uint32_t u = fl_f32_to_bits(e) + 0x80u;      /* round to 24 bits (e >= 0, finite or NaN) */
    *eh = (uint16_t)(u >> 16);
    *el = (uint8_t)(u >> 8);
}
static inline float ce_join_e(uint16_t eh, uint8_t el)
{
    return fl_bits_to_f32(((uint32_t)eh << 16) | ((uint32_t)el << 8));
}

#if !defined(FL_CE_AVX512)
static __attribute__((noinline)) void ce_block_maxsum_st_f32(const float *v, int64_t nb, float mref, float *mp,
                                                             float *sp, double *fp, float *ef, uint16_t *eh,
                                                             uint8_t *el)
{
    (void)mref;
    float m = ce_block_max_f32(v, nb), s = 0.0f;
    float tmp[CE_BLOCK];                              /* 16-bit outputs: e before the split */
    *fp = 1.0;
    if (m > -INFINITY && m < INFINITY) {
        /* float stores only: the loop vectorizes as ce_block_maxsum's (the same sum, bitwise);
         * 16-bit stores in it would change GCC's vectorization factor, and the sum's order */
        float *ev = ef ? ef : tmp;
        _Pragma("omp simd reduction(+:s)")
        for (int64_t i = 0; i < nb; i++) {
            const float t = (v[i] - m) * 1.44269504088896341f;   /* as ce_expf_sum */
            const float e = ce_exp2_poly(t);
            s += e;
            ev[i] = t < CE_EXP_LO ? 0.0f : e;
        }
        if (!ef) {
            _Pragma("omp simd")
            for (int64_t i = 0; i < nb; i++) ce_split_e(tmp[i], eh + i, el + i);
        }
    } else {
        s = m > 0 ? 1.0f : 0.0f;
        for (int64_t i = 0; i < nb; i++)
            if (v[i] != v[i]) { s = NAN; m = NAN; break; }
        if (ef) {
            memset(ef, 0, (size_t)nb * sizeof(float));
        } else {
            memset(eh, 0, (size_t)nb * sizeof(uint16_t));
            memset(el, 0, (size_t)nb);
        }
    }
    *mp = m;
    *sp = s;
}
#endif

static __attribute__((noinline)) void ce_block_maxsum_st_f64(const double *v, int64_t nb, double mref, double *mp,
                                                             double *sp, double *fp, double *ef, uint16_t *eh,
                                                             uint8_t *el)
{
    (void)mref;
    (void)eh;
    (void)el;                                         /* float64 stores e in its own output */
    double m = ce_block_max_f64(v, nb), s = 0.0;
    *fp = 1.0;
    if (m > -INFINITY && m < INFINITY) {
        _Pragma("omp simd reduction(+:s)")
        for (int64_t i = 0; i < nb; i++) {
            const double e = ce_exp(v[i] - m);        /* flushed below 2^-1022 */
            s += e;
            ef[i] = e;
        }
    } else {
        s = m > 0 ? 1.0 : 0.0;
        for (int64_t i = 0; i < nb; i++)
            if (v[i] != v[i]) { s = NAN; m = NAN; break; }
        memset(ef, 0, (size_t)nb * sizeof(double));
    }
    *mp = m;
    *sp = s;
}
#define ce_block_maxsum_st_f16 ce_block_maxsum_st_f32
#define ce_block_maxsum_st_bf16 ce_block_maxsum_st_f32

/* Rank of the target among a block's classes (for top-k accuracy; see fl_ce_job.row_rank):
 * #{i : v_i > xy, or v_i == xy and i < lim} with NaN ordered above every number (as np.argmax
 * and np.sort), ties among NaN by index; lim = the target's position relative to the block,
 * clamped to [0, nb].  Integer counts of comparisons: exact, and identical for every thread
 * count and ISA given the same loaded values.  Non-inlined for the vectorizer. */
#define CE_BLOCK_RANK(DT, R)                                                                   \
    static __attribute__((noinline)) int64_t ce_block_rank_##DT(const R *v, int64_t nb, R xy,  \
                                                                int64_t lim)                   \
    {                                                                                          \
        int c = 0;                    /* nb <= CE_BLOCK: 32-bit lanes (half the work of 64) */ \
        if (xy != xy) {               /* a NaN target logit: only the NaN before it rank higher */ \
            for (int64_t i = 0; i < lim; i++) c += v[i] != v[i];                               \
            return c;                                                                          \
        }                                                                                      \
        _Pragma("omp simd reduction(+:c)")                                                     \
        for (int64_t i = 0; i < lim; i++) c += !(v[i] < xy);       /* >= or NaN */             \
        _Pragma("omp simd reduction(+:c)")                                                     \
        for (int64_t i = lim; i < nb; i++) c += !(v[i] <= xy);     /* > or NaN */              \
        return (int64_t)c;                                                                     \
    }
CE_BLOCK_RANK(f32, float)
CE_BLOCK_RANK(f64, double)
#define ce_block_rank_f16 ce_block_rank_f32
#define ce_block_rank_bf16 ce_block_rank_f32

/* The target's (softcapped) logit in the compute type, bitwise as the stats pass sees it: its
 * block is loaded by the same loader at the same block start.  part: the target's part, n
 * its length, t_off the target's offset in it. */
#define CE_TARGET_VALUE(DT, T, R)                                                              \
    static double ce_target_value_##DT(const T *part, int64_t n, int64_t t_off, R cap, R inv_cap) \
    {                                                                                          \
        R buf[CE_BLOCK];                                                                       \
        const int64_t b = t_off / CE_BLOCK * CE_BLOCK;                                         \
        const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                                \
        const R *v = ce_load_##DT(part + b, buf, nb, cap, inv_cap);                            \
        return (double)v[t_off - b];                                                           \
    }
CE_TARGET_VALUE(f16, fl_half, float)
CE_TARGET_VALUE(bf16, fl_bf16, float)
CE_TARGET_VALUE(f32, float, float)
CE_TARGET_VALUE(f64, double, double)

/* Where the stats pass stores its terms e_j (GRAD mode with stored exponentials; NULL: not).
 * e: the compute type (the output row); else hi / lo: 16-bit outputs (ce_split_e).  Per block
 * k the reference max bm[k] and factor bf[k]: e_j = exp(x_j - bm[k]) / bf[k].  inplace: the
 * output row is the logits row (e must not overwrite a block before the block is done). */
typedef struct {
    void *e;
    uint16_t *hi;
    uint8_t *lo;
    double *bm, *bf;
    int inplace;
} ce_estore;

#define CE_PART_STATS(DT, T, R, EXP)                                                           \
    static void ce_part_stats_##DT(const T *x, int64_t n, int64_t t_off, int need_wx,         \
                                   const double *cw, R cap, R inv_cap, int rank, R xy,         \
                                   int64_t t_rel, ce_stats *st, const ce_estore *es)           \
    {                                                                                          \
        R buf[CE_BLOCK];                                                                       \
        double M = -INFINITY, S = 0.0, WX = 0.0;                                               \
        int64_t C = 0;                                                                         \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                            \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                            \
            ce_prefetch_next(x + b + nb, n - b - nb, sizeof(T));                               \
            const R *v = ce_load_##DT(x + b, buf, nb, cap, inv_cap);                           \
            if (t_off >= b && t_off < b + nb) st->xt = (double)v[t_off - b];                   \
            R m, s, wx = 0;                                                                    \
            if (!es) {                                                                         \
                ce_block_maxsum_##DT(v, nb, (R)M, &m, &s);                                     \
            } else {                  /* in place: e overwrites the block, v read from buf */  \
                if (es->inplace && v != buf) {                                                 \
                    memcpy(buf, v, (size_t)nb * sizeof(R));                                    \
                    v = buf;                                                                   \
                }                                                                              \
                R mb;                                                                          \
                ce_block_maxsum_st_##DT(v, nb, (R)M, &mb, &s, &es->bf[b / CE_BLOCK],           \
                                        es->e ? (R *)es->e + b : NULL, es->hi ? es->hi + b : NULL, \
                                        es->lo ? es->lo + b : NULL);                           \
                m = mb;                                                                        \
                es->bm[b / CE_BLOCK] = (double)mb;                                             \
            }                                                                                  \
            if (rank) {               /* same pass: the block is in L1 */                      \
                const int64_t lim = t_rel - b < 0 ? 0 : (t_rel - b > nb ? nb : t_rel - b);     \
                C += ce_block_rank_##DT(v, nb, xy, lim);                                       \
            }                                                                                  \
            if (!need_wx) {                                                                    \
            } else if (cw) {                                                                   \
                double wxd = 0.0;                                                              \
                _Pragma("omp simd reduction(+:wxd)")                                           \
                for (int64_t i = 0; i < nb; i++) wxd += cw[b + i] * (double)v[i];              \
                WX += wxd;                                                                     \
            } else {                                                                           \
                _Pragma("omp simd reduction(+:wx)")                                            \
                for (int64_t i = 0; i < nb; i++) wx += v[i];                                   \
                WX += (double)wx;                                                              \
            }                                                                                  \
            ce_merge(&M, &S, (double)m, (double)s);                                            \
        }                                                                                      \
        st->max = M;                                                                           \
        st->sumexp = S;                                                                        \
        st->wx = WX;                                                                           \
        st->wq = (double)C;                                                                    \
    }

CE_PART_STATS(f16, fl_half, float, ce_expf)
CE_PART_STATS(bf16, fl_bf16, float, ce_expf)
CE_PART_STATS(f32, float, float, ce_expf)
CE_PART_STATS(f64, double, double, ce_exp)

/* Output of one block (non-inlined for the vectorizer, as ce_block_maxsum).
 * mode CE_OUT_GRAD: o_j = (a p_j + bb w_j) cap'_j with p_j = exp((v_j - M) - lS) (M the row
 * max, exact; lS = log sum exp(v - M): no rounding of a large lse), w_j = cw[j] or 1;
 * LOGSOFTMAX: (v_j - M) - lS;  SOFTMAX: p_j.  v holds the (capped) logits. */
#define CE_BLOCK_OUT(DT, T, R, EXP)                                                             \
    static __attribute__((noinline)) void ce_block_out_##DT(const R *v, T *o, int64_t nb,       \
                                                            int mode, const double *cw, R cap,  \
                                                            R inv_cap, R M, R lS, R a, R bb)    \
    {                                                                                           \
        if (mode == FL_CE_OUT_LOGSOFTMAX) {                                                     \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) o[i] = CE_ST_##DT((v[i] - M) - lS);               \
        } else if (mode == FL_CE_OUT_SOFTMAX) {                                                 \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) o[i] = CE_ST_##DT(EXP((v[i] - M) - lS));          \
        } else if (cap > 0) {                                                                   \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) {                                                  \
                R w = cw ? (R)cw[i] : (R)1;                                                     \
                R th = v[i] * inv_cap;            /* tanh(x / c), from the capped value */      \
                o[i] = CE_ST_##DT((a * EXP((v[i] - M) - lS) + bb * w) * ((R)1 - th * th));      \
            }                                                                                   \
        } else if (cw) {                                                                        \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++)                                                    \
                o[i] = CE_ST_##DT(a * EXP((v[i] - M) - lS) + bb * (R)cw[i]);                    \
        } else {                                                                                \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) o[i] = CE_ST_##DT(a * EXP((v[i] - M) - lS) + bb); \
        }                                                                                       \
    }

CE_BLOCK_OUT(f16, fl_half, float, ce_expf)
CE_BLOCK_OUT(bf16, fl_bf16, float, ce_expf)
#if !defined(FL_CE_AVX512)
CE_BLOCK_OUT(f32, float, float, ce_expf)
#endif
CE_BLOCK_OUT(f64, double, double, ce_exp)

/* Output pass over one part, block by block; the target's element is then corrected
 * (its logit was read before the block was written: out may be the logits, in place). */
#define CE_PART_OUT(DT, T, R, EXP, TANH)                                                        \
    static void ce_part_out_##DT(const T *x, T *out, int64_t n, int mode, const double *cw,     \
                                 R cap, R inv_cap, double M_, double lS_, double A, double B,   \
                                 int64_t t_off, double D)                                       \
    {                                                                                           \
        R buf[CE_BLOCK];                                                                        \
        const R M = (R)M_, lS = (R)lS_, a = (R)A, bb = (R)B;                                    \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                             \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                             \
            ce_prefetch_next(x + b + nb, n - b - nb, sizeof(T));                                \
            const R *v = ce_load_##DT(x + b, buf, nb, cap, inv_cap);                            \
            const int has_t = mode == FL_CE_OUT_GRAD && t_off >= b && t_off < b + nb;           \
            const R vt = has_t ? v[t_off - b] : (R)0;                                           \
            ce_block_out_##DT(v, out + b, nb, mode, cw ? cw + b : NULL, cap, inv_cap, M, lS, a, bb); \
            if (has_t) {                                                                        \
                R w = cw ? (R)cw[t_off] : (R)1;                                                 \
                R g = a * EXP((vt - M) - lS) + bb * w + (R)D;                                   \
                if (cap > 0) { R th = vt * inv_cap; g *= (R)1 - th * th; }                      \
                out[t_off] = CE_ST_##DT(g);                                                     \
            }                                                                                   \
        }                                                                                       \
    }

CE_PART_OUT(f16, fl_half, float, ce_expf, ce_tanhf)
CE_PART_OUT(bf16, fl_bf16, float, ce_expf, ce_tanhf)
CE_PART_OUT(f32, float, float, ce_expf, ce_tanhf)
CE_PART_OUT(f64, double, double, ce_exp, ce_tanh)

/* ---- GRAD mode with stored exponentials ----------------------------------------------------
 * For rows of one part (V <= CE_PART) with a class-index target and no softcap, the stats pass
 * already computes e_j = exp(x_j - m_b) for its sum (m_b: the reference max of block b) with the
 * block in L1: it stores them (ce_estore), and the gradient pass needs one exp per BLOCK
 * instead of one per element:
 *   p_j = e_j exp(m_b - lse) f_b,   o_j = a_b e_j + bb w_j,   a_b = A exp((m_b - M) - log S) f_b
 * (lse = M + log S; f_b: see ce_block_maxsum_st_f32).  e_j goes into the output row itself when the output has
 * the compute type (float32, float64); for float16 / bfloat16 outputs it is rounded to 24 bits
 * (relative error <= 2^-16, far below the output's half ulp of 2^-9 / 2^-12) and split into its
 * high 16 bits, in the output row, and its low 8 bits, in a stack buffer of V bytes.  Against
 * exp(x_j - lse): the same exp error (of an argument x_j - m_b formed as in the sum) plus one
 * rounding of a_b and of its product with e_j (measured against a float64 reference: float32
 * gradients as accurate or better, float64 within a few ulp of the former path, 16-bit outputs
 * unchanged but for last-bit flips).  The loss is bitwise that of the forward (the sums are
 * unchanged).  The output pass drops its exp (~10 of ~25 vector ops per 16 classes); the stats
 * pass gains the stores, and in place (out == logits) a copy of each block to the stack. */
#define CE_PART_OUT_ST(DT, T, R, LOADE)                                                         \
    static __attribute__((noinline)) void ce_block_out_st_##DT(T *o, const uint8_t *lo, int64_t nb, \
                                                               const double *cw, R a, R bb)     \
    {                                                                                           \
        (void)lo;                                                                               \
        if (cw) {                                                                               \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) o[i] = CE_ST_##DT(a * LOADE(o, lo, i) + bb * (R)cw[i]); \
        } else {                                                                                \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) o[i] = CE_ST_##DT(a * LOADE(o, lo, i) + bb);       \
        }                                                                                       \
    }                                                                                           \
    static void ce_part_out_st_##DT(T *out, const uint8_t *lo, int64_t n, const double *cw,     \
                                    double M, double lS, double A, double B, int64_t t_off,     \
                                    double D,                                                   \
                                    const double *bm, const double *bf)                         \
    {                                                                                           \
        const R bb = (R)B;                                                                      \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                             \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                             \
            const R a = (R)(A * (exp((bm[b / CE_BLOCK] - M) - lS) * bf[b / CE_BLOCK]));        \
            const int has_t = t_off >= b && t_off < b + nb;                                     \
            const R et = has_t ? LOADE(out, lo, t_off) : (R)0;   /* before the block is written */ \
            ce_block_out_st_##DT(out + b, lo ? lo + b : NULL, nb, cw ? cw + b : NULL, a, bb);   \
            if (has_t) out[t_off] = CE_ST_##DT(a * et + bb * (cw ? (R)cw[t_off] : (R)1) + (R)D); \
        }                                                                                       \
    }

#define CE_LOADE_SELF(o, lo, i) (o)[i]
#define CE_LOADE_SPLIT(o, lo, i) ce_join_e((o)[i], (lo)[i])
CE_PART_OUT_ST(f16, fl_half, float, CE_LOADE_SPLIT)
CE_PART_OUT_ST(bf16, fl_bf16, float, CE_LOADE_SPLIT)
CE_PART_OUT_ST(f32, float, float, CE_LOADE_SELF)
CE_PART_OUT_ST(f64, double, double, CE_LOADE_SELF)

/* ---- soft targets: a row q of class probabilities ---------------------------------------- */

/* A block of q as compute-type values: in place when q is stored in the compute type (always
 * for float32 / float64 logits), else converted from the logits' 16-bit format (exact). */
#define CE_QLOADER(DT, T, R, LD)                                                               \
    static inline const R *ce_load_q_##DT(const void *q, int q_is_compute, R *buf, int64_t n)  \
    {                                                                                          \
        if (q_is_compute || sizeof(T) == sizeof(R)) return (const R *)q;                      \
        const T *src = (const T *)q;                                                           \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < n; i++) buf[i] = (R)LD(src[i]);                                \
        return buf;                                                                            \
    }

CE_QLOADER(f16, fl_half, float, CE_LD_f16)
CE_QLOADER(bf16, fl_bf16, float, CE_LD_bf16)
CE_QLOADER(f32, float, float, CE_LD_f32)
CE_QLOADER(f64, double, double, CE_LD_f64)

/* sum_j w_j q'_j and sum_j w_j q'_j v_j of one block, in double: q'_j = keep q_j + add
 * (keep = 1 - eps, add = eps / V), w_j = cw[j] or 1.  Double because the loss is the
 * difference lse Q - QX of two sums of the size of the logits.  As the reference, a -inf
 * logit whose w q' is 0 gives 0 * -inf = NaN (torch too).  Non-inlined, as ce_block_maxsum. */
#define CE_BLOCK_SOFT_SUMS(DT, R)                                                              \
    static __attribute__((noinline)) void ce_block_soft_sums_##DT(const R *v, const R *q,     \
                                                                  int64_t nb, const double *cw, \
                                                                  double keep, double add,     \
                                                                  double *wq_out, double *wqx_out) \
    {                                                                                          \
        double wq = 0.0, wqx = 0.0;                                                            \
        if (cw) {                                                                              \
            _Pragma("omp simd reduction(+:wq, wqx)")                                           \
            for (int64_t i = 0; i < nb; i++) {                                                 \
                const double t = cw[i] * (keep * (double)q[i] + add);                          \
                wq += t;                                                                       \
                wqx += t * (double)v[i];                                                       \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp simd reduction(+:wq, wqx)")                                           \
            for (int64_t i = 0; i < nb; i++) {                                                 \
                const double t = keep * (double)q[i] + add;                                    \
                wq += t;                                                                       \
                wqx += t * (double)v[i];                                                       \
            }                                                                                  \
        }                                                                                      \
        *wq_out = wq;                                                                          \
        *wqx_out = wqx;                                                                        \
    }

CE_BLOCK_SOFT_SUMS(f32, float)
CE_BLOCK_SOFT_SUMS(f64, double)
#define ce_block_soft_sums_f16 ce_block_soft_sums_f32
#define ce_block_soft_sums_bf16 ce_block_soft_sums_f32

/* Statistics of one part with soft targets: (max, sumexp) as ce_part_stats, and per block the
 * double sums above; q is read block by block beside x. */
#define CE_PART_STATS_SOFT(DT, T, R)                                                           \
    static void ce_part_stats_soft_##DT(const T *x, const void *q, int q_is_compute, int64_t n, \
                                        const double *cw, double keep, double add, R cap,     \
                                        R inv_cap, ce_stats *st)                               \
    {                                                                                          \
        R buf[CE_BLOCK], qbuf[CE_BLOCK];                                                       \
        const size_t qsz = q_is_compute ? sizeof(R) : sizeof(T);                               \
        double M = -INFINITY, S = 0.0, WQ = 0.0, WQX = 0.0;                                    \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                            \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                            \
            const char *qb = (const char *)q + b * (int64_t)qsz;                               \
            ce_prefetch_next(x + b + nb, n - b - nb, sizeof(T));                               \
            ce_prefetch_next(qb + nb * (int64_t)qsz, n - b - nb, qsz);                         \
            const R *v = ce_load_##DT(x + b, buf, nb, cap, inv_cap);                           \
            const R *qv = ce_load_q_##DT(qb, q_is_compute, qbuf, nb);                          \
            R m, s;                                                                            \
            double wq, wqx;                                                                    \
            ce_block_maxsum_##DT(v, nb, (R)M, &m, &s);                                               \
            ce_block_soft_sums_##DT(v, qv, nb, cw ? cw + b : NULL, keep, add, &wq, &wqx);      \
            WQ += wq;                                                                          \
            WQX += wqx;                                                                        \
            ce_merge(&M, &S, (double)m, (double)s);                                            \
        }                                                                                      \
        st->max = M;                                                                           \
        st->sumexp = S;                                                                        \
        st->wx = 0.0;                                                                          \
        st->xt = 0.0;                                                                          \
        st->wq = WQ;                                                                           \
        st->wqx = WQX;                                                                         \
    }

CE_PART_STATS_SOFT(f16, fl_half, float)
CE_PART_STATS_SOFT(bf16, fl_bf16, float)
CE_PART_STATS_SOFT(f32, float, float)
CE_PART_STATS_SOFT(f64, double, double)

/* Gradient of one block with soft targets (non-inlined, as ce_block_out):
 * o_j = (a p_j + (bb + c q_j) w_j) cap'_j, p_j = exp((v_j - M) - lS), w_j = cw[j] or 1;
 * with a = G (Q + 2 z lse), bb = -G eps / V, c = -G (1 - eps): w_j (bb + c q_j) = -G w_j q'_j.
 * o may be the logits (in place; v[i] is read before o[i] is written), never q. */
#define CE_BLOCK_OUT_SOFT(DT, T, R, EXP)                                                        \
    static __attribute__((noinline)) void ce_block_out_soft_##DT(const R *v, const R *q, T *o,  \
                                                                 int64_t nb, const double *cw,  \
                                                                 R cap, R inv_cap, R M, R lS,   \
                                                                 R a, R bb, R c)                \
    {                                                                                           \
        if (cap > 0) {                                                                          \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++) {                                                  \
                R w = cw ? (R)cw[i] : (R)1;                                                     \
                R th = v[i] * inv_cap;            /* tanh(x / c), from the capped value */      \
                o[i] = CE_ST_##DT((a * EXP((v[i] - M) - lS) + (bb + c * q[i]) * w) * ((R)1 - th * th)); \
            }                                                                                   \
        } else if (cw) {                                                                        \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++)                                                    \
                o[i] = CE_ST_##DT(a * EXP((v[i] - M) - lS) + (bb + c * q[i]) * (R)cw[i]);       \
        } else {                                                                                \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nb; i++)                                                    \
                o[i] = CE_ST_##DT(a * EXP((v[i] - M) - lS) + (bb + c * q[i]));                  \
        }                                                                                       \
    }

CE_BLOCK_OUT_SOFT(f16, fl_half, float, ce_expf)
CE_BLOCK_OUT_SOFT(bf16, fl_bf16, float, ce_expf)
CE_BLOCK_OUT_SOFT(f32, float, float, ce_expf)
CE_BLOCK_OUT_SOFT(f64, double, double, ce_exp)

/* Gradient pass over one part with soft targets, block by block. */
#define CE_PART_OUT_SOFT(DT, T, R)                                                              \
    static void ce_part_out_soft_##DT(const T *x, const void *q, int q_is_compute, T *out,      \
                                      int64_t n, const double *cw, R cap, R inv_cap, double M_, \
                                      double lS_, double A, double B, double C)                 \
    {                                                                                           \
        R buf[CE_BLOCK], qbuf[CE_BLOCK];                                                        \
        const size_t qsz = q_is_compute ? sizeof(R) : sizeof(T);                                \
        const R M = (R)M_, lS = (R)lS_, a = (R)A, bb = (R)B, c = (R)C;                          \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                             \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK;                             \
            const char *qb = (const char *)q + b * (int64_t)qsz;                                \
            ce_prefetch_next(x + b + nb, n - b - nb, sizeof(T));                                \
            ce_prefetch_next(qb + nb * (int64_t)qsz, n - b - nb, qsz);                          \
            const R *v = ce_load_##DT(x + b, buf, nb, cap, inv_cap);                            \
            const R *qv = ce_load_q_##DT(qb, q_is_compute, qbuf, nb);                           \
            ce_block_out_soft_##DT(v, qv, out + b, nb, cw ? cw + b : NULL, cap, inv_cap, M, lS, a, bb, c); \
        }                                                                                       \
    }

CE_PART_OUT_SOFT(f16, fl_half, float)
CE_PART_OUT_SOFT(bf16, fl_bf16, float)
CE_PART_OUT_SOFT(f32, float, float)
CE_PART_OUT_SOFT(f64, double, double)

/* ---- driver ------------------------------------------------------------------------------ */

static size_t ce_itemsize(fl_dtype dt) { return dt == FL_F64 ? 8 : (dt == FL_F32 ? 4 : 2); }

/* byte offset of row r in an array with the job's row shape and the given row strides */
static inline int64_t ce_row_offset(const fl_ce_job *J, const int64_t *strides, int64_t r)
{
    int64_t off = 0;
    for (int d = J->row_ndim - 1; d >= 0; d--) {
        int64_t n = J->row_shape[d];
        off += (r % n) * strides[d];
        r /= n;
    }
    return off;
}

/* Where part `part` of row r lies, and what its kernels need (shared by both passes). */
typedef struct {
    const char *row;          /* the row's logits */
    int64_t j0, n;            /* first class of the part, number of classes in it */
    int64_t t_off;            /* target's offset inside the part, or -1 */
    double cap, inv_cap;      /* softcap (0: off) and its reciprocal */
} ce_part_view;

static ce_part_view ce_part(const fl_ce_job *J, int64_t r, int64_t part)
{
    ce_part_view P;
    P.row = (const char *)J->logits + ce_row_offset(J, J->logits_strides, r);
    P.j0 = part * CE_PART;
    P.n = J->V - P.j0 < CE_PART ? J->V - P.j0 : CE_PART;
    const int64_t t = J->target ? J->target[r] : -1;
    P.t_off = (t >= P.j0 && t < P.j0 + P.n) ? t - P.j0 : -1;
    P.cap = J->softcap;
    P.inv_cap = P.cap > 0 ? 1.0 / P.cap : 0.0;
    return P;
}

/* Soft targets: row r's q (its class axis contiguous) and whether it is stored in the
 * compute type (else in the logits' 16-bit format). */
static inline const char *ce_soft_row(const fl_ce_job *J, int64_t r)
{
    return (const char *)J->soft_target + ce_row_offset(J, J->soft_strides, r);
}

static inline int ce_soft_is_compute(const fl_ce_job *J)
{
    return J->soft_dtype == (J->dtype == FL_F64 ? FL_F64 : FL_F32);
}

/* part `part` of row r's q */
static inline const char *ce_soft_part(const fl_ce_job *J, int64_t r, int64_t j0)
{
    const size_t qsz = ce_soft_is_compute(J) ? (J->dtype == FL_F64 ? 8 : 4) : ce_itemsize(J->dtype);
    return ce_soft_row(J, r) + j0 * (int64_t)qsz;
}

static void ce_stats_part_soft(const fl_ce_job *J, int64_t r, int64_t part, ce_stats *st)
{
    const ce_part_view P = ce_part(J, r, part);
    const int qc = ce_soft_is_compute(J);
    const char *q = ce_soft_part(J, r, P.j0);
    const double *cw = J->class_weight ? J->class_weight + P.j0 : NULL;
    const double keep = 1.0 - J->label_smoothing, add = J->label_smoothing / (double)J->V;
    const float cf = (float)P.cap, icf = (float)P.inv_cap;
    switch (J->dtype) {
    case FL_F16: ce_part_stats_soft_f16((const fl_half *)P.row + P.j0, q, qc, P.n, cw, keep, add, cf, icf, st); break;
    case FL_BF16: ce_part_stats_soft_bf16((const fl_bf16 *)P.row + P.j0, q, qc, P.n, cw, keep, add, cf, icf, st); break;
    case FL_F32: ce_part_stats_soft_f32((const float *)P.row + P.j0, q, qc, P.n, cw, keep, add, cf, icf, st); break;
    default: ce_part_stats_soft_f64((const double *)P.row + P.j0, q, qc, P.n, cw, keep, add, P.cap, P.inv_cap, st); break;
    }
}

/* Whether row r's target rank is counted: row_rank requested and the row not ignored. */
static inline int ce_rank_row(const fl_ce_job *J, int64_t r)
{
    return J->row_rank && J->target && J->target[r] != J->ignore_index;
}

/* Row r's target logit as the stats pass sees it (compute type, softcapped), read first so
 * that the rank is counted in the same pass; 0 for rows without a counted rank. */
static double ce_row_target_value(const fl_ce_job *J, int64_t r)
{
    if (!ce_rank_row(J, r)) return 0.0;
    const int64_t t = J->target[r];
    const ce_part_view P = ce_part(J, r, t / CE_PART);
    const float cf = (float)P.cap, icf = (float)P.inv_cap;
    switch (J->dtype) {
    case FL_F16: return ce_target_value_f16((const fl_half *)P.row + P.j0, P.n, P.t_off, cf, icf);
    case FL_BF16: return ce_target_value_bf16((const fl_bf16 *)P.row + P.j0, P.n, P.t_off, cf, icf);
    case FL_F32: return ce_target_value_f32((const float *)P.row + P.j0, P.n, P.t_off, cf, icf);
    default: return ce_target_value_f64((const double *)P.row + P.j0, P.n, P.t_off, P.cap, P.inv_cap);
    }
}

/* xy: the row's target value (ce_row_target_value) when its rank is counted */
static void ce_stats_part(const fl_ce_job *J, int64_t r, int64_t part, ce_stats *st, double xy)
{
    if (J->soft_target) {
        ce_stats_part_soft(J, r, part, st);
        return;
    }
    const ce_part_view P = ce_part(J, r, part);
    const int need_wx = J->target && J->label_smoothing != 0.0;
    const double *cw = (need_wx && J->class_weight) ? J->class_weight + P.j0 : NULL;
    const float cf = (float)P.cap, icf = (float)P.inv_cap;
    const int rk = ce_rank_row(J, r);
    const int64_t t_rel = rk ? J->target[r] - P.j0 : 0;
    const float xyf = (float)xy;                  /* exact: xy came from a float */
    st->xt = 0.0;
    switch (J->dtype) {
    case FL_F16: ce_part_stats_f16((const fl_half *)P.row + P.j0, P.n, P.t_off, need_wx, cw, cf, icf, rk, xyf, t_rel, st, NULL); break;
    case FL_BF16: ce_part_stats_bf16((const fl_bf16 *)P.row + P.j0, P.n, P.t_off, need_wx, cw, cf, icf, rk, xyf, t_rel, st, NULL); break;
    case FL_F32: ce_part_stats_f32((const float *)P.row + P.j0, P.n, P.t_off, need_wx, cw, cf, icf, rk, xyf, t_rel, st, NULL); break;
    default: ce_part_stats_f64((const double *)P.row + P.j0, P.n, P.t_off, need_wx, cw, P.cap, P.inv_cap, rk, xy, t_rel, st, NULL); break;
    }
}

/* Row results from its parts' stats (merged in order): lse, loss; and the gradient
 * coefficients.  Returns 0 if the row is ignored. */
typedef struct {
    double lse, M, lS, A, B, D;  /* lse = M + lS; outputs use exp((x - M) - lS): M is exact */
    int active;
} ce_row;

static ce_row ce_finish_row(const fl_ce_job *J, int64_t r, const ce_stats *parts, int64_t nparts)
{
    ce_row R = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1};
    double M = -INFINITY, S = 0.0, WX = 0.0, xt = 0.0;
    const int64_t t = J->target ? J->target[r] : -1;
    for (int64_t k = 0; k < nparts; k++) {
        ce_merge(&M, &S, parts[k].max, parts[k].sumexp);
        WX += parts[k].wx;
        if (t >= k * CE_PART && t < (k + 1) * CE_PART) xt = parts[k].xt;
    }
    R.lse = (M == -INFINITY) ? -INFINITY : M + log(S);
    if (J->row_lse) J->row_lse[r] = R.lse;
    if (J->row_rank) {                        /* parts' counts, in order (integers: exact) */
        int64_t rank = -1;
        if (t != J->ignore_index) {
            rank = 0;
            for (int64_t k = 0; k < nparts; k++) rank += (int64_t)parts[k].wq;
        }
        J->row_rank[r] = rank;
    }
    /* For the outputs: a +inf logit makes the whole row NaN (as torch's log_softmax and
     * cross_entropy); an all -inf row gives NaN through (x - M) = NaN. */
    R.M = M == INFINITY ? NAN : M;
    R.lS = log(S);
    if (M == INFINITY) R.lse = NAN;
    if (J->dtype != FL_F64 && isfinite(R.lse)) {
        /* Float outputs: exp((x - M) - lS) with M = the largest float <= lse, lS = lse - M in
         * [0, ulp): x - M is exact near the top of the row and <= 0 everywhere, lS adds no
         * rounding, whatever the reference max the stats ended with (ce_block_maxsum_f32). */
        float Mf = (float)R.lse;
        if ((double)Mf > R.lse) Mf = nextafterf(Mf, -INFINITY);
        R.M = (double)Mf;
        R.lS = R.lse - R.M;
    }
    if (J->mode != FL_CE_OUT_GRAD && !J->row_loss) return R;
    if (J->soft_target) {                     /* Q = sum w q', QX = sum w q' x: see the top */
        double Q = 0.0, QX = 0.0;
        for (int64_t k = 0; k < nparts; k++) {
            Q += parts[k].wq;
            QX += parts[k].wqx;
        }
        const double eps = J->label_smoothing;
        const double sw = J->sample_weight ? J->sample_weight[r] : 1.0;
        double loss = R.lse * Q - QX;
        if (J->z_loss != 0.0) loss += J->z_loss * R.lse * R.lse;
        if (J->row_loss) J->row_loss[r] = sw * loss;
        const double G = J->grad_scale * sw;
        R.A = G * (Q + 2.0 * J->z_loss * R.lse);
        R.B = -G * eps / (double)J->V;
        R.D = -G * (1.0 - eps);                   /* ce_out_part_soft: w_j (B + D q_j) = -G w_j q'_j */
        return R;
    }
    if (!J->target) return R;
    if (t == J->ignore_index) {
        R.active = 0;
        if (J->row_loss) J->row_loss[r] = 0.0;
        return R;
    }
    const double eps = J->label_smoothing, V = (double)J->V;
    const double wt = J->class_weight ? J->class_weight[t] : 1.0;
    const double sw = J->sample_weight ? J->sample_weight[r] : 1.0;
    const double W = J->weight_sum;
    double loss = (1.0 - eps) * wt * (R.lse - xt);
    if (eps != 0.0) loss += eps * (W * R.lse - WX) / V;
    loss *= sw;
    if (J->z_loss != 0.0) loss += J->z_loss * sw * wt * R.lse * R.lse;
    if (J->row_loss) J->row_loss[r] = loss;
    const double G = J->grad_scale * sw;
    R.A = G * ((1.0 - eps) * wt + eps * W / V + 2.0 * J->z_loss * wt * R.lse);
    R.B = -G * eps / V;
    R.D = -G * (1.0 - eps) * wt;
    return R;
}

static void ce_out_part_soft(const fl_ce_job *J, int64_t r, int64_t part, const ce_row *R)
{
    const ce_part_view P = ce_part(J, r, part);
    char *orow = (char *)J->out + ce_row_offset(J, J->out_strides, r);
    const int qc = ce_soft_is_compute(J);
    const char *q = ce_soft_part(J, r, P.j0);
    const double *cw = J->class_weight ? J->class_weight + P.j0 : NULL;
    const float cf = (float)P.cap, icf = (float)P.inv_cap;
    switch (J->dtype) {
    case FL_F16: ce_part_out_soft_f16((const fl_half *)P.row + P.j0, q, qc, (fl_half *)orow + P.j0, P.n, cw, cf, icf, R->M, R->lS, R->A, R->B, R->D); break;
    case FL_BF16: ce_part_out_soft_bf16((const fl_bf16 *)P.row + P.j0, q, qc, (fl_bf16 *)orow + P.j0, P.n, cw, cf, icf, R->M, R->lS, R->A, R->B, R->D); break;
    case FL_F32: ce_part_out_soft_f32((const float *)P.row + P.j0, q, qc, (float *)orow + P.j0, P.n, cw, cf, icf, R->M, R->lS, R->A, R->B, R->D); break;
    default: ce_part_out_soft_f64((const double *)P.row + P.j0, q, qc, (double *)orow + P.j0, P.n, cw, P.cap, P.inv_cap, R->M, R->lS, R->A, R->B, R->D); break;
    }
}

static void ce_out_part(const fl_ce_job *J, int64_t r, int64_t part, const ce_row *R)
{
    if (J->soft_target && J->mode == FL_CE_OUT_GRAD) {
        ce_out_part_soft(J, r, part, R);
        return;
    }
    const ce_part_view P = ce_part(J, r, part);
    char *orow = (char *)J->out + ce_row_offset(J, J->out_strides, r);
    const size_t isz = ce_itemsize(J->dtype);
    if (J->mode == FL_CE_OUT_GRAD && !R->active) {     /* ignored row: zero gradient */
        memset(orow + P.j0 * (int64_t)isz, 0, (size_t)P.n * isz);
        return;
    }
    const double *cw = (J->class_weight && J->label_smoothing != 0.0) ? J->class_weight + P.j0 : NULL;
    const float cf = (float)P.cap, icf = (float)P.inv_cap;
    switch (J->dtype) {
    case FL_F16: ce_part_out_f16((const fl_half *)P.row + P.j0, (fl_half *)orow + P.j0, P.n, J->mode, cw, cf, icf, R->M, R->lS, R->A, R->B, P.t_off, R->D); break;
    case FL_BF16: ce_part_out_bf16((const fl_bf16 *)P.row + P.j0, (fl_bf16 *)orow + P.j0, P.n, J->mode, cw, cf, icf, R->M, R->lS, R->A, R->B, P.t_off, R->D); break;
    case FL_F32: ce_part_out_f32((const float *)P.row + P.j0, (float *)orow + P.j0, P.n, J->mode, cw, cf, icf, R->M, R->lS, R->A, R->B, P.t_off, R->D); break;
    default: ce_part_out_f64((const double *)P.row + P.j0, (double *)orow + P.j0, P.n, J->mode, cw, P.cap, P.inv_cap, R->M, R->lS, R->A, R->B, P.t_off, R->D); break;
    }
}

/* Whether the GRAD output uses the stored exponentials (see above): decided per call from the
 * job alone, never from the thread count (rows of one part always take the rows path). */
static int ce_use_estore(const fl_ce_job *J)
{
    return J->mode == FL_CE_OUT_GRAD && J->target && !J->soft_target && !(J->softcap > 0) && J->V <= CE_PART;
}

/* Row r of a ce_use_estore job: stats storing e, the row's results, the gradient from e. */
static void ce_row_estore(const fl_ce_job *J, int64_t r)
{
    uint8_t lo[CE_PART];                              /* 16-bit outputs: e's low bytes (32 KB) */
    double bm[CE_PART / CE_BLOCK], bf[CE_PART / CE_BLOCK];
    const ce_part_view P = ce_part(J, r, 0);
    char *orow = (char *)J->out + ce_row_offset(J, J->out_strides, r);
    const int half = J->dtype == FL_F16 || J->dtype == FL_BF16;
    const ce_estore es = {half ? NULL : (void *)orow, half ? (uint16_t *)(void *)orow : NULL, half ? lo : NULL,
                          bm, bf, (const void *)orow == (const void *)P.row};
    const int need_wx = J->label_smoothing != 0.0;
    const double *cw = (need_wx && J->class_weight) ? J->class_weight : NULL;
    ce_stats st;
    st.xt = 0.0;
    switch (J->dtype) {
    case FL_F16: ce_part_stats_f16((const fl_half *)P.row, P.n, P.t_off, need_wx, cw, 0.0f, 0.0f, 0, 0.0f, 0, &st, &es); break;
    case FL_BF16: ce_part_stats_bf16((const fl_bf16 *)P.row, P.n, P.t_off, need_wx, cw, 0.0f, 0.0f, 0, 0.0f, 0, &st, &es); break;
    case FL_F32: ce_part_stats_f32((const float *)P.row, P.n, P.t_off, need_wx, cw, 0.0f, 0.0f, 0, 0.0f, 0, &st, &es); break;
    default: ce_part_stats_f64((const double *)P.row, P.n, P.t_off, need_wx, cw, 0.0, 0.0, 0, 0.0, 0, &st, &es); break;
    }
    const ce_row R = ce_finish_row(J, r, &st, 1);
    if (!R.active) {                                  /* ignored row: zero gradient */
        memset(orow, 0, (size_t)P.n * ce_itemsize(J->dtype));
        return;
    }
    /* lse = M + log S, kept split: exp((m_b - M) - log S) has no rounding of lse (p_t ~ 1 - 1e-9
     * in float64 keeps its digits); a +inf logit (M = inf) makes the row NaN, as ce_finish_row */
    const double M = st.max == INFINITY ? NAN : st.max, lS = log(st.sumexp);
    switch (J->dtype) {
    case FL_F16: ce_part_out_st_f16((fl_half *)(void *)orow, lo, P.n, cw, M, lS, R.A, R.B, P.t_off, R.D, bm, bf); break;
    case FL_BF16: ce_part_out_st_bf16((fl_bf16 *)(void *)orow, lo, P.n, cw, M, lS, R.A, R.B, P.t_off, R.D, bm, bf); break;
    case FL_F32: ce_part_out_st_f32((float *)(void *)orow, NULL, P.n, cw, M, lS, R.A, R.B, P.t_off, R.D, bm, bf); break;
    default: ce_part_out_st_f64((double *)(void *)orow, NULL, P.n, cw, M, lS, R.A, R.B, P.t_off, R.D, bm, bf); break;
    }
}

static int ce_run(const fl_ce_job *J, int nthreads)
{
    if (J->V < 1 || J->row_ndim < 0 || J->row_ndim > FL_MAX_NDIM) return FL_ERR_ARG;
    if ((int)J->dtype < 0 || J->dtype >= FL_NDTYPES) return FL_ERR_DTYPE;
    if (J->mode != FL_CE_OUT_NONE && !J->out) return FL_ERR_ARG;
    if (J->row_rank && (J->mode != FL_CE_OUT_NONE || !J->target || J->soft_target)) return FL_ERR_ARG;
    if (J->soft_target) {                     /* q in the logits' dtype or their compute type */
        if (J->target) return FL_ERR_ARG;
        if (J->soft_dtype != J->dtype && !ce_soft_is_compute(J)) return FL_ERR_DTYPE;
    }
    int64_t n_rows = 1;
    for (int d = 0; d < J->row_ndim; d++) n_rows *= J->row_shape[d];
    if (n_rows == 0) return FL_OK;
    const int64_t nparts = (J->V + CE_PART - 1) / CE_PART;
    if (J->target) {                          /* checked by the caller; checked again: no OOB read */
        for (int64_t r = 0; r < n_rows; r++) {
            int64_t t = J->target[r];
            if (t != J->ignore_index && (t < 0 || t >= J->V)) {
                J->bad_row[0] = r;
                return FL_ERR_INDEX;
            }
        }
    }
    const int64_t total = n_rows * J->V;
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (nt > total / 16384) nt = total / 16384;
    if (nt < 1) nt = 1;

    const int estore = ce_use_estore(J);                 /* implies nparts == 1: the rows path */
    if ((n_rows >= nt || nparts == 1) && nparts <= CE_STACK_PARTS) {
        /* rows across threads: each row's parts, then its output while it is in cache */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)nt) if (nt > 1)
#endif
        for (int64_t r = 0; r < n_rows; r++) {
            if (estore) {
                ce_row_estore(J, r);
                continue;
            }
            ce_stats st[CE_STACK_PARTS];
            const double xy = ce_row_target_value(J, r);      /* the target logit first (rank) */
            for (int64_t k = 0; k < nparts; k++) ce_stats_part(J, r, k, &st[k], xy);
            ce_row R = ce_finish_row(J, r, st, nparts);
            if (J->mode != FL_CE_OUT_NONE)
                for (int64_t k = 0; k < nparts; k++) ce_out_part(J, r, k, &R);
        }
        return FL_OK;
    }
    /* few long rows: parts across threads (stats), merge per row, parts across threads (output) */
    if (!J->scratch) return FL_ERR_ARG;
    ce_stats *st = (ce_stats *)(void *)J->scratch;
    ce_row *rows = (ce_row *)(void *)(J->scratch + FL_CE_STATS_DOUBLES * n_rows * nparts);   /* see fl_ce_scratch_len */
    const int64_t items = n_rows * nparts;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t it = 0; it < items; it++)
            ce_stats_part(J, it / nparts, it % nparts, &st[it], ce_row_target_value(J, it / nparts));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < n_rows; r++) rows[r] = ce_finish_row(J, r, st + r * nparts, nparts);
        if (J->mode != FL_CE_OUT_NONE) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t it = 0; it < items; it++) ce_out_part(J, it / nparts, it % nparts, &rows[it / nparts]);
        }
    }
    return FL_OK;
}
