/* isa_baseline.c -- kernels for the build's baseline ISA (x86-64: SSE2; elsewhere: whatever the
 * compiler targets by default).  The kernel bodies live in *_body.h and are written once. */
#define FL_TABLE_NAME fl_table_baseline
#include "pointwise_body.h"
