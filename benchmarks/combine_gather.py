"""Cold-path experiment for serving: Â of P hard-mask profiles by the batched contraction (what
xpeft.serving.combine_profiles does) or by a fused gather of only the k chosen adapters (F.embedding_bag with
per-sample weights). One torch thread, MiniLM's bank shape (L=6, N=100, b=48, d=384), k=50; min of 15 runs.

    python benchmarks/combine_gather.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

L, N, b, d, k = 6, 100, 48, 384, 50


def contraction(w: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return torch.einsum("pln,lnbd->plbd", w, A)


def gather(w: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    P, flat = w.shape[0], A.reshape(L, N, -1)
    out = torch.empty(P, L, flat.shape[-1])
    for layer in range(L):
        wl = w[:, layer]
        nz = wl.nonzero()
        counts = (wl != 0).sum(-1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        weights = wl[nz[:, 0], nz[:, 1]]
        out[:, layer] = F.embedding_bag(nz[:, 1], flat[layer], offsets, mode="sum", per_sample_weights=weights)
    return out.view(P, L, b, d)


def main() -> None:
    torch.set_num_threads(1)
    A = torch.randn(L, N, b, d)
    for P in (1, 4, 16):
        w = torch.zeros(P, L, N)
        for p in range(P):
            for layer in range(L):
                w[p, layer, torch.randperm(N)[:k]] = 1 / k
        torch.testing.assert_close(contraction(w, A), gather(w, A), atol=1e-6, rtol=0)
        for f in (contraction, gather):
            times = []
            for _ in range(15):
                t = time.perf_counter()
                f(w, A)
                times.append(time.perf_counter() - t)
            print(f"P={P:2d} {f.__name__:11s} {1e3 * min(times):6.2f} ms  {1e3 * min(times) / P:5.2f} ms a profile")


if __name__ == "__main__":
    main()
