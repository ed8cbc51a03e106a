/*
 * fastloss.h -- public C API of the fastloss kernels.
 *
 * Plain C99 (+ OpenMP pragmas in the implementation).  No Python here: these
 * functions can be called from any C program.  Conventions:
 *   - every function returns a status code (FL_OK = 0, negative = error) and
 *     never allocates, prints or exits; scratch space is supplied by the caller;
 *   - sizes and indices are int64_t, strides are in BYTES (NumPy convention),
 *     may be negative or zero (broadcast);
 *   - floating inputs come in four storage types (fl_dtype); the math is done in
 *     double for the regression losses, sums are accumulated in double;
 *   - nthreads: the number of OpenMP threads a call may use; values < 1 mean 1
 *     (never "all cores").  Work is split in fixed chunks and partial sums are
 *     combined in a fixed order, so results are bitwise identical for any nthreads;
 *   - the kernels are reentrant: concurrent calls on different jobs are safe.
 *
 * Using it from C without Python: `fastloss.get_include()` is the directory of this
 * header and `fastloss.get_library_dir()` the directory of libfastloss.so (the same
 * kernels as the Python extension, linked into a plain shared library):
 *     cc prog.c -I$INC -L$LIB -lfastloss -Wl,-rpath,$LIB
 * The library has its own ISA dispatch state (fl_set_isa in a C program does not
 * change the Python extension's choice, and vice versa).  docs/c_api.md describes
 * the ABI in full.
 */
#ifndef FASTLOSS_H
#define FASTLOSS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version of this header.  Bumped when a job struct, an enum value or a function
 * signature changes incompatibly (appending a struct member is a change: the structs are
 * allocated by the caller).  A program compiled against this header can check the library
 * it loaded:  if (fl_abi_version() != FL_ABI_VERSION) { ... refuse to run ... } */
#define FL_ABI_VERSION 1
int fl_abi_version(void);             /* the FL_ABI_VERSION the library was built with */

#define FL_MAX_NDIM 64          /* >= NPY_MAXDIMS (64 in NumPy 2) */
#define FL_BLOCK 8192           /* elements per reduction block (fixed: results do not depend on threads) */

enum {
    FL_OK = 0,
    FL_ERR_ARG = -1,            /* inconsistent arguments (a bug in the caller) */
    FL_ERR_DTYPE = -2,          /* unsupported dtype code */
    FL_ERR_NDIM = -3,           /* too many dimensions */
    FL_ERR_ISA = -4,            /* ISA not compiled in or not supported by this CPU */
    FL_ERR_INDEX = -5           /* a target out of range (its row in job->bad_row[0]) */
};

typedef enum { FL_F16 = 0, FL_BF16 = 1, FL_F32 = 2, FL_F64 = 3, FL_NDTYPES = 4 } fl_dtype;

typedef enum { FL_ISA_BASELINE = 0, FL_ISA_AVX2 = 1, FL_ISA_AVX512 = 2, FL_NISA = 3 } fl_isa;

/* Pointwise losses: the regression losses are functions l(d) of d = input - target; the
 * losses on probabilities and scores (BCE_LOGITS ... KL_LOGT) take x and t separately and
 * are computed in float for float16/bfloat16/float32 and in double for float64 (see
 * src_c/elem_ops.h for the formulas). */
typedef enum {
    FL_PW_MSE = 0,              /* d^2                                           */
    FL_PW_L1 = 1,               /* |d|                                           */
    FL_PW_HUBER = 2,            /* 0.5 d^2 if |d| < p else p (|d| - 0.5 p)       */
    FL_PW_SMOOTH_L1 = 3,        /* 0.5 d^2 / p if |d| < p else |d| - 0.5 p       */
    FL_PW_ONE = 4,              /* 1 (sums the weights only; reads no input)     */
    FL_PW_BCE = 5,              /* binary cross-entropy on probabilities (domain-checked) */
    FL_PW_BCE_LOGITS = 6,       /* BCE with logits; pos_weight operand (NULL: 1)  */
    FL_PW_FOCAL = 7,            /* sigmoid focal: param = gamma, param2 = alpha    */
    FL_PW_HINGE = 8,            /* max(0, margin - t x), param = margin; t in {-1, 1} checked */
    FL_PW_KL = 9,               /* xlogy(t, t) - t x (0 where t == 0)             */
    FL_PW_KL_LOGT = 10,         /* exp(t) (t - x)                                 */
    FL_NPW = 11
} fl_pointwise_op;

/* Operand slots of a pointwise job. */
enum { FL_OP_INPUT = 0, FL_OP_TARGET = 1, FL_OP_WEIGHT = 2, FL_OP_GRAD = 3, FL_OP_POSW = 4, FL_NOPERANDS = 5 };

/*
 * A pointwise job over a logical array of shape `shape[0..ndim)`.  The last
 * `nred` dimensions are reduced; the first ndim - nred index the outputs
 * (n_out = their product, 1 when there are none).  Each operand has its own
 * byte strides over that same logical shape (0 = broadcast).
 *
 * What is computed is chosen by which pointers are set:
 *   sum_wl, sum_w (n_out doubles each)   reduce: sum w*l and sum w per output
 *                                         (sum_w = element count when weight is NULL)
 *   loss_out                              elementwise w*l, written contiguously in
 *                                         the logical C order (float for F16/BF16/F32,
 *                                         double for F64); requires nred == ndim
 *   grad                                  w * dl/dinput * grad_scale[o], written in the
 *                                         input dtype (may alias input exactly)
 * pos_weight (op BCE_LOGITS) is a fifth operand with its own strides (slot FL_OP_POSW).
 * scratch: fl_pointwise_scratch_len(job) doubles when reducing, else may be NULL.
 */
typedef struct {
    fl_pointwise_op op;
    fl_dtype dtype;
    double param;               /* delta (huber) or beta (smooth L1) */
    int ndim, nred;
    int64_t shape[FL_MAX_NDIM];
    int64_t strides[FL_NOPERANDS][FL_MAX_NDIM];
    const void *input, *target, *weight;   /* weight may be NULL */
    void *grad;                             /* may be NULL */
    void *loss_out;                         /* may be NULL */
    const double *grad_scale;               /* n_out entries; required when grad != NULL */
    double *sum_wl, *sum_w;                 /* n_out entries each, or both NULL */
    double *scratch;
    /* the losses on probabilities and scores (op >= FL_PW_BCE): */
    double param2;                          /* alpha (focal) */
    const void *pos_weight;                 /* BCE_LOGITS only, input dtype, may be NULL */
    int64_t *n_bad;                         /* if set: += the number of elements outside the
                                               loss's domain (BCE: x or t not in [0, 1]; hinge:
                                               t not -1 or +1); they still get a (NaN) value */
} fl_pointwise_job;

int64_t fl_pointwise_scratch_len(const fl_pointwise_job *job);
int fl_pointwise(const fl_pointwise_job *job, int nthreads);

/*
 * Cross-entropy and the softmax family over rows of V classes (class axis contiguous).
 * The rows form an array of shape row_shape[0..row_ndim) with byte strides per row dim,
 * for the logits and for the output.  Per row (see src_c/ce_body.h for the math):
 *   row_lse[r]   log-sum-exp of the (softcapped) row                   (if row_lse)
 *   row_loss[r]  the cross-entropy term, 0 for ignored rows            (if row_loss; needs target)
 *   out          mode GRAD: grad_scale * d(row_loss)/d(logits), 0 rows for ignored targets;
 *                LOGSOFTMAX / SOFTMAX: the normalized row.  out may be logits (in place).
 * target: n_rows int64 in row order (or NULL); class_weight: V doubles (or NULL) with
 * weight_sum = their sum (V when NULL); sample_weight: n_rows doubles (or NULL).
 * soft_target (instead of target; at most one of the two): class probabilities q, an array
 *   of the logits' row shape with its own byte strides per row dim (soft_strides) and its
 *   class axis contiguous, stored in soft_dtype = the logits' dtype or their compute type
 *   (FL_F32 for F16/BF16/F32 logits, FL_F64 for F64), else FL_ERR_DTYPE.  Per row, with
 *   q' = (1 - label_smoothing) q + label_smoothing / V and w the class weights (1 if NULL):
 *     row_loss = sw (lse sum_j w_j q'_j - sum_j w_j q'_j x_j + z_loss lse^2)
 *   and the GRAD output is grad_scale sw ((sum_j w_j q'_j + 2 z_loss lse) p - w q')
 *   (times the softcap factor).  q is used as given: rows that do not sum to 1 or hold
 *   negative entries are not checked (as torch); a NaN in q makes its row NaN.  No row is
 *   ignored (ignore_index is not read).  Used by the modes NONE and GRAD only.
 * scratch: fl_ce_scratch_len(n_rows, V) doubles.
 */
enum { FL_CE_OUT_NONE = 0, FL_CE_OUT_GRAD = 1, FL_CE_OUT_LOGSOFTMAX = 2, FL_CE_OUT_SOFTMAX = 3 };

typedef struct {
    fl_dtype dtype;
    int64_t V;
    int row_ndim;
    int64_t row_shape[FL_MAX_NDIM];
    int64_t logits_strides[FL_MAX_NDIM];
    int64_t out_strides[FL_MAX_NDIM];
    const void *logits;
    void *out;
    int mode;                                /* FL_CE_OUT_* */
    const int64_t *target;
    const void *soft_target;                 /* class probabilities (see above), or NULL */
    fl_dtype soft_dtype;
    int64_t soft_strides[FL_MAX_NDIM];
    const double *class_weight;
    double weight_sum;
    const double *sample_weight;
    int64_t ignore_index;
    double label_smoothing, z_loss, softcap; /* softcap <= 0: off */
    double grad_scale;
    double *row_loss, *row_lse;
    double *scratch;
    int64_t *bad_row;                        /* 1 element: first row with a bad target */
    /* n_rows int64 or NULL.  If set (mode FL_CE_OUT_NONE with a class-index target only, else
     * FL_ERR_ARG): row_rank[r] = #{j : x_j > x_y or (x_j == x_y and j < y)} over the
     * (softcapped) logits in the compute type, y = target[r]; -1 for ignored rows.  Rank 0 <=>
     * argmax == y with first-index ties (np.argmax); top-k hit <=> rank < k.  NaN is ordered
     * above every number (as np.argmax / np.sort), ties among NaN by index: a NaN target logit
     * has rank #{j < y : x_j is NaN}, a NaN elsewhere outranks a numeric target.  Counted in
     * the stats pass (the target logit is read first); exact integers, independent of threads
     * (with a softcap the capped values may differ between ISAs in the last bit, and so may a
     * rank on such near-ties). */
    int64_t *row_rank;
} fl_ce_job;

int64_t fl_ce_scratch_len(int64_t n_rows, int64_t V);
int fl_cross_entropy(const fl_ce_job *job, int nthreads);

/* Plain read kernel (bandwidth probe): returns the sum of x[0..n). */
double fl_read_sum_f32(const float *x, int64_t n, int nthreads);

/* ISA dispatch.  The best ISA the CPU supports is selected at first use. */
int fl_isa_compiled(int isa);         /* 1 if this build contains the ISA */
int fl_isa_supported(int isa);        /* 1 if compiled AND the CPU/OS support it */
int fl_get_isa(void);
int fl_set_isa(int isa);              /* FL_OK or FL_ERR_ISA */
const char *fl_isa_name(int isa);

/* Threads (OpenMP when compiled with it, 1 otherwise). */
int fl_have_openmp(void);
int fl_omp_max_threads(void);         /* omp_get_max_threads() at call time */
int fl_num_procs(void);

/* The compiler that built the kernels, e.g. "gcc 12.2.0". */
const char *fl_compiler(void);

/*
 * ---- row losses (src_c/rows_body.h): multi-margin, triplet margin, distillation KL ----------
 * One job struct for the three.  The rows form an array of shape row_shape[0..row_ndim); each
 * operand k (up to three) has its own dtype, pointer and byte strides per row dim, and its last
 * axis (V elements) contiguous.  Per row r the kernel writes row_loss[r] (double) and, when
 * grad[k] is set, the gradient of grad_scale * row_loss[r] w.r.t. operand k (dtype[k], its own
 * row strides; grad[0] may be x[0] itself: in place).  Operands:
 *   fl_multi_margin:  x[0] = input (N.., C), target = class per row (checked: FL_ERR_INDEX and
 *                     bad_row[0]), weight = C doubles or NULL, p in {1, 2}, margin;
 *                     row_loss = w[y] sum_{j != y} max(0, margin - x_y + x_j)^p / C.
 *   fl_triplet_margin: x[0..2] = anchor, positive, negative (one dtype), p > 0, margin, eps,
 *                     swap; row_loss = max(0, margin + d(a, p) - d_neg), d(u, v) = ||u - v + eps||_p,
 *                     d_neg = d(a, n), or min(d(a, n), d(p, n)) with swap.
 *   fl_kl_div_logits: x[0] = student, x[1] = teacher (float16/bfloat16/float32 each in its own
 *                     dtype, or both float64), temperature T; target (or NULL) with ignore_index:
 *                     ignored rows give 0 and a 0 gradient; row_loss = T^2 KL(softmax(t/T) || softmax(s/T)).
 * scratch: fl_rows_scratch_len(n_rows, V) doubles.
 */
typedef struct {
    int64_t V;
    int row_ndim;
    int64_t row_shape[FL_MAX_NDIM];
    fl_dtype dtype[3];
    const void *x[3];
    int64_t x_strides[3][FL_MAX_NDIM];
    void *grad[3];                           /* NULL: no gradient for that operand */
    int64_t grad_strides[3][FL_MAX_NDIM];
    const int64_t *target;
    int64_t ignore_index;
    const double *weight;
    double p, margin, eps, temperature;
    int swap;
    double grad_scale;
    double *row_loss;
    double *scratch;
    int64_t *bad_row;                        /* 1 element */
} fl_rows_job;

int64_t fl_rows_scratch_len(int64_t n_rows, int64_t V);
int fl_multi_margin(const fl_rows_job *job, int nthreads);
int fl_triplet_margin(const fl_rows_job *job, int nthreads);
int fl_kl_div_logits(const fl_rows_job *job, int nthreads);

/* Compensated sum of x[0..n) (contiguous doubles), single-threaded: 16 lanes of TwoSum, the
 * lanes added with their compensations, rounded once; within ~1 ulp of the exact sum (the
 * error is O(n u^2) sum |x|).  The order is fixed: the same bits on every ISA.  *comp (if not
 * NULL) receives the remainder (exact sum ~= result + *comp; 0 when the result is not
 * finite).  inf/nan as a plain sum: +inf + -inf gives nan; n <= 0 gives 0. */
double fl_sum_f64(const double *x, int64_t n, double *comp);

#ifdef __cplusplus
}
#endif
#endif /* FASTLOSS_H */
