/*
 * rows_body.h -- row losses: multi-margin, triplet margin, distillation KL, written once.
 *
 * Included by pointwise_body.h right after ce_body.h (so compiled once per ISA with the same
 * target pragma), whose helpers it reuses: the vectorizable exp (ce_expf / ce_exp), the block
 * max / (max, sum exp) kernels (ce_block_max_*, ce_block_maxsum_*: the AVX-512 intrinsics
 * variant in isa_avx512.c), the 16-bit block loaders (F16C where compiled), ce_merge.
 * The job struct and the contract of each kernel: fl_rows_job in fastloss.h.
 *
 * Design (shared by the three losses)
 * -----------------------------------
 * 1. A row of V elements is cut into PARTS of RW_PART elements (fixed: independent of the
 *    thread count), each read in BLOCKS of CE_BLOCK elements (L1): per part a few double
 *    statistics (RW_ST doubles in the scratch), accumulated per block in the compute type
 *    (float for float16/bfloat16/float32, double for float64) and added in double.
 * 2. finish(): the parts' statistics merged in part order -> the row's loss and the
 *    coefficients of its gradient (RW_RI doubles).
 * 3. out(): the gradient pass over the parts (KL only: its gradient needs the row's lse;
 *    multi-margin writes its gradient in the statistics pass, triplet does a whole row at once).
 * 4. Threads take whole rows when there are at least as many rows as threads (the output pass
 *    then reads the row again while it is in cache), else parts: statistics of every part in
 *    parallel, a merge per row, the output pass over parts in parallel.  Both paths compute the
 *    same part statistics and merge them in the same order: results are bitwise identical for
 *    any thread count.
 *
 * Math, per row:
 *   multi-margin (torch): z_j = (margin - x_y) + x_j (compute type, as torch), h_j = z_j^p if z_j > 0;
 *     loss = w_y sum_{j != y} h_j / C;  dloss/dx_j = w_y p z_j^(p-1) [z_j > 0] / C (j != y),
 *     dloss/dx_y = -sum_{j != y} dloss/dx_j.  One read of the row: x_y first, then one pass that
 *     sums h and writes the gradient; x_y's own gradient is written last (in place safe).
 *   triplet (torch): u = a - p + eps, v = a - n + eps, s = p - n + eps (compute type),
 *     d_ap = ||u||_p, d_an = ||v||_p, d_pn = ||s||_p, d_neg = d_an (min(d_an, d_pn) with swap);
 *     loss = max(0, margin + d_ap - d_neg).  Gradient where margin + d_ap - d_neg >= 0 (torch's
 *     clamp_min passes ties): with g(u)_j = d||u||/du_j = sign(u_j) |u_j|^(p-1) / ||u||^(p-1)
 *     (u_j / ||u|| for p = 2, sign(u_j) for p = 1; 0 where ||u|| = 0),
 *     da = g(u) - e_an g(v), dp = -g(u) - e_pn g(s), dn = e_an g(v) + e_pn g(s), where
 *     (e_an, e_pn) = (1, 0), (0, 1) if swap picks d_pn, (1/2, 1/2) on a tie (torch's minimum).
 *   distillation KL: a = teacher / T, b = student / T;
 *     KL = sum_j p_j (a_j - b_j) - lse(a) + lse(b), p = softmax(a), accumulated online: per block
 *     (m_a, S_a = sum e^(a - m_a), C = sum e^(a - m_a) (a - b)), blocks merged by rescaling S_a and C
 *     with e^(m_old - m_new) (Milakov & Gimelshein 2018, extended by the cross term); so
 *     KL = C / S_a + (m_b - m_a) + log S_b - log S_a.  A teacher entry of -inf has e = 0 and adds 0
 *     (xlogy's convention; 0 (a - b) would be NaN).  loss = T^2 KL;
 *     dloss/ds_j = T (softmax(b)_j - softmax(a)_j), a second pass (the row still in cache).
 */
#include "fl_internal.h"

#define RW_PART 32768              /* fl_rows_scratch_len in dispatch.c relies on this value */
#define RW_ST 8                    /* doubles of statistics per (row, part) in the scratch */
#define RW_RI 8                    /* doubles of row results per row in the scratch */

#define RW_CAT_(a, b) a##b
#define RW_CAT(a, b) RW_CAT_(a, b)

/* byte offset of row r for the given row strides */
static inline int64_t rw_offset(const fl_rows_job *J, const int64_t *strides, int64_t r)
{
    int64_t off = 0;
    for (int d = J->row_ndim - 1; d >= 0; d--) {
        const int64_t n = J->row_shape[d];
        off += (r % n) * strides[d];
        r /= n;
    }
    return off;
}

static inline size_t rw_itemsize(fl_dtype dt) { return dt == FL_F64 ? 8 : (dt == FL_F32 ? 4 : 2); }

static inline const char *rw_row(const fl_rows_job *J, int k, int64_t r)
{
    return (const char *)J->x[k] + rw_offset(J, J->x_strides[k], r);
}

static inline char *rw_grow(const fl_rows_job *J, int k, int64_t r)
{
    return (char *)J->grad[k] + rw_offset(J, J->grad_strides[k], r);
}

/* A block of n elements (stored as dt: float16, bfloat16 or float32) as floats times scale:
 * float32 with scale 1 is used in place. */
static inline const float *rw_load_f(const void *src, fl_dtype dt, float *buf, int64_t n, float scale)
{
    const float *v;
    if (dt == FL_F16) v = ce_load_f16((const fl_half *)src, buf, n, 0.0f, 0.0f);
    else if (dt == FL_BF16) v = ce_load_bf16((const fl_bf16 *)src, buf, n, 0.0f, 0.0f);
    else v = (const float *)src;
    if (scale == 1.0f) return v;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) buf[i] = v[i] * scale;
    return buf;
}

static inline const double *rw_load_d(const void *src, fl_dtype dt, double *buf, int64_t n, double scale)
{
    (void)dt;                       /* float64 rows only */
    const double *v = (const double *)src;
    if (scale == 1.0) return v;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) buf[i] = v[i] * scale;
    return buf;
}

/* Store n computed values into dst (dtype dt); dst may be the memory the values were read from. */
static inline void rw_store_f(void *dst, fl_dtype dt, const float *g, int64_t n)
{
    if (dt == FL_F16) {
        fl_half *o = (fl_half *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = fl_f32_to_half(g[i]);
    } else if (dt == FL_BF16) {
        fl_bf16 *o = (fl_bf16 *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = fl_f32_to_bf16(g[i]);
    } else {
        float *o = (float *)dst;
        if (o != g) memmove(o, g, (size_t)n * sizeof(float));
    }
}

static inline void rw_store_d(void *dst, fl_dtype dt, const double *g, int64_t n)
{
    (void)dt;
    double *o = (double *)dst;
    if (o != g) memmove(o, g, (size_t)n * sizeof(double));
}

/* One value of compute type R from element j of a row stored as dt. */
static inline double rw_elem(const char *row, fl_dtype dt, int64_t j)
{
    switch (dt) {
    case FL_F16: return (double)fl_half_to_f32(((const fl_half *)(const void *)row)[j]);
    case FL_BF16: return (double)fl_bf16_to_f32(((const fl_bf16 *)(const void *)row)[j]);
    case FL_F32: return (double)((const float *)(const void *)row)[j];
    default: return ((const double *)(const void *)row)[j];
    }
}

static inline void rw_set_elem(char *row, fl_dtype dt, int64_t j, double g)
{
    switch (dt) {
    case FL_F16: ((fl_half *)(void *)row)[j] = fl_f32_to_half((float)g); break;
    case FL_BF16: ((fl_bf16 *)(void *)row)[j] = fl_f32_to_bf16((float)g); break;
    case FL_F32: ((float *)(void *)row)[j] = (float)g; break;
    default: ((double *)(void *)row)[j] = g; break;
    }
}

/* ---- the driver (Design, points 1-4) ---------------------------------------------------------- */

typedef void (*rw_stats_fn)(const fl_rows_job *J, int64_t r, int64_t part, double *st);
typedef void (*rw_finish_fn)(const fl_rows_job *J, int64_t r, const double *st, int64_t nparts, double *ri);
typedef void (*rw_out_fn)(const fl_rows_job *J, int64_t r, int64_t part, const double *ri);

static int rw_drive(const fl_rows_job *J, int nthreads, int64_t nparts, rw_stats_fn stats, rw_finish_fn finish,
                    rw_out_fn out)
{
    int64_t n_rows = 1;
    for (int d = 0; d < J->row_ndim; d++) n_rows *= J->row_shape[d];
    if (n_rows == 0) return FL_OK;
    if (!J->scratch || !J->row_loss) return FL_ERR_ARG;
    const int64_t total = n_rows * (J->V > 0 ? J->V : 1);
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (nt > total / 16384) nt = total / 16384;
    if (nt < 1) nt = 1;
    double *st = J->scratch;                          /* RW_ST per (row, part) */
    double *ri = J->scratch + RW_ST * n_rows * nparts; /* RW_RI per row */
    if (n_rows >= nt || nparts == 1) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)nt) if (nt > 1)
#endif
        for (int64_t r = 0; r < n_rows; r++) {
            double *s = st + RW_ST * r * nparts;
            for (int64_t k = 0; k < nparts; k++) stats(J, r, k, s + RW_ST * k);
            if (finish) finish(J, r, s, nparts, ri + RW_RI * r);
            if (out)
                for (int64_t k = 0; k < nparts; k++) out(J, r, k, ri + RW_RI * r);
        }
        return FL_OK;
    }
    const int64_t items = n_rows * nparts;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t it = 0; it < items; it++) stats(J, it / nparts, it % nparts, st + RW_ST * it);
        if (finish) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t r = 0; r < n_rows; r++) finish(J, r, st + RW_ST * r * nparts, nparts, ri + RW_RI * r);
        }
        if (out) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t it = 0; it < items; it++) out(J, it / nparts, it % nparts, ri + RW_RI * (it / nparts));
        }
    }
    return FL_OK;
}

static int rw_check(const fl_rows_job *J, int nops)
{
    if (J->V < 1 || J->row_ndim < 0 || J->row_ndim > FL_MAX_NDIM) return FL_ERR_ARG;
    for (int k = 0; k < nops; k++) {
        if ((int)J->dtype[k] < 0 || J->dtype[k] >= FL_NDTYPES) return FL_ERR_DTYPE;
        if (!J->x[k]) return FL_ERR_ARG;
    }
    return FL_OK;
}

/* ---- multi-margin ----------------------------------------------------------------------------- */
/* One block: sum_i h_i over i != yb (yb = the target's index in the block, or -1) and, with g,
 * g_i = c h'(z_i) (g_yb = 0), their sum in *gs.  Non-inlined for the vectorizer (see ce_body.h). */
#define RW_MM_BLOCK(SUF, R)                                                                          \
    static __attribute__((noinline)) R rw_mm_block_##SUF(const R *v, int64_t nb, int64_t yb, R c0,  \
                                                         int p, R *g, R c, R *gs)                    \
    {                                                                                                \
        R hs = 0, gsum = 0;                                                                          \
        if (p == 1) {                                                                                \
            if (g) {                                                                                 \
                _Pragma("omp simd reduction(+:hs, gsum)")                                            \
                for (int64_t i = 0; i < nb; i++) {                                                   \
                    const R z = c0 + v[i];                                                           \
                    const int on = z > 0 && i != yb;                                                 \
                    hs += on ? z : (R)0;                                                             \
                    g[i] = on ? c : (R)0;                                                            \
                    gsum += g[i];                                                                    \
                }                                                                                    \
            } else {                                                                                 \
                _Pragma("omp simd reduction(+:hs)")                                                  \
                for (int64_t i = 0; i < nb; i++) {                                                   \
                    const R z = c0 + v[i];                                                           \
                    hs += (z > 0 && i != yb) ? z : (R)0;                                             \
                }                                                                                    \
            }                                                                                        \
        } else {                                                                                     \
            const R c2 = 2 * c;                                                                      \
            if (g) {                                                                                 \
                _Pragma("omp simd reduction(+:hs, gsum)")                                            \
                for (int64_t i = 0; i < nb; i++) {                                                   \
                    const R z = c0 + v[i];                                                           \
                    const int on = z > 0 && i != yb;                                                 \
                    hs += on ? z * z : (R)0;                                                         \
                    g[i] = on ? c2 * z : (R)0;                                                       \
                    gsum += g[i];                                                                    \
                }                                                                                    \
            } else {                                                                                 \
                _Pragma("omp simd reduction(+:hs)")                                                  \
                for (int64_t i = 0; i < nb; i++) {                                                   \
                    const R z = c0 + v[i];                                                           \
                    hs += (z > 0 && i != yb) ? z * z : (R)0;                                         \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        *gs = gsum;                                                                                  \
        return hs;                                                                                   \
    }
RW_MM_BLOCK(f, float)
RW_MM_BLOCK(d, double)

/* Part `part` of row r: st[0] = sum h (over j != y), st[1] = sum of the gradient entries written
 * (every j != y of the part; x_y's entry is left alone, written by rw_mm_finish). */
#define RW_MM_PART(SUF, R, LOAD, STORE)                                                              \
    static void rw_mm_part_##SUF(const fl_rows_job *J, int64_t r, const char *row, int64_t part,    \
                                 double *st)                                                         \
    {                                                                                                \
        R buf[CE_BLOCK], gbuf[CE_BLOCK];                                                             \
        const fl_dtype dt = J->dtype[0];                                                             \
        const size_t isz = rw_itemsize(dt);                                                          \
        const int64_t y = J->target[r];                                                              \
        const R xy = (R)rw_elem(row, dt, y);       /* read first: the gradient may overwrite x */    \
        const R c0 = (R)J->margin - xy;                                                              \
        const int p = J->p == 2.0 ? 2 : 1;                                                           \
        const double wy = J->weight ? J->weight[y] : 1.0;                                            \
        const R c = (R)(J->grad_scale * wy / (double)J->V);                                          \
        char *grow = J->grad[0] ? rw_grow(J, 0, r) : NULL;                                           \
        const int64_t j0 = part * RW_PART, n = J->V - j0 < RW_PART ? J->V - j0 : RW_PART;           \
        double H = 0.0, GS = 0.0;                                                                    \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                                  \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK, jb = j0 + b;                     \
            const char *src = row + jb * (int64_t)isz;                                               \
            ce_prefetch_next(src + nb * (int64_t)isz, n - b - nb, isz);                              \
            const R *v = LOAD(src, dt, buf, nb, (R)1);                                               \
            const int64_t yb = (y >= jb && y < jb + nb) ? y - jb : -1;                               \
            R gs = 0;                                                                                \
            H += (double)rw_mm_block_##SUF(v, nb, yb, c0, p, grow ? gbuf : NULL, c, &gs);            \
            if (grow) {                                                                              \
                GS += (double)gs;                                                                    \
                char *dst = grow + jb * (int64_t)isz;                                                \
                if (yb < 0) {                                                                        \
                    STORE(dst, dt, gbuf, nb);                                                        \
                } else {                                /* skip x_y: other parts still read it */   \
                    STORE(dst, dt, gbuf, yb);                                                        \
                    STORE(dst + (yb + 1) * (int64_t)isz, dt, gbuf + yb + 1, nb - yb - 1);            \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        st[0] = H;                                                                                   \
        st[1] = GS;                                                                                  \
    }
RW_MM_PART(f, float, rw_load_f, rw_store_f)
RW_MM_PART(d, double, rw_load_d, rw_store_d)

static void rw_mm_stats(const fl_rows_job *J, int64_t r, int64_t part, double *st)
{
    const char *row = rw_row(J, 0, r);
    if (J->dtype[0] == FL_F64) rw_mm_part_d(J, r, row, part, st);
    else rw_mm_part_f(J, r, row, part, st);
}

static void rw_mm_finish(const fl_rows_job *J, int64_t r, const double *st, int64_t nparts, double *ri)
{
    (void)ri;
    double H = 0.0, GS = 0.0;
    for (int64_t k = 0; k < nparts; k++) {
        H += st[RW_ST * k];
        GS += st[RW_ST * k + 1];
    }
    const int64_t y = J->target[r];
    const double wy = J->weight ? J->weight[y] : 1.0;
    J->row_loss[r] = wy * H / (double)J->V;
    if (J->grad[0]) rw_set_elem(rw_grow(J, 0, r), J->dtype[0], y, -GS);
}

static int rw_multi_margin(const fl_rows_job *J, int nthreads)
{
    int status = rw_check(J, 1);
    if (status != FL_OK) return status;
    if (!J->target || (J->p != 1.0 && J->p != 2.0)) return FL_ERR_ARG;
    int64_t n_rows = 1;
    for (int d = 0; d < J->row_ndim; d++) n_rows *= J->row_shape[d];
    for (int64_t r = 0; r < n_rows; r++) {     /* checked by the caller; again here: no OOB read */
        if (J->target[r] < 0 || J->target[r] >= J->V) {
            if (J->bad_row) J->bad_row[0] = r;
            return FL_ERR_INDEX;
        }
    }
    return rw_drive(J, nthreads, (J->V + RW_PART - 1) / RW_PART, rw_mm_stats, rw_mm_finish, NULL);
}

/* ---- triplet margin --------------------------------------------------------------------------- */
/* |u|^p summed over a block: p = 2 and p = 1 vectorized, other p by pow (scalar). */
#define RW_TRI_NORMSUM(SUF, R, POW, FABS)                                                            \
    static __attribute__((noinline)) void rw_tri_sums_##SUF(const R *a, const R *pp, const R *nn,   \
                                                            int64_t nb, R eps, double p, int swap,   \
                                                            R *out3)                                 \
    {                                                                                                \
        R su = 0, sv = 0, ss = 0;                                                                    \
        if (p == 2.0) {                                                                              \
            _Pragma("omp simd reduction(+:su, sv, ss)")                                              \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps, s = pp[i] - nn[i] + eps;     \
                su += u * u;                                                                         \
                sv += v * v;                                                                         \
                ss += s * s;                                                                         \
            }                                                                                        \
        } else if (p == 1.0) {                                                                       \
            _Pragma("omp simd reduction(+:su, sv, ss)")                                              \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps, s = pp[i] - nn[i] + eps;     \
                su += FABS(u);                                                                       \
                sv += FABS(v);                                                                       \
                ss += FABS(s);                                                                       \
            }                                                                                        \
        } else {                                                                                     \
            const R pr = (R)p;                                                                       \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps;                              \
                su += POW(FABS(u), pr);                                                              \
                sv += POW(FABS(v), pr);                                                              \
                if (swap) {                                                                          \
                    const R s = pp[i] - nn[i] + eps;                                                 \
                    ss += POW(FABS(s), pr);                                                          \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        out3[0] = su;                                                                                \
        out3[1] = sv;                                                                                \
        out3[2] = ss;                                                                                \
    }
RW_TRI_NORMSUM(f, float, powf, fabsf)
RW_TRI_NORMSUM(d, double, pow, fabs)

/* d||u||_p / du_j without the 1 / ||u||^(p-1) factor: u (p = 2), sign(u) (p = 1),
 * sign(u) |u|^(p-1) (other p; 0 at u = 0, as torch for p < 1). */
#define RW_TRI_GRAD(SUF, R, POW, FABS)                                                               \
    static __attribute__((noinline)) void rw_tri_grad_##SUF(const R *a, const R *pp, const R *nn,   \
                                                            int64_t nb, R eps, double p, R ku, R kv, \
                                                            R ks, R *ga, R *gp, R *gn)               \
    {                                                                                                \
        if (p == 2.0) {                                                                              \
            _Pragma("omp simd")                                                                      \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps, s = pp[i] - nn[i] + eps;     \
                const R gu = u * ku, gv = v * kv, gs = s * ks;                                       \
                ga[i] = gu - gv;                                                                     \
                gp[i] = -gu - gs;                                                                    \
                gn[i] = gv + gs;                                                                     \
            }                                                                                        \
        } else if (p == 1.0) {                                                                       \
            _Pragma("omp simd")                                                                      \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps, s = pp[i] - nn[i] + eps;     \
                const R su = u > 0 ? (R)1 : (u < 0 ? (R)-1 : (R)0);                                  \
                const R sv = v > 0 ? (R)1 : (v < 0 ? (R)-1 : (R)0);                                  \
                const R ss = s > 0 ? (R)1 : (s < 0 ? (R)-1 : (R)0);                                  \
                const R gu = su * ku, gv = sv * kv, gs = ss * ks;                                    \
                ga[i] = gu - gv;                                                                     \
                gp[i] = -gu - gs;                                                                    \
                gn[i] = gv + gs;                                                                     \
            }                                                                                        \
        } else {                                                                                     \
            const R pm1 = (R)(p - 1.0);                                                              \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R u = a[i] - pp[i] + eps, v = a[i] - nn[i] + eps, s = pp[i] - nn[i] + eps;     \
                const R fu = u == 0 ? (R)0 : (u > 0 ? POW(FABS(u), pm1) : -POW(FABS(u), pm1));        \
                const R fv = v == 0 ? (R)0 : (v > 0 ? POW(FABS(v), pm1) : -POW(FABS(v), pm1));        \
                const R fs = (ks == 0 || s == 0) ? (R)0 : (s > 0 ? POW(FABS(s), pm1) : -POW(FABS(s), pm1)); \
                const R gu = fu * ku, gv = fv * kv, gs = fs * ks;                                    \
                ga[i] = gu - gv;                                                                     \
                gp[i] = -gu - gs;                                                                    \
                gn[i] = gv + gs;                                                                     \
            }                                                                                        \
        }                                                                                            \
    }
RW_TRI_GRAD(f, float, powf, fabsf)
RW_TRI_GRAD(d, double, pow, fabs)

/* The norm from its sum of |u|^p, and the gradient factor G / ||u||^(p-1) (0 at ||u|| = 0). */
static inline double rw_tri_norm(double S, double p)
{
    if (p == 2.0) return sqrt(S);
    if (p == 1.0) return S;
    return pow(S, 1.0 / p);
}

static inline double rw_tri_factor(double d, double p, double G)
{
    if (p == 1.0) return G;
    if (d == 0.0) return 0.0;
    if (p == 2.0) return G / d;
    return G / pow(d, p - 1.0);
}

/* One whole row: the three norms (block sums in the compute type, added in double), the loss,
 * and the three gradient rows in a second pass (the rows are still in cache). */
#define RW_TRI_ROW(SUF, R, LOAD, STORE)                                                              \
    static void rw_tri_row_##SUF(const fl_rows_job *J, int64_t r)                                    \
    {                                                                                                \
        R ba[CE_BLOCK], bp[CE_BLOCK], bn[CE_BLOCK];                                                  \
        const fl_dtype dt = J->dtype[0];                                                             \
        const size_t isz = rw_itemsize(dt);                                                          \
        const char *ra = rw_row(J, 0, r), *rp = rw_row(J, 1, r), *rn = rw_row(J, 2, r);              \
        const R eps = (R)J->eps;                                                                     \
        const double p = J->p;                                                                       \
        const int64_t n = J->V;                                                                      \
        double Su = 0.0, Sv = 0.0, Ss = 0.0;                                                         \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                                  \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK, off = b * (int64_t)isz;          \
            const R *a = LOAD(ra + off, dt, ba, nb, (R)1);                                           \
            const R *pp = LOAD(rp + off, dt, bp, nb, (R)1);                                          \
            const R *nn = LOAD(rn + off, dt, bn, nb, (R)1);                                          \
            R s3[3];                                                                                 \
            rw_tri_sums_##SUF(a, pp, nn, nb, eps, p, J->swap, s3);                                   \
            Su += (double)s3[0];                                                                     \
            Sv += (double)s3[1];                                                                     \
            Ss += (double)s3[2];                                                                     \
        }                                                                                            \
        const double dap = rw_tri_norm(Su, p), dan = rw_tri_norm(Sv, p);                             \
        double dneg = dan, ean = 1.0, epn = 0.0;                                                     \
        if (J->swap) {                                                                               \
            const double dpn = rw_tri_norm(Ss, p);                                                   \
            if (dpn < dan) { dneg = dpn; ean = 0.0; epn = 1.0; }                                     \
            else if (dpn == dan) { ean = 0.5; epn = 0.5; }                                           \
            else if (dpn != dpn) { dneg = dpn; }                                                     \
        }                                                                                            \
        const double l = J->margin + dap - dneg;                                                     \
        J->row_loss[r] = l < 0.0 ? 0.0 : l;                                                          \
        if (!J->grad[0]) return;                                                                     \
        const double G = l >= 0.0 ? J->grad_scale : 0.0;   /* clamp_min: ties pass (torch) */        \
        const R ku = (R)rw_tri_factor(dap, p, G);                                                    \
        const R kv = (R)(ean * rw_tri_factor(dan, p, G));                                            \
        const R ks = (R)(epn * rw_tri_factor(J->swap ? rw_tri_norm(Ss, p) : 0.0, p, G));             \
        char *ga = rw_grow(J, 0, r), *gp = rw_grow(J, 1, r), *gn = rw_grow(J, 2, r);                 \
        R oa[CE_BLOCK], op[CE_BLOCK], on[CE_BLOCK];                                                  \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                                  \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK, off = b * (int64_t)isz;          \
            const R *a = LOAD(ra + off, dt, ba, nb, (R)1);                                           \
            const R *pp = LOAD(rp + off, dt, bp, nb, (R)1);                                          \
            const R *nn = LOAD(rn + off, dt, bn, nb, (R)1);                                          \
            rw_tri_grad_##SUF(a, pp, nn, nb, eps, p, ku, kv, ks, oa, op, on);                        \
            STORE(ga + off, dt, oa, nb);                                                             \
            STORE(gp + off, dt, op, nb);                                                             \
            STORE(gn + off, dt, on, nb);                                                             \
        }                                                                                            \
    }
RW_TRI_ROW(f, float, rw_load_f, rw_store_f)
RW_TRI_ROW(d, double, rw_load_d, rw_store_d)

static void rw_tri_stats(const fl_rows_job *J, int64_t r, int64_t part, double *st)
{
    (void)part;
    (void)st;
    if (J->dtype[0] == FL_F64) rw_tri_row_d(J, r);
    else rw_tri_row_f(J, r);
}

static int rw_triplet_margin(const fl_rows_job *J, int nthreads)
{
    int status = rw_check(J, 3);
    if (status != FL_OK) return status;
    if (J->dtype[1] != J->dtype[0] || J->dtype[2] != J->dtype[0]) return FL_ERR_DTYPE;
    if (!(J->p > 0.0) || J->p == INFINITY) return FL_ERR_ARG;
    if (J->grad[0] && (!J->grad[1] || !J->grad[2])) return FL_ERR_ARG;
    return rw_drive(J, nthreads, 1, rw_tri_stats, NULL, NULL);
}

/* ---- distillation KL -------------------------------------------------------------------------- */

/* Merge the teacher's block (m2, s2, c2) into (m1, s1, c1): as ce_merge, with the cross term
 * rescaled like the sum.  A NaN or +inf maximum makes the row NaN (softmax of +inf is NaN). */
static inline void rw_merge3(double *m1, double *s1, double *c1, double m2, double s2, double c2)
{
    if (m2 == -INFINITY && s2 == 0.0) return;
    if (*m1 == -INFINITY && *s1 == 0.0) { *m1 = m2; *s1 = s2; *c1 = c2; return; }
    if (!(m2 > -INFINITY && m2 < INFINITY) || !(*m1 > -INFINITY && *m1 < INFINITY)) {
        *m1 = NAN; *s1 = NAN; *c1 = NAN;
        return;
    }
    if (m2 > *m1) {
        const double f = ce_exp(*m1 - m2);
        *s1 = *s1 * f + s2;
        *c1 = *c1 * f + c2;
        *m1 = m2;
    } else {
        const double f = ce_exp(m2 - *m1);
        *s1 += s2 * f;
        *c1 += c2 * f;
    }
}

/* Teacher block: m = max a, s = sum e^(a - m), c = sum e^(a - m) (a - b) (e = 0 terms add 0). */
#define RW_KL_TBLOCK(SUF, R, EXP)                                                                    \
    static __attribute__((noinline)) void rw_kl_tblock_##SUF(const R *a, const R *b, int64_t nb,     \
                                                             R *mp, R *sp, R *cp)                    \
    {                                                                                                \
        R m = ce_block_max_##SUF##_(a, nb), s = 0, c = 0;                                            \
        if (m > -INFINITY && m < INFINITY) {                                                         \
            _Pragma("omp simd reduction(+:s, c)")                                                    \
            for (int64_t i = 0; i < nb; i++) {                                                       \
                const R e = EXP(a[i] - m);                                                           \
                s += e;                                                                              \
                c += e > 0 ? e * (a[i] - b[i]) : (R)0;                                               \
            }                                                                                        \
        } else {                      /* all -inf (empty) or a +inf: NaN (also for a NaN) */         \
            s = 0;                                                                                   \
            for (int64_t i = 0; i < nb; i++)                                                         \
                if (a[i] != a[i]) m = NAN;                                                           \
            if (m != -INFINITY) { m = NAN; s = NAN; c = NAN; }                                       \
        }                                                                                            \
        *mp = m;                                                                                     \
        *sp = s;                                                                                     \
        *cp = c;                                                                                     \
    }
#define ce_block_max_f_ ce_block_max_f32
#define ce_block_max_d_ ce_block_max_f64
RW_KL_TBLOCK(f, float, ce_expf)
RW_KL_TBLOCK(d, double, ce_exp)

static inline int rw_kl_ignored(const fl_rows_job *J, int64_t r)
{
    return J->target && J->target[r] == J->ignore_index;
}

/* Statistics of one part: st = (m_a, S_a, C, m_b, S_b). */
#define RW_KL_PART(SUF, R, LOAD, MAXSUM)                                                             \
    static void rw_kl_part_##SUF(const fl_rows_job *J, int64_t r, int64_t part, double *st)         \
    {                                                                                                \
        R bs[CE_BLOCK], bt[CE_BLOCK];                                                                \
        const fl_dtype ds = J->dtype[0], dtt = J->dtype[1];                                          \
        const size_t iss = rw_itemsize(ds), ist = rw_itemsize(dtt);                                  \
        const char *rs = rw_row(J, 0, r), *rt = rw_row(J, 1, r);                                     \
        const R invT = (R)(1.0 / J->temperature);                                                    \
        const int64_t j0 = part * RW_PART, n = J->V - j0 < RW_PART ? J->V - j0 : RW_PART;           \
        double MA = -INFINITY, SA = 0.0, CA = 0.0, MB = -INFINITY, SB = 0.0;                        \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                                  \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK, jb = j0 + b;                     \
            const char *ps = rs + jb * (int64_t)iss, *pt = rt + jb * (int64_t)ist;                   \
            ce_prefetch_next(ps + nb * (int64_t)iss, n - b - nb, iss);                               \
            ce_prefetch_next(pt + nb * (int64_t)ist, n - b - nb, ist);                               \
            const R *vb = LOAD(ps, ds, bs, nb, invT);                                                \
            const R *va = LOAD(pt, dtt, bt, nb, invT);                                               \
            R m, s, c;                                                                               \
            MAXSUM(vb, nb, (R)MB, &m, &s);                                                           \
            ce_merge(&MB, &SB, (double)m, (double)s);                                                \
            rw_kl_tblock_##SUF(va, vb, nb, &m, &s, &c);                                              \
            rw_merge3(&MA, &SA, &CA, (double)m, (double)s, (double)c);                               \
        }                                                                                            \
        st[0] = MA;                                                                                  \
        st[1] = SA;                                                                                  \
        st[2] = CA;                                                                                  \
        st[3] = MB;                                                                                  \
        st[4] = SB;                                                                                  \
    }
RW_KL_PART(f, float, rw_load_f, ce_block_maxsum_f32)
RW_KL_PART(d, double, rw_load_d, ce_block_maxsum_f64)

static void rw_kl_stats(const fl_rows_job *J, int64_t r, int64_t part, double *st)
{
    if (rw_kl_ignored(J, r)) return;                 /* never read: its stats are not used */
    if (J->dtype[0] == FL_F64) rw_kl_part_d(J, r, part, st);
    else rw_kl_part_f(J, r, part, st);
}

/* The reference M (<= lse, exact in the compute type) and lS = lse - M for the outputs
 * exp((x - M) - lS), as ce_finish_row. */
static inline void rw_shift(double lse, int is_f64, double *M, double *lS)
{
    if (!is_f64 && isfinite(lse)) {
        float Mf = (float)lse;
        if ((double)Mf > lse) Mf = nextafterf(Mf, -INFINITY);
        *M = (double)Mf;
    } else {
        *M = lse;
    }
    *lS = lse - *M;
    if (!isfinite(lse)) { *M = NAN; *lS = NAN; }
}

/* ri = (active, A = T grad_scale, M_b, lS_b, M_a, lS_a) */
static void rw_kl_finish(const fl_rows_job *J, int64_t r, const double *st, int64_t nparts, double *ri)
{
    if (rw_kl_ignored(J, r)) {
        J->row_loss[r] = 0.0;
        ri[0] = 0.0;
        return;
    }
    double MA = -INFINITY, SA = 0.0, CA = 0.0, MB = -INFINITY, SB = 0.0;
    for (int64_t k = 0; k < nparts; k++) {
        const double *s = st + RW_ST * k;
        rw_merge3(&MA, &SA, &CA, s[0], s[1], s[2]);
        ce_merge(&MB, &SB, s[3], s[4]);
    }
    const double T = J->temperature;
    /* KL = C / S_a + (m_b - m_a) + log S_b - log S_a (an all -inf teacher row: 0 / 0 = NaN) */
    const double kl = CA / SA + (MB - MA) + (log(SB) - log(SA));
    J->row_loss[r] = T * T * kl;
    const int f64 = J->dtype[0] == FL_F64;
    ri[0] = 1.0;
    ri[1] = T * J->grad_scale;
    const double lse_b = MB == -INFINITY ? -INFINITY : MB + log(SB);
    const double lse_a = MA == -INFINITY ? -INFINITY : MA + log(SA);
    rw_shift(lse_b, f64, &ri[2], &ri[3]);
    rw_shift(lse_a, f64, &ri[4], &ri[5]);
}

/* Gradient block: g_i = A (e^((b_i - Mb) - lSb) - e^((a_i - Ma) - lSa)); o may be b's memory. */
#define RW_KL_GBLOCK(SUF, R, EXP)                                                                    \
    static __attribute__((noinline)) void rw_kl_gblock_##SUF(const R *b, const R *a, R *o,           \
                                                             int64_t nb, R A, R Mb, R lSb, R Ma,     \
                                                             R lSa)                                  \
    {                                                                                                \
        _Pragma("omp simd")                                                                          \
        for (int64_t i = 0; i < nb; i++)                                                             \
            o[i] = A * (EXP((b[i] - Mb) - lSb) - EXP((a[i] - Ma) - lSa));                            \
    }
RW_KL_GBLOCK(f, float, ce_expf)
RW_KL_GBLOCK(d, double, ce_exp)

#define RW_KL_OUT(SUF, R, LOAD, STORE, TYPE_DT)                                                      \
    static void rw_kl_out_##SUF(const fl_rows_job *J, int64_t r, int64_t part, const double *ri)    \
    {                                                                                                \
        R bs[CE_BLOCK], bt[CE_BLOCK], go[CE_BLOCK];                                                  \
        const fl_dtype ds = J->dtype[0], dtt = J->dtype[1];                                          \
        const size_t iss = rw_itemsize(ds), ist = rw_itemsize(dtt);                                  \
        const int64_t j0 = part * RW_PART, n = J->V - j0 < RW_PART ? J->V - j0 : RW_PART;           \
        char *grow = rw_grow(J, 0, r);                                                               \
        if (ri[0] == 0.0) {                             /* ignored row: zero gradient */              \
            memset(grow + j0 * (int64_t)iss, 0, (size_t)n * iss);                                    \
            return;                                                                                  \
        }                                                                                            \
        const char *rs = rw_row(J, 0, r), *rt = rw_row(J, 1, r);                                     \
        const R invT = (R)(1.0 / J->temperature);                                                    \
        const R A = (R)ri[1], Mb = (R)ri[2], lSb = (R)ri[3], Ma = (R)ri[4], lSa = (R)ri[5];          \
        for (int64_t b = 0; b < n; b += CE_BLOCK) {                                                  \
            const int64_t nb = n - b < CE_BLOCK ? n - b : CE_BLOCK, jb = j0 + b;                     \
            const char *ps = rs + jb * (int64_t)iss, *pt = rt + jb * (int64_t)ist;                   \
            ce_prefetch_next(ps + nb * (int64_t)iss, n - b - nb, iss);                               \
            ce_prefetch_next(pt + nb * (int64_t)ist, n - b - nb, ist);                               \
            const R *vb = LOAD(ps, ds, bs, nb, invT);                                                \
            const R *va = LOAD(pt, dtt, bt, nb, invT);                                               \
            R *dst = ds == TYPE_DT ? (R *)(void *)(grow + jb * (int64_t)iss) : go;                   \
            rw_kl_gblock_##SUF(vb, va, dst, nb, A, Mb, lSb, Ma, lSa);                                \
            if (dst == go) STORE(grow + jb * (int64_t)iss, ds, go, nb);                              \
        }                                                                                            \
    }
RW_KL_OUT(f, float, rw_load_f, rw_store_f, FL_F32)
RW_KL_OUT(d, double, rw_load_d, rw_store_d, FL_F64)

static void rw_kl_out(const fl_rows_job *J, int64_t r, int64_t part, const double *ri)
{
    if (J->dtype[0] == FL_F64) rw_kl_out_d(J, r, part, ri);
    else rw_kl_out_f(J, r, part, ri);
}

static int rw_kl_div_logits(const fl_rows_job *J, int nthreads)
{
    int status = rw_check(J, 2);
    if (status != FL_OK) return status;
    if ((J->dtype[0] == FL_F64) != (J->dtype[1] == FL_F64)) return FL_ERR_DTYPE;
    if (!(J->temperature > 0.0) || !isfinite(J->temperature)) return FL_ERR_ARG;
    return rw_drive(J, nthreads, (J->V + RW_PART - 1) / RW_PART, rw_kl_stats, rw_kl_finish,
                    J->grad[0] ? rw_kl_out : NULL);
}

const fl_rows_table RW_CAT(FL_TABLE_NAME, _rows) = {rw_multi_margin, rw_triplet_margin, rw_kl_div_logits};
