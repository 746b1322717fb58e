"""Ray plumbing for embarrassingly parallel work (sharded relaxation, robustness parts, latency runs).

    from ebm_sim import cluster
    cluster.connect("local")                       # or "auto" (a running cluster), or "HOST:PORT" / "ray://HOST:PORT"
    for index, result in cluster.run_tasks(work, [(a, b), (c, d)], threads=1):
        ...                                        # results as the tasks finish, with the index of their arguments

Ray is optional (``pip install -e .[cluster]``) and imported only inside these functions: without ``--cluster`` no
command imports it. ``connect`` reuses a Ray already initialised in this process (one cluster per process: the test
suite starts one for the whole run). Known traps handled here:

- Ray sets OMP_NUM_THREADS in its workers but not NUMBA_NUM_THREADS (nor the BLAS variables): every Numba worker
  would start a pool over every core. ``task_env`` sets them all per task through ``runtime_env``.
- A small /dev/shm makes Ray put its object store in /tmp (slow): ``connect`` sizes ``object_store_memory`` to fit
  the free space of /dev/shm (``default_object_store_bytes``).
- Arrays that come out of ``ray.get`` (and the arguments a task receives from the object store) are read-only: a
  task copies them before an in-place kernel.
- A task that fails with a transient error (``TRANSIENT``: OSError, e.g. a full or flaky disk) or whose worker dies
  (killed, out of memory) is run again up to ``max_retries`` times; a deterministic error (ValueError, a diverging
  relaxation) is not retried but raised in the driver as itself. Retried tasks must be idempotent: every caller in
  this toolkit writes its result under a name fixed by what determines it (atomically), so a retry rewrites the same
  file and never duplicates a row.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

CLUSTER_CHOICES = ("local", "auto")
CLUSTER_HELP = ("run the parallel work on Ray: 'local' (a Ray started on this machine for this command), 'auto' (the "
                "Ray cluster this machine belongs to, `ray start`), or HOST:PORT / ray://HOST:PORT (a cluster's "
                "address); needs `pip install -e .[cluster]`. Without it nothing imports Ray")
#: exceptions a task is retried for (besides a dead worker, always retried): transient, not the task's own mistake
TRANSIENT = (OSError,)
#: Ray's smallest object store (bytes); the default is at most 2 GiB and fits /dev/shm's free space
MIN_OBJECT_STORE = 80 * 2 ** 20
MAX_DEFAULT_OBJECT_STORE = 2 * 2 ** 30
#: the thread-count variables a worker process reads (Ray tasks here, local torch.distributed ranks in distributed.py)
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9][A-Za-z0-9.\-]*:\d{1,5}$")


class ClusterError(ValueError):
    """Ray is missing, or the cluster cannot be reached: the ``--cluster`` setting cannot be served (a ValueError, so
    that ``ebm`` reports it as a usage error, exit status 2)."""

INSTALL_HINT = "--cluster needs Ray, an optional install: pip install -e .[cluster] (`make install` installs it)"


def ray_installed() -> bool:
    """Whether Ray can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def check_cluster(value) -> str | None:
    """The ``--cluster`` value, validated before any work: None, "local", "auto", or an address HOST:PORT or
    ray://HOST:PORT (port 1..65535), with Ray installed. ValueError naming the problem otherwise (ClusterError
    when Ray is missing)."""
    if value is None:
        return None
    text = str(value).strip()
    if text in CLUSTER_CHOICES or (_ADDRESS.match(text) and 0 < int(text.rsplit(":", 1)[1]) < 65536):
        if not ray_installed():
            raise ClusterError(INSTALL_HINT)
        return text
    raise ValueError(f"cluster (--cluster) must be 'local', 'auto' or a Ray address HOST:PORT (or "
                     f"ray://HOST:PORT), got {value!r}")


def cluster_argument(text: str) -> str:
    """argparse type of ``--cluster`` (``check_cluster``, its message as the usage error)."""
    import argparse

    try:
        return check_cluster(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("cluster (--cluster) must", "must")) from None


def ray_module():
    """``import ray``, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None
    return ray


def default_object_store_bytes(shm: str = "/dev/shm") -> int:
    """Object store size for a local Ray: 30 % of memory (Ray's default) capped at 2 GiB and at 80 % of the free
    space of /dev/shm, so that Ray never falls back to a store in /tmp; at least Ray's minimum (80 MiB)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 * 2 ** 30
    size = min(int(0.3 * memory), MAX_DEFAULT_OBJECT_STORE)
    try:
        size = min(size, int(0.8 * shutil.disk_usage(shm).free))
    except OSError:
        pass
    return max(size, MIN_OBJECT_STORE)


def connect(cluster: str = "local", num_cpus: int | None = None, object_store_memory: int | None = None,
            log=None):
    """Connect this process to Ray and return the ``ray`` module.

    cluster: "local" starts Ray on this machine (num_cpus workers, default every core; ``object_store_memory``
    bytes, default ``default_object_store_bytes()``), "auto" joins the cluster this machine belongs to, an address
    joins that cluster (num_cpus and object_store_memory are then the cluster's own). A Ray already initialised in
    this process is reused as it is. ClusterError if Ray is missing or the cluster cannot be reached.
    """
    cluster = check_cluster(cluster)
    if cluster is None:
        raise ValueError("connect needs a cluster: 'local', 'auto' or an address")
    if num_cpus is not None and not (isinstance(num_cpus, int) and num_cpus >= 1):
        raise ValueError(f"num_cpus must be a positive integer, got {num_cpus!r}")
    ray = ray_module()
    if ray.is_initialized():
        return ray
    log = log or (lambda msg: print(msg, file=sys.stderr))
    options = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    try:
        if cluster == "local":
            store = object_store_memory or default_object_store_bytes()
            ray.init(num_cpus=num_cpus, object_store_memory=store, **options)
        else:
            if num_cpus is not None or object_store_memory is not None:
                log("note: num_cpus and object_store_memory are the cluster's own when joining one; ignored")
            ray.init(address=cluster, **options)
    except ConnectionError as error:
        raise ClusterError(f"cannot reach the Ray cluster {cluster!r}: {error}") from None
    resources = ray.cluster_resources()
    log(f"ray: {cluster} cluster, {int(resources.get('CPU', 0))} CPUs on {len(ray.nodes())} node(s)")
    return ray


def shutdown() -> None:
    """Stop this process's connection to Ray (and a local Ray it started); nothing when Ray was never imported."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def task_env(threads: int = 1) -> dict:
    """Ray ``runtime_env`` of a task that may use ``threads`` threads: NUMBA_NUM_THREADS (Ray sets only
    OMP_NUM_THREADS), OMP, OpenBLAS and MKL, so that tasks sharing a node do not each take every core."""
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads per task must be a positive integer, got {threads!r}")
    return {"env_vars": thread_environment(threads)}


def thread_environment(threads: int) -> dict:
    """{variable: str(threads)} for every THREAD_VARIABLES entry: a worker process's thread counts."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def put(value):
    """``ray.put(value)``: an object shared by many tasks is stored once (pass the reference as an argument)."""
    return ray_module().put(value)


def run_tasks(function, arguments, *, threads: int = 1, num_cpus: float | None = None, max_retries: int = 3,
              retry_exceptions=TRANSIENT, progress: bool = False, desc: str = "tasks"):
    """Run ``function(*args)`` for every tuple of ``arguments`` as Ray tasks; yield (index, result) as they finish.

    threads: the threads each task may use (``task_env``); num_cpus: CPUs Ray reserves per task (default threads).
    max_retries: how often a task whose worker died, or that raised one of ``retry_exceptions`` (a tuple of
    exception classes, or True for any), is run again. The function must be idempotent (see the module docstring).
    A task's error is raised here as its own class; the tasks not yet finished are then cancelled, and so they are
    when the caller stops early (Ctrl-C, or closing the generator). Needs ``connect`` first.
    """
    ray = ray_module()
    if not ray.is_initialized():
        raise ClusterError("run_tasks needs a Ray connection: call ebm_sim.cluster.connect(...) first")
    if not (isinstance(max_retries, int) and max_retries >= 0):
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    arguments = [tuple(args) for args in arguments]
    retry = retry_exceptions if isinstance(retry_exceptions, bool) else list(retry_exceptions)
    remote = ray.remote(function).options(num_cpus=threads if num_cpus is None else num_cpus,
                                          max_retries=max_retries, retry_exceptions=retry,
                                          runtime_env=task_env(threads))
    index = {remote.remote(*args): i for i, args in enumerate(arguments)}
    pending = list(index)
    from tqdm import tqdm
    bar = tqdm(total=len(pending), desc=desc, unit="task", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # the task's own error, without Ray's wrapping
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
                bar.update(1)
                yield index[ref], result
    finally:
        bar.close()
        for ref in pending:  # an error, Ctrl-C or an early stop: do not leave work running for nobody
            ray.cancel(ref)
