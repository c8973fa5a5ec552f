"""Diagnostics: probes, sweeps and profiles used to find out why a number is what it is. They are
not part of `python -m perf run` and write nothing to the results log. From the repository root:

  sweep.py                    every op over entries, value width, tokens, k (eager/compile/ours)
  gate_lookup_sweep.py        the fused gate + lookup kernel's two designs over shapes
  table_scatter.py            the table-gradient scatter alone, several ways (its own kernels)
  sweep_lookup.py             launch-config sweep of the gather kernels; one launch each for ncu
  block_add_probe.py          one staged flush's block add, for Nsight Compute
  op_host_overhead.py         host time per op call at tiny shapes
  layer_host_profile.py       the compiled layer's host time: Inductor's calls and a cProfile
  train_step_profile.py       a 227M training step's GPU time by kernel, dense and UltraMemV2
  cudagraph_training_check.py training with and without CUDA graphs: same losses, throughput

The first three share the op suite's interface (`python -m perf.diagnostics.sweep --small`
runs on a CPU under TRITON_INTERPRET=1); the others need a CUDA device. Each has --help.
"""
