"""A profile is masks + LN + head + the bank's fingerprint; it round-trips losslessly and refuses the wrong bank."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch
from conftest import tiny_batch, tiny_encoder

from xpeft.bank import random_bank
from xpeft.config import XPeftConfig
from xpeft.masks import mask_bytes
from xpeft.model import XPeftModel
from xpeft.multiprofile import MultiProfileModel, combine_profile
from xpeft.profiles import Profile, apply_profile, from_row, profile_from_model, to_row, validate_profile_id
from xpeft.store import ProfileStore

L, N, K, B, D = 2, 20, 5, 4, 32
BANK = random_bank(L, N, B, D, seed=7)

MODES = [
    {"mode": "x_peft", "mask_type": "hard"},
    {"mode": "x_peft", "mask_type": "soft"},
    {"mode": "x_peft", "mask_type": "hard", "masks": "B"},
    {"mode": "single_adapter"},
    {"mode": "head_only"},
]


def fitted(cfg_kwargs: dict, seed: int = 0) -> XPeftModel:
    """A model whose trainable tensors are random (as if fitted)."""
    cfg = XPeftConfig(**{"N": N, "k": K, "b": B, **cfg_kwargs})
    model = XPeftModel(tiny_encoder(), cfg, BANK if cfg.mode == "x_peft" else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: "-".join(map(str, c.values())))
def test_profile_round_trip_is_lossless(cfg):
    """Saved through a Parquet row and applied to a fresh model, a profile predicts exactly the same."""
    model = fitted(cfg)
    batch = tiny_batch(labels=None)
    expected = model(**batch)["logits"]
    profile = from_row(to_row(profile_from_model(model, "author 17", metrics={"accuracy": 0.5})))
    fresh = XPeftModel(tiny_encoder(), profile.config, BANK if cfg["mode"] == "x_peft" else None).eval()
    apply_profile(fresh, profile)
    assert torch.allclose(fresh(**batch)["logits"], expected, atol=1e-6)
    assert profile.metrics == {"accuracy": 0.5}


def test_hard_profile_stores_its_masks_in_2_ceil_N_over_8_times_L_bytes():
    profile = profile_from_model(fitted({"mode": "x_peft", "mask_type": "hard"}), "p1")
    assert len(profile.mask_bits) == 2 * mask_bytes(N, L) == 2 * 3 * 2
    assert "mask_logits_A" not in profile.tensors
    sizes = profile.size_report()
    assert sizes["mask_bits"] == 12
    assert sizes["ln"] == 2 * B * L * 4  # the LN affine after Â, stored beside the bits
    assert sizes["total"] == profile.record_bytes == 12 + sizes["ln"] + sizes["head"]


def test_profile_against_a_different_bank_is_a_clear_error():
    profile = profile_from_model(fitted({"mode": "x_peft", "mask_type": "hard"}), "p1")
    other = random_bank(L, N, B, D, seed=8)
    model = XPeftModel(tiny_encoder(), profile.config, other)
    with pytest.raises(ValueError, match="was fitted on bank"):
        apply_profile(model, profile)


def test_profile_with_mismatched_N_is_a_clear_error():
    profile = profile_from_model(fitted({"mode": "x_peft", "mask_type": "hard"}), "p1")
    bigger = random_bank(L, N + 8, B, D, seed=7)
    profile.bank_fingerprint = bigger.fingerprint  # even with a matching fingerprint the bits cannot fit
    with pytest.raises(ValueError, match="N="):
        combine_profile(profile, bigger, D)


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", " x", "x" * 300, "tab\there", 7])
def test_profile_ids_that_could_escape_the_store_are_refused(bad):
    with pytest.raises(ValueError, match="profile id"):
        validate_profile_id(bad)


def test_store_round_trip_and_newest_version_wins(tmp_path):
    store = ProfileStore(tmp_path / "store")
    a = profile_from_model(fitted({"mode": "x_peft", "mask_type": "hard"}, seed=1), "alice", {"accuracy": 0.1})
    store.write([a])
    b = profile_from_model(fitted({"mode": "x_peft", "mask_type": "hard"}, seed=2), "alice", {"accuracy": 0.9})
    store.write([b])
    reopened = ProfileStore(tmp_path / "store")
    assert reopened.ids() == ["alice"]
    got = reopened.get("alice")
    assert got.metrics == {"accuracy": 0.9} and got.mask_bits == b.mask_bits
    with pytest.raises(KeyError, match="not in the store"):
        reopened.get("bob")
    assert not list((tmp_path / "store" / "profiles").glob(".tmp-*"))


def _writer(root: str, start: int) -> None:
    store = ProfileStore(root)
    cfg = XPeftConfig(N=N, k=K, b=B)
    for i in range(start, start + 20):
        store.write([Profile(f"w{i}", cfg, {"ln_weight": torch.ones(L, B)}, mask_bits=b"\x01" * 12)])


def test_concurrent_writers_never_clobber_each_other(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), s)) for s in (0, 20, 40)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert ProfileStore(tmp_path).ids() == sorted(f"w{i}" for i in range(60))


def test_lookup_by_profile_id_is_fast_with_100000_profiles(tmp_path):
    store = ProfileStore(tmp_path)
    cfg = XPeftConfig(N=100, k=50, b=48)
    ln = {"ln_weight": torch.ones(6, 48), "ln_bias": torch.zeros(6, 48)}
    for chunk in range(20):  # 20 files of 5,000 profiles
        store.write([Profile(f"p{chunk * 5000 + i}", cfg, ln, mask_bits=b"\xff" * 156) for i in range(5000)])
    start = time.perf_counter()
    reader = ProfileStore(tmp_path)
    assert len(reader) == 100_000
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, 100_000, 1000):
        assert reader.get(f"p{i}").profile_id == f"p{i}"
    per_lookup = (time.perf_counter() - start) / 100
    assert opened < 5 and per_lookup < 0.05, (opened, per_lookup)


def test_mixed_batch_equals_single_profile_forwards():
    """One forward over rows of different profiles (and modes) equals each profile's own model."""
    batch = tiny_batch(n=5, labels=None)
    cfgs = [MODES[0], MODES[1], MODES[0], MODES[3], MODES[4]]
    models = [fitted(c, seed=i) for i, c in enumerate(cfgs)]
    expected = torch.cat([m(**{k: v[i : i + 1] for k, v in batch.items()})["logits"] for i, m in enumerate(models)])
    profiles = [profile_from_model(m, f"p{i}") for i, m in enumerate(models)]
    combined = [combine_profile(p, BANK, D) for p in profiles]
    mixed = MultiProfileModel(tiny_encoder(), BANK.target)
    got = torch.stack(mixed.forward_mixed(batch, combined))
    assert torch.allclose(got, expected, atol=1e-5)


def test_one_store_is_shared_safely_by_threads_writing_and_reading(tmp_path):
    """A server's threads and a writer in the same process share one ProfileStore (its index)."""
    store = ProfileStore(tmp_path)
    cfg = XPeftConfig(N=N, k=K, b=B)
    errors: list[BaseException] = []

    def write() -> None:
        for i in range(40):
            store.write([Profile(f"t{i}", cfg, {"ln_weight": torch.full((L, B), float(i))}, mask_bits=b"\x01" * 12)])

    def read() -> None:
        try:
            for _ in range(200):
                ids = store.ids()
                if ids:
                    pid = ids[-1]
                    assert store.get(pid).profile_id == pid
                    assert store.locate(pid) == store.locations()[pid]
        except BaseException as e:  # reported below, with the failing thread's error
            errors.append(e)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert store.ids() == sorted(f"t{i}" for i in range(40))
    assert float(store.get("t39").tensors["ln_weight"][0, 0]) == 39.0
