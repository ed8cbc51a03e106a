/*
 * pointwise_body.h -- the pointwise regression kernels, written once.
 *
 * Included by each isa_*.c after a `#pragma GCC target(...)`, so the same body
 * is compiled for the baseline, AVX2+FMA+F16C and AVX-512; FL_TABLE_NAME names
 * the kernel table that the including file exports.
 *
 * Design
 * ------
 * A job is a logical array of shape (out..., red...) with per-operand byte strides
 * (see fl_pointwise_job in fastloss.h).  Work is cut into ITEMS: for each output o,
 * the reduced elements are split into fixed blocks of FL_BLOCK elements (in C order).
 * Item (o, b) walks its block as a sequence of SEGMENTS along the innermost
 * dimension; a segment is handled by a loop specialized at compile time for
 * (dtype, loss, weight or not, what is written), which the compiler vectorizes
 * when the innermost strides are unit (the common case); other strides take a
 * generic scalar loop.
 *
 * Determinism: each item writes its partial sums (sum w*l, sum w; each a double and its
 * compensation) into its own scratch slot; the slots of an output are then combined in
 * item order with Neumaier compensated summation.  The split into items does not depend
 * on the thread count, so neither does the result (bitwise).  Within a segment the sums
 * go to PW_LANES lanes in an order fixed by the source, compiled without FMA contraction:
 * every ISA gives the same bits.
 *
 * Accuracy (float64): the lanes are compensated (TwoSum per element, PW_2SUM), the lanes
 * are added with their compensations, and each item's (sum, compensation) enters the
 * cross-item Neumaier sum, so a float64 result is the sum of the (double) element losses
 * rounded once, up to O(n u^2) relative: in practice within 1 ulp of the exact sum.  Chunked
 * sums (fastloss.metrics, fastloss.dask) then agree with the one-shot result within 2 ulp.
 * The float16/bfloat16/float32 dtypes keep plain double lanes (their results are float32).
 *
 * Math per element (d = x - t, w = weight or 1), all in double:
 *   mse        l = d^2                               dl/dx = 2 d
 *   l1         l = |d|                               dl/dx = sign(d), 0 at 0, NaN at NaN
 *   huber(p)   l = 0.5 d^2 if |d| < p else p(|d| - p/2)       dl/dx = clamp(d, -p, p)
 *   smooth_l1  l = 0.5 d^2/p if |d| < p else |d| - p/2        dl/dx = d/p if |d| < p else sign(d)
 *              (= huber(p)/p, computed so: see loss_sl1)
 * (No FMA contraction in this file's kernels, see section 1: every ISA gives the same bits.)
 *   one        l = 1 (used to sum weights alone)     dl/dx = 0
 *
 * The losses on probabilities and scores (FL_PW_BCE ... FL_PW_KL_LOGT, section 3b) reuse the
 * plan, items, blocks, threads and reduction unchanged, but their segment loops read x and t
 * separately (plus an optional pos_weight stream), compute in float for float16/bfloat16/
 * float32 (double for float64) with the branch-free exp/log/log1p of fl_math.h, take the
 * per-element math from elem_ops.h, and count elements outside the loss's domain (acc[2],
 * summed into job->n_bad) instead of stopping: the caller raises.
 */
#ifndef FL_TABLE_NAME
#error "define FL_TABLE_NAME before including pointwise_body.h"
#endif

#include "fl_internal.h"
#include "fl_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Sections 1 to 8 are compiled without FMA contraction: s + w*l fused on the FMA ISAs only
 * would make the double sums differ across ISAs and break the compensated sums (PW_2SUM),
 * and z - 0.5*m (huber) fused would make the element losses differ. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ---- 1. the losses and their derivatives, in double ------------------------ */

/* clamp(v, -c, c) (c >= 0) as two min/max instructions; a NaN v stays NaN. */
static inline double pw_clamp(double v, double c)
{
    double m = c < v ? c : v;
    return m < -c ? -c : m;
}

/* The derivatives are scaled by s (mean divisor x weight) after the clamp: s * clamp(u, c),
 * a min/max pair and a product (a select multiplied afterwards made GCC distribute the
 * product into a network of blends: ~2x slower on AVX2).  Scaling before the clamp,
 * clamp(s * u, |s| c), gave inf * 0 = NaN for a zero weight and an infinite difference
 * (the reference and torch: w * clamp(d) = 0). */

static inline double loss_mse(double d, double p, double q) { (void)p; (void)q; return d * d; }
static inline double grad_mse(double d, double p, double r, double s) { (void)p; (void)r; return 2.0 * d * s; }

/* sign(d) * s: 0 at 0, NaN at NaN.  Scaling by 2^1200 (two exact steps) takes every
 * nonzero double, subnormals included, to at least 2^126 (or to inf), so the clamp gives
 * exactly +-1; s multiplies afterwards: s == 0 (a zero weight, or the mean over an infinite
 * sum of weights) gives 0 and not inf * 0 = NaN, which premultiplying by s gave for every
 * |d| > 2^-176. */
static inline double loss_l1(double d, double p, double q) { (void)p; (void)q; return fabs(d); }
static inline double grad_l1(double d, double p, double r, double s)
{
    (void)p; (void)r;
    return s * pw_clamp(d * 0x1p600 * 0x1p600, 1.0);
}

/* With m = min(|d|, p):  m (|d| - m/2)  is  |d|^2/2 when |d| < p  and  p (|d| - p/2)
 * otherwise (the halving is exact).  Four vector ops instead of a compare, two
 * products and a blend.  A NaN d gives NaN. */
static inline double loss_huber(double d, double p, double q)
{
    (void)q;
    double z = fabs(d);
    double m = z < p ? z : p;
    return m * (z - 0.5 * m);
}
static inline double grad_huber(double d, double p, double r, double s)
{
    (void)r;
    return s * pw_clamp(d, p);
}

/* p = beta > 0 (beta == 0 is sent to L1, as torch does).  The loss is huber(beta)/beta,
 * computed as such (q = 1/beta): within 2 ulp of double of torch's two-branch formula,
 * without its compare-and-blend.  The gradient is d/beta clamped to [-1, 1] with
 * r = 1/beta rounded up, so that |d| >= beta gives exactly +-1 (torch's linear branch,
 * including at |d| == beta). */
static inline double loss_sl1(double d, double p, double q) { return loss_huber(d, p, q) * q; }
static inline double grad_sl1(double d, double p, double r, double s)
{
    (void)p;
    return s * pw_clamp(d * r, 1.0);
}

static inline double loss_one(double d, double p, double q) { (void)d; (void)p; (void)q; return 1.0; }
static inline double grad_one(double d, double p, double r, double s) { (void)d; (void)p; (void)r; (void)s; return 0.0; }

/* ---- 2. storage types ------------------------------------------------------ */

#define LD_f32(v) ((double)(v))
#define ST_f32(v) ((float)(v))
#define LD_f64(v) (v)
#define ST_f64(v) (v)
#define LD_f16(v) ((double)fl_half_to_f32(v))
#define ST_f16(v) fl_f32_to_half((float)(v))
#define LD_bf16(v) ((double)fl_bf16_to_f32(v))
#define ST_bf16(v) fl_f32_to_bf16((float)(v))

/* ---- 3. unit-stride segment loops, one per (dtype, loss, weight, outputs) ---
 * n elements; x, t, g (and w when HASW) advance by one element.
 * no weight:  acc[0] += lscale * sum l;      e = lscale * l;   g = gscale * l'
 * weight:     acc[0] += sum w l, acc[1] += sum w;  e = w l;    g = gscale * w l'
 * (lscale carries a weight that is constant over the segment, e.g. broadcast.)
 * g is not restrict: it may be the input itself (in-place gradient); `omp simd`
 * states that iterations are independent, which holds for g == x.            */
/* Software prefetch PW_PF_BYTES ahead of each stream, issued per chunk of PW_CHUNK
 * elements.  A single core's bandwidth is limited by how many cache misses it keeps
 * in flight; the double-precision loop body is long enough that the out-of-order
 * window alone covers too few lines (measured: ~75% of the read bandwidth without,
 * ~90% with, AVX-512, 1 thread, 1e8 float32). */
#ifndef PW_CHUNK
#define PW_CHUNK 256
#endif
#define PW_LINE 64
#ifndef PW_PF_BYTES
#define PW_PF_BYTES 2048
#endif

/* Sums are kept in PW_LANES independent lanes (lane j takes elements j, j + PW_LANES, ...),
 * which the compiler maps onto vector registers, and the lanes are added pairwise at the
 * end of the segment.  The order of every addition is thus fixed by the source, not by
 * the vector width: all ISAs accumulate in the same order. */
#define PW_LANES 16

static inline double pw_lanes_sum(const double *v)
{
    double a[PW_LANES / 2];
    for (int j = 0; j < PW_LANES / 2; j++) a[j] = v[j] + v[j + PW_LANES / 2];
    for (int h = PW_LANES / 4; h >= 1; h /= 2)
        for (int j = 0; j < h; j++) a[j] = a[j] + a[j + h];
    return a[0];
}

/* ---- compensated double sums (float64 inputs) ----------------------------------------
 * PW_2SUM: s + a = t + e exactly (Knuth's TwoSum: six additions, no compare, no branch, so it
 * vectorizes on every ISA); the rounding error e goes to the running compensation c.  A sum
 * is kept as a pair (s, c) and rounded once at the end (s + c), which makes the float64 result
 * (nearly) the correctly rounded sum of its terms: the error is |c|'s own rounding,
 * O(n u^2) sum |terms| (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
 * sec. 4.3, and Ogita, Rump, Oishi, SIAM J. Sci. Comput. 26 (2005), Sum2).  No FMA
 * contraction here (top of section 1), so s + w*l is never fused and every ISA gets the same bits.  A non-finite s makes e NaN: every user returns the plain sum s when
 * it is not finite (inf, or nan for +inf + -inf), as np.sum does. */
#define PW_2SUM(s, c, a)                                                 \
    do {                                                                 \
        double a2_ = (a), t2_ = (s) + a2_, z2_ = t2_ - (s);              \
        (c) += ((s) - (t2_ - z2_)) + (a2_ - z2_);                        \
        (s) = t2_;                                                       \
    } while (0)

/* the lanes (v[j], cv[j]) added pairwise in the order of pw_lanes_sum, compensated: *s + *c */
static inline void pw_lanes_sum2(const double *v, const double *cv, double *s, double *c)
{
    double a[PW_LANES / 2], e[PW_LANES / 2];
    for (int j = 0; j < PW_LANES / 2; j++) {
        e[j] = cv[j] + cv[j + PW_LANES / 2];
        a[j] = v[j];
        PW_2SUM(a[j], e[j], v[j + PW_LANES / 2]);
    }
    for (int h = PW_LANES / 4; h >= 1; h /= 2)
        for (int j = 0; j < h; j++) {
            e[j] += e[j + h];
            PW_2SUM(a[j], e[j], a[j + h]);
        }
    *s = a[0];
    *c = e[0];
}

/* (s, c) += k * (v + cv): the product's rounding error by fma (exact; a libm call on the
 * baseline ISA, once per segment), so a weight constant along a segment loses nothing. */
static inline void pw_acc2(double *s, double *c, double k, double v, double cv)
{
    if (k == 1.0) {
        *c += cv;
        PW_2SUM(*s, *c, v);
    } else {
        double pr = k * v;
        *c += fma(k, v, -pr) + k * cv;
        PW_2SUM(*s, *c, pr);
    }
}

/* the rounded value of a compensated pair; a non-finite s is returned as it is */
static inline double pw_round2(double s, double c) { return isfinite(s) && c != 0.0 ? s + c : s; }

/* Compensated sum of n doubles (fl_sum_f64): 16 lanes of TwoSum, the lanes added pairwise,
 * compensated; *comp (if not NULL) receives what is left: exact sum ~= result + *comp.
 * The order is fixed by the source, so every ISA gives the same bits.  inf/nan as np.sum
 * (+inf + -inf gives nan); the lanes start at -0.0 so that a sum of -0.0 stays -0.0. */
static double pw_sum_f64(const double *x, int64_t n, double *comp)
{
    double s[PW_LANES], c[PW_LANES];
    if (comp) *comp = 0.0;
    if (n <= 0) return 0.0;
    for (int j = 0; j < PW_LANES; j++) { s[j] = -0.0; c[j] = 0.0; }
    const int64_t nv = n - n % PW_LANES;
    for (int64_t i0 = 0; i0 < nv; i0 += PW_LANES) {
        FL_PREFETCH(x + i0, PW_PF_BYTES);
        _Pragma("omp simd")
        for (int j = 0; j < PW_LANES; j++) PW_2SUM(s[j], c[j], x[i0 + j]);
    }
    for (int64_t i = nv; i < n; i++) PW_2SUM(s[i - nv], c[i - nv], x[i]);
    double S, C;
    pw_lanes_sum2(s, c, &S, &C);
    double r = pw_round2(S, C);
    if (comp && isfinite(r) && isfinite(S)) *comp = C - (r - S);
    return r;
}

typedef void (*pw_seg_fn)(int64_t n, const void *x, const void *t, const void *w, void *g,
                          void *e, double p, double q, double r, double lscale, double gscale,
                          double *acc);

#define PW_ELEM(DT, OUT, OP, HASW, R, E, G, i, L)                                                 \
    {                                                                                            \
        double d = LD_##DT(x[i]) - LD_##DT(t[i]);                                                \
        double wi = HASW ? LD_##DT(w[i]) : 1.0;                                                  \
        double l = loss_##OP(d, p, q);                                                           \
        if (R && PW_COMP_##DT) {                                                                 \
            PW_2SUM(lane_wl[L], lane_cwl[L], wi * l);                                            \
            if (HASW) PW_2SUM(lane_w[L], lane_cw[L], wi);                                        \
        } else if (R) { lane_wl[L] += wi * l; if (HASW) lane_w[L] += wi; }                       \
        if (E) e[i] = (OUT)(HASW ? wi * l : lscale * l);                                         \
        if (G) g[i] = ST_##DT(grad_##OP(d, p, r, HASW ? gscale * wi : gscale));                   \
    }

#define PW_SEG(DT, T, OUT, OP, HASW, WT, MODE, R, E, G)                                        \
    static void seg_##DT##_##OP##_##WT##_##MODE(int64_t n, const void *x_, const void *t_,     \
                                                 const void *w_, void *g_, void *e_, double p, \
                                                 double q, double r, double lscale,            \
                                                 double gscale, double *acc)                   \
    {                                                                                          \
        const T *x = (const T *)x_; /* not restrict: g may be x */                             \
        const T *FL_RESTRICT t = (const T *)t_;                                                \
        const T *FL_RESTRICT w = (const T *)w_;                                                \
        T *g = (T *)g_;                                                                        \
        OUT *FL_RESTRICT e = (OUT *)e_;                                                        \
        double lane_wl[PW_LANES], lane_w[PW_LANES], lane_cwl[PW_LANES], lane_cw[PW_LANES];     \
        (void)x; (void)t; (void)w; (void)g; (void)e; (void)lscale; (void)gscale; (void)lane_w; (void)r; \
        (void)lane_cwl; (void)lane_cw;                                                         \
        for (int j = 0; j < PW_LANES; j++) lane_wl[j] = lane_w[j] = lane_cwl[j] = lane_cw[j] = 0.0; \
        const int64_t nv = n - n % PW_LANES;                                                   \
        for (int64_t c = 0; c < nv; c += PW_CHUNK) {                                           \
            const int64_t c1 = nv - c < PW_CHUNK ? nv : c + PW_CHUNK;                          \
            for (int64_t k = c; k < c1; k += PW_LINE / (int64_t)sizeof(T)) {                   \
                FL_PREFETCH(x + k, PW_PF_BYTES);                                               \
                FL_PREFETCH(t + k, PW_PF_BYTES);                                               \
                if (HASW) FL_PREFETCH(w + k, PW_PF_BYTES);                                     \
            }                                                                                  \
            for (int64_t i0 = c; i0 < c1; i0 += PW_LANES) {                                    \
                _Pragma("omp simd")                                                            \
                for (int j = 0; j < PW_LANES; j++)                                             \
                    PW_ELEM(DT, OUT, OP, HASW, R, E, G, i0 + j, j)                             \
            }                                                                                  \
        }                                                                                      \
        for (int64_t i = nv; i < n; i++)                                                       \
            PW_ELEM(DT, OUT, OP, HASW, R, E, G, i, i - nv)                                     \
        if (R) { /* (acc[0], acc[3]) += segment's sum w l; (acc[1], acc[4]) += sum w */         \
            double s_wl, c_wl, s_w, c_w;                                                       \
            pw_lanes_sum2(lane_wl, lane_cwl, &s_wl, &c_wl);                                    \
            pw_acc2(&acc[0], &acc[3], HASW ? 1.0 : lscale, s_wl, c_wl);                        \
            if (HASW) {                                                                        \
                pw_lanes_sum2(lane_w, lane_cw, &s_w, &c_w);                                    \
                pw_acc2(&acc[1], &acc[4], 1.0, s_w, c_w);                                      \
            }                                                                                  \
        }                                                                                      \
    }

/* compensated lanes (PW_2SUM) for float64 only: the other dtypes' results are float32, for
 * which the plain double lanes are already far more than accurate enough */
#define PW_COMP_f16 0
#define PW_COMP_bf16 0
#define PW_COMP_f32 0
#define PW_COMP_f64 1

#define PW_SEG_MODES(DT, T, OUT, OP, HASW, WT)          \
    PW_SEG(DT, T, OUT, OP, HASW, WT, R, 1, 0, 0)        \
    PW_SEG(DT, T, OUT, OP, HASW, WT, E, 0, 1, 0)        \
    PW_SEG(DT, T, OUT, OP, HASW, WT, G, 0, 0, 1)        \
    PW_SEG(DT, T, OUT, OP, HASW, WT, RG, 1, 0, 1)       \
    PW_SEG(DT, T, OUT, OP, HASW, WT, EG, 0, 1, 1)

#define PW_SEG_W(DT, T, OUT, OP) PW_SEG_MODES(DT, T, OUT, OP, 0, nw) PW_SEG_MODES(DT, T, OUT, OP, 1, vw)

#define PW_SEG_OPS(DT, T, OUT)          \
    PW_SEG_W(DT, T, OUT, mse)           \
    PW_SEG_W(DT, T, OUT, l1)            \
    PW_SEG_W(DT, T, OUT, huber)         \
    PW_SEG_W(DT, T, OUT, sl1)           \
    PW_SEG_W(DT, T, OUT, one)

PW_SEG_OPS(f16, fl_half, float)
PW_SEG_OPS(bf16, fl_bf16, float)
PW_SEG_OPS(f32, float, float)
PW_SEG_OPS(f64, double, double)

/* table[dtype][op][weighted][mode]; mode index: R, E, G, RG, EG */
enum { PW_M_R = 0, PW_M_E = 1, PW_M_G = 2, PW_M_RG = 3, PW_M_EG = 4, PW_NMODES = 5 };

#define PW_TAB_MODES(DT, OP, WT)                                                    \
    { seg_##DT##_##OP##_##WT##_R, seg_##DT##_##OP##_##WT##_E, seg_##DT##_##OP##_##WT##_G, \
      seg_##DT##_##OP##_##WT##_RG, seg_##DT##_##OP##_##WT##_EG }
#define PW_TAB_W(DT, OP) { PW_TAB_MODES(DT, OP, nw), PW_TAB_MODES(DT, OP, vw) }
#define PW_TAB_OPS(DT) \
    { PW_TAB_W(DT, mse), PW_TAB_W(DT, l1), PW_TAB_W(DT, huber), PW_TAB_W(DT, sl1), PW_TAB_W(DT, one) }

#define PW_NREG (FL_PW_ONE + 1)           /* the regression ops: d = x - t */

static const pw_seg_fn pw_seg_table[FL_NDTYPES][PW_NREG][2][PW_NMODES] = {
    PW_TAB_OPS(f16), PW_TAB_OPS(bf16), PW_TAB_OPS(f32), PW_TAB_OPS(f64)
};

/* ---- 3b. the losses on probabilities and scores: x and t separately ----------
 * Same segment structure as above, but the math is in R = float for float16/bfloat16/float32
 * (double for float64) with the vectorizable exp/log of fl_math.h, the per-element function
 * comes from elem_ops.h, and there are two more streams: pos_weight (BCE with logits; a
 * vector, or a constant pwc along the segment, 1 when absent) and the count of elements
 * outside the loss's domain (acc[2]).  Sums are still accumulated in double lanes.
 * This section is compiled without FMA contraction (-ffp-contract=off for its functions):
 * GCC contracts a*b + c differently in the vectorized loop and in the scalar head/tail
 * (eo_scalar), which made the same element differ by an ulp with the segment layout (e.g. a
 * broadcast target or strided rows versus a contiguous array).  Without contraction every
 * element gets the same bits in every loop, and on every ISA (the baseline has no FMA).    */

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define EO_R float
#define EO_S f
#define EO_EXP fl_expf
#define EO_EXP_NEG fl_expf_neg
#define EO_LOG fl_logf
#define EO_LOG1P fl_log1pf
#include "elem_ops.h"
#undef EO_R
#undef EO_S
#undef EO_EXP
#undef EO_EXP_NEG
#undef EO_LOG
#undef EO_LOG1P
#define EO_R double
#define EO_S d
#define EO_EXP fl_exp
#define EO_EXP_NEG fl_exp_neg
#define EO_LOG fl_log
#define EO_LOG1P fl_log1p
#include "elem_ops.h"
#undef EO_R
#undef EO_S
#undef EO_EXP
#undef EO_EXP_NEG
#undef EO_LOG
#undef EO_LOG1P

/* loads straight into the compute type R */
#define LDR_f32(v) (v)
#define LDR_f64(v) (v)
#define LDR_f16(v) fl_half_to_f32(v)
#define LDR_bf16(v) fl_bf16_to_f32(v)

typedef struct {
    double p1, p2;          /* param (margin / gamma), param2 (alpha; focal: 1 if alpha < 0) */
    float p1f, p2f;
    double pwc;             /* the pos_weight value when there is no pos_weight operand:
                               1, or for focal 1 - alpha (1 if alpha < 0), see elem_ops.h */
} bx_par;

/* Layout-independent sums: the loss of the element at flat position k goes to lane k % PW_LANES
 * of its item (block), `lanes`, which persists across the item's segments; the lanes are added
 * pairwise once per item (pw_run_item).  Each lane is thus a sequential sum over the same
 * elements in the same order however the block is cut into segments (one segment for a
 * contiguous array, one per row for a view with strided rows), and w*l is formed per element
 * (a weight constant along the segment is `lscale`): results are bitwise identical across
 * such layouts, as they are across thread counts.  lane0 = the first element's lane.  For
 * float64 each lane is a compensated pair (lanes, lanes_c; PW_2SUM). */
typedef void (*bx_seg_fn)(int64_t n, const void *x, const void *t, const void *w, const void *pw,
                          void *g, void *e, const bx_par *par, double pwc, double lscale,
                          double gscale, double *lanes, double *lanes_c, int64_t lane0, double *acc);

#define BX_OPID_bce FL_PW_BCE
#define BX_OPID_bcel FL_PW_BCE_LOGITS
#define BX_OPID_focal FL_PW_FOCAL
#define BX_OPID_hinge FL_PW_HINGE
#define BX_OPID_kl FL_PW_KL
#define BX_OPID_kllt FL_PW_KL_LOGT

/* SCALAR = 1 (the head and tail of a segment): call eo_scalar (not inlined) instead */
#define BX_ELEM(DT, RT, RS, OUT, OP, HASW, HASPW, RED, E, G, i, L, SCALAR)                         \
    {                                                                                            \
        RT pv = HASPW ? (RT)LDR_##DT(pw[i]) : pwcr;                                                \
        RT xv = (RT)LDR_##DT(x[i]), tv = (RT)LDR_##DT(t[i]);                                     \
        eo_res_##RS res = SCALAR ? eo_scalar_##RS(BX_OPID_##OP, xv, tv, pv, p1, p2)               \
                                 : eo_##OP##_##RS(xv, tv, pv, p1, p2);                           \
        RT wi = HASW ? (RT)LDR_##DT(w[i]) : lsr;                                                   \
        RT wl = wi * res.l;                                                                      \
        if (RED && PW_COMP_##DT) {                                                               \
            PW_2SUM(lane_wl[L], lane_cwl[L], (double)wl);                                        \
            if (HASW) PW_2SUM(lane_w[L], lane_cw[L], (double)wi);                                \
        } else if (RED) { lane_wl[L] += (double)wl; if (HASW) lane_w[L] += (double)wi; }         \
        lane_bad[L] += res.bad;                                                                  \
        if (E) e[i] = (OUT)wl;                                                                   \
        if (G) g[i] = ST_##DT(res.g * (gsr * wi));                                               \
    }

#define BX_SEG(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT, MODE, RED, E, G)                             \
    static void bxseg_##DT##_##OP##_##WT##_##MODE(int64_t n, const void *x_, const void *t_,       \
                                                  const void *w_, const void *pw_, void *g_,      \
                                                  void *e_, const bx_par *par, double pwc,        \
                                                  double lscale, double gscale, double *lanes,    \
                                                  double *lanes_c, int64_t lane0, double *acc)    \
    {                                                                                            \
        const T *x = (const T *)x_; /* not restrict: g may be x */                               \
        const T *FL_RESTRICT t = (const T *)t_;                                                  \
        const T *FL_RESTRICT w = (const T *)w_;                                                  \
        const T *FL_RESTRICT pw = (const T *)pw_;                                                \
        T *g = (T *)g_;                                                                          \
        OUT *FL_RESTRICT e = (OUT *)e_;                                                          \
        const RT p1 = (RT)(sizeof(RT) == 4 ? par->p1f : par->p1);                                \
        const RT p2 = (RT)(sizeof(RT) == 4 ? par->p2f : par->p2);                                \
        const RT pwcr = (RT)pwc, lsr = (RT)lscale, gsr = (RT)gscale;                             \
        double lane_wl[PW_LANES], lane_w[PW_LANES], lane_cwl[PW_LANES], lane_cw[PW_LANES];       \
        RT lane_bad[PW_LANES];                                                                   \
        (void)x; (void)t; (void)w; (void)pw; (void)g; (void)e; (void)lsr; (void)gsr; (void)pwcr; \
        (void)lane_w; (void)lanes; (void)lanes_c; (void)lane_cwl; (void)lane_cw;                 \
        for (int j = 0; j < PW_LANES; j++) {                                                     \
            lane_wl[j] = RED ? lanes[j] : 0.0;                                                   \
            lane_cwl[j] = RED ? lanes_c[j] : 0.0;                                                \
            lane_w[j] = lane_cw[j] = 0.0;                                                        \
            lane_bad[j] = 0;                                                                     \
        }                                                                                        \
        /* head: up to the first element of lane 0; then whole groups of PW_LANES; tail */      \
        int64_t h = (PW_LANES - lane0) % PW_LANES;                                               \
        if (h > n) h = n;                                                                        \
        for (int64_t i = 0; i < h; i++)                                                          \
            BX_ELEM(DT, RT, RS, OUT, OP, HASW, HASPW, RED, E, G, i, lane0 + i, 1)                \
        const int64_t nv = h + (n - h) - (n - h) % PW_LANES;                                     \
        for (int64_t c = h; c < nv; c += PW_CHUNK) {                                             \
            const int64_t c1 = nv - c < PW_CHUNK ? nv : c + PW_CHUNK;                            \
            for (int64_t k = c; k < c1; k += PW_LINE / (int64_t)sizeof(T)) {                     \
                FL_PREFETCH(x + k, PW_PF_BYTES);                                                 \
                FL_PREFETCH(t + k, PW_PF_BYTES);                                                 \
                if (HASW) FL_PREFETCH(w + k, PW_PF_BYTES);                                       \
                if (HASPW) FL_PREFETCH(pw + k, PW_PF_BYTES);                                     \
            }                                                                                    \
            for (int64_t i0 = c; i0 < c1; i0 += PW_LANES) {                                      \
                _Pragma("omp simd")                                                              \
                for (int j = 0; j < PW_LANES; j++)                                               \
                    BX_ELEM(DT, RT, RS, OUT, OP, HASW, HASPW, RED, E, G, i0 + j, j, 0)           \
            }                                                                                    \
        }                                                                                        \
        for (int64_t i = nv; i < n; i++)                                                         \
            BX_ELEM(DT, RT, RS, OUT, OP, HASW, HASPW, RED, E, G, i, i - nv, 1)                   \
        if (RED) {                                                                               \
            for (int j = 0; j < PW_LANES; j++) { lanes[j] = lane_wl[j]; lanes_c[j] = lane_cwl[j]; } \
            if (HASW) {                                                                          \
                double s_w, c_w;                                                                 \
                pw_lanes_sum2(lane_w, lane_cw, &s_w, &c_w);                                      \
                pw_acc2(&acc[1], &acc[4], 1.0, s_w, c_w);                                        \
            }                                                                                    \
        }                                                                                        \
        RT nbad = 0;                                                                             \
        for (int j = 0; j < PW_LANES; j++) nbad += lane_bad[j];                                  \
        acc[2] += (double)nbad;                                                                  \
    }

#define BX_SEG_MODES(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT)          \
    BX_SEG(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT, R, 1, 0, 0)        \
    BX_SEG(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT, E, 0, 1, 0)        \
    BX_SEG(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT, RG, 1, 0, 1)       \
    BX_SEG(DT, T, RT, RS, OUT, OP, HASW, HASPW, WT, EG, 0, 1, 1)

/* weight: bce, bce_logits (nw = none or constant, vw = vector); pos_weight: bce_logits only
 * (np = none or constant, vp = vector); the others have neither. */
#define BX_SEG_OPS(DT, T, RT, RS, OUT)                                 \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bce, 0, 0, nw_np)                 \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bce, 1, 0, vw_np)                 \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bcel, 0, 0, nw_np)                \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bcel, 1, 0, vw_np)                \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bcel, 0, 1, nw_vp)                \
    BX_SEG_MODES(DT, T, RT, RS, OUT, bcel, 1, 1, vw_vp)                \
    BX_SEG_MODES(DT, T, RT, RS, OUT, focal, 0, 0, nw_np)               \
    BX_SEG_MODES(DT, T, RT, RS, OUT, hinge, 0, 0, nw_np)               \
    BX_SEG_MODES(DT, T, RT, RS, OUT, kl, 0, 0, nw_np)                  \
    BX_SEG_MODES(DT, T, RT, RS, OUT, kllt, 0, 0, nw_np)

BX_SEG_OPS(f16, fl_half, float, f, float)
BX_SEG_OPS(bf16, fl_bf16, float, f, float)
BX_SEG_OPS(f32, float, float, f, float)
BX_SEG_OPS(f64, double, double, d, double)

#define PW_NBX (FL_NPW - FL_PW_BCE)

/* no G mode (gradient alone: the Python layer never asks for it; such a job takes the generic
 * loop) */
#define BX_TAB_MODES(DT, OP, WT)                                                              \
    { bxseg_##DT##_##OP##_##WT##_R, bxseg_##DT##_##OP##_##WT##_E, NULL,                         \
      bxseg_##DT##_##OP##_##WT##_RG, bxseg_##DT##_##OP##_##WT##_EG }
#define BX_TAB_NONE { NULL, NULL, NULL, NULL, NULL }
#define BX_TAB_ONLY(DT, OP) { { BX_TAB_MODES(DT, OP, nw_np), BX_TAB_NONE }, { BX_TAB_NONE, BX_TAB_NONE } }
#define BX_TAB_OPS(DT)                                                                          \
    { { { BX_TAB_MODES(DT, bce, nw_np), BX_TAB_NONE }, { BX_TAB_MODES(DT, bce, vw_np), BX_TAB_NONE } }, \
      { { BX_TAB_MODES(DT, bcel, nw_np), BX_TAB_MODES(DT, bcel, nw_vp) },                         \
        { BX_TAB_MODES(DT, bcel, vw_np), BX_TAB_MODES(DT, bcel, vw_vp) } },                       \
      BX_TAB_ONLY(DT, focal), BX_TAB_ONLY(DT, hinge), BX_TAB_ONLY(DT, kl), BX_TAB_ONLY(DT, kllt) }

/* bx_seg_table[dtype][op - FL_PW_BCE][vector weight][vector pos_weight][mode] */
static const bx_seg_fn bx_seg_table[FL_NDTYPES][PW_NBX][2][2][PW_NMODES] = {
    BX_TAB_OPS(f16), BX_TAB_OPS(bf16), BX_TAB_OPS(f32), BX_TAB_OPS(f64)
};

/* generic strides (scalar): s[k] = innermost byte stride of operand k; same lanes as above */
#define BX_GENERIC(DT, T, RT, RS, OUT)                                                           \
    static void bxgen_##DT(int op, int64_t n, const char *x, const char *t, const char *w,       \
                           const char *pw, char *g, OUT *e, const int64_t *s, const bx_par *par, \
                           double lscale, double gscale, double *lanes, double *lanes_c,         \
                           int64_t lane0, double *acc)                                           \
    {                                                                                            \
        const RT p1 = (RT)(sizeof(RT) == 4 ? par->p1f : par->p1);                                \
        const RT p2 = (RT)(sizeof(RT) == 4 ? par->p2f : par->p2);                                \
        const RT gsr = (RT)gscale, lsr = (RT)lscale;                                             \
        double s_w = 0.0, nbad = 0.0;                                                            \
        for (int64_t i = 0; i < n; i++) {                                                        \
            RT xv = (RT)LDR_##DT(*(const T *)(x + i * s[FL_OP_INPUT]));                          \
            RT tv = (RT)LDR_##DT(*(const T *)(t + i * s[FL_OP_TARGET]));                         \
            RT pv = pw ? (RT)LDR_##DT(*(const T *)(pw + i * s[FL_OP_POSW])) : (RT)par->pwc;      \
            RT wi = w ? (RT)LDR_##DT(*(const T *)(w + i * s[FL_OP_WEIGHT])) : lsr;               \
            eo_res_##RS res = eo_any_##RS(op, xv, tv, pv, p1, p2);                               \
            RT wl = wi * res.l;                                                                  \
            if (PW_COMP_##DT) {                                                                  \
                PW_2SUM(lanes[(lane0 + i) % PW_LANES], lanes_c[(lane0 + i) % PW_LANES], (double)wl); \
                PW_2SUM(acc[1], acc[4], (double)wi);                                             \
            } else {                                                                             \
                lanes[(lane0 + i) % PW_LANES] += (double)wl;                                     \
                s_w += (double)wi;                                                               \
            }                                                                                    \
            nbad += (double)res.bad;                                                             \
            if (e) e[i] = (OUT)wl;                                                               \
            if (g) *(T *)(g + i * s[FL_OP_GRAD]) = ST_##DT(res.g * (gsr * wi));                  \
        }                                                                                        \
        acc[1] += s_w;                                                                           \
        acc[2] += nbad;                                                                          \
    }

BX_GENERIC(f16, fl_half, float, f, float)
BX_GENERIC(bf16, fl_bf16, float, f, float)
BX_GENERIC(f32, float, float, f, float)
BX_GENERIC(f64, double, double, d, double)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ---- 4. generic-stride segment loop (any strides, scalar) ------------------ */

static inline double pw_loss_any(int op, double d, double p, double q)
{
    switch (op) {
    case FL_PW_MSE: return loss_mse(d, p, q);
    case FL_PW_L1: return loss_l1(d, p, q);
    case FL_PW_HUBER: return loss_huber(d, p, q);
    case FL_PW_SMOOTH_L1: return loss_sl1(d, p, q);
    default: return loss_one(d, p, q);
    }
}

static inline double pw_grad_any(int op, double d, double p, double r, double s)
{
    switch (op) {
    case FL_PW_MSE: return grad_mse(d, p, r, s);
    case FL_PW_L1: return grad_l1(d, p, r, s);
    case FL_PW_HUBER: return grad_huber(d, p, r, s);
    case FL_PW_SMOOTH_L1: return grad_sl1(d, p, r, s);
    default: return grad_one(d, p, r, s);
    }
}

#define PW_GENERIC(DT, T, OUT)                                                                   \
    static void gen_##DT(int op, int64_t n, const char *x, const char *t, const char *w, char *g, \
                         OUT *e, const int64_t *s, double p, double q, double r, double gscale,  \
                         double *acc)                                                            \
    {                                                                                            \
        double s_wl = 0.0, s_w = 0.0;                                                            \
        for (int64_t i = 0; i < n; i++) {                                                        \
            double d = LD_##DT(*(const T *)(x + i * s[FL_OP_INPUT])) -                           \
                       LD_##DT(*(const T *)(t + i * s[FL_OP_TARGET]));                           \
            double wi = w ? LD_##DT(*(const T *)(w + i * s[FL_OP_WEIGHT])) : 1.0;                \
            double l = pw_loss_any(op, d, p, q);                                                 \
            if (PW_COMP_##DT) {                                                                  \
                PW_2SUM(acc[0], acc[3], wi * l);                                                 \
                PW_2SUM(acc[1], acc[4], wi);                                                     \
            } else {                                                                             \
                s_wl += wi * l;                                                                  \
                s_w += wi;                                                                       \
            }                                                                                    \
            if (e) e[i] = (OUT)(wi * l);                                                         \
            if (g) *(T *)(g + i * s[FL_OP_GRAD]) = ST_##DT(pw_grad_any(op, d, p, r, gscale * wi)); \
        }                                                                                        \
        acc[0] += s_wl;                                                                          \
        acc[1] += s_w;                                                                           \
    }

PW_GENERIC(f16, fl_half, float)
PW_GENERIC(bf16, fl_bf16, float)
PW_GENERIC(f32, float, float)
PW_GENERIC(f64, double, double)

/* ---- 5. the plan: a normalized copy of the job ---------------------------- */

typedef struct {
    const fl_pointwise_job *job;
    int ndim, nout_dims;                  /* after dropping size-1 dims and merging */
    int64_t shape[FL_MAX_NDIM];
    int64_t strides[FL_NOPERANDS][FL_MAX_NDIM];
    int present[FL_NOPERANDS];
    int64_t n_out, n_red, nblk, items;
    size_t itemsize;
    double p, q, r;                       /* parameter; 1/p (smooth L1 loss); 1/p rounded up (its grad) */
    int mode;                             /* PW_M_* */
    int fast;                             /* innermost strides allow the unit-stride loops */
    int wkind;                            /* 0 none, 1 vector, 2 constant along innermost dim */
    int pkind;                            /* pos_weight: the same three kinds */
    int bx;                               /* op >= FL_PW_BCE (section 3b) */
    bx_par par;
} pw_plan;

static size_t pw_itemsize(fl_dtype dt) { return dt == FL_F64 ? 8 : (dt == FL_F32 ? 4 : 2); }

static int pw_make_plan(const fl_pointwise_job *J, pw_plan *P)
{
    if (J->ndim < 0 || J->ndim > FL_MAX_NDIM || J->nred < 0 || J->nred > J->ndim) return FL_ERR_ARG;
    if ((int)J->dtype < 0 || J->dtype >= FL_NDTYPES) return FL_ERR_DTYPE;
    if ((int)J->op < 0 || J->op >= FL_NPW) return FL_ERR_ARG;
    if (J->op == FL_PW_SMOOTH_L1 && !(J->param > 0.0)) return FL_ERR_ARG;  /* beta == 0 is L1 */
    if (J->op == FL_PW_HUBER && !(J->param > 0.0)) return FL_ERR_ARG;
    if (J->pos_weight && J->op != FL_PW_BCE_LOGITS) return FL_ERR_ARG;
    if (J->op == FL_PW_FOCAL && !(J->param >= 0.0)) return FL_ERR_ARG;
    int reduce = J->sum_wl != NULL;
    if (reduce != (J->sum_w != NULL)) return FL_ERR_ARG;
    if (J->loss_out && (reduce || J->nred != J->ndim)) return FL_ERR_ARG;
    if (J->grad && !J->grad_scale) return FL_ERR_ARG;
    if (!reduce && !J->loss_out && !J->grad) return FL_ERR_ARG;
    if (!J->input || !J->target) return FL_ERR_ARG;

    P->job = J;
    P->itemsize = pw_itemsize(J->dtype);
    P->p = J->param;
    P->q = 1.0 / J->param;
    P->r = nextafter(1.0 / J->param, INFINITY);
    P->present[FL_OP_INPUT] = 1;
    P->present[FL_OP_TARGET] = 1;
    P->present[FL_OP_WEIGHT] = J->weight != NULL;
    P->present[FL_OP_GRAD] = J->grad != NULL;
    P->present[FL_OP_POSW] = J->pos_weight != NULL;
    P->bx = J->op >= FL_PW_BCE;
    P->par.p1 = J->param;
    P->par.p2 = J->param2;
    P->par.pwc = 1.0;
    if (J->op == FL_PW_FOCAL) {           /* alpha_t = p2 t + pwc (1 - t) */
        P->par.p2 = J->param2 >= 0.0 ? J->param2 : 1.0;
        P->par.pwc = J->param2 >= 0.0 ? 1.0 - J->param2 : 1.0;
    }
    P->par.p1f = (float)P->par.p1;
    P->par.p2f = (float)P->par.p2;
    if (reduce && J->grad) P->mode = PW_M_RG;
    else if (reduce) P->mode = PW_M_R;
    else if (J->loss_out && J->grad) P->mode = PW_M_EG;
    else if (J->loss_out) P->mode = PW_M_E;
    else P->mode = PW_M_G;

    /* Drop size-1 dims, then merge neighbours inside the same group (outputs or
     * reduced) when every present operand is contiguous across them.  Neither
     * changes the C order of the elements, so flat indices are preserved. */
    int nd = 0, nout = 0;
    int64_t n_out = 1, n_red = 1;
    int first_red = J->ndim - J->nred;
    for (int d = 0; d < J->ndim; d++) {
        int64_t n = J->shape[d];
        if (n < 0) return FL_ERR_ARG;
        if (d < first_red) n_out *= n; else n_red *= n;
        if (n == 1) continue;
        int is_out = d < first_red;
        int merge = nd > 0 && (is_out || nd > nout);   /* out dims come first */
        if (merge) {
            for (int k = 0; k < FL_NOPERANDS; k++)
                if (P->present[k] && P->strides[k][nd - 1] != J->strides[k][d] * n) merge = 0;
        }
        if (merge) {
            P->shape[nd - 1] *= n;
            for (int k = 0; k < FL_NOPERANDS; k++) P->strides[k][nd - 1] = J->strides[k][d];
        } else {
            P->shape[nd] = n;
            for (int k = 0; k < FL_NOPERANDS; k++) P->strides[k][nd] = P->present[k] ? J->strides[k][d] : 0;
            nd++;
            if (is_out) nout++;
        }
    }
    if (nd == 0 || nd == nout) {              /* no reduced dim left: add a unit one */
        P->shape[nd] = 1;
        for (int k = 0; k < FL_NOPERANDS; k++) P->strides[k][nd] = 0;
        nd++;
    }
    P->ndim = nd;
    P->nout_dims = nout;
    P->n_out = n_out;
    P->n_red = n_red;
    P->nblk = n_red == 0 ? 0 : (n_red + FL_BLOCK - 1) / FL_BLOCK;
    P->items = n_out * P->nblk;

    int last = nd - 1;
    int64_t isz = (int64_t)P->itemsize;
    int64_t sw = P->strides[FL_OP_WEIGHT][last];
    int64_t sp = P->strides[FL_OP_POSW][last];
    P->fast = P->strides[FL_OP_INPUT][last] == isz && P->strides[FL_OP_TARGET][last] == isz &&
              (!J->grad || P->strides[FL_OP_GRAD][last] == isz) &&
              (!J->weight || sw == isz || sw == 0) &&
              (!J->pos_weight || sp == isz || sp == 0);
    P->wkind = !J->weight ? 0 : (sw == 0 ? 2 : 1);
    P->pkind = !J->pos_weight ? 0 : (sp == 0 ? 2 : 1);
    return FL_OK;
}

/* ---- 6. one item: block b of output o ------------------------------------- */

/* one element of dtype dt at p, as a double */
static double pw_load1(fl_dtype dt, const char *p)
{
    switch (dt) {
    case FL_F16: return LD_f16(*(const fl_half *)p);
    case FL_BF16: return LD_bf16(*(const fl_bf16 *)p);
    case FL_F32: return LD_f32(*(const float *)p);
    default: return LD_f64(*(const double *)p);
    }
}

/* acc: sum w*l, sum w, number of elements outside the domain (section 3b ops only), and the
 * compensations of the two sums: the item's sums are acc[0] + acc[3] and acc[1] + acc[4] */
static void pw_run_item(const pw_plan *P, int64_t o, int64_t b, double *acc)
{
    const fl_pointwise_job *J = P->job;
    const int nd = P->ndim, last = nd - 1;
    int64_t r0 = b * FL_BLOCK;
    int64_t remaining = (P->n_red - r0 < FL_BLOCK) ? P->n_red - r0 : FL_BLOCK;
    int64_t flat = o * P->n_red + r0;        /* C-order index over the whole array */
    int64_t idx[FL_MAX_NDIM], off[FL_NOPERANDS] = {0, 0, 0, 0, 0};

    int64_t f = flat;
    for (int d = last; d >= 0; d--) {
        idx[d] = f % P->shape[d];
        f /= P->shape[d];
        for (int k = 0; k < FL_NOPERANDS; k++) off[k] += idx[d] * P->strides[k][d];
    }

    const char *x = (const char *)J->input, *t = (const char *)J->target;
    const char *w = (const char *)J->weight;
    char *g = (char *)J->grad;
    const size_t osz = J->dtype == FL_F64 ? sizeof(double) : sizeof(float);
    char *e = (char *)J->loss_out;
    const double gs = J->grad ? J->grad_scale[o] : 1.0;
    pw_seg_fn fn = P->fast && !P->bx ? pw_seg_table[J->dtype][J->op][P->wkind == 1][P->mode] : NULL;
    bx_seg_fn bfn = P->fast && P->bx
                        ? bx_seg_table[J->dtype][J->op - FL_PW_BCE][P->wkind == 1][P->pkind == 1][P->mode]
                        : NULL;
    const char *pw = (const char *)J->pos_weight;
    double lanes[PW_LANES], lanes_c[PW_LANES];   /* section 3b: the item's sum lanes */
    for (int j = 0; j < PW_LANES; j++) lanes[j] = lanes_c[j] = 0.0;

    while (remaining > 0) {
        int64_t seg = P->shape[last] - idx[last];
        if (seg > remaining) seg = remaining;
        const char *xs = x + off[FL_OP_INPUT], *ts = t + off[FL_OP_TARGET];
        const char *ws = w ? w + off[FL_OP_WEIGHT] : NULL;
        char *gp = g ? g + off[FL_OP_GRAD] : NULL;
        char *ep = e ? e + flat * (int64_t)osz : NULL;
        const char *pws = pw ? pw + off[FL_OP_POSW] : NULL;
        if (P->bx) {
            /* a weight (pos_weight) constant along this segment is passed as a scalar */
            double wv = P->wkind == 2 ? pw_load1(J->dtype, ws) : 1.0;
            double pv = P->pkind == 2 ? pw_load1(J->dtype, pws) : P->par.pwc;
            int64_t lane0 = (flat - r0) % PW_LANES;
            if (bfn) {
                bfn(seg, xs, ts, P->wkind == 1 ? ws : NULL, P->pkind == 1 ? pws : NULL, gp, ep, &P->par, pv,
                    wv, gs, lanes, lanes_c, lane0, acc);
                if (P->wkind != 1) pw_acc2(&acc[1], &acc[4], wv, (double)seg, 0.0);
            } else {
                int64_t s[FL_NOPERANDS];
                for (int k = 0; k < FL_NOPERANDS; k++) s[k] = P->strides[k][last];
                switch (J->dtype) {
                case FL_F16: bxgen_f16(J->op, seg, xs, ts, ws, pws, gp, (float *)ep, s, &P->par, 1.0, gs, lanes, lanes_c, lane0, acc); break;
                case FL_BF16: bxgen_bf16(J->op, seg, xs, ts, ws, pws, gp, (float *)ep, s, &P->par, 1.0, gs, lanes, lanes_c, lane0, acc); break;
                case FL_F32: bxgen_f32(J->op, seg, xs, ts, ws, pws, gp, (float *)ep, s, &P->par, 1.0, gs, lanes, lanes_c, lane0, acc); break;
                default: bxgen_f64(J->op, seg, xs, ts, ws, pws, gp, (double *)ep, s, &P->par, 1.0, gs, lanes, lanes_c, lane0, acc); break;
                }
            }
        } else if (fn) {
            if (P->wkind == 2) {             /* weight constant along this segment */
                double wv;
                switch (J->dtype) {
                case FL_F16: wv = LD_f16(*(const fl_half *)ws); break;
                case FL_BF16: wv = LD_bf16(*(const fl_bf16 *)ws); break;
                case FL_F32: wv = LD_f32(*(const float *)ws); break;
                default: wv = LD_f64(*(const double *)ws); break;
                }
                fn(seg, xs, ts, NULL, gp, ep, P->p, P->q, P->r, wv, gs * wv, acc);
                pw_acc2(&acc[1], &acc[4], wv, (double)seg, 0.0);
            } else {
                fn(seg, xs, ts, ws, gp, ep, P->p, P->q, P->r, 1.0, gs, acc);
                if (P->wkind == 0) pw_acc2(&acc[1], &acc[4], 1.0, (double)seg, 0.0);
            }
        } else {
            int64_t s[FL_NOPERANDS];
            for (int k = 0; k < FL_NOPERANDS; k++) s[k] = P->strides[k][last];
            switch (J->dtype) {
            case FL_F16: gen_f16(J->op, seg, xs, ts, ws, gp, (float *)ep, s, P->p, P->q, P->r, gs, acc); break;
            case FL_BF16: gen_bf16(J->op, seg, xs, ts, ws, gp, (float *)ep, s, P->p, P->q, P->r, gs, acc); break;
            case FL_F32: gen_f32(J->op, seg, xs, ts, ws, gp, (float *)ep, s, P->p, P->q, P->r, gs, acc); break;
            default: gen_f64(J->op, seg, xs, ts, ws, gp, (double *)ep, s, P->p, P->q, P->r, gs, acc); break;
            }
        }
        remaining -= seg;
        flat += seg;
        /* advance the multi-index by seg along the last dim, carrying upwards */
        idx[last] += seg;
        for (int k = 0; k < FL_NOPERANDS; k++) off[k] += seg * P->strides[k][last];
        for (int d = last; d > 0 && idx[d] == P->shape[d]; d--) {
            idx[d] = 0;
            idx[d - 1]++;
            for (int k = 0; k < FL_NOPERANDS; k++)
                off[k] += P->strides[k][d - 1] - P->shape[d] * P->strides[k][d];
        }
    }
    if (P->bx) {
        double sl, cl;
        pw_lanes_sum2(lanes, lanes_c, &sl, &cl);
        pw_acc2(&acc[0], &acc[3], 1.0, sl, cl);
    }
}

/* ---- 7. driver -------------------------------------------------------------- */

#define PW_MIN_PER_THREAD ((int64_t)1 << 16)   /* elements; below this, threads cost more than they give */

/* Neumaier summation of the pairs (v[0], v[1]), (v[stride], v[stride + 1]), ... (a sum and its
 * compensation each: the items' partial sums), rounded once; infinities/NaN pass through. */
static double pw_fsum2(const double *v, int64_t n, int64_t stride)
{
    double s = 0.0, c = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double a = v[i * stride], tt = s + a;
        if (isfinite(tt)) c += (fabs(s) >= fabs(a) ? (s - tt) + a : (a - tt) + s) + v[i * stride + 1];
        s = tt;
    }
    return isfinite(s) ? s + c : s;
}

static int pw_run(const fl_pointwise_job *J, int nthreads)
{
    pw_plan P;
    int st = pw_make_plan(J, &P);
    if (st != FL_OK) return st;
    const int reduce = J->sum_wl != NULL;
    if (reduce && !J->scratch && P.items > 0) return FL_ERR_ARG;

    int64_t total = P.n_out * P.n_red;
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (nt > P.items) nt = P.items;
    if (nt > total / PW_MIN_PER_THREAD) nt = total / PW_MIN_PER_THREAD;
    if (nt < 1) nt = 1;

    double *scratch = J->scratch;
    const int64_t items = P.items;
    const int64_t nblk = P.nblk;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)nt) if (nt > 1)
#endif
    for (int64_t it = 0; it < items; it++) {
        double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
        pw_run_item(&P, it / nblk, it % nblk, acc);
        if (acc[2] != 0.0 && J->n_bad) {
            int64_t nb = (int64_t)acc[2];
#ifdef _OPENMP
#pragma omp atomic
#endif
            *J->n_bad += nb;
        }
        if (reduce) {
            scratch[4 * it] = acc[0];
            scratch[4 * it + 1] = acc[3];
            scratch[4 * it + 2] = acc[1];
            scratch[4 * it + 3] = acc[4];
        }
    }
    if (reduce) {
        for (int64_t o = 0; o < P.n_out; o++) {
            J->sum_wl[o] = pw_fsum2(scratch + 4 * o * nblk, nblk, 4);
            J->sum_w[o] = pw_fsum2(scratch + 4 * o * nblk + 2, nblk, 4);
        }
    }
    return FL_OK;
}

/* ---- 8. plain read (bandwidth probe) ---------------------------------------
 * A fixed number of parts (independent of the thread count), each summing its
 * blocks in order; the parts' sums are then added in order: deterministic. */
#define READ_PARTS 64

static double read_sum_f32(const float *x, int64_t n, int nthreads)
{
    double part[READ_PARTS];
    const int64_t nblk = (n + FL_BLOCK - 1) / FL_BLOCK;
    int nt = nthreads < 1 ? 1 : nthreads;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n >= PW_MIN_PER_THREAD)
#endif
    for (int k = 0; k < READ_PARTS; k++) {
        double acc = 0.0;
        for (int64_t b = nblk * k / READ_PARTS; b < nblk * (k + 1) / READ_PARTS; b++) {
            int64_t i0 = b * FL_BLOCK, i1 = i0 + FL_BLOCK < n ? i0 + FL_BLOCK : n;
            float s = 0.0f;
            for (int64_t c = i0; c < i1; c += PW_CHUNK) {   /* same prefetching as the losses */
                const int64_t c1 = i1 - c < PW_CHUNK ? i1 : c + PW_CHUNK;
                for (int64_t k = c; k < c1; k += PW_LINE / (int64_t)sizeof(float)) FL_PREFETCH(x + k, PW_PF_BYTES);
#pragma omp simd reduction(+ : s)
                for (int64_t i = c; i < c1; i++) s += x[i];
            }
            acc += s;
        }
        part[k] = acc;
    }
    double total = 0.0;
    for (int k = 0; k < READ_PARTS; k++) total += part[k];
    return total;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma STDC FP_CONTRACT ON
#endif

#include "ce_body.h"
#include "rows_body.h"

const fl_kernel_table FL_TABLE_NAME = {pw_run, read_sum_f32, ce_run, pw_sum_f64};
