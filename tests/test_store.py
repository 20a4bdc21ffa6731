"""The profile store on its table engine: upserts replace, deletes erase after compaction, concurrent writers lose
nothing, damage to one part fails only that part, an old store is migrated or refused by name."""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import random
import signal
import time

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cases import BANK, B, L
from safetensors.torch import save as st_save
from store_helpers import flip, part_file, profile, run_two_writers, truncate, version_of

from xpeft.cli import main as cli
from xpeft.core.bank import save_bank
from xpeft.profiles import index
from xpeft.profiles.migrate import migrate
from xpeft.profiles.record import to_row
from xpeft.profiles.store import SCHEMA, TABLE, DamagedPartError, ProfileStore, split_uri
from xpeft.profiles.verify import verify


def test_a_refit_replaces_the_served_version_and_the_previous_stays_readable_until_compaction(tmp_path):
    store = ProfileStore(tmp_path)
    store.write([profile("alice", 1), profile("bob", 1)])
    before = store.table.version()
    store.write([profile("alice", 2)])
    store.write([profile("alice", 9, created=1.0)])  # a late retry of an older fit: the newest still wins
    assert version_of(store.get("alice")) == 2 and len(store) == 2 and store.ids() == ["alice", "bob"]
    old = lance.dataset(f"{store.root}/{TABLE}", version=before).to_table(filter="profile_id = 'alice'")
    assert old.num_rows == 1  # the previous version, in the table's previous version
    store.compact()
    with pytest.raises((OSError, ValueError)):  # its files are gone
        lance.dataset(f"{store.root}/{TABLE}", version=before).to_table()
    assert version_of(ProfileStore(tmp_path).get("alice")) == 2


def test_a_deleted_profile_is_gone_at_once_and_its_bytes_after_compaction(tmp_path):
    store = ProfileStore(tmp_path)
    store.write([profile(f"p{i}", i) for i in range(10)])
    store.write([profile(f"q{i}", 100 + i) for i in range(10)])
    reader = ProfileStore(tmp_path)
    needle = torch.full((2, 4), 107.0).numpy().tobytes()  # q7's LN weight, as stored

    def files_with_needle() -> list[str]:
        return [
            p
            for p in glob.glob(f"{tmp_path}/**/*", recursive=True)
            if os.path.isfile(p) and needle in open(p, "rb").read()
        ]

    assert files_with_needle()
    assert store.delete(["q7", "p3", "never-stored"]) == 2
    assert "q7" not in store and len(store) == 18
    with pytest.raises(KeyError, match="not in the store"):
        store.get("q7")
    assert "q7" in reader  # another reader's view moves when it refreshes
    assert reader.refresh() and "q7" not in reader and len(reader) == 18
    assert files_with_needle()  # still in the old version's files
    result = store.compact()
    assert result["bytes_removed"] > 0 and not result["skipped"]
    assert files_with_needle() == []
    assert version_of(reader.get("q8")) == 108  # the reader's old files were removed: it re-pins and reads


def test_two_writer_processes_racing_to_create_a_store_lose_nothing(tmp_path):
    root = str(tmp_path / "store")  # does not exist: both writers race to create the table
    written = run_two_writers(root, 8, {"small_parts_max": 4})  # and both merge small parts while the other writes
    store = ProfileStore(root)
    assert [pid for pid in written if pid not in store] == []
    assert all(version_of(store.get(pid)) in (1, 2) for pid in written)
    shared = [pid for pid in store.ids() if pid.startswith("shared-")]
    assert len(store) == len(written) + len(shared) == len(store.ids())  # no profile twice
    assert len(store.table.stats()["damaged_parts"]) == 0


def _write_forever(root: str) -> None:
    store = ProfileStore(root)
    for b in range(10_000):
        store.write([profile(f"k{b}-{j}", b) for j in range(8)])


def test_a_killed_writer_leaves_nothing_half_visible(tmp_path):
    root = str(tmp_path)
    ProfileStore(root).write([profile("before", 1)])
    proc = mp.get_context("spawn").Process(target=_write_forever, args=(root,))
    proc.start()
    store = ProfileStore(root)
    deadline = time.time() + 120
    while len(store) < 40 and time.time() < deadline:
        time.sleep(0.05)
        store.refresh()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    store = ProfileStore(root)
    ids = store.ids()
    batches = {pid.split("-")[0] for pid in ids if pid != "before"}
    assert len(ids) >= 40 and len(ids) == len(store)
    assert all(f"{b}-{j}" in store for b in batches for j in range(8))  # whole commits only
    assert all(store.get(pid).profile_id == pid for pid in random.Random(0).sample(ids, 20))
    store.write([profile("after", 2)])
    assert version_of(ProfileStore(root).get("after")) == 2


def _damaged_store(tmp_path) -> tuple[ProfileStore, list[str], list[str], str]:
    """Two parts; the first (covered by the table's id index, as after a create or a compaction) truncated."""
    store = ProfileStore(tmp_path)
    store.write([profile(f"a{i}", i) for i in range(8)])
    store.write([profile(f"b{i}", i) for i in range(8)])
    part = store.locate("a0").part
    path = part_file(store, part)
    truncate(path)
    return ProfileStore(tmp_path), [f"a{i}" for i in range(8)], [f"b{i}" for i in range(8)], path


def test_a_truncated_part_fails_only_its_own_profiles(tmp_path):
    store, bad, good, path = _damaged_store(tmp_path)
    got = store.get_many([good[0], bad[1], "unknown", good[5]])
    assert version_of(got[good[0]]) == 0 and version_of(got[good[5]]) == 5 and got["unknown"] is None
    assert isinstance(got[bad[1]], DamagedPartError) and got[bad[1]].profile_id == bad[1]
    with pytest.raises(DamagedPartError, match=rf"profile 'a2' is stored in part \d+ .*{os.path.basename(path)}"):
        store.get("a2")
    assert "a2" in store and len(store) == 16  # stored, though unreadable: a farm run does not fit it on top
    assert store.ids() == good  # the listing: every readable profile
    assert [d["files"] for d in store.damaged().values()] == [[path]]
    summaries = store.summaries(0, 100)
    assert [s["profile_id"] for s in summaries] == good
    assert store.read_table(["profile_id"]).num_rows == 8
    store.write([profile(good[3], 7), profile("new", 1)])  # writes of other profiles still work
    assert version_of(store.get(good[3])) == 7 and "new" in store
    damaged_part = list(store.damaged())
    store.compact()  # the healthy parts are rewritten, the damaged one is left as it is
    assert list(store.damaged()) == damaged_part and version_of(store.get("new")) == 1
    assert store.table.stats()["parts"] == 2
    assert store.delete(bad) == 8 and not store.damaged() and "a1" not in store  # erasable, then refittable
    store.write([profile("a1", 3)])
    assert version_of(store.get("a1")) == 3


def test_a_flipped_byte_in_a_record_is_refused_as_damaged_never_read_as_other_values(tmp_path):
    store = ProfileStore(tmp_path)
    store.write([profile(f"p{i}", 1 + i) for i in range(4)])
    path = part_file(store, store.locate("p2").part)
    at = open(path, "rb").read().find(torch.full((L, B), 3.0).numpy().tobytes())  # p2's LN weight, as stored
    good = flip(path, at + 8)  # 3.0 becomes 3.0000002: Lance reads it back without a complaint
    reader = ProfileStore(tmp_path)
    with pytest.raises(DamagedPartError, match=rf"part \d+ .*{os.path.basename(path)}.*record of 'p2' is damaged"):
        reader.get("p2")
    got = reader.get_many(["p1", "p2"])
    assert version_of(got["p1"]) == 2 and isinstance(got["p2"], DamagedPartError)  # its neighbours are read
    assert [d["files"] for d in reader.damaged().values()] == [[path]]
    open(path, "wb").write(good)
    assert reader.recheck() and not reader.damaged() and version_of(reader.get("p2")) == 3


def test_the_cli_lists_and_reports_a_damaged_store_and_deletes_and_compacts(tmp_path, capsys):
    store, bad, good, path = _damaged_store(tmp_path)
    cli(["profiles", "list", "--store", str(tmp_path)])
    out, err = capsys.readouterr()
    assert [json.loads(line)["profile_id"] for line in out.splitlines()] == good
    assert "damaged: part" in err and path in err
    with pytest.raises(SystemExit):
        cli(["profiles", "show", "--store", str(tmp_path), "a3"])
    assert "cannot be read" in capsys.readouterr().err
    cli(["profiles", "delete", "--store", str(tmp_path), "b1", "b2", "nobody"])
    assert "deleted 2 of 3" in capsys.readouterr().out
    cli(["profiles", "compact", "--store", str(tmp_path)])
    out, err = capsys.readouterr()
    assert json.loads(out)["bytes_removed"] > 0 and "was left as it is" in err and path in err
    assert ProfileStore(tmp_path).ids() == [g for g in good if g not in ("b1", "b2")]


def test_the_index_follows_random_upserts_deletes_and_compactions(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "FOLD_AT", 30)  # both the overlay and the re-sorting paths
    rng = random.Random(3)
    writer, reader = ProfileStore(tmp_path), ProfileStore(tmp_path)
    model: dict[str, int] = {}
    for step in range(30):
        op = rng.random()
        if op < 0.6:
            ids = list(dict.fromkeys(f"r{rng.randrange(200)}" for _ in range(rng.randint(1, 25))))
            writer.write([profile(i, step) for i in ids])
            model.update(dict.fromkeys(ids, step))
        elif op < 0.85:
            ids = [f"r{rng.randrange(200)}" for _ in range(rng.randint(1, 10))]
            writer.delete(ids)
            for i in ids:
                model.pop(i, None)
        else:
            writer.compact()
        reader.refresh()
        assert len(reader) == len(model) and reader.ids() == sorted(model), step
        for i in rng.sample(sorted(model), min(8, len(model))):
            assert version_of(reader.get(i)) == model[i], (step, i)
        assert all((i in reader) == (i in model) for i in (f"r{rng.randrange(200)}" for _ in range(10)))


HEAD = {"w": torch.arange(6.0).reshape(2, 3)}


def _old_store(root) -> None:
    """A store in the layout before the profile table: Parquet part files, heads/, banks/, farm_state.json."""
    os.makedirs(f"{root}/profiles")
    for n, batch in enumerate([[profile("x", 1, created=10.0), profile("y", 1)], [profile("x", 2, created=20.0)]]):
        # records had no fingerprint then either
        rows = pa.Table.from_pylist([{**to_row(p), "tensors": st_save(p.tensors)} for p in batch], schema=SCHEMA)
        pq.write_table(rows, f"{root}/profiles/part-{n}-abc.parquet", row_group_size=16)
    save_bank(BANK, f"{root}/banks/{BANK.fingerprint}.safetensors")
    os.makedirs(f"{root}/heads")
    open(f"{root}/heads/h.safetensors", "wb").write(st_save(HEAD))  # heads had no fingerprint then
    json.dump({"setting": "mtl", "bank": BANK.fingerprint, "head_id": "h"}, open(f"{root}/farm_state.json", "w"))


def test_an_old_store_is_refused_by_name_and_migrated_with_its_newest_versions(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    _old_store(old)
    with pytest.raises(ValueError, match=r"old layout .* `xpeft profiles migrate "):
        ProfileStore(old)
    cli(["profiles", "migrate", str(old), str(new)])
    report = json.loads(capsys.readouterr().out)
    assert (report["files"], report["rows"], report["profiles"], report["replaced_versions_dropped"]) == (2, 3, 2, 1)
    store = ProfileStore(new)
    assert store.ids() == ["x", "y"] and version_of(store.get("x")) == 2
    assert store.load_bank(BANK.fingerprint).fingerprint == BANK.fingerprint
    assert store.read_state("farm")["head_id"] == "h"
    assert torch.equal(store.load_head("h")["w"], HEAD["w"])  # copied with its fingerprint: verified from now on
    assert verify(store, records=True).records == {"read": 2, "unfingerprinted": 0, "damaged": []}
    with pytest.raises(ValueError, match="not empty"):
        migrate(str(old), str(new))
    with pytest.raises(ValueError, match="already a store in the current layout"):
        migrate(str(new), str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not a profile store"):
        migrate(str(new / "heads"), str(tmp_path / "other"))


def test_a_migration_stops_at_an_unreadable_part_file_or_a_damaged_bank_naming_it(tmp_path):
    old = tmp_path / "old"
    _old_store(old)
    truncate(f"{old}/profiles/part-1-abc.parquet")
    with pytest.raises(ValueError, match="part-1-abc.parquet"):
        migrate(str(old), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # nothing written before everything was checked
    assert migrate(str(old), str(tmp_path / "rest"), skip_unreadable=True).unreadable
    assert version_of(ProfileStore(tmp_path / "rest").get("x")) == 1  # the readable version
    bank = f"{old}/banks/{BANK.fingerprint}.safetensors"
    data = bytearray(open(bank, "rb").read())
    data[-100] ^= 0xFF  # a tensor byte: the metadata stays intact
    open(bank, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=rf"banks/{BANK.fingerprint}.safetensors is corrupt"):
        migrate(str(old), str(tmp_path / "again"), skip_unreadable=True)
    save_bank(BANK, bank)
    truncate(f"{old}/heads/h.safetensors")
    with pytest.raises(ValueError, match=r"shared head .*heads/h.safetensors is damaged"):
        migrate(str(old), str(tmp_path / "again"), skip_unreadable=True)
    assert not (tmp_path / "again").exists()


def test_store_uris_carry_object_store_options_and_refuse_unknown_ones(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    root, opts = split_uri("s3://bucket/store?endpoint=http://127.0.0.1:9000&region=us-east-1")
    assert root == "s3://bucket/store" and opts == {"endpoint": "http://127.0.0.1:9000", "region": "us-east-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert split_uri("s3://bucket/store")[1]["endpoint"] == "http://minio:9000"
    with pytest.raises(ValueError, match="unknown store option"):
        split_uri("s3://bucket/store?secret=x")
