"""A tiny random BERT saved as a real model directory (config, weights, tokenizer), so code that loads a
backbone by path (the farm's actors, the Serve replicas, `ray job submit` runs) can use it offline."""

from __future__ import annotations

import os

WORDS = (
    "the a an and or not good bad great awful movie film story plot actor news politics sports music art "
    "travel food health business crime school parents women religion science tech style culture love hate "
    "fun boring new old big small happy sad fast slow game team vote election money market recipe trip"
).split()


def make_tiny_backbone(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a 2-block, hidden-32 BertModel and a word-level BertTokenizer to `path`; returns the path."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = str(path)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"w{i}" for i in range(60)]]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    return path
