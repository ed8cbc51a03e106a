/*
 * elem_ops.h -- the elementwise losses on probabilities and scores, one element at a time.
 *
 * Included twice by pointwise_body.h: with EO_R = float (EO_S = f; float16, bfloat16 and
 * float32 inputs) and EO_R = double (EO_S = d; float64 inputs), so each loss is written
 * once.  Each function takes the input x, the target t, the pos_weight value pw (1 when
 * absent) and the two options p1, p2, and returns the loss l, its derivative g = dl/dx and
 * bad = 1 if the element is outside the loss's domain (the caller counts them and the
 * Python layer raises), else 0.  The math follows torch (aten/src/ATen/native/Loss.cpp,
 * torchvision.ops.sigmoid_focal_loss); exp/log/log1p are the vectorizable ones of fl_math.h.
 *
 *   bce       l = -(t max(log x, -100) + (1-t) max(log1p(-x), -100))
 *             g = (x - t) / max((1 - x) x, 1e-12)                 bad: x or t outside [0, 1] / NaN
 *   bce_logits (pw = pos_weight)
 *             l = (1-t) sp(x) + pw t sp(-x),   sp(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|)
 *             g = (1-t) s - pw t (1 - s),      s = sigmoid(x)
 *             (= torch's (1-t) x - (1 + (pw-1) t) log sigmoid(x), rewritten with x = sp(x) - sp(-x)
 *             so that no term cancels: exact 0 at logits of -1e4 with t = 0)
 *   focal     (p1 = gamma >= 0, p2 = alpha, pw = 1 - alpha; alpha < 0: p2 = pw = 1, no weighting)
 *             ce = bce_logits(x, t) with pw = 1, u = 1 - p_t = s (1-t) + (1-s) t,
 *             a = alpha t + (1-alpha)(1-t),  l = a ce u^gamma
 *             g = a (ce' u^gamma + ce gamma u^gamma u'/u),  ce' = (1-t) s - t (1-s),
 *             u' = s (1-s) (1-2t); the second term is 0 where u == 0 (its limit for every
 *             gamma > 0; torch's autograd of pow gives NaN there when gamma < 1)
 *   hinge     (p1 = margin) v = margin - t x,  l = max(v, 0) (NaN stays NaN),
 *             g = -t where v > 0 else 0                            bad: t not exactly -1 or +1
 *   kl        l = xlogy(t, t) - t x  (0 where t == 0),  g = -t
 *   kl_logt   l = e^t (t - x),  g = -e^t
 * 1 - s is computed as e/(1+e) or 1/(1+e) (e = exp(-|x|)), never as 1 - s.
 */
#if !defined(EO_R) || !defined(EO_S)
#error "define EO_R and EO_S before including elem_ops.h"
#endif

#define EO_CAT3(a, b) a##_##b
#define EO_CAT2(a, b) EO_CAT3(a, b)
#define EO_FN(name) EO_CAT2(name, EO_S)

typedef struct { EO_R l, g, bad; } EO_FN(eo_res);

/* sigmoid pieces of x: s = sigmoid(x), c = 1 - s, L = log1p(exp(-|x|)) */
typedef struct { EO_R s, c, L; } EO_FN(eo_sig);

FL_INLINE EO_FN(eo_sig) EO_FN(eo_sigmoid)(EO_R x)
{
    EO_FN(eo_sig) r;
    EO_R e = EO_EXP_NEG(-(x < 0 ? -x : x));
    EO_R u = (EO_R)1 + e;
    EO_R inv = (EO_R)1 / u;
    EO_R ei = e * inv;
    r.s = x >= 0 ? inv : ei;
    r.c = x >= 0 ? ei : inv;
    /* log1p(e) as in fl_log1p: log(u) + (e - (u - 1))/u, the correction being at most half an
     * ulp of u, so 1/u is replaced by 1.5 - u/2 (exact at u = 1 and 2, within 13 % between):
     * no division when only the loss is needed (the forward pass). */
    r.L = EO_LOG(u) + (e - (u - (EO_R)1)) * ((EO_R)1.5 - (EO_R)0.5 * u);
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_bce)(EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    (void)pw; (void)p1; (void)p2;
    EO_FN(eo_res) r;
    EO_R lx = EO_LOG(x), l1x = EO_LOG1P(-x);
    lx = lx > (EO_R)-100 ? lx : (EO_R)-100;
    l1x = l1x > (EO_R)-100 ? l1x : (EO_R)-100;
    r.l = (t - (EO_R)1) * l1x - t * lx;
    EO_R den = ((EO_R)1 - x) * x;
    den = den > (EO_R)1e-12 ? den : (EO_R)1e-12;
    r.g = (x - t) / den;
    int ok = (x >= 0) & (x <= 1) & (t >= 0) & (t <= 1);
    r.bad = ok ? (EO_R)0 : (EO_R)1;
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_bcel)(EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    (void)p1; (void)p2;
    EO_FN(eo_res) r;
    EO_FN(eo_sig) q = EO_FN(eo_sigmoid)(x);
    EO_R spp = (x > 0 ? x : (EO_R)0) + q.L;         /* softplus(x) */
    EO_R spn = (x < 0 ? -x : (EO_R)0) + q.L;        /* softplus(-x) */
    EO_R pt = pw * t;
    r.l = ((EO_R)1 - t) * spp + pt * spn;
    r.g = ((EO_R)1 - t) * q.s - pt * q.c;
    r.bad = 0;
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_focal)(EO_R x, EO_R t, EO_R alpha_c, EO_R gamma, EO_R alpha)
{
    EO_FN(eo_res) r;
    EO_FN(eo_sig) q = EO_FN(eo_sigmoid)(x);
    EO_R spp = (x > 0 ? x : (EO_R)0) + q.L;
    EO_R spn = (x < 0 ? -x : (EO_R)0) + q.L;
    EO_R t1 = (EO_R)1 - t;
    EO_R ce = t1 * spp + t * spn;
    EO_R dce = t1 * q.s - t * q.c;
    EO_R u = q.s * t1 + q.c * t;
    /* u^gamma = exp(gamma log u), log u floored at -1e30 so that gamma = 0 gives 1 at u = 0
     * (torch's pow(0, 0) = 1) without a select on gamma alone (GCC does not vectorize a
     * select whose condition is loop-invariant next to a constant); the usual gamma = 2 and
     * gamma = 1 are exact products (selects between two vector values vectorize). */
    EO_R lu = EO_LOG(u);
    lu = lu > (EO_R)-1e30 ? lu : (EO_R)-1e30;
    EO_R pg = EO_EXP(gamma * lu);
    EO_R gv = gamma + u * (EO_R)0;                   /* gamma as a vector: see above */
    pg = gv == (EO_R)2 ? u * u : pg;
    pg = gv == (EO_R)1 ? u : pg;
    /* alpha_t = alpha t + (1 - alpha)(1 - t); the caller passes alpha = (alpha, 1 - alpha),
     * or (1, 1) when alpha < 0 (no weighting: t + (1 - t) = 1 for binary targets) */
    EO_R a = alpha * t + alpha_c * t1;
    r.l = a * ce * pg;
    EO_R du = q.s * q.c * ((EO_R)1 - (EO_R)2 * t);
    EO_R term = u > 0 ? gamma * pg * du / u : (EO_R)0;
    r.g = a * (dce * pg + ce * term);
    r.bad = 0;
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_hinge)(EO_R x, EO_R t, EO_R pw, EO_R margin, EO_R p2)
{
    (void)pw; (void)p2;
    EO_FN(eo_res) r;
    EO_R v = margin - t * x;
    r.l = v <= 0 ? (EO_R)0 : v;                      /* NaN v: NaN */
    r.g = v > 0 ? -t : (EO_R)0;
    int ok = (t == (EO_R)1) | (t == (EO_R)-1);
    r.bad = ok ? (EO_R)0 : (EO_R)1;
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_kl)(EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    (void)pw; (void)p1; (void)p2;
    EO_FN(eo_res) r;
    EO_R xl = t == 0 ? (EO_R)0 : t * EO_LOG(t);      /* xlogy(t, t); NaN t gives NaN */
    r.l = xl - t * x;
    r.g = -t;
    r.bad = 0;
    return r;
}

FL_INLINE EO_FN(eo_res) EO_FN(eo_kllt)(EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    (void)pw; (void)p1; (void)p2;
    EO_FN(eo_res) r;
    EO_R et = EO_EXP(t);
    r.l = et * (t - x);
    r.g = -et;
    r.bad = 0;
    return r;
}

/* any op, chosen at run time (the generic-stride loop) */
FL_INLINE EO_FN(eo_res) EO_FN(eo_any)(int op, EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    switch (op) {
    case FL_PW_BCE: return EO_FN(eo_bce)(x, t, pw, p1, p2);
    case FL_PW_BCE_LOGITS: return EO_FN(eo_bcel)(x, t, pw, p1, p2);
    case FL_PW_FOCAL: return EO_FN(eo_focal)(x, t, pw, p1, p2);
    case FL_PW_HINGE: return EO_FN(eo_hinge)(x, t, pw, p1, p2);
    case FL_PW_KL: return EO_FN(eo_kl)(x, t, pw, p1, p2);
    default: return EO_FN(eo_kllt)(x, t, pw, p1, p2);
    }
}

/* the same, not inlined: the scalar head and tail of the segment loops call this, so that each
 * segment function inlines the (long) math once, in its vector loop (compile time, code size) */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static EO_FN(eo_res) EO_FN(eo_scalar)(int op, EO_R x, EO_R t, EO_R pw, EO_R p1, EO_R p2)
{
    return EO_FN(eo_any)(op, x, t, pw, p1, p2);
}

#undef EO_FN
#undef EO_CAT2
#undef EO_CAT3
