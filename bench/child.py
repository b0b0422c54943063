"""Child side: `python -m bench.child SUITE PARAMS_JSON` runs one arm of bench/SUITE.py and prints its result.

Started by bench/runner.py in a fresh process, with OMP_NUM_THREADS and BENCH_THREADS set: nothing from one
arm (allocator state, warmed caches, threads) leaks into the next.
"""

import importlib
import json
import os
import sys

from bench import common

if __name__ == "__main__":
    suite, params = sys.argv[1], json.loads(sys.argv[2])
    common.set_threads(int(os.environ.get("BENCH_THREADS", "1")))
    module = importlib.import_module(f"bench.{suite}")
    common.emit(module.run(params))
