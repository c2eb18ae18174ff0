"""Benchmarks: the analytic per-step floor (floor.py, no torch) and the GPU Euler-step ablation (gpu_step.py)."""
