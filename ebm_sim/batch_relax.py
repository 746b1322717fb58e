"""Relax a whole dataset to its fixed points and store them: resumable batch work behind ``ebm relax``.

Finished batches are saved atomically to ``<OUT>.partial.npz`` (every ``checkpoint_every`` batches and on Ctrl-C);
a later call with the same network, data and settings continues from there. The partial file is deleted once the
final ``ebm-fixed-points`` artifact is written, and nothing is ever written under the final name before the end.

With ``cluster`` (``ebm relax --cluster``) the batches are grouped into shards, one Ray task each (``ebm_sim.cluster``),
each shard written to its own file in ``OUT.shards/`` and the shards merged into the same OUT as without it
(``relax_to_file``; docs/scaling.md).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model.network import is_layered
from .outputs import atomic_path, check_output, exclusive, require_space

PARTIAL_SUFFIX = ".partial.npz"
PARTIAL_FORMAT = "ebm-relax-partial/1"


class RunError(RuntimeError):
    """A run that cannot finish (e.g. diverging dynamics): exit status 1."""


def partial_path(out) -> Path:
    """Where ``ebm relax -o OUT`` keeps its finished batches until OUT is written: ``OUT.partial.npz``."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _run_key(network_hash: str, x: np.ndarray, y: np.ndarray, settings: dict) -> str:
    """Identity of a relaxation run (network, exact data, settings incl. batch size): a partial file is only
    resumed by a run with the same key."""
    data = hashlib.sha256()
    for array in (x, y):
        array = np.ascontiguousarray(array)
        data.update(f"{array.dtype.str}{array.shape}".encode())
        data.update(array)
    return json.dumps({"format": PARTIAL_FORMAT, "network_hash": network_hash, "data_sha256": data.hexdigest(),
                       "settings": settings}, sort_keys=True, default=str)


def _save_partial(path: Path, key: str, done: int, elapsed: float, parts: dict) -> None:
    """Atomically write the finished samples [0, done) to ``path`` (temporary file in the same folder, fsync,
    rename); an exception (Ctrl-C included) removes the temporary file and leaves ``path`` as it was."""
    arrays = {"key": np.array(key), "done": np.array(done, dtype=np.int64),
              "elapsed": np.array(elapsed, dtype=np.float64)}
    for name, chunks in parts.items():
        arrays[name] = np.concatenate(chunks) if chunks else np.empty(0)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def _load_partial(path: Path, key: str, num_layers: int, log) -> tuple[int, float, dict] | None:
    """(done, elapsed, parts) from a partial file made by the same run, else None (with a note why)."""
    if not path.exists():
        return None
    try:
        _check_stored(path)
        with np.load(path, allow_pickle=False) as z:
            stored_key = str(z["key"][()])
            if stored_key != key:
                log(f"note: ignoring {path}: it was made by a different run (network, data or settings differ); "
                    f"starting from the beginning")
                return None
            done, elapsed = int(z["done"]), float(z["elapsed"])
            names = [f"s{k}" for k in range(1, num_layers + 1)] + ["residuals", "steps", "converged"]
            parts = {name: [z[name]] for name in names}
    except Exception as e:  # unreadable / truncated partial: start again rather than fail
        log(f"note: ignoring unreadable {path} ({type(e).__name__}: {e}); starting from the beginning")
        return None
    if any(p[0].shape[0] != done for p in parts.values()):
        log(f"note: ignoring inconsistent {path}; starting from the beginning")
        return None
    return done, elapsed, parts


def _check_stored(path: Path) -> None:
    """Refuse a partial file whose members are compressed: ``np.savez`` stores them plainly, so none can inflate
    beyond the file's own size (a forged, zip-bombed file is ignored instead of read)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
            raise ValueError("compressed members (np.savez never writes them)")


#: ``ebm relax``'s settings for a network file that stores no deployment (an untrained network)
UNTRAINED_RELAX = {"method": "fixed_point", "tol": 1e-4, "max_steps": 1000, "dt": None}


def sample_shape(network) -> tuple:
    """The shape of one input: (n_0,) for a dense network, its input layer's (C, H, W) or (n,) for a layered one."""
    return tuple(network.input_shape) if is_layered(network) else (network.layer_sizes[0],)


def state_units(network) -> list:
    """Units of each layer that relaxes (C * H * W for a (C, H, W) layer)."""
    if is_layered(network):
        return [int(np.prod(shape)) for shape in network.state_shapes]
    return list(network.state_sizes)


@dataclass
class BatchRelaxation:
    """One batch's fixed points: states (list of (B, *shape_k)), residual (B,), steps (B,), converged (B,),
    diverged (B,) (NaN or inf met)."""

    states: list
    residual: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray


def relax_batch(network, x, method: str, tol: float, max_steps: int, dt, threads: int | None = None) -> BatchRelaxation:
    """Relax one batch of a dense Network (``ebm_sim.relax``, Numba kernels) or a LayeredNetwork
    (``ebm_sim.model.dynamics.relax`` with the Numba interaction backend) and flag divergence. threads: how many
    threads a dense network's batch is split between (default: one per available core); the split decides the last
    bits of the result (each thread's rows retire on their own), so runs that must agree bit for bit use the same."""
    if not is_layered(network):
        from .relax import relax
        r = relax(network, x, method=method, tol=tol, max_steps=max_steps, dt=dt, on_divergence="flag",
                  threads=threads)
        return BatchRelaxation(r.states, r.residual, r.steps, r.converged, r.diverged)
    from .model.dynamics import relax as relax_layered
    from .model.energy import parameters
    r = relax_layered(network, x, method, tol, max_steps, dt, params=parameters(network, "numba"))
    residual = np.asarray(r.residual, dtype=np.float64)
    diverged = ~np.isfinite(residual) | ~np.all([np.isfinite(s.reshape(len(s), -1)).all(axis=1) for s in r.states],
                                                axis=0)
    return BatchRelaxation(r.states, residual, np.asarray(r.steps), np.asarray(r.converged), diverged)


def relax_to_file(network, x, labels, out, *, method: str = "fixed_point", tol: float = 1e-4,
                  max_steps: int = 1000, dt: float | None = None, batch_size: int = 256, dtype=None,
                  meta: dict | None = None, checkpoint_every: int = 10, resume: bool = True,
                  progress: bool = True, log=None, threads: int | None = None, cluster: str | None = None,
                  shard_size: int | None = None) -> dict:
    """Relax every sample of x in batches and write an ``ebm-fixed-points`` file to ``out``.

    network: a dense Network (x (N, n_0)) or a LayeredNetwork (x (N, *input_shape), e.g. (N, 3, 32, 32) images in
    [0, 1]; its fixed points keep their layer shapes, file version 2).

    Resumable: finished batches go to ``partial_path(out)`` every ``checkpoint_every`` batches and on Ctrl-C
    (KeyboardInterrupt is re-raised); a later call with the same network, data and settings continues from it.
    dtype: run in float32/float64 (default: the network's). meta: extra entries for the stored settings (dataset,
    split, limit). threads: the threads each batch is split between (``relax_batch``; default one per core).
    Returns a summary dict (samples, converged, steps, residual, accuracy, time, paths).
    Raises ValueError for bad settings and RunError if the dynamics diverge (finished batches are kept).

    cluster: None (this process), or "local" / "auto" / a Ray address (``ebm_sim.cluster``): the samples are cut
    into shards of ``shard_size`` samples (a multiple of batch_size; default: about two shards per CPU of the
    cluster), one Ray task per shard relaxes its range into its own file in ``shard_folder(out)`` (with
    ``relax_to_file`` itself: atomic, resumable), shards already there are skipped, and the shards are merged into
    ``out``. The shards split every batch between as many threads as this process would (``threads``, default this
    machine's cores), so ``out`` equals the single-process file bit for bit: every dataset, and every attribute but
    ``created`` (the time of writing); ``content_hash`` included. The shard folder must be visible to every node.
    """
    from . import integrators
    from .relax import RelaxSettings

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = check_output(out, overwrite=True)  # a missing or read-only folder is refused before the work
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if not (isinstance(checkpoint_every, (int, np.integer)) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint interval must be a positive number of batches, got {checkpoint_every!r}")
    if threads is not None and not (isinstance(threads, (int, np.integer)) and threads >= 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    from .cluster import check_cluster
    cluster = check_cluster(cluster)
    if shard_size is not None and not (isinstance(shard_size, (int, np.integer)) and shard_size >= 1
                                       and shard_size % batch_size == 0):
        raise ValueError(f"shard size must be a positive multiple of the batch size {batch_size} (a shard relaxes "
                         f"whole batches, as the single-process run does), got {shard_size!r}")
    if shard_size is not None and cluster is None:
        raise ValueError("a shard size needs a cluster (--cluster): without one the samples are relaxed here in "
                         "batches")
    source_hash = network.content_hash()
    run_net = network if dtype is None else network.astype(dtype)
    relax_settings = RelaxSettings(method=method, tol=tol, max_steps=max_steps, dt=dt)  # validates early
    if is_layered(network):
        integrators.get(method, "layered", "numba", "ebm relax of a layered network")
    x = np.ascontiguousarray(x, dtype=run_net.dtype)
    labels = np.asarray(labels)
    if x.ndim < 2 or x.shape[1:] != sample_shape(run_net):
        shape = "x".join(map(str, sample_shape(run_net)))
        raise ValueError(f"the network takes inputs of shape {shape} but the data has shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the inputs hold NaN or inf")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} inputs but labels of shape {labels.shape}")
    if x.shape[0] == 0:
        raise ValueError("no samples to relax")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    per_sample = x.itemsize * (x[0].size + sum(state_units(run_net))) + labels.itemsize + 8 + 8 + 1
    require_space(out, 2 * per_sample * x.shape[0])  # the partial file and the final one coexist for a moment
    settings = {**relax_settings.as_dict(), "dtype": str(run_net.dtype), "batch_size": int(batch_size),
                "on_divergence": "flag", **(meta or {})}
    key = _run_key(source_hash, x, labels, settings)
    with exclusive(out):  # one writer of OUT (and of its partial file) at a time
        if cluster is not None:
            return _relax_sharded(network, run_net, x, labels, out, settings, key, cluster, shard_size, threads,
                                  resume, checkpoint_every, progress, log)
        return _relax_batches(network, run_net, x, labels, out, settings, key, resume, checkpoint_every, progress,
                              log, threads)


def _relax_batches(network, run_net, x, labels, out: Path, settings: dict, key: str, resume: bool,
                   checkpoint_every: int, progress: bool, log, threads: int | None = None) -> dict:
    """The work of ``relax_to_file`` once its inputs are checked: batches, partial saves, the final file."""
    from .relax import divergence_remedy

    method, tol, max_steps, dt = (settings[k] for k in ("method", "tol", "max_steps", "dt"))
    batch_size = settings["batch_size"]
    num, num_layers = x.shape[0], len(state_units(run_net))  # layers that relax (no readout)
    ppath = partial_path(out)

    parts = {f"s{k}": [] for k in range(1, num_layers + 1)}
    parts.update(residuals=[], steps=[], converged=[])
    done, previous = 0, 0.0
    if resume:
        loaded = _load_partial(ppath, key, num_layers, log)
        if loaded is not None:
            done, previous, parts = loaded
            log(f"resuming from {ppath}: {done}/{num} samples already relaxed")
    resumed_from = done
    start = time.perf_counter()

    def elapsed():
        return previous + time.perf_counter() - start

    from tqdm import tqdm
    bar = tqdm(total=num, initial=done, unit="sample", desc=f"relax {method}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    batches_since_save = 0
    try:
        while done < num:
            stop = min(done + batch_size, num)
            result = relax_batch(run_net, x[done:stop], method, tol, max_steps, dt, threads)
            if np.any(result.diverged):
                bad = done + np.nonzero(result.diverged)[0]
                if done > resumed_from:
                    _save_partial(ppath, key, done, elapsed(), parts)
                kept = (f"The {done} samples before them are kept in {ppath}" if done else
                        "Nothing was kept: the first batch diverged")
                raise RunError(f"the {method} dynamics diverged (NaN or inf) for {len(bad)} of the samples "
                               f"{done}..{stop - 1} (first: {bad[:5].tolist()}); {divergence_remedy(method)}. {kept}")
            for k, s in enumerate(result.states, start=1):
                parts[f"s{k}"].append(s)
            parts["residuals"].append(result.residual)
            parts["steps"].append(result.steps)
            parts["converged"].append(result.converged)
            done = stop
            bar.update(stop - bar.n)
            batches_since_save += 1
            if done < num and batches_since_save >= checkpoint_every:
                _save_partial(ppath, key, done, elapsed(), parts)
                batches_since_save = 0
    except KeyboardInterrupt:
        bar.close()
        if done > resumed_from:
            _save_partial(ppath, key, done, elapsed(), parts)
        log(f"interrupted: {done}/{num} samples are saved in {ppath}; run the same command again to resume")
        raise
    finally:
        bar.close()

    states = [np.concatenate(parts[f"s{k}"]) for k in range(1, num_layers + 1)]
    residuals, steps = np.concatenate(parts["residuals"]), np.concatenate(parts["steps"])
    converged = np.concatenate(parts["converged"])
    summary = _write_result(network, run_net, x, labels, out, settings, states, residuals, steps, converged,
                            elapsed(), resumed_from)
    ppath.unlink(missing_ok=True)
    return summary


def _write_result(network, run_net, x, labels, out: Path, settings: dict, states: list, residuals, steps,
                  converged, time_s: float, resumed_from: int) -> dict:
    """Write the ``ebm-fixed-points`` file of a finished relaxation (states list of (N, *shape_k), residuals,
    steps, converged (N,)) and return ``relax_to_file``'s summary."""
    from . import storage
    from .training import predictions

    source_hash = network.content_hash()
    storage.save_fixed_points(out, x, labels, states, residuals, steps, converged, settings, source_hash)
    num = x.shape[0]
    return {"path": str(out), "samples": num, "converged": int(np.count_nonzero(converged)),
            "converged_fraction": float(np.mean(converged)), "steps_mean": float(np.mean(steps)),
            "steps_max": int(np.max(steps)), "residual_max": float(np.max(residuals)),
            "accuracy": float(np.mean(predictions(run_net, states) == labels)), "time_s": time_s,
            "resumed_from": resumed_from, "network_hash": source_hash, "settings": settings,
            "trained": bool(network.history)}


# ---------------------------------------------------------------------------------------------- sharded (Ray)
SHARD_SUFFIX = ".shards"


def shard_folder(out) -> Path:
    """Where a sharded ``ebm relax -o OUT --cluster ...`` keeps its shard files until OUT is written:
    ``OUT.shards/`` (one ``ebm-fixed-points`` file per index range, removed once OUT is written)."""
    out = Path(out)
    return out.with_name(out.name + SHARD_SUFFIX)


def plan_shards(num: int, shard_size: int) -> list:
    """The index ranges [(start, stop)] of ``num`` samples cut into shards of ``shard_size`` (the last may be
    shorter)."""
    return [(start, min(start + shard_size, num)) for start in range(0, num, shard_size)]


def default_shard_size(num: int, batch_size: int, workers: int) -> int:
    """Whole batches per shard, about two shards per worker (a slow shard then delays the end less)."""
    batches = -(-num // batch_size)
    return max(1, -(-batches // (2 * max(1, workers)))) * batch_size


def _shard_settings(settings: dict, key: str, start: int, stop: int) -> dict:
    """The settings stored in a shard file: the run's, plus which run (a digest of its key) and which range."""
    run = hashlib.sha256(key.encode()).hexdigest()[:16]
    return {**settings, "shard": {"run": run, "start": int(start), "stop": int(stop)}}


def _shard_path(folder: Path, shard_settings: dict) -> Path:
    shard = shard_settings["shard"]
    return folder / f"{shard['run']}-{shard['start']:010d}-{shard['stop']:010d}.h5"


def relax_shard(network, x, labels, start: int, stop: int, path: str, shard_settings: dict, threads: int,
                resume: bool, checkpoint_every: int) -> int:
    """One Ray task of a sharded relaxation: relax x[start:stop] (x (N, *sample_shape), labels (N,): the whole
    arrays, shared read-only through the object store, so the range is copied) into the shard file ``path`` with
    ``relax_to_file`` (atomic write, its own partial file: a retried task resumes it). Returns the samples done."""
    from .relax import RelaxSettings

    fields = set(RelaxSettings.__dataclass_fields__) | {"dtype", "batch_size", "on_divergence"}
    meta = {k: v for k, v in shard_settings.items() if k not in fields}
    relax_to_file(network, np.array(x[start:stop]), np.array(labels[start:stop]), path,
                  method=shard_settings["method"], tol=shard_settings["tol"], max_steps=shard_settings["max_steps"],
                  dt=shard_settings["dt"], batch_size=shard_settings["batch_size"], dtype=shard_settings["dtype"],
                  meta=meta, checkpoint_every=checkpoint_every, resume=resume, progress=False, threads=threads,
                  log=lambda msg: None)
    return stop - start


def _read_shard(path: Path, network, shard_settings: dict, x, labels):
    """A shard file's FixedPointDataset if it was made by this run for this range (same network, settings, range,
    inputs and labels), else None."""
    from . import storage

    try:
        shard = storage.load_fixed_points(path, network)
    except (OSError, ValueError):
        return None
    if (shard.settings != json.loads(json.dumps(shard_settings, default=str)) or not np.array_equal(shard.inputs, x)
            or not np.array_equal(shard.labels, labels)):
        return None
    return shard


def _relax_sharded(network, run_net, x, labels, out: Path, settings: dict, key: str, cluster: str,
                   shard_size: int | None, threads: int | None, resume: bool, checkpoint_every: int,
                   progress: bool, log) -> dict:
    """The work of ``relax_to_file(..., cluster=...)`` once its inputs are checked: shards as Ray tasks (those
    already in ``shard_folder(out)`` skipped), then their merge into ``out``."""
    from tqdm import tqdm

    from . import cluster as ray_cluster
    from .numba_backend import worker_count

    start_time = time.perf_counter()
    ray = ray_cluster.connect(cluster, log=log)
    num, batch_size = x.shape[0], settings["batch_size"]
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shard_size = shard_size or default_shard_size(num, batch_size, workers)
    threads = threads or worker_count(sys.maxsize, None, min_rows=1)  # this machine's split of every batch
    folder = shard_folder(out)
    folder.mkdir(exist_ok=True)
    shards = [(a, b, _shard_settings(settings, key, a, b)) for a, b in plan_shards(num, shard_size)]
    todo = [(a, b, meta) for a, b, meta in shards
            if not (resume and _read_shard(_shard_path(folder, meta), network, meta, x[a:b], labels[a:b]))]
    resumed_from = num - sum(b - a for a, b, _ in todo)
    if resumed_from:
        log(f"resuming from {folder}: {resumed_from}/{num} samples already relaxed "
            f"({len(shards) - len(todo)} of {len(shards)} shards)")
    refs = [ray_cluster.put(value) for value in (network, x, labels)]
    arguments = [(*refs, a, b, str(_shard_path(folder, meta)), meta, threads, resume, checkpoint_every)
                 for a, b, meta in todo]
    bar = tqdm(total=num, initial=resumed_from, unit="sample", desc=f"relax {settings['method']} ({len(shards)} "
               f"shards)", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for _, samples in ray_cluster.run_tasks(relax_shard, arguments, threads=threads, num_cpus=1):
            bar.update(samples)
    except KeyboardInterrupt:
        log(f"interrupted: the finished shards are kept in {folder}; run the same command again to resume")
        raise
    finally:
        bar.close()

    pieces = []
    for a, b, meta in shards:
        shard = _read_shard(_shard_path(folder, meta), network, meta, x[a:b], labels[a:b])
        if shard is None:
            raise RunError(f"shard {_shard_path(folder, meta)} (samples {a}..{b - 1}) is missing or was changed "
                           f"after its task finished; run the same command again to redo it")
        pieces.append(shard)
    states = [np.concatenate([p.states[k] for p in pieces]) for k in range(len(pieces[0].states))]
    summary = _write_result(network, run_net, x, labels, out, settings, states,
                            *(np.concatenate([getattr(p, name) for p in pieces])
                              for name in ("residuals", "steps", "converged")),
                            time.perf_counter() - start_time, resumed_from)
    for _, _, meta in shards:
        _shard_path(folder, meta).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it (another run's shards): leave it
        pass
    summary.update(cluster=cluster, shards=len(shards), shard_size=shard_size, threads=threads)
    return summary


def relax_settings_of(network_path, method=None, tol=None, max_steps=None, dt=None) -> tuple[dict, str]:
    """``ebm relax``'s (method, tol, max_steps, dt) and where they come from: the given ones over the deployment
    stored with the network (``ebm train`` stores it: the free phase it was trained with), or over UNTRAINED_RELAX for
    a file that stores none. A method other than the stored one drops the stored dt (its own default applies)."""
    from . import storage
    from .deployment import Deployment

    extra = storage.artifact_info(network_path)["summary"].get("extra", {})
    stored = extra.get("deployment") or extra.get("config")
    base = Deployment.of_extra(extra).relax_options() if stored else dict(UNTRAINED_RELAX)
    given = {k: v for k, v in dict(method=method, tol=tol, max_steps=max_steps, dt=dt).items() if v is not None}
    if given.get("method", base["method"]) != base["method"]:
        base["dt"] = None
    source = "the network's deployment" if stored else "the defaults for an untrained network"
    if given:
        source = f"{', '.join(given)} as given, the rest from {source}" if len(given) < 4 else "as given"
    return {**base, **given}, source


def run_relax(network_path, dataset: str, out, *, data_dir=None, split: str = "test", limit: int | None = None,
              method=None, tol=None, max_steps=None, dt=None, **kwargs) -> dict:
    """``ebm relax``: load the network file (dense or layered) and the dataset split, check that they fit, and call
    :func:`relax_to_file` (further keyword arguments are passed on). method, tol, max_steps, dt: None takes the
    network's stored deployment (:func:`relax_settings_of`). Returns its summary dict."""
    from . import datasets, storage

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of samples, got {limit}")
    network_path, out = Path(network_path), Path(out)
    if out.exists() and network_path.exists() and out.resolve() == network_path.resolve():
        raise ValueError(f"the output {out} is the network file itself; choose another -o")
    network = storage.load_network(network_path)
    settings, source = relax_settings_of(network_path, method, tol, max_steps, dt)
    ds = datasets.load_dataset(dataset, data_dir, limit_train=limit if split == "train" else None,
                               limit_test=limit if split == "test" else None)
    x, y = _inputs_for(network, network_path, ds, split)
    meta = {"dataset": ds.name, "split": split, "limit": limit, "network_file": network_path.name}
    summary = relax_to_file(network, x, y, out, meta=meta, **settings, **kwargs)
    summary.update(dataset=ds.name, split=split, limit=limit, num_classes=ds.num_classes, settings_from=source)
    return summary


def _inputs_for(network, network_path, ds, split: str) -> tuple:
    """The split's (inputs, labels) in the network's input shape: flat (N, D) for a dense network, (N, C, H, W)
    images (or flat, if its input layer is flat) for a layered one; ValueError if they do not fit."""
    x, y = (ds.x_test, ds.y_test) if split == "test" else (ds.x_train, ds.y_train)
    if not is_layered(network):
        if ds.num_features != network.layer_sizes[0]:
            shape = "x".join(str(s) for s in ds.image_shape)
            raise ValueError(f"{network_path} takes {network.layer_sizes[0]} inputs "
                             f"(layers {'-'.join(map(str, network.layer_sizes))}) but {ds.name} has "
                             f"{ds.num_features} features per sample ({shape} images); create a network whose first "
                             f"layer has {ds.num_features} units (e.g. ebm init --layers {ds.num_features},...)")
        return x, y
    wanted = tuple(network.input_shape)
    if wanted not in (tuple(ds.channels_first_shape), (ds.num_features,)):
        raise ValueError(f"{network_path} takes {'x'.join(map(str, wanted))} inputs but {ds.name} has "
                         f"{'x'.join(map(str, ds.channels_first_shape))} images")
    return x.reshape((x.shape[0],) + wanted), y


def format_relax_summary(s: dict) -> str:
    """Human-readable text of a :func:`run_relax` / :func:`relax_to_file` summary."""
    st = s["settings"]
    head = f"relaxed {s['samples']} samples"
    if "dataset" in s:
        head += f" of {s['dataset']} ({s['split']} split" + (f", stratified subsample of {s['limit']})"
                                                           if s.get("limit") else ")")
    head += (f" with {st['method']} (tol {st['tol']:g}, max steps {st['max_steps']}, dt {st['dt']:g}, "
             f"{st['dtype']}, batch {st['batch_size']}"
             + (f"; settings: {s['settings_from']})" if s.get("settings_from") else ")"))
    note = "meaningful only for a trained network"
    if not s["trained"]:
        note += "; this network has no training history, so expect chance level"
    timing = f"{s['time_s']:.2f} s"
    if s["resumed_from"]:
        timing += f" in total (resumed after {s['resumed_from']} samples)"
    if s.get("shards"):
        timing += f" on Ray ({s['cluster']}: {s['shards']} shards of {s['shard_size']} samples)"
    return "\n".join([
        head,
        f"  converged:    {s['converged']}/{s['samples']} ({100 * s['converged_fraction']:.1f}%)",
        f"  steps:        mean {s['steps_mean']:.1f}, max {s['steps_max']}",
        f"  max residual: {s['residual_max']:.3g}",
        f"  accuracy:     {100 * s['accuracy']:.1f}% (argmax of the output layer vs labels; {note})",
        f"  time:         {timing}",
        f"  wrote:        {s['path']}",
    ])
