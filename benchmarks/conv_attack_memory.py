"""Benchmark: peak memory and time of one attack gradient (forward + backward) through a convolutional EBM.

    python benchmarks/conv_attack_memory.py [--batches 32,128] [--steps 30,250] [--chunks 0,10] [--max-gib 6]
        [--preset cifar10-cpu] [--out benchmarks/results/conv_attack_memory.json]

The cifar10-cpu preset network (or --preset's: ebm_sim/model/presets.py; untrained, seeded, float32, its
normalization and activation) as ``ebm_sim.model.classifier.LayeredEBMClassifier`` with the preset's integrator
and tol = 0 (exactly ``steps`` steps: the most memory BPTT can need), on random images in [0, 1]; one input gradient
of the summed cross-entropy, by full BPTT without checkpointing (chunk 0) or with ``checkpoint_steps=chunk``. Each
configuration runs in its own process (one torch thread) and reports its peak resident memory
(``resource.getrusage``'s ru_maxrss: torch's CPU allocations are not seen by tracemalloc), the peak above the
process's resident memory just before the forward pass (what the attack adds), and the seconds. BPTT's memory grows
linearly in batch x steps, so a configuration whose estimate from the last one measured exceeds --max-gib is not run
and is reported as "estimated" (its gradient memory scaled by batch x steps). The JSON is printed as the last line.

glibc keeps freed blocks, so resident memory overstates the live bytes (by ~0.3 GiB at batch 32, ~25 % of plain
BPTT's peak): run with MALLOC_MMAP_THRESHOLD_=16384 (recorded in the JSON) to make large blocks return to the system
when freed, so that the peak follows the live memory (what a GPU's allocator would need; slower).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2.0 ** 30


def measure(batch: int, steps: int, chunk: int, preset_name: str = "cifar10-cpu") -> dict:
    """One forward + backward in this process: {"peak_gib", "added_gib", "seconds", ...}."""
    import resource
    import time

    import numpy as np
    import torch

    from ebm_sim.deployment import Deployment
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.model.classifier import LayeredEBMClassifier
    from ebm_sim.model.presets import get

    torch.set_num_threads(1)
    preset = get(preset_name)
    net = LayeredNetwork.init(preset.arch, seed=0, activation=preset.activation, normalization=preset.normalization)
    deployment = Deployment(method=preset.train["method"], tol=0.0, max_steps=steps)
    model = LayeredEBMClassifier(net, deployment=deployment, checkpoint_steps=chunk or None)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=generator).requires_grad_(True)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    return {"preset": preset_name, "batch": batch, "steps": steps, "chunk": chunk, "peak_gib": peak / GIB,
            "added_gib": (peak - before) / GIB, "seconds": seconds,
            "grad_finite": bool(np.isfinite(grad.numpy()).all()), "measured": True}


def run_one(batch: int, steps: int, chunk: int, preset: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--preset", preset, "--one", f"{batch},{steps},{chunk}"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"batch {batch}, steps {steps}, chunk {chunk} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--steps", default="30,250")
    parser.add_argument("--chunks", default="0,10")
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--preset", default="cifar10-cpu", help="a preset of ebm_sim/model/presets.py")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = measure(*(int(v) for v in args.one.split(",")), args.preset)
        print(json.dumps(result))
        return result
    batches, step_counts, chunks = ([int(v) for v in s.split(",")] for s in (args.batches, args.steps, args.chunks))
    rows, per_unit = [], {}
    for chunk in chunks:
        for steps in sorted(step_counts):
            for batch in sorted(batches):
                # plain BPTT: memory ~ batch x steps; checkpointed: ~ batch x (steps / chunk + chunk)
                units = batch * (steps if chunk == 0 else steps / chunk + chunk)
                if chunk in per_unit and per_unit[chunk] * units > args.max_gib:
                    rows.append({"batch": batch, "steps": steps, "chunk": chunk, "measured": False,
                                 "added_gib": per_unit[chunk] * units})
                    continue
                row = run_one(batch, steps, chunk, args.preset)
                per_unit[chunk] = row["added_gib"] / units  # the largest configuration measured so far
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    result = {"network": args.preset, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              "torch_threads": 1, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
