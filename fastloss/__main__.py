"""Command line: ``python -m fastloss info`` and ``python -m fastloss bench``.

``info`` prints :func:`fastloss.show_config`.  ``bench`` times fastloss against the
NumPy reference and PyTorch (see :mod:`fastloss.bench`).  Bad arguments give a
one-line message and exit code 2, before any work starts.
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
        description="Time each regression loss (forward and with-grad, float32) against the NumPy reference "
                    "and PyTorch CPU (when importable), interleaved; print medians, speedups and GB/s as a "
                    "percentage of the read bandwidth measured in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true", help="only sizes 1e6 and 1e7, fewer repeats")
    b.add_argument("--loss", action="append", metavar="NAME",
                   help="a loss to time (repeatable; default: all regression losses)")
    b.add_argument("--threads", metavar="LIST", default=None,
                   help="comma-separated thread counts (default: 1,2)")
    b.add_argument("--sizes", metavar="LIST", default=None,
                   help="comma-separated element counts, e.g. 1e6,1e7 (default: 1e6,1e7,1e8)")
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


def _bench_options(args):
    from fastloss import _core, bench

    known = bench.regression_losses()
    for name in args.loss or ():
        if name not in known:
            raise _UsageError(f"unknown loss {name!r} (known: {', '.join(known)})")
    if args.threads is None:
        threads = tuple(dict.fromkeys(min(t, max(1, _core.num_procs())) for t in bench.DEFAULT_THREADS))
    else:
        threads = _int_list(args.threads, "threads", int)
    if args.sizes is None:
        sizes = bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES
    else:
        sizes = _int_list(args.sizes, "sizes", bench.parse_size)
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
    return bench.Options(losses=args.loss, sizes=sizes, threads=threads, isas=isas, quick=args.quick,
                         repeat=args.repeat, json_path=args.json, torch=not args.no_torch)


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
