"""The one combination of masks and bank, weights first (§2): Â = Σ_i M_A[l,i]·A_i, B̂ = Σ_i M_B[l,i]·B_i.

One contraction per mask over the whole bank, for one profile (L×N weights) or many at once (P×L×N): each
token then meets one low-rank adapter per block, whatever N is. A single profile's contraction is memory
bound (it streams the whole bank: Â reads all of A, 44 MB for MiniLM at N=100, b=48), so combining the
profiles a server misses together costs little more than one.
"""

from __future__ import annotations

import torch

from xpeft.core.bank import AdapterBank


def combine(wA: torch.Tensor, wB: torch.Tensor, bank: AdapterBank) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, B̂) from mask weights and the bank: L×N weights give L×b×d_in and L×d_out×b; P×L×N weights give
    one pair per profile, P×L×b×d_in and P×L×d_out×b."""
    if wA.shape[-2:] != (bank.L, bank.N) or wB.shape[-2:] != (bank.L, bank.N):
        raise ValueError(
            f"mask weights {tuple(wA.shape)} / {tuple(wB.shape)} do not fit the bank's L×N = {bank.L}×{bank.N}"
        )
    # In the bank's dtype even under bf16 autocast (a fit's forward): autocast would cast the whole frozen bank to
    # bf16 at every step, three times the cost of the fp32 contraction itself (MiniLM, N=400: 90 ms against 24 for
    # forward and backward); Â and B̂ are small, and autocast casts them where they meet the activations.
    with torch.autocast(bank.A.device.type, enabled=False):
        A_hat = torch.einsum("...ln,lnbd->...lbd", wA.to(bank.A), bank.A)
        B_hat = torch.einsum("...ln,lndb->...ldb", wB.to(bank.B), bank.B)
    return A_hat, B_hat
