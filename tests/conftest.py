"""Shared fixtures: tiny random BERT encoders (milliseconds a step), offline settings."""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs more torch threads than the machine has cores (two workers, their scripts, Ray's processes), and
# OpenMP's threads spin while they wait for each other by default: on 2 cores two processes of 2 threads each burnt
# 8x the CPU of their work (benchmarks/bank_growth.py --smoke twice at once: 168 CPU-s, 21 with this). Waiting
# threads sleep instead, here and in every process the suite starts (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every Ray the suite starts (in process, or in a script it runs) gives a starting Serve proxy 60 s, not 5, to be
# ready, as `xpeft serve` does (xpeft.serve.proxy.install): on 2 busy cores a proxy killed at 5 s fails serve.start.
from xpeft.serve.proxy import READY_TIMEOUT_ENV, READY_TIMEOUT_S  # noqa: E402 (Starlette only)

os.environ.setdefault(READY_TIMEOUT_ENV, READY_TIMEOUT_S)
# Encoder graphs the tests export go to one temporary cache (Ray replicas inherit it), not ~/.cache.
_ONNX_CACHE = tempfile.TemporaryDirectory(prefix="xpeft-onnx-tests-")
os.environ.setdefault("XPEFT_ONNX_CACHE", _ONNX_CACHE.name)

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_encoder(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray with 2 CPUs for one test module (a cluster already up is reused, left running)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny random BERT saved as a model directory (tests/tiny_backbone.py), one per test module."""
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def encoder():
    return tiny_encoder()


def tiny_batch(n: int = 4, T: int = 9, seed: int = 0, labels: int | None = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, T - 3 :] = 0  # one padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch["labels"] = torch.randint(0, labels, (n,), generator=g)
    return batch


def tiny_rows(n: int = 24, seed: int = 0, num_labels: int = 2) -> list[dict]:
    """Tokenized rows whose label is learnable from the first token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        T = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(5, TINY["vocab_size"], (T,), generator=g).tolist()
        label = ids[0] % num_labels
        rows.append({"input_ids": ids, "attention_mask": [1] * T, "labels": label})
    return rows


def eventually(condition, what: str = "it", hang_guard_s: float = 60.0, poll_s: float = 0.02) -> None:
    """Wait for `condition`; the guard only keeps a broken part from hanging the suite (not a time claim)."""
    deadline = time.monotonic() + hang_guard_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(poll_s)


# --- data fixtures ---
from pathlib import Path  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir() -> Path:
    """../shared/data (or XPEFT_DATA_DIR); skips the calling test where it is absent."""
    d = Path(os.environ.get("XPEFT_DATA_DIR") or SHARED_DATA)
    if not (d / "glue").is_dir():
        pytest.skip(
            f"shared data not found at {d}: these tests read the real GLUE/SuperGLUE/news files "
            "(set XPEFT_DATA_DIR to a folder laid out as ../shared/data)"
        )
    return d


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> str:
    """A per-session datasets cache, so tests neither read nor fill ~/.cache."""
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


# --- end data fixtures ---


# --- the count of generated API cases (tests/test_api.py, tests/test_serving.py), shown after the run ---
from collections import Counter  # noqa: E402

API_CASES = pytest.StashKey[Counter]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(API_CASES, None)
    if counts:
        terminalreporter.section("API cases generated from the OpenAPI schema (schemathesis)")
        for label, n in sorted(counts.items()):
            terminalreporter.write_line(f"{n:6d}  {label}")
        terminalreporter.write_line(f"{sum(counts.values()):6d}  in all")


def pytest_testnodedown(node, error):
    """pytest-xdist: a worker's counts of generated API cases join the controller's (shown after the run)."""
    counts = getattr(node, "workeroutput", {}).get("api_cases")
    if counts:
        node.config.stash.setdefault(API_CASES, Counter()).update(counts)


# --- running in parallel (pytest-xdist, `make test`: -n 2 --dist loadscope) --------------------------------
# A module's tests (a class's, for a class) go to one worker, in order: its module-scoped Ray, Serve or store is
# set up once, and the scratch doc blocks see what the blocks before them wrote. The modules that take longest go
# out first, so the two workers end close together (the 2026-12-06 suite's durations on this 2-core machine).
# Smoke runs are shared between workers (tests/test_benchmarks.py, runs_dir).
LONGEST_FIRST = ("test_docs", "test_benchmarks", "test_serving", "test_on_demand", "test_cluster", "test_farm")


# The benchmark blocks of the docs (tests/test_docs.py::TestBenchmarkBlocks) share test_benchmarks.py's scope, so
# one worker runs both, one after the other: they share their smoke runs (the first to ask makes one, the other
# reads it), and on two workers the second asker sat idle until the first had made it (94 s for serve_load's).
SCOPE_OF = {"tests/test_docs.py::TestBenchmarkBlocks": "tests/test_benchmarks.py"}


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with SCOPE_OF's scopes merged; any other --dist as pytest-xdist makes it."""
    if config.getoption("dist", None) != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class MergedScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SCOPE_OF.get(scope, scope)

    return MergedScopes(config, log)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.module.__name__
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # a worker: hand the API case counts to the controller
        session.config.workeroutput["api_cases"] = dict(session.config.stash.get(API_CASES, Counter()))
        return
    import shutil

    from test_benchmarks import runs_dir

    shutil.rmtree(runs_dir(), ignore_errors=True)  # the run's shared smoke runs, once every worker is done


def pytest_configure(config):
    """One id for this test run, in the environment of the controller and (through xdist's --testrunuid) of
    every worker: the name of the folder of smoke runs they share."""
    if hasattr(config, "workerinput"):
        return
    import uuid

    uid = getattr(config.option, "testrunuid", None) or os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    if hasattr(config.option, "testrunuid"):
        config.option.testrunuid = uid
    os.environ["PYTEST_XDIST_TESTRUNUID"] = uid
