"""The report of ``python -m fastloss bench``: text, markdown, plot and ``--compare``.

Design: everything here reads the report dict that :func:`fastloss.bench.run` returns and
``--json`` writes, never the live run, so an interrupted run, a run read back from JSON and
a finished run are printed by the same code.  :func:`blocks` turns a report into a list of
blocks -- headings, tables (a header row, rows, the left-aligned columns) and notes -- and
two renderers lay them out: :func:`format_text` for the terminal (the header is printed
first, by :func:`format_header`, before any case runs) and :func:`format_markdown` for
GitHub.  :func:`write_plot` draws the speedups (matplotlib, imported only there), and
:func:`compare` matches the cases of a previous ``--json`` report with this one's.
"""
from __future__ import annotations

import json
import math
import textwrap

from fastloss import bench
from fastloss.bench import MODE_LABELS, SUBPROCESS_MMAP_THRESHOLD, format_ms, format_size, record_label

#: --compare flags a case whose fastloss median grew by more than this fraction.
REGRESSION_THRESHOLD = 0.10
#: The file types --plot writes (by the extension of its path).
PLOT_FORMATS = (".png", ".svg")
FAMILY_TITLES = {"regression": "regression", "classification": "cross-entropy", "elementwise": "elementwise",
                 "rows": "row losses"}
#: Families whose records are sized by an element count (the others by a shape).
SIZE_FAMILIES = ("regression", "elementwise")


# ---- header ----------------------------------------------------------------------------------------

def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def header_items(report: dict) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(key, value), ...]) of the environment block."""
    env, opts = report["environment"], report["options"]
    use_torch = opts["torch"]
    items = [
        ("cpu", f"{env['cpu']}  ({env['cores']} cores)"),
        ("isa", f"selected {env['isa_selected']}"
         + (f" (FASTLOSS_ISA={env['isa_forced_by_env']})" if env["isa_forced_by_env"] else "")
         + f"; supported {_join(env['isa_supported'])}; timed {_join(env['isa_timed'])}"),
        ("threads", f"{_join(env['threads'])}   (OpenMP {'on' if env['openmp'] else 'OFF'})"),
        ("versions", f"fastloss {env['fastloss']}, numpy {env['numpy']}, torch {env['torch'] or 'not installed'}"
                     f"{'' if use_torch or not env['torch'] else ' (not used)'}, python {env['python']}, "
                     f"{env['compiler']}"),
    ]
    run_kind = ("--smoke" if opts.get("smoke") else "--quick" if opts["quick"] else "full set"
                if opts["preset"] == "full" else "default subset; --loss cross_entropy or --full for all")
    if opts["sizes"]:
        items.append(("cases", f"regression {_join(opts.get('regression_dtypes', ['float32']))}, sizes "
                               f"{_join(format_size(n) for n in opts['sizes'])}"
                      + (f", {run_kind}" if opts["quick"] or opts.get("smoke") else "")))
    if opts["shapes"]:
        ce_modes = opts.get("ce_modes", opts["modes"])
        items.append(("cases" if not opts["sizes"] else "",
                      f"cross_entropy {_join('x'.join(map(str, s)) for s in opts['shapes'])}; {_join(opts['dtypes'])}; "
                      f"{_join(MODE_LABELS[m] for m in ce_modes)}  ({run_kind})"))
    if opts.get("other_losses"):
        items.append(("cases" if not (opts["sizes"] or opts["shapes"]) else "",
                      f"{_join(opts['other_losses'])} (issue 6; sizes per loss, see --help)"))
    lin = opts.get("linear")
    if lin:
        items.append(("cases" if not (opts["sizes"] or opts["shapes"] or opts.get("other_losses")) else "",
                      f"linear_cross_entropy {_join('x'.join(map(str, c)) for c in lin['cases'])}; float32; "
                      f"threads {_join(lin['threads'])}; {_join(lin['providers'])}  ({lin['preset']} preset)"))
    if env.get("load_average"):
        items.append(("load", f"{env['load_average'][0]:.2f} (1-minute load average at start; {env['cores']} cores)"))
    return f"fastloss {env['fastloss']} benchmark   {env['date']}", items


def format_header(report: dict) -> str:
    title, items = header_items(report)
    return "\n".join([title] + [f"{key:<10} {value}".rstrip() for key, value in items])


# ---- cells -----------------------------------------------------------------------------------------

def _ratio(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def format_error(v) -> str:
    """2 significant digits and a short exponent: 5.5e-8."""
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if v == 0:
        return "0"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _mem_cell(r: dict, who: str) -> str:
    v = (r.get("peak_extra_bytes") or {}).get(who)
    if v is None or not r.get("input_bytes"):
        return "-"
    return f"{v / r['input_bytes']:.2f}"


def _disagrees(r: dict) -> bool:
    return r["agrees_with_numpy"] is False or r.get("torch_agrees") is False


def _family_table(recs: list[dict], family: str, first_isa: str, has_torch: bool):
    """(head, rows, left) of one family: rows are lists of cells, None between groups."""
    multi_isa = len({r["isa"] for r in recs}) > 1
    sized = family in SIZE_FAMILIES
    show_dtype = family == "classification" or len({r["dtype"] for r in recs}) > 1
    show_loss = family != "classification" or len({r["loss"] for r in recs}) > 1
    size_head = "n" if sized else "shape"
    torch_cols = lambda *cols: list(cols) if has_torch else []  # noqa: E731
    head = (["loss"] if show_loss else []) + [size_head] + (["dtype"] if show_dtype else []) + ["mode", "thr"] \
        + (["isa"] if multi_isa else []) + ["fastloss", "NumPy"] + torch_cols("torch") + ["NumPy/fl"] \
        + torch_cols("torch/fl") + ([f"vs {first_isa}"] if multi_isa else []) + ["GB/s", "%read"] \
        + ["mem:fl", "mem:NumPy"] + torch_cols("mem:torch") + ["err:fl", "err:NumPy"] + torch_cols("err:torch")
    base = {(r["loss"], record_label(r), r["dtype"], r["mode"], r["threads"]): r["fastloss"]["median_s"]
            for r in recs if r["isa"] == first_isa}
    rows, prev = [], None
    for r in recs:
        key = (r["dtype"], r["n"]) if family == "regression" else (r["loss"], record_label(r), r["dtype"])
        if prev is not None and key != prev:
            rows.append(None)
        prev = key
        med = r["fastloss"]["median_s"]
        row = ([r["loss"]] if show_loss else []) + [record_label(r)] + ([r["dtype"]] if show_dtype else []) \
            + [MODE_LABELS[r["mode"]], str(r["threads"])] + ([r["isa"]] if multi_isa else [])
        row += [format_ms(med), format_ms(r["numpy"]["median_s"]) if r["numpy"] else "-"]
        row += torch_cols(format_ms(r["torch"]["median_s"]) if r["torch"] else "-")
        row += [_ratio(r["speedup_numpy"])] + torch_cols(_ratio(r["speedup_torch"]))
        if multi_isa:
            b = base.get((r["loss"], record_label(r), r["dtype"], r["mode"], r["threads"]))
            row.append(_ratio(b / med) if b else "-")
        pct = r.get("pct_read_bw")
        row += [f"{r['gbps']:.1f}", ("-" if pct is None else f"{pct:.0f}%") + (" !" if _disagrees(r) else "")]
        row += [_mem_cell(r, "fastloss"), _mem_cell(r, "numpy")] + torch_cols(_mem_cell(r, "torch"))
        err = r.get("error_vs_float64") or {}
        row += [format_error(err.get("fastloss")), format_error(err.get("numpy"))] \
            + torch_cols(format_error(err.get("torch")))
        rows.append(row)
    return head, rows, {"loss", "n", "shape", "dtype", "mode", "isa"}


# ---- notes -----------------------------------------------------------------------------------------

def _elements_text(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else format_size(n)


def _numpy_limit_text(numpy_max: dict, dtypes) -> str:
    limits = {d: numpy_max.get(d) for d in dtypes}
    if len(set(limits.values())) == 1:
        lim = next(iter(limits.values()))
        return "at every size" if lim is None else f"up to {_elements_text(lim)} elements"
    return "; ".join(f"{d} {'at every size' if lim is None else 'up to ' + _elements_text(lim) + ' elements'}"
                     for d, lim in limits.items())


def _regression_notes(recs: list[dict], has_torch: bool) -> list[str]:
    notes = [
        "GB/s = bytes of input + target read, plus gradient bytes written for with-grad, / fastloss median: the "
        "minimum traffic, so an implementation that makes two passes (rmse with-grad) shows a lower GB/s; %read = "
        "that rate / the read bandwidth at the same thread count; writes are slower than reads, and small sizes run "
        "from cache between calls (and can pass 100%).",
        "NumPy = fastloss.reference.<loss>(x, t, dtype=None), computed in the input's dtype (with-grad: + "
        "<loss>_grad); single-threaded: timed once per loss/size/mode and shown on each thread row."
        + (" torch = torch.nn.functional.<loss> (rmse: sqrt(mse_loss)), torch.set_num_threads(thr); with-grad: "
           "forward + torch.autograd.grad with respect to the input." if has_torch else ""),
    ]
    skipped = list(dict.fromkeys(f"{record_label(r)} {r['dtype']}" for r in recs if not r["numpy_timed"]))
    if skipped:
        notes.append(f"NumPy '-' = not timed at {_join(skipped)} (its float16 ufuncs are ~8x slower than its "
                     "float32 ones; it still takes part in the warm-up check and the error columns).")
    return notes


def _ce_notes(recs: list[dict], report: dict, has_torch: bool) -> list[str]:
    opts = report["options"]
    modes = {r["mode"] for r in recs}
    skipped = list(dict.fromkeys(f"{record_label(r)} {r['dtype']}" for r in recs if not r["numpy_timed"]))
    notes = ["cross-entropy: reduction='mean', class-index targets, logits ~ N(0, 1) (float16: the float32 values "
             "rounded).  GB/s = logits bytes read (+ gradient bytes written for with-grad) / fastloss median (the "
             "targets, 8 bytes a row, are not counted); %read = that rate / the read bandwidth at the same thread "
             "count."]
    if modes & {"with_grad", "with_grad_out", "with_grad_inplace"}:
        notes.append(
            "with-grad = cross_entropy_with_grad(x, t), a new gradient array"
            + ("; out= : grad_out = a preallocated array (allocated and first written before timing, reused by every "
               "call)" if "with_grad_out" in modes else "")
            + ("; in-place: grad_out = logits, on a copy of the logits that np.copyto refreshes before each call, "
               "outside the timed region (the copy leaves at most a last-level cache's worth of them in cache)"
               if "with_grad_inplace" in modes else "") + ".")
    notes.append("NumPy = fastloss.reference.cross_entropy(x, t, dtype=None) (with-grad: + cross_entropy_grad), "
                 "computed in the logits' dtype, one thread"
                 + ("; torch = torch.nn.functional.cross_entropy(x, t) (with-grad: + torch.autograd.grad, a fresh "
                    "gradient), torch.set_num_threads(thr)" if has_torch else "") + "."
                 + ("  Neither has out= or an in-place gradient: every with-grad row of a shape and dtype shows the "
                    "same competitor times, measured once in that group, interleaved with all the fastloss "
                    "variants." if modes & {"with_grad_out", "with_grad_inplace"} else ""))
    if skipped:
        notes.append(
            f"NumPy '-' = not timed at {_join(skipped)} (it still takes part in the warm-up check and the error "
            "columns): one NumPy call takes ~1.3 s forward / ~3 s with-grad at 8192x32000 float32 and ~10 s / ~45 s "
            "in float16, so this run times NumPy " + _numpy_limit_text(opts["numpy_max_elements"], opts["dtypes"])
            + ("." if opts.get("preset") == "full" else
               "; --loss cross_entropy and --full time it at every float32 shape and in float16 up to 32768x1024."))
    return notes


def _field_notes(has_torch: bool) -> list[str]:
    notes = ["elementwise and row losses (issue 6): reduction='mean' (kl_div: 'sum'; kl_div_logits: 'batchmean', "
             "temperature 2; info_nce_loss: temperature 0.07), float32; with-grad = <loss>_with_grad, the gradient "
             "with respect to the first input (the others a call returns are computed too).  sequence_log_probs: "
             "the rows are 8 sequences, (8, rows/8, V); its 'loss' is the sum of the 8 log-probabilities, and "
             "with-grad the gradient of that sum.  GB/s counts the arrays read (kl_div_logits: both logits; "
             "triplet: 3 rows) plus the gradient written."]
    if has_torch:
        notes.append("torch = torch.nn.functional.<loss> where torch has it (binary_cross_entropy[_with_logits], "
                     "kl_div, multi_margin_loss, triplet_margin_loss); otherwise the usual torch code: "
                     "torchvision's sigmoid_focal_loss formula, clamp(1 - y s, min=0).mean() for hinge, TRL's "
                     "sigmoid DPO loss, kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, "
                     "reduction='batchmean') T^2, log_softmax + gather + masked sum (TRL's get_batch_logps) for "
                     "sequence log-probs, cross_entropy(q @ k.T / tau, arange(N)) for InfoNCE; with-grad: + "
                     "torch.autograd.grad with respect to the first input.")
    return notes


def _memory_note(recs: list[dict], report: dict, has_torch: bool) -> str:
    threads = sorted({r["memory_threads"] for r in recs if r.get("memory_threads")})
    th = _join(threads) or "?"
    text = (f"mem:* = peak extra memory during one call at {th} thread{'s' if threads != [1] else ''} (the most "
            "of the run), its result included, / the bytes of the input (cross-entropy: the logits); the caller's "
            "grad_out is not counted.  Measured the same way for every provider: for inputs of 32 MiB or more during "
            "its first timed call, for smaller ones in one more, untimed call.  fastloss and NumPy: tracemalloc "
            "(NumPy reports its allocations to it, and fastloss allocates its outputs and scratch through NumPy).")
    if has_torch:
        if report["environment"].get("memory_methods", {}).get("torch"):
            text += ("  torch (it keeps no CPU allocator statistics): growth of the peak RSS (VmHWM, reset via "
                     "/proc/self/clear_refs), page-granular; glibc gives arrays of 32 MiB or more fresh pages, and "
                     "smaller inputs are measured in a helper process with "
                     f"MALLOC_MMAP_THRESHOLD_={SUBPROCESS_MMAP_THRESHOLD}, after a warm-up call.")
        else:
            text += "  torch: not measured (needs /proc/self/clear_refs to reset the peak RSS)."
    return text


def _error_note(recs: list[dict]) -> str:
    prefix = list(dict.fromkeys(f"{record_label(r)} ({_elements_text(r['error_elements'])} elements)"
                                if r["family"] in SIZE_FAMILIES
                                else f"{record_label(r)} ({r['error_elements'] // r['shape'][1]} rows)"
                                for r in recs if r.get("error_elements") and r["error_elements"] < r["n"]))
    text = ("err:* = max relative error against fastloss.reference in float64 on the same input (the warm-up call): "
            "forward |loss - exact| / |exact|; with-grad the larger of that and max |gradient error| / max "
            "|gradient|.  float32 results round at ~6e-8, float16 ones at ~5e-4.")
    if prefix:
        text += (f"  At {_join(prefix)}: on the first elements of that input (whole rows), since the float64 "
                 "reference of the whole array would cost seconds per case.")
    return text


# ---- the report as blocks --------------------------------------------------------------------------

def blocks(report: dict) -> list[tuple]:
    """The report after its header: ("heading", text), ("table", head, rows, left), ("note", text)
    and ("para", text) -- a note that starts a new paragraph in the text layout."""
    recs = report["cases"]
    out = []
    if report.get("interrupted"):
        total = report["options"].get("total_cases")
        out.append(("para", f"INTERRUPTED (Ctrl-C): {len(recs)}{f' of {total}' if total else ''} cases finished; "
                            "the tables below hold those."))
    if not recs and not (report.get("training_step") or report.get("linear_cross_entropy")
                         or report["options"].get("training_only")):
        out.append(("para", "no case finished."))
    has_torch = any(r["torch"] for r in recs)
    first_isa = report["options"]["isas"][0]
    fams = {f: [r for r in recs if r.get("family", "regression") == f] for f in FAMILY_TITLES}
    titles = {"regression": "regression (n = elements of the input and of the target)",
              "classification": "cross-entropy (shape = rows x classes)",
              "elementwise": "elementwise losses (n = elements of the input; dpo_loss: the batch B)",
              "rows": "row losses (shape = rows x classes, or rows x features for triplet and InfoNCE)"}
    if recs:
        out.append(("para", "times: median milliseconds; ratios > 1x: fastloss is faster; mem:* = peak extra memory / "
                            "input bytes; err:* = max relative error against float64 (notes below)"))
    for fam, frecs in fams.items():
        if frecs:
            out.append(("heading", titles[fam]))
            out.append(("table", *_family_table(frecs, fam, first_isa, has_torch)))
    out += _training_blocks(report.get("training_step"))
    out += _linear_blocks(report.get("linear_cross_entropy"))
    rb = report.get("read_bandwidth") or {}
    if rb:
        nbytes = next(iter(rb.values()))["bytes"]
        bw = _join(f"{th} thread{'s' if th != '1' else ''} {v['gbps']:.1f} GB/s" for th, v in rb.items())
        size = f"{nbytes >> 30} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"
        out.append(("para", f"read bandwidth: {bw} (fastloss._core.read_sum_f32 on a {size} float32 array; the "
                            f"best of {min(v['count'] for v in rb.values())} reads, half before and half after the "
                            "cases)"))
    if recs:
        out.append(("heading", "notes"))
        if fams["regression"]:
            out += [("note", n) for n in _regression_notes(fams["regression"], has_torch)]
        if fams["classification"]:
            out += [("note", n) for n in _ce_notes(fams["classification"], report, has_torch)]
        if fams["elementwise"] or fams["rows"]:
            out += [("note", n) for n in _field_notes(has_torch)]
        out.append(("note", _memory_note(recs, report, has_torch)))
        out.append(("note", _error_note(recs)))
        if len({r["isa"] for r in recs}) > 1:
            out.append(("note", f"vs {first_isa} = fastloss time with {first_isa} / time with this ISA (same run)."))
        counts = {}
        for r in recs:
            c = counts.setdefault(record_label(r), set())
            c.update(p["count"] for p in (r["fastloss"], r["numpy"], r["torch"]) if p)
        out.append(("note", "calls timed per provider after a warm-up, providers interleaved: "
                            + _join(f"{k}: {min(v)}" + (f"-{max(v)}" if len(v) > 1 else "") for k, v in counts.items())
                            + "; quartiles in --json."))
        if any(_disagrees(r) for r in recs):
            out.append(("note", "! = fastloss or torch disagrees with NumPy in the warm-up call (see stderr)."))
    if report.get("comparison"):
        out += _comparison_blocks(report["comparison"])
    end = report.get("load_average_end")
    out.append(("para", f"wall time {report['wall_time_s']:.0f} s" + (f"; load average at end {end[0]:.2f}"
                                                                       if end else "")))
    return out


# ---- renderers -------------------------------------------------------------------------------------

def _text_table(head: list[str], rows: list, left: set) -> list[str]:
    widths = [max([len(h)] + [len(row[i]) for row in rows if row]) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, head)).rstrip()
    return [fmt(head)] + ["" if row is None else fmt(row) for row in rows]


def _wrap(text: str, width: int = 112) -> list[str]:
    """A note paragraph, wrapped, continuation lines indented by two spaces."""
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False) or [""]


def _training_blocks(tr: dict | None) -> list[tuple]:
    """The PyTorch training step (fastloss._bench_torch): speed per shape, dtype and thread count,
    and peak extra memory per provider."""
    if not tr or not (tr.get("speed") or tr.get("memory")):
        return []
    out = [("heading", "PyTorch training step: logits (leaf, requires grad) -> cross-entropy -> backward")]
    if tr.get("speed"):
        head = ("shape", "dtype", "threads", "fastloss.torch", "F.cross_entropy", "x torch", "load")
        rows = [(r["shape"], r["dtype"], str(r["threads"]), f"{r['fastloss_s'] * 1e3:.1f}",
                 f"{r['torch_s'] * 1e3:.1f}", _ratio(r["speedup"]), f"{r['loadavg']:.1f}") for r in tr["speed"]]
        out.append(("table", head, rows, {"shape", "dtype"}))
    if tr.get("memory"):
        by = {}
        for r in tr["memory"]:
            by.setdefault((r["shape"], r["dtype"]), {})[r["provider"]] = r["peak_bytes"]
        head = ("shape", "dtype", "fastloss.torch GiB", "F.cross_entropy GiB", "saved GiB")
        rows = []
        for (shape, dtype), m in by.items():
            fl, th = m.get("fastloss"), m.get("torch")
            gib = (lambda v: "-" if v is None else f"{v / 2 ** 30:.2f}")
            rows.append((shape, dtype, gib(fl), gib(th), "-" if fl is None or th is None else gib(th - fl)))
        out.append(("table", head, rows, {"shape", "dtype"}))
    out.append(("note", "median milliseconds of one step (forward, backward, logits.grad = None), both providers "
                        "timed interleaved at the same thread count (torch.set_num_threads); memory: extra peak "
                        "resident memory of one step in a fresh process (peak RSS during the step minus RSS after "
                        "the inputs were made). fastloss.torch computes the gradient in the forward call and keeps "
                        "only it; F.cross_entropy keeps log_softmax and builds its gradient in backward."))
    return out


LINEAR_PROVIDERS = {
    "fastloss": "fastloss.linear.linear_cross_entropy_with_grad (NumPy arrays, GEMMs in NumPy/SciPy BLAS)",
    "fastloss_torch": "fastloss.torch.linear_cross_entropy + backward (GEMMs in torch's BLAS, our chunked "
                      "cross-entropy kernel)",
    "torch": "F.linear_cross_entropy (reference path: the full N x V logits) + backward",
    "torch_chunked": "the same with options=LinearCrossEntropyOptions() (torch's chunked path)",
}


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _target_cell(t: dict | None, reason: str) -> str:
    if t is None or t.get("holds") is None:
        return reason
    mem = "-" if t["memory_ratio"] is None else f"{t['memory_ratio']:.2f}x"
    return f"{'yes' if t['holds'] else 'NO'}: speed {_ratio(t['speedup'])}, mem {mem}"


def _linear_blocks(sec: dict | None) -> list[tuple]:
    """The fused linear + cross-entropy (fastloss._bench_linear): a row per case, thread count and
    provider; issue 8's targets per case, thread count and fastloss provider; notes."""
    if not sec:
        return []
    out = [("heading", "fused linear + cross-entropy: loss and the gradients of input and weight, float32, "
                       "one call per fresh process")]
    if not sec.get("torch"):
        out.append(("para", f"PyTorch not used ({sec.get('torch_missing_reason') or 'not available'}): only the "
                            "fastloss provider (fastloss.linear, the NumPy API) ran; no comparison, no targets."))
    rows = sec.get("summary") or []
    if rows:
        bases = [b for b in ("fastloss", "fastloss_torch") if any(r["provider"] == b for r in rows)]
        head = ("case", "threads", "provider", "runs", "median s", "peak extra GiB",
                *(f"{what} / {b}" for b in bases for what in ("time", "mem")), "load")
        body = []
        prev = None
        for r in rows:
            key = (r["N"], r["H"], r["V"], r["threads"])
            if prev is not None and key != prev and len(rows) > len({(x["N"], x["V"], x["threads"]) for x in rows}):
                body.append(None)     # a blank line between the groups of several providers
            prev = key
            rat = r["ratios"]
            body.append((f"{r['N']}x{r['H']}x{r['V']}", str(r["threads"]), r["provider"], str(r["runs"]),
                         _seconds(r["seconds"]), f"{r['peak_extra_gib']:.3f}",
                         *(_ratio(rat[b][what]) for b in bases for what in ("time", "memory")),
                         "-" if r.get("load_average") is None else f"{r['load_average']:.1f}"))
        out.append(("table", head, body, {"case", "provider"}))
    targets = sec.get("targets") or []
    if sec.get("torch") and targets:
        budget = bench.LINEAR_TARGET_BUDGET_CASE
        head = ("case", "threads", "fastloss provider",
                f">= {bench.LINEAR_TARGET_CHUNKED_SPEEDUP:g}x torch_chunked, <= its memory",
                f">= 1x torch, <= {bench.LINEAR_TARGET_PLAIN_MEMORY:g} of its memory",
                f"{'x'.join(map(str, budget))} <= {bench.LINEAR_TARGET_BUDGET_GIB:g} GiB")
        body = []
        for t in targets:
            b = t.get("budget")
            body.append((f"{t['N']}x{t['H']}x{t['V']}", str(t["threads"]), t["provider"],
                         _target_cell(t["vs_torch_chunked"], "- (not measured)"),
                         _target_cell(t["vs_torch"], "- (not measured)"),
                         "n/a" if b is None else f"{'yes' if b['holds'] else 'NO'}: {b['peak_extra_gib']:.2f} GiB"))
        out.append(("heading", "fused linear + cross-entropy, the targets of issue 8"))
        out.append(("table", head, body, {"case", "fastloss provider"}))
    out.append(("note", "providers: " + "; ".join(f"{p} = {LINEAR_PROVIDERS[p]}" for p in sec.get("providers", ())
                                                  if p in LINEAR_PROVIDERS) + "."))
    out.append(("note", "median s: median seconds of one call over the runs; peak extra GiB: the peak RSS during "
                        "the call (VmHWM, reset just before it) minus the RSS before it (after the inputs and a "
                        "tiny warm-up), the gradients included; time / X, mem / X: this provider's / provider "
                        "X's (> 1: X is faster or smaller; '-': X not measured or its peak extra memory 0); load: "
                        "the 1-minute load average after each run (median). A target cell: speed = the "
                        "competitor's time / the fastloss provider's (> 1x: ours is faster), mem = our peak extra "
                        "memory / the competitor's; 'yes' when both bounds hold. Runs of different providers are "
                        "interleaved; on a shared machine a single run per provider (the big case) is noisy."))
    for text in sec.get("skipped") or []:
        out.append(("note", text + " (the torch column and its target are missing for that case)."))
    agree = [a for a in sec.get("loss_agreement") or [] if len(a["providers"]) > 1]
    if agree:
        worst = max(a["max_rel_diff"] for a in agree)
        bad = [a for a in agree if not a["agree"]]
        out.append(("note", f"losses: the providers agree to {format_error(worst)} (relative; the largest "
                            "difference over cases and thread counts)"
                            + ("" if not bad else "; DISAGREE (more than "
                               f"{format_error(bench.LINEAR_LOSS_RTOL)}) at "
                               + _join(f"{a['N']}x{a['H']}x{a['V']} {a['threads']}t" for a in bad)) + "."))
    for text in sec.get("errors") or []:
        out.append(("note", "FAILED: " + text))
    return out


def format_text(report: dict) -> str:
    """The report for the terminal (after the header, which the run prints first)."""
    lines = []
    prev = None
    for b in blocks(report):
        if b[0] == "heading":
            lines += ["", b[1] + ":"]
        elif b[0] == "table":
            lines += _text_table(*b[1:])
        else:
            if b[0] == "para" or prev == "table":
                lines.append("")
            lines += _wrap(b[1])
        prev = b[0]
    return "\n".join(lines)


_MD_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_|<>[]"})


def _md(text: str) -> str:
    return text.translate(_MD_ESCAPES)


def format_markdown(report: dict) -> str:
    """The report as GitHub markdown: the header as a list, each table as a pipe table."""
    title, items = header_items(report)
    lines = [f"## {_md(title)}", ""]
    prev = ""
    for key, value in items:  # a continuation line (no key) repeats the key above
        prev = key or prev
        lines.append(f"- **{prev}**: {_md(value)}")
    for b in blocks(report):
        lines.append("")
        if b[0] == "heading":
            lines.append(f"### {_md(b[1])}")
        elif b[0] == "table":
            head, rows, left = b[1:]
            lines.append("| " + " | ".join(_md(h) for h in head) + " |")
            lines.append("|" + "|".join(":---" if h in left else "---:" for h in head) + "|")
            lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows if row is not None]
        else:
            lines.append(_md(b[1]))
    return "\n".join(lines) + "\n"


# ---- --compare -------------------------------------------------------------------------------------

def case_key(r: dict) -> tuple:
    """What identifies a case across runs: loss, size (shape), dtype, mode, threads, ISA."""
    size = tuple(r["shape"]) if r.get("shape") else int(r["n"])
    return (r["loss"], size, r["dtype"], r["mode"], int(r["threads"]), r["isa"])


def _case_text(r: dict) -> str:
    mode = MODE_LABELS.get(r["mode"], r["mode"])
    return f"{r['loss']} {record_label(r)} {r['dtype']} {mode} {r['threads']}t {r['isa']}"


def load_previous(path: str) -> dict:
    """A report written by ``--json`` (ValueError with a one-line reason otherwise)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path!r} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("fastloss-bench/") \
            or not isinstance(data.get("cases"), list):
        raise ValueError(f"{path!r} is not a report written by `python -m fastloss bench --json`")
    for r in data["cases"]:
        try:
            case_key(r)
            float(r["fastloss"]["median_s"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path!r}: a case record lacks loss/n/dtype/mode/threads/isa/fastloss.median_s") \
                from None
    return data


def compare(report: dict, old: dict, path: str, threshold: float = REGRESSION_THRESHOLD) -> dict:
    """Each case's fastloss median / the matching case's in `old` (> 1 + threshold: a regression);
    cases found on one side only are listed."""
    old_by = {case_key(r): r for r in old["cases"]}
    new_keys = set()
    rows = []
    for r in report["cases"]:
        k = case_key(r)
        new_keys.add(k)
        o = old_by.get(k)
        if o is None:
            continue
        new_s, old_s = r["fastloss"]["median_s"], o["fastloss"]["median_s"]
        ratio = new_s / old_s if old_s > 0 else math.inf
        rows.append({"case": _case_text(r), "key": list(k[:1]) + [list(k[1]) if isinstance(k[1], tuple) else k[1]]
                     + list(k[2:]), "old_median_s": old_s, "new_median_s": new_s, "ratio": ratio,
                     "regression": ratio > 1 + threshold})
    env = old.get("environment", {})
    return {"path": path, "threshold": threshold,
            "previous": {"date": env.get("date"), "cpu": env.get("cpu"), "fastloss": env.get("fastloss")},
            "same_cpu": env.get("cpu") == report["environment"].get("cpu"),
            "cases": rows,
            "only_in_this_run": [_case_text(r) for r in report["cases"] if case_key(r) not in old_by],
            "only_in_previous": [_case_text(r) for r in old["cases"] if case_key(r) not in new_keys]}


def _comparison_blocks(cmp: dict) -> list[tuple]:
    prev = cmp["previous"]
    pct = f"{100 * cmp['threshold']:.0f}%"
    out = [("heading", f"compared with {cmp['path']} ({prev.get('date') or '?'}, "
                       f"fastloss {prev.get('fastloss') or '?'})")]
    if not cmp["same_cpu"]:
        out.append(("note", f"note: that run was on another CPU ({prev.get('cpu') or '?'})."))
    rows = [[c["case"], format_ms(c["old_median_s"]), format_ms(c["new_median_s"]), f"{c['ratio']:.2f}",
             f"REGRESSION (> {pct} slower)" if c["regression"] else ""] for c in cmp["cases"]]
    if rows:
        out.append(("table", ["case", "old ms", "new ms", "new/old", "flag"], rows, {"case", "flag"}))
    slower = [c for c in cmp["cases"] if c["regression"]]
    out.append(("note", f"new/old = this run's fastloss median / that run's (> 1: slower now); {len(cmp['cases'])} "
                        f"cases matched, {len(slower)} regression{'s' if len(slower) != 1 else ''} (more than {pct} "
                        "slower).  Absolute times on a shared machine drift by 20-30% between runs: rerun a flagged "
                        "case before believing it."))
    if cmp["only_in_this_run"]:
        out.append(("note", f"only in this run ({len(cmp['only_in_this_run'])}): {_join(cmp['only_in_this_run'])}."))
    if cmp["only_in_previous"]:
        out.append(("note", f"only in {cmp['path']} ({len(cmp['only_in_previous'])}): "
                            f"{_join(cmp['only_in_previous'])}."))
    return out


# ---- --plot ----------------------------------------------------------------------------------------

def plot_format(path: str) -> str | None:
    """"png" or "svg" from the extension of `path`, None for anything else."""
    lower = path.lower()
    return next((ext[1:] for ext in PLOT_FORMATS if lower.endswith(ext)), None)


def write_plot(report: dict, path: str) -> None:
    """Speedup of fastloss over each competitor vs problem size: one row of panels per family,
    one panel per competitor (NumPy, torch), one line per loss and mode (cross-entropy: dtype and
    mode) at the run's largest thread count.  PNG or SVG by the extension of `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    recs = report["cases"]
    fams = [f for f in FAMILY_TITLES if any(r["family"] == f for r in recs)]
    competitors = [(k, name) for k, name in (("speedup_numpy", "NumPy"), ("speedup_torch", "torch"))
                   if any(r[k] for r in recs)] or [("speedup_numpy", "NumPy")]
    fig, axes = plt.subplots(len(fams), len(competitors), figsize=(6.4 * len(competitors), 4.4 * len(fams)),
                             squeeze=False)
    first_isa = report["options"]["isas"][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"forward": "-", "with_grad": "--", "with_grad_out": "-.", "with_grad_inplace": ":"}
    times = FuncFormatter(lambda v, _: f"{v:g}x")
    for i, fam in enumerate(fams):
        frecs = [r for r in recs if r["family"] == fam and r["isa"] == first_isa]
        top = max(r["threads"] for r in frecs)
        frecs = [r for r in frecs if r["threads"] == top]
        # a colour per loss (cross-entropy: per dtype, and loss if several), a line style per mode
        hue = (lambda r: r["loss"]) if fam != "classification" else (lambda r: (r["loss"], r["dtype"]))
        hues = list(dict.fromkeys(hue(r) for r in frecs))
        many_losses = len({r["loss"] for r in frecs}) > 1
        for j, (key, name) in enumerate(competitors):
            ax = axes[i][j]
            lines = {}
            for r in frecs:
                if r[key]:
                    label = (r["loss"] + " " if fam != "classification" or many_losses else "") \
                        + (r["dtype"] + " " if fam == "classification" else "") + MODE_LABELS[r["mode"]]
                    lines.setdefault((label, hue(r), r["mode"]), []).append((r["n"], r[key]))
            for (label, h, mode), pts in lines.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=styles.get(mode, "-"),
                        color=colors[hues.index(h) % len(colors)], label=label)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(times)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xlabel("problem size (elements)")
            ax.set_ylabel(f"speedup: {name} time / fastloss time")
            ax.set_title(f"{FAMILY_TITLES[fam]}: fastloss vs {name} ({top} thread{'s' if top != 1 else ''})",
                         fontsize=10)
            if lines:
                ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
            else:
                ax.text(0.5, 0.5, f"{name} not timed", transform=ax.transAxes, ha="center")
            ax.grid(True, which="both", alpha=0.3)
    env = report["environment"]
    fig.suptitle(f"fastloss {env['fastloss']} on {env['cpu']} ({env['isa_selected']}), {env['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format=plot_format(path))
    plt.close(fig)
