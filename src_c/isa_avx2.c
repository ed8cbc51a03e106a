/* isa_avx2.c -- the same kernel bodies compiled for AVX2 + FMA + F16C (x86-64 only).
 * Selected at run time by dispatch.c; never executed on a CPU without these features. */
#include "fl_internal.h"
#if FL_MULTI_ISA
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define FL_TABLE_NAME fl_table_avx2
#define FL_MATH_FMA 1   /* fl_math.h: polynomial steps as fused multiply-adds */
#define FL_CE_F16C 1     /* ce_body.h: float16 rows converted with vcvtph2ps */
#include "pointwise_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
