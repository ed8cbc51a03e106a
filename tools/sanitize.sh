#!/usr/bin/env bash
# Build fastloss with AddressSanitizer + UndefinedBehaviorSanitizer in a throwaway virtual
# environment and run the tests under them, LeakSanitizer on.
#
#   tools/sanitize.sh                      # tests/, except the cases marked slow
#   tools/sanitize.sh tests/test_bad_input.py -k mse   # any pytest arguments instead
#
# The default leaves out the `slow` cases (1e8-element arrays): under ASan they need 2-3x the
# memory and ~10x the time and exercise the same code paths as the smaller cases; and the `qemu`
# cases (ASan's shadow memory cannot be mapped under QEMU's user-mode emulation).
#
# How:
# * FASTLOSS_SANITIZE=address,undefined (setup.py): -O1 -g1 -fno-omit-frame-pointer
#   -fsanitize=address,undefined -fno-sanitize-recover=all, so the first UBSan finding aborts
#   the run like an ASan one (-g1: line tables only, enough for the reports' file:line, and
#   the build takes ~60% of -g's time).  The C kernels and the Cython glue are both instrumented.
# * The interpreter is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD) and
#   PYTHONMALLOC=malloc routes Python's and NumPy's small allocations through it too (else
#   pymalloc's arenas would hide overruns of small arrays).
# * CPython itself does not free everything at exit, so LeakSanitizer reports leaks of the
#   interpreter at every run.  They are written to a log and filtered: the run fails on a leak
#   only if a frame of its allocation stack is in fastloss (the _core extension or src_c/).
#   tests/test_leaks.py checks for reference leaks (objects kept alive), which LSan cannot see.
# Exit status: pytest's, or 1 when a fastloss leak was reported.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cc=${CC:-gcc}
libasan=$("$cc" -print-file-name=libasan.so)
libubsan=$("$cc" -print-file-name=libubsan.so)
if [ ! -e "$libasan" ] || [ "$libasan" = libasan.so ]; then
    echo "sanitize.sh: $cc has no libasan.so (install the compiler's sanitizer runtime)" >&2
    exit 2
fi

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ml_dtypes 2>/dev/null || echo "sanitize.sh: ml_dtypes unavailable (bfloat16 tests skipped)"
echo "sanitize.sh: building with FASTLOSS_SANITIZE=address,undefined"
t_build=$(date +%s)
# Built from a copy without build products: pip builds in the source tree, and sanitized objects
# left in build/ would be linked into the next plain build there.
mkdir -p "$work/src"
tar -C "$repo" --exclude=./build --exclude=./.git --exclude='*.so' --exclude='__pycache__' -cf - . | tar -C "$work/src" -xf -
if ! FASTLOSS_SANITIZE=address,undefined python -m pip install --no-cache-dir "$work/src[test]" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log"; echo "sanitize.sh: the sanitized build failed" >&2; exit 2
fi
echo "sanitize.sh: built and installed in $(( $(date +%s) - t_build )) s"

mkdir -p "$work/logs"
export ASAN_OPTIONS="detect_leaks=1:exitcode=86:log_path=$work/logs/asan:allocator_may_return_null=1:handle_segv=1:detect_stack_use_after_return=0:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/logs/ubsan"
export LSAN_OPTIONS="max_leaks=0"
export PYTHONMALLOC=malloc
export FASTLOSS_TEST_INSTALLED=1
[ $# -gt 0 ] || set -- -m "not slow and not qemu" tests
status=0
# pytest.main from a script outside the checkout (`python -m pytest` would put the checkout on
# sys.path): the tests import the sanitized build installed in the venv (tests/conftest.py checks,
# FASTLOSS_TEST_INSTALLED).  LeakSanitizer runs at exit and, finding the interpreter's leaks,
# replaces the exit status (86 here) and cuts unflushed output: so pytest's own status is written
# to a file, and output is unbuffered.
cat >"$work/run_pytest.py" <<'PY'
import sys
import pytest
rc = int(pytest.main(sys.argv[2:]))
with open(sys.argv[1], "w") as f:
    f.write(str(rc))
sys.exit(rc)
PY
LD_PRELOAD="$libasan:$libubsan" PYTHONUNBUFFERED=1 python "$work/run_pytest.py" "$work/pytest.rc" \
    -p no:cacheprovider -q "$@" || true
status=$(cat "$work/pytest.rc" 2>/dev/null || echo "crashed")
if [ "$status" = crashed ]; then
    echo "sanitize.sh: the test process died before pytest finished (see the sanitizer output above)" >&2
    status=1
fi

# Findings other than leaks abort the process and are in the logs too: show them all.
report=0
for f in "$work"/logs/*; do
    [ -e "$f" ] || continue
    if grep -q "ERROR: AddressSanitizer\|runtime error:" "$f"; then
        echo "== sanitizer error in $f"; cat "$f"; report=1
    fi
done
python - "$work/logs" <<'PY' || report=1
import pathlib, re, sys
ours = re.compile(r"_core\.cpython|/src_c/|fastloss/_core")
leaks = interp = 0
for f in pathlib.Path(sys.argv[1]).glob("asan*"):
    for block in re.split(r"\n(?=(?:Direct|Indirect) leak of )", f.read_text(errors="replace")):
        if not re.match(r"(Direct|Indirect) leak of ", block):
            continue
        if ours.search(block):
            leaks += 1
            print("== leak in fastloss:\n" + block)
        else:
            interp += 1
print(f"sanitize.sh: {leaks} leak report(s) in fastloss; {interp} in the interpreter/NumPy (ignored)")
sys.exit(1 if leaks else 0)
PY
if [ "$status" -ne 0 ] || [ "$report" -ne 0 ]; then
    echo "sanitize.sh: FAILED (pytest status $status)" >&2
    exit $(( status != 0 ? status : 1 ))
fi
echo "sanitize.sh: clean"
