"""GLUE and SuperGLUE task loaders: release files on disk → one `datasets.Dataset` schema.

Every task loads into the columns `text` (str), `text_pair` (str, or None for single-sentence tasks),
`label` (int class index, -1 where a test file has no labels; float score for stsb) and `idx` (int).

Files are read from a data directory in the GLUE/SuperGLUE release layouts (`glue/SST-2/dev.tsv`,
`superglue/CB/val.jsonl`, ...; see ../shared/data/SOURCES.md). The directory is, in order: the
`data_dir` argument, the environment variable XPEFT_DATA_DIR, or ../shared/data beside the repository.
Two special values: `data_dir="sample"` reads the small SST-2 sample shipped in `xpeft/data/samples/`
(train and validation only), and `data_dir="hub"` loads from the Hugging Face hub by name (needs a
network; not used by the tests).

Parsed files are cached as Arrow by `datasets` (keyed on the file's path, size and mtime), so a second
load and `tokenize_dataset`'s map are read from the cache.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a second that the CLI's other commands and the serving path need not pay
    import datasets

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE = "sample"
HUB = "hub"

# csv.QUOTE_NONE TSVs can hold very long fields (passages); lift the default 128 KiB limit.
csv.field_size_limit(1 << 28)


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE/SuperGLUE task: where its files are and how a row becomes (text, text_pair, label, idx)."""

    name: str
    benchmark: str  # "glue" or "superglue"
    folder: str  # release folder under <data_dir>/<benchmark>/, e.g. "SST-2"
    files: dict[str, tuple[str, ...]]  # split → candidate file names in that folder (first present wins)
    label_names: tuple[str, ...]  # index = label id; empty for a regression task
    text_keys: tuple[str, ...]  # row keys for `text` (first present wins: TSV header names, then jsonl)
    pair_keys: tuple[str, ...] = ()  # row keys for `text_pair`; empty for single-sentence tasks
    label_keys: tuple[str, ...] = ("label",)
    metric: str = "accuracy"  # the Table 2/3 column, see xpeft.metrics.main_score
    eval_split: str = "validation"  # the split the paper reports (dev sets; the diagnostic for axb/axg)
    is_regression: bool = False
    train_task: str | None = None  # axb/axg have no train set: they are evaluated with an RTE model
    tsv_names: tuple[str, ...] = ()  # column names for headerless TSVs (CoLA's train/dev)
    hub: tuple[str, str] = ("nyu-mll/glue", "")

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def pair(self) -> bool:
        return bool(self.pair_keys)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


_BENCHMARK_NAMES = {"glue": "GLUE", "superglue": "SuperGLUE"}
_GLUE = {"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)}
_NLI2 = ("entailment", "not_entailment")


def _glue(name: str, folder: str, **kw) -> TaskSpec:
    return TaskSpec(name=name, benchmark="glue", folder=folder, hub=("nyu-mll/glue", name), **{"files": _GLUE, **kw})


def _superglue(name: str, folder: str, **kw) -> TaskSpec:
    return TaskSpec(name=name, benchmark="superglue", folder=folder, hub=("aps/super_glue", name), **kw)


_SG_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl",), "test": ("test.jsonl",)}
_MNLI_FILES = {
    "train": ("train.tsv",),
    "validation_matched": ("dev_matched.tsv", "dev_matched.jsonl"),
    "validation_mismatched": ("dev_mismatched.tsv", "dev_mismatched.jsonl"),
    "test_matched": ("test_matched.tsv",),
    "test_mismatched": ("test_mismatched.tsv",),
}

# fmt: off
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _glue("cola", "CoLA", label_names=("unacceptable", "acceptable"), text_keys=("sentence",), metric="mcc",
          tsv_names=("source", "label", "original_mark", "sentence")),
    _glue("sst2", "SST-2", label_names=("negative", "positive"), text_keys=("sentence",)),
    _glue("mrpc", "MRPC", label_names=("not_equivalent", "equivalent"), text_keys=("#1 String", "sentence1"),
          pair_keys=("#2 String", "sentence2"), label_keys=("Quality", "label"), metric="comb"),
    _glue("qqp", "QQP", label_names=("not_duplicate", "duplicate"), text_keys=("question1",),
          pair_keys=("question2",), label_keys=("is_duplicate", "label"), metric="comb"),
    _glue("stsb", "STS-B", label_names=(), text_keys=("sentence1",), pair_keys=("sentence2",),
          label_keys=("score", "label"), metric="comb", is_regression=True),
    _glue("mnli", "MNLI", label_names=("entailment", "neutral", "contradiction"), files=_MNLI_FILES,
          text_keys=("sentence1", "premise"), pair_keys=("sentence2", "hypothesis"),
          label_keys=("gold_label", "label"), metric="comb", eval_split="validation_matched"),
    _glue("qnli", "QNLI", label_names=_NLI2, text_keys=("question",), pair_keys=("sentence",)),
    _glue("rte", "RTE", label_names=_NLI2, text_keys=("sentence1",), pair_keys=("sentence2",)),
    _glue("wnli", "WNLI", label_names=("not_entailment", "entailment"), text_keys=("sentence1",),
          pair_keys=("sentence2",)),
    _superglue("cb", "CB", files=_SG_FILES, label_names=("entailment", "contradiction", "neutral"),
               text_keys=("premise",), pair_keys=("hypothesis",)),
    # BoolQ labels are JSON booleans (false → 0, true → 1); question first, so truncation cuts the passage.
    _superglue("boolq", "BoolQ", files=_SG_FILES, label_names=("False", "True"), text_keys=("question",),
               pair_keys=("passage",)),
    # The diagnostics are one labelled set each; the paper evaluates them with a model trained on RTE.
    _superglue("axb", "AX-b", files={"test": ("AX-b.jsonl",)}, label_names=_NLI2,
               text_keys=("sentence1", "premise"), pair_keys=("sentence2", "hypothesis"), metric="mcc",
               eval_split="test", train_task="rte"),
    _superglue("axg", "AX-g", files={"test": ("AX-g.jsonl",)}, label_names=_NLI2, text_keys=("premise",),
               pair_keys=("hypothesis",), eval_split="test", train_task="rte"),
]}
# fmt: on

# The bundled sample (xpeft/data/samples/): flat file names, because package data is `samples/*`.
SAMPLE_FILES = {("sst2", "train"): "sst2_train_sample.tsv", ("sst2", "validation"): "sst2_dev_sample.tsv"}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def default_data_dir() -> Path:
    """XPEFT_DATA_DIR if set, else ../shared/data beside the repository."""
    return Path(os.environ.get("XPEFT_DATA_DIR") or SHARED_DATA_DIR)


def _split_name(spec: TaskSpec, split: str) -> str:
    split = split.replace("dev", "validation")
    if spec.name == "mnli" and split in ("validation", "test"):
        split += "_matched"
    if split not in spec.files:
        hint = f"; train on {spec.train_task!r} and evaluate here" if spec.train_task else ""
        raise ValueError(f"{spec.name} has no {split!r} split; it has {', '.join(spec.files)}{hint}")
    return split


def task_file(spec: TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file holding `split` of `spec`, or a FileNotFoundError that says where to put it."""
    split = _split_name(spec, split)
    if str(data_dir) == SAMPLE:
        name = SAMPLE_FILES.get((spec.name, split))
        if name is None:
            have = ", ".join(f"{t} {s}" for t, s in SAMPLE_FILES)
            raise FileNotFoundError(
                f"the bundled sample has only {have}, not {spec.name} {split}; "
                "pass a data_dir with the GLUE/SuperGLUE files"
            )
        return SAMPLES_DIR / name
    folder = Path(data_dir if data_dir is not None else default_data_dir()) / spec.benchmark / spec.folder
    for candidate in spec.files[split]:
        if (folder / candidate).is_file():
            return folder / candidate
    wanted = folder / spec.files[split][0]
    raise FileNotFoundError(
        f"{spec.name} {split}: {wanted} not found. Put the {_BENCHMARK_NAMES[spec.benchmark]} release file "
        f"{spec.folder}/{spec.files[split][0]} there (layout as in ../shared/data/SOURCES.md), or point "
        "--data-dir / XPEFT_DATA_DIR at a folder that has it (or use data_dir='hub' where online)."
    )


def _pick(row: dict, keys: tuple[str, ...], what: str, path: Path, line: int):
    for key in keys:
        if key in row:
            return row[key]
    raise ValueError(f"{path} row {line}: no {what} column (looked for {', '.join(keys)}); got {list(row)}")


def _label(spec: TaskSpec, raw, path: Path, line: int) -> int | float:
    if spec.is_regression:
        return float(raw)
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int) or (isinstance(raw, str) and raw.lstrip("-").isdigit()):
        value = int(raw)
        if -1 <= value < spec.num_labels:
            return value
    elif raw in spec.label_names:
        return spec.label_names.index(raw)
    raise ValueError(f"{path} row {line}: label {raw!r} is not one of {spec.label_names} (or 0..{spec.num_labels - 1})")


def _record(spec: TaskSpec, row: dict, line: int, path: Path) -> dict:
    label_key = next((k for k in spec.label_keys if k in row), None)
    no_label = label_key is None or row[label_key] in (None, "", "-")
    idx = next((row[k] for k in ("idx", "index", "id") if row.get(k) not in (None, "")), line)
    return {
        "text": _pick(row, spec.text_keys, "text", path, line),
        "text_pair": _pick(row, spec.pair_keys, "text_pair", path, line) if spec.pair else None,
        "label": (-1.0 if spec.is_regression else -1) if no_label else _label(spec, row[label_key], path, line),
        "idx": int(idx),
    }


def _read_rows(spec: TaskSpec, path: Path) -> Iterator[dict]:
    """Raw rows as dicts. TSVs are unquoted (QUOTE_NONE) and may start with a BOM (MRPC)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            return
        # A headed TSV names the text column; CoLA's train/dev files have no header at all.
        if any(k in first for k in spec.text_keys) or not spec.tsv_names:
            header = first
        else:
            header = list(spec.tsv_names)
            yield dict(zip(header, first, strict=False))
        for fields in reader:
            if len(fields) != len(header):
                raise ValueError(f"{path}: a row has {len(fields)} fields, the header {len(header)}: {fields[:3]}")
            yield dict(zip(header, fields, strict=True))


def _generate(spec: TaskSpec, path: str, stamp: tuple[int, int]) -> Iterator[dict]:
    # `stamp` (size, mtime) is unused here but part of the datasets cache key: a changed file re-parses.
    for line, row in enumerate(_read_rows(spec, Path(path))):
        yield _record(spec, row, line, Path(path))


def task_features(spec: TaskSpec) -> datasets.Features:
    import datasets

    label = datasets.Value("float64") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "text_pair": datasets.Value("string"),
            "label": label,
            "idx": datasets.Value("int64"),
        }
    )


def load_task(
    name: str, split: str, data_dir: str | os.PathLike | None = None, cache_dir: str | None = None
) -> datasets.Dataset:
    """Load one split of a task as a Dataset with columns text, text_pair, label, idx.

    Splits are "train", "validation" (alias "dev"), "test"; mnli has "validation_matched" and
    "validation_mismatched"; axb and axg have only "test" (their labelled diagnostic set).
    """
    import datasets

    spec = get_task(name)
    if str(data_dir) == HUB:
        return _load_from_hub(spec, _split_name(spec, split))
    path = task_file(spec, split, data_dir)
    st = path.stat()
    try:
        return datasets.Dataset.from_generator(
            _generate,
            features=task_features(spec),
            cache_dir=cache_dir,
            gen_kwargs={"spec": spec, "path": str(path.resolve()), "stamp": (st.st_size, st.st_mtime_ns)},
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ValueError):  # our own parse error: show it, not datasets' wrapper
            raise e.__cause__ from None
        raise


def _load_from_hub(spec: TaskSpec, split: str) -> datasets.Dataset:
    """The same schema from the hub's parquet exports (network needed; kept for online machines)."""
    import datasets

    raw = datasets.load_dataset(spec.hub[0], spec.hub[1], split=split)
    rows = (_record(spec, row, i, Path(f"hub:{spec.hub[0]}/{spec.hub[1]}")) for i, row in enumerate(raw))
    return datasets.Dataset.from_list(list(rows), features=task_features(spec))


def tokenize_dataset(ds: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """Map text/text_pair to input_ids, attention_mask (and token_type_ids where the tokenizer makes them).

    No padding: batches are padded at collate time. Other columns (`label`, `idx`, `profile_id`, ...) are
    kept, so a profile table works too (`datasets.Dataset(table)`). The map is cached by datasets'
    fingerprint (dataset + tokenizer + max_length) when `ds` is backed by cache files.
    """
    if "text" not in ds.column_names:
        raise ValueError(f"tokenize_dataset needs a 'text' column; the dataset has {ds.column_names}")

    def encode(batch: dict) -> dict:
        pairs = batch.get("text_pair")
        pairs = pairs if pairs is not None and any(p is not None for p in pairs) else None
        return tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)

    drop = [c for c in ("text", "text_pair") if c in ds.column_names]
    return ds.map(encode, batched=True, remove_columns=drop, desc="tokenize")
