"""Every mode meets the same checks (one table, tests/cases.py): a stored profile round-trips losslessly, the
serving engine answers what the in-process model computes with either forward (ONNX Runtime and torch eager),
a batch mixing it with other profiles equals its own forward, and it stores exactly the bytes the accounting
(Tables 1 and 4) says."""

from __future__ import annotations

import pytest
import torch
from cases import BANK, CASES, SHARED_HEAD_ID, B, Case, D, L, N, fitted_profile, shared_head_state
from conftest import tiny_batch, tiny_encoder

from xpeft.core.accounting import Dims, profile_bytes
from xpeft.core.model import XPeftModel
from xpeft.profiles.record import apply_profile, from_row, to_row

IDS = [c.name for c in CASES]
FORWARDS = ["ort", "eager"]
TOL = {"eager": 1e-5, "ort": 1e-4}  # ONNX Runtime's fused kernels round differently (issue 19: within 1e-4)


def in_process_logits(case: Case, profile, batch) -> torch.Tensor:
    """What a fresh model with the stored profile applied computes, one row at a time."""
    fresh = XPeftModel(tiny_encoder(), profile.config, BANK if profile.config.mode == "x_peft" else None).eval()
    apply_profile(fresh, profile, shared_head_state(case) if case.shared_head else None)
    with torch.no_grad():
        return torch.cat(
            [fresh(**{k: v[i : i + 1] for k, v in batch.items()})["logits"] for i in range(len(batch["input_ids"]))]
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_stored_profile_round_trips_losslessly(case):
    model, profile = fitted_profile(case)
    batch = tiny_batch(labels=None)
    with torch.no_grad():
        expected = model(**batch)["logits"]
    stored = from_row(to_row(profile))
    assert stored.config == profile.config and stored.label_names == profile.label_names
    assert torch.allclose(in_process_logits(case, stored, batch), expected, atol=1e-5)


@pytest.fixture(scope="module", params=FORWARDS)
def engine(request, tmp_path_factory):
    """The serving engine (no Ray), with each forward, over a store holding one profile of every case."""
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
    fitted = {c.name: fitted_profile(c, seed=i, encoder=encoder) for i, c in enumerate(CASES)}
    store.write([p for _, p in fitted.values()])
    eng = ProfileEngine(ServeConfig(store=store.uri, backbone=backbone, torch_threads=1, forward=request.param))
    assert eng.stats["forward"] == request.param
    return eng, {name: model for name, (model, _) in fitted.items()}


TEXTS = ["the movie was great fun", "bad boring plot", "news about the election and the vote"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_engine_serves_what_the_in_process_model_computes(engine, case):
    eng, models = engine
    (combined,) = eng.load_profiles([case.name])
    rows = eng.tokenize(TEXTS, None)
    served = torch.stack(eng.forward([(combined, r) for r in rows]))
    collate = eng.collate
    with torch.no_grad():
        want = torch.cat([models[case.name](**collate([r]))["logits"] for r in rows])
    assert torch.allclose(served, want, atol=TOL[eng.stats["forward"]]), (served - want).abs().max()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_batch_mixing_profiles_equals_each_profiles_own_forward(engine, case):
    eng, _ = engine
    others = [c.name for c in CASES if c.name != case.name][:4]
    combined = dict(zip([case.name, *others], eng.load_profiles([case.name, *others]), strict=True))
    rows = eng.tokenize(TEXTS[:2], None)
    alone = eng.forward([(combined[case.name], r) for r in rows])
    mixed_items = [
        (combined[case.name], rows[0]),
        *((combined[o], rows[1]) for o in others),
        (combined[case.name], rows[1]),
    ]
    mixed = eng.forward(mixed_items)
    tol = TOL[eng.stats["forward"]]
    assert torch.allclose(mixed[0], alone[0], atol=tol) and torch.allclose(mixed[-1], alone[1], atol=tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_profile_stores_the_bytes_the_accounting_says(case):
    _, profile = fitted_profile(case)
    cfg = profile.config
    want = profile_bytes(
        cfg.mode, cfg.mask_type, N, B, Dims(d=D, L=L), c=cfg.num_labels, head=cfg.head, shared_head=case.shared_head,
        layer_norm=cfg.layer_norm, masks=cfg.masks,
    )  # fmt: skip
    assert profile.record_bytes == want["total"], (profile.record_bytes_by_part(), want)
