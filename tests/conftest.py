"""Test-suite setup: this directory is on sys.path (as a conftest's directory), so test modules
and scripts share helpers such as `triton_interpreter`."""

import os

# Under pytest-xdist, each worker takes its share of the cores, and so do the commands it starts
# (they inherit the environment). A worker with a thread per core beside another busy worker
# oversubscribes the machine, and OpenMP threads waiting on a taken core slow a step many times.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _workers))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
