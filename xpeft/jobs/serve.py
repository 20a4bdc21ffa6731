"""`xpeft serve` (= `ray_jobs/serve.py`): every profile of a store over HTTP, the Ray Serve app of `xpeft.serve`,
in an embedded local Ray or on the cluster of RAY_ADDRESS."""

from __future__ import annotations

import argparse
import sys
import time

from xpeft.flags import add_flags, from_flags

HELP = "serve every profile of a store over HTTP with Ray Serve"


def arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.serve.config import ServeConfig

    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="the HTTP port (default: 8000)")
    add_flags(ap.add_argument_group("server"), ServeConfig)


def run(args: argparse.Namespace) -> None:
    """Serve every profile of a store over HTTP (the Ray Serve app of xpeft.serve) until Ctrl-C or SIGTERM."""
    import signal

    import ray
    from ray import serve as ray_serve

    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.cluster import init_ray
    from xpeft.serve.config import ServeConfig
    from xpeft.serve.deployment import build_app
    from xpeft.serve.engine import serving_bank
    from xpeft.serve.proxy import install

    cfg = from_flags(args, ServeConfig)
    # Refuse an old-layout store or a damaged bank here, in one line, rather than in every replica's traceback.
    serving_bank(cfg, ProfileStore(cfg.store))
    install(cfg)  # an embedded Ray's proxy reads bodies within cfg's limits and answers for a replica that died
    init_ray()
    # Before Serve starts (a client may see /healthz answer before serve.run returns): `kill` then shuts
    # Serve down cleanly instead of meeting Ray's fatal-signal handler, which init_ray installed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        ray_serve.run(build_app(cfg), name="xpeft", route_prefix="/")
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        print(f"serving the profiles of {cfg.store} at {url} (auth {'on' if cfg.api_token else 'off'})")
        print(f"  curl {url}/healthz")
        body = """-d '{"profile_id": "...", "texts": ["..."]}'"""
        print(f"  curl -X POST {url}/v1/classify -H 'Content-Type: application/json' {body}")
        print(f"  API docs: {url}/docs   (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()
