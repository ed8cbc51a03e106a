"""Command line: ``python -m fastloss info`` and ``python -m fastloss bench``.

``info`` prints :func:`fastloss.show_config`.  ``bench`` times fastloss against the
NumPy reference and PyTorch: the regression losses and cross-entropy (a subset by
default; ``--loss cross_entropy`` or ``--full`` for all of it; see :mod:`fastloss.bench`),
the PyTorch training step, and on request (``--loss linear_cross_entropy`` or ``--full``)
the fused linear + cross-entropy, and writes the report as JSON, markdown, a plot, or
compared with a previous JSON.
Bad arguments give a one-line message and exit code 2, before any work starts; Ctrl-C
prints (and writes) the report of the cases that finished and exits with 130.
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
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,eval}", parser_class=_Parser)
    sub.add_parser("info", help="print the build and runtime configuration (fastloss.show_config())",
                   description="Print the build and runtime configuration.")
    from fastloss import _eval
    _eval.add_arguments(sub.add_parser("eval", help="a loss over .npy/.npz files, streamed (see fastloss._eval)",
                                       description=_eval.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    b = sub.add_parser(
        "bench", help="time the losses against NumPy and PyTorch",
        description="Time the regression losses (forward and with-grad, float32) and cross-entropy (forward, and\n"
                    "with-grad into a new array, a preallocated grad_out and in place; float32 and float16) against\n"
                    "the NumPy reference and PyTorch CPU (when importable), interleaved; print medians, speedups,\n"
                    "GB/s as a percentage of the read bandwidth measured in the same run, each provider's peak\n"
                    "extra memory and its error against the float64 reference.  Progress goes to stderr (one\n"
                    "updating line on a terminal, one line per case otherwise), the report to stdout.\n\n"
                    "The default run (about 3 minutes on 2 cores) times a cross-entropy subset: 2048x32000 and\n"
                    "1x262144, float32 and float16, forward and with-grad into a new array (NumPy in float16 only\n"
                    "at 1x262144).  --loss cross_entropy (or the family, classification) times the whole\n"
                    "cross-entropy set: shapes 8192x32000, 2048x128256, 256x262144, 1x262144, 32768x1024, every\n"
                    "mode (about 3 minutes); --full times everything.\n\n"
                    "The other losses: family elementwise (binary_cross_entropy[_with_logits], sigmoid_focal_loss,\n"
                    "hinge_loss, kl_div at 1e7 elements; dpo_loss at B = 64 and 4096) and family rows\n"
                    "(multi_margin_loss and kl_div_logits at 512x32000, sequence_log_probs at (8, 256, 32000),\n"
                    "triplet_margin_loss at 4096x512, info_nce_loss at 2048x256; --loss NAME or --full: the\n"
                    "sizes of issue 6, e.g. 2048x32000 and 512x128256), float32, forward and with-grad.\n\n"
                    "With PyTorch installed, the default run also times a training step: logits 8192x32000 float32\n"
                    "(a leaf that requires grad) -> fastloss.torch.cross_entropy or F.cross_entropy -> backward\n"
                    "(about 30 s); --loss training_step (or --full) adds bfloat16 and the peak memory of both at\n"
                    "8192x128256 (measured in fresh processes; torch needs about 16 GiB there).\n\n"
                    "--loss linear_cross_entropy (alias linear; or --full) times the fused linear + cross-entropy\n"
                    "(loss and the gradients of input and weight, float32) at (N, H, V) = (4096, 1024, 32000) and\n"
                    "(8192, 2048, 128256), threads 1 and 2 (or --threads), each run one call in a fresh process:\n"
                    "fastloss.linear (NumPy), fastloss.torch (autograd), and with PyTorch F.linear_cross_entropy\n"
                    "plain and chunked; medians, peak extra memory and issue 8's targets (about 17 minutes; not\n"
                    "in the default run; --quick: 1024x512x8000).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="only sizes 1e6 and 1e7 (cross-entropy: 1x262144 and 32768x1024), fewer repeats")
    b.add_argument("--full", action="store_true",
                   help="every loss, the whole cross-entropy set (shapes, modes; NumPy at every float32 shape) "
                        "and float32 and float16 for both families, the training step, and the fused linear + "
                        "cross-entropy (about 17 minutes of it): about 27 minutes")
    b.add_argument("--loss", action="append", metavar="NAME",
                   help="a loss to time, or a family: regression, classification, elementwise, rows, or "
                        "training_step (the PyTorch training step), or linear_cross_entropy (alias linear: the "
                        "fused linear + cross-entropy, fresh processes, ~17 minutes); repeatable or "
                        "comma-separated; default: all but linear_cross_entropy; cross_entropy, a row loss, "
                        "training_step or linear_cross_entropy selects its whole set")
    b.add_argument("--threads", metavar="LIST", default=None,
                   help="comma-separated thread counts (default: 1 and all, i.e. fastloss's default thread "
                        "count: the cores, or OMP_NUM_THREADS)")
    b.add_argument("--sizes", metavar="LIST", default=None,
                   help="regression (and, when given, the elementwise losses): comma-separated element counts, "
                        "e.g. 1e6,1e7 (default: 1e6,1e7,1e8)")
    b.add_argument("--shapes", metavar="LIST", default=None,
                   help="cross-entropy (and, when given, the row losses): comma-separated ROWSxCLASSES, "
                        "e.g. 8192x32000,1x262144")
    b.add_argument("--dtype", "--dtypes", dest="dtypes", metavar="LIST", default=None,
                   help="comma-separated dtypes among float32, float16, float64, for both families (default: "
                        "float32 for the regression losses, float32,float16 for cross-entropy)")
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
    b.add_argument("--markdown", metavar="PATH", default=None,
                   help="also write the report (header and tables) as GitHub markdown")
    b.add_argument("--plot", metavar="PATH", default=None,
                   help="also plot the speedups against problem size, per family and competitor (PATH ending in "
                        ".png or .svg; needs matplotlib)")
    b.add_argument("--compare", metavar="OLD.json", default=None,
                   help="compare each case's fastloss median with the same case in a previous --json report "
                        "(new/old; flags regressions of more than 10%%; cases on one side only are listed)")
    b.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny cases, seconds: the CLI tests
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
    training = None
    linear = False
    if args.loss:
        names = [n.strip() for item in args.loss for n in item.split(",") if n.strip()]
        if any(n in bench.TRAINING_NAMES for n in names):
            training = "full"
            names = [n for n in names if n not in bench.TRAINING_NAMES]
        if any(n in bench.LINEAR_NAMES for n in names):
            linear = True
            names = [n for n in names if n not in bench.LINEAR_NAMES]
        try:
            losses = bench.resolve_losses(names) if names else []
        except ValueError as exc:
            raise _UsageError(f"{exc} (or training_step: the PyTorch training step; or linear_cross_entropy: "
                              "the fused linear + cross-entropy)") from None
    chosen = [name for name, on in (("--full", args.full), ("--quick", args.quick), ("--smoke", args.smoke)) if on]
    if len(chosen) > 1:
        raise _UsageError(f"{' and '.join(chosen)} exclude each other")
    if args.loss is None or training:
        training = "smoke" if args.smoke else "quick" if args.quick else "full" if (args.full or training) \
            else "default"
    # the fused linear + cross-entropy: asked for by name, or --full; never in the default run
    linear = ("smoke" if args.smoke else "quick" if args.quick else "full") if (linear or args.full) else None
    if args.no_torch or not bench.torch_available():
        if training and losses == [] and not linear:
            raise _UsageError("the training step needs PyTorch (pip install torch) and not --no-torch")
        training = None
    if args.smoke:
        preset = "smoke"
    elif args.quick:
        preset = "quick"
    elif args.full or (losses is not None and any(bench.BENCH_LOSSES[n].family in ("classification", "rows")
                                                   for n in losses)):
        preset = "full"
    else:
        preset = "default"
    if args.threads is None:
        threads = bench.default_threads()
    else:
        threads = _int_list(args.threads, "threads", int)
    if args.sizes is None:
        sizes = bench.SMOKE_SIZES if args.smoke else bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES
    else:
        sizes = _int_list(args.sizes, "sizes", bench.parse_size)
    shapes = None if args.shapes is None else _str_list(args.shapes, "shapes", bench.parse_shape)
    dtypes = None if args.dtypes is None else _str_list(args.dtypes, "dtype", _dtype_name)
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
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path is not None:
            _check_writable(flag, path)
    if args.plot is not None:
        from fastloss import _bench_report
        if _bench_report.plot_format(args.plot) is None:
            raise _UsageError(f"--plot: {args.plot!r} must end in {' or '.join(_bench_report.PLOT_FORMATS)}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    compare = None
    if args.compare is not None:
        from fastloss import _bench_report
        try:
            compare = (args.compare, _bench_report.load_previous(args.compare))
        except ValueError as exc:
            raise _UsageError(f"--compare: {exc}") from None
    opts = bench.Options(losses=losses, sizes=sizes, threads=threads, isas=isas, quick=args.quick,
                         repeat=args.repeat, json_path=args.json, torch=not args.no_torch, preset=preset,
                         shapes=shapes, dtypes=dtypes, modes=modes, markdown_path=args.markdown,
                         plot_path=args.plot, compare=compare, smoke=args.smoke,
                         sizes_given=args.sizes is not None, training=training, linear=linear,
                         linear_threads=None if args.threads is None else threads)
    try:
        opts.cases()  # every remaining check (dtypes, modes that apply to no selected loss), before any work
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return opts


def _check_writable(flag: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise _UsageError(f"{flag}: cannot write to {path!r} (no such writable directory)")


def _dtype_name(text: str) -> str:
    import numpy as np

    from fastloss import bench
    try:
        name = np.dtype(text.strip()).name
    except TypeError:
        name = None
    if name not in bench.BENCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(bench.BENCH_DTYPES)}, got {text.strip()!r}")
    return name


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(f"{PROG}: error: choose a command: info or bench (--help for details)", file=sys.stderr)
        return 2
    if args.command == "eval":
        from fastloss import _eval
        return _eval.run(args)
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
        report = bench.run(opts)   # Ctrl-C while timing: the report of the cases that finished
    except KeyboardInterrupt:      # ... at any other moment
        print(f"{PROG} bench: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:         # writing --json / --markdown / --plot
        print(f"{PROG} bench: error: {exc}", file=sys.stderr)
        return 1
    if report["interrupted"]:
        print(f"{PROG} bench: interrupted: {len(report['cases'])} cases finished", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
