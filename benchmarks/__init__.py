"""fastattn's benchmark suite: ``python -m benchmarks --help``.

    core.py     cases, the FLOP formula, the candidates (fastattn, torch SDPA, naive PyTorch, ...), timers
    memory.py   extra peak memory of one call (fresh subprocess on CPU, CUDA allocator stats on GPU)
    suites.py   the registry of benchmark suites ("attention", "memory", "bert")
    bert.py     the end-to-end suite: BERT MLM training steps and inference against HF BERT
    config.py   the config dataclass and the quick / full presets
    report.py   table, targets, JSON / CSV, plots
    __main__.py the command line: ``main(argv=None)``

See benchmarks/README.md for what each column means.
"""
