"""A replica keeps up with its store: a refit profile is served in its new version and a deleted one is a 404
within the staleness bound, an unknown id is a 404 from the index alone, a damaged part fails only its own
profiles (and /healthz says degraded), a damaged bank is refused naming the file. Engine level, no Ray."""

from __future__ import annotations

import time

import pytest
import torch
from cases import BANK, fitted_profile
from store_helpers import part_file, truncate

from xpeft.core.encoder import load_encoder
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


def eventually(condition, hang_guard_s: float = 60.0) -> None:
    """Wait for `condition`; the guard only keeps a broken refresher from hanging the suite (not a time claim)."""
    deadline = time.monotonic() + hang_guard_s
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.02)


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


def test_a_damaged_part_fails_only_its_profiles_and_the_replica_says_degraded(tmp_path, backbone, encoder):
    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    store.write([hard(f"a{i}", i, encoder) for i in range(3)])  # part 0: covered by the table's id index
    store.write([hard(f"b{i}", 10 + i, encoder) for i in range(3)])
    path = part_file(store, store.locate("a0").part)
    truncate(path)
    engine = engine_on(tmp_path, backbone)
    got = engine.load_profiles(["b0", "a1", "nobody", "b2"])
    assert got[0].profile_id == "b0" and got[3].profile_id == "b2"  # the rest of the batch is served
    assert got[1].status == 503 and "'a1'" in got[1].detail and path in got[1].detail
    assert got[2].status == 404
    health = engine.health()
    assert health["status"] == "degraded" and path in health["problems"][0] and health["store_profiles"] == 6
    page = engine.profile_page(0, 10)  # the listing works: every readable profile
    assert [p["profile_id"] for p in page["profiles"]] == ["b0", "b1", "b2"] and page["total"] == 6


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
