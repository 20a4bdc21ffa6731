"""A replica keeps up with its store: a refit profile is served in its new version and a deleted one is a 404
within the staleness bound, an unknown id is a 404 from the index alone, a damaged part fails only its own
profiles (and /healthz says degraded), whether or not the id index covers it (damage is never absence), a
damaged bank or shared head is refused naming the file, damage found at run time turns /healthz degraded and
a repair turns it back. Engine level (and the in-process HTTP app), no Ray."""

from __future__ import annotations

import pytest
import torch
from cases import BANK, BY_NAME, SHARED_HEAD_ID, fitted_profile, store_cases
from conftest import eventually
from store_helpers import flip, part_file, truncate

from xpeft.core.encoder import load_encoder
from xpeft.profiles import writes
from xpeft.profiles.store import ProfileStore
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine

STALENESS = 0.3


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def encoder(backbone):
    return load_encoder(backbone)


def hard(pid: str, seed: int, encoder):
    return fitted_profile("hard", pid, seed=seed, encoder=encoder)[1]


def engine_on(root, backbone, **kwargs) -> ProfileEngine:
    cfg = ServeConfig(store=str(root), backbone=backbone, torch_threads=1, staleness_s=STALENESS, **kwargs)
    return ProfileEngine(cfg)


def test_a_refit_is_served_with_its_new_scores_and_a_delete_is_a_404_after_the_next_refresh(
    tmp_path, backbone, encoder
):
    """The staleness bound is one refresh: the replica's refresher runs one every staleness_s, and a refresh is
    all a refit or a delete needs to be served as such. Checked by refreshing by hand, then by the refresher."""
    writer = ProfileStore(tmp_path)
    writer.save_bank(BANK)
    writer.write([hard("alice", 1, encoder), hard("bob", 2, encoder), hard("carol", 4, encoder)])
    engine = engine_on(tmp_path, backbone)
    (before,) = engine.load_profiles(["alice"])
    refit = hard("alice", 3, encoder)
    writer.write([refit])
    engine.view.refresh()
    (after,) = engine.load_profiles(["alice"])
    assert not torch.equal(before.ln_weight, refit.tensors["ln_weight"])
    assert torch.equal(after.ln_weight, refit.tensors["ln_weight"])
    assert engine.profile_info("alice")["metrics"] == refit.metrics  # the listing shows what is served
    writer.delete(["bob"])
    engine.view.refresh()
    assert engine.load_profiles(["bob"])[0].status == 404
    assert engine.health()["store_profiles"] == 2 and engine.health()["status"] == "ok"
    engine.start()  # and the refresher does the same by itself
    try:
        writer.delete(["carol"])
        eventually(lambda: getattr(engine.load_profiles(["carol"])[0], "status", None) == 404)
    finally:
        engine.close()


def test_an_unknown_id_is_a_404_from_the_index_without_reading_the_store(tmp_path, backbone, encoder):
    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    store.write([hard(f"p{i}", i, encoder) for i in range(4)])
    engine = engine_on(tmp_path, backbone)
    for i in range(200):
        (refused,) = engine.load_profiles([f"nobody-{i}"])
        assert refused.status == 404 and "not in the store" in refused.detail
    assert engine.view.store_reads == 0  # what it costs (microseconds): benchmarks/store_scale.py, unknown p99


def test_a_damaged_part_fails_only_its_profiles_and_the_replica_says_degraded_until_it_is_restored(
    tmp_path, backbone, encoder
):
    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    store.write([hard(f"a{i}", i, encoder) for i in range(3)])  # part 0: covered by the table's id index
    store.write([hard(f"b{i}", 10 + i, encoder) for i in range(3)])
    path = part_file(store, store.locate("a0").part)
    good = open(path, "rb").read()
    truncate(path)
    engine = engine_on(tmp_path, backbone)
    got = engine.load_profiles(["b0", "a1", "nobody", "b2"])
    assert got[0].profile_id == "b0" and got[3].profile_id == "b2"  # the rest of the batch is served
    assert got[1].status == 503 and "'a1'" in got[1].detail and path in got[1].detail
    assert got[2].status == 404
    health = engine.health()
    assert health["status"] == "degraded" and path in health["problems"][0] and health["store_profiles"] == 6
    page = engine.profile_page(0, 10)  # the listing works: every readable profile; its total is what it lists
    assert [p["profile_id"] for p in page["profiles"]] == ["b0", "b1", "b2"] and page["total"] == 3
    assert [(u["files"], u["profiles"]) for u in page["unreadable_parts"]] == [([path], 3)]  # and what it cannot
    open(path, "wb").write(good)
    engine.view.refresh()  # what the refresher does every staleness_s (this engine was not started)
    assert engine.view.recheck()
    assert engine.health()["status"] == "ok", engine.health()["problems"]
    assert engine.load_profiles(["a1"])[0].profile_id == "a1"
    assert engine.profile_page(0, 10)["total"] == 6


def test_a_damaged_bank_is_refused_naming_the_file_by_the_server_the_cli_and_the_farm(tmp_path, backbone, capsys):
    from xpeft.cli import main as cli
    from xpeft.config import XPeftConfig
    from xpeft.ray.farm import Farm, FarmConfig

    store = ProfileStore(tmp_path)
    path = store.save_bank(BANK)
    store.save_head("h", {"w": torch.zeros(2)})
    store.write_state("farm", {"setting": "mtl", "bank": BANK.fingerprint, "head_id": "h"})
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF  # a tensor byte; the metadata (and its fingerprint) stay intact
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=rf"{path} is corrupt"):
        engine_on(tmp_path, backbone)
    with pytest.raises(SystemExit):
        cli(["serve", "--store", str(tmp_path), "--backbone", backbone])
    assert f"{path} is corrupt" in capsys.readouterr().err
    farm = Farm(FarmConfig(store=str(tmp_path), setting="mtl"), [])
    with pytest.raises(ValueError, match=rf"{path} is corrupt"):
        farm.mtl_bank([], XPeftConfig())


def test_a_server_keeps_one_refresher_and_one_preload_however_often_its_engine_is_started(tmp_path, backbone):
    """A replica (LocalServer, which the Serve deployment extends) starts its engine once: a second start()
    adds no second refresher or preload thread reading the store."""
    import threading

    from xpeft.serve.local import LocalServer

    store = ProfileStore(tmp_path)
    store.save_bank(BANK)

    before = set(threading.enumerate())
    server = LocalServer(ServeConfig(store=str(tmp_path), backbone=backbone, torch_threads=1, preload=True))
    server.engine.start()
    started = sorted(t.name for t in set(threading.enumerate()) - before if t.name.startswith("xpeft-"))
    server.engine.close()
    assert started in (["xpeft-preload", "xpeft-store-refresh"], ["xpeft-store-refresh"]), started


def test_a_flipped_byte_in_a_shared_head_refuses_exactly_its_profiles_as_damaged_until_it_is_restored(
    tmp_path, backbone, encoder
):
    store = ProfileStore(tmp_path)
    ids = ["hard", "mtl-a", "mtl-b", "head-only"]
    store_cases(store, encoder, [BY_NAME[c] for c in ids])
    path = f"{store.root}/heads/{SHARED_HEAD_ID}.safetensors"
    good = flip(path, -4)  # a weight's lowest bit: the same size, every value finite
    engine = engine_on(tmp_path, backbone)
    got = dict(zip(ids, engine.load_profiles(ids), strict=True))
    assert {pid for pid, g in got.items() if getattr(g, "status", 200) == 503} == {"mtl-a", "mtl-b"}
    assert f"shared head {path} is damaged" in got["mtl-a"].detail
    assert got["hard"].profile_id == "hard" and got["head-only"].profile_id == "head-only"  # the others: served
    health = engine.health()
    assert health["status"] == "degraded" and any(path in p for p in health["problems"]), health["problems"]
    assert engine.profile_info("mtl-b")["servable"] is False
    open(path, "wb").write(good)
    engine.view.refresh()  # what the refresher does every staleness_s (this engine was not started)
    assert engine.view.recheck() and engine.health()["status"] == "ok", engine.health()["problems"]
    assert engine.load_profiles(["mtl-a"])[0].profile_id == "mtl-a"


def test_the_farm_refuses_a_damaged_head_and_an_unfingerprinted_one_until_it_is_verified(tmp_path, capsys):
    from safetensors.torch import save as st_save

    from xpeft.cli import main as cli
    from xpeft.config import XPeftConfig
    from xpeft.ray.farm import Farm, FarmConfig

    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    head = {"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.zeros(3)}
    store.save_head("h", head)
    store.write_state("farm", {"setting": "mtl", "bank": BANK.fingerprint, "head_id": "h"})
    path = f"{store.root}/heads/h.safetensors"
    flip(path, -4)
    farm = Farm(FarmConfig(store=str(tmp_path), setting="mtl"), [])
    with pytest.raises(ValueError, match=rf"shared head {path} is damaged"):
        farm.mtl_bank([], XPeftConfig())
    with pytest.raises(SystemExit):  # verify reports it, and never fingerprints a damaged head as it is
        cli(["profiles", "verify", "--store", str(tmp_path), "--fingerprint-heads"])
    assert path in capsys.readouterr().err
    open(path, "wb").write(st_save(head))  # as xpeft wrote heads before they were fingerprinted
    with pytest.raises(
        ValueError, match=r"has no fingerprint .* `xpeft profiles verify --store .* --fingerprint-heads`"
    ):
        farm.mtl_bank([], XPeftConfig())
    cli(["profiles", "verify", "--store", str(tmp_path), "--fingerprint-heads"])
    assert "fingerprinted: h" in capsys.readouterr().out
    assert farm.mtl_bank([], XPeftConfig()).fingerprint == BANK.fingerprint
    assert torch.equal(farm.shared_head["classifier.weight"], head["classifier.weight"])


def test_a_truncated_unindexed_part_answers_503_for_its_profiles_and_the_listing_names_it_as_damaged(
    tmp_path, backbone, encoder, monkeypatch
):
    from xpeft.profiles.damage import indexed_parts

    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    store.write([hard(f"a{i}", i, encoder) for i in range(3)])
    store.write([hard(f"b{i}", 10 + i, encoder) for i in range(3)])
    assert store.locate("b0").part in indexed_parts(store.table._dataset())  # indexed as the write landed
    with monkeypatch.context() as m:  # a writer that died between its commit and the index's
        m.setattr(writes, "update_index", lambda *_, **__: None)
        store.write([hard(f"c{i}", 20 + i, encoder) for i in range(3)])
    indexed, unindexed = part_file(store, store.locate("b0").part), part_file(store, store.locate("c0").part)
    truncate(indexed)
    truncate(unindexed)
    engine = engine_on(tmp_path, backbone)
    ids = ["a0", "b1", "c1", "nobody"]
    got = dict(zip(ids, engine.load_profiles(ids), strict=True))
    assert got["a0"].profile_id == "a0"
    assert got["b1"].status == 503 and "'b1' is stored in" in got["b1"].detail and indexed in got["b1"].detail
    for pid in ("c1", "nobody"):  # in no readable part, and the unindexed part may hold it: damage, not a 404
        assert got[pid].status == 503 and "may hold it" in got[pid].detail and unindexed in got[pid].detail
    page = engine.profile_page(0, 50)
    assert page["total"] == len(page["profiles"]) == 3 and not page["unreadable"]
    assert sorted((u["files"][0], u["profiles"]) for u in page["unreadable_parts"]) == sorted(
        [(indexed, 3), (unindexed, 3)]
    )
    health = engine.health()
    assert health["status"] == "degraded" and any(unindexed in p and "not indexed" in p for p in health["problems"])


def test_damage_found_at_run_time_turns_healthz_degraded_and_a_repair_turns_it_back_to_ok(tmp_path, backbone, encoder):
    from fastapi.testclient import TestClient

    from xpeft.serve.api import make_api
    from xpeft.serve.local import LocalServer

    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    store.write([hard("x", 1, encoder), hard("y", 2, encoder)])
    store.write([hard("z", 3, encoder)])
    cfg = ServeConfig(
        store=str(tmp_path), backbone=backbone, torch_threads=1, staleness_s=STALENESS, preload=False, record_cache_mb=0
    )
    server = LocalServer(cfg)  # its refresher reads what is damaged again every staleness_s
    try:
        client = TestClient(make_api(server))
        assert client.get("/healthz").json()["status"] == "ok"
        path = part_file(store, store.locate("x").part)
        good = open(path, "rb").read()
        truncate(path)  # while the replica runs: its index read the part's ids before
        r = client.post("/v1/classify", json={"profile_id": "x", "texts": ["hello there"]})
        assert r.status_code == 503 and path in r.json()["detail"], r.text
        assert client.post("/v1/classify", json={"profile_id": "z", "texts": ["hello"]}).status_code == 200
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and path in health["problems"][0], health
        page = client.get("/v1/profiles").json()
        assert page["total"] == 3 and {u["profile_id"] for u in page["unreadable"]} == {"x", "y"}
        open(path, "wb").write(good)
        eventually(lambda: client.get("/healthz").json()["status"] == "ok")
        assert client.post("/v1/classify", json={"profile_id": "x", "texts": ["hello there"]}).status_code == 200
    finally:
        server.engine.close()
