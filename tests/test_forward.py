"""The replica's forward (xpeft.serve.forward): ONNX Runtime gives the eager model's logits within 1e-4 on
batches mixing every mode and head of the case table (both run one per-row encoder, `encode_rows`, and one
head, `row_heads`); a mixed batch is one encoder pass; its graph is exported once per backbone, found again by
its key and verified before it is loaded; either forward takes a fixed number of torch ops whatever the batch;
and a lone request is not held back for a batch that nobody joins."""

from __future__ import annotations

import asyncio
import logging
import random

import numpy as np
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


@pytest.mark.parametrize("forward", ["ort", "eager"])
def test_a_forward_runs_a_fixed_number_of_torch_ops_whatever_the_rows_and_profiles(engines, forward):
    """Every torch op beside a busy event loop may wait for the GIL: the count must not grow with the batch."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    eng = engines[forward]
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


def test_a_batch_mixing_every_mode_runs_the_encoder_once(engines):
    """Rows with and without the LayerNorm after Â, single_adapter and head_only rows: one encoder pass."""
    eng = engines["eager"]
    items = profile_rows(eng, len(CASES))
    passes = []
    hook = eng.model.encoder.register_forward_hook(lambda *_: passes.append(1))
    try:
        eng.forward(items)
    finally:
        hook.remove()
    assert {c.ln_weight is None for c, _ in items} == {True, False} and len(passes) == 1


def test_the_torch_gather_a_gpu_uses_stacks_the_same_inputs_as_the_numpy_one(engines):
    """RowAdapters gathers with numpy on CPU and with torch on a GPU (untested here: no GPU): the same rule."""
    from xpeft.core.multiprofile import ROW_INPUTS, RowAdapters

    model = engines["eager"].model
    rows = [c for c, _ in profile_rows(engines["eager"], len(CASES))]
    on_cpu, as_on_gpu = (RowAdapters(model.L, model.d_in, model.d_out) for _ in range(2))
    as_on_gpu.numpy = False  # the GPU's branch, on CPU tensors
    a, b = on_cpu.gather(rows), as_on_gpu.gather(rows)
    assert isinstance(a["A_hat"], np.ndarray) and isinstance(b["A_hat"], torch.Tensor)
    for name in ROW_INPUTS:
        assert torch.equal(torch.as_tensor(a[name]), b[name]), name
    assert a["use_ln"].tolist() == [c.ln_weight is not None for c in rows]


def test_each_row_gets_its_own_heads_logits_from_the_heads_stacked(engines):
    """`row_heads` over rows of pooler and linear heads with 2 to 4 classes equals each head on its row alone."""
    from xpeft.core.head import row_heads

    eng = engines["eager"]
    combined = eng.load_profiles([c.name for c in CASES])
    heads, keys = [c.head for c in combined], [c.head_key for c in combined]
    assert {h.kind for h in heads} == {"pooler", "linear"} and len({h.num_labels for h in heads}) > 2
    hidden = torch.randn(len(heads), 7, eng.d)
    mask = torch.ones(len(heads), 7, dtype=torch.long)
    mask[::2, 4:] = 0
    for i, got in enumerate(row_heads(hidden, mask, heads, keys)):
        want = heads[i](hidden[i : i + 1], mask[i : i + 1])[0]
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), (keys[i], (got - want).abs().max())


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
    from xpeft.serve.local import Coalescer

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
