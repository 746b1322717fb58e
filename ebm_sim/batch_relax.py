"""Relax a whole dataset to its fixed points and store them: resumable batch work behind ``ebm relax``.

Finished batches are saved atomically to ``<OUT>.partial.npz`` (every ``checkpoint_every`` batches and on Ctrl-C);
a later call with the same network, data and settings continues from there. The partial file is deleted once the
final ``ebm-fixed-points`` artifact is written, and nothing is ever written under the final name before the end.
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


def relax_batch(network, x, method: str, tol: float, max_steps: int, dt) -> BatchRelaxation:
    """Relax one batch of a dense Network (``ebm_sim.relax``, Numba kernels) or a LayeredNetwork
    (``ebm_sim.model.dynamics.relax`` with the Numba interaction backend) and flag divergence."""
    if not is_layered(network):
        from .relax import relax
        r = relax(network, x, method=method, tol=tol, max_steps=max_steps, dt=dt, on_divergence="flag")
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
                  progress: bool = True, log=None) -> dict:
    """Relax every sample of x in batches and write an ``ebm-fixed-points`` file to ``out``.

    network: a dense Network (x (N, n_0)) or a LayeredNetwork (x (N, *input_shape), e.g. (N, 3, 32, 32) images in
    [0, 1]; its fixed points keep their layer shapes, file version 2).

    Resumable: finished batches go to ``partial_path(out)`` every ``checkpoint_every`` batches and on Ctrl-C
    (KeyboardInterrupt is re-raised); a later call with the same network, data and settings continues from it.
    dtype: run in float32/float64 (default: the network's). meta: extra entries for the stored settings (dataset,
    split, limit). Returns a summary dict (samples, converged, steps, residual, accuracy, time, paths).
    Raises ValueError for bad settings and RunError if the dynamics diverge (finished batches are kept).
    """
    from . import integrators
    from .relax import RelaxSettings

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = check_output(out, overwrite=True)  # a missing or read-only folder is refused before the work
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if not (isinstance(checkpoint_every, (int, np.integer)) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint interval must be a positive number of batches, got {checkpoint_every!r}")
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
        return _relax_batches(network, run_net, x, labels, out, settings, key, resume, checkpoint_every, progress,
                              log)


def _relax_batches(network, run_net, x, labels, out: Path, settings: dict, key: str, resume: bool,
                   checkpoint_every: int, progress: bool, log) -> dict:
    """The work of ``relax_to_file`` once its inputs are checked: batches, partial saves, the final file."""
    from . import storage
    from .relax import divergence_remedy
    from .training import predictions

    method, tol, max_steps, dt = (settings[k] for k in ("method", "tol", "max_steps", "dt"))
    batch_size, source_hash = settings["batch_size"], network.content_hash()
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
            result = relax_batch(run_net, x[done:stop], method, tol, max_steps, dt)
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
    storage.save_fixed_points(out, x, labels, states, residuals, steps, converged, settings, source_hash)
    ppath.unlink(missing_ok=True)
    return {"path": str(out), "samples": num, "converged": int(np.count_nonzero(converged)),
            "converged_fraction": float(np.mean(converged)), "steps_mean": float(np.mean(steps)),
            "steps_max": int(np.max(steps)), "residual_max": float(np.max(residuals)),
            "accuracy": float(np.mean(predictions(run_net, states) == labels)), "time_s": elapsed(),
            "resumed_from": resumed_from, "network_hash": source_hash, "settings": settings,
            "trained": bool(network.history)}


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
    return "\n".join([
        head,
        f"  converged:    {s['converged']}/{s['samples']} ({100 * s['converged_fraction']:.1f}%)",
        f"  steps:        mean {s['steps_mean']:.1f}, max {s['steps_max']}",
        f"  max residual: {s['residual_max']:.3g}",
        f"  accuracy:     {100 * s['accuracy']:.1f}% (argmax of the output layer vs labels; {note})",
        f"  time:         {timing}",
        f"  wrote:        {s['path']}",
    ])
