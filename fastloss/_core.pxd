# Declarations of the C API in src_c/fastloss.h, for Cython.
from libc.stdint cimport int64_t

cdef extern from "fastloss.h" nogil:
    enum:
        FL_MAX_NDIM
        FL_BLOCK
        FL_OK
        FL_ERR_ARG
        FL_ERR_DTYPE
        FL_ERR_NDIM
        FL_ERR_ISA
        FL_ERR_INDEX
        FL_CE_OUT_NONE
        FL_CE_OUT_GRAD
        FL_CE_OUT_LOGSOFTMAX
        FL_CE_OUT_SOFTMAX
        FL_NOPERANDS
        FL_OP_INPUT
        FL_OP_TARGET
        FL_OP_WEIGHT
        FL_OP_GRAD
        FL_OP_POSW

    ctypedef enum fl_dtype:
        FL_F16
        FL_BF16
        FL_F32
        FL_F64

    ctypedef enum fl_pointwise_op:
        FL_PW_MSE
        FL_PW_L1
        FL_PW_HUBER
        FL_PW_SMOOTH_L1
        FL_PW_ONE
        FL_PW_BCE
        FL_PW_BCE_LOGITS
        FL_PW_FOCAL
        FL_PW_HINGE
        FL_PW_KL
        FL_PW_KL_LOGT

    ctypedef struct fl_pointwise_job:
        fl_pointwise_op op
        fl_dtype dtype
        double param
        int ndim
        int nred
        int64_t shape[64]
        int64_t strides[5][64]
        const void *input
        const void *target
        const void *weight
        void *grad
        void *loss_out
        const double *grad_scale
        double *sum_wl
        double *sum_w
        double *scratch
        double param2
        const void *pos_weight
        int64_t *n_bad

    ctypedef struct fl_ce_job:
        fl_dtype dtype
        int64_t V
        int row_ndim
        int64_t row_shape[64]
        int64_t logits_strides[64]
        int64_t out_strides[64]
        const void *logits
        void *out
        int mode
        const int64_t *target
        const void *soft_target
        fl_dtype soft_dtype
        int64_t soft_strides[64]
        const double *class_weight
        double weight_sum
        const double *sample_weight
        int64_t ignore_index
        double label_smoothing
        double z_loss
        double softcap
        double grad_scale
        double *row_loss
        double *row_lse
        double *scratch
        int64_t *bad_row
        int64_t *row_rank

    int64_t fl_ce_scratch_len(int64_t n_rows, int64_t V)
    int fl_cross_entropy(const fl_ce_job *job, int nthreads)
    int64_t fl_pointwise_scratch_len(const fl_pointwise_job *job)
    int fl_pointwise(const fl_pointwise_job *job, int nthreads)
    double fl_read_sum_f32(const float *x, int64_t n, int nthreads)
    int fl_isa_compiled(int isa)
    int fl_isa_supported(int isa)
    int fl_get_isa()
    int fl_set_isa(int isa)
    const char *fl_isa_name(int isa)
    int fl_have_openmp()
    int fl_omp_max_threads()
    int fl_num_procs()
    const char *fl_compiler()

# ---- row losses (src_c/rows_body.h) ----
cdef extern from "fastloss.h" nogil:
    ctypedef struct fl_rows_job:
        int64_t V
        int row_ndim
        int64_t row_shape[64]
        fl_dtype dtype[3]
        const void *x[3]
        int64_t x_strides[3][64]
        void *grad[3]
        int64_t grad_strides[3][64]
        const int64_t *target
        int64_t ignore_index
        const double *weight
        double p
        double margin
        double eps
        double temperature
        int swap
        double grad_scale
        double *row_loss
        double *scratch
        int64_t *bad_row

    int64_t fl_rows_scratch_len(int64_t n_rows, int64_t V)
    int fl_multi_margin(const fl_rows_job *job, int nthreads)
    int fl_triplet_margin(const fl_rows_job *job, int nthreads)
    int fl_kl_div_logits(const fl_rows_job *job, int nthreads)
