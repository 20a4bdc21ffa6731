"""Serve every profile of a store over HTTP (the Ray Serve app of xpeft.serve) until Ctrl-C.

    python ray_jobs/serve.py --store runs/demo                        # embedded local Ray, http://127.0.0.1:8000
    python ray_jobs/serve.py --store runs/news --num-replicas 2 --cpus-per-actor 1 --max-batch-size 32
    XPEFT_API_TOKEN=... python ray_jobs/serve.py --store s3://bucket/xpeft-store --host 0.0.0.0

Without RAY_ADDRESS it starts an embedded local Ray (never joining another one on this machine); with it,
it joins that cluster. Every ServeConfig field is an option (--max-texts, --cache-size, ...); the bearer token
comes only from the environment (XPEFT_API_TOKEN), never from the command line. The job is xpeft.jobs.serve's (also
`xpeft serve`); this script only calls it. On a cluster, `serve run xpeft.serve.deployment:app_builder
store=...` or a Serve config file does the same without this script.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # `ray job submit --working-dir .`

from xpeft.jobs import main  # noqa: E402

if __name__ == "__main__":
    main("serve", doc=__doc__)
