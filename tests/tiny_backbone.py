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


# --- the other encoder families, tiny and random, each with a tokenizer built offline -------------------------

# family -> (its tiny config's class and settings, whether its tokenizer gives token type ids). DistilBERT and
# ELECTRA get BERT-style tokenizers that do give type ids (as a BERT tokenizer would): DistilBERT's model takes
# none, so the pipeline must leave them out; RoBERTa's, XLM-R's and ModernBERT's tokenizers give none, as theirs do.
FAMILY_CONFIGS = {
    "modernbert": ("ModernBertConfig", {
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48,
        "local_attention": 8, "global_attn_every_n_layers": 3, "max_position_embeddings": 128,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3,
    }, False),
    "deberta": ("DebertaV2Config", {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128, "relative_attention": True, "position_buckets": 16,
        "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "position_biased_input": False, "type_vocab_size": 0, "max_relative_positions": -1, "pad_token_id": 0,
    }, True),
    "distilbert": ("DistilBertConfig", {
        "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 128, "pad_token_id": 0,
    }, True),
    "roberta": ("RobertaConfig", {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 0,
    }, False),
    "xlm-roberta": ("XLMRobertaConfig", {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 0,
    }, False),
    "electra": ("ElectraConfig", {
        "embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "pad_token_id": 0,
    }, True),
}  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(type_ids: bool):
    """A word-level tokenizer over SPECIALS + WORDS + w0..w59 built with the `tokenizers` library (nothing from a
    hub): lower-cased, split on whitespace, [CLS] a [SEP] (b [SEP]) around the texts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [*SPECIALS, *WORDS, *[f"w{i}" for i in range(60)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if type_ids else [])]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=names, model_max_length=128,
    )  # fmt: skip


def tiny_family_encoder(family: str, seed: int = 0):
    """The tiny random encoder of `family` (no dropout: runs compare exactly), in eval mode."""
    import torch
    import transformers

    config_class, settings, _ = FAMILY_CONFIGS[family]
    dropouts = {k: 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                                 "attention_dropout", "embedding_dropout", "mlp_dropout")}  # fmt: skip
    config = getattr(transformers, config_class)(vocab_size=len(SPECIALS) + len(WORDS) + 60, **settings, **dropouts)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(config).eval()


def make_tiny_family(path: str | os.PathLike, family: str, seed: int = 0) -> str:
    """Write `family`'s tiny random encoder and its tokenizer to `path` (a backbone folder); returns the path."""
    path = str(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        tiny_family_encoder(family, seed).save_pretrained(path)
        tiny_tokenizer(FAMILY_CONFIGS[family][2]).save_pretrained(path)
    return path
