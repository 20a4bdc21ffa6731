"""The replica's forward (xpeft.serve.forward): ONNX Runtime gives the eager model's logits within 1e-4 on
batches mixing every mode and head of the case table; its graph is exported once per backbone, found again by
its key and verified before it is loaded; its heads take a fixed number of torch ops whatever the batch; and
a lone request is not held back for a batch that nobody joins."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
import torch
from cases import BANK, CASES, SHARED_HEAD_ID, fitted_profile, shared_head_state
from conftest import tiny_encoder
from tiny_backbone import WORDS

from xpeft.core.multiprofile import MultiProfileModel
from xpeft.serve.forward import OrtForward, make_forward

TOKENS = ("input_ids", "attention_mask", "token_type_ids")
TARGET = "attention.self.value"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """An ORT and an eager engine over one store holding a profile of every case."""
    from tiny_backbone import make_tiny_backbone

    from xpeft.core.encoder import load_encoder
    from xpeft.profiles.store import ProfileStore
    from xpeft.serve.config import ServeConfig
    from xpeft.serve.engine import ProfileEngine

    backbone = make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))
    store = ProfileStore(tmp_path_factory.mktemp("store"))
    store.save_bank(BANK)
    encoder = load_encoder(backbone)
    store.save_head(SHARED_HEAD_ID, shared_head_state(next(c for c in CASES if c.shared_head), encoder))
    store.write([fitted_profile(c, seed=i, encoder=encoder)[1] for i, c in enumerate(CASES)])
    cfg = dict(store=store.uri, backbone=backbone, torch_threads=1)
    return {f: ProfileEngine(ServeConfig(**cfg, forward=f)) for f in ("ort", "eager")}


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]


@pytest.mark.parametrize("rows", [1, 5, len(CASES), 2 * len(CASES) + 9])
def test_ort_logits_equal_the_eager_ones_on_a_padded_batch_mixing_every_mode_and_head(engines, rows):
    names = [CASES[i % len(CASES)].name for i in range(rows)]
    items = {}
    for f, eng in engines.items():
        combined = dict(zip(names, eng.load_profiles(names), strict=True))
        items[f] = [(combined[n], r) for n, r in zip(names, eng.tokenize(texts(rows, seed=rows), None), strict=True)]
    ort, eager = (engines[f].forward(items[f]) for f in ("ort", "eager"))
    for name, a, b in zip(names, ort, eager, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (name, (a - b).abs().max())


def profile_rows(engine, n: int) -> list:
    names = [CASES[i % len(CASES)].name for i in range(n)]
    return list(zip(engine.load_profiles(names), engine.tokenize(texts(n), None), strict=True))


def test_the_ort_forward_runs_a_fixed_number_of_torch_ops_whatever_the_rows_and_profiles(engines):
    """Every torch op beside a busy event loop may wait for the GIL: the count must not grow with the batch."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    eng = engines["ort"]
    counts = {}
    for n in (len(CASES), 2 * len(CASES), 40):  # every mode and head in each; the cases once, twice, 3.3 times
        items = profile_rows(eng, n)
        batch, rows = eng.collate([r for _, r in items]), [c for c, _ in items]
        eng.forward_rows(batch, rows)  # a profile's first forward takes numpy views of its tensors (no torch op)
        Count.calls = 0
        with Count():
            eng.forward_rows(batch, rows)
        counts[n] = Count.calls
    assert len(set(counts.values())) == 1, counts


def ort_forward(cache, encoder=None) -> OrtForward:
    fw = OrtForward(MultiProfileModel(encoder or tiny_encoder(), TARGET), TOKENS, threads=1, cache_dir=cache)
    fw.prepare(BANK.b)
    return fw


def test_a_cached_graph_is_found_by_its_key_and_a_new_replica_starts_without_exporting(tmp_path):
    first = ort_forward(tmp_path)
    again = ort_forward(tmp_path)
    other_weights = ort_forward(tmp_path, tiny_encoder(seed=1))
    assert first.exported == [BANK.b] and again.exported == [] and other_weights.exported == [BANK.b]
    assert len(list(tmp_path.glob("*.onnx"))) == 2 and not list(tmp_path.glob("*.tmp*"))


def test_a_damaged_cached_graph_is_exported_again_not_loaded(tmp_path, caplog):
    ort_forward(tmp_path)
    (graph,) = tmp_path.glob("*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="xpeft.serve.onnx_graph"):
        again = ort_forward(tmp_path)
    assert again.exported == [BANK.b] and "does not match its record" in caplog.text
    assert ort_forward(tmp_path).exported == []  # the new export is verified on the next load


def test_the_ort_forward_on_cuda_is_refused_with_the_fix():
    model = MultiProfileModel(tiny_encoder(), TARGET)
    with pytest.raises(ValueError, match="forward='eager'"):
        make_forward("ort", model, torch.device("cuda"), TOKENS, threads=1)
    assert make_forward("auto", model, torch.device("cuda"), TOKENS, threads=1).name == "eager"
    with pytest.raises(ValueError, match="choose one of"):
        make_forward("fast", model, torch.device("cpu"), TOKENS, threads=1)


def test_a_serve_config_names_the_forwards_it_accepts():
    from xpeft.serve.config import ServeConfig

    with pytest.raises(ValueError, match="forward='onnx' must be 'auto', 'ort' or 'eager'"):
        ServeConfig(store="/tmp/s", forward="onnx")


def test_a_lone_call_is_not_held_for_a_batch_nobody_joins(monkeypatch):
    """The wait for company is asked for, not imposed: the coalescer's only wait is `wait_s`, and with the default
    0 a lone call goes straight to the work. Counted, not timed (asyncio.sleep records what it was asked)."""
    from xpeft.serve.deployment import Coalescer

    waits: list[float] = []

    async def recorded_sleep(seconds: float, *args, **kwargs) -> None:
        waits.append(seconds)

    def work(items):
        return list(items)

    async def lone(wait_s: float) -> list:
        waits.clear()
        assert await Coalescer(work, max_items=32, wait_s=wait_s)([1]) == [1]
        return list(waits)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    assert asyncio.run(lone(0.5)) == [0.5]  # the wait is there when asked for
    assert asyncio.run(lone(0.0)) == []  # and by default a lone call starts at once
