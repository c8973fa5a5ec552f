"""GPU benchmarks of ultramem: `python -m perf run | compare | plot` (see perf/NOTES.md)."""
