"""Adapters users already have, in and out: LoRA adapters saved by PEFT itself become a bank whose member i,
used alone (one-hot masks, no LayerNorm), computes what PEFT computes with adapter i; a profile written as a
PEFT folder loads with `PeftModel.from_pretrained` and gives the profile's logits. peft is a test dependency
only: xpeft reads and writes the files without it."""

from __future__ import annotations

import json
import logging

import peft
import pytest
import torch
from cases import BANK, BY_NAME, fitted_profile
from conftest import tiny_batch, tiny_encoder
from safetensors import safe_open

from xpeft.cli import main as xpeft
from xpeft.config import XPeftConfig
from xpeft.core.bank import load_bank
from xpeft.core.head import HeadWeights
from xpeft.core.model import XPeftModel
from xpeft.core.peft_bank import bank_from_peft, read_peft_adapter
from xpeft.fit.warm_start import bank_member_profile
from xpeft.profiles.peft_export import HEAD_FILE, export_peft, why_not_lora
from xpeft.profiles.record import apply_profile
from xpeft.profiles.store import ProfileStore

TARGET = "attention.self.value"


def save_peft_adapter(path, seed: int, r: int = 4, alpha: float = 8.0, encoder=None, **lora) -> str:
    """A LoRA adapter as PEFT saves it, with random A and B (as if trained) on the tiny encoder."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        **{"target_modules": ["value"], "r": r, "lora_alpha": alpha, "init_lora_weights": False, **lora}
    )
    model = peft.get_peft_model(encoder or tiny_encoder(), config)
    model.save_pretrained(str(path))
    return str(path)


def peft_hidden(folder: str, batch: dict) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(tiny_encoder(), folder).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def member_logits(bank, member: int, batch: dict, head_state: dict | None = None):
    """Logits of the x_peft model with bank member `member` alone (k = 1, no LN), and its head's state."""
    profile = bank_member_profile(bank, member, XPeftConfig(head="linear"), f"member-{member}", head_id="shared")
    model = XPeftModel(tiny_encoder(), profile.config, bank, seed=1)
    head_state = head_state or {k: v.clone() for k, v in model.head.state_dict().items()}
    apply_profile(model, profile, head_state)
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"], batch["attention_mask"])["logits"]
    return logits, model.head.eval()


@pytest.fixture
def adapters(tmp_path) -> list[str]:
    """Three PEFT adapters of rank 4, each with its own lora_alpha (and one with rsLoRA's scaling)."""
    return [
        save_peft_adapter(tmp_path / "a0", seed=1, alpha=8.0),
        save_peft_adapter(tmp_path / "a1", seed=2, alpha=2.0),
        save_peft_adapter(tmp_path / "a2", seed=3, alpha=6.0, use_rslora=True),
    ]


def test_bank_member_i_alone_reproduces_the_peft_model_with_adapter_i(adapters):
    bank = bank_from_peft(adapters, encoder=tiny_encoder())
    assert (bank.N, bank.L, bank.b, bank.target, bank.source) == (3, 2, 4, TARGET, "peft")
    batch = tiny_batch()
    for i, folder in enumerate(adapters):
        logits, head = member_logits(bank, i, batch)
        hidden = peft_hidden(folder, batch)
        with torch.no_grad():
            want = head(hidden, batch["attention_mask"])
        assert torch.allclose(logits, want, atol=1e-5), (i, (logits - want).abs().max())
    # and the scale matters: without lora_alpha / r folded in, member 1 would be 4x too strong
    assert not torch.allclose(member_logits(bank, 0, batch)[0], member_logits(bank, 1, batch)[0], atol=1e-3)


def test_a_bank_from_peft_round_trips_through_its_file(adapters, tmp_path):
    out = tmp_path / "bank.safetensors"
    xpeft(["bank", "from-peft", *adapters, "--out", str(out)])
    bank = load_bank(out)
    assert torch.equal(bank.A, bank_from_peft(adapters).A) and bank.source == "peft"


def test_mixed_ranks_are_refused(tmp_path, adapters):
    other = save_peft_adapter(tmp_path / "r2", seed=4, r=2)
    with pytest.raises(ValueError, match="different ranks r"):
        bank_from_peft([*adapters, other])


def test_adapters_of_another_base_model_are_refused(tmp_path, adapters):
    wider = save_peft_adapter(tmp_path / "wide", seed=5, encoder=tiny_encoder(hidden_size=48))
    with pytest.raises(ValueError, match="different dimensions"):
        bank_from_peft([adapters[0], wider])
    with pytest.raises(ValueError, match="do not fit this backbone"):
        bank_from_peft([wider], encoder=tiny_encoder())
    named = tiny_encoder()
    named.config._name_or_path = named.name_or_path = "org/another-model"
    elsewhere = save_peft_adapter(tmp_path / "named", seed=6, encoder=named)
    assert read_peft_adapter(elsewhere).base_model == "org/another-model"
    first = tiny_encoder()
    first.config._name_or_path = first.name_or_path = "org/this-model"
    here = save_peft_adapter(tmp_path / "here", seed=7, encoder=first)
    with pytest.raises(ValueError, match="different base models"):
        bank_from_peft([here, elsewhere])


def test_an_adapter_on_more_linears_is_refused_unless_the_others_are_dropped(tmp_path, adapters, caplog):
    qv = save_peft_adapter(tmp_path / "qv", seed=8, target_modules=["query", "value"])
    with pytest.raises(ValueError, match=r"also adapts \['attention.self.query'\]"):
        bank_from_peft([adapters[0], qv])
    with pytest.raises(ValueError, match="choose it with"):  # no common single target to infer
        bank_from_peft([qv])
    with caplog.at_level(logging.WARNING):
        bank = bank_from_peft([adapters[0], qv], target=TARGET, drop_other_targets=True)
    assert bank.N == 2 and "dropped its LoRA pairs on ['attention.self.query']" in caplog.text
    q_only = save_peft_adapter(tmp_path / "q", seed=9, target_modules=["query"])
    with pytest.raises(ValueError, match="no LoRA pair on 'attention.self.value'"):
        bank_from_peft([adapters[0], q_only], target=TARGET)
    assert bank_from_peft([q_only]).target == "attention.self.query"  # inferred: its one linear


def test_an_adapter_missing_a_block_or_using_dora_is_refused(tmp_path):
    partial = save_peft_adapter(tmp_path / "partial", seed=10, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"in blocks \[1\] of 2"):
        bank_from_peft([partial], encoder=tiny_encoder())
    dora = save_peft_adapter(tmp_path / "dora", seed=11, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        bank_from_peft([dora])
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        bank_from_peft([str(tmp_path)])


# --- a profile out to PEFT ----------------------------------------------------------------------------------

EXPORTABLE = ["hard-no-ln", "single", "single-alpha", "mtl-member"]


def exportable_profile(name: str):
    """(model, profile, shared head) of a case that can be written as LoRA; 'mtl-member' is an mtl warm-start
    profile (one-hot masks over its own bank member, the shared head)."""
    if name != "mtl-member":
        model, profile = fitted_profile(name)
        return model, profile, None
    profile = bank_member_profile(BANK, 3, XPeftConfig(head="linear"), "mtl-member", head_id="shared")
    model = XPeftModel(tiny_encoder(), profile.config, BANK, seed=3)
    state = {k: v.clone() for k, v in model.head.state_dict().items()}
    apply_profile(model, profile, state)
    return model.eval(), profile, state


@pytest.mark.parametrize("name", EXPORTABLE)
def test_an_exported_profile_loads_in_peft_with_identical_logits(name, tmp_path):
    model, profile, shared = exportable_profile(name)
    folder = export_peft(profile, tmp_path / name, tiny_encoder(), BANK, shared, base_model="tiny-test")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == profile.config.b and config["base_model_name_or_path"] == "tiny-test"
    with safe_open(str(folder / HEAD_FILE), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    head = HeadWeights.checked(meta["head"], state, 32, int(meta["num_labels"]))
    batch = tiny_batch()
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"])["logits"]
    got = head(peft_hidden(str(folder), batch), batch["attention_mask"])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_profile_with_the_layernorm_or_without_an_adapter_is_refused_with_the_reason(tmp_path):
    _, with_ln = fitted_profile("hard")
    with pytest.raises(ValueError, match="not linear in x, so no LoRA pair"):
        export_peft(with_ln, tmp_path / "ln", tiny_encoder(), BANK)
    assert "--no-layer-norm" in why_not_lora(with_ln)
    _, head_only = fitted_profile("head-only")
    assert "no adapter to write" in why_not_lora(head_only)
    assert not (tmp_path / "ln").exists()


def test_profiles_exported_to_peft_come_back_as_bank_members(tmp_path):
    folders = []
    for i, name in enumerate(["hard-no-ln", "single"]):
        _, profile = fitted_profile(BY_NAME[name], seed=i)
        folders.append(str(export_peft(profile, tmp_path / name, tiny_encoder(), BANK)))
    bank = bank_from_peft(folders, encoder=tiny_encoder())
    batch = tiny_batch()
    for i, folder in enumerate(folders):
        logits, head = member_logits(bank, i, batch)
        with torch.no_grad():
            want = head(peft_hidden(folder, batch), batch["attention_mask"])
        assert torch.allclose(logits, want, atol=1e-5)


def test_export_peft_command_writes_a_stored_profile(tmp_path):
    from tiny_backbone import make_tiny_backbone

    from xpeft.core.encoder import load_encoder

    backbone = make_tiny_backbone(tmp_path / "tiny")
    store = ProfileStore(tmp_path / "store")
    store.save_bank(BANK)
    _, profile = fitted_profile("hard-no-ln", "p1", encoder=load_encoder(backbone))
    _, with_ln = fitted_profile("hard", "p2", encoder=load_encoder(backbone))
    store.write([profile, with_ln])
    out = tmp_path / "p1-peft"
    xpeft(["profiles", "export-peft", "--store", str(store.uri), "p1", "--out", str(out), "--backbone", backbone])
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", HEAD_FILE}
    with pytest.raises(SystemExit) as e:
        xpeft(["profiles", "export-peft", "--store", str(store.uri), "p2", "--out", str(tmp_path / "p2")])
    assert e.value.code == 2
