"""The profile store on an object store: against a real S3 API on loopback (moto's server mode), with the
endpoint in the store's URI. Writes from two processes, lookups, upsert, delete, compaction, banks verified
(a farm run into it: tests/test_farm.py)."""

from __future__ import annotations

import pytest
import torch
from cases import BANK
from moto_s3 import objects, s3  # noqa: F401 - the fixture
from store_helpers import profile, run_two_writers, version_of

from xpeft.profiles.store import ProfileStore


def test_on_s3_a_refit_replaces_a_delete_is_gone_and_compaction_erases_its_bytes(s3):  # noqa: F811
    uri = s3("basic")
    store = ProfileStore(uri)
    store.write([profile(f"p{i}", i) for i in range(10)])
    store.write([profile("p3", 33), profile("q", 1)])
    reader = ProfileStore(uri)
    assert len(reader) == 11 and version_of(reader.get("p3")) == 33 and "nobody" not in reader
    assert store.delete(["p7"]) == 1 and "p7" not in store
    assert (
        reader.refresh() and "p7" not in reader and reader.ids() == sorted(f"p{i}" for i in range(10) if i != 7) + ["q"]
    )
    needle = torch.full((2, 4), 7.0).numpy().tobytes()
    assert any(needle in body for body in objects(s3, "basic/profiles.lance/").values())
    assert store.compact()["bytes_removed"] > 0
    assert not any(needle in body for body in objects(s3, "basic/profiles.lance/").values())
    assert version_of(reader.get("p8")) == 8  # re-pinned after the cleanup


def test_on_s3_banks_heads_and_state_round_trip_and_a_damaged_bank_is_refused_naming_it(s3):  # noqa: F811
    uri = s3("files")
    store = ProfileStore(uri)
    path = store.save_bank(BANK)
    store.save_head("h", {"w": torch.ones(3)})
    store.write_state("farm", {"bank": BANK.fingerprint})
    again = ProfileStore(uri)
    assert again.bank_fingerprints() == [BANK.fingerprint] and again.load_bank(BANK.fingerprint).N == BANK.N
    assert torch.equal(again.load_head("h")["w"], torch.ones(3)) and again.read_state("farm")["bank"]
    key = f"files/banks/{BANK.fingerprint}.safetensors"
    data = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[-100] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    with pytest.raises(ValueError, match=rf"{path} is corrupt"):
        again.load_bank(BANK.fingerprint)


def test_on_s3_two_writer_processes_lose_nothing(s3):  # noqa: F811
    uri = s3("writers")
    written = run_two_writers(uri, 3)
    store = ProfileStore(uri)
    assert [pid for pid in written if pid not in store] == []
    assert len(store) == len(store.ids()) == len(written) + sum(pid.startswith("shared-") for pid in store.ids())
