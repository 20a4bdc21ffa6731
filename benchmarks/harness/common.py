"""What the benchmark scripts share: the random profile store they measure, the tiny backbone of their
`--smoke` setting, the machine line their tables start with, and a free port."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

import torch

from xpeft.config import XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder
from xpeft.core.masks import khot, pack_bits
from xpeft.profiles.record import Profile
from xpeft.profiles.store import ProfileStore

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the a new old big small good bad great awful movie film story news politics sports music art travel food "
    "health business school science tech style culture love fun game team vote election money market trip "
    "recipe city world people week year report study season police court family home life"
).split()
FLUSH_EVERY = 8  # FarmConfig.flush_every: profiles per store write (one commit) as the farm writes them
SMOKE_HELP = "a tiny random backbone and a few rows: seconds, to check the script runs (the test suite runs it)"


def smoke_backbone(folder: str | os.PathLike) -> str:
    """The test suite's tiny random BERT (tests/tiny_backbone.py: 2 blocks, hidden 32) written to `folder`."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(Path(folder) / "tiny-bert")


def make_store(root: str, n: int, backbone: str, cfg: XPeftConfig) -> ProfileStore:
    """A store with `n` random hard-mask profiles of `cfg` (k-hot masks, LN affine, its head) on one random
    bank, written 8 a commit as the farm flushes them; reused when it already holds `n`. Serving cost does not
    depend on how well a profile was fitted."""
    store = ProfileStore(root)
    if len(store) >= n and store.bank_fingerprints():
        return store
    cfg = XPeftConfig(**{**cfg.to_dict(), "mode": "x_peft", "mask_type": "hard", "head": "linear"})
    bank = random_bank_for(load_encoder(backbone), cfg, seed=0)
    L, d, b, c = bank.L, bank.d_in, cfg.b, cfg.num_labels
    store.save_bank(bank)
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(n):
        masks = [khot(torch.randn(L, cfg.N, generator=g), cfg.top_k) for _ in range(2)]
        tensors = {
            "ln_weight": 1 + 0.1 * torch.randn(L, b, generator=g),
            "ln_bias": 0.1 * torch.randn(L, b, generator=g),
            "head.classifier.weight": torch.randn(c, d, generator=g) / d**0.5,
            "head.classifier.bias": torch.zeros(c),
        }
        batch.append(
            Profile(
                f"p{i:05d}",
                cfg,
                tensors,
                mask_bits=pack_bits(masks[0]) + pack_bits(masks[1]),
                bank_fingerprint=bank.fingerprint,
                metrics={"accuracy": 0.5},
            )
        )
        if len(batch) == FLUSH_EVERY:
            store.write(batch)
            batch = []
    store.write(batch)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    """The line every table starts with: what ran it."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )


def command_line() -> str:
    """The command as it was run, for the record."""
    return " ".join([os.path.basename(sys.executable), *sys.argv])
