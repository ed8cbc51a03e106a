"""fastloss.dask overhead versus the in-process call, mse_loss on float32 (issue 7).

    python benchmarks/dask_overhead.py                      # n = 1e8 and 1e9, LocalCluster + threads
    python benchmarks/dask_overhead.py --sizes 1e8 --rounds 5 --schedulers cluster
    python benchmarks/dask_overhead.py --json dask.json

The data is generated inside the Dask tasks (never gathered to the client); see
fastloss/_bench_dask.py for what each timed graph does and how the figures are derived.
"""
import sys

from fastloss._bench_dask import main

if __name__ == "__main__":
    sys.exit(main())
