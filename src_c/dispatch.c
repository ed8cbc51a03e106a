/*
 * dispatch.c -- runtime ISA selection and the public entry points.
 *
 * Each kernel body is compiled once per ISA (isa_*.c); here the best table the
 * CPU supports is chosen on first use from cpuid (__builtin_cpu_supports, which
 * also checks that the OS saves the wide registers).  fl_set_isa() lets the
 * Python layer honour FASTLOSS_ISA and lets the tests run every compiled path.
 */
#include "fl_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static const fl_kernel_table *fl_tables[FL_NISA] = {
    &fl_table_baseline,
#if FL_MULTI_ISA
    &fl_table_avx2,
    &fl_table_avx512,
#else
    NULL,
    NULL,
#endif
};

int fl_abi_version(void) { return FL_ABI_VERSION; }

static const char *const fl_isa_names[FL_NISA] = {"baseline", "avx2", "avx512"};

/* -1 = not chosen yet.  Written once (or by an explicit fl_set_isa); a racing
 * first use by two threads stores the same value. */
static volatile int fl_active_isa = -1;

const char *fl_isa_name(int isa)
{
    return (isa >= 0 && isa < FL_NISA) ? fl_isa_names[isa] : "unknown";
}

int fl_isa_compiled(int isa) { return isa >= 0 && isa < FL_NISA && fl_tables[isa] != NULL; }

int fl_isa_supported(int isa)
{
    if (!fl_isa_compiled(isa)) return 0;
#if FL_MULTI_ISA
    __builtin_cpu_init();
    switch (isa) {
    case FL_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case FL_ISA_AVX512:
        return fl_isa_supported(FL_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
    default:
        return 1;
    }
#else
    return isa == FL_ISA_BASELINE;
#endif
}

int fl_get_isa(void)
{
    int isa = fl_active_isa;
    if (isa < 0) {
        isa = FL_ISA_BASELINE;
        for (int i = FL_NISA - 1; i > 0; i--)
            if (fl_isa_supported(i)) { isa = i; break; }
        fl_active_isa = isa;
    }
    return isa;
}

int fl_set_isa(int isa)
{
    if (!fl_isa_supported(isa)) return FL_ERR_ISA;
    fl_active_isa = isa;
    return FL_OK;
}

static const fl_kernel_table *fl_active(void) { return fl_tables[fl_get_isa()]; }

int64_t fl_pointwise_scratch_len(const fl_pointwise_job *job)
{
    int64_t n_out = 1, n_red = 1;
    for (int d = 0; d < job->ndim; d++) {
        if (d < job->ndim - job->nred) n_out *= job->shape[d];
        else n_red *= job->shape[d];
    }
    int64_t nblk = n_red == 0 ? 0 : (n_red + FL_BLOCK - 1) / FL_BLOCK;
    return 4 * n_out * nblk;          /* per block: sum w*l and sum w, each with its compensation */
}

int fl_pointwise(const fl_pointwise_job *job, int nthreads) { return fl_active()->pointwise(job, nthreads); }

int64_t fl_ce_scratch_len(int64_t n_rows, int64_t V)
{
    const int64_t nparts = (V + 32767) / 32768;       /* CE_PART in ce_body.h */
    /* part stats (ce_stats) per part + ce_row (7 doubles) per row */
    return FL_CE_STATS_DOUBLES * n_rows * nparts + 7 * n_rows + 1;
}

int fl_cross_entropy(const fl_ce_job *job, int nthreads) { return fl_active()->cross_entropy(job, nthreads); }

double fl_sum_f64(const double *x, int64_t n, double *comp) { return fl_active()->sum_f64(x, n, comp); }

double fl_read_sum_f32(const float *x, int64_t n, int nthreads)
{
    return fl_active()->read_sum_f32(x, n, nthreads);
}

int fl_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fl_omp_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int fl_num_procs(void)
{
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

const char *fl_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

/* ---- row losses (rows_body.h) ---- */
static const fl_rows_table *fl_rows_tables[FL_NISA] = {
    &fl_table_baseline_rows,
#if FL_MULTI_ISA
    &fl_table_avx2_rows,
    &fl_table_avx512_rows,
#else
    NULL,
    NULL,
#endif
};

int64_t fl_rows_scratch_len(int64_t n_rows, int64_t V)
{
    const int64_t nparts = V < 1 ? 1 : (V + 32767) / 32768;       /* RW_PART in rows_body.h */
    return 8 * n_rows * nparts + 8 * n_rows + 1;
}

int fl_multi_margin(const fl_rows_job *job, int nthreads) { return fl_rows_tables[fl_get_isa()]->multi_margin(job, nthreads); }
int fl_triplet_margin(const fl_rows_job *job, int nthreads) { return fl_rows_tables[fl_get_isa()]->triplet_margin(job, nthreads); }
int fl_kl_div_logits(const fl_rows_job *job, int nthreads) { return fl_rows_tables[fl_get_isa()]->kl_div_logits(job, nthreads); }
