"""Data-parallel training across processes and GPUs with torch.distributed (gloo on CPUs, NCCL on GPUs).

EP's gradient is not produced by the ``forward()`` of a wrapped module, so DistributedDataParallel's reducer hooks
never fire: the gradient is averaged explicitly across processes, weighted by each slice's rows:

    every rank sees the same global minibatch order (seeded by (seed, epoch)); rank r takes the contiguous slice
    rows[b_r:b_(r+1)] of each global minibatch of B rows, b_r = floor(r B / R) (``World.share``); it computes the
    EP estimate g_r of its slice, and one all_reduce(SUM) of the flattened (n_r / B) g_r gives every rank
    g = sum_r (n_r / B) g_r, the estimate of the whole minibatch (each term of EP's estimate is a batch mean);
    every rank applies the same optimizer update to the same parameters, so the parameters stay identical.

Statistics (loss, accuracy, steps) are summed once per epoch (``World.sum``, ``World.max``); the test set is split
across the ranks the same way. Checkpoints are written by rank 0 only (atomically, as in one process) and every
rank waits for it (``World.agree``: a failed write stops every rank); on resume every rank reads the file.

A failure on one rank (a diverging minibatch, a full disk) is announced to the others through the next collective
(a failure flag travels with the gradient), so every rank stops with an error instead of waiting forever.

Processes: ``launch(fn, nprocs)`` starts ``nprocs`` local processes with the spawn start method (torch with fork
can deadlock), a gloo group on 127.0.0.1, each process pinned to cores // nprocs cores with as many Numba/BLAS/torch
threads; ``from_env()`` joins the group a launcher such as ``torchrun`` describes in RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (env:// rendezvous; NCCL and one process per GPU when CUDA is available). See
docs/distributed_training.md. torch.distributed is imported inside these functions only.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .cluster import THREAD_VARIABLES, thread_environment  # (stdlib only: Ray is imported inside its functions)

#: environment variables of a torchrun (or any env://) launch
ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailure(RuntimeError):
    """Another rank failed (its own error is reported by that rank); this rank stops too."""


def env_launched() -> bool:
    """True when the process was started by torchrun (or another env:// launcher): RANK and WORLD_SIZE are set."""
    return all(os.environ.get(key) for key in ("RANK", "WORLD_SIZE"))


def env_secondary_rank() -> bool:
    """True in a torchrun process of rank > 0 (it neither claims nor writes outputs: rank 0 does)."""
    return env_launched() and os.environ.get("RANK", "0") != "0"


@dataclass
class World:
    """This process's place in a process group: ``rank`` of ``size``, ``local_rank`` on its node (the CUDA device of
    an NCCL group), the torch.distributed ``backend``; ``outputs_claimed``: the launcher already holds the output
    files' locks (``ebm ... --nproc``), so rank 0 writes without locking them again."""

    rank: int
    size: int
    local_rank: int = 0
    backend: str = "gloo"
    outputs_claimed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        """The device of the collectives' buffers: cuda:<local_rank> under NCCL, else the CPU."""
        import torch
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")

    def share(self, rows: int) -> slice:
        """This rank's contiguous slice of a global minibatch of ``rows`` rows: [floor(r rows / R),
        floor((r + 1) rows / R)) (the split ``ebm_sim.training.ep_gradient`` uses for its threads). May be empty
        when rows < size (a short last minibatch)."""
        bounds = np.linspace(0, rows, self.size + 1).astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    # ------------------------------------------------------------------------------------------- collectives
    def _all_reduce(self, tensor, op: str = "sum"):
        import torch.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=ops[op])
        return on_device.cpu() if on_device.device.type != "cpu" else on_device

    def average(self, arrays, weight: float, like=None, extras=(), failed: bool = False):
        """sum over ranks of weight * arrays (numpy arrays or torch tensors, one dtype), in one all_reduce of one flat
        buffer; ``extras`` (floats) are summed along (unweighted). Returns (arrays of the input's kind and shapes,
        extras as a float list). ``arrays`` None (a rank with an empty slice, or one that failed): zeros shaped like
        ``like``. failed=True announces this rank's failure; every other rank then raises PeerFailure (this one
        returns, and raises its own error)."""
        import torch

        template = arrays if arrays is not None else like
        is_torch = isinstance(template[0], torch.Tensor)
        if is_torch:
            dtype = template[0].dtype
        else:
            dtype = torch.from_numpy(np.zeros(0, dtype=np.result_type(*template))).dtype
        sizes = [int(np.prod(tuple(a.shape))) for a in template]
        if arrays is None:
            flat = torch.zeros(sum(sizes), dtype=dtype)
        else:
            parts = [(a.detach().reshape(-1).cpu() if is_torch else torch.from_numpy(np.ascontiguousarray(a))
                      .reshape(-1)).to(dtype) for a in arrays]
            flat = torch.cat(parts) * weight if parts else torch.zeros(0, dtype=dtype)
        tail = torch.tensor(list(map(float, extras)) + [1.0 if failed else 0.0], dtype=dtype)
        total = self._all_reduce(torch.cat([flat, tail]))
        if failed:
            return None, None
        if float(total[-1]) > 0:
            raise PeerFailure(f"{int(float(total[-1]))} other rank(s) failed (see their error); rank {self.rank} "
                              f"stops too")
        out, start = [], 0
        for a, size in zip(template, sizes):
            piece = total[start:start + size].reshape(tuple(a.shape))
            out.append(piece if is_torch else piece.numpy().astype(a.dtype, copy=False))
            start += size
        return out, [float(v) for v in total[len(flat):-1]]

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks of a float64 vector."""
        import torch
        return self._all_reduce(torch.tensor(np.asarray(values, dtype=np.float64))).numpy()

    def max(self, values) -> np.ndarray:
        """Element-wise maximum over ranks of a float64 vector."""
        import torch
        return self._all_reduce(torch.tensor(np.asarray(values, dtype=np.float64)), "max").numpy()

    def agree(self, ok: bool = True, what: str = "a step") -> None:
        """A barrier that also tells whether every rank succeeded: PeerFailure on the ranks that did (ok=True) when
        another one did not (ok=False: the failing rank returns and raises its own error)."""
        failures = int(self.sum([0.0 if ok else 1.0])[0])
        if ok and failures:
            raise PeerFailure(f"{failures} other rank(s) failed in {what} (see their error); rank {self.rank} stops too")

    def barrier(self) -> None:
        self.agree(True)

    def checksum_spread(self, arrays) -> float:
        """max - min over ranks of a float64 checksum of ``arrays`` (sum of |a| and of a * index): 0 when every rank
        holds the same values (a cheap check that the replicas did not drift)."""
        total = 0.0
        for a in arrays:
            a = np.asarray(a, dtype=np.float64).ravel()
            total += float(np.abs(a).sum() + (a * np.arange(1, a.size + 1) / a.size).sum())
        high = float(self.max([total])[0])
        low = -float(self.max([-total])[0])
        return high - low

    # ------------------------------------------------------------------------------------------- outputs
    @contextmanager
    def output_lock(self, path):
        """The output's lock for the block: rank 0 takes it (``ebm_sim.outputs.exclusive``) unless the launcher
        holds it; the other ranks never write and take nothing."""
        if self.is_main and not self.outputs_claimed:
            from .outputs import exclusive
            with exclusive(path):
                yield
        else:
            yield

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def single(world: World | None) -> bool:
    """True for one process (no world, or a world of one rank): the code paths of one process apply unchanged."""
    return world is None or world.size == 1


def log_on_main(world: World | None, log):
    """``log`` on rank 0, a no-op elsewhere (one copy of every message)."""
    if single(world) or world.is_main:
        return log
    return lambda *_args, **_kwargs: None


# ------------------------------------------------------------------------------------------- process groups
def default_backend(device: str | None = None) -> str:
    """nccl when the work runs on CUDA (and NCCL is built in), else gloo."""
    import torch.distributed as dist
    if device is not None and str(device).startswith("cuda") and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init(rank: int | None = None, world_size: int | None = None, address: str | None = None,
         port: int | None = None, backend: str | None = None, local_rank: int | None = None,
         timeout_s: float = 1800.0, outputs_claimed: bool = False) -> World:
    """Join (or make) the process group and return this process's World. Without rank/world_size: env://
    rendezvous from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK) as torchrun sets them. backend:
    "gloo" or "nccl" (default: nccl when CUDA is available, else gloo); under NCCL the process uses
    cuda:<local_rank>."""
    import datetime

    import torch
    import torch.distributed as dist

    if rank is None or world_size is None:
        missing = [key for key in ENV_KEYS if not os.environ.get(key)]
        if missing:
            raise ValueError(f"cannot join a process group: give rank and world_size, or launch with torchrun "
                             f"(environment variables {', '.join(missing)} are not set)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
        method = "env://"
    else:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
        method = f"tcp://{address or '127.0.0.1'}:{int(port or 29500)}"
    local_rank = rank if local_rank is None else local_rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("the nccl backend needs CUDA GPUs; use gloo on CPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=rank, size=world_size, local_rank=local_rank, backend=backend, outputs_claimed=outputs_claimed)


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` now (the rendezvous of a local group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def threads_per_rank(nprocs: int) -> int:
    """Cores of this process's affinity // nprocs (at least 1): each local rank's Numba, BLAS and torch threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nprocs)


def _entry(local_rank, fn, args, nprocs, port, backend, threads, cores, folder, outputs_claimed):
    """A spawned rank: pin it to its cores, join the group, run fn(world, *args), leave its result (or error) in
    ``folder``."""
    import torch

    if cores and hasattr(os, "sched_setaffinity"):
        mine = cores[(local_rank * threads) % len(cores):][:threads] or cores[:threads]
        try:
            os.sched_setaffinity(0, mine)
        except OSError:
            pass
    torch.set_num_threads(threads)
    world = init(local_rank, nprocs, "127.0.0.1", port, backend, local_rank, outputs_claimed=outputs_claimed)
    path = os.path.join(folder, f"rank{local_rank}.pkl")
    try:
        result = fn(world, *args)
    except BaseException as error:
        with open(path, "wb") as handle:
            try:
                pickle.dump(("error", error), handle)
            except Exception:  # an unpicklable exception: its text
                handle.seek(0)
                handle.truncate()
                pickle.dump(("error", RuntimeError(f"{type(error).__name__}: {error}")), handle)
        if not isinstance(error, Exception):  # torch's spawn takes a KeyboardInterrupt for a clean exit: make it
            raise RuntimeError(f"rank {local_rank} stopped: {type(error).__name__}") from error  # a failure
        raise
    else:
        with open(path, "wb") as handle:
            pickle.dump(("ok", result), handle)
        world.barrier()  # every rank done before any tears the group down: a peer gone mid-teardown aborts gloo
    finally:
        world.close()


def launch(fn, nprocs: int, args: tuple = (), backend: str = "gloo", threads: int | None = None,
           outputs_claimed: bool = False) -> list:
    """Run fn(world, *args) in ``nprocs`` local processes (spawn start method: torch with fork can deadlock) forming
    one process group on 127.0.0.1 (gloo by default); return the ranks' return values in rank order. ``fn`` and
    ``args`` must be picklable (a module-level function). Each rank is pinned to ``threads`` cores (default cores //
    nprocs) and uses that many Numba/BLAS/torch threads. An error in any rank stops them all and is raised here (the
    first failing rank's own exception, not the PeerFailure of the others)."""
    import torch.multiprocessing as mp

    if not (isinstance(nprocs, int) and nprocs >= 1):
        raise ValueError(f"the number of processes must be a positive integer, got {nprocs!r}")
    threads = threads or threads_per_rank(nprocs)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    saved = {key: os.environ.get(key) for key in THREAD_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="ebm-ranks-") as folder:
        os.environ.update(thread_environment(threads))  # inherited by the spawned ranks (Numba reads its own at import)
        context = None
        try:
            context = mp.start_processes(_entry, args=(fn, args, nprocs, free_port(), backend, threads, cores,
                                                       folder, outputs_claimed),
                                         nprocs=nprocs, join=False, start_method="spawn")
            while not context.join():  # on a rank's failure join terminates the others and raises
                pass
        except BaseException as error:
            if context is not None:  # Ctrl-C here: stop every rank (they may wait in a collective)
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(10)
            finished = None if isinstance(error, KeyboardInterrupt) else _rank_results(folder, nprocs)
            if finished is None:
                raise (_rank_error(folder, nprocs) or error) from None
            return finished  # every rank stored its result: what failed came after it (gloo aborting at teardown)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return _rank_results(folder, nprocs)


def _rank_results(folder: str, nprocs: int) -> list | None:
    """Every rank's return value in rank order, or None unless every rank left an "ok" result in ``folder``."""
    results = []
    for rank in range(nprocs):
        try:
            with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as handle:
                kind, value = pickle.load(handle)
        except Exception:
            return None
        if kind != "ok":
            return None
        results.append(value)
    return results


def _rank_error(folder: str, nprocs: int):
    """The first rank's own error (not a PeerFailure) left in ``folder``, or None."""
    errors = []
    for rank in range(nprocs):
        path = os.path.join(folder, f"rank{rank}.pkl")
        if os.path.exists(path):
            try:
                with open(path, "rb") as handle:
                    kind, value = pickle.load(handle)
            except Exception:
                continue
            if kind == "error":
                errors.append(value)
    own = [e for e in errors if not isinstance(e, PeerFailure)]
    return (own or errors or [None])[0]


# ------------------------------------------------------------------------------------------- the equivalence check
def _train_small(world, settings: dict, checkpoint_path=None, resume: bool = False, epochs: int | None = None):
    """Train the small dense problem of ``check_matches_single`` (rank function of ``launch``, or world None for one
    process); return (parameters, history, seconds per epoch, largest spread of the replicas' checksums)."""
    from .datasets import load_digits
    from .network import Network
    from .training import TrainConfig, fit, parameters

    data = load_digits()
    n_train, n_test = settings["train"], settings["test"]
    config = TrainConfig(**{**settings["config"], **({"epochs": epochs} if epochs else {})})
    network = Network.init(tuple(settings["layers"]), seed=settings["seed"])
    fit(network, data.x_train[:n_train], data.y_train[:n_train], data.x_test[:n_test], data.y_test[:n_test], config,
        checkpoint_path=checkpoint_path, resume=resume, progress=False, log=lambda *_: None, world=world)
    params = [np.array(p) for p in parameters(network)]
    spread = 0.0 if single(world) else world.checksum_spread(params)
    return params, {k: list(v) for k, v in network.history.items()}, network.history["seconds"], spread


SMALL_PROBLEM = {"layers": (64, 32, 10), "seed": 0, "train": 600, "test": 200,
                 "config": {"epochs": 2, "batch_size": 50, "beta": 0.5, "lr": 2e-3, "free_steps": 30,
                            "nudged_steps": 10, "tol": 1e-4}}
#: the stated tolerance: largest |difference| of parameters relative to the largest |parameter|, after 2 epochs
TOLERANCE = 1e-5


def compare_runs(single_run, ranks_runs, tolerance: float = TOLERANCE) -> dict:
    """Max differences between one process's (parameters, history) and rank 0's, and the replicas' spread."""
    params_1, history_1 = single_run[0], single_run[1]
    params_n, history_n = ranks_runs[0][0], ranks_runs[0][1]
    scale = max(float(np.abs(p).max()) for p in params_1)
    max_abs = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(params_1, params_n))
    history_diff = max(abs(a - b) for key in history_1 if key != "seconds"
                       for a, b in zip(history_1[key], history_n[key]))
    spread = max(run[3] for run in ranks_runs)
    accuracy_equal = (history_1["train_acc"] == history_n["train_acc"]
                      and history_1["test_acc"] == history_n["test_acc"])
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "history_max_diff": history_diff,
            "accuracies_equal": accuracy_equal, "replica_spread": spread, "tolerance": tolerance,
            "matches": bool(max_abs / scale <= tolerance and accuracy_equal and spread == 0.0)}


def check_matches_single(nprocs: int = 2, problem: dict | None = None, tolerance: float = TOLERANCE) -> dict:
    """Train a small dense network (default 64-32-10 on 600 digits, 2 epochs, batch 50, Adam) in one process and in
    ``nprocs`` gloo processes (spawn, 127.0.0.1) with the same global minibatches; return
    {"ddp_matches_single": bool, "max_abs_diff", "max_rel_diff" (parameters, relative to the largest |parameter|),
    "history_max_diff" (losses, accuracies, steps; seconds aside), "accuracies_equal", "replica_spread" (checksum
    max - min over ranks: 0 = identical replicas), "tolerance", "nprocs", "seconds_per_epoch_single",
    "seconds_per_epoch_ddp" (the last epoch's: the first includes the ranks' Numba warm-up), "seconds_epochs_single",
    "seconds_epochs_ddp" (every epoch), "epochs", "problem"}. For benchmarks/scale.py (times are wall-clock on
    whatever else the machine runs)."""
    problem = problem or SMALL_PROBLEM
    start = time.perf_counter()
    one = _train_small(None, problem)
    many = launch(_train_small, nprocs, (problem,))
    report = compare_runs(one, many, tolerance)
    epochs = problem["config"]["epochs"]
    return {"ddp_matches_single": report.pop("matches"), **report, "nprocs": nprocs, "epochs": epochs,
            "seconds_per_epoch_single": float(one[2][-1]), "seconds_per_epoch_ddp": float(many[0][2][-1]),
            "seconds_epochs_single": [float(v) for v in one[2]], "seconds_epochs_ddp": [float(v) for v in many[0][2]],
            "seconds_total": time.perf_counter() - start,
            "problem": {**problem, "layers": list(problem["layers"])}}



# ------------------------------------------------------------------------------------------- the commands' entry
def check_nprocs(nprocs, batch_size: int | None = None, device: str | None = None) -> int:
    """Validate a ``--nproc`` value before any work: a positive integer; under torchrun 1 or WORLD_SIZE (torchrun
    starts the processes); at most ``batch_size`` (every process needs a row of each minibatch); on CUDA (NCCL) at
    most one local process per GPU."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nprocs!r}")
    if env_launched() and nprocs not in (1, int(os.environ["WORLD_SIZE"])):
        raise ValueError(f"--nproc {nprocs} under torchrun, which started WORLD_SIZE={os.environ['WORLD_SIZE']} "
                         f"processes: leave --nproc out (torchrun's --nproc-per-node decides)")
    size = int(os.environ["WORLD_SIZE"]) if env_launched() else nprocs
    if batch_size is not None and batch_size < size:
        raise ValueError(f"a minibatch of {batch_size} samples cannot give each of {size} processes a slice: use "
                         f"--batch-size {size} or more, or fewer processes")
    if nprocs > 1 and not env_launched() and device is not None and str(device).startswith("cuda"):
        import torch
        gpus = torch.cuda.device_count()
        if nprocs > gpus:
            has = f"this machine has {gpus}; use --nproc {gpus} or fewer" if gpus else "this machine has none"
            raise ValueError(f"--nproc {nprocs} with --device {device}: NCCL takes one process per GPU and {has}, "
                             f"or --device cpu (gloo)")
    return nprocs


def run(fn, nprocs: int, args: tuple = (), device: str | None = None):
    """How a command runs fn(world, *args): under torchrun (RANK and WORLD_SIZE set) this process joins the env://
    group (NCCL when ``device`` is CUDA, else gloo) and returns its own result; with nprocs > 1 it spawns that many
    local processes (``launch``; the command line already holds the output locks) and returns rank 0's result;
    otherwise fn(None, *args)."""
    if env_launched():
        world = init(backend=default_backend(device), outputs_claimed=True)
        try:
            return fn(world, *args)
        finally:
            world.close()
    if nprocs > 1:
        return launch(fn, nprocs, args, backend=default_backend(device), outputs_claimed=True)[0]
    return fn(None, *args)


def rank_device(world: World | None, device: str) -> str:
    """The torch device of this rank: cuda:<local_rank> for a plain "cuda" under NCCL (one process per GPU)."""
    if world is not None and world.backend == "nccl" and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device
