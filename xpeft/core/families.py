"""The encoder families xpeft knows, and what a target means in each (as PEFT keeps a table of default target
modules per architecture, `peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).

A target is given by meaning (`value`, the default; `query`, `attention_output`, `ffn_output`), resolved here to
the family's linear inside each block, or as that linear's dotted path inside a block (`attention.self.value`), or
as a bare name that ends exactly one linear's path (`v_lin`); a bare name that ends several (ModernBERT's `Wo` is
in its attention and in its MLP) is refused, naming them. What a profile, a bank or an exported graph records is
always the resolved path, so stored records keep matching whatever the meaning resolves to.

A fused projection is adapted on a slice of its outputs: `attn.Wqkv[2/3]` is part 2 (counting from 0) of 3
equal parts of ModernBERT's fused Q, K, V projection, its value rows; the adapter adds B̂·Âx to those rows only.
`attn.Wqkv` (no part) adapts the whole fused linear. ModernBERT's `value` is the value slice (README, "Backbones
and data", says why and how to measure it against the whole linear).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from torch import nn

MEANINGS = ("value", "query", "attention_output", "ffn_output")


@dataclass(frozen=True)
class Family:
    """Where an encoder family keeps its blocks, which linear each target meaning is, and whether its bare model
    has a pooler (BERT's dense + tanh on [CLS])."""

    blocks: str  # the module path of the list of transformer blocks
    targets: dict[str, str]  # meaning -> the linear's path inside a block (a fused one with its [part/parts])
    pooler: bool


_BERT_TARGETS = {
    "value": "attention.self.value",
    "query": "attention.self.query",
    "attention_output": "attention.output.dense",
    "ffn_output": "output.dense",
}

# Keyed by the config's model_type. Everything the code resolves, refuses and documents comes from here (the
# README's table of families is generated from it, and tests/test_families.py holds the two equal).
FAMILIES: dict[str, Family] = {
    "bert": Family("encoder.layer", _BERT_TARGETS, pooler=True),
    "roberta": Family("encoder.layer", _BERT_TARGETS, pooler=True),
    "xlm-roberta": Family("encoder.layer", _BERT_TARGETS, pooler=True),
    "electra": Family("encoder.layer", _BERT_TARGETS, pooler=False),
    "deberta-v2": Family(
        "encoder.layer",
        {
            "value": "attention.self.value_proj",
            "query": "attention.self.query_proj",
            "attention_output": "attention.output.dense",
            "ffn_output": "output.dense",
        },
        pooler=False,
    ),
    "distilbert": Family(
        "transformer.layer",
        {
            "value": "attention.v_lin",
            "query": "attention.q_lin",
            "attention_output": "attention.out_lin",
            "ffn_output": "ffn.lin2",
        },
        pooler=False,
    ),  # fmt: skip
    "modernbert": Family(
        "layers",
        {"value": "attn.Wqkv[2/3]", "query": "attn.Wqkv[0/3]", "attention_output": "attn.Wo", "ffn_output": "mlp.Wo"},
        pooler=False,
    ),
}

_PART = re.compile(r"^(?P<path>[\w.]+?)(?:\[(?P<part>\d+)/(?P<parts>\d+)\])?$")


def split_target(target: str) -> tuple[str, tuple[int, int] | None]:
    """('attn.Wqkv', (2, 3)) for 'attn.Wqkv[2/3]'; (path, None) for a target without a part."""
    m = _PART.match(target)
    if m is None:
        raise ValueError(
            f"target {target!r} is neither a meaning ({', '.join(MEANINGS)}) nor a linear's dotted path inside a "
            "block (e.g. attention.self.value, or attn.Wqkv[2/3] for a part of a fused linear)"
        )
    if m["part"] is None:
        return m["path"], None
    part, parts = int(m["part"]), int(m["parts"])
    if not 0 <= part < parts:
        raise ValueError(f"target {target!r}: part {part} of {parts} does not exist (parts count from 0)")
    return m["path"], (part, parts)


def family_name(encoder_or_config) -> str:
    config = getattr(encoder_or_config, "config", encoder_or_config)
    return str(getattr(config, "model_type", "") or "")


def family_of(encoder_or_config) -> Family | None:
    return FAMILIES.get(family_name(encoder_or_config))


def target_path(target: str, model_type: str | None) -> str:
    """A meaning resolved for the family `model_type`; anything else as it is (a path, or a bare name that only
    the encoder's modules can resolve: `resolve_target`)."""
    if target not in MEANINGS:
        return target
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ValueError(
            f"target {target!r} is a meaning resolved per encoder family, and {model_type or 'this encoder'!r} is "
            f"not one of {sorted(FAMILIES)}: give the linear's dotted path inside a block instead (--target)"
        )
    return family.targets[target]


def block_linears(block: nn.Module) -> list[str]:
    """The paths of the nn.Linear modules inside a block (a linear xpeft already wrapped under its own path)."""
    names = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            names.append(name.removesuffix(".base") if name.endswith(".base") else name)
    return names


def resolve_target(encoder: nn.Module, target: str, block: nn.Module | None = None) -> str:
    """The dotted path (with its part, for a slice of a fused linear) of the linear `target` names inside each
    of `encoder`'s blocks: a meaning resolved for its family, a path checked, a bare name matched against the
    ends of the block's linear paths. A ValueError naming the block's linears when none or several fit."""
    from xpeft.core.encoder import encoder_blocks

    resolved = target_path(target, family_name(encoder))
    path, part = split_target(resolved)
    block = block if block is not None else encoder_blocks(encoder)[0]
    linears = block_linears(block)
    if path in linears:
        return resolved
    ends = [name for name in linears if name.endswith("." + path)]
    if len(ends) == 1:
        return ends[0] + resolved[len(path) :]
    where = f"the {family_name(encoder) or type(encoder).__name__} encoder's blocks"
    if len(ends) > 1:
        raise ValueError(
            f"target {target!r} is ambiguous: it ends {len(ends)} linears of {where}, {ends}; give the full path "
            f"inside a block (--target {ends[0]}), or a meaning ({', '.join(MEANINGS)})"
        )
    raise ValueError(f"target {target!r} is no linear of {where}; the linears there are {linears}")


def token_inputs(encoder: nn.Module) -> tuple[str, ...]:
    """The token tensors `encoder` takes: input_ids and attention_mask, and token_type_ids only where its forward
    takes them and it has at least two token types (RoBERTa has one, ModernBERT and DistilBERT take none): a
    tokenizer's type ids are dropped for the others, never fed to a model that rejects or misreads them."""
    names = ("input_ids", "attention_mask")
    takes = "token_type_ids" in inspect.signature(encoder.forward).parameters
    types = getattr(encoder.config, "type_vocab_size", 2)
    return (*names, "token_type_ids") if takes and (types or 0) >= 2 else names


def unpackable(encoder: nn.Module) -> str | None:
    """Why a packed batch (xpeft.core.packing: one block-diagonal 4D mask) cannot give this encoder's padded
    results whatever the rows, known from its config (None: nothing known; the fit still compares the two on its
    rows). ModernBERT's sliding-window layers build their window from a 2D mask and take a 4D mask as it is: a
    packed row longer than the window would attend past it, so a check on short rows would pass and mislead."""
    if "sliding_attention" in (getattr(encoder.config, "layer_types", None) or ()):
        return (
            f"the {family_name(encoder) or type(encoder).__name__} encoder's sliding-window attention layers take a "
            "packed batch's mask as it is, without their window, so rows longer than the window would attend past it"
        )
    return None


def check_encoder_config(config, name: str) -> None:
    """Refuse what is not an encoder before loading its weights: an encoder-decoder or a decoder-only model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = family_name(config)
    fix = f"xpeft adapts encoders: bring one of the families {sorted(FAMILIES)} (or another BERT-like encoder)"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name!r} is an encoder-decoder model ({kind}), not an encoder; {fix}")
    decoder_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if kind not in FAMILIES and (decoder_only or getattr(config, "is_decoder", False)):
        raise ValueError(f"{name!r} is a decoder-only model ({kind}), not an encoder; {fix}")


def families_table() -> str:
    """The README's table of the supported families and what each target meaning resolves to."""
    rows = [
        "| family (`model_type`) | blocks | " + " | ".join(f"`{m}`" for m in MEANINGS) + " | `pooler` head |",
        "|---" * (len(MEANINGS) + 3) + "|",
    ]
    for name, family in FAMILIES.items():
        targets = " | ".join(f"`{family.targets[m]}`" for m in MEANINGS)
        rows.append(f"| `{name}` | `{family.blocks}` | {targets} | {'yes' if family.pooler else 'no'} |")
    return "\n".join(rows)
