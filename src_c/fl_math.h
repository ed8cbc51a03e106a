/*
 * fl_math.h -- branch-free, vectorizable exp / log / log1p in float and double.
 *
 * GCC does not vectorize calls to libm, so the elementwise losses (pointwise_body.h,
 * elem_ops.h) use these `static inline` versions: straight-line arithmetic, integer
 * bit tricks and selects, which -O3 -fno-trapping-math turns into vector code for the
 * baseline (SSE2), AVX2 and AVX-512.  No 64-bit arithmetic shifts and no int64 <->
 * double conversions (AVX2 has neither): exponents are moved with logical shifts and
 * the "add 1.5 * 2^52" trick.
 *
 * Accuracy (max error over 2e6 random points spread over each whole range, against libm in
 * double / long double; the tests check <= 3 ulp through the losses that expose each
 * function, tests/test_elementwise_losses.py::test_math_accuracy_through_the_losses):
 *   fl_expf 1.2 ulp, fl_logf 0.8 ulp, fl_log1pf 1.5 ulp   (float)
 *   fl_exp  1.1 ulp, fl_log  1.6 ulp, fl_log1p  2.4 ulp   (double)
 * (measured with separate multiplies and adds, the baseline's arithmetic; the fused steps of
 * AVX2/AVX-512 (FLM_FMAF below) only remove roundings: e^t t through kl_div(log_target) 1.56
 * ulp with them vs 1.79 without, log through binary_cross_entropy 0.82 on both, 1e6 points).
 * Special values: exp(NaN) = NaN, exp(-inf) = 0, exp(+inf) = inf, results below the
 * smallest normal (float 1.2e-38: y < -87.3; double 2.5e-308: y < -708.3) are flushed
 * to 0 (no slow subnormal arithmetic); log(0) = -inf, log(x < 0) = NaN, log(inf) = inf,
 * subnormal x handled exactly; log1p(-1) = -inf, log1p(y < -1) = NaN.
 *
 * Method.  exp: Cody-Waite, y = k ln2 + r with ln2 split in a short exact high part and a
 * low part, |r| <= ln2/2, e^r by its Taylor polynomial (degree 7 in float: truncation
 * 5e-9 relative; degree 13 in double: 4e-18), times 2^k built as two normal powers of two
 * 2^k1 2^k2 (k1 = round(k/2)) so that k may reach 129 / 1025 and overflow rounds to inf.
 * log: x = 2^e m with m in [sqrt(1/2), sqrt(2)) (the bits of x minus those of sqrt(1/2)
 * give e and m without a compare); f = m - 1 is exact (Sterbenz).  float: log(1 + f) =
 * f - f^2/2 + f^3 P(f), P of degree 7 fitted for this range (truncation 7e-9), no division;
 * double: log m = 2 atanh(s), s = f/(m+1), |s| <= 0.1716, by its odd series 2s + 2s^3/3 +
 * ... to s^19 (truncation < 1e-17 relative).  log1p(y): u = 1 + y rounded,
 * log(u) + (y - (u - 1))/u, the first-order correction of the rounding of u (Goldberg,
 * "What every computer scientist should know about floating-point arithmetic", thm 4
 * uses the same u - 1 trick).
 */
#ifndef FL_MATH_H
#define FL_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Always inlined: they only vectorize inside the caller's loop (a call is scalar). */
#if defined(__GNUC__)
#define FL_INLINE static inline __attribute__((always_inline))
#else
#define FL_INLINE static inline
#endif

static inline float flm_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t flm_u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline double flm_f64(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline uint64_t flm_u64(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* Polynomial steps p = p * x + c.  FL_MATH_FMA (set by the AVX2 and AVX-512 translation units,
 * whose target has FMA): one fused multiply-add, written out so that the vectorized loops and
 * the scalar heads/tails of a segment compute the same bits (the kernel bodies are compiled
 * with contraction off: GCC contracted them differently in the two, see pointwise_body.h), and
 * ~1.45x faster on the elementwise kernels (BCE with logits, AVX-512) than a multiply and an
 * add.  Without it (the baseline: SSE2 has no FMA) a multiply and an add, so the baseline may
 * differ from AVX2/AVX-512 in the last bit of a result; AVX2 and AVX-512 agree bitwise. */
#if defined(FL_MATH_FMA) && FL_MATH_FMA
#define FLM_FMAF(a, b, c) __builtin_fmaf((a), (b), (c))
#define FLM_FMA(a, b, c) __builtin_fma((a), (b), (c))
#else
#define FLM_FMAF(a, b, c) ((a) * (b) + (c))
#define FLM_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* ---- float -------------------------------------------------------------------------- */

/* 2^k for an integer-valued float k in [-126, 127], from the low bits of k + 1.5 * 2^23. */
static inline float flm_pow2f(float k)
{
    return flm_f32((flm_u32(k + 12582912.0f) << 23) + 0x3F800000u);
}

FL_INLINE float fl_expf(float y)
{
    const float magic = 12582912.0f;                     /* 1.5 * 2^23: round to integer */
    float yc = y < -87.3f ? -87.3f : y;                  /* NaN passes both clamps */
    yc = yc > 89.0f ? 89.0f : yc;
    float k = (yc * 1.44269504088896341f + magic) - magic;   /* k in [-126, 129] */
    float r = yc - k * 0.693359375f;                     /* exact: 9-bit ln2 high part */
    r = r - k * -2.12194440e-4f;                         /* ln2 - 0.693359375 */
    float p = 1.9841270e-4f;                             /* 1/5040 */
    p = FLM_FMAF(p, r, 1.3888889e-3f);
    p = FLM_FMAF(p, r, 8.3333333e-3f);
    p = FLM_FMAF(p, r, 4.1666667e-2f);
    p = FLM_FMAF(p, r, 1.6666667e-1f);
    p = FLM_FMAF(p, r, 0.5f);
    p = FLM_FMAF(p, r, 1.0f);
    p = FLM_FMAF(p, r, 1.0f);
    float k1 = (k * 0.5f + magic) - magic;
    float res = p * flm_pow2f(k1) * flm_pow2f(k - k1);
    res = y < -87.3f ? 0.0f : res;
    return y > 89.0f ? INFINITY : res;
}

/* exp(y) for y <= 0 (or NaN): fl_expf without the overflow side (one power of two, no clamp
 * from above); used for exp(-|x|) in the sigmoid family.  Same accuracy and flush. */
FL_INLINE float fl_expf_neg(float y)
{
    const float magic = 12582912.0f;
    float yc = y < -87.3f ? -87.3f : y;
    float k = (yc * 1.44269504088896341f + magic) - magic;   /* k in [-126, 0] */
    float r = yc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9841270e-4f;
    p = FLM_FMAF(p, r, 1.3888889e-3f);
    p = FLM_FMAF(p, r, 8.3333333e-3f);
    p = FLM_FMAF(p, r, 4.1666667e-2f);
    p = FLM_FMAF(p, r, 1.6666667e-1f);
    p = FLM_FMAF(p, r, 0.5f);
    p = FLM_FMAF(p, r, 1.0f);
    p = FLM_FMAF(p, r, 1.0f);
    float res = p * flm_pow2f(k);
    return y < -87.3f ? 0.0f : res;
}

FL_INLINE float fl_logf(float x)
{
    int sub = x < 1.17549435e-38f;                      /* subnormal (or <= 0: fixed below) */
    float xs = sub ? x * 8388608.0f : x;                 /* 2^23 */
    /* bits(x) - bits(sqrt(1/2)), biased by 2^30 to stay non-negative for logical shifts */
    uint32_t u = flm_u32(xs) - 0x3F3504F3u + 0x40000000u;
    float e = (float)(int32_t)(u >> 23) - 128.0f - (sub ? 23.0f : 0.0f);
    float m = flm_f32((u & 0x007FFFFFu) + 0x3F3504F3u); /* [sqrt(1/2), sqrt(2)) */
    /* log(1 + f) = f - f^2/2 + f^3 P(f), f = m - 1 (exact) in [-0.293, 0.415]; P of degree 7
     * fitted here (weighted least squares on Chebyshev nodes against mpmath): truncation
     * 7e-9 relative.  No division (the double version's atanh series needs one). */
    float f = m - 1.0f;
    float z = f * f;
    float p = -7.362981140613556e-02f;
    p = FLM_FMAF(p, f, 1.2620490789413452e-01f);
    p = FLM_FMAF(p, f, -1.3202142715454102e-01f);
    p = FLM_FMAF(p, f, 1.4227096736431122e-01f);
    p = FLM_FMAF(p, f, -1.6621364653110504e-01f);
    p = FLM_FMAF(p, f, 1.9999827444553375e-01f);
    p = FLM_FMAF(p, f, -2.500085234642029e-01f);
    p = FLM_FMAF(p, f, 3.333335518836975e-01f);
    float r = f * z * p + e * -2.12194440e-4f;
    r = r - 0.5f * z;
    r = r + f;
    r = r + e * 0.693359375f;
    r = x > 0.0f ? r : (x == 0.0f ? -INFINITY : NAN);
    return x == INFINITY ? INFINITY : r;
}

FL_INLINE float fl_log1pf(float y)
{
    float u = 1.0f + y;
    float c = (y - (u - 1.0f)) / u;
    c = u > 0.0f ? c : 0.0f;                             /* y = -1: log(0) = -inf, not NaN */
    return fl_logf(u) + c;
}

/* ---- double ------------------------------------------------------------------------- */

static inline double flm_pow2(double k)                /* k integer-valued in [-1022, 1023] */
{
    return flm_f64((flm_u64(k + 6755399441055744.0) << 52) + 0x3FF0000000000000ull);
}

FL_INLINE double fl_exp(double y)
{
    const double magic = 6755399441055744.0;             /* 1.5 * 2^52 */
    double yc = y < -708.3 ? -708.3 : y;
    yc = yc > 710.0 ? 710.0 : yc;
    double k = (yc * 1.4426950408889634 + magic) - magic;   /* k in [-1022, 1025] */
    double r = yc - k * 6.93147180369123816490e-01;     /* fdlibm split: 32-bit high part */
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.6059043836821613e-10;                   /* 1/13! */
    p = FLM_FMA(p, r, 2.08767569878681e-09);
    p = FLM_FMA(p, r, 2.505210838544172e-08);
    p = FLM_FMA(p, r, 2.755731922398589e-07);
    p = FLM_FMA(p, r, 2.7557319223985893e-06);
    p = FLM_FMA(p, r, 2.48015873015873e-05);
    p = FLM_FMA(p, r, 1.984126984126984e-04);
    p = FLM_FMA(p, r, 1.388888888888889e-03);
    p = FLM_FMA(p, r, 8.333333333333333e-03);
    p = FLM_FMA(p, r, 4.1666666666666664e-02);
    p = FLM_FMA(p, r, 1.6666666666666666e-01);
    p = FLM_FMA(p, r, 0.5);
    p = FLM_FMA(p, r, 1.0);
    p = FLM_FMA(p, r, 1.0);
    double k1 = (k * 0.5 + magic) - magic;
    double res = p * flm_pow2(k1) * flm_pow2(k - k1);
    res = y < -708.3 ? 0.0 : res;
    return y > 710.0 ? INFINITY : res;
}

FL_INLINE double fl_exp_neg(double y) { return fl_exp(y); }   /* (no cheaper variant in double) */

FL_INLINE double fl_log(double x)
{
    int sub = x < 2.2250738585072014e-308;
    double xs = sub ? x * 4503599627370496.0 : x;       /* 2^52 */
    uint64_t u = flm_u64(xs) - 0x3FE6A09E667F3BCDull + 0x4000000000000000ull;
    /* e + 1024 + 2^52 as a double: OR the small integer into the mantissa of 2^52 */
    double e = flm_f64((u >> 52) | 0x4330000000000000ull) - (4503599627370496.0 + 1024.0);
    e = sub ? e - 52.0 : e;
    double m = flm_f64((u & 0x000FFFFFFFFFFFFFull) + 0x3FE6A09E667F3BCDull);
    double s = (m - 1.0) / (m + 1.0);
    double z = s * s;
    double p = 1.0 / 19.0;
    p = FLM_FMA(p, z, 1.0 / 17.0);
    p = FLM_FMA(p, z, 1.0 / 15.0);
    p = FLM_FMA(p, z, 1.0 / 13.0);
    p = FLM_FMA(p, z, 1.0 / 11.0);
    p = FLM_FMA(p, z, 1.0 / 9.0);
    p = FLM_FMA(p, z, 1.0 / 7.0);
    p = FLM_FMA(p, z, 1.0 / 5.0);
    p = FLM_FMA(p, z, 1.0 / 3.0);
    double s2 = s + s;
    double r = s2 * z * p + e * 1.90821492927058770002e-10;
    r = r + s2;
    r = r + e * 6.93147180369123816490e-01;
    r = x > 0.0 ? r : (x == 0.0 ? -INFINITY : NAN);
    return x == INFINITY ? INFINITY : r;
}

FL_INLINE double fl_log1p(double y)
{
    double u = 1.0 + y;
    double c = (y - (u - 1.0)) / u;
    c = u > 0.0 ? c : 0.0;
    return fl_log(u) + c;
}

#endif /* FL_MATH_H */
