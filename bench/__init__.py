"""asv benchmarks of vaebench (``asv.conf.json``: ``"benchmark_dir": "bench"``).

``benchmarks.py`` holds the asv suite, ``reference.py`` the training step written directly in
PyTorch that the Pyro-derived steps are measured against, ``step_ratio.py`` a script that
prints those ratios, and ``check.sh`` the quick CI check of the suite.
"""
