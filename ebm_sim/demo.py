"""``ebm demo`` (what ``make demo`` runs): the simulator end to end on the embedded 8x8 digits, in seconds.

1. Initialize a seeded 64-256-10 network with a small gain, so that the energy is strictly convex on the state box
   and the fixed point is unique (checked: the smallest eigenvalue of the Hessian I/a - C is positive).
2. Relax the digits test set (360 samples) with every integrator: fixed_point, euler, alternating, rk45, and
   scipy's solve_ivp on a few samples; compare steps, convergence, wall time and the distance of each method's
   fixed points to those of fixed_point (they agree to about the tolerance because the fixed point is unique).
3. Record an Euler trajectory and check that the energy decreases along it.
4. Write the network, the fixed points (through the code path of ``ebm relax``) and the trajectory to the output
   folder, and describe each file as ``ebm info`` does.

The network is untrained (the demo shows the simulator alone; ``ebm train`` trains one with EP and ``ebm pipeline``
runs the whole study): the accuracy it reports is chance level.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import integrators

DEMO_METHODS = integrators.DEPLOYABLE  # every integrator; solve_ivp, the slow reference, beside them


def coupling_hessian_min_eig(network) -> float:
    """Smallest eigenvalue of the Hessian of E on the interior of the box, H = I/a - C.

    C is the symmetric block matrix of the couplings between layers 1..L (block (k+1, k) = W_k); the input is
    clamped, so W_0 does not enter. H > 0 means E is strictly convex there: the fixed point is unique.
    """
    sizes = network.layer_sizes[1:]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    coupling = np.zeros((offsets[-1], offsets[-1]))
    for k in range(1, network.num_layers):  # W_k couples layer k (0-based block k-1) and layer k+1 (block k)
        w = network.weights[k].astype(np.float64)
        coupling[offsets[k]:offsets[k + 1], offsets[k - 1]:offsets[k]] = w
        coupling[offsets[k - 1]:offsets[k], offsets[k]:offsets[k + 1]] = w.T
    hessian = np.eye(offsets[-1]) / network.slope - coupling
    return float(np.linalg.eigvalsh(hessian)[0])


def _max_diff(states, reference) -> float:
    return float(max(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) for a, b in zip(states, reference)))


def run_demo(out_dir="runs/demo-simulator", *, layers=(64, 256, 10), seed: int = 0, gain: float = 0.5, tol: float = 1e-5,
             max_steps: int = 1000, ivp_samples: int = 5, trajectory_samples: int = 8, log=None) -> dict:
    """Run the demo (see the module docstring) and return its results as a dict; ``log`` gets progress lines."""
    from . import storage
    from .batch_relax import run_relax
    from .datasets import load_dataset
    from .network import Network
    from .relax import relax

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"network": out_dir / "network.h5", "fixed_points": out_dir / "fixed_points.h5",
             "trajectory": out_dir / "trajectory.h5"}

    ds = load_dataset("digits")
    x = ds.x_test
    network = Network.init(layers, seed=seed, gain=gain)
    min_eig = coupling_hessian_min_eig(network)
    log(f"digits: {ds.x_train.shape[0]} train / {x.shape[0]} test images of 8x8 pixels; "
        f"network {'-'.join(map(str, network.layer_sizes))} (seed {seed}, gain {gain:g})")

    log("compiling the Numba kernels (once per process)...")
    t = time.perf_counter()
    for method in DEMO_METHODS:
        relax(network, x[:2], method=method, tol=tol, max_steps=3)
    compile_s = time.perf_counter() - t

    log(f"relaxing the {x.shape[0]} test images with {', '.join(DEMO_METHODS)} and solve_ivp "
        f"({ivp_samples} samples)...")
    rows, results = [], {}
    for method in DEMO_METHODS + ("solve_ivp",):
        batch = x[:ivp_samples] if method == "solve_ivp" else x
        t = time.perf_counter()
        r = relax(network, batch, method=method, tol=tol, max_steps=max_steps, on_divergence="flag")
        elapsed = time.perf_counter() - t
        results[method] = r
        reference = [s[:batch.shape[0]] for s in results["fixed_point"].states]
        rows.append({"method": method, "samples": int(batch.shape[0]), "steps_mean": float(r.steps.mean()),
                     "steps_max": int(r.steps.max()), "converged_fraction": float(r.converged.mean()),
                     "diverged": int(np.count_nonzero(r.diverged)), "time_s": elapsed,
                     "max_diff": _max_diff(r.states, reference)})

    log("recording an Euler trajectory...")
    traj = relax(network, x[:trajectory_samples], method="euler", tol=tol, max_steps=max_steps, record=True)
    energy = traj.energy  # (T+1, B), float64
    increases = np.diff(energy, axis=0)
    max_increase = float(increases.max()) if increases.size else 0.0
    energy_check = {"samples": int(energy.shape[1]), "frames": int(energy.shape[0]),
                    "first": energy[0].tolist(), "last": energy[-1].tolist(),
                    "max_increase": max_increase,
                    # float32 states: allow rounding-level increases once a sample has settled
                    "decreased": bool(np.all(energy[-1] < energy[0]) and max_increase <= 1e-5)}

    log(f"writing the artifacts to {out_dir}...")
    storage.save_network(paths["network"], network, extra_attrs={"init": {"seed": seed, "gain": gain},
                                                                 "made_by": "ebm demo"})
    relax_summary = run_relax(paths["network"], "digits", paths["fixed_points"], split="test",
                              method="fixed_point", tol=tol, max_steps=max_steps, progress=False, log=log)
    stored = storage.load_fixed_points(paths["fixed_points"], network=network)
    file_vs_memory = _max_diff(stored.states, results["fixed_point"].states)
    storage.save_trajectory(paths["trajectory"], traj.trajectory, energy,
                            {**traj.settings.as_dict(), "dataset": "digits", "split": "test",
                             "samples": f"first {trajectory_samples} test images"}, network.content_hash())
    infos = {name: storage.format_info(storage.artifact_info(path)) for name, path in paths.items()}

    return {"out_dir": str(out_dir), "dataset": {"name": ds.name, "train": int(ds.x_train.shape[0]),
                                                 "test": int(x.shape[0]), "image_shape": ds.image_shape},
            "network": {"layer_sizes": network.layer_sizes, "seed": seed, "gain": gain,
                        "activation": network.activation, "dtype": str(network.dtype),
                        "hash": network.content_hash(), "hessian_min_eig": min_eig,
                        "weight_norms": [float(np.linalg.norm(w, 2)) for w in network.weights]},
            "tol": tol, "max_steps": max_steps, "compile_s": compile_s, "methods": rows, "energy": energy_check,
            "relax": relax_summary, "file_vs_memory_max_diff": file_vs_memory,
            "paths": {k: str(v) for k, v in paths.items()}, "info": infos,
            "total_s": time.perf_counter() - t_start}


def format_report(res: dict) -> str:
    """The text ``ebm demo`` prints for a :func:`run_demo` result."""
    net, ds = res["network"], res["dataset"]
    lines = [
        "",
        f"ebm demo: the simulator on scikit-learn's embedded digits ({ds['train']} train / {ds['test']} test "
        f"images, 8x8 pixels in [0, 1])",
        f"network {'-'.join(map(str, net['layer_sizes']))}, {net['activation']}, {net['dtype']}, seed {net['seed']}, "
        f"gain {net['gain']:g} (||W_k||_2 = {', '.join(f'{n:.2f}' for n in net['weight_norms'])}); "
        f"hash {net['hash'][:12]}",
        f"the energy is strictly convex on the state box (smallest Hessian eigenvalue {net['hessian_min_eig']:.3f} "
        f"> 0), so the fixed point is unique and every integrator should find the same one",
        "",
        f"Relaxation of the test set (tol {res['tol']:g}, max {res['max_steps']} steps; Numba compilation "
        f"{res['compile_s']:.1f} s, not included below):",
        f"  {'method':<12} {'samples':>7} {'steps mean':>10} {'steps max':>9} {'converged':>9} {'wall time':>10}"
        f"  max |s - s_fixed_point|",
    ]
    for r in res["methods"]:
        diff = "(reference)" if r["method"] == "fixed_point" else f"{r['max_diff']:.2e}"
        conv = f"{100 * r['converged_fraction']:.1f}%"
        lines.append(f"  {r['method']:<12} {r['samples']:>7} {r['steps_mean']:>10.1f} {r['steps_max']:>9} "
                     f"{conv:>9} {r['time_s'] * 1e3:>7.1f} ms  {diff}"
                     + (f"  ({r['diverged']} diverged)" if r["diverged"] else ""))
    lines.append("  (steps: iterations for fixed_point/alternating/euler, attempted steps for rk45, solver steps for "
                 "solve_ivp, which runs one sample at a time)")
    e = res["energy"]
    verdict = "decreased monotonically" if e["decreased"] else "did NOT decrease monotonically"
    lines += [
        "",
        f"Energy along an Euler trajectory ({e['samples']} samples, {e['frames'] - 1} steps): {verdict} "
        f"(largest step-to-step increase {e['max_increase']:.2e})",
        f"  first: {', '.join(f'{v:.3f}' for v in e['first'])}",
        f"  last:  {', '.join(f'{v:.3f}' for v in e['last'])}",
        "",
    ]
    rs = res["relax"]
    lines += [
        f"Fixed points written through `ebm relax`'s code path: {rs['converged']}/{rs['samples']} converged, "
        f"max residual {rs['residual_max']:.2e}, {rs['time_s'] * 1e3:.0f} ms; they agree with the single-batch "
        f"run above to {res['file_vs_memory_max_diff']:.1e} (batches of 256 change only the BLAS rounding)",
        f"Accuracy (argmax of the output layer): {100 * rs['accuracy']:.1f}%. The network is UNTRAINED (this demo "
        f"shows the simulator alone; `ebm train` trains one with EP, `ebm pipeline` runs the whole study), so this "
        f"is chance level (about 10% for 10 classes).",
        "",
        "Artifacts (as `ebm info` prints them):",
    ]
    for name in ("network", "fixed_points", "trajectory"):
        lines += [res["info"][name], ""]
    lines.append(f"demo finished in {res['total_s']:.1f} s; files in {res['out_dir']}")
    return "\n".join(lines)
