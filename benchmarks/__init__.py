"""Benchmark harness for dvsft-kernels (`python benchmarks/run.py`; see benchmarks/README.md).

Modules: `shapes` (problem sizes and input generation), `costs` (FLOP and byte models),
`providers` (this package's impls, the peers and the floor), `measure` (timers and memory),
`worker` (one subprocess that measures a list of cells), `runner` (plans cells, runs workers,
post-processes rows), `report` (JSON, Markdown, plots), `e2e` (training-step throughput),
`env` (device and version metadata carried by every row).
"""
