"""Test-suite setup: this directory is on sys.path (as a conftest's directory), so test modules
and scripts share helpers such as `triton_interpreter`."""

import os

# Under pytest-xdist, each worker takes its share of the cores as the trainer's ranks of a node do,
# and so do the commands it starts (they inherit the environment). A worker with a thread per
# core beside another busy worker oversubscribes the machine, and OpenMP threads waiting on a
# taken core slow a step many times.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    from ultramem.train.distributed import DistInfo, set_cpu_threads

    os.environ["OMP_NUM_THREADS"] = str(set_cpu_threads(DistInfo(local_world_size=_workers)))
