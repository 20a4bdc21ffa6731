"""Small profiles and damage for the store tests (no model: the store only carries the bytes)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import lance
import torch
from cases import B, K, L, N

from xpeft.config import XPeftConfig
from xpeft.profiles.record import Profile
from xpeft.profiles.store import TABLE, ProfileStore

CFG = XPeftConfig(N=N, k=K, b=B)


def profile(pid: str, version: float = 0.0, created: float | None = None) -> Profile:
    """A hard profile whose LN weight is filled with `version` (so a test can tell versions apart)."""
    p = Profile(pid, CFG, {"ln_weight": torch.full((L, B), float(version))}, mask_bits=b"\x01" * 12)
    if created is not None:
        p.created = created
    return p


def version_of(p: Profile) -> float:
    return float(p.tensors["ln_weight"][0, 0])


def part_file(store: ProfileStore, part: int) -> str:
    """The data file of one part of a local store's profile table."""
    ds = lance.dataset(f"{store.root}/{TABLE}")
    (frag,) = [f for f in ds.get_fragments() if f.fragment_id == part]
    return f"{store.root}/{TABLE}/data/{frag.metadata.files[0].path}"


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def flip(path: str, offset: int) -> bytes:
    """Flip the lowest bit of the byte at `offset` (a float's lowest mantissa bit where it lands on one: the value
    stays finite, the file the same size); returns the file's bytes before, to restore it."""
    good = open(path, "rb").read()
    data = bytearray(good)
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))
    return good


def write_profiles(root: str, writer: int, batches: int, table_options: dict) -> None:
    """A writer process: new profiles of its own, and refits of ids both writers share."""
    store = ProfileStore(root, **table_options)
    rng = random.Random(writer)
    for b in range(batches):
        new = [profile(f"w{writer}-{b}-{j}", version=writer) for j in range(3)]
        shared = [profile(f"shared-{rng.randrange(6)}", version=100 * writer + b) for _ in range(2)]
        store.write(new + shared)


def run_two_writers(root: str, batches: int, table_options: dict | None = None) -> list[str]:
    """Two `write_profiles` processes at once; the new ids they wrote."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_profiles, args=(root, w, batches, table_options or {})) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0, p.exitcode
    return [f"w{w}-{b}-{j}" for w in (1, 2) for b in range(batches) for j in range(3)]
