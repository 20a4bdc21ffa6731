"""Mask tensors M_A, M_B ∈ R^{L×N}: soft (softmax), hard (Gumbel top-k, Algorithm 1), and bit packing.

A hard mask is k-hot with value 1/k (Algorithm 1's y_hard / k), so the combined adapter is the mean of the
k selected adapters; stored, it is one bit per adapter and block: ⌈N/8⌉·L bytes per mask.

A mask over a bank's N members is also a mask over any bank grown from it (`xpeft.core.bank.grow_bank`: the
same N members first, more appended): `extend_weights` gives the new members weight 0, `extend_logits` gives
them logit -inf (a softmax gives them exactly 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def soft_mask(logits: torch.Tensor) -> torch.Tensor:
    """Soft mask: per-block softmax weights over the N adapters (rows sum to 1)."""
    return torch.softmax(logits, dim=-1)


def khot(logits: torch.Tensor, k: int) -> torch.Tensor:
    """k-hot rows (value 1/k) at the top-k logits: the deterministic hard mask used at eval."""
    idx = torch.topk(logits, k, dim=-1).indices
    return torch.zeros_like(logits).scatter_(-1, idx, 1.0 / k)


def gumbel_topk(
    logits: torch.Tensor, k: int, tau: float = 1.0, nu: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Algorithm 1: hard top-k softmax with straight-through gradients.

        logits = logits + nu * Gumbel(0, 1)
        y_soft = softmax(logits / tau)
        y_hard = khot_encoding(topk(y_soft)) / k
        y = y_hard - y_soft.detach() + y_soft

    The forward value is exactly k-hot / k; the gradient is that of y_soft.
    """
    if nu:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
        logits = logits + nu * gumbel
    y_soft = torch.softmax(logits / tau, dim=-1)
    y_hard = khot(y_soft.detach(), k)
    return y_hard - y_soft.detach() + y_soft


def mask_bytes(N: int, L: int) -> int:
    """Bytes of one bit-packed hard mask (M_A or M_B): ⌈N/8⌉·L."""
    return math.ceil(N / 8) * L


def pack_bits(mask: torch.Tensor) -> bytes:
    """Pack a L×N mask's non-zeros into ⌈N/8⌉·L bytes (each row padded to whole bytes)."""
    bits = (mask.detach().cpu() != 0).numpy()
    return np.packbits(bits, axis=-1).tobytes()


def unpack_bits(data: bytes, N: int, L: int) -> torch.Tensor:
    """Inverse of `pack_bits`: a L×N bool tensor."""
    expected = mask_bytes(N, L)
    if len(data) != expected:
        raise ValueError(
            f"a packed hard mask for N={N}, L={L} has {expected} bytes (⌈N/8⌉·L), got {len(data)}; "
            "the profile was made for a different bank"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(L, math.ceil(N / 8))
    return torch.from_numpy(np.unpackbits(arr, axis=-1, count=N).astype(bool))


def bits_to_weights(bits: torch.Tensor) -> torch.Tensor:
    """A bool k-hot mask as combination weights: 1/k on each selected adapter."""
    k = bits.sum(dim=-1, keepdim=True).clamp_min(1)
    return bits.float() / k


def extend_weights(weights: torch.Tensor, N: int) -> torch.Tensor:
    """Combination weights over a bank's first n members (… × n) as weights over a bank grown to N >= n members:
    zeros for the appended ones. A hard mask's bits are padded with zeros (still k-hot with the same k, value 1/k);
    a soft mask is as if its logits were -inf for them (softmax gives them exactly 0, the first n their weights);
    the single-mask ablation's Â stays the mean of the first n A_i. The combined adapter is the one of the bank
    the profile was fitted on."""
    n = weights.shape[-1]
    if N < n:
        raise ValueError(f"a mask over {n} adapters cannot be applied to a bank of N={N}: a bank only grows")
    return weights if N == n else torch.nn.functional.pad(weights, (0, N - n))


def extend_logits(logits: torch.Tensor, N: int) -> torch.Tensor:
    """Soft mask logits over a bank's first n members (… × n) as logits over a bank grown to N >= n: -inf for the
    appended members, so the softmax is the same n weights and exactly 0 for them."""
    n = logits.shape[-1]
    if N < n:
        raise ValueError(f"a mask over {n} adapters cannot be applied to a bank of N={N}: a bank only grows")
    return logits if N == n else torch.nn.functional.pad(logits, (0, N - n), value=float("-inf"))
