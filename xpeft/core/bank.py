"""The adapter bank: N frozen LoRA adapters per transformer block, shared by every profile (§2).

Held as two stacked tensors so that a mask combines them with one contraction:
    A: L × N × b × d_in   (down-projections)
    B: L × N × d_out × b  (up-projections)

A bank is either drawn at random from a seed (the paper's random adapters) or assembled from adapters
trained first (single_adapter per profile, or multi-task with a shared head; §3.1 "LaMP with learned
adapters"). On disk it is one safetensors file with its metadata and a sha256 fingerprint of the content,
which every profile records so that it is never applied to the wrong bank.

A bank grows append-only (issue 26): `grow_bank` makes a child that keeps its parent's N members, in order,
and appends more. The child records its lineage, every ancestor's fingerprint and N (oldest first), and each
load verifies it: the child's first N members must hash to the ancestor's fingerprint. A mask fitted on an
ancestor is then a mask over the child (zeros for the new members: `xpeft.core.masks.extend_weights`), so a
profile stored against any ancestor is served from the newest bank of its lineage, its record untouched.
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
    lineage: tuple[tuple[str, int], ...] = ()  # (fingerprint, N) of every ancestor, oldest first

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
    def parent(self) -> str | None:
        """The fingerprint of the bank this one was grown from (None: it was not grown)."""
        return self.lineage[-1][0] if self.lineage else None

    @property
    def parent_N(self) -> int | None:
        """The parent's N: this bank's first parent_N members are the parent's."""
        return self.lineage[-1][1] if self.lineage else None

    def members_of(self, fingerprint: str | None) -> int | None:
        """How many of the first members are bank `fingerprint`'s: N for this bank, an ancestor's N, else None
        (a profile fitted on it cannot be combined here)."""
        if fingerprint == self.fingerprint:
            return self.N
        return dict(self.lineage).get(fingerprint)

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
        grown = {}
        if self.lineage:  # parent and parent_N for the reader; lineage is what a load reads and verifies
            grown = {"parent": self.parent, "parent_N": str(self.parent_N), "lineage": json.dumps(self.lineage)}
        return grown | {
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
        grown = f", grown from {self.parent[:12]} (N={self.parent_N})" if self.lineage else ""
        return (
            f"bank {self.fingerprint[:12]} ({self.source}, N={self.N}, L={self.L}, b={self.b}, "
            f"d={self.d_in}->{self.d_out}, target={self.target}, {self.nbytes / 2**20:.1f} MiB{grown})"
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
    source, lineage = meta.get("source", ""), read_lineage(meta, path)
    bank = AdapterBank(A, B, meta["target"], seed, source, meta["fingerprint"], lineage)
    if verify:
        actual = fingerprint(A, B, bank.target)
        if actual != bank.fingerprint:
            raise ValueError(
                f"bank {path} is corrupt: its metadata says fingerprint {bank.fingerprint[:12]}… but its "
                f"content hashes to {actual[:12]}…; re-create or re-download the bank"
            )
        check_lineage(bank, path)
    return bank


def read_lineage(meta: dict[str, str], path: str | os.PathLike) -> tuple[tuple[str, int], ...]:
    """The (fingerprint, N) of every ancestor a bank file's metadata names, oldest first."""
    try:
        return tuple((str(fp), int(n)) for fp, n in json.loads(meta.get("lineage") or "[]"))
    except (ValueError, TypeError):
        raise ValueError(f"bank {path} is corrupt: its lineage {meta.get('lineage')!r} cannot be read") from None


def check_lineage(bank: AdapterBank, path: str | os.PathLike = "") -> None:
    """Each ancestor's members are the bank's first members, unchanged and in order: fingerprinting the slice of
    the first N members gives the ancestor's fingerprint (a ValueError naming the file when it does not)."""
    sizes = [n for _, n in bank.lineage]
    if sizes != sorted(set(sizes)) or (sizes and not 1 <= sizes[-1] < bank.N):
        name = path or bank.fingerprint[:12]
        raise ValueError(f"bank {name} is corrupt: its ancestors' sizes {sizes} do not grow to its N={bank.N}")
    for fp, n in bank.lineage:
        actual = fingerprint(bank.A[:, :n], bank.B[:, :n], bank.target)
        if actual != fp:
            raise ValueError(
                f"bank {path or bank.fingerprint[:12]} says it grows bank {fp[:12]}… (its first {n} members), but "
                f"they hash to {actual[:12]}…: the file is damaged, or those members were changed (a bank only "
                "grows by appending); restore it, or grow the ancestor again with `xpeft bank grow`"
            )


def member_changes(parent: AdapterBank, bank: AdapterBank) -> str | None:
    """Why `bank` cannot be a child of `parent` (None: it can): a child keeps all N of the parent's members, in
    order, and appends at least one. Profiles select members by position, so a child that drops members
    (shrinking) or moves them (reordering) would make every profile of the parent select other adapters."""
    shapes = [_shape(x) for x in (parent, bank)]
    if shapes[0] != shapes[1]:
        return f"its (L, b, d_in, d_out, target) {shapes[1]} differ from the parent's {shapes[0]}"
    if bank.N < parent.N:
        return (
            f"it has N={bank.N} members but its parent has N={parent.N}: shrinking is refused, since the profiles "
            f"fitted on the parent select members up to {parent.N - 1}; a bank only grows by appending"
        )
    first = next((i for i in range(parent.N) if not _same_member(parent, i, bank, i)), None)
    if first is not None:
        moved = next((j for j in range(bank.N) if _same_member(parent, first, bank, j)), None)
        if moved is not None:
            return (
                f"the parent's member {first} is member {moved} here: reordering is refused, since a profile's mask "
                "selects members by position (every profile of the parent would select other adapters); keep the "
                "parent's members first, in order, and append"
            )
        return f"its member {first} is not the parent's member {first}: a child keeps its parent's members unchanged"
    if bank.N == parent.N:
        return "it has the parent's N members and no new one: nothing to grow"
    return None


def _shape(x: AdapterBank) -> tuple:
    return x.L, x.b, x.d_in, x.d_out, x.target


def _same_member(x: AdapterBank, i: int, y: AdapterBank, j: int) -> bool:
    return torch.equal(x.A[:, i], y.A[:, j]) and torch.equal(x.B[:, i], y.B[:, j])


def child_of(parent: AdapterBank, bank: AdapterBank) -> AdapterBank:
    """`bank` as a child of `parent`, its lineage recorded: refused (ValueError, saying why) unless its first N
    members are the parent's, unchanged and in order, and it appends at least one (`member_changes`)."""
    problem = member_changes(parent, bank)
    if problem is not None:
        raise ValueError(f"{bank.describe()} cannot grow {parent.describe()}: {problem}")
    return replace(bank, lineage=(*parent.lineage, (parent.fingerprint, parent.N)))


def grow_bank(parent: AdapterBank, *new: AdapterBank) -> AdapterBank:
    """The child of `parent` with the members of each of `new` appended, in order (issue 26): the parent's N
    members first, unchanged."""
    for members in new:
        if _shape(members) != _shape(parent):
            raise ValueError(
                f"the new members ({members.describe()}) do not fit {parent.describe()}: a bank's members share L, "
                "b, the target and its dimensions"
            )
    A = torch.cat([parent.A, *(m.A.to(parent.A.dtype) for m in new)], dim=1).contiguous()
    B = torch.cat([parent.B, *(m.B.to(parent.B.dtype) for m in new)], dim=1).contiguous()
    source = "+".join(dict.fromkeys([parent.source, *(m.source for m in new)]))
    return child_of(parent, AdapterBank(A=A, B=B, target=parent.target, source=source))


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
    return AdapterBank(A, B, meta["target"], seed, meta["source"], meta["fingerprint"], read_lineage(meta, "object"))
