"""The paper's claims about the bank, the masks and the wrapped layer, on tiny random encoders.

Every mode meets the same checks through the one table of cases (tests/cases.py, as PEFT's test_custom_models
runs its TEST_CASES)."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from cases import CASES, B, Case, D, K, L, N
from conftest import tiny_batch, tiny_encoder

from xpeft.config import XPeftConfig
from xpeft.core.bank import AdapterBank, bank_from_adapters, load_bank, random_bank, random_bank_for, save_bank
from xpeft.core.layer import Adapter
from xpeft.core.masks import gumbel_topk, mask_bytes, pack_bits, unpack_bits
from xpeft.core.model import XPeftModel

IDS = [c.name for c in CASES]


def make(cfg_kwargs: dict, bank: AdapterBank | None = None, seed: int = 0) -> XPeftModel:
    cfg = XPeftConfig(**{"N": N, "k": K, "b": B, **cfg_kwargs})
    bank = bank or random_bank(L, N, B, D, seed=1)
    return XPeftModel(tiny_encoder(seed), cfg, bank if cfg.mode == "x_peft" else None)


def head_names(model: XPeftModel) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith("head.")}


def batch_for(case: Case, seed: int = 0) -> dict:
    batch = tiny_batch(seed=seed)
    if case.xpeft().problem_type == "regression":
        batch["labels"] = batch["labels"].float()
    return batch


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_the_profiles_tensors_train(case):
    """Backbone and bank are frozen: after a step only masks, LN and head (or the baseline's own
    parameters) have changed."""
    model = make(case.xpeft().to_dict())
    expected = case.trains | head_names(model)
    assert set(model.trainable_parameters()) == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bank_before = (model.bank.A.clone(), model.bank.B.clone()) if hasattr(model, "bank") else None
    opt = torch.optim.SGD(model.trainable_parameters().values(), lr=0.5)
    model.train()
    for seed in range(2):  # two steps: LoRA's B starts at zero, so A moves from the second step on
        out = model(**batch_for(case, seed))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    if bank_before is not None:
        assert torch.equal(model.bank.A, bank_before[0]) and torch.equal(model.bank.B, bank_before[1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_mode_gives_logits_for_every_row(case):
    model = make(case.xpeft().to_dict()).eval()
    out = model(**batch_for(case))
    assert out["logits"].shape == (4, case.xpeft().num_labels)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_fused_combination_equals_naive_sum_of_adapters(mask_type):
    """Weights first (Â = Σ M_A[l,i]·A_i, then one adapter per token) equals running every adapter on
    every token and summing, within 1e-5."""
    model = make({"mask_type": mask_type})
    with torch.no_grad():
        model.mask_logits_A.normal_()
        model.mask_logits_B.normal_()
        model.ln_weight.normal_()
    model.eval()
    wA, wB = model.mask_weights()
    adapters = model.combined_adapters()
    x = torch.randn(3, 5, D)
    for layer in range(L):
        fused = model.adapted[layer].forward(x) - model.adapted[layer].base(x)  # adapter unset: zero delta
        assert torch.allclose(fused, torch.zeros_like(fused))
        model.adapted[layer].adapter = adapters[layer]
        fused = model.adapted[layer](x) - model.adapted[layer].base(x)
        # naive: each adapter applied to the tokens, outputs summed with the mask weights
        Ax = sum(wA[layer, i] * (x @ model.bank.A[layer, i].T) for i in range(N))
        h = torch.nn.functional.layer_norm(Ax, (B,), model.ln_weight[layer], model.ln_bias[layer])
        naive = sum(wB[layer, i] * (h @ model.bank.B[layer, i].T) for i in range(N))
        assert torch.allclose(fused, naive, atol=1e-5)


def test_hard_mask_has_exactly_k_ones_of_value_one_over_k():
    logits = torch.randn(6, 40, requires_grad=True)
    y = gumbel_topk(logits, k=7, tau=0.5, nu=1.0)
    assert ((y != 0).sum(-1) == 7).all()
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 7), atol=1e-6)
    # straight-through: the soft path's gradient reaches every logit
    (y * torch.randn(6, 40)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).all()


@pytest.mark.parametrize("masks", ["AB", "B"])
def test_a_model_frozen_for_inference_keeps_its_k_hot_masks(masks):
    """`model.requires_grad_(False)` (a common way to freeze a model) must not turn hard masks into softmaxes."""
    model = make({"mask_type": "hard", "masks": masks})
    with torch.no_grad():
        if masks == "AB":  # the ablation's M_A is never trained: it stays at zeros
            model.mask_logits_A.normal_()
        model.mask_logits_B.normal_()
    model.eval()
    before = model.mask_weights()
    model.requires_grad_(False)
    after = model.mask_weights()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert ((after[1] != 0).sum(-1) == K).all()
    if masks == "B":  # the single-mask ablation: Â is the mean of the A_i
        assert torch.allclose(after[0], torch.full_like(after[0], 1 / N))


def assert_top_k_of(weights: torch.Tensor, logits: torch.Tensor, k: int) -> None:
    """Each row of `weights` is exactly k entries of 1/k, at the k largest logits of its row."""
    chosen = weights != 0
    assert (chosen.sum(-1) == k).all()
    assert torch.allclose(weights[chosen], torch.full_like(weights[chosen], 1 / k))
    lowest_chosen = logits.masked_fill(~chosen, float("inf")).min(-1).values
    highest_left = logits.masked_fill(chosen, float("-inf")).max(-1).values
    assert (lowest_chosen > highest_left).all()


def test_a_hard_mask_at_eval_is_the_top_k_of_its_logits_every_time():
    model = make({"mask_type": "hard"})
    with torch.no_grad():
        model.mask_logits_A.normal_()
        model.mask_logits_B.normal_()
    model.eval()
    (wA, wB), (again, _) = model.mask_weights(), model.mask_weights()
    assert_top_k_of(wA, model.mask_logits_A, K)
    assert_top_k_of(wB, model.mask_logits_B, K)
    assert torch.equal(wA, again)  # no noise at eval


def test_a_hard_mask_in_training_is_k_hot_forward_and_the_softmax_backward():
    """Algorithm 1's straight-through estimator: the forward value is the top k of the (noised) logits, the
    gradient that of softmax(logits / tau). Without noise (nu = 0) both can be checked exactly."""
    model = make({"mask_type": "hard"}).train()
    with torch.no_grad():
        model.mask_logits_A.normal_()
    model.tau, model.nu = 0.5, 0.0
    wA, _ = model.mask_weights()
    assert_top_k_of(wA.detach(), model.mask_logits_A.detach(), K)
    g = torch.randn(L, N)
    (wA * g).sum().backward()
    logits = model.mask_logits_A.detach().clone().requires_grad_(True)
    (torch.softmax(logits / 0.5, dim=-1) * g).sum().backward()
    assert torch.allclose(model.mask_logits_A.grad, logits.grad, atol=1e-6)


def test_gradients_reach_the_mask_logits_in_hard_mode():
    model = make({"mask_type": "hard"}).train()
    model(**tiny_batch())["loss"].backward()
    assert model.mask_logits_A.grad.abs().sum() > 0
    assert model.mask_logits_B.grad.abs().sum() > 0


def test_profile_costs_2_ceil_N_over_8_times_L_bytes():
    for n, layers in [(10, 2), (100, 12), (200, 12), (400, 12), (801, 6)]:
        m = torch.zeros(layers, n)
        m[:, ::3] = 1
        packed = pack_bits(m)
        assert len(packed) == mask_bytes(n, layers) == -(-n // 8) * layers
        assert torch.equal(unpack_bits(packed, n, layers), m.bool())
    assert 2 * mask_bytes(100, 12) == 312 and 2 * mask_bytes(400, 12) == 1200  # Table 1


def test_unpacking_a_mask_for_another_bank_is_a_clear_error():
    with pytest.raises(ValueError, match="different bank"):
        unpack_bits(b"\x00" * 5, 100, 12)


def test_random_bank_is_reproducible_from_its_seed():
    a, b = random_bank(L, N, B, D, seed=3), random_bank(L, N, B, D, seed=3)
    assert a.fingerprint == b.fingerprint and torch.equal(a.A, b.A)
    assert random_bank(L, N, B, D, seed=4).fingerprint != a.fingerprint
    assert a.A.shape == (L, N, B, D) and a.B.shape == (L, N, D, B)


def test_bank_round_trips_through_safetensors_with_metadata(tmp_path):
    bank = random_bank(L, N, B, D, seed=5)
    path = save_bank(bank, tmp_path / "bank.safetensors")
    loaded = load_bank(path, verify=True)
    assert loaded.fingerprint == bank.fingerprint and loaded.seed == 5 and loaded.source == "random"
    assert torch.equal(loaded.A, bank.A) and torch.equal(loaded.B, bank.B)


def test_a_corrupt_bank_is_detected(tmp_path):
    bank = random_bank(L, N, B, D, seed=5)
    bank.fingerprint = "0" * 64
    path = save_bank(bank, tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        load_bank(path, verify=True)


def test_learned_bank_stacks_trained_adapters():
    adapters = [(torch.randn(L, B, D), torch.randn(L, D, B)) for _ in range(3)]
    bank = bank_from_adapters(adapters)
    assert bank.N == 3 and bank.source == "single_adapter"
    assert torch.equal(bank.A[:, 1], adapters[1][0])
    with pytest.raises(ValueError, match="same shapes"):
        bank_from_adapters([adapters[0], (torch.randn(L, B + 1, D), torch.randn(L, D, B + 1))])


def fastest_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.slow
def test_verifying_a_bank_on_load_costs_about_one_read_and_hash_of_its_file(tmp_path):
    """Every load checks the sha256 fingerprint (a bank of N=800 on bert-base is 2.8 GB), so a load may cost
    what reading and hashing the file once costs, not a multiple of it. A ratio, not a wall-clock limit: 177 MB
    of zeros, as only the cost matters."""
    path = save_bank(AdapterBank(A=torch.zeros(6, 200, 48, 384), B=torch.zeros(6, 200, 384, 48)), tmp_path / "b.st")
    read_and_hash = fastest_of(lambda: hashlib.sha256(path.read_bytes()).hexdigest())
    verified_load = fastest_of(lambda: load_bank(path))
    assert verified_load < 2 * read_and_hash, (verified_load, read_and_hash)


def test_bank_that_does_not_fit_the_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        make({"mode": "x_peft"}, bank=random_bank(L, N + 1, B, D))
    with pytest.raises(ValueError, match="L=3"):
        make({"mode": "x_peft"}, bank=random_bank(3, N, B, D))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": N + 1}, "1 <= k < N"),
        ({"k": N}, "1 <= k < N"),
        ({"b": 0}, "b must be"),
        ({"mode": "lora"}, "mode must be"),
        ({"tau": 0}, "tau"),
    ],
)
def test_impossible_configs_fail_fast(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XPeftConfig(**{"N": N, "k": K, **kwargs})


def test_per_row_adapters_equal_one_profile_forwards():
    """The per-row path (serving a batch that mixes profiles) gives each row its own profile's output."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, D)
    model = make({"mask_type": "soft"}).eval()
    layer = model.adapted[0]
    per_profile = []
    for _ in range(3):
        A, Bm = torch.randn(B, D), torch.randn(D, B)
        w, b = torch.randn(B), torch.randn(B)
        per_profile.append(Adapter(A, Bm, w, b))
    expected = []
    for i, a in enumerate(per_profile):
        layer.adapter = a
        expected.append(layer(x[i : i + 1]))
    layer.adapter = Adapter(
        torch.stack([a.A_hat for a in per_profile]),
        torch.stack([a.B_hat for a in per_profile]),
        torch.stack([a.ln_weight for a in per_profile]),
        torch.stack([a.ln_bias for a in per_profile]),
    )
    assert torch.allclose(layer(x), torch.cat(expected), atol=1e-5)


@pytest.mark.parametrize("family", ["modernbert", "deberta", "distilbert", "roberta", "electra"])
def test_any_encoder_family_takes_an_x_peft_bank(family):
    from tiny_backbone import tiny_family_encoder

    encoder, cfg = tiny_family_encoder(family), XPeftConfig(N=N, k=K, b=B, head="cls")
    model = XPeftModel(encoder, cfg, random_bank_for(encoder, cfg))
    batch = tiny_batch()
    out = model(batch["input_ids"].clamp_max(99), batch["attention_mask"], labels=batch["labels"])
    out["loss"].backward()
    assert model.mask_logits_A.grad.abs().sum() > 0


def test_unknown_target_lists_the_linears_there_are():
    with pytest.raises(ValueError, match="linears there are"):
        XPeftModel(tiny_encoder(), XPeftConfig(N=N, k=K, b=B, target="attention.nope"), random_bank(L, N, B, D))


def test_moving_a_model_moves_its_frozen_bank_and_leaves_the_shared_one_alone():
    """`.to(device)` (a GPU farm actor, Ray Train's prepare_model) must take the bank along, or the first
    contraction mixes devices; the bank object other models share stays where it was."""
    enc = tiny_encoder()
    bank = random_bank(enc.config.num_hidden_layers, 8, 4, enc.config.hidden_size, seed=0)
    model = XPeftModel(enc, XPeftConfig(N=8, k=2, b=4, mask_type="hard"), bank).to(torch.float64)
    assert model.bank.A.dtype == model.bank.B.dtype == torch.float64 and bank.A.dtype == torch.float32
    assert model.bank.fingerprint == bank.fingerprint
    assert model(**tiny_batch())["logits"].dtype == torch.float64
    assert model.to("meta").bank.A.device.type == "meta"
