"""The adapter bank: N frozen LoRA adapters per transformer block, shared by every profile (§2).

Held as two stacked tensors so that a mask combines them with one contraction:
    A: L × N × b × d_in   (down-projections)
    B: L × N × d_out × b  (up-projections)

A bank is either drawn at random from a seed (the paper's random adapters) or assembled from adapters
trained first (single_adapter per profile, or multi-task with a shared head; §3.1 "LaMP with learned
adapters"). On disk it is one safetensors file with its metadata and a sha256 fingerprint of the content,
which every profile records so that it is never applied to the wrong bank.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xpeft.core.families import FAMILIES

BANK_FORMAT = "xpeft-bank/1"
# A bank records the path its adapters wrap (never a meaning, which differs per family); made without an
# encoder to resolve one, it is BERT's value projection, as every bank before the families were known.
BERT_VALUE = FAMILIES["bert"].targets["value"]


@dataclass
class AdapterBank:
    """N frozen LoRA adapters for each of L blocks. See the module docstring for the layout."""

    A: torch.Tensor  # L × N × b × d_in
    B: torch.Tensor  # L × N × d_out × b
    target: str = BERT_VALUE
    seed: int | None = None
    source: str = "random"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.A.dim() != 4 or self.B.dim() != 4:
            raise ValueError(
                f"bank tensors must be A: L×N×b×d_in and B: L×N×d_out×b, got A {tuple(self.A.shape)} "
                f"and B {tuple(self.B.shape)}"
            )
        L, N, b, _ = self.A.shape
        if self.B.shape[0] != L or self.B.shape[1] != N or self.B.shape[3] != b:
            raise ValueError(f"A {tuple(self.A.shape)} and B {tuple(self.B.shape)} disagree on L, N or b")
        self.A.requires_grad_(False)
        self.B.requires_grad_(False)
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.A, self.B, self.target)

    @property
    def L(self) -> int:
        return self.A.shape[0]

    @property
    def N(self) -> int:
        return self.A.shape[1]

    @property
    def b(self) -> int:
        return self.A.shape[2]

    @property
    def d_in(self) -> int:
        return self.A.shape[3]

    @property
    def d_out(self) -> int:
        return self.B.shape[2]

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def map(self, fn) -> AdapterBank:
        """The same bank (fingerprint kept) with `fn` applied to A and B, e.g. a device or dtype move; itself
        when `fn` returns both tensors unchanged."""
        A, B = fn(self.A), fn(self.B)
        return self if A is self.A and B is self.B else replace(self, A=A, B=B)

    def to(self, device: torch.device | str) -> AdapterBank:
        return self.map(lambda t: t.to(device))

    def metadata(self) -> dict[str, str]:
        return {
            "format": BANK_FORMAT,
            "N": str(self.N),
            "L": str(self.L),
            "b": str(self.b),
            "d_in": str(self.d_in),
            "d_out": str(self.d_out),
            "target": self.target,
            "seed": "" if self.seed is None else str(self.seed),
            "source": self.source,
            "fingerprint": self.fingerprint,
        }

    def describe(self) -> str:
        return (
            f"bank {self.fingerprint[:12]} ({self.source}, N={self.N}, L={self.L}, b={self.b}, "
            f"d={self.d_in}->{self.d_out}, target={self.target}, {self.nbytes / 2**20:.1f} MiB)"
        )


def fingerprint(A: torch.Tensor, B: torch.Tensor, target: str) -> str:
    """sha256 over the shapes, the target and every byte of A and B."""
    h = hashlib.sha256()
    h.update(json.dumps({"A": list(A.shape), "B": list(B.shape), "target": target}).encode())
    for t in (A, B):
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).data)
    return h.hexdigest()


def random_bank(
    L: int,
    N: int,
    b: int,
    d_in: int,
    d_out: int | None = None,
    seed: int = 0,
    target: str = BERT_VALUE,
    scale: float = 1.0,
) -> AdapterBank:
    """Draw the paper's random adapters from `seed`.

    Init: A_i ~ N(0, 1/d_in) and B_i ~ N(0, 1/b), times `scale`: each adapter then maps a unit-variance
    input to a unit-variance output, so a combined adapter keeps a known scale whatever d and b are
    (the LayerNorm after Â and its learned gain set the final scale per profile).
    """
    if min(L, N, b, d_in) < 1:
        raise ValueError(f"a bank needs L, N, b, d_in >= 1; got L={L}, N={N}, b={b}, d_in={d_in}")
    d_out = d_in if d_out is None else d_out
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(L, N, b, d_in)
    B = torch.empty(L, N, d_out, b)
    for layer in range(L):  # per layer, so peak memory stays one layer of noise above the bank
        A[layer].normal_(0.0, scale / d_in**0.5, generator=g)
        B[layer].normal_(0.0, scale / b**0.5, generator=g)
    return AdapterBank(A=A, B=B, target=target, seed=seed, source="random")


def random_bank_for(encoder, cfg, seed: int = 0, scale: float = 1.0) -> AdapterBank:
    """A random bank that fits `encoder` (its L and target linear) and `cfg` (its N, b and target, recorded as
    the linear's path in this encoder)."""
    from xpeft.core.encoder import adapted_dims
    from xpeft.core.families import resolve_target

    target = resolve_target(encoder, cfg.target)
    L, d_in, d_out = adapted_dims(encoder, target)
    return random_bank(L, cfg.N, cfg.b, d_in, d_out, seed=seed, target=target, scale=scale)


def bank_from_adapters(
    adapters: list[tuple[torch.Tensor, torch.Tensor]], target: str = BERT_VALUE, source: str = "single_adapter"
) -> AdapterBank:
    """Assemble a learned bank from trained adapters, each (A: L×b×d_in, B: L×d_out×b)."""
    if not adapters:
        raise ValueError("a learned bank needs at least one trained adapter; got none")
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in adapters}
    if len(shapes) != 1:
        raise ValueError(f"all adapters must have the same shapes to form a bank; got {sorted(shapes)}")
    A = torch.stack([a.detach().float().cpu() for a, _ in adapters], dim=1).contiguous()
    B = torch.stack([b.detach().float().cpu() for _, b in adapters], dim=1).contiguous()
    return AdapterBank(A=A, B=B, target=target, seed=None, source=source)


def save_bank(bank: AdapterBank, path: str | os.PathLike) -> Path:
    """Write the bank as safetensors (no pickle), atomically: a temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"A": bank.A.contiguous(), "B": bank.B.contiguous()}, str(tmp), metadata=bank.metadata())
    os.replace(tmp, path)
    return path


def load_bank(path: str | os.PathLike, verify: bool = True) -> AdapterBank:
    """Read a bank written by `save_bank`, verifying its content against the sha256 fingerprint in its
    metadata (a full pass over the bytes, ~0.3 s for MiniLM at N=100): a damaged file is refused, naming it.
    `verify=False` trusts the metadata (only for a file just verified, e.g. a local copy)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no bank at {path}; create one with `xpeft bank random` or `save_bank`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for a truncated or garbled file
        raise ValueError(f"bank {path} is unreadable ({type(e).__name__}: {e}); re-create or re-download it") from None
    if meta.get("format") != BANK_FORMAT or set(tensors) != {"A", "B"}:
        raise ValueError(f"{path} is not an xpeft bank (metadata format={meta.get('format')!r})")
    A, B = tensors["A"], tensors["B"]
    seed = int(meta["seed"]) if meta.get("seed") else None
    bank = AdapterBank(
        A=A, B=B, target=meta["target"], seed=seed, source=meta.get("source", ""), fingerprint=meta["fingerprint"]
    )
    if verify:
        actual = fingerprint(A, B, bank.target)
        if actual != bank.fingerprint:
            raise ValueError(
                f"bank {path} is corrupt: its metadata says fingerprint {bank.fingerprint[:12]}… but its "
                f"content hashes to {actual[:12]}…; re-create or re-download the bank"
            )
    return bank


def bank_to_object(bank: AdapterBank) -> dict:
    """The bank as numpy arrays and metadata, for Ray's object store (mapped zero-copy by every reader)."""
    return {"A": bank.A.numpy(), "B": bank.B.numpy(), "meta": bank.metadata()}


def bank_from_object(obj: dict) -> AdapterBank:
    import warnings

    meta = obj["meta"]
    with warnings.catch_warnings():  # the arrays are read-only object-store pages; the bank is frozen
        warnings.simplefilter("ignore", UserWarning)
        A, B = torch.from_numpy(obj["A"]), torch.from_numpy(obj["B"])
    seed = int(meta["seed"]) if meta.get("seed") else None
    return AdapterBank(A, B, meta["target"], seed, meta["source"], meta["fingerprint"])
