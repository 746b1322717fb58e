"""The ``ebm`` command line: a thin front end (parse, call the library, print).

    ebm init  --layers 64,128,10 [--seed 0] [--gain 1.0] [--activation hard_sigmoid] [--dtype float32] -o NET.h5
    ebm relax NET.h5 --dataset digits [--split test] [--limit N] [--method fixed_point] [--tol 1e-4]
              [--max-steps 1000] [--dt DT] [--batch-size 256] [--dtype float32|float64] -o FIXED_POINTS.h5
    ebm info  FILE [FILE ...]
    ebm demo  [--out-dir runs/demo]

User mistakes (a missing or corrupt file, an unknown dataset, a network whose input size does not match the data,
bad settings) print ``ebm: error: <message>`` to stderr and exit with status 2, never a traceback. A relaxation
that diverges exits with status 1; an interrupted one (Ctrl-C) saves its progress and exits with status 130.

``ebm relax`` is resumable: finished batches are saved atomically to ``<OUT>.partial.npz`` (every
``--checkpoint-every`` batches and on Ctrl-C); re-running the same command continues from there. The partial file is
deleted once the final artifact is written, and nothing is ever written under the final name before the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import secrets
import sys
import time
import warnings
from pathlib import Path

import numpy as np

PROG = "ebm"
RELAX_METHODS = ("fixed_point", "euler", "alternating", "rk45")
PARTIAL_SUFFIX = ".partial.npz"
PARTIAL_FORMAT = "ebm-relax-partial/1"


class RunError(RuntimeError):
    """A run that cannot finish (e.g. diverging dynamics): exit status 1."""


# ---------------------------------------------------------------------------------------------- relax
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
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_partial(path: Path, key: str, num_layers: int, log) -> tuple[int, float, dict] | None:
    """(done, elapsed, parts) from a partial file made by the same run, else None (with a note why)."""
    if not path.exists():
        return None
    try:
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


def relax_to_file(network, x, labels, out, *, method: str = "fixed_point", tol: float = 1e-4,
                  max_steps: int = 1000, dt: float | None = None, batch_size: int = 256, dtype=None,
                  meta: dict | None = None, checkpoint_every: int = 10, resume: bool = True,
                  progress: bool = True, log=None) -> dict:
    """Relax every row of x (N, n_0) in batches and write an ``ebm-fixed-points`` file to ``out``.

    Resumable: finished batches go to ``partial_path(out)`` every ``checkpoint_every`` batches and on Ctrl-C
    (KeyboardInterrupt is re-raised); a later call with the same network, data and settings continues from it.
    dtype: run in float32/float64 (default: the network's). meta: extra entries for the stored settings (dataset,
    split, limit). Returns a summary dict (samples, converged, steps, residual, accuracy, time, paths).
    Raises ValueError for bad settings and RunError if the dynamics diverge (finished batches are kept).
    """
    from . import storage
    from .relax import RelaxSettings, relax

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: directory {out.parent} does not exist")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if not (isinstance(checkpoint_every, (int, np.integer)) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint interval must be a positive number of batches, got {checkpoint_every!r}")
    source_hash = network.content_hash()
    run_net = network if dtype is None else network.astype(dtype)
    relax_settings = RelaxSettings(method=method, tol=tol, max_steps=max_steps, dt=dt)  # validates early
    x = np.ascontiguousarray(x, dtype=run_net.dtype)
    labels = np.asarray(labels)
    if x.ndim != 2 or x.shape[1] != run_net.layer_sizes[0]:
        raise ValueError(f"the network takes {run_net.layer_sizes[0]} inputs but the data has shape {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} inputs but labels of shape {labels.shape}")
    if x.shape[0] == 0:
        raise ValueError("no samples to relax")
    settings = {**relax_settings.as_dict(), "dtype": str(run_net.dtype), "batch_size": int(batch_size),
                "on_divergence": "flag", **(meta or {})}
    num, num_layers = x.shape[0], run_net.num_layers
    key = _run_key(source_hash, x, labels, settings)
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
            result = relax(run_net, x[done:stop], method=method, tol=tol, max_steps=max_steps, dt=dt,
                           on_divergence="flag")
            if np.any(result.diverged):
                bad = done + np.nonzero(result.diverged)[0]
                if done > resumed_from:
                    _save_partial(ppath, key, done, elapsed(), parts)
                raise RunError(f"the {method} dynamics diverged (NaN or inf) for {len(bad)} of the samples "
                               f"{done}..{stop - 1} (first: {bad[:5].tolist()}); lower --dt or check the weights' "
                               f"scale. The {done} samples before them are kept in {ppath}")
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
    predictions = np.argmax(states[-1], axis=1)
    return {"path": str(out), "samples": num, "converged": int(np.count_nonzero(converged)),
            "converged_fraction": float(np.mean(converged)), "steps_mean": float(np.mean(steps)),
            "steps_max": int(np.max(steps)), "residual_max": float(np.max(residuals)),
            "accuracy": float(np.mean(predictions == labels)), "time_s": elapsed(),
            "resumed_from": resumed_from, "network_hash": source_hash, "settings": settings,
            "trained": bool(network.history)}


def run_relax(network_path, dataset: str, out, *, data_dir=None, split: str = "test", limit: int | None = None,
              **kwargs) -> dict:
    """``ebm relax``: load the network file and the dataset split, check their sizes, and call
    :func:`relax_to_file` (keyword arguments are passed on). Returns its summary dict."""
    from . import datasets, storage

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of samples, got {limit}")
    network_path, out = Path(network_path), Path(out)
    if out.exists() and network_path.exists() and out.resolve() == network_path.resolve():
        raise ValueError(f"the output {out} is the network file itself; choose another -o")
    network = storage.load_network(network_path)
    ds = datasets.load_dataset(dataset, data_dir, limit_train=limit if split == "train" else None,
                               limit_test=limit if split == "test" else None)
    if ds.num_features != network.layer_sizes[0]:
        shape = "x".join(str(s) for s in ds.image_shape)
        raise ValueError(f"{network_path} takes {network.layer_sizes[0]} inputs "
                         f"(layers {'-'.join(map(str, network.layer_sizes))}) but {ds.name} has "
                         f"{ds.num_features} features per sample ({shape} images); create a network whose first "
                         f"layer has {ds.num_features} units (e.g. ebm init --layers {ds.num_features},...)")
    x, y = (ds.x_test, ds.y_test) if split == "test" else (ds.x_train, ds.y_train)
    meta = {"dataset": ds.name, "split": split, "limit": limit, "network_file": network_path.name}
    summary = relax_to_file(network, x, y, out, meta=meta, **kwargs)
    summary.update(dataset=ds.name, split=split, limit=limit, num_classes=ds.num_classes)
    return summary


def format_relax_summary(s: dict) -> str:
    """Human-readable text of a :func:`run_relax` / :func:`relax_to_file` summary."""
    st = s["settings"]
    head = f"relaxed {s['samples']} samples"
    if "dataset" in s:
        head += f" of {s['dataset']} ({s['split']} split" + (f", stratified subsample of {s['limit']})"
                                                           if s.get("limit") else ")")
    head += (f" with {st['method']} (tol {st['tol']:g}, max steps {st['max_steps']}, dt {st['dt']:g}, "
             f"{st['dtype']}, batch {st['batch_size']})")
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


# ---------------------------------------------------------------------------------------------- commands
def _layers(text: str) -> tuple:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128,10, got {text!r}") from None
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"need at least two positive layer sizes (input,...,output), got {text!r}")
    return sizes


def cmd_init(args) -> int:
    from . import storage
    from .network import Network

    out = Path(args.output)
    network = Network.init(args.layers, seed=args.seed, dtype=args.dtype, activation=args.activation,
                           gain=args.gain)
    storage.save_network(out, network, extra_attrs={"init": {"seed": args.seed, "gain": args.gain}})
    print(f"wrote {out}: layers {'-'.join(map(str, network.layer_sizes))}, {network.activation}, {network.dtype}, "
          f"seed {args.seed}, gain {args.gain:g}, network hash {network.content_hash()[:12]} (untrained)")
    return 0


def cmd_relax(args) -> int:
    summary = run_relax(args.network, args.dataset, args.output, data_dir=args.data_dir, split=args.split,
                        limit=args.limit, method=args.method, tol=args.tol, max_steps=args.max_steps, dt=args.dt,
                        batch_size=args.batch_size, dtype=args.dtype, checkpoint_every=args.checkpoint_every,
                        resume=not args.no_resume, progress=not args.no_progress)
    print(format_relax_summary(summary))
    return 0


def cmd_info(args) -> int:
    from . import storage

    status = 0
    for i, path in enumerate(args.files):
        info = storage.artifact_info(path)
        print(("\n" if i else "") + storage.format_info(info))
        if info["hash_status"] != "ok":
            status = 1
    return status


def cmd_demo(args) -> int:
    from . import demo

    results = demo.run_demo(args.out_dir, log=lambda msg: print(msg, flush=True))
    print(demo.format_report(results))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .datasets import DATASET_NAMES
    from .network import ACTIVATIONS

    parser = argparse.ArgumentParser(
        prog=PROG, description="ebm-toolkit: simulate energy-based models (Hopfield energy, equilibrium "
                               "propagation) and manage their HDF5 artifacts.",
        epilog="Errors from user input print 'ebm: error: ...' and exit with status 2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create a seeded, untrained network file",
                       description="Create a seeded network: W_k, b_k ~ U(-gain/sqrt(n_k), gain/sqrt(n_k)).")
    p.add_argument("--layers", type=_layers, required=True, metavar="N0,N1,...,NL",
                   help="layer sizes, input first, e.g. 64,128,10 (digits) or 784,512,10 (MNIST)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gain", type=float, default=1.0,
                   help="scale of the initial weights (default 1.0; smaller, e.g. 0.5, makes the dynamics "
                        "contract faster and the fixed point unique)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="hard_sigmoid",
                   help="rho(u) = clip(u, 0, 1) (hard_sigmoid, default) or clip(u/2, 0, 1) (hard_sigmoid_half)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default float32")
    p.add_argument("-o", "--output", required=True, metavar="NET.h5", help="network file to write")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("relax", help="relax a dataset to the network's fixed points and save them",
                       description="Relax every sample of a dataset split to equilibrium (free phase, beta = 0) in "
                                   "batches and write an ebm-fixed-points HDF5 file. Resumable: finished batches "
                                   "are kept in OUT.partial.npz; re-run the same command after an interruption.")
    p.add_argument("network", metavar="NETWORK.h5", help="network file (ebm init, or a trained network)")
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the dataset files (default: the dataset's standard place or $EBM_DATA_DIR; "
                        "digits is embedded)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="default test")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="relax a seeded, class-stratified subsample of N samples")
    p.add_argument("--method", choices=RELAX_METHODS, default="fixed_point", help="integrator (default fixed_point)")
    p.add_argument("--tol", type=float, default=1e-4, help="residual tolerance (default 1e-4)")
    p.add_argument("--max-steps", type=int, default=1000, help="step cap per sample (default 1000)")
    p.add_argument("--dt", type=float, default=None,
                   help="time step (euler: default 0.5; rk45: initial step, default 0.1; fixed_point and "
                        "alternating use 1)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute in this precision (default: the network's)")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="save finished batches to OUT.partial.npz every N batches (default 10; also on Ctrl-C)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.partial.npz and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="FIXED_POINTS.h5", help="fixed-point file to write")
    p.set_defaults(func=cmd_relax)

    p = sub.add_parser("info", help="describe an artifact (network, fixed points, trajectory)",
                       description="Print the header, hash check and contents of ebm-toolkit HDF5 files. "
                                   "Exit status 1 if a file's content hash does not match.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the simulator end to end on the embedded digits (under a minute)",
                       description="Initialize a seeded 64-256-10 network, relax the digits test set with every "
                                   "integrator, compare them, check the energy decreases, write three artifacts.")
    p.add_argument("--out-dir", default="runs/demo", metavar="DIR", help="where to write (default runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, OSError, pickle.UnpicklingError)


def main(argv=None) -> int:
    """Entry point of the ``ebm`` console script; returns the exit status (0 ok, 1 failed run, 2 user error,
    130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        with warnings.catch_warnings():
            # blas.py asks Numba to cache functions that hold ctypes pointers, which Numba cannot do: noise only.
            warnings.filterwarnings("ignore", message="Cannot cache compiled function")
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:  # ArtifactError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
