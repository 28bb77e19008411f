"""Multi-host runs: start JAX's multi-controller runtime before anything touches a device.

One training run = N processes (one per host, or one per GPU), each driving its local
accelerators; together they see one global device mesh. `initialize(section)` joins
the process to the job. Where the settings come from, first match wins:

1. explicit: `distributed.coordinator_address` / `num_processes` / `process_id` in the
   config, else the environment variables `JAXALIGN_COORDINATOR`,
   `JAXALIGN_NUM_PROCESSES`, `JAXALIGN_PROCESS_ID` (`JAX_COORDINATOR_ADDRESS`, JAX's own,
   is also accepted for the address);
2. a managed cluster that JAX detects by itself (when `distributed.auto_detect`): a Cloud
   TPU pod or multislice job, a SLURM step with more than one task (`srun`), Open MPI
   (`mpirun`); `JAXALIGN_DISTRIBUTED=auto` forces JAX's detection, `=off` disables all of
   this;
3. otherwise nothing happens: a single process using all its local devices.

Failing to form the job must not hang: a process that is not the coordinator first
polls the coordinator's TCP port, and a watchdog ends any process whose join has not
finished within `initialization_timeout` seconds, with a message naming the address.
(JAX itself aborts the process with a terse gRPC status, later than that.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"
ENV_MODE = "JAXALIGN_DISTRIBUTED"  # "auto": let JAX detect the cluster; "off": never initialize
WATCHDOG_EXIT_CODE = 2  # what the CLI returns for user-facing errors


class DistributedError(JaxalignError, RuntimeError):
    """The multi-process job could not be formed (bad address, missing settings, timeout)."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What `initialize` passes to `jax.distributed.initialize` (None: JAX detects it)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    initialization_timeout: int
    source: str  # "config", "environment", "slurm", "tpu", "mpi", "forced"

    def describe(self) -> str:
        who = f"process {self.process_id}" if self.process_id is not None else "this process"
        of = f" of {self.num_processes}" if self.num_processes is not None else ""
        at = self.coordinator_address or "the auto-detected coordinator"
        return f"{who}{of} (settings from {self.source}), coordinator {at}"


def _get(section: Any, name: str, default=None):
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(name, default)
    return getattr(section, name, default)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} must be an integer") from None


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[ipv6]:port`) -> (host, port); DistributedError when malformed."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator address {address!r} must look like HOST:PORT (e.g. 10.0.0.1:1234), "
            "the host of process 0 and a free port on it"
        )
    return host.strip("[]"), int(port)


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """Name of a managed multi-process environment JAX can auto-detect, or None.

    Only environment variables are read (no device, no network), so it is safe before
    `jax.distributed.initialize`. SLURM counts only inside a step with more than one task
    (an interactive `salloc` shell or the batch script itself is a single process).
    """
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode in ("auto", "1", "true", "yes", "on"):
        return "forced"
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
        if tasks and tasks.isdigit() and int(tasks) > 1:
            return "slurm"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        hosts = (env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or "").split(",")
        if len([h for h in hosts if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
            return "tpu"
    size = env.get("OMPI_COMM_WORLD_SIZE")
    if size and size.isdigit() and int(size) > 1:
        return "mpi"
    return None


def _cluster_ids(cluster: str | None, env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(process count, this process's id) as the launcher (srun, mpirun) set them; JAX reads the same."""
    if cluster == "slurm":
        count = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        return _env_int(env, count), _env_int(env, "SLURM_PROCID")
    if cluster == "mpi":
        return _env_int(env, "OMPI_COMM_WORLD_SIZE"), _env_int(env, "OMPI_COMM_WORLD_RANK")
    return None, None


def resolve(section: Any = None, env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The settings to initialize with, or None for a plain single-process run.

    `section`: a `DistributedSection` (or a mapping with its keys, or None). Config values
    win over environment variables, which win over what a detected cluster says. Pure:
    reads only `section` and `env`.
    """
    env = os.environ if env is None else env
    if env.get(ENV_MODE, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    timeout = int(_get(section, "initialization_timeout", 300) or 300)
    if timeout <= 0:
        raise DistributedError(f"distributed.initialization_timeout={timeout} must be a positive number of seconds")
    ids = _get(section, "local_device_ids")
    local_ids = tuple(int(i) for i in ([ids] if isinstance(ids, int) else ids)) if ids is not None else None

    coord = _get(section, "coordinator_address")
    nproc = _get(section, "num_processes")
    pid = _get(section, "process_id")
    source = "config" if (coord, nproc, pid) != (None, None, None) else "environment"
    coord = coord or env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS") or None
    nproc = nproc if nproc is not None else _env_int(env, ENV_NUM_PROCESSES)
    pid = pid if pid is not None else _env_int(env, ENV_PROCESS_ID)
    explicit = (coord, nproc, pid) != (None, None, None)
    cluster = detect_cluster(env) if _get(section, "auto_detect", True) else None
    if cluster is not None:
        source = f"{source}+{cluster}" if explicit else cluster
        count, rank = _cluster_ids(cluster, env)
        nproc = nproc if nproc is not None else count
        pid = pid if pid is not None else rank
    elif not explicit:
        return None

    if nproc is not None and nproc < 1:
        raise DistributedError(f"num_processes={nproc} must be at least 1")
    if nproc == 1 and pid in (None, 0):
        return None  # explicitly single-process
    if cluster is None:  # nothing to detect the rest from: everything must be given
        missing = [name for name, v in (("coordinator_address", coord), ("num_processes", nproc),
                                        ("process_id", pid)) if v is None]
        if missing:
            raise DistributedError(
                "a multi-process run needs distributed.coordinator_address, num_processes and process_id "
                f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: {', '.join(missing)}. "
                "On a TPU pod or under SLURM srun leave all three unset to auto-detect them"
            )
    if nproc is not None and pid is not None and not 0 <= pid < nproc:
        raise DistributedError(f"process_id={pid} must be in [0, num_processes={nproc})")
    if coord is not None:
        parse_address(coord)
    return DistributedSettings(coord, nproc, pid, local_ids, timeout, source)


def wait_for_coordinator(address: str, timeout: float, poll: float = 0.25) -> None:
    """Poll until `address` accepts TCP connections; DistributedError naming it after `timeout` s."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            last = e
            infos = []
        for family, kind, proto, _, sockaddr in infos:
            try:
                with socket.socket(family, kind, proto) as s:
                    s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                    s.connect(sockaddr)
                    return
            except OSError as e:
                last = e
        if time.monotonic() >= deadline:
            reason = f"{type(last).__name__}: {last}" if last is not None else "no answer"
            raise DistributedError(
                f"could not reach the coordinator at {address} within {timeout:g} s ({reason}). "
                "Is process 0 running and listening there, is the host name/IP reachable from this host, "
                "and is the port open in the firewall? Set distributed.coordinator_address "
                f"(or {ENV_COORDINATOR}) to process 0's HOST:PORT, or raise distributed.initialization_timeout"
            )
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


class _Watchdog:
    """Ends the process with a clear message if the join has not finished by the deadline.

    `jax.distributed.initialize` blocks in C++ and, on failure, aborts the process (no
    Python exception) after roughly twice its timeout; this fires first and says why.
    """

    def __init__(self, seconds: float, message: str):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds, message), daemon=True,
                                        name="jaxalign-distributed-watchdog")

    def _run(self, seconds: float, message: str) -> None:
        if self._done.wait(seconds):
            return
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT_CODE)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        return False


def is_initialized() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: let JAX's own check speak
        return False


def initialize(section: Any = None, env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """Join the multi-process job described by `section` / the environment (see module doc).

    Call it before anything touches a device (`jax.devices()`, any computation). Returns
    the settings used, or None when the run is single-process (nothing is done). Calling
    it again after a successful join is a no-op.
    """
    import jax

    if is_initialized():
        return None
    settings = resolve(section, env)
    if settings is None:
        return None
    if _backends_initialized():
        raise DistributedError(
            f"cannot join the multi-process job ({settings.describe()}): JAX devices were already used in this "
            "process. Call jaxalign.parallel.distributed.initialize() (the `jaxalign train` command does) before "
            "anything calls jax.devices() or runs a computation"
        )
    if getattr(jax.config, "jax_cpu_collectives_implementation", "") is None:  # older JAX: no CPU collectives
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    start = time.monotonic()
    timeout = settings.initialization_timeout
    if settings.coordinator_address is not None and settings.process_id not in (None, 0):
        wait_for_coordinator(settings.coordinator_address, timeout)
    remaining = max(1, math.ceil(timeout - (time.monotonic() - start)))
    where = settings.coordinator_address or "the auto-detected coordinator"
    message = (
        f"the multi-process job did not form within distributed.initialization_timeout={timeout} s: "
        f"{settings.describe()}. Check that all {settings.num_processes or 'N'} processes were started with the "
        f"same coordinator address ({where}) and distinct process ids, and that process 0 can be reached there"
    )
    log.info("joining the multi-process job: %s", settings.describe())
    kwargs: dict[str, Any] = dict(coordinator_address=settings.coordinator_address,
                                  num_processes=settings.num_processes, process_id=settings.process_id,
                                  initialization_timeout=remaining)
    if settings.local_device_ids is not None:
        kwargs["local_device_ids"] = list(settings.local_device_ids)
    with _Watchdog(max(0.5, timeout - (time.monotonic() - start)) + 1.0, message):
        try:
            jax.distributed.initialize(**kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            raise DistributedError(f"could not join the multi-process job ({settings.describe()}): {e}") from e
    log.info("joined: process %d of %d", jax.process_index(), jax.process_count())
    return settings


def gather_replicated(x, keep: bool = True, chunk_bytes: int = 256 * 2**20):
    """A NamedSharding-sharded global array as one numpy array (None where `keep` is False).

    Resharded to replicated and copied out in chunks of its leading axis of at most
    `chunk_bytes` (one compiled slice per leaf shape), so no device ever holds more than
    one chunk of it in full. A collective: every process must call it.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(x.sharding.mesh, PartitionSpec())
    if x.ndim == 0 or x.nbytes <= chunk_bytes or x.shape[0] == 1:
        out = jax.jit(lambda a: a, out_shardings=replicated)(x)
        if keep:
            return np.asarray(out)
        out.block_until_ready()
        return None
    n, row_bytes = x.shape[0], x.nbytes // x.shape[0]
    rows = max((r for r in range(1, n + 1) if n % r == 0 and r * row_bytes <= chunk_bytes), default=1)
    take = jax.jit(lambda a, i: jax.lax.dynamic_slice_in_dim(a, i, rows, 0), out_shardings=replicated)
    host = np.empty(x.shape, x.dtype) if keep else None
    for start in range(0, n, rows):
        piece = take(x, start)
        if keep:
            host[start:start + rows] = np.asarray(piece)
        else:
            piece.block_until_ready()
        del piece
    return host


def fetch_to_host(tree, keep: bool = True, chunk_bytes: int = 256 * 2**20):
    """Every array leaf of `tree` as a numpy array on this host (None where `keep` is False).

    Works for arrays sharded over several processes, where `np.asarray` fails: those are
    gathered with `gather_replicated`. Every process must call this with the same tree
    (the gathers are collectives); pass `keep=False` where the result is not needed.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    def fetch(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x) if keep and x is not None else None
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x) if keep else None
        if isinstance(x.sharding, NamedSharding):
            return gather_replicated(x, keep, chunk_bytes)
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(out) if keep else None

    return jax.tree.map(fetch, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
