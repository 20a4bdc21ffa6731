"""The encoder families beyond the pipeline: a Ray Train DDP step on the family furthest from BERT (tests/
tiny_backbone.py's ModernBERT), `xpeft params` counting what each family's model trains, the README's table of families
being the mapping the code resolves with, and the clear refusals: a `pooler` head on an encoder without one, an
ambiguous bare name, a meaning on a family xpeft does not know, an encoder-decoder or decoder-only checkpoint,
a block list that cannot be found, a bank made for another architecture; and the smoke run of the benchmark of
their cost at real size (benchmarks/encoder_families.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_backbone import FAMILY_CONFIGS, make_tiny_family, tiny_family_encoder

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.accounting import dims_of, head_params, table, trainable_params
from xpeft.core.bank import random_bank, random_bank_for
from xpeft.core.encoder import adapted_dims, encoder_blocks, load_encoder, load_tokenizer
from xpeft.core.families import FAMILIES, families_table, family_name, resolve_target, target_path
from xpeft.core.layer import adapters
from xpeft.core.model import XPeftModel
from xpeft.data.tokens import tokenize
from xpeft.fit.batching import Batching, use_bf16

FAMILY_IDS = list(FAMILY_CONFIGS)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, str]:
    return {f: make_tiny_family(tmp_path_factory.mktemp(f), f) for f in FAMILY_IDS}


# Ray Train runs the fit loop each row of the table runs in tests/test_families.py (in process), here in DDP on two
# workers that load the backbone by path. A run costs a controller and a process per worker (~45 CPU-s on this
# 2-core machine), so one family takes it: ModernBERT, whose shape differs most from BERT's (a fused Wqkv of which
# the adapter takes the value part, no pooler, no token type ids): DDP must sync a gradient that reaches only
# part of a linear's outputs.
@pytest.mark.ray
def test_ray_train_fits_a_ddp_step_of_modernbert_and_stores_its_profile(backbones, local_ray, tmp_path):
    from xpeft.fit.task import FitConfig, TaskData
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.train import fit_distributed

    family = "modernbert"
    backbone = backbones[family]
    tokenizer = load_tokenizer(backbone)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["good film", "bad plot and story", "great", "awful"])]
    cfg = FitConfig(
        xpeft=XPeftConfig(mode="x_peft", mask_type="hard", N=8, k=2, b=4, head="cls"),
        train=TrainConfig(epochs=1, batch_size=4, max_steps=1),
        backbone=backbone,
        num_workers=2,
        storage_path=str(tmp_path / "runs"),
        store=str(tmp_path / "store"),
        profile_id=f"{family}-ddp",
    )
    report = fit_distributed(
        cfg, TaskData(train=tokenize(rows * 2, tokenizer, 32), pad_token_id=tokenizer.pad_token_id)
    )
    assert report.world_size == 2 and report.steps == 1 and torch.isfinite(torch.tensor(report.losses)).all()
    assert report.replica_max_abs_diff == 0.0  # the two replicas hold the same trained tensors
    stored = ProfileStore(tmp_path / "store").get(f"{family}-ddp")
    assert stored.config.target == FAMILIES[family_name(load_encoder(backbone))].targets["value"]


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("mode", ["x_peft", "single_adapter", "head_only"])
def test_xpeft_params_counts_what_each_family_model_trains(family, mode, backbones):
    """Per head the family can have (cls and linear always, pooler where it has one), the count `xpeft params`
    prints is the model's own trainable parameters."""
    dims = dims_of(backbones[family])
    heads = ["cls", "linear", *(["pooler"] if FAMILIES[dims.family].pooler else [])]
    for head in heads:
        encoder = load_encoder(backbones[family])
        cfg = XPeftConfig(mode=mode, N=8, k=2, b=4, head=head, num_labels=3)
        model = XPeftModel(encoder, cfg, random_bank_for(encoder, cfg) if mode == "x_peft" else None)
        counted = trainable_params(mode, 8, 4, dims) + head_params(dims.d, 3, head)
        assert counted == sum(p.numel() for p in model.trainable_parameters().values()), (head, mode)
        assert f"({counted:,})" in table(backbones[family], [8], 4, 3, head)


def test_xpeft_params_refuses_a_pooler_head_for_modernbert_and_counts_its_cls_head():
    with pytest.raises(ValueError, match="has no pooler.*--head cls"):
        table("answerdotai/ModernBERT-base", [100], 48, 2, "pooler")
    assert "head 'cls' with c=2 labels = 1,538 parameters" in table("answerdotai/ModernBERT-base", [100], 48, 2, "cls")


def test_the_readme_table_of_families_is_the_mapping_the_code_resolves_with():
    assert families_table() in README.read_text(), "README.md's family table is stale: paste families_table()"
    for name, family in FAMILIES.items():
        assert f"| `{name}` | `{family.blocks}` | `{family.targets['value']}` |" in families_table()


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_a_pooler_head_is_refused_for_an_encoder_without_one_naming_the_heads_that_fit(family):
    encoder = tiny_family_encoder(family)
    cfg = XPeftConfig(N=8, k=2, b=4, head="pooler")
    if FAMILIES[family_name(encoder)].pooler:
        assert XPeftModel(encoder, cfg, random_bank_for(encoder, cfg)).head.dense is not None
        return
    with pytest.raises(ValueError, match=r"has no pooler.*head='cls'.*head='linear'"):
        XPeftModel(encoder, cfg, random_bank_for(encoder, cfg))


def test_modernbert_fused_qkv_is_adapted_whole_or_on_its_value_rows_and_a_bare_wo_is_ambiguous():
    encoder = tiny_family_encoder("modernbert")
    d = encoder.config.hidden_size
    assert resolve_target(encoder, "value") == "attn.Wqkv[2/3]" and adapted_dims(encoder, "value")[2] == d
    assert resolve_target(encoder, "Wqkv") == "attn.Wqkv" and adapted_dims(encoder, "attn.Wqkv")[2] == 3 * d
    with pytest.raises(ValueError, match=r"'Wo' is ambiguous.*\['attn.Wo', 'mlp.Wo'\]"):
        resolve_target(encoder, "Wo")
    with pytest.raises(ValueError, match="part 3 of 3 does not exist"):
        resolve_target(encoder, "attn.Wqkv[3/3]")
    assert resolve_target(tiny_family_encoder("distilbert"), "v_lin") == "attention.v_lin"  # a bare name that fits


def test_the_value_rows_of_the_fused_linear_are_all_the_adapter_changes():
    """An adapter on attn.Wqkv[2/3] changes the value outputs only: queries and keys stay the encoder's own."""
    encoder = tiny_family_encoder("modernbert")
    block = encoder_blocks(encoder)[0]
    x = torch.randn(3, 5, encoder.config.hidden_size)
    before = block.attn.Wqkv(x)
    cfg = XPeftConfig(N=8, k=2, b=4, head="cls", mask_type="soft")
    model = XPeftModel(encoder, cfg, random_bank_for(encoder, cfg, seed=1))
    with torch.no_grad(), adapters(model.adapted, model.combined_adapters()):
        after = block.attn.Wqkv(x)
    d = encoder.config.hidden_size
    assert torch.equal(after[..., : 2 * d], before[..., : 2 * d])
    assert not torch.allclose(after[..., 2 * d :], before[..., 2 * d :])


def test_a_meaning_on_an_encoder_family_xpeft_does_not_know_names_the_ones_it_does():
    with pytest.raises(ValueError, match=r"'mpnet' is\s+not one of \[.*'modernbert'.*\].*dotted path"):
        target_path("value", "mpnet")


@pytest.mark.parametrize(
    "config,kind",
    [("T5Config", "encoder-decoder"), ("BartConfig", "encoder-decoder"), ("GPT2Config", "decoder-only"),
     ("LlamaConfig", "decoder-only")],
)  # fmt: skip
def test_encoder_decoder_and_decoder_only_checkpoints_are_refused_naming_the_families(config, kind, tmp_path):
    import transformers

    getattr(transformers, config)().save_pretrained(tmp_path)  # the config alone: refused before any weights
    with pytest.raises(ValueError, match=rf"is an? {kind} model.*families \[.*'deberta-v2'.*'modernbert'"):
        load_encoder(str(tmp_path))


def test_an_encoder_whose_blocks_cannot_be_found_is_refused_naming_the_families():
    encoder = tiny_family_encoder("electra")
    encoder.config.num_hidden_layers = 5  # no list of 5 blocks anywhere
    with pytest.raises(ValueError, match=r"found no list of 5 transformer blocks.*families it knows"):
        encoder_blocks(encoder)


def test_a_bank_made_for_another_architecture_is_refused_naming_both():
    bert_bank = random_bank(2, 8, 4, 32, target="attention.self.value")
    with pytest.raises(ValueError, match=r"modernbert encoder has L=3.*'attn.Wqkv\[2/3\]'.*'attention.self.value'"):
        XPeftModel(tiny_family_encoder("modernbert"), XPeftConfig(N=8, k=2, b=4, head="cls"), bert_bank)
    with pytest.raises(ValueError, match=r"distilbert encoder's 'attention.v_lin'.*'attention.self.value'"):
        XPeftModel(tiny_family_encoder("distilbert"), XPeftConfig(N=8, k=2, b=4, head="cls"), bert_bank)


def test_the_family_cost_benchmark_prints_a_row_of_fit_and_forward_costs_per_backbone():
    from test_benchmarks import assert_ran, run_smoke

    r = run_smoke("encoder_families.py")  # the suite's one smoke run of it (tests/test_benchmarks.py)
    assert_ran(r)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in r.stdout.splitlines() if line[:2] == "| "}
    for name in ("minilm", "bert-base", "modernbert-base", "deberta-v3-base"):
        cells = rows[name]
        assert len(cells) == 10 and all(float(c.strip(" |")) > 0 for c in cells[5:]), r.stdout
    # sliding-window layers: the fit pads; in bf16 where this CPU has it natively, as the fit's default does
    padded = Batching(None, use_bf16("auto", torch.device("cpu"))[0]).describe()
    assert rows["modernbert-base"][4] == padded, r.stdout
