"""Packed batches compute what padded ones do, for every mode of the case table (tests/cases.py): the same logits
and loss, the same gradients of the trainable tensors, the same loss curve of a whole fit; the fit packs only a
model whose packed forward it has checked, else pads and says so. bf16 autocast follows the device's flags."""

from __future__ import annotations

import logging

import pytest
import torch
from cases import BANK, CASES, fitted_profile
from conftest import tiny_encoder, tiny_rows

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import random_bank, random_bank_for
from xpeft.core.combine import combine
from xpeft.core.model import XPeftModel
from xpeft.core.packing import unpack
from xpeft.data.tokens import Collator, pack_rows
from xpeft.fit import batching
from xpeft.fit.batching import Batching, packing_mismatch, use_bf16
from xpeft.fit.loop import fit, predict

IDS = [c.name for c in CASES]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
PACK = 24  # tokens a packed sequence holds here: 2–4 of tiny_rows' rows (4–11 tokens)


def pair_rows(n: int = 10) -> list[dict]:
    """tiny_rows with a second segment (token type 1) in each row, as a text pair gives."""
    rows = tiny_rows(n)
    for r in rows:
        cut = len(r["input_ids"]) // 2
        r["token_type_ids"] = [0] * cut + [1] * (len(r["input_ids"]) - cut)
    return rows


def both(rows: list[dict]) -> tuple[dict, dict]:
    return Collator(0)(rows), Collator(0, PACK)(rows)


def test_rows_pack_into_few_even_sequences_within_the_pack_length():
    assert pack_rows([5, 6, 7, 30, 2, 3], 12) == [[3], [2, 4, 5], [0, 1]]  # a row longer than 12 gets its own
    assert pack_rows([5, 5, 4, 4, 3, 3], 12) == [[0, 4], [1, 5], [2, 3]]  # 8 tokens each, not 10 / 11 / 3
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 64, (1,), generator=g)),), generator=g).tolist()
        packs = pack_rows(lengths, 64)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        assert all(p == sorted(p) for p in packs)
        assert max(sum(lengths[i] for i in p) for p in packs) <= 64
        assert len(packs) <= 2 * sum(lengths) // 64 + 1  # first-fit decreasing: at most one sequence half empty


def test_a_packed_batch_unpacks_to_the_padded_batch():
    rows = pair_rows()
    padded, packed = both(rows)
    packing = packed["packing"]
    assert packed["input_ids"].shape[0] < len(rows) and packed["input_ids"].shape[1] <= PACK
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert torch.equal(packing.row_mask, padded["attention_mask"])
    for key in ("input_ids", "token_type_ids"):
        rebuilt = unpack(packed[key], packing) * padded["attention_mask"]
        assert torch.equal(rebuilt, padded[key] * padded["attention_mask"]), key
    positions = unpack(packing.position_ids, packing) * padded["attention_mask"]
    assert torch.equal(positions, torch.arange(padded["input_ids"].shape[1]) * padded["attention_mask"])
    assert torch.equal(packed["labels"], padded["labels"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_packed_batch_gives_the_padded_batchs_logits_and_loss(case):
    model, _ = fitted_profile(case)
    rows = pair_rows()
    if model.cfg.problem_type == "regression":
        rows = [{**r, "labels": float(r["labels"])} for r in rows]
    padded, packed = both(rows)
    with torch.no_grad():
        a, b = model(**padded), model(**packed)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_packed_batch_gives_the_padded_batchs_gradients(case):
    """In training (Gumbel noise and head dropout drawn from the same seed; no dropout in the encoder)."""
    model, _ = fitted_profile(case, encoder=tiny_encoder(**NO_DROPOUT))
    model.train()
    rows = tiny_rows(10)
    if model.cfg.problem_type == "regression":
        rows = [{**r, "labels": float(r["labels"])} for r in rows]
    grads = []
    for batch in both(rows):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(**batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode,mask_type", [("x_peft", "hard"), ("x_peft", "soft"), ("single_adapter", "soft")])
def test_a_packed_fit_follows_the_padded_fits_loss_curve(mode, mask_type):
    """In fp32 (bf16 "off": "auto" turns autocast on where the CPU has native bf16, and bf16's rounding differs
    with the batch's layout)."""
    cfg = XPeftConfig(mode=mode, mask_type=mask_type, N=16, k=4, b=4)
    train = TrainConfig(lr=1e-2, mask_lr=5e-2, ln_lr=5e-2, epochs=3, batch_size=8, seed=3, bf16="off")
    curves = {}
    for packing in (True, False):
        model = XPeftModel(tiny_encoder(**NO_DROPOUT), cfg, random_bank(2, 16, 4, 32, seed=0), seed=3)
        result = fit(model, pair_rows(32), TrainConfig(**{**train.to_dict(), "packing": packing}))
        assert result.packed is packing
        curves[packing] = result.losses
    assert len(curves[True]) == 12
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=0, atol=1e-5)


def test_predict_packs_and_keeps_the_rows_order():
    model, _ = fitted_profile("pooler")
    rows = pair_rows(20)
    padded = predict(model, rows, batch_size=8)
    packed = predict(model, rows, batch_size=8, batching=Batching(PACK))
    torch.testing.assert_close(torch.from_numpy(packed), torch.from_numpy(padded), rtol=0, atol=1e-5)


def test_per_row_adapters_of_a_packed_batch_equal_the_padded_batchs():
    """The mtl warm start's joint fit: each row through its own profile's adapter, also when rows share a
    packed sequence."""
    from types import SimpleNamespace

    from xpeft.fit.profile import ProfileFitter
    from xpeft.fit.warm_start import MultiTaskAdapters

    fitter = ProfileFitter(tiny_encoder(), SimpleNamespace(pad_token_id=0), None, XPeftConfig(b=4), TrainConfig())
    mtl = MultiTaskAdapters(fitter, 3, seed=0).eval()
    with torch.no_grad():
        mtl.lora_B.normal_()
    rows = [{**r, "profile_index": i % 3} for i, r in enumerate(tiny_rows(12))]
    padded, packed = both(rows)
    with torch.no_grad():
        torch.testing.assert_close(mtl(**packed)["logits"], mtl(**padded)["logits"], rtol=0, atol=1e-5)
    assert packing_mismatch(mtl, rows) is None


def test_a_fit_packs_by_default_and_pads_with_no_packing():
    model = XPeftModel(tiny_encoder(), XPeftConfig(N=16, k=4, b=4), random_bank(2, 16, 4, 32, seed=0))
    assert TrainConfig().packing is True
    assert fit(model, tiny_rows(16), TrainConfig(epochs=1, batch_size=8)).packed
    assert not fit(model, tiny_rows(16), TrainConfig(epochs=1, batch_size=8, packing=False)).packed


def family_encoder(name: str):
    """A tiny random encoder of a family of the case table (tests/tiny_backbone.py), BERT's from conftest."""
    from tiny_backbone import tiny_family_encoder

    return tiny_encoder() if name == "bert" else tiny_family_encoder(name)


# RoBERTa counts positions from padding_idx + 1, so positions from 0 are not its padded forward's; ModernBERT's
# sliding-window layers take a packed mask without their window (known from its config, whatever the rows);
# DeBERTa's relative positions do not take a packed mask.
FAMILIES = {
    "bert": None, "distilbert": None, "electra": None, "roberta": "differ", "modernbert": "sliding-window",
    "deberta": "fails",
}  # fmt: skip


@pytest.mark.parametrize("family,mismatch", FAMILIES.items(), ids=list(FAMILIES))
def test_a_fit_packs_the_families_whose_packed_forward_is_exact_and_pads_the_others(family, mismatch, caplog):
    encoder, cfg = family_encoder(family), XPeftConfig(N=20, k=5, b=4, head="cls")
    model = XPeftModel(encoder, cfg, random_bank_for(encoder, cfg, seed=7))
    rows = tiny_rows(16)
    found = packing_mismatch(model, rows)
    assert found is None if mismatch is None else mismatch in found
    with caplog.at_level(logging.WARNING, logger="xpeft.fit.batching"):
        result = fit(model, rows, TrainConfig(epochs=1, batch_size=8))
    assert result.packed is (mismatch is None)
    assert ("padding batches, not packing" in caplog.text) is (mismatch is not None)


def test_modernbert_pads_even_where_its_rows_are_shorter_than_its_attention_window():
    """On rows within the window the packed and padded logits agree, so a comparison on a few short rows would
    pack, and a later row longer than the window would attend past it: the window is refused from the config."""
    from tiny_backbone import tiny_family_encoder

    encoder, cfg = tiny_family_encoder("modernbert"), XPeftConfig(N=20, k=5, b=4, head="cls")
    model = XPeftModel(encoder, cfg, random_bank_for(encoder, cfg, seed=7))
    short = [{"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": 0}] * 4  # within the half-window 4
    assert "sliding-window" in packing_mismatch(model, short)
    assert not fit(model, short, TrainConfig(epochs=1, batch_size=4)).packed


class NoPositions(torch.nn.Module):
    """An encoder whose forward takes no position ids (as an encoder of another architecture may not)."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_encoder()
        self.config = self.bert.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_a_model_that_cannot_take_a_packed_batch_is_padded_and_the_log_says_why(caplog):
    model = XPeftModel(NoPositions(), XPeftConfig(N=20, k=5, b=4, head="linear"), BANK)  # it has no pooler
    rows = tiny_rows(16)
    assert "fails (TypeError" in packing_mismatch(model, rows)
    with caplog.at_level(logging.WARNING, logger="xpeft.fit.batching"):
        assert not fit(model, rows, TrainConfig(epochs=1, batch_size=8)).packed
    assert "position_ids" in caplog.text


@pytest.mark.parametrize(
    "flags,setting,expected",
    [
        ({"fpu", "avx2", "avx512_bf16"}, "auto", True),
        ({"fpu", "amx_bf16", "amx_tile"}, "auto", True),
        ({"fpu", "avx2"}, "auto", False),
        (None, "auto", False),  # unknown: off
        ({"avx512_bf16"}, "off", False),
        ({"fpu", "avx2"}, "on", True),
    ],
)
def test_bf16_auto_is_on_only_where_the_cpu_has_native_bf16(monkeypatch, flags, setting, expected):
    monkeypatch.setattr(batching, "cpu_flags", lambda: flags)
    on, why = use_bf16(setting, torch.device("cpu"))
    assert on is expected and why


def test_a_bf16_fit_keeps_fp32_weights_and_optimizer_states():
    model = XPeftModel(tiny_encoder(), XPeftConfig(mode="single_adapter", b=4), None)
    states = []

    def keep_optimizer_state(state, metrics, optimizer, scheduler):
        states.extend(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0)

    result = fit(model, tiny_rows(16), TrainConfig(lr=1e-2, epochs=2, batch_size=8, bf16="on"),
                 on_epoch_end=keep_optimizer_state)  # fmt: skip
    assert result.bf16 and all(torch.isfinite(torch.tensor(result.losses)))
    assert {p.dtype for p in model.trainable_parameters().values()} == {torch.float32}
    assert states and {t.dtype for t in states} == {torch.float32}  # AdamW's moments
    plain = fit(XPeftModel(tiny_encoder(), XPeftConfig(mode="single_adapter", b=4), None), tiny_rows(16),
                TrainConfig(lr=1e-2, epochs=2, batch_size=8, bf16="off"))  # fmt: skip
    assert not plain.bf16 and plain.losses != result.losses  # the forward did run in bf16
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain.losses), rtol=0.05, atol=0.05)


def test_under_bf16_autocast_the_bank_contraction_stays_in_the_banks_fp32():
    """Autocast would cast the whole frozen bank to bf16 at every fit step (at N=400 that took 3.7x the fp32
    contraction's time, BENCHMARKS.md): Â and B̂ come out in fp32, equal to the contraction without autocast."""
    bank = random_bank(2, 16, 4, 32, seed=0)
    wA, wB = torch.rand(2, 16).softmax(-1), torch.rand(2, 16).softmax(-1)
    plain = combine(wA, wB, bank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = combine(wA, wB, bank)
    for a, b in zip(under, plain, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_the_flags_reach_the_fit_config():
    import argparse

    from xpeft.flags import add_flags, from_flags

    ap = argparse.ArgumentParser()
    add_flags(ap, TrainConfig)
    assert from_flags(ap.parse_args([]), TrainConfig) == TrainConfig()
    old = from_flags(ap.parse_args(["--no-packing", "--bf16", "off"]), TrainConfig)
    assert (old.packing, old.bf16) == (False, "off")
    with pytest.raises(SystemExit):
        ap.parse_args(["--bf16", "maybe"])


def test_the_pack_length_suits_the_rows_and_packing_beats_padding_on_real_rows():
    """SST-2 rows (13 tokens) pack into short sequences, the news profiles' (40) into longer ones; either way
    the packed batches cost far less than padded ones by the step's cost model (xpeft.fit.batching)."""
    from xpeft.core.encoder import load_tokenizer
    from xpeft.data.dataset import SAMPLE_SOURCE, profile_datas, read_profile_source
    from xpeft.data.tasks import SAMPLE, load_task
    from xpeft.data.tokens import tokenize
    from xpeft.fit.batching import pack_length_for, packed_cost

    tokenizer = load_tokenizer("minilm")
    sst2 = [len(r["input_ids"]) for r in tokenize(load_task("sst2", "train", SAMPLE), tokenizer, 128)]
    news = profile_datas(read_profile_source(SAMPLE_SOURCE)).profiles
    news = [len(r["input_ids"]) for d in news for r in tokenize(d.train, tokenizer, 128)]
    assert pack_length_for(sst2, 32, 384) == 64 and pack_length_for(news, 16, 384) == 96
    g = torch.Generator().manual_seed(0)
    batches = [[sst2[i] for i in torch.randperm(len(sst2), generator=g)[:32]] for _ in range(20)]
    assert packed_cost(batches, None, 384) > 2.5 * packed_cost(batches, 64, 384)


def test_the_step_time_benchmark_prints_old_and_new_side_by_side():
    from test_benchmarks import assert_ran, run_smoke, script_module

    r = run_smoke("step_time.py")  # the suite's one smoke run of it (tests/test_benchmarks.py)
    assert_ran(r)
    smoke, lines = script_module("step_time.py").SMOKE, r.stdout.splitlines()
    for mode in ("single_adapter", f"x_peft hard N={smoke['N']}", f"x_peft soft N={smoke['N']}"):
        assert any(line.startswith(mode) and " new/old " in line for line in lines), r.stdout
    assert any("x single_adapter" in line and f"N={smoke['ratio_N']}" in line for line in lines), r.stdout
    assert "forward + backward" in r.stdout


def test_a_profile_model_and_the_mtl_warm_start_leave_no_adapter_in_the_blocks_after_a_forward_without_autograd():
    """One forward for both (`XPeftModel.forward_with`): a training forward leaves its adapters set, for gradient
    checkpointing to find in backward(); an evaluation under no_grad — also one made in train mode, as a fit's
    holdout check can be — leaves none to leak into the next profile's forward."""
    from types import SimpleNamespace

    from xpeft.fit.profile import ProfileFitter
    from xpeft.fit.warm_start import MultiTaskAdapters

    rows = [{**r, "profile_index": i % 3} for i, r in enumerate(tiny_rows(6))]
    padded, _ = both(rows)
    profile = XPeftModel(tiny_encoder(), XPeftConfig(N=16, k=4, b=4), random_bank(2, 16, 4, 32, seed=0))
    fitter = ProfileFitter(tiny_encoder(), SimpleNamespace(pad_token_id=0), None, XPeftConfig(b=4), TrainConfig())
    mtl = MultiTaskAdapters(fitter, 3, seed=0)
    for model, blocks, batch in ((profile, profile.adapted, padded), (mtl, mtl.model.adapted, padded)):
        if model is profile:
            batch = {k: v for k, v in batch.items() if k != "profile_index"}
        model.train()
        model(**batch)["logits"].sum().backward()
        assert all(block.adapter is not None for block in blocks)
        with torch.no_grad():
            model(**batch)
        assert all(block.adapter is None for block in blocks), type(model).__name__
