# cython: language_level=3
"""Cython bindings of the C kernels (src_c/).  Private: use the functions in
``fastloss`` instead.

This layer does no math and no user-facing validation.  It takes arrays already
checked, broadcast and transposed by the Python layer, fills the C job struct
(pointers, shape, byte strides), allocates scratch and outputs through NumPy (so
``tracemalloc`` sees them), releases the GIL around the kernel and turns status
codes into exceptions.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t
from libc.string cimport memset


cnp.import_array()

ISA_NAMES = ("baseline", "avx2", "avx512")
POINTWISE_OPS = {"mse": FL_PW_MSE, "l1": FL_PW_L1, "huber": FL_PW_HUBER,
                 "smooth_l1": FL_PW_SMOOTH_L1, "one": FL_PW_ONE,
                 "bce": FL_PW_BCE, "bce_logits": FL_PW_BCE_LOGITS, "focal": FL_PW_FOCAL,
                 "hinge": FL_PW_HINGE, "kl": FL_PW_KL, "kl_log_target": FL_PW_KL_LOGT}
MAX_NDIM = FL_MAX_NDIM
BLOCK = FL_BLOCK


cdef int _dtype_code(cnp.dtype dt) except -1:
    if dt.num == cnp.NPY_FLOAT32:
        return FL_F32
    if dt.num == cnp.NPY_FLOAT64:
        return FL_F64
    if dt.num == cnp.NPY_FLOAT16:
        return FL_F16
    if dt.name == "bfloat16" and dt.itemsize == 2:
        return FL_BF16
    raise TypeError(f"fastloss kernels do not support dtype {dt}")


cdef bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    """a.shape == b.shape (the typed ``shape`` is a C pointer here: compared dimension by dimension)."""
    cdef int d
    if a.ndim != b.ndim:
        return False
    for d in range(a.ndim):
        if a.shape[d] != b.shape[d]:
            return False
    return True


cdef _check(int status, str what):
    if status == FL_OK:
        return
    if status == FL_ERR_ISA:
        raise RuntimeError(f"{what}: ISA not available")
    if status == FL_ERR_DTYPE:
        raise TypeError(f"{what}: unsupported dtype")
    raise RuntimeError(f"{what}: internal error (status {status}); please report this as a bug")


cdef void _set_operand(fl_pointwise_job *job, int k, cnp.ndarray a):
    cdef int d
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    for d in range(job.ndim):
        job.strides[k][d] = st[d]


def pointwise(str op, double param, cnp.ndarray x, cnp.ndarray t, object w, object g, object e,
              int nred, object sum_wl, object sum_w, object grad_scale, int nthreads,
              double param2=0.0, object pos_weight=None):
    """Run one pointwise job (see fl_pointwise_job in src_c/fastloss.h).

    x, t, w, g (and pos_weight) share shape and dtype (w, g, pos_weight may be None);
    the last `nred` dims are reduced.  e: C-contiguous float32/float64 output or None.
    sum_wl, sum_w: float64 arrays of n_out (or None).  grad_scale: float64 array of n_out.
    param2: the second option (focal: alpha).  Returns the number of elements outside the
    loss's domain (always 0 for the regression losses).
    """
    cdef fl_pointwise_job job
    cdef int d, status
    cdef int64_t n_bad = 0
    cdef cnp.ndarray wa, ga, ea, swl, sw, gs, scratch, pwa
    memset(&job, 0, sizeof(job))
    if x.ndim > FL_MAX_NDIM:
        raise ValueError(f"at most {FL_MAX_NDIM} dimensions are supported")
    job.op = POINTWISE_OPS[op]
    job.dtype = <fl_dtype>_dtype_code(x.dtype)
    job.param = param
    job.param2 = param2
    job.n_bad = &n_bad
    job.ndim = x.ndim
    job.nred = nred
    for d in range(x.ndim):
        job.shape[d] = x.shape[d]
    if t.dtype != x.dtype or not _same_shape(t, x):
        raise ValueError("internal: target layout differs from input")
    job.input = cnp.PyArray_DATA(x)
    _set_operand(&job, FL_OP_INPUT, x)
    job.target = cnp.PyArray_DATA(t)
    _set_operand(&job, FL_OP_TARGET, t)
    if w is not None:
        wa = w
        if wa.dtype != x.dtype or not _same_shape(wa, x):
            raise ValueError("internal: weight layout differs from input")
        job.weight = cnp.PyArray_DATA(wa)
        _set_operand(&job, FL_OP_WEIGHT, wa)
    if pos_weight is not None:
        pwa = pos_weight
        if pwa.dtype != x.dtype or not _same_shape(pwa, x):
            raise ValueError("internal: pos_weight layout differs from input")
        job.pos_weight = cnp.PyArray_DATA(pwa)
        _set_operand(&job, FL_OP_POSW, pwa)
    if g is not None:
        ga = g
        if ga.dtype != x.dtype or not _same_shape(ga, x) or not ga.flags.writeable:
            raise ValueError("internal: grad layout differs from input")
        job.grad = cnp.PyArray_DATA(ga)
        _set_operand(&job, FL_OP_GRAD, ga)
        gs = grad_scale
        job.grad_scale = <const double *>cnp.PyArray_DATA(gs)
    if e is not None:
        ea = e
        if not ea.flags.c_contiguous or ea.size != x.size \
                or ea.dtype != (np.float64 if job.dtype == FL_F64 else np.float32):
            raise ValueError("internal: bad elementwise output")
        job.loss_out = cnp.PyArray_DATA(ea)
    if sum_wl is not None:
        swl = sum_wl
        sw = sum_w
        job.sum_wl = <double *>cnp.PyArray_DATA(swl)
        job.sum_w = <double *>cnp.PyArray_DATA(sw)
        scratch = np.empty(max(fl_pointwise_scratch_len(&job), 1), dtype=np.float64)
        job.scratch = <double *>cnp.PyArray_DATA(scratch)
    with nogil:
        status = fl_pointwise(&job, nthreads)
    _check(status, f"{op} kernel")
    return n_bad


CE_MODES = {"none": FL_CE_OUT_NONE, "grad": FL_CE_OUT_GRAD, "log_softmax": FL_CE_OUT_LOGSOFTMAX,
            "softmax": FL_CE_OUT_SOFTMAX}


def cross_entropy_rows(cnp.ndarray logits, object out, str mode, object target, object class_weight,
                       double weight_sum, object sample_weight, long long ignore_index,
                       double label_smoothing, double z_loss, double softcap, double grad_scale,
                       object row_loss, object row_lse, int nthreads, object soft_target=None,
                       object row_rank=None):
    """Run the row kernel (see fl_ce_job in src_c/fastloss.h).

    logits: (rows..., V) with a unit-stride last axis.  out: same shape and dtype, or None.
    target: int64 C-contiguous array of the row shape, or None.  class_weight (V,),
    sample_weight (rows), row_loss (rows), row_lse (rows): float64 C-contiguous or None.
    soft_target (instead of target): class probabilities of the logits' shape with a
    unit-stride last axis, in the logits' dtype or their compute type (float32; float64 for
    float64 logits), or None.
    row_rank: int64 C-contiguous (rows) or None: the rank of each row's target among its
    logits (mode "none" with a class-index target only; -1 for ignored rows).
    Returns None, or raises IndexError(row) for a target out of range.
    """
    cdef fl_ce_job job
    cdef int d, status
    cdef int64_t bad = -1
    cdef cnp.ndarray o, tg, cw, sw, rl, rs, scratch, q, rr
    cdef int64_t n_rows
    memset(&job, 0, sizeof(job))
    if logits.ndim < 1 or logits.ndim - 1 > FL_MAX_NDIM:
        raise ValueError("internal: bad logits rank")
    job.dtype = <fl_dtype>_dtype_code(logits.dtype)
    job.V = logits.shape[logits.ndim - 1]
    if job.V > 1 and logits.strides[logits.ndim - 1] != logits.itemsize:   # (V = 1: never stepped)
        raise ValueError("internal: the class axis must have unit stride")
    job.row_ndim = logits.ndim - 1
    n_rows = 1
    for d in range(job.row_ndim):
        job.row_shape[d] = logits.shape[d]
        job.logits_strides[d] = logits.strides[d]
        n_rows *= logits.shape[d]
    job.logits = cnp.PyArray_DATA(logits)
    job.mode = CE_MODES[mode]
    if out is not None:
        o = out
        if o.dtype != logits.dtype or o.ndim != logits.ndim \
                or (job.V > 1 and o.strides[o.ndim - 1] != o.itemsize) \
                or not o.flags.writeable:
            raise ValueError("internal: bad output array")
        for d in range(job.row_ndim):
            if o.shape[d] != logits.shape[d]:
                raise ValueError("internal: output shape differs")
            job.out_strides[d] = o.strides[d]
        job.out = cnp.PyArray_DATA(o)
    if target is not None:
        tg = target
        if tg.dtype != np.int64 or not tg.flags.c_contiguous or tg.size != n_rows:
            raise ValueError("internal: bad target array")
        # A private snapshot (n_rows int64, small next to the logits): the kernel checks the
        # targets and then indexes with them (class_weight[t]) with the GIL released, so
        # another Python thread writing the caller's array in between would make it read out
        # of bounds.  Nobody else can write the copy: the check holds for every later read.
        tg = tg.copy()
        job.target = <const int64_t *>cnp.PyArray_DATA(tg)
    if soft_target is not None:
        q = soft_target
        if target is not None:
            raise ValueError("internal: target and soft_target are exclusive")
        if q.ndim != logits.ndim or q.shape[q.ndim - 1] != job.V \
                or (job.V > 1 and q.strides[q.ndim - 1] != q.itemsize):
            raise ValueError("internal: bad soft target layout")
        if q.dtype != logits.dtype and q.dtype != (np.float64 if job.dtype == FL_F64 else np.float32):
            raise ValueError("internal: bad soft target dtype")
        for d in range(job.row_ndim):
            if q.shape[d] != logits.shape[d]:
                raise ValueError("internal: soft target shape differs")
            job.soft_strides[d] = q.strides[d]
        job.soft_dtype = <fl_dtype>_dtype_code(q.dtype)
        job.soft_target = cnp.PyArray_DATA(q)
    if class_weight is not None:
        cw = class_weight
        if cw.dtype != np.float64 or not cw.flags.c_contiguous or cw.size != job.V:
            raise ValueError("internal: bad class weights")
        job.class_weight = <const double *>cnp.PyArray_DATA(cw)
    job.weight_sum = weight_sum
    if sample_weight is not None:
        sw = sample_weight
        if sw.dtype != np.float64 or not sw.flags.c_contiguous or sw.size != n_rows:
            raise ValueError("internal: bad sample weights")
        job.sample_weight = <const double *>cnp.PyArray_DATA(sw)
    job.ignore_index = ignore_index
    job.label_smoothing = label_smoothing
    job.z_loss = z_loss
    job.softcap = softcap
    job.grad_scale = grad_scale
    if row_loss is not None:
        rl = row_loss
        if rl.dtype != np.float64 or not rl.flags.c_contiguous or rl.size != n_rows:
            raise ValueError("internal: bad row_loss")
        job.row_loss = <double *>cnp.PyArray_DATA(rl)
    if row_lse is not None:
        rs = row_lse
        if rs.dtype != np.float64 or not rs.flags.c_contiguous or rs.size != n_rows:
            raise ValueError("internal: bad row_lse")
        job.row_lse = <double *>cnp.PyArray_DATA(rs)
    if row_rank is not None:
        rr = row_rank
        if rr.dtype != np.int64 or not rr.flags.c_contiguous or not rr.flags.writeable or rr.size != n_rows \
                or mode != "none" or target is None:
            raise ValueError("internal: bad row_rank")
        job.row_rank = <int64_t *>cnp.PyArray_DATA(rr)
    scratch = np.empty(fl_ce_scratch_len(n_rows, job.V), dtype=np.float64)
    job.scratch = <double *>cnp.PyArray_DATA(scratch)
    job.bad_row = &bad
    with nogil:
        status = fl_cross_entropy(&job, nthreads)
    if status == FL_ERR_INDEX:
        raise IndexError(bad)
    _check(status, "cross-entropy kernel")


def read_sum_f32(cnp.ndarray x, int nthreads):
    """Sum of a C-contiguous float32 array: the plain read kernel used to measure bandwidth."""
    cdef double s
    cdef int64_t n = x.size
    cdef const float *p
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise TypeError("read_sum_f32 needs a C-contiguous float32 array")
    p = <const float *>cnp.PyArray_DATA(x)
    with nogil:
        s = fl_read_sum_f32(p, n, nthreads)
    return s


def isa_compiled():
    """Names of the ISAs this build contains."""
    return tuple(ISA_NAMES[i] for i in range(len(ISA_NAMES)) if fl_isa_compiled(i))


def isa_supported():
    """Names of the compiled ISAs that this CPU (and OS) can run."""
    return tuple(ISA_NAMES[i] for i in range(len(ISA_NAMES)) if fl_isa_supported(i))


def get_isa():
    return ISA_NAMES[fl_get_isa()]


def set_isa(str name):
    if name not in ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; expected one of {', '.join(ISA_NAMES)}")
    cdef int i = ISA_NAMES.index(name)
    if not fl_isa_compiled(i):
        raise RuntimeError(f"ISA {name!r} is not compiled into this build of fastloss "
                           f"(compiled: {', '.join(isa_compiled())})")
    if fl_set_isa(i) != FL_OK:
        raise RuntimeError(f"ISA {name!r} is not supported by this CPU "
                           f"(supported: {', '.join(isa_supported())})")


def have_openmp():
    return bool(fl_have_openmp())


def omp_max_threads():
    return fl_omp_max_threads()


def num_procs():
    return fl_num_procs()


def compiler():
    return fl_compiler().decode("utf-8", "replace")


# ---- row losses: multi-margin, triplet margin, distillation KL (src_c/rows_body.h) ----------

ROW_LOSSES = ("multi_margin", "triplet_margin", "kl_div_logits")


def row_loss(str kind, list xs, object grads, object target, object weight, long long ignore_index,
             double p, double margin, double eps, double temperature, bint swap, double grad_scale,
             cnp.ndarray row_loss_out, int nthreads):
    """Run one row-loss job (see fl_rows_job in src_c/fastloss.h).

    xs: the operands (1 to 3 arrays of one shape (rows..., V), the last axis of unit stride).
    grads: None, or a list of arrays of the operands' shapes and dtypes (unit-stride last axis;
    grads[0] may be xs[0], in place).  target: int64 C-contiguous array of the rows, or None.
    weight: float64 C-contiguous (V,) or None.  row_loss_out: float64 C-contiguous, one per row.
    Raises IndexError(row) for a multi-margin target out of range.
    """
    cdef fl_rows_job job
    cdef int d, k, status, which, nops = len(xs)
    cdef int64_t bad = -1, n_rows = 1
    cdef cnp.ndarray a, g, tg, w, scratch
    cdef list keep = []
    memset(&job, 0, sizeof(job))
    if kind not in ROW_LOSSES or nops < 1 or nops > 3:
        raise ValueError("internal: bad row-loss job")
    a = xs[0]
    if a.ndim < 1 or a.ndim - 1 > FL_MAX_NDIM:
        raise ValueError("internal: bad operand rank")
    job.V = a.shape[a.ndim - 1]
    job.row_ndim = a.ndim - 1
    for d in range(job.row_ndim):
        job.row_shape[d] = a.shape[d]
        n_rows *= a.shape[d]
    for k in range(nops):
        a = xs[k]
        if a.ndim != job.row_ndim + 1 or a.shape[a.ndim - 1] != job.V \
                or (job.V > 1 and a.strides[a.ndim - 1] != a.itemsize):
            raise ValueError("internal: operand layout")
        job.dtype[k] = <fl_dtype>_dtype_code(a.dtype)
        job.x[k] = cnp.PyArray_DATA(a)
        for d in range(job.row_ndim):
            if a.shape[d] != job.row_shape[d]:
                raise ValueError("internal: operand shapes differ")
            job.x_strides[k][d] = a.strides[d]
    if grads is not None:
        for k in range(len(grads)):
            g = grads[k]
            a = xs[k]
            if g.dtype != a.dtype or g.ndim != a.ndim or not g.flags.writeable \
                    or g.shape[g.ndim - 1] != job.V \
                    or (job.V > 1 and g.strides[g.ndim - 1] != g.itemsize):
                raise ValueError("internal: bad gradient array")
            for d in range(job.row_ndim):
                if g.shape[d] != job.row_shape[d]:
                    raise ValueError("internal: gradient shape differs")
                job.grad_strides[k][d] = g.strides[d]
            job.grad[k] = cnp.PyArray_DATA(g)
    if target is not None:
        # a private snapshot: the kernel checks the targets, then indexes with them without the GIL
        tg = np.array(target, dtype=np.int64, order="C", copy=True)
        if tg.size != n_rows:
            raise ValueError("internal: bad target array")
        keep.append(tg)
        job.target = <const int64_t *>cnp.PyArray_DATA(tg)
    if weight is not None:
        w = weight
        if w.dtype != np.float64 or not w.flags.c_contiguous or w.size != job.V:
            raise ValueError("internal: bad weight")
        job.weight = <const double *>cnp.PyArray_DATA(w)
    if row_loss_out.dtype != np.float64 or not row_loss_out.flags.c_contiguous or row_loss_out.size != n_rows:
        raise ValueError("internal: bad row_loss")
    job.row_loss = <double *>cnp.PyArray_DATA(row_loss_out)
    job.ignore_index = ignore_index
    job.p = p
    job.margin = margin
    job.eps = eps
    job.temperature = temperature
    job.swap = swap
    job.grad_scale = grad_scale
    scratch = np.empty(fl_rows_scratch_len(n_rows, job.V), dtype=np.float64)
    job.scratch = <double *>cnp.PyArray_DATA(scratch)
    job.bad_row = &bad
    which = ROW_LOSSES.index(kind)
    with nogil:
        if which == 0:
            status = fl_multi_margin(&job, nthreads)
        elif which == 1:
            status = fl_triplet_margin(&job, nthreads)
        else:
            status = fl_kl_div_logits(&job, nthreads)
    if status == FL_ERR_INDEX:
        raise IndexError(bad)
    _check(status, f"{kind} kernel")


def sum_f64(a, bint with_comp=False):
    """Compensated sum of all elements of a float64 array (fl_sum_f64): within ~1 ulp of the
    exact sum, the same bits on every ISA; inf/nan as np.sum (+inf + -inf gives nan, no
    warning).  A non-contiguous or non-float64 array is copied first.  with_comp: return
    (sum, compensation), the exact sum being ~ sum + compensation."""
    cdef cnp.ndarray x = np.ascontiguousarray(a, dtype=np.float64)
    cdef double s, c = 0.0
    cdef const double *p = <const double *>cnp.PyArray_DATA(x)
    cdef int64_t n = x.size
    with nogil:
        s = fl_sum_f64(p, n, &c)
    if with_comp:
        return s, c
    return s
