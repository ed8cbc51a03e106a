"""``python -m fastloss eval``: a loss over ``.npy`` / ``.npz`` files, streamed in row windows.

Design
------
The input (and target) arrays are never mapped or read whole: rows are taken in windows of
``chunk_rows`` (default: about 256 MiB of input per window) and each window goes through the
streaming accumulator of :mod:`fastloss.metrics` (the same kernels as the one-shot functions,
float64 chunk sums, compensated merge), so files larger than RAM -- or than the process's
address-space limit -- work, and the result equals the one-shot function's on the whole array
within 2 ulp.

Readers (``reader=``):

* ``"mmap"`` (default for ``.npy`` and stored ``.npz`` members): each window is its own
  read-only mapping of just those rows (offset rounded down to the allocation granularity),
  created with ``MAP_POPULATE`` (the kernel then finds its pages mapped: no page faults in
  the hot loop) and unmapped after use.  ``prefetch=True`` maps the next window in a helper
  thread while the kernel (GIL released) runs on this one.
* ``"read"``: ``readinto`` two reused buffers alternately, the next one filled by the helper
  thread (the only reader for deflated ``.npz`` members: they are decompressed window by
  window; also used for a stored ``.npz`` member whose data offset, which depends on the
  member name's length, is not a multiple of its itemsize: mapped, each window would need an
  aligning copy on top).

Measured on the 2-core VM with 4 GB of float32 logits, page cache warm (load average 5.5,
``benchmarks/eval_throughput.py``), against the in-memory ``cross_entropy`` (3.1 GB/s): mmap
without prefetch 0.94 of it, mmap with prefetch 0.84 (on 2 cores the helper competes with the
kernel's two threads), read + prefetch 0.36 (the copy); so mmap without prefetch is the default
(prefetch stays the default of the read reader).  Windows of 256 MiB: with 64 MiB the kernel's
per-call thread barrier cost ~10 % more on the loaded machine.

Inputs: ``path.npy``, or ``path.npz:member`` (a ``.npz`` with one member may omit it).
C-ordered arrays of float16/float32/float64 (input) and, for cross_entropy / nll_loss /
perplexity / multi_margin_loss, integer class indices (target).  Rows: for the
classification losses the input is (rows..., V) and the target (rows...); for the others
input and target have one shape (N, ...) and windows are taken along the first axis.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PROG = "python -m fastloss eval"
_WINDOW_BYTES = 256 << 20
_PREFETCH_DEFAULT = {"mmap": False, "read": True}   # measured: benchmarks/eval_throughput.py
_CLASSIFICATION = ("cross_entropy", "nll_loss", "perplexity", "multi_margin_loss")
_EVAL_LOSSES = ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse", "mse", "mae", "binary_cross_entropy",
                "binary_cross_entropy_with_logits", "sigmoid_focal_loss", "hinge_loss", "kl_div") + _CLASSIFICATION


class EvalError(Exception):
    """A user error of the eval command: printed as one line, exit code 2."""


# ---- array sources -----------------------------------------------------------------------------

class ArraySource:
    """A C-ordered array stored in a file: `shape`, `dtype`, rows read by window.

    `offset` is the byte offset of the data in `path` (stored members), or None with a
    `zip_member` (deflated: read sequentially through the decompressor)."""

    def __init__(self, spec: str, what: str):
        self.spec, self.what = spec, what
        path, member = spec, None
        if not os.path.exists(path) and ":" in spec:
            path, member = spec.rsplit(":", 1)
        if not os.path.exists(path):
            raise EvalError(f"{what}: no such file: {spec}")
        if os.path.isdir(path):
            raise EvalError(f"{what}: is a directory: {spec}")
        self.path = path
        self.zip_member = None
        self._zip = None
        try:
            if zipfile.is_zipfile(path):
                self._open_npz(member)
            else:
                if member is not None:
                    raise EvalError(f"{what}: {path} is not a .npz archive (no member {member!r})")
                with open(path, "rb") as f:
                    self._read_header(f, what)
                    self.offset = f.tell()
        except (ValueError, struct.error, zipfile.BadZipFile, EOFError) as exc:
            raise EvalError(f"{what}: {spec} is not a valid .npy/.npz file ({exc})") from None
        self.row_shape = self.shape[1:]
        self.n = self.shape[0] if self.shape else 1
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        if self.offset is not None:
            need = self.offset + self.n * self.row_bytes
            if os.path.getsize(path) < need:
                raise EvalError(f"{what}: {spec} is truncated ({os.path.getsize(path)} bytes, the header promises "
                                f"{need})")

    def _read_header(self, f, what):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise EvalError(f"{what}: {self.spec} holds Python objects (dtype {dtype}); expected numbers")
        if fortran and len(shape) > 1:
            raise EvalError(f"{what}: {self.spec} is Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
        self.shape, self.dtype = tuple(shape), dtype

    def _open_npz(self, member):
        zf = zipfile.ZipFile(self.path)
        names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        if member is None:
            if len(names) != 1:
                raise EvalError(f"{self.what}: {self.path} has members {', '.join(names)}: choose one with "
                                f"{self.path}:NAME")
            member = names[0]
        if member not in names:
            raise EvalError(f"{self.what}: {self.path} has no member {member!r} (members: {', '.join(names)})")
        info = zf.getinfo(zf.namelist()[names.index(member)])
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError("bad local header")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + n_name + n_extra)
                self._read_header(f, self.what)
                self.offset = f.tell()
            zf.close()
        else:
            self.offset = None
            self.zip_member = info
            self._zip = zf
            with zf.open(info) as s:
                self._read_header(s, self.what)

    def reader(self, kind: str):
        if self.offset is None:
            return _StreamReader(self)
        if kind == "mmap" and self.offset % self.dtype.itemsize == 0:
            return _MmapReader(self)
        # readinto, or a .npz member stored at an offset that is not a multiple of its itemsize (it
        # depends on the member name's length): mapped, every window would be copied to align it,
        # while readinto fills aligned buffers with one copy
        return _ReadintoReader(self)

    def close(self):
        if self._zip is not None:
            self._zip.close()


class _MmapReader:
    """Rows [r0, r1) as a read-only shared mapping of just those bytes (MAP_POPULATE: pages present)."""

    def __init__(self, src: ArraySource):
        self.src = src
        self.fd = os.open(src.path, os.O_RDONLY)
        self.flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

    def load(self, r0: int, r1: int):
        s = self.src
        start = s.offset + r0 * s.row_bytes
        length = (r1 - r0) * s.row_bytes
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if length == 0:
            return np.empty((0,) + s.row_shape, s.dtype), None
        mm = mmap.mmap(self.fd, length + (start - base), flags=self.flags, prot=mmap.PROT_READ, offset=base)
        a = np.frombuffer(mm, dtype=s.dtype, count=(r1 - r0) * math.prod(s.row_shape), offset=start - base)
        a = a.reshape((r1 - r0,) + s.row_shape)
        return a, mm

    @staticmethod
    def release(handle):
        if handle is not None:
            try:
                handle.close()
            except BufferError:         # a view still alive somewhere: the GC unmaps it later
                pass

    def close(self):
        os.close(self.fd)


class _ReadintoReader:
    """Rows read with readinto into two reused buffers (the helper fills one, the kernel reads the other)."""

    def __init__(self, src: ArraySource):
        self.src = src
        self.f = open(src.path, "rb", buffering=0)
        self.bufs = []
        self.lock = threading.Lock()

    def _buffer(self, nbytes):
        with self.lock:
            for b in self.bufs:
                if not b[1] and b[0].nbytes >= nbytes:
                    b[1] = True
                    return b
            b = [np.empty(max(nbytes, 1), np.uint8), True]
            self.bufs.append(b)
            return b

    def load(self, r0, r1):
        s = self.src
        nbytes = (r1 - r0) * s.row_bytes
        b = self._buffer(nbytes)
        view = memoryview(b[0])[:nbytes]
        self.f.seek(s.offset + r0 * s.row_bytes)
        got = 0
        while got < nbytes:
            k = self.f.readinto(view[got:])
            if not k:
                raise EvalError(f"{s.what}: {s.spec}: unexpected end of file")
            got += k
        a = b[0][:nbytes].view(s.dtype).reshape((r1 - r0,) + s.row_shape)
        return a, b

    def release(self, handle):
        with self.lock:
            handle[1] = False

    def close(self):
        self.f.close()


class _StreamReader(_ReadintoReader):
    """A deflated .npz member, decompressed window by window (windows must come in order)."""

    def __init__(self, src: ArraySource):
        self.src = src
        self.f = src._zip.open(src.zip_member)
        self.src._read_header(self.f, src.what)            # skip the header
        self.pos = 0
        self.bufs = []
        self.lock = threading.Lock()

    def load(self, r0, r1):
        if r0 != self.pos:
            raise RuntimeError("internal: a deflated member is read in order")
        s = self.src
        nbytes = (r1 - r0) * s.row_bytes
        b = self._buffer(nbytes)
        view = memoryview(b[0])[:nbytes]
        got = 0
        while got < nbytes:
            chunk = self.f.read(min(nbytes - got, 16 << 20))
            if not chunk:
                raise EvalError(f"{s.what}: {s.spec}: unexpected end of the compressed member")
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        self.pos = r1
        return b[0][:nbytes].view(s.dtype).reshape((r1 - r0,) + s.row_shape), b


# ---- progress -----------------------------------------------------------------------------------

class Progress:
    """One updating line on stderr: percentage, GB/s, ETA.  On a TTY it redraws in place (at most
    10 times a second); otherwise (forced with --progress) one line per 10 %."""

    def __init__(self, total_bytes: int, enabled: bool, stream=None):
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.last_decile = -1

    def update(self, done: int):
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = min(done / self.total, 1.0)
        el = now - self.t0
        rate = done / el / 1e9 if el > 0 else 0.0
        eta = (el / frac - el) if frac > 0 else 0.0
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {100 * frac:5.1f}%  {rate:6.2f} GB/s  ETA {eta:5.1f} s"
        if self.tty:
            if now - self.last >= 0.1 or frac >= 1.0:
                self.stream.write("\r" + line)
                self.stream.flush()
                self.last = now
        else:
            decile = int(frac * 10)
            if decile > self.last_decile:
                self.stream.write(line + "\n")
                self.stream.flush()
                self.last_decile = decile

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- the evaluation -----------------------------------------------------------------------------

def _check_dtypes(loss: str, x: ArraySource, t: ArraySource):
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise EvalError(f"input: {x.spec} has dtype {x.dtype}; expected float16, float32 or float64")
    if not x.dtype.isnative:
        raise EvalError(f"input: {x.spec} has non-native byte order ({x.dtype.str})")
    if loss in _CLASSIFICATION:
        if t.dtype.kind not in "iu":
            raise EvalError(f"target: {loss} needs integer class indices, but {t.spec} has dtype {t.dtype}")
        if len(x.shape) < 1:
            raise EvalError(f"input: {x.spec} has shape {x.shape}; expected (rows..., classes)")
        if t.shape != x.shape[:-1]:
            raise EvalError(f"target: shape {t.shape} does not match the input's rows {x.shape[:-1]} (input shape "
                            f"{x.shape})")
    else:
        if t.dtype.kind != "f" or t.dtype.itemsize not in (2, 4, 8):
            raise EvalError(f"target: {loss} needs a float target, but {t.spec} has dtype {t.dtype}")
        if t.shape != x.shape:
            raise EvalError(f"target: shape {t.shape} does not match the input's shape {x.shape}")
        if not x.shape:
            raise EvalError(f"input: {x.spec} is a 0-d array; expected (samples, ...)")


def _flat_rows(src: ArraySource, keep: int):
    """View the source as (N, *last `keep` dims): C order makes it the same bytes."""
    lead = src.shape[:len(src.shape) - keep] if keep else src.shape
    n = math.prod(lead)
    src.n = n
    src.row_shape = src.shape[len(src.shape) - keep:] if keep else ()
    src.row_bytes = math.prod(src.row_shape) * src.dtype.itemsize


def _json_safe(value):
    """NaN and infinities as null (strict JSON has no NaN): e.g. the mean of an empty input."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(loss: str, input, target, *, chunk_rows: int | None = None, reader: str = "mmap",
             progress: bool = False, num_threads=None, prefetch: bool | None = None, **options):
    """Stream ``loss`` over the arrays stored in the files `input` and `target` (paths, see the
    module docstring) and return ``(accumulator, info)``; ``info`` holds rows, bytes, seconds.

    Raises :class:`EvalError` for user errors (missing file, mismatched lengths, wrong dtypes,
    bad loss name or chunk size)."""
    from fastloss import metrics

    if loss not in _EVAL_LOSSES:
        raise EvalError(f"unknown or unsupported loss {loss!r} for eval; choose one of {', '.join(_EVAL_LOSSES)}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise EvalError(f"chunk size must be a positive number of rows, got {chunk_rows!r}")
    if reader not in ("mmap", "read"):
        raise EvalError(f"reader must be 'mmap' or 'read', got {reader!r}")
    try:
        acc = metrics.accumulator(loss, **options)
    except (TypeError, ValueError) as exc:
        raise EvalError(str(exc)) from None
    if prefetch is None:
        prefetch = _PREFETCH_DEFAULT[reader]
    xs = ArraySource(os.fspath(input), "input")
    ts = ArraySource(os.fspath(target), "target")
    try:
        _check_dtypes(loss, xs, ts)
        if loss in _CLASSIFICATION:
            _flat_rows(xs, 1)
            _flat_rows(ts, 0)
        if xs.n != ts.n:
            raise EvalError(f"input has {xs.n} rows but target has {ts.n}")
        n = xs.n
        rows = chunk_rows or max(1, _WINDOW_BYTES // max(xs.row_bytes, 1))
        rx, rt = xs.reader(reader), ts.reader(reader)
        total = n * (xs.row_bytes + ts.row_bytes)
        bar = Progress(total, progress)
        t0 = time.perf_counter()
        windows = [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]

        def load(w):
            return rx.load(*w), rt.load(*w)

        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                nxt = pool.submit(load, windows[0]) if (windows and prefetch) else None
                for i, w in enumerate(windows):
                    loaded = nxt.result() if prefetch else load(w)
                    nxt = pool.submit(load, windows[i + 1]) if (prefetch and i + 1 < len(windows)) else None
                    (xa, hx), (ta, ht) = loaded
                    del loaded
                    try:
                        acc.update(xa, ta, num_threads=num_threads)
                    except (ValueError, TypeError, IndexError) as exc:
                        raise EvalError(f"rows {w[0]}..{w[1] - 1}: {exc}") from None
                    finally:
                        del xa, ta
                        rx.release(hx)
                        rt.release(ht)
                    bar.update(w[1] * (xs.row_bytes + ts.row_bytes))
        finally:
            bar.close()
            rx.close()
            rt.close()
        seconds = time.perf_counter() - t0
    finally:
        xs.close()
        ts.close()
    info = {"input": xs.spec, "target": ts.spec, "rows": n, "chunk_rows": rows, "bytes": total,
            "seconds": seconds, "gb_per_s": total / seconds / 1e9 if seconds > 0 else math.inf, "reader": reader}
    return acc, info


def _result_dict(acc, info) -> dict:
    from fastloss import metrics
    if isinstance(acc, metrics.CrossEntropy):
        out = acc.summary()
        out["loss"] = acc.loss
        out["result"] = float(acc.result())
    else:
        r = acc.result()
        out = {"loss": acc.loss, "result": r.tolist() if isinstance(r, np.ndarray) else float(r)}
        out["options"] = {k: v for k, v in acc.options.items() if not isinstance(v, np.ndarray)}
    out.update({k: info[k] for k in ("input", "target", "rows", "seconds", "gb_per_s")})
    return out


def _parse_topk(text: str):
    if text.strip().lower() in ("none", ""):
        return None
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise EvalError(f"--topk must be a comma-separated list of positive ints, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise EvalError(f"--topk must be a comma-separated list of positive ints, got {text!r}")
    return ks


_OPTION_FLAGS = {"ignore_index": "--ignore-index", "topk": "--topk", "delta": "--delta", "beta": "--beta",
                 "reduction": "--reduction", "label_smoothing": "--label-smoothing", "softcap": "--softcap",
                 "multioutput": "--multioutput", "margin": "--margin"}


def add_arguments(p) -> None:
    """The eval subcommand's arguments (called by fastloss.__main__)."""
    p.add_argument("--loss", required=True, metavar="NAME", help="a loss function name, e.g. cross_entropy, mse_loss")
    p.add_argument("--input", required=True, metavar="PATH", help=".npy file, or file.npz:member")
    p.add_argument("--target", required=True, metavar="PATH", help=".npy file, or file.npz:member")
    p.add_argument("--ignore-index", type=int, default=None, help="target value to skip (classification; -100)")
    p.add_argument("--topk", default=None, metavar="K,K", help="top-k accuracies to report (cross_entropy; default 1,5; none: no accuracy, a little faster)")
    p.add_argument("--reduction", default=None, choices=("mean", "sum", "batchmean"))
    p.add_argument("--delta", type=float, default=None, help="huber_loss delta")
    p.add_argument("--beta", type=float, default=None, help="smooth_l1_loss beta")
    p.add_argument("--margin", type=float, default=None, help="hinge_loss / multi_margin_loss margin")
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--multioutput", default=None, choices=("raw_values", "uniform_average"), help="rmse per output")
    p.add_argument("--chunk-rows", type=int, default=None, metavar="N", help="rows per window (default: ~256 MiB)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="kernel threads (default: all)")
    p.add_argument("--reader", default="mmap", choices=("mmap", "read"), help="window reader (default mmap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true", default=None, help="progress on stderr even if not a TTY")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    """The eval command: returns the exit code (0, or 2 after a one-line message)."""
    from fastloss import metrics
    try:
        opts = {}
        for name, flag in _OPTION_FLAGS.items():
            v = getattr(args, name)
            if v is None:
                continue
            cls = metrics.ACCUMULATORS.get(args.loss)
            if cls is not None and name not in cls._DEFAULTS:
                raise EvalError(f"{flag} does not apply to {args.loss}")
            opts[name] = _parse_topk(v) if name == "topk" else v
        if args.chunk_rows is not None and args.chunk_rows < 1:
            raise EvalError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
        progress = args.progress if args.progress is not None else sys.stderr.isatty()
        acc, info = evaluate(args.loss, args.input, args.target, chunk_rows=args.chunk_rows, reader=args.reader,
                             progress=progress, num_threads=args.threads, **opts)
    except EvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    out = _result_dict(acc, info)
    if args.json:
        print(json.dumps(_json_safe(out), allow_nan=False))
    else:
        print(format_result(out))
    return 0


def format_result(out: dict) -> str:
    lines = []
    for k, v in out.items():
        if isinstance(v, float):
            v = f"{v:.8g}"
        lines.append(f"{k:>16}: {v}")
    return "\n".join(lines)


__all__ = ["evaluate", "EvalError", "ArraySource", "Progress", "add_arguments", "run"]
