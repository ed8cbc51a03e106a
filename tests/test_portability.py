"""The build must run on x86-64 CPUs older than the one it was built on.

The kernels for AVX2 and AVX-512 live in the same binary as the baseline
(SSE2) ones and are only chosen when cpuid reports the features.  Here the
installed package is imported under QEMU's user-mode emulation of CPUs without
AVX-512 (Haswell) and without any AVX (Nehalem): it must select the right
kernels and compute the same losses.  QEMU (Debian's qemu-user) is installed
by .ci/run; on a machine without it this module cannot run.
"""
import platform
import shutil

import pytest
from fl_testing import run_python

QEMU = shutil.which("qemu-x86_64")

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian: qemu-user) is not installed"),
    pytest.mark.slow,
    pytest.mark.qemu,
]

SCRIPT = r"""
import numpy as np, fastloss
from fastloss import _core, reference
print(_core.get_isa())
x = np.linspace(-3, 3, 200001).astype(np.float32)
t = np.linspace(2, -1, 200001).astype(np.float32)
for name in ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"):
    got = float(getattr(fastloss, name)(x, t))
    want = float(getattr(reference, name)(x, t))
    assert abs(got - want) <= 4 * 2.0**-23 * abs(want), (name, got, want)
    _, g = getattr(fastloss, name + "_with_grad")(x, t)
    gw = getattr(reference, name + "_grad")(x, t)
    assert np.allclose(g, gw, rtol=2.0**-22, atol=1e-30), name
print("ok")
"""


@pytest.mark.parametrize("cpu, expected_isa", [("Nehalem", "baseline"), ("Haswell", "avx2")])
def test_runs_on_older_cpus(cpu, expected_isa, tmp_path):
    proc = run_python(["-c", SCRIPT], cwd=tmp_path, timeout=600, prefix=(QEMU, "-cpu", cpu))
    assert proc.returncode == 0, f"{cpu}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.split()
    assert lines[0] == expected_isa, proc.stdout
    assert lines[-1] == "ok", proc.stdout
