"""The profile farm on a local Ray with a tiny model: every profile stored once, whatever dies or reruns."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time

import pyarrow as pa
import pytest
import ray  # noqa: F401 - a pinned dependency: a broken install fails here, not as skips
import torch
from moto_s3 import s3  # noqa: F401 - the fixture: an S3 API on loopback

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.data.dataset import profile_datas

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOPICS = {0: "politics vote election", 1: "sports game team", 2: "food recipe trip", 3: "music art culture"}


def profile_table(n_profiles: int = 22, per_profile: int = 12, seed: int = 0) -> pa.Table:
    """Synthetic authors whose category is learnable from the words."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_profiles):
        for _ in range(per_profile + p % 5):
            label = rng.choice(list(TOPICS)[: 2 + p % 3])
            words = TOPICS[label].split() + rng.sample(["the", "a", "new", "old", "big", "small"], 3)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label, "profile_id": f"author-{p:02d}"})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def actors(local_ray):
    """The module's farm actors, kept from run to run as one driver's runs keep them (`WarmActors`): each test's
    runs reconfigure the actors the tests before it started, so every run here also checks that a kept actor fits
    for its next run as a new one would."""
    from xpeft.ray.pool import WarmActors

    with WarmActors() as kept:
        yield kept


def farm_config(store, backbone, **kw):
    from xpeft.ray.farm import FarmConfig

    base = dict(
        store=str(store),
        xpeft=XPeftConfig(N=256, k=8, b=32, head="linear", num_labels=4),
        train=TrainConfig(lr=1e-2, mask_lr=1e-1, ln_lr=1e-1, epochs=3, batch_size=8),
        backbone=backbone,
        num_actors=2,
        progress=False,
        flush_every=4,
    )
    base.update(kw)
    return FarmConfig(**base)


def stored_rows(store_uri) -> list[str]:
    from xpeft.profiles.store import ProfileStore

    return ProfileStore(store_uri).read_table(columns=["profile_id"])["profile_id"].to_pylist()


def test_farm_fits_one_valid_row_per_profile_and_resumes(actors, backbone, tmp_path):
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import run_farm

    datas = profile_datas(profile_table()).profiles
    cfg = farm_config(tmp_path / "store", backbone)
    report = run_farm(cfg, datas, actors)
    assert len(report.fitted) == 22 and not report.failed and not report.rejected
    rows = stored_rows(cfg.store)
    assert sorted(rows) == sorted(d.profile_id for d in datas)  # one row each
    store = ProfileStore(cfg.store)
    p = store.get("author-03")
    assert p.config.mode == "x_peft" and len(p.mask_bits) == 2 * 32 * 2  # 2·⌈256/8⌉·L, L=2
    assert p.bank_fingerprint == report.bank["fingerprint"]
    assert 0.0 <= p.metrics["accuracy"] <= 1.0 and p.metrics["n_test"] > 0
    assert p.metrics["accuracy"] == report.fitted["author-03"]["accuracy"]  # the store keeps the holdout metrics

    # the bank is in the object store once, however many actors read it, and read zero-copy
    bank_mib = report.bank["nbytes"] / 2**20
    assert report.memory["object_store"]["objects"] == 1
    assert abs(report.memory["object_store"]["plasma_mib"] - bank_mib) <= 1
    assert report.memory["bank_zero_copy"] is True

    again = run_farm(cfg, datas, actors)  # resume: everything is already stored
    assert not again.fitted and sorted(again.skipped) == sorted(rows)
    assert sorted(stored_rows(cfg.store)) == sorted(rows)


def test_a_killed_actor_loses_no_profile(actors, backbone, tmp_path):
    """SIGKILL one actor's process mid-run: its profile is retried elsewhere; every profile stored once."""
    import signal

    from xpeft.ray.farm import run_farm

    datas = profile_datas(profile_table(per_profile=20)).profiles
    cfg = farm_config(tmp_path / "store", backbone, train=TrainConfig(lr=1e-2, epochs=8, batch_size=4))
    killed: list[int] = []

    def kill_one_actor():
        from ray.util import state  # noqa: F401  (state API needs the dashboard; use the process table)

        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in _actor_pids():
                if len(stored_rows(cfg.store)) >= 2:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.2)

    t = threading.Thread(target=kill_one_actor, daemon=True)
    t.start()
    report = run_farm(cfg, datas, actors)
    t.join(5)
    assert killed, "the test never found an actor to kill"
    assert report.retries >= 1
    rows = stored_rows(cfg.store)
    assert sorted(rows) == sorted(d.profile_id for d in datas) and len(rows) == len(set(rows))


def _actor_pids() -> list[int]:
    """Processes of this test's live ProfileWorker actors: Ray names the process after the actor class, and
    ours descend from this process (its embedded raylet), not from another Ray on the machine."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="ignore")
        except OSError:
            continue
        if "ray::ProfileWorker" in cmd and _descends_from(int(pid), os.getpid()):
            pids.append(int(pid))
    return pids


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def test_bad_rows_are_refused_before_the_run_or_left_out_and_small_profiles_rejected(actors, backbone, tmp_path):
    from xpeft.data.labels import BadDataSet
    from xpeft.ray.farm import run_farm

    good = profile_table(n_profiles=4).to_pylist()
    bad = [
        {"text": "politics vote", "label": 0, "profile_id": "lonely"},  # one example: too few to fit
        {"text": "", "label": 1, "profile_id": "blank"},
        {"text": "  ", "label": 1, "profile_id": "blank"},
        {"text": "sports game", "label": 1, "profile_id": "blank"},
        *[{"text": "food trip", "label": 99, "profile_id": "newlabel"} for _ in range(4)],  # a class of its own
        {"text": "x", "label": 0, "profile_id": "../escape"},
    ]
    table = pa.Table.from_pylist(good + bad)
    with pytest.raises(BadDataSet, match=r"empty text: 2 row\(s\).*invalid profile id: 1 row\(s\)"):
        profile_datas(table)
    dataset = profile_datas(table, drop_invalid=True)
    assert dataset.dropped == {"empty text": 2, "invalid profile id": 1}
    assert dataset.labels.values == (0, 1, 2, 3, 99)  # every label of the data is a class
    cfg = farm_config(tmp_path / "store", backbone)
    cfg.xpeft = XPeftConfig(N=256, k=8, b=32, head="linear", num_labels=dataset.labels.num_labels)
    report = run_farm(cfg, dataset.profiles, actors)
    assert set(report.fitted) == {f"author-{i:02d}" for i in range(4)} | {"newlabel"}
    assert set(report.rejected) == {"lonely", "blank"}  # blank has one usable row left
    assert "needs >= 2" in report.rejected["lonely"]


def test_a_hard_k_the_learned_bank_cannot_hold_is_refused_before_any_fit(actors, backbone, tmp_path):
    from xpeft.ray.farm import run_farm

    datas = profile_datas(profile_table(n_profiles=8)).profiles
    cfg = farm_config(tmp_path / "store", backbone, setting="mtl", warm_start=3, xpeft=XPeftConfig(N=8, k=4, b=32))
    with pytest.raises(ValueError, match="bank of N=3 adapters .* 1 <= k < N; got k=4, N=3"):
        run_farm(cfg, datas, actors)
    assert not stored_rows(cfg.store)


@pytest.mark.parametrize("setting", ["sa", "mtl"])
def test_warm_start_learns_the_bank_and_the_profiles_fit_distinct_proper_subsets(actors, backbone, tmp_path, setting):
    """k left unset: the learned bank has N = the warm start (10 here, far below the paper's k = 50) and each
    hard mask picks half of it, k = 5 < N, so the fitted masks differ from profile to profile (>= 90 % distinct;
    with k = N they were all the same)."""
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import run_farm
    from xpeft.ray.report import mask_diversity

    datas = profile_datas(profile_table(n_profiles=20)).profiles
    cfg = farm_config(
        tmp_path / "store",
        backbone,
        setting=setting,
        warm_start=10,
        xpeft=XPeftConfig(b=32, head="linear", num_labels=4),
    )
    report = run_farm(cfg, datas, actors)
    assert report.bank["source"] == ("single_adapter" if setting == "sa" else "mtl")
    assert int(report.bank["N"]) == 10 and report.masks["k"] == 5 and "half of N=10" in report.masks["why"]
    store = ProfileStore(cfg.store)
    x = [store.get(p) for p in report.fitted if store.get(p).config.mode == "x_peft"]
    assert len(x) == 10 and all((p.config.N, p.config.k) == (10, 5) for p in x)
    diversity = mask_diversity(x, 10, 2)
    assert diversity["distinct"] >= 9 and diversity["warning"] is None, diversity
    if setting == "mtl":  # new profiles reuse the shared head untouched: no head stored per profile
        assert all(p.head_id and not any(n.startswith("head.") for n in p.tensors) for p in x)
        assert report.warm_start["profiles"] == 10
        assert_mtl_warm_profiles_are_served_by_their_bank_member(cfg, datas, report, backbone)
    else:
        assert len(report.fitted) == 20  # 10 single_adapter profiles + 10 x_peft


def assert_mtl_warm_profiles_are_served_by_their_bank_member(cfg, datas, report, backbone):
    """Every profile of an mtl run is stored, the warm-start ones too: as one-hot (k = 1) X-PEFT profiles over
    their own adapter in the learned bank, which score on their holdout what the joint training scored."""
    from xpeft.core.encoder import load_encoder, load_tokenizer
    from xpeft.core.masks import mask_bytes
    from xpeft.core.model import XPeftModel
    from xpeft.data.tokens import tokenize
    from xpeft.fit.loop import evaluate, profile_metric_fn
    from xpeft.profiles.record import apply_profile, stored_mask_weights
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import split_warm

    store = ProfileStore(cfg.store)
    assert sorted(store.ids()) == sorted(d.profile_id for d in datas)
    warm, _ = split_warm(cfg, datas)
    bank = store.load_bank(report.bank["fingerprint"])
    tokenizer = load_tokenizer(backbone)
    for member, d in enumerate(warm):
        p = store.get(d.profile_id)
        assert (p.config.mode, p.config.mask_type, p.config.k, p.config.layer_norm) == ("x_peft", "hard", 1, False)
        assert p.tensors == {} and p.record_bytes == 2 * mask_bytes(bank.N, bank.L)  # bits only: no head, no LN
        wA, wB = stored_mask_weights(p, bank.N, bank.L)
        assert (wA.argmax(-1) == member).all() and (wB.argmax(-1) == member).all() and wB.sum() == bank.L
        model = XPeftModel(load_encoder(backbone), p.config, bank)
        apply_profile(model, p, store.load_head(p.head_id))
        rows = tokenize(d.test, tokenizer, 64)
        scored = evaluate(model, rows, profile_metric_fn(model), 8, tokenizer.pad_token_id)
        assert scored == pytest.approx(report.warm_start["metrics"][d.profile_id])


def test_a_farm_run_into_s3_stores_every_profile_and_a_rerun_skips_them(actors, backbone, s3):  # noqa: F811
    """The store on an S3 API (moto's server on loopback, the endpoint in the store's URI)."""
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import run_farm

    datas = profile_datas(profile_table(n_profiles=4)).profiles
    cfg = farm_config(s3("farm"), backbone, train=TrainConfig(lr=1e-2, epochs=1, batch_size=8))
    report = run_farm(cfg, datas, actors)
    assert len(report.fitted) == 4 and not report.failed
    store = ProfileStore(cfg.store)
    assert store.ids() == sorted(d.profile_id for d in datas)
    assert store.get("author-01").bank_fingerprint == report.bank["fingerprint"] == store.bank_fingerprints()[0]
    again = run_farm(cfg, datas, actors)
    assert not again.fitted and sorted(again.skipped) == store.ids()


def test_the_farm_fits_new_profiles_on_the_newest_grown_bank_unless_pinned_and_refits_older_ones_resumably(
    actors, backbone, tmp_path
):
    from xpeft.core.bank import grow_bank, random_bank
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import Farm, run_farm

    datas = profile_datas(profile_table(n_profiles=4, per_profile=8)).profiles
    small = dict(xpeft=XPeftConfig(N=16, k=4, b=8, head="linear", num_labels=4), train=TrainConfig(epochs=1))
    cfg = farm_config(tmp_path / "store", backbone, num_actors=1, **small)
    parent = run_farm(cfg, datas[:1], actors).bank["fingerprint"]
    store = ProfileStore(cfg.store)
    bank = store.load_bank(parent)
    child = grow_bank(bank, random_bank(bank.L, 8, bank.b, bank.d_in, bank.d_out, seed=5, target=bank.target))
    store.save_bank(child)
    assert run_farm(cfg, datas[1:2], actors).bank["fingerprint"] == child.fingerprint  # the newest by default
    new = ProfileStore(cfg.store).get(datas[1].profile_id)
    assert new.bank_fingerprint == child.fingerprint and new.config.N == 24
    pinned = farm_config(tmp_path / "store", backbone, num_actors=1, bank_fingerprint=parent[:10], **small)
    run_farm(pinned, datas[2:3], actors)
    assert ProfileStore(cfg.store).get(datas[2].profile_id).bank_fingerprint == parent
    # refit the profiles older than the child onto it (the newest), resumably
    refit = dataclasses.replace(cfg, refit_older_than=child.fingerprint[:10])
    assert sorted(run_farm(refit, datas[:3], actors).fitted) == sorted([datas[0].profile_id, datas[2].profile_id])
    moved = ProfileStore(cfg.store)
    assert {moved.get(d.profile_id).bank_fingerprint for d in datas[:3]} == {child.fingerprint}
    assert not run_farm(refit, datas[:3], actors).fitted  # none is older than the child now
    by_id = dataclasses.replace(cfg, refit=[datas[0].profile_id, datas[2].profile_id])
    again = run_farm(by_id, datas[:3], actors)  # resumed: both are on the child already
    assert not again.fitted and sorted(again.skipped) == sorted(by_id.refit)
    path = farm_config(tmp_path / "store", backbone, bank_fingerprint=str(tmp_path / "b.safetensors"), **small)
    with pytest.raises(ValueError, match="--bank-path"):
        Farm(path, []).bank()


def test_a_drivers_next_run_fits_on_the_actors_it_kept_as_new_ones_would_and_a_run_stops_its_own(
    actors, backbone, tmp_path
):
    """`run_farm(..., actors)` keeps the run's actors for the driver's next run, which reconfigures them with its
    bank instead of starting processes; what they fit equals what new actors fit. Without `actors`, a run stops
    its actors when it ends (idle, they would hold the CPUs they reserved)."""
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.farm import run_farm

    datas = profile_datas(profile_table(n_profiles=4)).profiles
    small = dict(train=TrainConfig(epochs=1, batch_size=8))
    first = run_farm(farm_config(tmp_path / "a", backbone, bank_seed=1, **small), datas, actors)
    kept = set(_actor_pids())
    assert len(kept) == first.actors == 2
    second = run_farm(farm_config(tmp_path / "b", backbone, **small), datas, actors)  # another bank
    assert len(second.fitted) == 4 and set(_actor_pids()) == kept  # fitted by the same two processes
    assert second.bank["fingerprint"] != first.bank["fingerprint"]
    actors.close()
    assert gone(kept)
    fresh = run_farm(farm_config(tmp_path / "c", backbone, **small), datas)  # its own actors
    assert fresh.actors == 2 and fresh.bank["fingerprint"] == second.bank["fingerprint"]
    assert gone(set(_actor_pids()))  # stopped at its end
    b, c = ProfileStore(str(tmp_path / "b")), ProfileStore(str(tmp_path / "c"))
    for d in datas:
        pb, pc = b.get(d.profile_id), c.get(d.profile_id)
        assert pb.mask_bits == pc.mask_bits and pb.metrics["accuracy"] == pc.metrics["accuracy"]
        for name, value in pb.tensors.items():
            assert torch.equal(value, pc.tensors[name]), name


def gone(pids: set[int], timeout_s: float = 30.0) -> bool:
    """Whether every process of `pids` has exited within the timeout (ray.kill returns before it does)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not pids & set(_actor_pids()):
            return True
        time.sleep(0.2)
    return False
