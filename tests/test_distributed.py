"""Ray Train DDP fitting (xpeft.ray.train): replicas in sync, the global batch fixed across worker counts,
resume from the last checkpoint after a worker dies. Tiny random BERT, local Ray on 2 CPUs."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import numpy as np
import pytest
import ray.cloudpickle
import torch
from conftest import tiny_rows

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.fit.checkpoints import load_trainable_state, read_checkpoint, trainable_state
from xpeft.fit.loop import per_worker_batch, predict
from xpeft.fit.task import FitConfig, TaskData, build_fit_model, fit_task
from xpeft.profiles.record import apply_profile
from xpeft.profiles.store import ProfileStore
from xpeft.ray.train import fit_distributed, make_trainer

# The failure hook below is defined here; Ray workers cannot import this test module, so ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DATA = TaskData(train=tiny_rows(32), eval=tiny_rows(16, seed=1))
EPOCHS, GLOBAL_BATCH = 4, 8
STEPS = EPOCHS * len(DATA.train) // GLOBAL_BATCH
# Same global batch and seed, no dropout and soft masks (no Gumbel noise): 1 and 2 workers differ only by
# float rounding (the gradient is averaged over two halves instead of one batch, rows padded per half), in fp32:
# bf16 "off", since "auto" autocasts where the CPU has native bf16, whose rounding differs with the layout.
LOSS_ATOL = 1e-5


def tiny_fit(storage, num_workers: int, **kw) -> FitConfig:
    return FitConfig(
        xpeft=XPeftConfig(mode="x_peft", mask_type="soft", N=8, k=2, b=4, dropout=0.0),
        train=TrainConfig(lr=1e-2, mask_lr=5e-2, ln_lr=5e-2, epochs=EPOCHS, batch_size=GLOBAL_BATCH, bf16="off"),
        backbone="tiny",
        num_workers=num_workers,
        storage_path=str(storage),
        **kw,
    )


# Ray Train's controller collects reports (and so registers checkpoints) on each health check; poll often so
# that runs end promptly and a checkpoint counts well before the failure test kills a worker. Read when the
# controller starts, so it is set before the module's Ray does.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"


class DieOnce:
    """Kills rank 1's process (as a lost node would) one second into `epoch`, once; logs every (rank, epoch)
    start to a file. The second leaves the controller time to collect the previous epoch's checkpoint
    (a worker lost within one health check of a report resumes from the checkpoint before)."""

    def __init__(self, directory, epoch: int, rank: int = 1, delay_s: float = 1.0):
        self.marker, self.log = os.path.join(directory, "died"), os.path.join(directory, "epochs.log")
        self.epoch, self.rank, self.delay_s = epoch, rank, delay_s

    def __call__(self, epoch: int, rank: int) -> None:
        with open(self.log, "a") as f:
            f.write(f"{rank} {epoch}\n")
        if (epoch, rank) == (self.epoch, self.rank) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(self.delay_s)
            os._exit(1)

    def starts(self) -> Counter:
        with open(self.log) as f:
            return Counter(tuple(map(int, line.split())) for line in f)


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory):
    """One DDP fit on two workers that loses rank 1's process one second into epoch 2 (as a lost node would) and
    goes on from the last checkpoint: every test of the module reads this fit. (cfg, report, the DieOnce)"""
    root = tmp_path_factory.mktemp("ddp2")
    die = DieOnce(str(root), epoch=2)
    cfg = tiny_fit(
        root / "runs", 2, check_replicas=True, store=str(root / "store"), profile_id="tiny-ddp2", max_failures=1
    )
    return cfg, fit_distributed(cfg, DATA, on_epoch_start=die), die


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same fit in one process without Ray (`fit_task`, what each Train worker runs): the loss curve and
    score the DDP fit must reach."""
    return fit_task(tiny_fit(tmp_path_factory.mktemp("one"), 1), DATA)[1]


def test_global_batch_must_split_evenly_over_workers():
    assert per_worker_batch(64, 4) == 16
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        per_worker_batch(64, 3)
    with pytest.raises(ValueError, match="does not split"):  # refused before any worker starts
        make_trainer(tiny_fit("/tmp/unused", 3), DATA)


@pytest.mark.ray
def test_ddp_replicas_hold_identical_trainable_tensors_after_training(two_workers):
    cfg, report, _ = two_workers
    assert report.world_size == 2 and report.per_worker_batch == GLOBAL_BATCH // 2
    rank0, rank1 = report.replica_states
    assert rank0.keys() == rank1.keys() and {"mask_logits_A", "mask_logits_B"} <= rank0.keys()
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    assert report.replica_max_abs_diff == 0.0
    initial = trainable_state(build_fit_model(cfg))
    assert not np.allclose(rank0["mask_logits_B"], initial["mask_logits_B"].numpy())  # they did train


@pytest.mark.ray
def test_two_workers_reach_the_same_loss_curve_as_one_process_without_ray(two_workers, one_process):
    """The same global batch on two DDP workers and in one process: one loss curve, one score."""
    _, two, _ = two_workers
    one = one_process
    assert len(one.losses) == len(two.losses) == STEPS
    np.testing.assert_allclose(two.losses, one.losses, rtol=0, atol=LOSS_ATOL)
    assert two.history[-1]["train_loss"] < two.history[0]["train_loss"]  # a curve, not a flat line
    assert two.score == pytest.approx(one.history[-1]["score"])


@pytest.mark.ray
def test_every_epoch_leaves_a_checkpoint_with_state_and_progress(two_workers):
    cfg, report, _ = two_workers
    state, progress = read_checkpoint(report.checkpoint_path)  # torch.load(weights_only=True) + JSON
    assert progress.epoch == EPOCHS and progress.step == STEPS
    assert progress.losses == pytest.approx(report.losses)
    assert set(state) == {"model", "optimizer", "scheduler"}
    assert set(state["model"]) == set(report.replica_states[0])
    run_dir = os.path.dirname(report.checkpoint_path)
    kept = [d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))]
    assert len(kept) == cfg.keep_checkpoints  # one per epoch, the oldest pruned


@pytest.mark.ray
def test_fitted_profile_is_stored_and_reproduces_the_model(two_workers):
    cfg, report, _ = two_workers
    store = ProfileStore(cfg.store)
    profile = store.get("tiny-ddp2")
    assert profile.bank_fingerprint in store.bank_fingerprints()  # the store holds the bank it needs
    for name, value in report.replica_states[0].items():
        np.testing.assert_array_equal(profile.tensors[name].numpy(), value)
    assert profile.metrics["score"] == pytest.approx(report.score)
    fresh = build_fit_model(cfg)
    apply_profile(fresh, profile)
    accuracy = (predict(fresh, DATA.eval).argmax(-1) == np.array([r["labels"] for r in DATA.eval])).mean()
    assert accuracy == pytest.approx(report.metrics["accuracy"])


@pytest.mark.ray
def test_resume_after_a_killed_worker_continues_from_the_last_checkpoint(two_workers, one_process):
    _, report, die = two_workers
    assert os.path.exists(die.marker), "the worker was never killed"
    assert report.resumed_from_epoch == 2 and report.epochs == EPOCHS and report.steps == STEPS
    starts = die.starts()
    # Epochs 0 and 1 ran once on each rank: the restart did not begin from scratch. Rank 1 started epoch 2
    # twice (it died in it); rank 0 once or twice (it may be stopped before it logs the start).
    assert [starts[(1, e)] for e in range(EPOCHS)] == [1, 1, 2, 1], starts
    assert [starts[(0, e)] for e in (0, 1, 3)] == [1, 1, 1] and starts[(0, 2)] in (1, 2), starts
    # Restored optimizer, scheduler and per-epoch seeds: the curve of the fit that never died.
    np.testing.assert_allclose(report.losses, one_process.losses, rtol=0, atol=LOSS_ATOL)


def test_checkpoint_loading_refuses_a_run_of_another_shape(tmp_path):
    model = build_fit_model(tiny_fit(tmp_path, 1))
    state = trainable_state(model)
    state["mask_logits_A"] = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="another N, b or encoder"):
        load_trainable_state(model, state)
