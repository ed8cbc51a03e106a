"""Command line: ``python -m fastloss info`` and ``python -m fastloss bench``.

``info`` prints :func:`fastloss.show_config`.  ``bench`` times fastloss against the
NumPy reference and PyTorch: the regression losses and cross-entropy (a subset by
default; ``--loss cross_entropy`` or ``--full`` for all of it; see :mod:`fastloss.bench`).
Bad arguments give a one-line message and exit code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m fastloss"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _UsageError(Exception):
    pass


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="fastloss: fast loss functions for CPUs.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench}", parser_class=_Parser)
    sub.add_parser("info", help="print the build and runtime configuration (fastloss.show_config())",
                   description="Print the build and runtime configuration.")
    b = sub.add_parser(
        "bench", help="time the losses against NumPy and PyTorch",
        description="Time the regression losses (forward and with-grad, float32) and cross-entropy (forward, and\n"
                    "with-grad into a new array, a preallocated grad_out and in place; float32 and float16; with\n"
                    "each provider's peak extra memory) against the NumPy reference and PyTorch CPU (when\n"
                    "importable), interleaved; print medians, speedups and GB/s as a percentage of the read\n"
                    "bandwidth measured in the same run.\n\n"
                    "The default run (under 2 minutes on 2 cores) times a cross-entropy subset: 8192x32000 and\n"
                    "1x262144, float32 and float16, forward and with-grad into a new array, NumPy only at 1x262144.\n"
                    "--loss cross_entropy (or the family, classification) times the whole cross-entropy set: shapes\n"
                    "8192x32000, 2048x128256, 256x262144, 1x262144, 32768x1024, every mode (about 3 minutes);\n"
                    "--full times everything.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="only sizes 1e6 and 1e7 (cross-entropy: 1x262144 and 32768x1024), fewer repeats")
    b.add_argument("--full", action="store_true",
                   help="every loss and the whole cross-entropy set (shapes, dtypes, modes; NumPy at every "
                        "float32 shape): a few minutes")
    b.add_argument("--loss", action="append", metavar="NAME",
                   help="a loss to time, or a family: regression, classification (repeatable or "
                        "comma-separated; default: all; cross_entropy selects its whole set)")
    b.add_argument("--threads", metavar="LIST", default=None,
                   help="comma-separated thread counts (default: 1,2)")
    b.add_argument("--sizes", metavar="LIST", default=None,
                   help="regression: comma-separated element counts, e.g. 1e6,1e7 (default: 1e6,1e7,1e8)")
    b.add_argument("--shapes", metavar="LIST", default=None,
                   help="cross-entropy: comma-separated ROWSxCLASSES, e.g. 8192x32000,1x262144")
    b.add_argument("--dtypes", metavar="LIST", default=None,
                   help="cross-entropy: comma-separated dtypes among float32, float16, float64 "
                        "(default: float32,float16; the regression losses run in float32)")
    b.add_argument("--modes", metavar="LIST", default=None,
                   help="comma-separated modes among forward, with_grad, with_grad_out, with_grad_inplace (the "
                        "last two: cross-entropy only; default: forward,with_grad, and all four with "
                        "--loss cross_entropy / --full)")
    b.add_argument("--repeat", metavar="N", type=int, default=None,
                   help="minimum timed calls per provider (default: 7 at 1e6, 5 at 1e7, 3 at 1e8)")
    b.add_argument("--isa", metavar="NAME", default=None,
                   help="run the fastloss cases with this ISA (baseline, avx2, avx512), or 'all' for one row "
                        "per ISA the CPU supports (default: the ISA selected at import)")
    b.add_argument("--no-torch", action="store_true", help="do not time PyTorch even if it is installed")
    b.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results (one record per case, with the environment) as JSON")
    return parser


def _int_list(text: str, what: str, parse) -> tuple:
    try:
        values = tuple(parse(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise _UsageError(f"--{what} expects a comma-separated list of positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise _UsageError(f"--{what} expects a comma-separated list of positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))


def _str_list(text: str, what: str, parse) -> tuple:
    try:
        values = tuple(parse(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise _UsageError(f"--{what}: {exc}") from None
    if not values:
        raise _UsageError(f"--{what} expects a comma-separated list, got {text!r}")
    return tuple(dict.fromkeys(values))


def _bench_options(args):
    from fastloss import _core, bench

    losses = None
    if args.loss:
        names = [n for item in args.loss for n in item.split(",") if n.strip()]
        try:
            losses = bench.resolve_losses(names)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
    if args.full and args.quick:
        raise _UsageError("--full and --quick exclude each other")
    if args.quick:
        preset = "quick"
    elif args.full or (losses is not None and any(bench.BENCH_LOSSES[n].family == "classification"
                                                   for n in losses)):
        preset = "full"
    else:
        preset = "default"
    if args.threads is None:
        threads = tuple(dict.fromkeys(min(t, max(1, _core.num_procs())) for t in bench.DEFAULT_THREADS))
    else:
        threads = _int_list(args.threads, "threads", int)
    if args.sizes is None:
        sizes = bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES
    else:
        sizes = _int_list(args.sizes, "sizes", bench.parse_size)
    shapes = None if args.shapes is None else _str_list(args.shapes, "shapes", bench.parse_shape)
    dtypes = None if args.dtypes is None else _str_list(args.dtypes, "dtypes", _dtype_name)
    modes = None if args.modes is None else _str_list(args.modes, "modes", bench.normalize_mode)
    if args.repeat is not None and args.repeat < 1:
        raise _UsageError(f"--repeat must be >= 1, got {args.repeat}")
    isas = None
    if args.isa is not None:
        name = args.isa.strip().lower()
        supported = bench.isa_order()
        if name == "all":
            isas = supported
        elif name not in _core.ISA_NAMES:
            raise _UsageError(f"unknown ISA {args.isa!r} (known: {', '.join(_core.ISA_NAMES)}, all)")
        elif name not in supported:
            raise _UsageError(f"ISA {name!r} is not supported here (supported: {', '.join(supported)})")
        else:
            isas = [name]
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise _UsageError(f"--json: cannot write to {args.json!r} (no such writable directory)")
    opts = bench.Options(losses=losses, sizes=sizes, threads=threads, isas=isas, quick=args.quick,
                         repeat=args.repeat, json_path=args.json, torch=not args.no_torch, preset=preset,
                         shapes=shapes, dtypes=dtypes, modes=modes)
    try:
        opts.cases()  # every remaining check (dtypes, modes that apply to no selected loss), before any work
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return opts


def _dtype_name(text: str) -> str:
    import numpy as np

    from fastloss import bench
    try:
        name = np.dtype(text.strip()).name
    except TypeError:
        name = None
    if name not in bench.CE_BENCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(bench.CE_BENCH_DTYPES)}, got {text.strip()!r}")
    return name


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(f"{PROG}: error: choose a command: info or bench (--help for details)", file=sys.stderr)
        return 2
    if args.command == "info":
        import fastloss
        fastloss.show_config()
        return 0
    try:
        opts = _bench_options(args)
    except _UsageError as exc:
        print(f"{PROG} bench: error: {exc}", file=sys.stderr)
        return 2
    from fastloss import bench
    try:
        bench.run(opts)
    except KeyboardInterrupt:
        print(f"{PROG} bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
