#!/usr/bin/env python3
"""PyTorch (MKL) side of `cargo bench --bench kernels -- gemm`: the same single products,
2 threads, 6 rotating operand copies, best of 3, GFLOP/s.

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/gemm_torch.py
"""
import time

import torch

torch.set_num_threads(2)
CASES = [("linear", 1024, 320, 320), ("linear", 1024, 320, 2560), ("linear", 256, 640, 640),
         ("linear", 64, 1280, 1280), ("linear", 16, 1280, 1280), ("conv", 320, 2880, 1024),
         ("conv", 640, 5760, 256), ("conv", 1280, 11520, 64), ("conv", 1280, 11520, 16)]
print("GEMM GFLOP/s (6 rotating operand copies), PyTorch", torch.__version__)
for what, m, k, n in CASES:
    lhs = [torch.randn(m, k) for _ in range(6)]
    rhs = [torch.randn(n, k) if what == "linear" else torch.randn(k, n) for _ in range(6)]
    if what == "linear":
        f = lambda i: torch.nn.functional.linear(lhs[i], rhs[i])
    else:
        f = lambda i: lhs[i] @ rhs[i]
    for i in range(2):
        f(i)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(6):
            f(i)
        best = min(best, (time.perf_counter() - t) / 6)
    print(f"  {what:6} {m:5} x {k:5} x {n:5}: {best * 1e3:7.3f} ms {2 * m * k * n / best / 1e9:5.0f} GFLOP/s")
