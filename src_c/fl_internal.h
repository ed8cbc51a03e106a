/*
 * fl_internal.h -- helpers shared by the kernel bodies (not part of the public API).
 *
 * Everything here is `static inline` so that each ISA translation unit gets its
 * own copy compiled for its target (see isa_*.c).
 */
#ifndef FL_INTERNAL_H
#define FL_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fastloss.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FL_X86_64 1
#else
#define FL_X86_64 0
#endif

/* Multi-ISA builds need GCC/clang target pragmas and x86-64. */
#if FL_X86_64 && defined(__GNUC__)
#define FL_MULTI_ISA 1
#else
#define FL_MULTI_ISA 0
#endif

#if defined(__GNUC__)
#define FL_RESTRICT __restrict__
#else
#define FL_RESTRICT
#endif

/* Prefetch (a hint: never faults) `bytes` past `ptr`; the address is formed as an
 * integer so that running past the end of an array is not pointer UB. */
#if defined(__GNUC__)
#define FL_PREFETCH(ptr, bytes) __builtin_prefetch((const void *)((uintptr_t)(ptr) + (bytes)), 0, 3)
#else
#define FL_PREFETCH(ptr, bytes) ((void)0)
#endif

/* Doubles per part in the cross-entropy scratch: sizeof(ce_stats) (checked in ce_body.h). */
#define FL_CE_STATS_DOUBLES 6

/* Per-ISA kernel table: each isa_*.c instantiates one. */
typedef struct {
    int (*pointwise)(const fl_pointwise_job *job, int nthreads);
    double (*read_sum_f32)(const float *x, int64_t n, int nthreads);
    int (*cross_entropy)(const fl_ce_job *job, int nthreads);
    double (*sum_f64)(const double *x, int64_t n, double *comp);
} fl_kernel_table;

extern const fl_kernel_table fl_table_baseline;
#if FL_MULTI_ISA
extern const fl_kernel_table fl_table_avx2;
extern const fl_kernel_table fl_table_avx512;
#endif

/* The row losses of rows_body.h, one table per ISA named FL_TABLE_NAME##_rows (a table of its
 * own so that pointwise_body.h's fl_kernel_table initializer is left as it is). */
typedef struct {
    int (*multi_margin)(const fl_rows_job *job, int nthreads);
    int (*triplet_margin)(const fl_rows_job *job, int nthreads);
    int (*kl_div_logits)(const fl_rows_job *job, int nthreads);
} fl_rows_table;

extern const fl_rows_table fl_table_baseline_rows;
#if FL_MULTI_ISA
extern const fl_rows_table fl_table_avx2_rows;
extern const fl_rows_table fl_table_avx512_rows;
#endif

/* Storage types of the two 16-bit formats. */
typedef uint16_t fl_half;     /* IEEE binary16 */
typedef uint16_t fl_bf16;     /* bfloat16 */

static inline float fl_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t fl_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/*
 * binary16 -> binary32, exact and branch-free (vectorizes): shift the exponent
 * and mantissa into place and multiply by 2^112 to move the exponent bias from
 * 15 to 127; this also normalizes subnormal halves.  Inf/NaN (exponent 31) get
 * the all-ones float exponent instead.
 */
static inline float fl_half_to_f32(fl_half h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t em = (uint32_t)h & 0x7fffu;
    float scaled = fl_bits_to_f32(em << 13) * 0x1p112f;
    float special = fl_bits_to_f32((em << 13) | 0x7f800000u);
    float mag = em >= 0x7c00u ? special : scaled;
    return fl_bits_to_f32(fl_f32_to_bits(mag) | sign);
}

/*
 * binary32 -> binary16 with round-to-nearest-even.
 * Normal results: rebias the exponent and round by adding 0xfff plus the lowest
 * kept mantissa bit (ties to even); a carry out of the mantissa correctly bumps
 * the exponent, up to infinity.  Subnormal results: let the FPU round by adding
 * 0.5f, whose ulp (2^-24) is the binary16 subnormal ulp.
 */
static inline fl_half fl_f32_to_half(float f)
{
    uint32_t u = fl_f32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t r;
    if (a >= 0x47800000u) {                 /* |f| >= 65536, inf or nan */
        r = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (a < 0x38800000u) {           /* result is subnormal or zero */
        r = fl_f32_to_bits(fl_bits_to_f32(a) + 0.5f) - 0x3f000000u;
    } else {
        uint32_t odd = (a >> 13) & 1u;
        r = (a + 0xc8000fffu + odd) >> 13;  /* 0xc8000000 = -(112 << 23): rebias */
    }
    return (fl_half)(r | sign);
}

static inline float fl_bf16_to_f32(fl_bf16 h) { return fl_bits_to_f32((uint32_t)h << 16); }

/* binary32 -> bfloat16, round-to-nearest-even; NaN stays NaN (quieted). */
static inline fl_bf16 fl_f32_to_bf16(float f)
{
    uint32_t u = fl_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (fl_bf16)((u >> 16) | 0x40u);
    return (fl_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif /* FL_INTERNAL_H */
