"""Every encoder family xpeft knows, through the whole pipeline: one case table (tests/tiny_backbone.py's
FAMILY_CONFIGS, a tiny random model and an offline tokenizer per family; test ids name the family) and one set of
checks each row meets. A profile is fitted (hard and soft masks, with and without the LayerNorm, single_adapter,
head_only) on the family's `value` linear, stored, served by ONNX Runtime and by eager torch (equal to the
in-process model within 1e-4), scored as a table, written as a PEFT LoRA folder that PeftModel loads with the same
logits and read back as a bank member. Ray Train's step and the refusals are in tests/test_families_refusals.py."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from tiny_backbone import FAMILY_CONFIGS, WORDS, make_tiny_family

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import AdapterBank, random_bank_for
from xpeft.core.encoder import adapted_dims, load_encoder, load_tokenizer
from xpeft.core.families import FAMILIES, MEANINGS, family_name, resolve_target, token_inputs
from xpeft.core.head import HeadWeights
from xpeft.core.model import XPeftModel
from xpeft.data.dataset import ProfileData
from xpeft.data.tokens import Collator, tokenize
from xpeft.fit.profile import ProfileFitter
from xpeft.profiles.record import apply_profile, stored_mask_weights
from xpeft.profiles.store import ProfileStore

FAMILY_IDS = list(FAMILY_CONFIGS)
N, K, B = 8, 2, 4
# name -> the XPeftConfig of a profile every family fits ('cls' head where a family has no pooler).
PROFILES = {
    "hard": {"mode": "x_peft", "mask_type": "hard", "head": "cls"},
    "soft": {"mode": "x_peft", "mask_type": "soft", "head": "linear"},
    "hard-no-ln": {"mode": "x_peft", "mask_type": "hard", "layer_norm": False, "head": "cls"},
    "single": {"mode": "single_adapter", "head": "linear"},
    "head-only": {"mode": "head_only", "head": "cls"},
}
FIT = TrainConfig(lr=1e-2, mask_lr=5e-2, ln_lr=5e-2, epochs=2, batch_size=8, max_length=32)


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 14))) for _ in range(n)]


def labelled(n: int, seed: int) -> list[dict]:
    """Rows whose label is whether 'good' is in the text (every other row has it)."""
    rows = []
    for i, text in enumerate(texts(n, seed)):
        text = f"good {text}" if i % 2 else text.replace("good", "bad")
        rows.append({"text": text, "label": int("good" in text.split())})
    return rows


@dataclass
class Family:
    """One row of the table, built once: its backbone folder, encoder, bank and a store of fitted profiles."""

    name: str
    backbone: str
    model_type: str
    bank: AdapterBank
    store: ProfileStore
    fitted: dict  # profile id -> FittedProfile

    def encoder(self):
        return load_encoder(self.backbone)


@pytest.fixture(scope="module", params=FAMILY_IDS)
def family(request, tmp_path_factory) -> Family:
    backbone = make_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    encoder, tokenizer = load_encoder(backbone), load_tokenizer(backbone)
    bank = random_bank_for(encoder, XPeftConfig(N=N, k=K, b=B), seed=3)
    store = ProfileStore(tmp_path_factory.mktemp(f"{request.param}-store"))
    store.save_bank(bank)
    fitted = {}
    for i, (pid, settings) in enumerate(PROFILES.items()):
        fitter = ProfileFitter(encoder, tokenizer, bank, XPeftConfig(N=N, k=K, b=B, **settings), FIT)
        fitted[pid] = fitter.fit(ProfileData(pid, labelled(24, seed=i), labelled(8, seed=100 + i)))
    store.write([f.profile for f in fitted.values()])
    return Family(request.param, backbone, family_name(encoder), bank, store, fitted)


def in_process_logits(fam: Family, profile_id: str, rows: list[dict]) -> torch.Tensor:
    """The stored profile applied to a fresh XPeftModel of the family, one row at a time (no padding)."""
    profile = fam.store.get(profile_id)
    model = XPeftModel(fam.encoder(), profile.config, fam.bank if profile.config.mode == "x_peft" else None)
    apply_profile(model, profile)
    tokenizer = load_tokenizer(fam.backbone)
    collate = Collator(tokenizer.pad_token_id or 0)
    with torch.no_grad():
        return torch.cat([model.eval()(**collate([r]))["logits"] for r in tokenize(rows, tokenizer, 128)])


def test_each_meaning_resolves_to_a_linear_of_the_family_with_the_bank_dimensions(family):
    encoder = family.encoder()
    d = encoder.config.hidden_size
    for meaning in MEANINGS:
        resolved = resolve_target(encoder, meaning)
        assert resolved == FAMILIES[family.model_type].targets[meaning]
        L, d_in, d_out = adapted_dims(encoder, meaning)
        assert L == encoder.config.num_hidden_layers and d_out == d, (meaning, resolved, d_out)
    assert (family.bank.L, family.bank.d_in, family.bank.d_out) == adapted_dims(encoder, "value")
    assert family.bank.target == FAMILIES[family.model_type].targets["value"]


def test_profiles_fit_on_the_family_value_linear_with_k_adapters_a_block(family):
    for pid, fitted in family.fitted.items():
        profile, losses = fitted.profile, fitted.fit.losses
        assert fitted.fit.steps == 6 and all(torch.isfinite(torch.tensor(losses))), (pid, losses)  # 24 rows, 2 epochs
        if profile.config.mode == "x_peft":
            assert profile.config.target == family.bank.target and profile.bank_fingerprint == family.bank.fingerprint
        if profile.config.mask_type == "hard" and profile.config.mode == "x_peft":
            for weights in stored_mask_weights(profile, N, family.bank.L):
                assert ((weights > 0).sum(-1) == K).all(), (pid, weights)


@pytest.fixture(scope="module")
def engines(family):
    from xpeft.serve.config import ServeConfig
    from xpeft.serve.engine import ProfileEngine

    cfg = dict(store=family.store.uri, backbone=family.backbone, torch_threads=1)
    return {f: ProfileEngine(ServeConfig(**cfg, forward=f)) for f in ("ort", "eager")}


def test_onnx_and_eager_serve_every_profile_as_the_in_process_model(family, engines):
    names = [list(PROFILES)[i % len(PROFILES)] for i in range(13)]
    rows = [{"text": t, "text_pair": "story plot" if i % 3 == 0 else None} for i, t in enumerate(texts(13, seed=5))]
    want = {}
    for pid in PROFILES:
        mine = [r for n, r in zip(names, rows, strict=True) if n == pid]
        want[pid] = iter(in_process_logits(family, pid, mine))
    expected = [next(want[n]) for n in names]
    for forward, engine in engines.items():
        combined = dict(zip(PROFILES, engine.load_profiles(list(PROFILES)), strict=True))
        tokens = engine.tokenize([r["text"] for r in rows], [r["text_pair"] or "" for r in rows])
        items = [(combined[n], t) for n, t in zip(names, tokens, strict=True)]
        for n, got, z in zip(names, engine.forward(items), expected, strict=True):
            assert torch.allclose(got, z, atol=1e-4), (forward, n, (got - z).abs().max())


def test_served_inputs_carry_token_type_ids_only_where_the_encoder_takes_them(family, engines):
    encoder = family.encoder()
    takes = token_inputs(encoder)
    assert ("token_type_ids" in takes) == (family.name == "electra")  # the one row with two token types
    ort = engines["ort"].forward_rows
    assert ort.token_names == takes
    (session,) = ort._sessions.values()
    assert [i.name for i in session.get_inputs()][: len(takes)] == list(takes)


def test_a_table_scored_with_the_family_equals_the_in_process_model(family, engines):
    from xpeft.serve.batch import score_table

    rows = [{"id": i, "text": t, "profile_id": list(PROFILES)[i % len(PROFILES)]} for i, t in enumerate(texts(20, 9))]
    scored = score_table(engines["eager"], pa.Table.from_pylist(rows)).to_pylist()
    assert all(r["error"] is None for r in scored)
    for pid in PROFILES:
        mine = [r for r in scored if r["profile_id"] == pid]
        logits = in_process_logits(family, pid, mine)
        for r, z in zip(mine, logits, strict=True):
            assert torch.allclose(torch.tensor(r["probabilities"]), torch.softmax(z, -1), atol=1e-5), (pid, r["id"])


def test_a_profile_goes_out_to_peft_and_back_as_a_bank_member_with_the_same_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    from xpeft.core.peft_bank import bank_from_peft
    from xpeft.fit.warm_start import bank_member_profile
    from xpeft.profiles.peft_export import HEAD_FILE, export_peft

    rows = [{"text": t} for t in texts(5, seed=11)]
    tokenizer = load_tokenizer(family.backbone)
    batch = Collator(tokenizer.pad_token_id or 0)(tokenize(rows, tokenizer, 128))
    inputs = {k: batch[k] for k in token_inputs(family.encoder())}
    folders = []
    for pid in ("hard-no-ln", "single"):
        folder = export_peft(family.store.get(pid), tmp_path / pid, family.encoder(), family.bank)
        folders.append(str(folder))
        config = json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / HEAD_FILE), framework="pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        d = family.encoder().config.hidden_size
        head = HeadWeights.checked(meta["head"], state, d, int(meta["num_labels"]))
        peft_model = peft.PeftModel.from_pretrained(family.encoder(), str(folder)).eval()
        with torch.no_grad():
            got = head(peft_model(**inputs).last_hidden_state, batch["attention_mask"])
        want = in_process_logits(family, pid, rows)
        assert config["target_modules"] == [FAMILIES[family.model_type].targets["value"].split("[")[0]]
        assert torch.allclose(got, want, atol=1e-5), (pid, (got - want).abs().max())
        assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]) == len(family.bank.A)
    bank = bank_from_peft(folders, target="value", encoder=family.encoder())
    assert bank.target == family.bank.target and bank.N == 2
    for member, pid in enumerate(("hard-no-ln", "single")):
        stored = family.store.get(pid)
        head = {k.removeprefix("head."): v for k, v in stored.tensors.items() if k.startswith("head.")}
        profile = bank_member_profile(bank, member, stored.config, f"m{member}", head_id="own")
        model = XPeftModel(family.encoder(), profile.config, bank)
        apply_profile(model, profile, head)
        with torch.no_grad():
            got = model.eval()(**batch)["logits"]
        assert torch.allclose(got, in_process_logits(family, pid, rows), atol=1e-5), (pid, member)
