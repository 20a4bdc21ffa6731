"""From one machine to a cluster: cluster.yaml validates offline, the farm runs across several Ray nodes
(and survives losing one), and `ray job submit` to a head started with `ray start --head` stores profiles.

Everything here stays on this machine: the nodes of `ray.cluster_utils.Cluster` are separate raylets and
object stores bound to 127.0.0.1, and the job test talks to its own head's dashboard on 127.0.0.1 only.
Nothing here runs `ray stop`: it stops every Ray process on the machine, other people's test runs
included; each test ends exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.data.dataset import profile_datas

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
TOPICS = {0: "politics vote election", 1: "sports game team", 2: "food recipe trip", 3: "music art culture"}


def profile_table(n_profiles: int, per_profile: int, seed: int = 0) -> pa.Table:
    """Synthetic authors whose category is learnable from the words (the tiny backbone's vocabulary)."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_profiles):
        for _ in range(per_profile):
            label = rng.choice(list(TOPICS)[: 2 + p % 3])
            words = TOPICS[label].split() + rng.sample(["the", "a", "new", "old", "big", "small"], 3)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label, "profile_id": f"author-{p:02d}"})
    return pa.Table.from_pylist(rows)


def stored_ids(store: str) -> list[str]:
    """Every stored row's profile_id, duplicates included (the index would hide a second copy)."""
    from xpeft.profiles.store import ProfileStore

    return ProfileStore(store).read_table(columns=["profile_id"])["profile_id"].to_pylist()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


# --- 1. cluster.yaml -----------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validator_offline():
    """`ray up` runs prepare_config (merge with the AWS provider's defaults.yaml shipped in the wheel: a file
    read, no network), fills node resources from the EC2 API where a node type leaves them out (network:
    every node type here states its resources, so that step has nothing to fill), then validate_config (the
    JSON schema in ray-schema.json plus cross-field checks), and only then the provider's bootstrap_config,
    which calls AWS (IAM role, key pair, subnets, AMI). The test runs the two offline steps as `ray up`
    does; the rest needs an AWS account."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))

    assert raw["provider"]["type"] == "aws"
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}  # no farm actors on the head
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu and all(g["min_workers"] == 0 and g["max_workers"] > 0 for g in gpu)  # scales from zero
    # the images pin the Ray and Python the package pins
    pins = (REPO / "pyproject.toml").read_text()
    assert f'ray[train,tune,serve]=={ray.__version__}"' in pins and 'requires-python = ">=3.11,<3.12"' in pins
    images = [raw["docker"]["head_image"], raw["docker"]["worker_image"]]
    images += [n["docker"]["worker_image"] for n in nodes.values() if "docker" in n]
    assert all(i.startswith(f"rayproject/ray:{ray.__version__}-py311-") for i in images)
    setup = raw["setup_commands"]
    assert 'pip install -q "torch==2.13.0"' in setup and "pip install -q -e ~/xpeft" in setup
    assert raw["file_mounts"]["~/xpeft"] == "." and ".venv" in raw["rsync_exclude"]
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert any("export RAY_AUTH_MODE=token; ray start" in c for c in cmds)
    assert "--num-cpus=0" in raw["head_start_ray_commands"][-1]


def test_the_validator_rejects_a_broken_cluster_yaml():
    """So the test above means something: a misspelt key and a head type that is not a node type fail."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**raw, "max_worker": 3}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**raw, "head_node_type": "gpu-head"}))


def loopback_only(mp: pytest.MonkeyPatch) -> None:
    """Bind every Ray process of the test to 127.0.0.1. On Linux Ray swaps 127.0.0.1 for the machine's
    outward address (ray.init canonicalises the address, `ray start` the node IP) unless clusters are
    "disabled", which on one machine changes nothing else: its switch is read at import (the constant)
    and by every process Ray starts (the environment variable)."""
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)


# --- 2. one farm over several nodes --------------------------------------------------------------------


@pytest.fixture(scope="class")
def cluster():
    """A head without CPUs (it runs the driver, as on a real cluster) and two 1-CPU worker nodes, each
    with its own raylet and an 80 MB object store."""
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    loopback_only(mp)
    temp_dir = tempfile.mkdtemp(prefix="xc", dir="/tmp")  # short: unix socket paths max out at 107 bytes
    # Cluster.add_node writes the head's address to <Ray's default temp root>/ray_current_cluster, a
    # directory only an earlier Ray run creates (a fresh machine has none), and any `ray.init("auto")` on
    # the machine would then find this test's cluster there. Point the default root at this test's own
    # directory and create it.
    mp.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 2**20}
    head = {**node, "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir}
    head["_system_config"] = {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
    }  # notice a lost node fast
    c = Cluster()
    try:
        c.add_node(**head)
        for _ in range(2):
            c.add_node(**node, num_cpus=1)
        c.wait_for_nodes()
        # the farm's object-store stats find the cluster by RAY_ADDRESS; without it, any other Ray on this
        # machine makes that lookup ambiguous
        mp.setenv("RAY_ADDRESS", c.address)
        ray.init(address=c.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


def farm_config(store: str, backbone: str, **kw):
    from xpeft.ray.farm import FarmConfig

    return FarmConfig(
        store=store,
        xpeft=XPeftConfig(N=64, k=8, b=16, head="linear", num_labels=4),
        train=TrainConfig(lr=1e-2, mask_lr=1e-1, ln_lr=1e-1, epochs=6, batch_size=4),
        backbone=backbone,
        num_actors=2,
        progress=False,
        flush_every=2,
        **kw,
    )


def profile_actor_nodes(before: set[str]) -> dict[str, str]:
    """actor id -> node id of every ProfileWorker actor created since `before`, dead or alive (the GCS
    actor table: works without the dashboard)."""
    table = ray._private.state.actors()
    return {
        a: info["Address"]["NodeID"]
        for a, info in table.items()
        if info["ActorClassName"] == "ProfileWorker" and a not in before
    }


def all_actor_ids() -> set[str]:
    return set(ray._private.state.actors())


@pytest.mark.ray
@pytest.mark.slow
class TestFarmOnThreeNodes:
    """One cluster for both tests (the second replaces a node of it), torn down before the job test."""

    def test_farm_spreads_over_nodes_reads_one_bank_and_stores_each_profile_once(self, cluster, backbone, tmp_path):
        from xpeft.ray.farm import run_farm

        datas = profile_datas(profile_table(n_profiles=20, per_profile=14)).profiles
        store = str(tmp_path / "store")
        before = all_actor_ids()
        report = run_farm(farm_config(store, backbone), datas)

        assert len(report.fitted) == 20 and not report.failed and not report.rejected
        worker_nodes = {n.node_id for n in cluster.worker_nodes}
        assert set(profile_actor_nodes(before).values()) == worker_nodes  # one actor on each worker node
        # each node's actor mapped the bank read-only from its own node's object store (pulled there once)
        assert report.memory["bank_zero_copy"] is True
        ids = stored_ids(store)
        assert sorted(ids) == sorted(d.profile_id for d in datas)  # every profile, exactly once

    def test_losing_a_worker_node_mid_run_loses_no_profile(self, cluster, backbone, tmp_path):
        """The way a spot node goes: its raylet, object store and actors vanish at once. The farm puts the
        profile that node was fitting back in the queue and starts a replacement actor; whichever actor is
        free first (the survivor, or the replacement on the node the autoscaler adds) fits it.

        The farm runs in a thread and the test drives the cluster from the main thread, because starting a
        node installs signal handlers, which only the main thread may do."""
        from xpeft.ray.farm import run_farm

        datas = profile_datas(profile_table(n_profiles=22, per_profile=14, seed=1)).profiles
        store = str(tmp_path / "store")
        before = all_actor_ids()
        out: dict = {}

        def farm():
            try:
                out["report"] = run_farm(farm_config(store, backbone), datas)
            except BaseException as e:  # re-raised in the test's thread below
                out["error"] = e

        t = threading.Thread(target=farm, daemon=True)
        t.start()
        deadline = time.time() + 120
        while len(stored_ids(store)) < 4 and t.is_alive() and time.time() < deadline:
            time.sleep(0.2)
        assert t.is_alive(), f"the run ended before the test could remove a node: {out}"
        busy = set(profile_actor_nodes(before).values())
        victim = next(n for n in cluster.worker_nodes if n.node_id in busy)
        cluster.remove_node(victim)
        cluster.add_node(node_ip_address=LOOPBACK, object_store_memory=80 * 2**20, num_cpus=1)
        t.join(180)
        assert not t.is_alive(), "the farm did not finish within 3 minutes of losing a node"
        if "error" in out:
            raise out["error"]
        report = out["report"]

        assert report.retries >= 1 and not report.failed
        ids = stored_ids(store)
        assert sorted(ids) == sorted(d.profile_id for d in datas)  # no profile lost, none stored twice
        actors = profile_actor_nodes(before)
        assert victim.node_id in set(actors.values())  # the lost node was fitting when it went
        assert len(actors) >= 3  # two at the start, and a replacement for the one that died with its node


# --- 3. `ray job submit` to a head started with `ray start --head` --------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def processes_under(temp_dir: str) -> list[int]:
    """Ray processes of one head: each names its session dir (under `temp_dir`) on its command line, or
    runs in it (a job's driver runs in its unpacked working dir), which no other Ray instance shares."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if temp_dir in cmd or cwd.startswith(temp_dir):
            pids.append(int(pid))
    return pids


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """What `ray stop` does, for this head only: SIGTERM, a grace period, then SIGKILL (the GCS server
    takes over 10 s to act on SIGTERM; nothing of a finished test needs its graceful exit)."""
    for sig, grace in ((signal.SIGTERM, 4), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        for pid in processes_under(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and (head.poll() is None or processes_under(temp_dir)):
            time.sleep(0.2)
    head.wait(5)


def wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> dict:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"`ray start --head` exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            raise
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard at {url} did not answer within {timeout}s:\n{log.read_text()[-4000:]}")


def unauthenticated_status(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/jobs/", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_to_a_local_head_stores_the_profiles(backbone, tmp_path, monkeypatch):
    """The cluster path, end to end on one machine: `ray start --head`, then `ray job submit
    --working-dir .` of the farm's job script with a data path and a store path the job's nodes can reach
    (here local paths; on a cluster, s3:// URIs).

    With token auth on, as docs/cluster.md sets a real cluster up: the head, the job's driver and the
    submitting client read one token (a private file via RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token, which
    would switch token auth on for every other local Ray here, is left alone)."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they override JobSubmissionClient's address
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "profiles.parquet"
    pq.write_table(profile_table(n_profiles=4, per_profile=10), data)
    store = tmp_path / "store"
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="xj", dir="/tmp")  # short: unix socket paths max out at 107 bytes
    dash_port = free_port()
    url = f"http://{LOOPBACK}:{dash_port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to 127.0.0.1 (see loopback_only)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
    }
    env.pop("RAY_AUTH_TOKEN", None)
    bin_ray = str(Path(sys.executable).parent / "ray")
    ports = f"--port={free_port()} --ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}"
    start = [bin_ray, "start", "--head", "--block", "--disable-usage-stats", *ports.split(), f"--temp-dir={temp_dir}"]
    start += [f"--dashboard-port={dash_port}", f"--dashboard-host={LOOPBACK}", "--include-dashboard=true"]
    log = tmp_path / "head.log"
    head = subprocess.Popen(
        [*start, "--num-cpus=2"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert wait_for_dashboard(url, token.read_text(), head, log)["ray_version"] == ray.__version__
        assert unauthenticated_status(url) == 401  # no token, no jobs
        # .venv and runs are in .gitignore, which Ray also honours; the excludes say it where it is read
        runtime_env = {"excludes": [".venv", ".git", "runs", "**/__pycache__"]}
        sid = f"xpeft-test-{os.getpid()}"
        entrypoint = ["python", "ray_jobs/fit_profiles.py", "--data", str(data), "--store", str(store)]
        entrypoint += ["--backbone", backbone, *"--N 16 --k 4 --b 8 --epochs 1 --num-actors 1".split()]
        entrypoint += ["--no-plots", "--no-progress"]
        submit = subprocess.run(
            [bin_ray, "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", "."]
            + ["--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token.read_text()}"})
        status = client.get_job_status(sid)
        assert submit.returncode == 0 and status == JobStatus.SUCCEEDED, (
            f"job {sid} ended {status}:\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"
        )
        assert "profiles stored in" in submit.stdout
        assert sorted(stored_ids(str(store))) == [f"author-{p:02d}" for p in range(4)]
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_under(temp_dir)
