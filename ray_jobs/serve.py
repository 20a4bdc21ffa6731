"""Serve every profile of a store over HTTP (the Ray Serve app of xpeft.serving) until Ctrl-C.

    python ray_jobs/serve.py --store runs/demo                        # embedded local Ray, http://127.0.0.1:8000
    python ray_jobs/serve.py --store runs/news --replicas 2 --num-cpus 1 --max-batch-size 32
    XPEFT_API_TOKEN=... python ray_jobs/serve.py --store s3://bucket/xpeft-store --host 0.0.0.0

Without RAY_ADDRESS it starts an embedded local Ray (never joining another one on this machine); with it,
it joins that cluster. Every ServeConfig field is an option (--max-texts, --cache-size, ...); the bearer token
comes only from the environment (XPEFT_API_TOKEN), never from the command line. The logic lives in
xpeft.serving; this script only parses arguments. On a cluster, `serve run xpeft.serving:app_builder
store=...` or a Serve config file does the same without this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xpeft.serving import ServeConfig  # noqa: E402

ALIASES = {"num_replicas": ["--replicas"]}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ServeConfig]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    ap.add_argument("--port", type=int, default=8000)
    for f in dataclasses.fields(ServeConfig):
        if f.name == "api_token":
            continue
        flags = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
        default = None if f.default is dataclasses.MISSING else f.default
        kind = int if f.name == "torch_threads" else (type(default) if default is not None else str)
        ap.add_argument(
            *flags,
            dest=f.name,
            type=kind,
            default=default,
            required=f.name == "store",
            help=f.metadata["help"] + ("" if default is None else f" (default: {default})"),
        )
    args = ap.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.name != "api_token"}
    try:
        cfg = ServeConfig(**values)
    except ValueError as e:
        ap.error(str(e))
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from xpeft.cluster import init_ray
    from xpeft.serving import build_app

    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(cfg), name="xpeft", route_prefix="/")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    print(f"serving the profiles of {cfg.store} at {url} (auth {'on' if cfg.api_token else 'off'})")
    print(f"  curl {url}/healthz")
    print(
        f"  curl -X POST {url}/v1/classify -H 'Content-Type: application/json' "
        '-d \'{"profile_id": "...", "texts": ["..."]}\''
    )
    print(f"  API docs: {url}/docs   (Ctrl-C stops)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` shuts Serve down cleanly too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
