/* isa_avx512.c -- the same kernel bodies compiled for AVX-512 F/BW/DQ/VL (x86-64 only), with
 * 512-bit vectors preferred (GCC otherwise favours 256-bit vectors on many of these CPUs). */
#include "fl_internal.h"
#if FL_MULTI_ISA
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#endif
#define FL_TABLE_NAME fl_table_avx512
#define FL_CE_AVX512 1   /* ce_body.h: the float block kernels with intrinsics */
#define FL_MATH_FMA 1   /* fl_math.h: polynomial steps as fused multiply-adds */
#define FL_CE_F16C 1     /* ce_body.h: float16 rows converted with vcvtph2ps */
#include "pointwise_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
