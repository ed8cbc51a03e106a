/*
 * mse_and_ce.c -- the fastloss kernels called from plain C (no Python at run time).
 *
 * Computes a mean squared error over a strided 2-D view with a broadcast target, and a
 * mean cross-entropy over rows of logits with one ignored row; then shows two status
 * codes of bad calls.  The inputs are built from integer formulas (exact in float32), so
 * a test can rebuild them in NumPy and compare (tests/test_capi.py).
 *
 * Build and run (docs/c_api.md):
 *   INC=$(python -c "import fastloss; print(fastloss.get_include())")
 *   LIB=$(python -c "import fastloss; print(fastloss.get_library_dir())")
 *   cc -std=c99 -O2 mse_and_ce.c -I"$INC" -L"$LIB" -lfastloss -Wl,-rpath,"$LIB" -o mse_and_ce
 *   ./mse_and_ce [nthreads [isa]]        (isa: baseline, avx2 or avx512; default: the best)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastloss.h"

enum {
    ROWS = 1000, COLS = 300, LD = 320,  /* MSE: a (ROWS, COLS) view of a (ROWS, LD) float32 buffer */
    N = 6, NCLASS = 11,                 /* cross-entropy: N rows of NCLASS classes */
    IGNORE = -100                       /* the ignore_index */
};

int main(int argc, char **argv)
{
    int nthreads = argc > 1 ? atoi(argv[1]) : 2;   /* < 1 means 1 */
    if (argc > 2) {                                /* run on another ISA than the best one */
        int isa = 0;
        while (isa < FL_NISA && strcmp(fl_isa_name(isa), argv[2]) != 0) isa++;
        if (fl_set_isa(isa) != FL_OK) {            /* FL_ERR_ISA: not compiled in or not supported */
            fprintf(stderr, "ISA %s is not available\n", argv[2]);
            return 2;
        }
    }

    /* the library must implement the ABI this program was compiled against */
    if (fl_abi_version() != FL_ABI_VERSION) {
        fprintf(stderr, "libfastloss ABI %d, header ABI %d\n", fl_abi_version(), FL_ABI_VERSION);
        return 1;
    }
    printf("abi %d isa %s openmp %d\n", fl_abi_version(), fl_isa_name(fl_get_isa()), fl_have_openmp());

    /* ---- 1. MSE: mean over (i, j) of (x[i, j] - y[j])^2 -------------------------------
     * x = buf[:, :COLS] (row stride LD floats), y of shape (COLS,) broadcast over the rows. */
    static float buf[ROWS * LD];
    static float y[COLS];
    for (int i = 0; i < ROWS * LD; i++) buf[i] = (float)((i * 37) % 101) / 16.0f - 3.0f;
    for (int j = 0; j < COLS; j++) y[j] = (float)((j * 11) % 29) / 8.0f;

    fl_pointwise_job pw;
    memset(&pw, 0, sizeof pw);                     /* every unused pointer NULL, option 0 */
    pw.op = FL_PW_MSE;
    pw.dtype = FL_F32;
    pw.ndim = 2;
    pw.nred = 2;                                   /* reduce both dims: one output */
    pw.shape[0] = ROWS;
    pw.shape[1] = COLS;
    pw.strides[FL_OP_INPUT][0] = LD * (int64_t)sizeof(float);     /* byte strides */
    pw.strides[FL_OP_INPUT][1] = sizeof(float);
    pw.strides[FL_OP_TARGET][0] = 0;                              /* broadcast */
    pw.strides[FL_OP_TARGET][1] = sizeof(float);
    pw.input = buf;
    pw.target = y;
    double sum_wl = 0.0, sum_w = 0.0;              /* sum of losses, number of elements */
    pw.sum_wl = &sum_wl;
    pw.sum_w = &sum_w;
    int64_t nscratch = fl_pointwise_scratch_len(&pw);
    pw.scratch = malloc((size_t)(nscratch > 0 ? nscratch : 1) * sizeof(double));
    int st = fl_pointwise(&pw, nthreads);
    free(pw.scratch);
    if (st != FL_OK) {
        fprintf(stderr, "fl_pointwise failed: %d\n", st);
        return 1;
    }
    printf("mse %.17g\n", sum_wl / sum_w);

    /* ---- 2. cross-entropy: mean over the rows whose target is not IGNORE ------------- */
    static float logits[N * NCLASS];
    int64_t target[N];
    double row_loss[N];
    for (int r = 0; r < N; r++)
        for (int c = 0; c < NCLASS; c++) logits[r * NCLASS + c] = (float)((r * 7 + c * 5) % 13) / 4.0f - 1.5f;
    for (int r = 0; r < N; r++) target[r] = (r * 3) % NCLASS;
    target[N - 1] = IGNORE;

    fl_ce_job ce;
    memset(&ce, 0, sizeof ce);
    ce.dtype = FL_F32;
    ce.V = NCLASS;
    ce.row_ndim = 1;
    ce.row_shape[0] = N;
    ce.logits_strides[0] = NCLASS * (int64_t)sizeof(float);
    ce.logits = logits;
    ce.mode = FL_CE_OUT_NONE;                      /* loss only, no gradient */
    ce.target = target;
    ce.class_weight = NULL;
    ce.weight_sum = NCLASS;                        /* sum of the class weights: V when NULL */
    ce.ignore_index = IGNORE;
    ce.row_loss = row_loss;
    int64_t bad_row = -1;
    ce.bad_row = &bad_row;
    ce.scratch = malloc((size_t)fl_ce_scratch_len(N, NCLASS) * sizeof(double));
    st = fl_cross_entropy(&ce, nthreads);
    if (st != FL_OK) {
        fprintf(stderr, "fl_cross_entropy failed: %d\n", st);
        return 1;
    }
    double total = 0.0;
    int counted = 0;
    for (int r = 0; r < N; r++)
        if (target[r] != IGNORE) { total += row_loss[r]; counted++; }
    printf("cross_entropy %.17g\n", total / counted);

    /* ---- 3. errors are status codes, never a crash or a message ---------------------- */
    target[2] = NCLASS;                            /* out of range: FL_ERR_INDEX, bad_row = 2 */
    st = fl_cross_entropy(&ce, nthreads);
    printf("bad_target status %d row %lld\n", st, (long long)bad_row);
    free(ce.scratch);

    pw.dtype = (fl_dtype)7;                        /* not an fl_dtype: FL_ERR_DTYPE */
    pw.scratch = NULL;
    printf("bad_dtype status %d\n", fl_pointwise(&pw, nthreads));
    return 0;
}
