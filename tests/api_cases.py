"""What the API tests share: the served store (one profile per mode of tests/cases.py, one of another bank, one
recorded as fitted on pairs and one on single texts) and the table of bad requests, each with the status and
the words its JSON detail must have. tests/test_serving.py sends them over HTTP to a Serve app,
tests/test_api.py in process to the same FastAPI app over a LocalServer; and `fuzz`, which both run on
cases schemathesis generates from the app's own OpenAPI schema."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import schemathesis
from cases import BANK, BY_NAME, CASES, fitted_profile, store_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

from xpeft.config import TrainConfig
from xpeft.core.bank import random_bank
from xpeft.core.encoder import load_encoder
from xpeft.fit.on_demand import FitRecipe, save_recipe
from xpeft.profiles.store import ProfileStore

L, N, B, D = BANK.L, BANK.N, BANK.b, 32
OTHER_BANK = random_bank(L, N, B, D, seed=8)
TOKEN = "s3cret-token"
LIMITS = {"max_texts": 8, "max_text_chars": 300, "max_body_bytes": 8192}
JSON = {"Content-Type": "application/json"}


def save_test_recipe(store: ProfileStore, backbone: str, **train) -> FitRecipe:
    """The recipe of the table's "hard" case, as a farm run records it: what a fit on demand repeats."""
    recipe = FitRecipe(
        backbone,
        BY_NAME["hard"].xpeft(),
        TrainConfig(**{"lr": 1e-2, "mask_lr": 1e-1, "ln_lr": 1e-1, "epochs": 3, "batch_size": 8, **train}),
        BANK.fingerprint,
        label_names=list(BY_NAME["hard"].label_names),
    )
    save_recipe(store, recipe)
    return recipe


def served_store(path, backbone: str) -> ProfileStore:
    """A store with the bank, every mode of the table, 'other-bank', 'paired' and 'unpaired', and the recipe
    of fits on demand. The table's profiles record no text_pair (as profiles stored before it was recorded):
    they take both kinds of input."""
    store = ProfileStore(path)
    save_test_recipe(store, backbone)
    encoder = load_encoder(backbone)
    store_cases(store, encoder, CASES, OTHER_BANK)
    profiles = []
    for seed, (pid, pairs) in enumerate([("paired", True), ("unpaired", False)], start=60):
        _, p = fitted_profile("hard", pid, seed=seed, encoder=encoder)
        profiles.append(dataclasses.replace(p, config=dataclasses.replace(p.config, text_pair=pairs)))
    store.write(profiles)
    return store


BAD = [
    # name, method, path, json body (or raw bytes, sent as application/json), status, words in the detail
    ("unknown profile", "post", "/v1/classify", {"profile_id": "nobody", "texts": ["x"]}, 404, "not in the store"),
    ("malformed JSON", "post", "/v1/classify", b'{"profile_id": "hard", "texts": [', 422, "not valid JSON"),
    ("missing texts", "post", "/v1/classify", {"profile_id": "hard"}, 422, "texts: Field required: add it"),
    ("texts not a list", "post", "/v1/classify", {"profile_id": "hard", "texts": "hello"}, 422, "list"),
    ("profile id not a string", "post", "/v1/classify", {"profile_id": 7, "texts": ["x"]}, 422, "string"),
    ("a text not a string", "post", "/v1/classify", {"profile_id": "hard", "texts": ["x", None]}, 422, "texts[1]"),
    ("unknown field", "post", "/v1/classify", {"profile_id": "hard", "text": ["x"], "texts": ["x"]}, 422, "remove it"),
    ("empty text list", "post", "/v1/classify", {"profile_id": "hard", "texts": []}, 422, "at least 1"),
    ("too many texts", "post", "/v1/classify", {"profile_id": "hard", "texts": ["x"] * 9}, 413, "max_texts"),
    ("too long a text", "post", "/v1/classify", {"profile_id": "hard", "texts": ["x" * 301]}, 413, "max_text_chars"),
    (
        "pairs do not match texts",
        "post",
        "/v1/classify",
        {"profile_id": "hard", "texts": ["a", "b"], "text_pairs": ["c"]},
        422,
        "one per text",
    ),
    ("body too large", "post", "/v1/classify", {"profile_id": "hard", "texts": ["x" * 9000]}, 413, "max_body_bytes"),
    ("path traversal", "post", "/v1/classify", {"profile_id": "../x", "texts": ["x"]}, 400, "invalid profile id"),
    (
        "another bank",
        "post",
        "/v1/classify",
        {"profile_id": "other-bank", "texts": ["x"]},
        409,
        f"fitted on bank {OTHER_BANK.fingerprint}, which is not in the store",
    ),
    ("invalid id in the path", "get", "/v1/profiles/a..b", None, 400, "invalid profile id"),
    ("unknown profile in the path", "get", "/v1/profiles/nobody", None, 404, "not in the store"),
    ("page size 0", "get", "/v1/profiles?limit=0", None, 422, "greater than or equal to 1"),
    ("page too large", "get", "/v1/profiles?limit=100000", None, 413, "max_page"),
    # --- issue 15: each of these was a 500, a 200 for nothing, or an error that did not name its fix ---
    (
        "a lone surrogate as the profile id",
        "post",
        "/v1/classify",
        rb'{"profile_id": "\ud800", "texts": ["x"]}',
        422,
        "profile_id: is not text (a lone surrogate",
    ),
    (
        "a lone surrogate in a text",
        "post",
        "/v1/classify",
        rb'{"profile_id": "hard", "texts": ["fine", "bad \udfff"]}',
        422,
        "texts[1]: has a lone surrogate \\udfff at character 4",
    ),
    (
        "a lone surrogate beside another error is echoed back escaped",
        "post",
        "/v1/classify",
        rb'{"profile_id": "\ud800", "texts": "not a list"}',
        422,
        "texts: Input should be a valid list",
    ),
    (
        "a surrogate in raw UTF-8 bytes",
        "post",
        "/v1/classify",
        b'{"profile_id": "hard", "texts": ["\xed\xa0\x80"]}',
        422,
        "lone surrogate",
    ),
    ("a body that is not UTF-8", "post", "/v1/classify", b'{"profile_id": "hard", "texts": ["\xff"]}', 400, "UTF-8"),
    ("an empty text", "post", "/v1/classify", {"profile_id": "hard", "texts": ["fine", ""]}, 422, "texts[1]: is empty"),
    (
        "a whitespace-only text",
        "post",
        "/v1/classify",
        {"profile_id": "hard", "texts": [" \t\n"]},
        422,
        "only whitespace",
    ),
    (
        "a text of only control and zero-width characters",
        "post",
        "/v1/classify",
        {"profile_id": "hard", "texts": ["\u200b\x07"]},
        422,
        "texts[0]: no token the backbone reads",
    ),
    (
        "an empty pair",
        "post",
        "/v1/classify",
        {"profile_id": "paired", "texts": ["a"], "text_pairs": [""]},
        422,
        "text_pairs[0]: is empty",
    ),
    (
        "text pairs for a profile fitted on single texts",
        "post",
        "/v1/classify",
        {"profile_id": "unpaired", "texts": ["good fun"], "text_pairs": ["the movie"]},
        422,
        "fitted on single texts, not pairs: leave text_pairs out",
    ),
    (
        "single texts for a profile fitted on pairs",
        "post",
        "/v1/classify",
        {"profile_id": "paired", "texts": ["good fun"]},
        422,
        "fitted on text pairs: send text_pairs",
    ),
    (
        "JSON nested 4,000 deep",  # json.loads would recurse until it failed: a 400 "is it UTF-8?" before
        "post",
        "/v1/classify",
        b'{"profile_id": "hard", "texts": ' + b"[" * 4000 + b"]" * 4000 + b"}",  # within max_body_bytes
        422,
        "nests more than 32 arrays or objects deep",
    ),
    ("an unknown route", "get", "/v2/classify", None, 404, "the routes are"),
    # --- fits on demand: what the schema refuses, before any server state is looked at ---
    ("fit without labels", "post", "/v1/profiles/hard/fit", {"texts": ["a", "b", "c"]}, 422, "labels: Field required"),
    (
        "fit with a split value other than train/test",
        "post",
        "/v1/profiles/hard/fit",
        {"texts": ["a"], "labels": ["neg"], "split": ["dev"]},
        422,
        "split[0]: Input should be 'train' or 'test'",
    ),
    (
        "fit with 0 epochs",
        "post",
        "/v1/profiles/hard/fit",
        {"texts": ["a"], "labels": ["neg"], "epochs": 0},
        422,
        "epochs",
    ),
    (
        "fit of an invalid profile id",
        "post",
        "/v1/profiles/a..b/fit",
        {"texts": ["a"], "labels": ["neg"]},
        400,
        "invalid",
    ),
    ("an unknown job", "get", "/v1/jobs/0123456789abcdef0123456789abcdef", None, 404, "no fit job"),
    ("a method the route does not take", "get", "/v1/classify", None, 405, "takes POST"),
]

# Valid JSON with a header that does not say JSON: 415 naming the header and the fix.
CONTENT_TYPES = [("text/plain", "'Content-Type: text/plain'"), (None, "without a Content-Type header")]
GOOD_BODY = b'{"profile_id": "hard", "texts": ["the movie was great fun"]}'


# --- cases generated from the served OpenAPI schema (schemathesis) ---

# Cases per operation and app (hypothesis' max_examples; it stops early where the inputs run out, as for
# /healthz, which takes none): two apps (auth off, auth on) × 675 = 1,350 cases.
EXAMPLES = {
    "POST /v1/classify": 300,
    "GET /v1/profiles": 120,
    "GET /v1/profiles/{profile_id}": 100,
    "POST /v1/profiles/{profile_id}/fit": 120,
    "GET /v1/jobs/{job_id}": 30,
    "GET /healthz": 5,
}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def fuzz(app, ids: list[str], call, examples: dict[str, int] = EXAMPLES) -> Counter:
    """Run `call(case, i)` (i: the case's number) on the cases schemathesis generates from the OpenAPI schema
    `app` serves (an ASGI app, in process, or the URL of a running server's /openapi.json) for each operation:
    data that fits it and data that does not (its negative mode), up to `examples[operation]` of them, the
    same ones every run. About half the cases get a stored profile id instead of the generated one, so valid
    requests reach the engine and the tokenizer with arbitrary texts (not only 404s). Returns the cases run
    per operation."""
    if isinstance(app, str):
        schema = schemathesis.openapi.from_url(app)
    else:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: Counter = Counter()
    for found in schema.get_all_operations():
        op = found.ok()
        fuzz_operation(op, f"{op.method.upper()} {op.path}", examples, ids, call, counts)
    return counts


def fuzz_operation(op, label: str, examples: dict[str, int], ids: list[str], call, counts: Counter) -> None:
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=examples[label],
        deadline=None,
        derandomize=True,  # the same cases every run: a failure is reproducible, not a flake
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, stored=st.one_of(st.none(), st.sampled_from(ids)))
    def run(case, stored):
        if stored is not None:
            with_stored_id(case, stored)
        counts[label] += 1
        call(case, counts.total())

    run()


def with_stored_id(case, profile_id: str) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("profile_id"), str):
        case.body = {**case.body, "profile_id": profile_id}
    if isinstance(case.path_parameters, dict) and isinstance(case.path_parameters.get("profile_id"), str):
        case.path_parameters = {**case.path_parameters, "profile_id": profile_id}


def replica_pids(app_name: str) -> list[int]:
    """The processes of a Serve app's replicas on this machine (Ray titles each actor's process `ray::<class>`)."""
    found = []
    for entry in (e for e in os.listdir("/proc") if e.isdigit()):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(f"ray::ServeReplica:{app_name}:".encode()):
                    found.append(int(entry))
        except OSError:
            continue
    return found
