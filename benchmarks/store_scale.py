"""The profile store at scale: writes from 2 processes, open-to-ready, lookups, staleness, compaction, memory.

    python benchmarks/store_scale.py --profiles 1000000                 # local disk
    python benchmarks/store_scale.py --profiles 100000 --s3             # on moto_server (S3 API) on 127.0.0.1
    python benchmarks/store_scale.py --profiles 1000000 --upserts 10000 # and lookups after 10,000 single writes
    python benchmarks/store_scale.py --smoke                            # seconds: every phase, a few hundred

Records are hard mtl profiles with a shared head as the farm writes them (MiniLM, N=100, k=50, b=48: 156 bytes
of mask bits + the LN affine, 2,460 bytes a record; random content). Phases:
  build     the store of --profiles profiles: bulk appends (what `xpeft profiles migrate` does)
  write     2 writer processes at once, each --writer-batches writes of 8 (half new ids, half refits of
            stored ids), through ProfileStore.write; then checks nothing was lost and the newest version won
  read      a fresh process: open-to-ready (the store opened and its index built), --lookups random stored
            ids one at a time (decoded Profiles), --unknown ids never stored, its RSS
  visible   a process polling refresh() every 50 ms; this one refits an id / deletes one, 5 times each: seconds
            from the write's start until the poller serves the new version / a 404 (a server adds at most its
            staleness_s on top)
  compact   `xpeft profiles compact` (rewrite + cleanup; deleted bytes gone), bytes before and after
  upserts   (with --upserts U) lookups in a fresh process on the freshly compacted store, then after U
            single-profile upserts (half new ids, half refits, one ProfileStore.write each, as a trickle of fits
            lands) without a compaction, then after compacting again: parts, segments of the id index, ready s,
            lookup and unknown-id p50/p99
The last line: `<n> profiles: ready <s> s, lookup p99 <ms> ms, unknown p99 <ms> ms`; with --upserts, also
`after <U> single upserts: lookup p99 <ms> ms (compacted: <ms> ms)`. (The Parquet layout the store replaced
was measured beside it with benchmarks/old_store.py and --compare-old at commit 1210ec9.)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pyarrow as pa
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness.common import SMOKE_HELP, machine  # noqa: E402

from xpeft.config import XPeftConfig  # noqa: E402
from xpeft.profiles.record import Profile, from_row, to_row  # noqa: E402
from xpeft.profiles.store import SCHEMA, ProfileStore  # noqa: E402
from xpeft.profiles.writes import KEY  # noqa: E402

L, N, K, B, LABELS = 6, 100, 50, 48, 15
NEW_BASE = 50_000_000  # ids the writers add: u5xxxxxxx
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def pid(i: int) -> str:
    return f"u{i:08d}"


CFG = XPeftConfig(N=N, k=K, b=B, head="linear", num_labels=LABELS)
LABEL_NAMES = [f"class-{c}" for c in range(LABELS)]


def make_rows(ids: list[str], version: int = 0, seed: int | None = None) -> pa.Table:
    """Rows of the store's schema for `ids`, as the store writes them (to_row: with each record's fingerprint):
    random masks and LN, `version` in the metrics."""
    n, rng = len(ids), np.random.default_rng(seed)
    masks = rng.integers(0, 256, (n, 2 * ((N + 7) // 8) * L), dtype=np.uint8)
    ln = torch.from_numpy(rng.standard_normal((n, 2, L, B), dtype=np.float32))
    now = time.time()
    rows = [
        to_row(
            Profile(
                ids[i], CFG, {"ln_weight": ln[i, 0], "ln_bias": ln[i, 1]}, mask_bits=masks[i].tobytes(),
                head_id="mtl-" + "cd" * 8, bank_fingerprint="ab" * 32,
                metrics={"accuracy": 0.5, "version": version, "n_test": 30}, label_names=LABEL_NAMES,
                created=now + i * 1e-6,
            )
        )
        for i in range(n)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def profiles(ids: list[str], version: int) -> list[Profile]:
    return [from_row(r) for r in make_rows(ids, version).to_pylist()]


def deleted_ids(n: int, events: int = 5) -> set[str]:
    """The stored ids the `visible` phase deletes (a later lookup of a stored id never draws them)."""
    return {pid((e * 7919 + 1) % n) for e in range(events)}


def received(q, procs: list, timeout: float = 7200):
    """The next result on `q`; a child that exits without one fails the run (its traceback is on stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                what = f"exited {dead[0].exitcode}" if dead else f"sent nothing in {timeout:.0f} s"
                raise SystemExit(f"a {procs[0].name} child process {what}: see its error above") from None


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


# --- phases ---------------------------------------------------------------------------------------------


def build(uri: str, n: int) -> float:
    start = time.perf_counter()
    batches = (
        b
        for s in range(0, n, 20_000)
        for b in make_rows([pid(i) for i in range(s, min(n, s + 20_000))], seed=s).to_batches()
    )
    ProfileStore(uri).table.bulk_load(batches, SCHEMA)
    return time.perf_counter() - start


def _writer(uri: str, n: int, w: int, batches: int, q) -> None:
    store, rng = ProfileStore(uri), random.Random(w)
    new, refits, seconds = [], {}, []
    for b in range(batches):
        ids = [pid(NEW_BASE + w * 1_000_000 + b * 4 + j) for j in range(4)]
        ids += [pid(rng.randrange(n)) for _ in range(4)]
        version = w * 100_000 + b
        batch = profiles(list(dict.fromkeys(ids)), version)
        start = time.perf_counter()
        store.write(batch)
        seconds.append(time.perf_counter() - start)
        new += ids[:4]
        refits.update({p.profile_id: (p.created, version) for p in batch[4:]})
    q.put((new, refits, seconds))


def write(uri: str, n: int, batches: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(uri, n, w, batches, q)) for w in (1, 2)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    out = [received(q, procs) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join(60)
    new = [i for o in out for i in o[0]]
    newest: dict[str, tuple[float, int]] = {}
    for _, refits, _ in out:
        for i, cv in refits.items():
            newest[i] = max(newest.get(i, cv), cv)
    store = ProfileStore(uri)
    lost = [i for i in new if i not in store]
    sample = random.Random(0).sample(sorted(newest), min(300, len(newest)))
    stale = [i for i in sample if store.get(i).metrics["version"] != newest[i][1]]
    seconds = [s for o in out for s in o[2]]
    written = sum(len(o[0]) + len(o[1]) for o in out)
    return {
        "write_pps": written / wall,
        "batch_p50_ms": pct(seconds, 50),
        "batch_p99_ms": pct(seconds, 99),
        "lost": len(lost),
        "stale": len(stale),
        "count_ok": len(store) == n + len(new),
    }


def _reader(uri: str, n: int, lookups: int, unknown: int, recent: tuple[str, ...], q) -> None:
    """A fresh process: open-to-ready, then `lookups` random stored ids (half of them among `recent`, when given)
    and `unknown` ids never stored."""
    start = time.perf_counter()
    store = ProfileStore(uri)
    len(store)  # the index: ready to answer after this
    ready = time.perf_counter() - start
    rng, hits, misses, gone = random.Random(1), [], [], deleted_ids(n)
    for _ in range(lookups):
        i = rng.choice(recent) if recent and rng.random() < 0.5 else pid(rng.randrange(n))
        while i in gone and i not in recent:
            i = pid(rng.randrange(n))
        t = time.perf_counter()
        assert store.get(i).profile_id == i
        hits.append(time.perf_counter() - t)
    for u in range(unknown):
        t = time.perf_counter()
        assert f"nobody-{u}" not in store
        misses.append(time.perf_counter() - t)
    q.put(
        {
            "ready_s": ready,
            "lookup_p50_ms": pct(hits, 50),
            "lookup_p99_ms": pct(hits, 99),
            "unknown_p50_ms": pct(misses, 50),
            "unknown_p99_ms": pct(misses, 99),
            "rss_mb": rss_mb(),
            **table_shape(store),
        }
    )


def table_shape(store: ProfileStore) -> dict:
    """Parts of the profile table and segments of its id index."""
    found = [d for d in store.table._dataset().describe_indices() if list(d.field_names) == [KEY]]
    return {"parts": store.stats()["parts"], "index_segments": len(found[0].segments) if found else 0}


def _poller(uri: str, inbox, outbox) -> None:
    store = ProfileStore(uri)
    len(store)
    outbox.put("ready")
    while (event := inbox.get()) is not None:
        what, i, version, t0 = event
        while True:
            store.refresh()
            if (what == "delete" and i not in store) or (
                what == "upsert" and store.get(i).metrics["version"] == version
            ):
                outbox.put(time.time() - t0)
                break
            time.sleep(0.05)


def visible(uri: str, n: int, events: int = 5) -> dict:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_poller, args=(uri, inbox, outbox))
    proc.start()
    assert received(outbox, [proc], 3600) == "ready"
    store, out = ProfileStore(uri), {"upsert": [], "delete": []}
    for e in range(events):
        i = pid(e * 7919 % n)
        inbox.put(("upsert", i, 900_000 + e, time.time()))
        store.write(profiles([i], 900_000 + e))
        out["upsert"].append(received(outbox, [proc], 600))
        i = pid((e * 7919 + 1) % n)  # deleted_ids(n)
        inbox.put(("delete", i, None, time.time()))
        store.delete([i])
        out["delete"].append(received(outbox, [proc], 600))
    inbox.put(None)
    proc.join(60)
    return {
        "upsert_visible_s": float(np.median(out["upsert"])),
        "delete_404_s": float(np.median(out["delete"])),
    }


def stored_bytes(uri: str, s3) -> int:
    if uri.startswith("s3://"):
        keys = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=uri.split("/", 3)[3].split("?")[0])
        return sum(o["Size"] for page in keys for o in page.get("Contents", []))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)


def compact(uri: str, s3) -> dict:
    before = stored_bytes(uri, s3)
    start = time.perf_counter()
    ProfileStore(uri).compact()
    return {
        "compact_s": time.perf_counter() - start,
        "gb_before": before / 1e9,
        "gb_after": stored_bytes(uri, s3) / 1e9,
    }


def small_writes(uri: str, args) -> list[dict]:
    """The store's lookups freshly compacted, after `args.upserts` single-profile upserts (half new ids, half
    refits; no compaction between), and compacted again; each read in a fresh process."""
    store = ProfileStore(uri)
    store.compact()
    n, rows = args.profiles, []
    written: list[str] = []
    r = in_process(_reader, uri, n, args.lookups, args.unknown, ())
    rows.append({"state": "freshly compacted", **r})
    rng, seconds = random.Random(7), []
    print(f"[upserts] {args.upserts} single-profile upserts ...", flush=True)
    for u in range(args.upserts):
        i = pid(NEW_BASE + 3_000_000 + u) if u % 2 == 0 else pid(rng.randrange(n))
        batch = profiles([i], 800_000 + u)
        start = time.perf_counter()
        store.write(batch)
        seconds.append(time.perf_counter() - start)
        written.append(i)
    r = in_process(_reader, uri, n, args.lookups, args.unknown, tuple(written))
    rows.append({"state": f"after {args.upserts:,} single upserts", "upsert_p50_ms": pct(seconds, 50),
                 "upsert_p99_ms": pct(seconds, 99), **r})  # fmt: skip
    start = time.perf_counter()
    store.compact()
    compact_s = time.perf_counter() - start
    r = in_process(_reader, uri, n, args.lookups, args.unknown, tuple(written))
    rows.append({"state": f"compacted again ({compact_s:.1f} s)", **r})
    return rows


def in_process(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = received(q, [p])
    p.join(60)
    return out


def measure(uri: str, args, s3) -> dict:
    print(f"building {args.profiles} profiles at {uri} ...", flush=True)
    r = {"store": "Lance table", "build_s": build(uri, args.profiles)}
    print(f"built in {r['build_s']:.1f} s; 2 writers ...", flush=True)
    r.update(write(uri, args.profiles, args.writer_batches))
    print("reading ...", flush=True)
    r.update(in_process(_reader, uri, args.profiles, args.lookups, args.unknown, ()))
    r.update(visible(uri, args.profiles))
    print("compacting ...", flush=True)
    r.update(compact(uri, s3))
    return r


# --- S3 on loopback -----------------------------------------------------------------------------------------


def start_moto():
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=0.5)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    os.environ.update(S3_ENV)
    client = boto3.client("s3", endpoint_url=url, region_name=S3_ENV["AWS_REGION"])
    client.create_bucket(Bucket="bench")
    return proc, url, client


# --- the table ----------------------------------------------------------------------------------------------

COLUMNS = [
    ("store", "store", "{}"),
    ("build_s", "build s", "{:.1f}"),
    ("write_pps", "2-writer p/s", "{:.0f}"),
    ("batch_p99_ms", "write p50/p99 ms", None),
    ("lost", "lost+stale", None),
    ("ready_s", "ready s", "{:.2f}"),
    ("lookup_p99_ms", "lookup p50/p99 ms", None),
    ("unknown_p99_ms", "unknown p99 ms", "{:.3f}"),
    ("upsert_visible_s", "upsert→visible s", "{:.2f}"),
    ("delete_404_s", "delete→404 s", "{:.2f}"),
    ("compact_s", "compact s", "{:.1f}"),
    ("gb_before", "GB before→after", None),
    ("rss_mb", "reader RSS MB", "{:.0f}"),
]


def cell(r: dict, key: str, fmt: str | None) -> str:
    special = {
        "batch_p99_ms": f"{r['batch_p50_ms']:.0f}/{r['batch_p99_ms']:.0f}",
        "lost": f"{r['lost']}+{r['stale']}{'' if r['count_ok'] else ' (count off)'}",
        "lookup_p99_ms": f"{r['lookup_p50_ms']:.2f}/{r['lookup_p99_ms']:.2f}",
        "gb_before": f"{r['gb_before']:.2f}→{r['gb_after']:.2f}",
    }
    return special[key] if fmt is None else ("n/a" if r[key] != r[key] else fmt.format(r[key]))


SMOKE = {"profiles": 300, "writer_batches": 3, "lookups": 30, "unknown": 30, "upserts": 12}  # every phase


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--profiles", type=int, default=100_000, help="profiles in the store (default 100,000)")
    ap.add_argument("--s3", action="store_true", help="on moto_server (an S3 API) on 127.0.0.1 instead of disk")
    ap.add_argument("--writer-batches", type=int, default=None, help="writes of 8 per writer (150; 20 on S3)")
    ap.add_argument("--lookups", type=int, default=None, help="stored-id lookups (3000; 200 on S3)")
    ap.add_argument("--unknown", type=int, default=1500, help="unknown-id lookups (default 1500)")
    ap.add_argument("--dir", default=None, help="where the local stores go (default: a temp dir, removed after)")
    ap.add_argument(
        "--upserts", type=int, default=0, help="then lookups after this many single-profile upserts (0: skip)"
    )
    return ap


def main() -> None:
    args = arguments().parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    args.writer_batches = args.writer_batches or (20 if args.s3 else 150)
    args.lookups = args.lookups or (200 if args.s3 else 3000)
    torch.set_num_threads(1)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="xpeft-scale-", dir=args.dir)
    moto, s3 = None, None
    try:
        if args.s3:
            moto, url, s3 = start_moto()
            uri = f"s3://bench/store?endpoint={url}"
        else:
            uri = f"{tmp}/store"
        new = measure(uri, args, s3)
        trickle = small_writes(uri, args) if args.upserts else []
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    where = "moto S3 on 127.0.0.1" if args.s3 else "local disk"
    print(
        f"\n{args.profiles:,} profiles, {where}, {machine()}; {2 * args.writer_batches} writes of 8 "
        f"from 2 processes, {args.lookups} lookups, {args.unknown} unknown ids\n"
    )
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(cell(new, key, fmt) for key, _, fmt in COLUMNS) + " |")
    if trickle:
        print(f"\nlookups of the store, {args.lookups} of stored ids (after the upserts, half of them among "
              f"the ids they wrote) and {args.unknown} unknown, each in a fresh process:\n")  # fmt: skip
        print("| state | parts | id-index segments | upsert p50/p99 ms | ready s | lookup p50/p99 ms "
              "| unknown p50/p99 ms |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for r in trickle:
            upsert = f"{r['upsert_p50_ms']:.0f}/{r['upsert_p99_ms']:.0f}" if "upsert_p50_ms" in r else "–"
            print(f"| {r['state']} | {r['parts']} | {r['index_segments']} | {upsert} | {r['ready_s']:.2f} | "
                  f"{r['lookup_p50_ms']:.2f}/{r['lookup_p99_ms']:.2f} | "
                  f"{r['unknown_p50_ms']:.3f}/{r['unknown_p99_ms']:.3f} |")  # fmt: skip
    print(
        f"\n{args.profiles} profiles: ready {new['ready_s']:.2f} s, lookup p99 {new['lookup_p99_ms']:.2f} ms, "
        f"unknown p99 {new['unknown_p99_ms']:.3f} ms"
    )
    if trickle:
        print(f"after {args.upserts} single upserts: lookup p99 {trickle[1]['lookup_p99_ms']:.2f} ms "
              f"(freshly compacted: {trickle[0]['lookup_p99_ms']:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
