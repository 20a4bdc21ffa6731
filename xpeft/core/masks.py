"""Mask tensors M_A, M_B ∈ R^{L×N}: soft (softmax), hard (Gumbel top-k, Algorithm 1), and bit packing.

A hard mask is k-hot with value 1/k (Algorithm 1's y_hard / k), so the combined adapter is the mean of the
k selected adapters; stored, it is one bit per adapter and block: ⌈N/8⌉·L bytes per mask.
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
