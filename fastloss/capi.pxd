# cython: language_level=3
"""Cython declarations of the fastloss C API (the header ``fastloss.h``).

Every function is ``nogil``: call the kernels inside ``with nogil:``.  Another Cython
extension uses them with::

    from fastloss.capi cimport fl_pointwise_job, fl_pointwise, FL_PW_MSE, FL_F32, FL_OK

and builds with ``include_dirs=[fastloss.get_include()]``,
``library_dirs=[fastloss.get_library_dir()]``, ``libraries=["fastloss"]`` and
``runtime_library_dirs=[fastloss.get_library_dir()]`` (see docs/c_api.md).  The
fields, status codes and scratch lengths are documented in fastloss.h and docs/c_api.md.

The Python extension ``fastloss._core`` takes its declarations from here too
(fastloss/_core.pxd), so this file is checked by every build.
"""
from libc.stdint cimport int64_t

cdef extern from "fastloss.h" nogil:
    enum:
        FL_ABI_VERSION
        FL_MAX_NDIM
        FL_BLOCK

    # status codes (0 = ok, negative = error)
    enum:
        FL_OK
        FL_ERR_ARG
        FL_ERR_DTYPE
        FL_ERR_NDIM
        FL_ERR_ISA
        FL_ERR_INDEX

    ctypedef enum fl_dtype:
        FL_F16
        FL_BF16
        FL_F32
        FL_F64
        FL_NDTYPES

    ctypedef enum fl_isa:
        FL_ISA_BASELINE
        FL_ISA_AVX2
        FL_ISA_AVX512
        FL_NISA

    int fl_abi_version()

    # ---- pointwise losses ----
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
        FL_NPW

    enum:
        FL_OP_INPUT
        FL_OP_TARGET
        FL_OP_WEIGHT
        FL_OP_GRAD
        FL_OP_POSW
        FL_NOPERANDS

    ctypedef struct fl_pointwise_job:
        fl_pointwise_op op
        fl_dtype dtype
        double param
        int ndim
        int nred
        int64_t shape[64]                 # FL_MAX_NDIM
        int64_t strides[5][64]            # [FL_NOPERANDS][FL_MAX_NDIM], bytes
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

    int64_t fl_pointwise_scratch_len(const fl_pointwise_job *job)
    int fl_pointwise(const fl_pointwise_job *job, int nthreads)

    # ---- cross-entropy and the softmax family ----
    enum:
        FL_CE_OUT_NONE
        FL_CE_OUT_GRAD
        FL_CE_OUT_LOGSOFTMAX
        FL_CE_OUT_SOFTMAX

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

    # ---- row losses: multi-margin, triplet margin, distillation KL ----
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

    # ---- bandwidth probe, ISA dispatch, threads, build info ----
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

    # ---- compensated double sum (the row-loss sums of the Python layer) ----
    double fl_sum_f64(const double *x, int64_t n, double *comp)
