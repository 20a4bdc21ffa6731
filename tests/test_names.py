"""One public vocabulary: the HTTP API (its OpenAPI schema), the batch output (its Parquet schema) and the CLI's
JSON (`xpeft profiles show` / `list`) name each thing as the README's "Public names" table does, the same thing
by the same name everywhere, and none of them uses a name that was replaced; a script that still passes an old
flag or setting is told the new one."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from cases import fitted_profile

from xpeft.cli import main as xpeft
from xpeft.fit.task import FitConfig
from xpeft.flags import renamed_fields
from xpeft.profiles.store import ProfileStore
from xpeft.ray.farm import FarmConfig
from xpeft.serve.batch import OPTIONAL, OUTPUT, REQUIRED
from xpeft.serve.config import ServeConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# What a client reads (and sends).
CLIENT_SCHEMAS = ("ClassifyRequest", "ClassifyResponse", "Prediction", "ProfileInfo", "FitRequest", "FitJob")
# Outputs renamed for issue 25 (old -> new); the configs' renamed fields come from their `renamed_from`.
RENAMED_OUTPUTS = {"scores": "probabilities", "score": "value", "size_bytes": "record_bytes"}
RENAMED_OUTPUTS |= {"size_report": "record_bytes_by_part"}
CONFIGS = (ServeConfig, FarmConfig, FitConfig)


def contract() -> list[str]:
    """The names of the README's "Public names" table, in order (a row may name several)."""
    section = README.read_text().split("\n## Public names\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])]


def openapi() -> dict:
    from xpeft.serve.api import make_api

    cfg = ServeConfig(store="/nowhere", api_token=None)
    return make_api(SimpleNamespace(cfg=cfg, engine=None)).openapi()["components"]["schemas"]


def properties(schemas: dict, names=None) -> set[str]:
    return {p for name, s in schemas.items() if names is None or name in names for p in s.get("properties", {})}


@pytest.fixture(scope="module")
def cli_json(tmp_path_factory) -> dict[str, set[str]]:
    """The keys of `xpeft profiles show` and of a `profiles list` line, for a stored hard profile."""
    store = ProfileStore(tmp_path_factory.mktemp("store"))
    store.write([fitted_profile("hard", "p1")[1]])
    show = json.loads(_stdout(["profiles", "show", "--store", store.uri, "p1"]))
    (line,) = _stdout(["profiles", "list", "--store", store.uri]).splitlines()
    return {"show": set(show), "list": set(json.loads(line))}


def _stdout(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        xpeft(argv)
    return out.getvalue()


def test_the_contract_table_names_each_thing_once():
    names = contract()
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert {"probabilities", "value", "record_bytes", "cpus_per_actor"} <= set(names)


def test_every_name_a_client_reads_is_in_the_contract(cli_json):
    table = set(contract())
    published = {
        "OpenAPI": properties(openapi(), CLIENT_SCHEMAS),
        "batch": {*OUTPUT.names, *REQUIRED, *OPTIONAL},
        "profiles show": cli_json["show"],
        "profiles list": cli_json["list"],
    }
    for where, names in published.items():
        assert names <= table, f"{where} publishes {sorted(names - table)}, which the README's table does not name"


def test_the_same_thing_has_the_same_name_in_the_api_the_batch_output_and_the_cli(cli_json):
    schemas = openapi()
    prediction = set(schemas["Prediction"]["properties"])
    assert prediction == {"label", "label_name", "probabilities", "value"}
    assert prediction <= set(OUTPUT.names), "the batch output writes a prediction under another name"
    served = set(schemas["ProfileInfo"]["properties"]) - {"servable", "problem", "served_from_bank"}  # the server's
    assert cli_json["show"] == served and cli_json["list"] <= cli_json["show"]


def test_no_output_or_flag_uses_a_replaced_name(cli_json):
    old = set(RENAMED_OUTPUTS) | {o for c in CONFIGS for o in renamed_fields(c) if not o.startswith("--")}
    published = properties(openapi()) | set(OUTPUT.names) | cli_json["show"] | cli_json["list"]
    assert not published & old, f"replaced names still published: {sorted(published & old)}"
    fields = {f for c in CONFIGS for f in c.__dataclass_fields__}
    assert not fields & old, sorted(fields & old)


OLD_FLAGS = [
    ("serve", ["--store", "s", "--num-cpus", "1"], "--cpus-per-actor"),
    ("serve", ["--store", "s", "--num-gpus", "1"], "--gpus-per-actor"),
    ("serve", ["--store", "s", "--replicas", "2"], "--num-replicas"),
    ("serve", ["--store", "s", "--bank", "b.safetensors"], "--bank-path"),
    ("serve", ["--store", "s", "--batch-wait-timeout-s", "0.01"], "--batch-wait-s"),
    ("fit-profiles", ["--demo", "--bank", "b.safetensors"], "--bank-path"),
    ("fit-task", ["--task", "rte", "--bank", "b.safetensors"], "--bank-path"),
    ("fit-task", ["--task", "rte", "--cpus-per-worker", "1"], "--cpus-per-actor"),
    ("tune", ["--task", "rte", "--cpus-per-trial", "1"], "--cpus-per-actor"),
    ("classify-batch", ["--data", "d", "--out", "o", "--store", "s", "--bank", "b"], "--bank-path"),
]


@pytest.mark.parametrize("job,argv,new", OLD_FLAGS, ids=[f"{j} {a[-2]}" for j, a, _ in OLD_FLAGS])
def test_an_old_flag_is_refused_naming_the_new_one(job, argv, new, capsys):
    with pytest.raises(SystemExit) as e:
        xpeft([job, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{argv[-2]} was renamed {new}" in err, err


def test_the_new_flags_parse_to_the_fields():
    from xpeft.cli import build_parser

    flags = ["--cpus-per-actor", "0.5", "--num-replicas", "2", "--bank-path", "b", "--batch-wait-s", "0"]
    args = build_parser().parse_args(["serve", "--store", "s", *flags])
    assert (args.cpus_per_actor, args.num_replicas, args.bank_path, args.batch_wait_s) == (0.5, 2, "b", 0.0)
