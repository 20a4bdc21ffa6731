"""Banks that grow (issue 26): a child bank keeps its parent's members (verified by fingerprinting the parent's
slice on every load), shrinking or reordering is refused saying why, and a profile fitted on the parent predicts
the same on the child (its masks zero-extended: hard bits padded with zeros, soft logits with -inf, the
single-mask ablation's Â the mean over the parent's members) for every mask mode of the case table."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from api_cases import OTHER_BANK
from cases import BANK, BY_NAME, CASES, Case, D, L, N, fitted_profile, shared_head_state, store_cases
from conftest import tiny_batch, tiny_encoder
from safetensors import safe_open
from safetensors.torch import save_file
from store_helpers import flip
from test_benchmarks import assert_ran, run_smoke

from xpeft.core.bank import AdapterBank, child_of, fingerprint, grow_bank, load_bank, random_bank, save_bank
from xpeft.core.encoder import load_encoder
from xpeft.core.model import XPeftModel
from xpeft.profiles.lineage import Lineages
from xpeft.profiles.record import apply_profile
from xpeft.profiles.store import ProfileStore
from xpeft.serve.combine import combine_profiles
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError

B = BANK.b
NEW = random_bank(L, 12, B, D, seed=11)  # 12 new members
CHILD = grow_bank(BANK, NEW)
GRANDCHILD = grow_bank(CHILD, random_bank(L, 32, B, D, seed=12))
MASKED = [c.name for c in CASES if c.xpeft().mode == "x_peft"]  # hard, soft, masks=B, LN off, pooler, mtl...


def test_a_grown_bank_keeps_its_parents_members_first_and_records_its_lineage(tmp_path):
    assert CHILD.N == N + 12 and GRANDCHILD.N == N + 44
    assert torch.equal(CHILD.A[:, :N], BANK.A) and torch.equal(CHILD.B[:, N:], NEW.B)
    assert fingerprint(CHILD.A[:, :N], CHILD.B[:, :N], CHILD.target) == BANK.fingerprint
    assert CHILD.lineage == ((BANK.fingerprint, N),) and (CHILD.parent, CHILD.parent_N) == (BANK.fingerprint, N)
    assert GRANDCHILD.lineage == ((BANK.fingerprint, N), (CHILD.fingerprint, N + 12))
    loaded = load_bank(save_bank(GRANDCHILD, tmp_path / "g.safetensors"))
    assert loaded.lineage == GRANDCHILD.lineage and loaded.fingerprint == GRANDCHILD.fingerprint
    assert [loaded.members_of(fp) for fp in (BANK.fingerprint, CHILD.fingerprint, loaded.fingerprint)] == [
        N,
        N + 12,
        N + 44,
    ]
    assert loaded.members_of(NEW.fingerprint) is None  # the new members alone are no ancestor
    assert "grown from" in loaded.describe()


def test_growing_refuses_shrinking_reordering_and_other_shapes_saying_why():
    smaller = AdapterBank(A=BANK.A[:, : N - 1].clone(), B=BANK.B[:, : N - 1].clone(), target=BANK.target)
    with pytest.raises(ValueError, match="shrinking is refused"):
        child_of(BANK, smaller)
    order = list(range(N + 12))
    order[0], order[1] = 1, 0
    swapped = AdapterBank(A=CHILD.A[:, order].clone(), B=CHILD.B[:, order].clone(), target=BANK.target)
    with pytest.raises(ValueError, match="reordering is refused.*selects members by position"):
        child_of(BANK, swapped)
    with pytest.raises(ValueError, match="nothing to grow"):
        child_of(BANK, BANK)
    with pytest.raises(ValueError, match="share L, b"):
        grow_bank(BANK, random_bank(L, 3, B + 1, D, seed=1))


def rewrite(path, tensors: dict, meta: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_loading_a_grown_bank_whose_parent_slice_changed_is_reported_as_damage_naming_the_file(tmp_path):
    path = save_bank(CHILD, tmp_path / "child.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, A, Bm = f.metadata(), f.get_tensor("A"), f.get_tensor("B")
    A[0, 3] += 1.0  # a parent member changed, and the whole file's fingerprint recomputed to match
    rewrite(path, {"A": A, "B": Bm}, {**meta, "fingerprint": fingerprint(A, Bm, meta["target"])})
    with pytest.raises(ValueError, match=rf"bank {path} says it grows bank {BANK.fingerprint[:12]}.*damaged"):
        load_bank(path)
    rewrite(path, {"A": A, "B": Bm}, {**meta, "fingerprint": fingerprint(A, Bm, meta["target"]), "lineage": "[[1"})
    with pytest.raises(ValueError, match=rf"bank {path} is corrupt: its lineage"):
        load_bank(path)
    lineage = json.dumps([[BANK.fingerprint, N + 40]])  # an ancestor larger than the bank
    rewrite(path, {"A": A, "B": Bm}, {**meta, "fingerprint": fingerprint(A, Bm, meta["target"]), "lineage": lineage})
    with pytest.raises(ValueError, match=rf"bank {path} is corrupt: its ancestors' sizes"):
        load_bank(path)


def logits_of(model: XPeftModel) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_batch(labels=None))["logits"]


@pytest.mark.parametrize("name", MASKED)
def test_a_lineage_profile_predicts_the_same_on_its_grown_banks_as_on_its_own(name):
    encoder = tiny_encoder()
    model, profile = fitted_profile(name, seed=3, encoder=encoder)
    want = logits_of(model)
    case = BY_NAME[name]
    head = shared_head_state(case, encoder) if case.shared_head else None
    for bank in (CHILD, GRANDCHILD):
        # a model built on the grown bank, the stored profile loaded into it
        grown = XPeftModel(encoder, dataclasses.replace(profile.config, N=bank.N), bank).eval()
        apply_profile(grown, profile, head)
        torch.testing.assert_close(logits_of(grown), want, atol=1e-6, rtol=0)
        # the server's combination (Â, B̂ per block) is the one of the profile's own bank
        (own,) = combine_profiles([profile], BANK, D, {profile.head_id: head} if head else {})
        (other,) = combine_profiles([profile], bank, D, {profile.head_id: head} if head else {})
        torch.testing.assert_close(other.A_hat, own.A_hat, atol=1e-6, rtol=0)
        torch.testing.assert_close(other.B_hat, own.B_hat, atol=1e-6, rtol=0)


def test_a_profile_of_a_grown_bank_is_refused_by_its_parent_saying_which_bank():
    _, profile = fitted_profile("hard", "new", seed=4)
    # as if fitted on the child (its fingerprint and N; the check is by fingerprint before any shape)
    profile = dataclasses.replace(profile, bank_fingerprint=CHILD.fingerprint)
    (refused,) = combine_profiles([profile], BANK, D, {})
    assert isinstance(refused, ValueError) and CHILD.fingerprint in str(refused)


# --- serving across banks (engine level, no Ray) ---------------------------------------------------------------

TEXTS = ["the movie was great fun", "bad boring plot", "news about the election"]
ON_CHILD = Case("hard-child", {"mode": "x_peft", "mask_type": "hard", "N": CHILD.N})


def engine_on(store: ProfileStore, backbone: str, **kwargs) -> ProfileEngine:
    cfg = ServeConfig(store=store.uri, backbone=backbone, torch_threads=1, preload=False, **kwargs)
    return ProfileEngine(cfg)


def served_logits(engine: ProfileEngine, ids: list[str]) -> dict[str, torch.Tensor]:
    combined = engine.load_profiles(ids)
    assert not [c for c in combined if isinstance(c, ServeError)], [c.detail for c in combined if hasattr(c, "detail")]
    rows = engine.tokenize(TEXTS, None)
    out = engine.forward([(c, r) for c in combined for r in rows])
    return {pid: torch.stack(out[i * len(rows) : (i + 1) * len(rows)]) for i, pid in enumerate(ids)}


@pytest.mark.parametrize("forward", ["eager", "ort"])
def test_a_grown_store_serves_its_lineages_old_profiles_from_the_child_with_their_own_logits(
    tmp_path, backbone, forward
):
    store = ProfileStore(tmp_path)
    store_cases(store, load_encoder(backbone), [BY_NAME[n] for n in MASKED])
    before = engine_on(store, backbone, forward=forward)
    want = served_logits(before, MASKED)
    store.save_bank(CHILD)  # the bank grows; no record is rewritten
    store.write([fitted_profile(ON_CHILD, "new", seed=9, encoder=load_encoder(backbone), bank=CHILD)[1]])
    after = engine_on(store, backbone, forward=forward)
    assert after.bank.fingerprint == CHILD.fingerprint  # the newest bank of the lineage, one bank in memory
    got = served_logits(after, [*MASKED, "new"])
    for pid in MASKED:
        torch.testing.assert_close(got[pid], want[pid], atol=1e-6, rtol=0)
        assert after.profile_info(pid)["served_from_bank"] == CHILD.fingerprint
    assert after.profile_info("hard")["bank_fingerprint"] == BANK.fingerprint  # its record is untouched
    assert after.health()["bank_bytes_in_memory"] == CHILD.nbytes


def test_a_server_holding_two_lineages_answers_both_within_its_bank_cache(tmp_path, backbone):
    store, encoder = ProfileStore(tmp_path), load_encoder(backbone)
    store_cases(store, encoder, [BY_NAME["hard"]])
    store.save_bank(OTHER_BANK)
    store.write([fitted_profile("soft", "other", seed=5, encoder=encoder, bank=OTHER_BANK)[1]])
    engine = engine_on(store, backbone, bank_cache_mb=0, cache_size=1)  # one bank in memory: the one used last
    for pid, bank in [("hard", BANK), ("other", OTHER_BANK), ("hard", BANK)]:
        (c,) = engine.load_profiles([pid])
        assert not isinstance(c, ServeError) and engine.profile_info(pid)["served_from_bank"] == bank.fingerprint
        assert engine.health()["bank_bytes_in_memory"] == bank.nbytes
    health = engine.health()
    assert {b["fingerprint"] for b in health["banks"]} == {BANK.fingerprint, OTHER_BANK.fingerprint}
    assert health["status"] == "ok"


def test_a_profile_whose_bank_is_in_no_lineage_of_the_store_gets_409_naming_the_bank(tmp_path, backbone):
    store, encoder = ProfileStore(tmp_path), load_encoder(backbone)
    store_cases(store, encoder, [BY_NAME["hard"]], OTHER_BANK)  # 'other-bank': fitted on a bank not stored
    engine = engine_on(store, backbone)
    (refused,) = engine.load_profiles(["other-bank"])
    assert refused.status == 409 and OTHER_BANK.fingerprint in refused.detail and "not in the store" in refused.detail
    info = engine.profile_info("other-bank")
    assert not info["servable"] and OTHER_BANK.fingerprint in info["problem"] and info["served_from_bank"] is None
    assert not isinstance(engine.load_profiles(["hard"])[0], ServeError)


def test_a_damaged_grown_bank_is_refused_while_the_parents_profiles_are_served_from_the_parent(tmp_path, backbone):
    store, encoder = ProfileStore(tmp_path), load_encoder(backbone)
    store_cases(store, encoder, [BY_NAME["hard"]])
    path = store.save_bank(CHILD)
    store.write([fitted_profile(ON_CHILD, "new", seed=9, encoder=encoder, bank=CHILD)[1]])
    good = flip(path, os.path.getsize(path) - 100)  # a tensor byte of the child: its content no longer hashes
    engine = engine_on(store, backbone)
    assert engine.bank.fingerprint == BANK.fingerprint
    (old,) = engine.load_profiles(["hard"])
    assert not isinstance(old, ServeError) and engine.profile_info("hard")["served_from_bank"] == BANK.fingerprint
    (new,) = engine.load_profiles(["new"])
    assert new.status == 503 and str(path) in new.detail and "corrupt" in new.detail
    health = engine.health()
    assert health["status"] == "degraded" and any(str(path) in p for p in health["problems"])
    open(path, "wb").write(good)  # restored: read again on the next refresh, then served
    assert engine.banks.refresh()
    assert not isinstance(engine.load_profiles(["new"])[0], ServeError) and engine.health()["status"] == "ok"


def test_xpeft_bank_grow_appends_random_profile_and_bank_members_and_refuses_members_that_do_not_fit(tmp_path, capsys):
    from xpeft.cli import main as cli

    store = ProfileStore(tmp_path / "store")
    store.save_bank(BANK)
    store.write([fitted_profile("single", "sa-1", seed=1)[1]])
    out = tmp_path / "child.safetensors"
    cli(["bank", "grow", BANK.fingerprint[:8], "--store", store.uri, "--random", "3", "--from-profiles", "sa-1",
         "--out", str(out)])  # fmt: skip
    child = load_bank(out)
    assert child.N == N + 4 and child.lineage == ((BANK.fingerprint, N),) and torch.equal(child.A[:, :N], BANK.A)
    assert torch.equal(child.A[:, -1], store.get("sa-1").tensors["lora_A"])  # the profile's adapter, appended last
    assert child.fingerprint in store.bank_fingerprints()  # stored beside its parent
    extra = save_bank(random_bank(L, 2, B, D, seed=3), tmp_path / "extra.safetensors")
    cli(["bank", "grow", "newest", "--store", store.uri, "--from-bank", str(extra)])
    assert Lineages.of(store).the_newest() != child.fingerprint
    grandchild = store.load_bank(Lineages.of(store).the_newest())
    assert grandchild.lineage == ((BANK.fingerprint, N), (child.fingerprint, N + 4))
    wrong = save_bank(random_bank(L, 2, B + 1, D, seed=3), tmp_path / "wrong.safetensors")
    with pytest.raises(SystemExit):
        cli(["bank", "grow", str(out), "--from-bank", str(wrong), "--out", str(tmp_path / "x.safetensors")])
    assert "do not fit" in capsys.readouterr().err


def test_the_growth_benchmark_smoke_run_carries_profiles_over_unchanged_and_refits_them():
    r = run_smoke("bank_growth.py")  # the suite's one smoke run of it (tests/test_benchmarks.py)
    assert_ran(r)
    rows = [line.strip("|").split("|") for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = [
        dict(zip(["N", "profiles", "k", "authors", "accuracy", "f1", "diff"], map(str.strip, x), strict=True))
        for x in rows[1:]
    ]
    assert [(x["profiles"], x["N"]) for x in table] == [
        ("majority", "–"), ("fitted", "2"), ("carried", "4"), ("refitted", "4"), ("carried", "8"), ("refitted", "8")
    ]  # fmt: skip
    assert 0 < float(table[0]["accuracy"]) <= 1  # the floor every row is compared with
    assert {x["k"] for x in table[1:]} <= {"k N/2", "k N/4", "k N/8"}  # chosen on validation data
    for carried in (table[2], table[4]):
        assert float(carried["diff"]) <= 1e-5  # the same predictions from the grown bank
        assert [carried[c] for c in ("accuracy", "f1", "k")] == [table[1][c] for c in ("accuracy", "f1", "k")]
