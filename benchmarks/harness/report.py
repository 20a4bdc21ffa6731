"""The tables benchmarks/serve_load.py prints (markdown, for BENCHMARKS.md): the load stage's, with the
issue-19 targets checked against them, and the kill stage's."""

from __future__ import annotations

import os
import statistics
from collections import Counter

from harness.common import command_line, machine
from harness.procs import ROLES

SCENARIOS = ("(a) one profile", "(b) a new profile each")


def pooled(runs: list[dict]) -> dict:
    """One scenario over all its rounds: throughput = requests / seconds summed, latency quantiles of all,
    server counters, forwards by size and CPU seconds summed."""
    latencies = [x for r in runs for x in r["latencies"]]
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    keys = [k for k, v in runs[0]["server"].items() if isinstance(v, int | float)]
    hist: dict[int, list[float]] = {}
    for r in runs:
        for size, (n, seconds) in r["server"]["forward_by_rows"].items():
            hist.setdefault(size, [0, 0.0])
            hist[size][0] += n
            hist[size][1] += seconds
    seconds = sum(r["seconds"] for r in runs)
    return {
        "requests": len(latencies),
        "failed": sum(r["failed"] for r in runs),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * q[49],
        "p99_ms": 1000 * q[98],
        "server": {k: sum(r["server"].get(k, 0) for r in runs) for k in keys},
        "hist": hist,
        "cpu": {k: sum(r["cpu"][k] for r in runs) for k in ROLES},
    }


def by_scenario(phase: dict, payload: str) -> dict[str, dict]:
    runs = phase["runs"]
    return {sc: pooled([r for r in runs if r["payload"] == payload and r["scenario"] == sc]) for sc in SCENARIOS}


def payloads(phases: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["payload"] for r in phases[0]["runs"]))


def load_table(phase: dict) -> None:
    print(f"\n{phase['system']}:\n")
    print(
        "| texts a request | scenario | requests | failed | requests/s | p50 ms | p99 ms | rows a forward "
        "| forward ms a row | profiles loaded | load ms each | store reads | (b)/(a) | (b)/(a) each round |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for payload in payloads([phase]):
        pooled_ = by_scenario(phase, payload)
        a, b = pooled_[SCENARIOS[0]], pooled_[SCENARIOS[1]]
        runs = [[r for r in phase["runs"] if r["payload"] == payload and r["scenario"] == sc] for sc in SCENARIOS]
        rounds = ", ".join(f"{rb['rps'] / ra['rps']:.2f}" for ra, rb in zip(*runs, strict=True))
        for sc, r in pooled_.items():
            s = r["server"]
            loads = s.get("profiles_loaded", s.get("loads", 0))
            load = f"{1000 * s['load_seconds'] / loads:.1f}" if loads else "-"
            last = (f"**{b['rps'] / a['rps']:.2f}**", rounds) if r is b else ("", "")
            print(
                f"| {payload} | {sc} | {r['requests']} | {r['failed']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {s['rows'] / max(1, s['batches']):.1f} | "
                f"{1000 * s['forward_seconds'] / max(1, s['rows']):.1f} | {loads} | {load} | "
                f"{s.get('store_reads', '-')} | {last[0]} | {last[1]} |"
            )
    for r in phase["runs"]:
        if r["failed"]:
            print(f"first failure ({r['payload']}, {r['scenario']}, round {r['round']}): {r['first_failure']}")


def replica_over_alone(phase: dict, payload: str, scenario: str) -> tuple[float, float, float]:
    """(rows a forward, replica ms a row, alone ms a row) over the forwards the replica ran, by their size."""
    hist = by_scenario(phase, payload)[scenario]["hist"]
    alone = phase["alone"][(payload, scenario)]
    rows = sum(size * n for size, (n, _) in hist.items())
    forwards = sum(n for n, _ in hist.values())
    replica = sum(seconds for _, seconds in hist.values())
    expected = sum(n * alone[size] for size, (n, _) in hist.items())
    return rows / max(1, forwards), 1000 * replica / max(1, rows), 1000 * expected / max(1, rows)


def alone_table(phases: list[dict]) -> None:
    print("\nThe forward inside the replica against the same engine's forward alone, at the batch sizes the replica")
    print("formed (alone: in the benchmark's process after the server is gone, median of --alone-reps a size):\n")
    print("| server | texts a request | scenario | rows a forward | replica ms a row | alone ms a row | ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for phase in phases:
        for payload in payloads([phase]):
            for sc in SCENARIOS:
                rows, replica, alone = replica_over_alone(phase, payload, sc)
                print(
                    f"| {phase['system']} | {payload} | {sc} | {rows:.1f} | {replica:.1f} | {alone:.1f} | "
                    f"replica/alone {replica / alone:.2f} |"
                )


def forwards_table(ort: dict, eager: dict) -> None:
    print("\nServed requests/s, the ORT forward against today's eager one (same payloads, one server after the")
    print("other):\n")
    print("| texts a request | scenario | ort requests/s | eager requests/s | ort/eager |")
    print("|---|---|---:|---:|---:|")
    for payload in payloads([ort]):
        o, e = by_scenario(ort, payload), by_scenario(eager, payload)
        for sc in SCENARIOS:
            ratio = o[sc]["rps"] / e[sc]["rps"]
            print(f"| {payload} | {sc} | {o[sc]['rps']:.1f} | {e[sc]['rps']:.1f} | **{ratio:.2f}** |")


def cpu_table(phases: list[dict]) -> None:
    print(f"\nCPU seconds each process used during the runs (/proc/<pid>/stat; {os.cpu_count()} CPUs here):\n")
    print("| server | texts a request | scenario | wall s | client | proxy | replica | rest of Ray | CPUs busy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for phase in phases:
        for payload in payloads([phase]):
            for sc, r in by_scenario(phase, payload).items():
                c = r["cpu"]
                print(
                    f"| {phase['system']} | {payload} | {sc} | {r['seconds']:.1f} | {c['client']:.1f} | "
                    f"{c['proxy']:.1f} | {c['replica']:.1f} | {c['ray other']:.1f} | "
                    f"{sum(c.values()) / r['seconds']:.2f} |"
                )


def unloaded_table(phases: list[dict]) -> None:
    print("\nUnloaded latency: sequential requests of one 20-word text to a cached profile, one client thread:\n")
    print("| server | requests | p50 ms | p99 ms | one-row forward alone ms | p50 − forward alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in phases:
        u = phase["unloaded"]
        one = phase.get("one_row_s")
        alone = f"{1000 * one:.1f}" if one else "-"
        gap = f"{u['p50_ms'] - 1000 * one:.1f}" if one else "-"
        print(f"| {phase['system']} | {u['requests']} | {u['p50_ms']:.1f} | {u['p99_ms']:.1f} | {alone} | {gap} |")


def peer_table(xpeft: dict, peer: dict) -> None:
    print("\nxpeft against the PEFT + @serve.multiplexed peer (same client, payloads and cores):\n")
    print("| texts a request | server | (a) requests/s | (a) p50 / p99 ms | (b) requests/s | (b) p50 / p99 ms "
          "| replica RSS / peak MiB | xpeft (b) / (b) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for payload in payloads([xpeft]):
        xb = by_scenario(xpeft, payload)[SCENARIOS[1]]["rps"]
        for phase in (xpeft, peer):
            a, b = by_scenario(phase, payload).values()
            m = phase["memory"]
            print(
                f"| {payload} | {phase['system']} | {a['rps']:.1f} | {a['p50_ms']:.0f} / {a['p99_ms']:.0f} | "
                f"{b['rps']:.1f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {m['rss_mb']:.0f} / {m['peak_mb']:.0f} | "
                f"**{xb / b['rps']:.2f}** |"
            )


def check(name: str, value: float, target: float, higher: bool = True) -> None:
    met = value >= target if higher else value <= target
    verdict = "met" if met else f"MISSED by {abs(value - target):.2f}"
    print(f"- {name}: {value:.2f} (target {'≥' if higher else '≤'} {target:g}): {verdict}")


def targets(phases: list[dict]) -> None:
    systems = {p["system"]: p for p in phases}
    ort, eager, peer = systems.get("xpeft ort"), systems.get("xpeft eager"), systems.get("PEFT + multiplexing")
    print("\nAgainst the targets of issue 19:\n")
    for payload in payloads(phases):
        if ort is not None:
            for sc in SCENARIOS:
                _, replica, alone = replica_over_alone(ort, payload, sc)
                check(f"{payload}, {sc}: ort replica/alone", replica / alone, 1.15, higher=False)
            a, b = by_scenario(ort, payload).values()
            check(f"{payload}: ort (b)/(a)", b["rps"] / a["rps"], 0.9)
        if ort is not None and eager is not None:
            for sc in SCENARIOS:
                o, e = by_scenario(ort, payload)[sc], by_scenario(eager, payload)[sc]
                check(f"{payload}, {sc}: ort/eager requests/s", o["rps"] / e["rps"], 1.5)
        if ort is not None and peer is not None:
            xb, pb = (by_scenario(p, payload)[SCENARIOS[1]]["rps"] for p in (ort, peer))
            check(f"{payload}: xpeft (b) / peer (b)", xb / pb, 3.0)
    if ort is not None:
        gap = ort["unloaded"]["p50_ms"] - 1000 * ort["one_row_s"]
        check("unloaded p50 − one-row forward alone, ms", gap, 10, higher=False)


def report(args, phases: list[dict]) -> None:
    print(f"\n`{command_line()}`  ")
    print(
        f"machine: {machine()} (before the report); replica "
        f"({args.cpus_per_actor} CPU), Serve proxy and client share these CPUs; C={args.concurrency}, "
        f"max_batch_size={args.max_batch_size}, batch_wait_s={args.batch_wait_s:g}, "
        f"cache_size={args.cache_size}, record_cache_mb={args.record_cache_mb:g}, peer "
        f"max_num_models_per_replica={args.peer_models}, {args.rounds} rounds of (a) then (b) per payload"
    )
    for phase in phases:
        load_table(phase)
    xpeft = [p for p in phases if "alone" in p]
    if xpeft:
        alone_table(xpeft)
    systems = {p["system"]: p for p in phases}
    if "xpeft ort" in systems and "xpeft eager" in systems:
        forwards_table(systems["xpeft ort"], systems["xpeft eager"])
    cpu_table(phases)
    unloaded_table(phases)
    if xpeft and "PEFT + multiplexing" in systems:
        peer_table(systems.get("xpeft ort", xpeft[0]), systems["PEFT + multiplexing"])
    targets(phases)


def waits(entries: list) -> str:
    return f"{max(e[1] - e[0] for e in entries):.1f} s" if entries else "-"


def kill_report(args, log: list, killed_at: float, pid: int, new: list[int], unanswered: int = 0) -> None:
    """What the clients saw around the kill: failures by kind, the requests in flight, the time to be served
    again. `log` entries are (sent, answered, status, headers, body); `unanswered` requests were still in flight
    when the run stopped waiting (--drain-s)."""
    before = [e for e in log if e[1] < killed_at]
    failed = [e for e in log if e[2] != 200]
    served_after = sorted(e[1] for e in log if e[2] == 200 and e[0] >= killed_at)
    kinds = Counter(
        (e[2], e[3].get("content-type") or e[3].get("Content-Type"), e[3].get("retry-after") or e[3].get("Retry-After"))
        for e in failed
    )
    print(f"\n`{command_line()}`  ")
    print(
        f"machine: {machine()}; proxy middleware: "
        f"{'off (Serve as it is)' if args.plain_proxy else 'xpeft.serve.proxy'}; {args.num_replicas} replica(s), "
        f"{args.kill_concurrency} client threads"
    )
    print(f"- requests: {len(log)} ({len(before)} answered before the kill), failed: {len(failed)}")
    for (status, ctype, retry), n in kinds.most_common():
        example = next(e[4] for e in failed if (e[2], e[3].get("content-type")) == (status, ctype))
        print(f"  - {n} × status {status}, Content-Type {ctype}, Retry-After {retry}: {example!r}")
    in_flight = [e for e in log if e[0] < killed_at < e[1]]
    outcomes = Counter(e[2] for e in in_flight)
    print(f"- in flight at the kill: {len(in_flight)}, answered {dict(outcomes)} after {waits(in_flight)}")
    if served_after:
        print(f"- served again {served_after[0] - killed_at:.1f} s after the kill (the first 200 sent after it)")
        after = [e for e in log if e[0] >= killed_at and e[2] == 200]
        print(f"- requests sent after the kill: {len(after)} served, waiting at most {waits(after)}")
    else:
        print(f"- not served again within {args.after_kill:.0f} s of the kill")
    if unanswered:
        print(f"- still unanswered {args.drain_s:g} s after the stream stopped: {unanswered}")
    print(f"- replica process {pid} → {new or 'none'}")
