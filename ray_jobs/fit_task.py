"""Fit x_peft (soft/hard), single_adapter or head_only on a GLUE/SuperGLUE task or one profile with Ray Train
DDP workers: checkpoints every epoch, resume after a crash, the task's official metric.

    python ray_jobs/fit_task.py --task sst2 --train-subset 1000 --epochs 1 --num-workers 2
    python ray_jobs/fit_task.py --task rte --mode x_peft --mask-type hard --N 200 --recipe task \
        --store runs/store --num-workers 4 --use-gpu
    python ray_jobs/fit_task.py --data profiles.parquet --profile-id "Jane Doe" --head linear

Defaults are the paper's (§3): AdamW lr 1e-5 with linear decay, 10 epochs, global batch 64, max length 128,
seed 42. `--recipe task` uses xpeft.fit.recipes.TASK_TRAIN (per-role learning rates for short runs); explicit
flags override either. The global batch stays the same whatever --num-workers is. Rerunning with the same
--name and --storage-path resumes that run from its latest checkpoint.

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The job is xpeft.jobs.fit_task's (also `xpeft fit-task`); this script only calls it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # `ray job submit --working-dir .`

from xpeft.jobs import main  # noqa: E402

if __name__ == "__main__":
    main("fit-task", doc=__doc__)
