"""A profile is masks + LN + head + the bank's fingerprint; it round-trips losslessly and refuses the wrong bank."""

from __future__ import annotations

import multiprocessing as mp
import threading
from dataclasses import replace

import pytest
import torch
from cases import B, D, K, L, N, fitted_profile
from conftest import tiny_encoder

from xpeft.config import XPeftConfig
from xpeft.core.bank import random_bank
from xpeft.core.masks import mask_bytes
from xpeft.core.model import XPeftModel
from xpeft.profiles.record import Profile, apply_profile, validate_profile_id
from xpeft.profiles.store import ProfileStore
from xpeft.serve.combine import combine_profiles

HARD = "hard-no-ln"  # a hard profile with its own 2-class head (tests/cases.py)


def test_hard_profile_stores_its_masks_in_2_ceil_N_over_8_times_L_bytes():
    _, profile = fitted_profile("hard", "p1")
    assert len(profile.mask_bits) == 2 * mask_bytes(N, L) == 2 * 3 * 2
    assert "mask_logits_A" not in profile.tensors
    sizes = profile.record_bytes_by_part()
    assert sizes["mask_bits"] == 12
    assert sizes["ln"] == 2 * B * L * 4  # the LN affine after Â, stored beside the bits
    assert sizes["total"] == profile.record_bytes == 12 + sizes["ln"] + sizes["head"]


def test_profile_against_a_different_bank_is_a_clear_error():
    profile = fitted_profile("hard", "p1")[1]
    other = random_bank(L, N, B, D, seed=8)
    model = XPeftModel(tiny_encoder(), profile.config, other)
    with pytest.raises(ValueError, match="was fitted on bank"):
        apply_profile(model, profile)


def test_profile_with_mismatched_N_is_a_clear_error():
    profile = fitted_profile("hard", "p1")[1]
    bigger = random_bank(L, N + 8, B, D, seed=7)
    profile.bank_fingerprint = bigger.fingerprint  # even with a matching fingerprint the bits cannot fit
    (refused,) = combine_profiles([profile], bigger, D, {})
    assert isinstance(refused, ValueError) and "N=" in str(refused)


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", " x", "x" * 300, "tab\there", 7])
def test_profile_ids_that_could_escape_the_store_are_refused(bad):
    with pytest.raises(ValueError, match="profile id"):
        validate_profile_id(bad)


def test_store_round_trip_and_newest_version_wins(tmp_path):
    store = ProfileStore(tmp_path / "store")
    a = replace(fitted_profile("hard", "alice", seed=1)[1], metrics={"accuracy": 0.1})
    store.write([a])
    b = replace(fitted_profile("hard", "alice", seed=2)[1], metrics={"accuracy": 0.9})
    store.write([b])
    reopened = ProfileStore(tmp_path / "store")
    assert reopened.ids() == ["alice"]
    got = reopened.get("alice")
    assert got.metrics == {"accuracy": 0.9} and got.mask_bits == b.mask_bits
    with pytest.raises(KeyError, match="not in the store"):
        reopened.get("bob")


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
                    assert store.read(pid, store.locate(pid)).profile_id == pid
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
