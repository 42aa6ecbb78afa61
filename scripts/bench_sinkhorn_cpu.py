"""Sinkhorn attention on the PyTorch path: residual KL(pi || mu) against n_iters for each
prior kind, and the cost of each attention kind relative to softmax, side by side in one
process (interleaved rounds, medians).

    .venv/bin/python scripts/bench_sinkhorn_cpu.py            # B=8, H=4, N=256, D=32
    .venv/bin/python scripts/bench_sinkhorn_cpu.py --tiny     # seconds
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bayestrain.attention import sinkhorn_attention, softmax_attention

ITERS = (1, 3, 5, 10)


def residual_table(B, H, N, D, gen) -> list[tuple[str, list[float]]]:
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    rho = torch.log_softmax(torch.randn(B, N, generator=gen, dtype=torch.float64), -1)  # non-uniform
    priors = {
        "uniform": None,
        "fixed [K]": torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), -1),
        "per sequence [B, K]": torch.log_softmax(torch.randn(B, N, generator=gen, dtype=torch.float64), -1),
        "per head [B, H, K]": torch.log_softmax(torch.randn(B, H, N, generator=gen, dtype=torch.float64), -1),
    }
    rows = []
    for name, log_prior in priors.items():
        res = [float(sinkhorn_attention(q, k, v, log_prior=log_prior, log_query_weights=rho, n_iters=n,
                                        backend="torch", return_residual=True)[1].mean()) for n in (0, *ITERS)]
        rows.append((name, res))
    return rows


def timing_table(B, H, N, D, rounds, gen) -> dict[str, float]:
    q, k, v = (torch.randn(B, H, N, D, generator=gen, requires_grad=True) for _ in range(3))
    kinds = {
        "softmax (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v),
        "softmax + key marginals": lambda: softmax_attention(q, k, v, backend="torch")[0],
        **{f"sinkhorn n_iters={n}": (lambda n=n: sinkhorn_attention(q, k, v, n_iters=n, backend="torch"))
           for n in (1, 3, 5)},
    }
    times = {name: [] for name in kinds}
    for _ in range(rounds):  # interleaved: each round times every kind once
        for name, fn in kinds.items():
            t0 = time.perf_counter()
            fn().sum().backward()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts[1:] if len(ts) > 1 else ts) * 1e3 for name, ts in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    B, H, N, D = (2, 2, 17, 8) if args.tiny else (8, 4, 256, 32)
    rounds = 3 if args.tiny else args.rounds
    gen = torch.Generator().manual_seed(0)
    print(f"# residual KL(pi || mu), nats, float64, mean over batch and heads; B={B} H={H} N={N} D={D}; "
          "non-uniform query weights")
    res = residual_table(B, H, N, D, gen)
    print(f"{'prior':<22}" + "".join(f"{'n=' + str(n):>11}" for n in (0, *ITERS)))
    for name, vals in res:
        print(f"{name:<22}" + "".join(f"{v:>11.2e}" for v in vals))
    print(f"\n# forward+backward, float32, CPU ({torch.get_num_threads()} threads), median of {rounds} "
          "interleaved rounds")
    ms = timing_table(B, H, N, D, rounds, gen)
    base = ms["softmax (SDPA)"]
    print(f"{'attention':<26}{'ms':>10}{'x softmax':>11}")
    for name, t in ms.items():
        print(f"{name:<26}{t:>10.2f}{t / base:>11.2f}")
    return {"residuals": dict(res), "ms": ms}


if __name__ == "__main__":
    main()
