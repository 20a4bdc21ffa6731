"""Scoring a table of texts with Ray Data: every row scored by its own profile as the in-process model scores
it, rows of many profiles mixed in one forward, and a row that cannot be scored (unknown or unservable
profile, empty text) written with its reason, never failing the job."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cases import BANK, BY_NAME, B, D, L, N, store_cases

from xpeft.core.bank import random_bank
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import XPeftModel
from xpeft.data.tokens import Collator, tokenize
from xpeft.profiles.record import apply_profile
from xpeft.profiles.store import ProfileStore
from xpeft.serve.batch import OUTPUT, BatchConfig, check_columns, check_pool, score_table
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine

SCORED = ["hard", "soft", "hard-no-ln", "single-alpha", "head-only", "pooler", "regress", "mtl-a", "mtl-b"]
WORDS = "the a good bad great awful movie film story plot news politics sports music vote election".split()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> ProfileStore:
    store = ProfileStore(tmp_path_factory.mktemp("store"))
    store_cases(store, load_encoder(backbone), [BY_NAME[name] for name in SCORED], random_bank(L, N, B, D, seed=8))
    return store


def texts_table(n: int = 300, seed: int = 0) -> pa.Table:
    """n rows over the stored profiles, one unknown profile, one of another bank, an empty text, no text, no id."""
    rng = random.Random(seed)
    ids = [*SCORED, "nope", "other-bank"]
    rows = [
        {
            "id": i,
            "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 14))),
            "text_pair": " ".join(rng.choices(WORDS, k=3)) if i % 5 == 0 else None,
            "profile_id": rng.choice(ids),
        }
        for i in range(n)
    ]
    rows[3]["text"], rows[4]["profile_id"], rows[5]["text"] = "  ", None, None
    return pa.Table.from_pylist(rows)


def engine_for(store: ProfileStore, backbone: str, **kwargs) -> ProfileEngine:
    return ProfileEngine(ServeConfig(store=store.uri, backbone=backbone, torch_threads=1, **kwargs))


def in_process_logits(store: ProfileStore, backbone: str, profile_id: str, texts, pairs) -> torch.Tensor:
    """The profile applied to an XPeftModel, one text at a time (no batching, no padding)."""
    profile = store.get(profile_id)
    model = XPeftModel(load_encoder(backbone), profile.config, BANK if profile.config.mode == "x_peft" else None)
    apply_profile(model, profile, store.load_head(profile.head_id) if profile.head_id else None)
    tokenizer = load_tokenizer(backbone)
    rows = tokenize([{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)], tokenizer, 128)
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        return torch.cat([model.eval()(**collate([r]))["logits"] for r in rows])


def assert_scored_as_in_process(scored: pa.Table, store: ProfileStore, backbone: str) -> None:
    rows = scored.to_pylist()
    for pid in SCORED:
        mine = [r for r in rows if r["profile_id"] == pid and r["error"] is None]
        assert mine, f"no row of {pid} was scored"
        logits = in_process_logits(store, backbone, pid, [r["text"] for r in mine], [r["text_pair"] for r in mine])
        created = store.get(pid).created
        for r, z in zip(mine, logits, strict=True):
            assert r["profile_created"] == created
            if BY_NAME[pid].config.get("problem_type") == "regression":
                assert r["label"] is None and r["probabilities"] is None and abs(r["value"] - float(z[0])) < 1e-5
                continue
            probs = torch.softmax(z, -1)
            assert torch.allclose(torch.tensor(r["probabilities"]), probs, atol=1e-5), (pid, r["id"])
            assert r["label"] == int(probs.argmax()) and r["value"] is None
    assert {r["label_name"] for r in rows if r["profile_id"] == "hard" and r["error"] is None} <= {"neg", "neu", "pos"}


def assert_bad_rows_carry_their_error(scored: pa.Table) -> None:
    rows = {r["id"]: r for r in scored.to_pylist()}
    assert (rows[3]["error"], rows[4]["error"], rows[5]["error"]) == ("an empty text", "no profile_id", "no text")
    for r in rows.values():
        if r["profile_id"] == "nope":
            assert "profile 'nope' is not in the store" in r["error"] and r["label"] is None
        elif r["profile_id"] == "other-bank":
            assert "fitted on bank" in r["error"] and r["probabilities"] is None
        elif r["id"] not in (3, 4, 5):
            assert r["error"] is None, r


def test_a_scored_table_equals_the_in_process_model_row_by_row(store, backbone):
    table = texts_table()
    engine = engine_for(store, backbone, max_batch_size=16)
    scored = score_table(engine, table)
    assert scored.schema.names == [*table.schema.names, *OUTPUT.names] and scored.num_rows == table.num_rows
    assert scored.column("id").to_pylist() == table.column("id").to_pylist()  # rows keep their order
    assert_scored_as_in_process(scored, store, backbone)
    assert_bad_rows_carry_their_error(scored)
    assert engine.stats["max_profiles_in_batch"] >= 5  # rows of many profiles shared a forward


def test_a_table_without_text_or_profile_id_or_with_an_output_column_is_refused():
    with pytest.raises(ValueError, match=r"lacks \['profile_id'\]"):
        check_columns(["id", "text"])
    with pytest.raises(ValueError, match=r"already has columns \['label'\]"):
        check_columns(["text", "profile_id", "label"])


def test_a_pool_that_would_leave_ray_data_no_cpu_is_refused_with_the_fix(tmp_path):
    """2 actors x 1 CPU on 2 cores never read a row (the read task waited for a CPU forever): refused up front."""
    serve = ServeConfig(store=str(tmp_path))
    with pytest.raises(ValueError, match=r"2 actors x 1 CPUs reserve 2 of the cluster's 2 CPUs.*--cpus-per-actor 0\.5"):
        check_pool(BatchConfig(data="t.parquet", out="o", num_actors=2, serve=serve), 2.0)
    half = ServeConfig(store=str(tmp_path), cpus_per_actor=0.5)
    check_pool(BatchConfig(data="t.parquet", out="o", num_actors=2, serve=half), 2.0)
    check_pool(BatchConfig(data="t.parquet", out="o", num_actors=1, serve=serve), 2.0)


@pytest.mark.ray
def test_the_ray_data_job_scores_every_row_and_writes_the_bad_ones_with_their_error(
    store, backbone, tmp_path, local_ray
):
    from xpeft.jobs.classify_batch import run_batch

    table = texts_table()
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 150), tmp_path / "in" / "part-0.parquet")  # two files: blocks for two actors
    pq.write_table(table.slice(150), tmp_path / "in" / "part-1.parquet")
    serve = ServeConfig(store=store.uri, backbone=backbone, torch_threads=1, cpus_per_actor=0.5, max_batch_size=16)
    cfg = BatchConfig(
        data=str(tmp_path / "in"), out=str(tmp_path / "scored"), num_actors=2, batch_size=64,
        progress=False, serve=serve,
    )  # fmt: skip
    result = run_batch(cfg)  # its rows/s: benchmarks/batch_inference.py
    scored = pq.read_table(tmp_path / "scored").sort_by("id")
    assert scored.num_rows == table.num_rows == result["rows"]
    assert result["scored"] == sum(e is None for e in scored.column("error").to_pylist())
    assert_scored_as_in_process(scored, store, backbone)
    assert_bad_rows_carry_their_error(scored)
    with pytest.raises(Exception, match="already exists"):
        run_batch(cfg)  # an existing output is never overwritten unasked (refused before any work)
