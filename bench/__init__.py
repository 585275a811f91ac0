"""Benchmarks: speed (bench/speed.py) and the synthetic world that proves adaptation (bench/synthetic.py)."""
