# Declarations of the C API (src_c/fastloss.h) for fastloss/_core.pyx: one copy, in
# fastloss/capi.pxd, the public .pxd that other Cython extensions cimport too.
from fastloss.capi cimport *
