#!/usr/bin/env python
"""Benchmark the fused attention kernels (bayestrain.kernels) against torch SDPA and against
the PyTorch reference (bayestrain.attention, backend="torch").

For each sequence length N and head dim D: forward and forward+backward time (median of
repeats, CUDA events), peak memory of forward+backward above the inputs, the ratio to SDPA
(flash) and to the torch reference, and the achieved TFLOP/s against counted FLOPs.

FLOP count (per head, non-causal; one "unit" = one N x N x D matmul = 2 N^2 D FLOPs):
  flash / SDPA:      forward 2 units, backward 5 (QK^T, dP = dO V^T, dV, dQ, dK): 3.5 x 4 N^2 D
  softmax + mu:      forward 3 (+ the marginal pass), backward 5 (+1 when mu gets a gradient)
  sinkhorn, n iters: forward 2n + 3, backward 2n + 6 (+1 when the residual gets a gradient),
                     i.e. (4n + 9) / 7 times flash's forward+backward (n = 0: 8 / 7).
                     DESIGN.md estimates (8n + 10) / 7, the cost of backpropagating every
                     half-iteration separately (3 units each); the kernels propagate the
                     adjoints with one unit per half-iteration and form dS once.  Exponentials:
                     6n + 3 per N^2 (flash: 2).
  the benchmark's backward is through `out` only.  Causal attention counts half.

Usage:  python scripts/bench_attention.py                 # CUDA, bf16, N = 512 .. 32768
        python scripts/bench_attention.py --tiny          # CPU smoke test (interpreter, fp32)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayestrain.kernels import (  # noqa: E402
    sinkhorn_attention,
    sinkhorn_attention_ref,
    softmax_attention,
    softmax_attention_ref,
)

UNIT = 2.0  # FLOPs per N^2 D per matmul


def flops(method: str, n_iters: int, B: int, H: int, N: int, D: int, backward: bool) -> float:
    per = UNIT * N * N * D * B * H
    if method == "sdpa":
        units = 2 + (5 if backward else 0)
    elif method == "softmax":
        units = 3 + (5 if backward else 0)
    else:
        units = 2 * n_iters + 3 + ((2 * n_iters + 6) if backward and n_iters > 0 else 5 if backward else 0)
    return units * per


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)


def make_methods(iters_list):
    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    methods = [("sdpa (flash)" if torch.cuda.is_available() else "sdpa", "sdpa", 0, sdpa, False)]
    methods.append(("softmax+mu", "softmax", 0, lambda q, k, v: softmax_attention(q, k, v)[0], False))
    methods.append((
        "softmax+mu torch-ref", "softmax", 0,
        lambda q, k, v: softmax_attention_ref(q, k, v, dtype=None)[0], True,
    ))
    for n in iters_list:
        methods.append((
            f"sinkhorn n_iters={n}", "sinkhorn", n,
            (lambda n: lambda q, k, v: sinkhorn_attention(q, k, v, n_iters=n)[0])(n), False,
        ))
        methods.append((
            f"sinkhorn n_iters={n} torch-ref", "sinkhorn", n,
            (lambda n: lambda q, k, v: sinkhorn_attention_ref(q, k, v, n_iters=n, dtype=None)[0])(n), True,
        ))
    return methods


def ref_fits(B, H, N, dtype_bytes, budget_bytes) -> bool:
    # the reference holds ~12 [B, H, N, N] float32 tensors (scores, masks, log-weights, grads)
    return 12 * B * H * N * N * 4 <= budget_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="N=64, fp32, one repeat (CPU interpreter smoke test)")
    p.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    p.add_argument("--iters", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // N)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ref-budget-gib", type=float, default=60.0)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: running the --tiny configuration (Triton interpreter)")
        args.tiny = True
    if args.tiny:
        args.ns, args.ds, args.dtype = [64], [64], "fp32"
        args.heads, args.tokens, args.repeats, args.warmup = 1, 64, 1, 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda" if cuda else "cpu")
    timer = Timer(cuda)
    methods = make_methods(args.iters)

    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"# device: {name}; dtype {args.dtype}; heads {args.heads}; batch = max(1, {args.tokens} // N)")
    print("# times: median ms; x sdpa / x ref: fwd+bwd time ratios; TFLOP/s of fwd+bwd on counted FLOPs")
    if args.tiny:
        print("# --tiny: a smoke test of the table (interpreter timings say nothing about performance)")
    header = (f"{'method':<30} {'N':>6} {'D':>4} {'B':>3} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'x sdpa':>7} {'x ref':>7} {'peak MiB':>9} {'TFLOP/s':>8}")
    print(header)
    print("-" * len(header))
    for D in args.ds:
        for N in args.ns:
            B, H = max(1, args.tokens // N), args.heads
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(B, H, N, D, generator=g).to(dev, dtype) for _ in range(3))
            go = torch.randn(B, H, N, D, generator=g).to(dev, dtype)
            results = {}
            for label, kind, n, fn, is_ref in methods:
                row = dict(fwd=None, fb=None, mem=None)
                if is_ref and cuda and not ref_fits(B, H, N, 4, args.ref_budget_gib * 2**30):
                    results[label] = (kind, n, is_ref, row, "skip (N^2 memory)")
                    continue
                try:
                    with torch.no_grad():
                        row["fwd"] = timer(lambda: fn(q, k, v), args.repeats, args.warmup)
                    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

                    def fwd_bwd():
                        out = fn(qq, kk, vv)
                        torch.autograd.grad(out, (qq, kk, vv), go)

                    row["fb"] = timer(fwd_bwd, args.repeats, args.warmup)
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        fwd_bwd()
                        torch.cuda.synchronize()
                        row["mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    results[label] = (kind, n, is_ref, row, "")
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    results[label] = (kind, n, is_ref, row, "out of memory")
            sdpa_fb = next(r[3]["fb"] for lbl, r in results.items() if r[0] == "sdpa")
            for label, (kind, n, is_ref, row, note) in results.items():
                if note:
                    print(f"{label:<30} {N:>6} {D:>4} {B:>3} {note}")
                    continue
                ref_label = next((lbl for lbl, r in results.items()
                                  if r[2] and r[0] == kind and r[1] == n), None)
                ref_fb = results[ref_label][3]["fb"] if ref_label and not is_ref else None
                x_sdpa = row["fb"] / sdpa_fb if sdpa_fb else float("nan")
                x_ref = f"{row['fb'] / ref_fb:7.3f}" if ref_fb else f"{'-':>7}"
                mem = f"{row['mem']:9.1f}" if row["mem"] is not None else f"{'-':>9}"
                tf = flops(kind, n, B, H, N, D, True) / (row["fb"] * 1e-3) / 1e12
                print(f"{label:<30} {N:>6} {D:>4} {B:>3} {row['fwd']:9.3f} {row['fb']:11.3f} "
                      f"{x_sdpa:7.2f} {x_ref} {mem} {tf:8.3f}")
            del q, k, v, go
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
