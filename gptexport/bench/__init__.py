"""Benchmarks: our runtime in each precision against nanoGPT, transformers and other runtimes, each
measured in a process of its own (bench/worker.py), ratios from the same run."""
