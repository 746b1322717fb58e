"""Run a robustness evaluation: attacks, gradient checks and corruptions on several models, resumable.

    results = evaluate(models, x_test, y_test, image_shape, RobustnessConfig(...), out_dir)

models: ``ModelUnderTest`` objects (``load_model_under_test``); x_test (N, D) float32 in [0, 1] and y_test (N,)
int64: the test set; image_shape: one sample's shape as the attacks see it ((1, 28, 28), (3, 32, 32), ...).

The examples: one seeded permutation of the test set; the first ``samples`` are attacked (FGSM, PGD, the
minimum-norm attack), the first ``autoattack_samples`` of them (all by default) by AutoAttack (APGD-CE, APGD-T and
FAB-T through each gradient source, its Square once per model on the deployed model: a score-based attack reads the
same logits whatever the gradient source; the same parts as the standalone Square where the examples coincide), the first
``square_samples`` by Square, the first ``audit_samples`` by the audit's stronger PGD and by the
gradient check, the first ``corruption_samples`` (all by default) are corrupted. An example misclassified clean
counts as non-robust and is not attacked. For each white-box attack and each gradient source of a model, the
example stays robust only if the deployed prediction survives every restart; the model's result is the worst case
over its sources (robust only if robust against all), and each source's own accuracy is kept beside it. A side
source (``config.SIDE_SOURCES``: the "as published" truncated BPTT of a layered EBM, ``config.as_published``) runs
every attack but the audit's stronger PGD, with the random draws of the source it is paired with, and is reported
beside the worst case, not in it (:mod:`distill.robustness.report`).

Images: x_test is flattened (N, D), or (N, *image_shape); ``image_shape`` is what the attacks see. A convolutional
model (layered EBM or ``LayeredFeedForward`` file) takes its own (C, H, W) or the flattened (D,); Square needs
(C, H, W) and the corruptions (H, W) or (C, H, W) with C in {1, 3}; AutoAttack needs at least 4 classes: all checked
before any work.

Every chunk of ``batch_size`` examples of every task is written to ``out_dir/parts`` as soon as it is done (see
:mod:`distill.robustness.store`); running the same evaluation again skips what is there. ``results.json`` in
``out_dir`` is the assembled result, with table.md and the plots beside it (see :mod:`distill.robustness.report`),
written atomically at the end. ``evaluate(..., cluster="local" | "auto" | ADDRESS)`` runs the parts still to do as
Ray tasks, each storing its own part, with the same result (docs/scaling.md).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fitting import fingerprint
from .attacks import AttackSpec, craft, perturbation_norms
from .config import BLACK_BOX_SOURCE, SIDE_SOURCES, RobustnessConfig
from .models import EBMUnderTest, ModelUnderTest
from .report import assemble, write_report
from .store import PartStore, bits



@dataclass(frozen=True)
class Task:
    """One piece of work on one model: kind "attack" (spec, source), "gradients" (source), "corruption" (name,
    severity); ``group`` names what the result feeds ("fgsm", "pgd-linf", "pgd-l2", "autoattack", "autoattack-l2",
    "min-norm-linf", "min-norm-l2", "square", "pgd-audit", "gradients", "corruption"); ``subset``: which examples
    ("samples", "autoattack", "square", "audit", "corruption")."""

    model: str
    kind: str
    group: str
    subset: str
    spec: AttackSpec | None = None
    source: str | None = None
    corruption: str | None = None
    severity: int | None = None

    def label(self) -> str:
        if self.kind == "attack":
            return f"{self.model}: {self.spec.describe()} [{self.source}]"
        if self.kind == "gradients":
            return f"{self.model}: input gradients [{self.source}]"
        return f"{self.model}: {self.corruption} severity {self.severity}"


# ---------------------------------------------------------------------------------------------- planning
def draw_examples(num_test: int, config: RobustnessConfig) -> dict:
    """The example indices of each subset (see the module docstring), as int64 arrays."""
    order = np.random.default_rng([config.seed, 2024]).permutation(num_test)
    samples = order[:min(config.samples, num_test)]
    corruption = order if config.corruption_samples is None else order[:min(config.corruption_samples, num_test)]
    autoattack = samples if config.autoattack_samples is None else samples[:config.autoattack_samples]
    return {"samples": samples, "autoattack": autoattack, "square": order[:min(config.square_samples, num_test)],
            "audit": samples[:min(config.audit_samples, len(samples))], "corruption": np.sort(corruption)}


def attack_sources(model: ModelUnderTest) -> list:
    return sorted(model.sources)


def plan(model: ModelUnderTest, config: RobustnessConfig) -> list:
    """Every task of one model, cheap ones first."""
    c = config
    pgd = dict(steps=c.pgd_steps, restarts=c.pgd_restarts, step_size=c.pgd_step_size)
    tasks = [Task(model.name, "gradients", "gradients", "audit", source=s) for s in attack_sources(model)]
    for source in attack_sources(model):
        tasks.append(Task(model.name, "attack", "fgsm", "samples", AttackSpec("fgsm", c.eps_linf), source))
        tasks += [Task(model.name, "attack", "pgd-linf", "samples", AttackSpec("pgd-linf", eps, **pgd), source)
                  for eps in c.sweep_linf if eps > 0]
        tasks += [Task(model.name, "attack", "pgd-l2", "samples", AttackSpec("pgd-l2", eps, **pgd), source)
                  for eps in c.sweep_l2 if eps > 0]
        if source not in SIDE_SOURCES:  # the audit's stronger PGD checks the worst case's sources
            tasks.append(Task(model.name, "attack", "pgd-audit", "audit",
                              AttackSpec("pgd-linf", c.eps_linf, c.audit_steps, c.pgd_step_size, c.audit_restarts),
                              source))
    if c.min_norm:
        for norm in ("Linf", "L2"):
            spec = AttackSpec("fmn", 0.0, steps=c.min_norm_steps, norm=norm)
            tasks += [Task(model.name, "attack", f"min-norm-{norm.lower()}", "samples", spec, source)
                      for source in attack_sources(model)]
    if c.autoattack:  # AutoAttack standard: its gradient-based attacks through each source, its Square once
        for group, eps, norm in (("autoattack", c.eps_linf, "Linf"), ("autoattack-l2", c.eps_l2, "L2")):
            if norm not in c.autoattack_norms:
                continue
            spec = AttackSpec("autoattack-gradients", eps, steps=c.autoattack_iterations, norm=norm)
            tasks += [Task(model.name, "attack", group, "autoattack", spec, source)
                      for source in attack_sources(model)]
            square = AttackSpec("square", eps, queries=c.square_queries, norm=norm)
            tasks.append(Task(model.name, "attack", group, "autoattack", square, BLACK_BOX_SOURCE))
    if c.square:  # on the same examples as AutoAttack's Square (same key), the same parts: run once
        tasks.append(Task(model.name, "attack", "square", "square", AttackSpec("square", c.eps_linf,
                                                                                queries=c.square_queries),
                          BLACK_BOX_SOURCE))
    if c.corruption_samples != 0:
        from distill.corruptions import CORRUPTIONS
        for name in (c.corruptions or CORRUPTIONS):
            tasks += [Task(model.name, "corruption", "corruption", "corruption", corruption=name, severity=s)
                      for s in c.severities]
    return tasks


# ---------------------------------------------------------------------------------------------- keys
EBM_ATTACK_LOGITS = "last update before the clip, agreeing with the deployed prediction"


def model_key(model: ModelUnderTest) -> dict:
    """What identifies a model's behaviour: a hash of its architecture and parameters (not of its file, whose training
    history and timings change from run to run), and for an EBM its deployment and its student's parameters."""
    key = {"parameters": model.parameters_hash, "kind": model.kind}
    if isinstance(model, EBMUnderTest):
        key["deployment"] = model.deployment.as_dict()
        key["attack_logits"] = EBM_ATTACK_LOGITS  # parts made with other attack logits are not reused
        if "transfer" in model.sources:
            from distill.io import model_hash
            key["student"] = model_hash(model.sources["transfer"])
    return key


def part_key(task: Task, model: ModelUnderTest, indices: np.ndarray, data_hash: str, config: RobustnessConfig) -> dict:
    key = {"model": model_key(model), "kind": task.kind, "data": data_hash, "seed": config.seed,
           "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest(),
           "image_shape": list(model.image_shape)}
    if task.spec is not None:
        key["attack"] = task.spec.as_dict()
    if task.source is not None:
        key["source"] = task.source
        if model.source_options(task.source):
            key["source_options"] = model.source_options(task.source)
    if task.kind == "corruption":
        key["corruption"] = [task.corruption, task.severity]
    return key


def part_seed(key: dict) -> int:
    """The seed of one part's randomness (random starts, Square's squares): from the evaluation's seed, the attack's
    budget, the gradient source and the examples, never from the model, so every model meets the same draws; a side
    source takes the draws of the source it is paired with (SIDE_SOURCES: the comparison differs by the gradient)."""
    seeded = {k: key.get(k) for k in ("seed", "attack", "source", "indices", "corruption")}
    if seeded["source"] in SIDE_SOURCES:
        seeded["source"] = SIDE_SOURCES[seeded["source"]].paired_with
    return int(hashlib.sha256(json.dumps(seeded, sort_keys=True).encode()).hexdigest()[:8], 16) % (2 ** 31)


# ---------------------------------------------------------------------------------------------- running one part
RELAXATION_SOURCES = ("bptt", "implicit") + tuple(SIDE_SOURCES)  # an EBM's sources whose logits are its relaxation's


def _images(x: np.ndarray, image_shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape((len(x),) + tuple(image_shape)))


def run_attack(model: ModelUnderTest, task: Task, x: np.ndarray, y: np.ndarray, clean_correct: np.ndarray,
               seed: int) -> dict:
    """Attack the clean-correct examples of one chunk; robust flags per example (worst case over restarts, judged by
    the deployed prediction), or for a minimum-norm attack the norm of each example's smallest adversarial
    perturbation (``run_minimum_norm``). For an EBM at the table's PGD-Linf budget also the deployed relaxation's
    residuals on the adversarial examples, and whether each gradient source, as it is (without
    ``agree_with_deployed``), predicts there as deployed."""
    spec = task.spec
    source = model.black_box if task.source == BLACK_BOX_SOURCE else model.sources[task.source]
    if spec.minimum_norm:
        return run_minimum_norm(model, source, spec, x, y, clean_correct, seed)
    robust = clean_correct.copy()
    attacked = np.flatnonzero(clean_correct)
    images, labels = _images(x, model.image_shape), torch.from_numpy(np.asarray(y, dtype=np.int64))
    adversarial = np.array(x, dtype=np.float32, copy=True)
    for restart in range(spec.restarts):
        todo = np.flatnonzero(robust)
        if todo.size == 0:
            break
        adv = craft(source, images[todo], labels[todo], spec, seed + 7919 * restart)
        adv = adv.reshape(len(todo), -1).numpy()
        adversarial[todo] = adv
        robust[todo[model.predict(adv) != y[todo]]] = False
    record = {"robust": bits(robust)}
    if isinstance(model, EBMUnderTest) and task.group == "pgd-linf" and attacked.size:
        points = adversarial[attacked]
        stats = model.relaxation_stats(points)
        record["adversarial_relaxation"] = {"converged": bits(stats["converged"]),
                                            "residual": [float(r) for r in stats["residual"]],
                                            "steps": [int(s) for s in stats["steps"]]}
        if task.source in RELAXATION_SOURCES:  # do the logits decide as deployed where the attack went?
            deployed, images = model.predict(points), _images(points, model.image_shape)
            with torch.no_grad():
                used = model.sources[task.source](images).argmax(1).numpy()
                raw = model.raw_sources[task.source](images).argmax(1).numpy()
            record["matches_deployed_adversarial"] = bits(used == deployed)
            record["raw_matches_deployed_adversarial"] = bits(raw == deployed)
    return record


def run_minimum_norm(model: ModelUnderTest, source, spec: AttackSpec, x: np.ndarray, y: np.ndarray,
                     clean_correct: np.ndarray, seed: int) -> dict:
    """{"norms": per example the norm of the smallest adversarial perturbation found and confirmed by the deployed
    prediction, 0.0 for an example misclassified clean, None where none was found}."""
    norms = [None if correct else 0.0 for correct in clean_correct]
    attacked = np.flatnonzero(clean_correct)
    if attacked.size:
        images = _images(x[attacked], model.image_shape)
        adv = craft(source, images, torch.from_numpy(np.asarray(y[attacked], dtype=np.int64)), spec, seed)
        sizes = perturbation_norms(adv, images, spec.norm).numpy()
        fooled = model.predict(adv.reshape(len(attacked), -1).numpy()) != y[attacked]
        for index, size, confirmed in zip(attacked, sizes, fooled):
            norms[index] = float(size) if confirmed else None
    return {"norms": norms}


CLAIM_POLL_SECONDS = 2.0  # how often a process looks again for parts that another process is working on


def run_part(model: ModelUnderTest, task: Task, chunk: np.ndarray, key: dict, x_test: np.ndarray,
             y_test: np.ndarray, clean: dict, image_shape: tuple, config: RobustnessConfig) -> dict:
    """The record of one part (an attack, a gradient check or a corruption on one chunk), with its seconds."""
    predictions = np.asarray(clean[model.name]["predictions"])
    x, y = x_test[chunk], y_test[chunk]
    start = time.perf_counter()
    if task.kind == "attack":
        record = run_attack(model, task, x, y, predictions[chunk] == y, part_seed(key))
    elif task.kind == "gradients":
        record = run_gradients(model, task, x, y)
    else:
        record = run_corruption(model, task, x, y, chunk, image_shape, config.seed)
    record["seconds"] = time.perf_counter() - start
    return record


def run_gradients(model: ModelUnderTest, task: Task, x: np.ndarray, y: np.ndarray) -> dict:
    """Input gradients of the cross-entropy at clean inputs from one source: NaN / all-zero flags, L1 norms, and
    whether the source's argmax equals the deployed prediction."""
    source = getattr(model, "raw_sources", model.sources)[task.source]  # as it is, without agree_with_deployed
    images = _images(x, model.image_shape).requires_grad_(True)
    with torch.enable_grad():
        logits = source(images)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y, dtype=np.int64)),
                                                 reduction="sum")
        (grad,) = torch.autograd.grad(loss, images)
    grad = grad.reshape(len(x), -1)
    nan = ~torch.isfinite(grad).all(dim=1)
    zero = (grad == 0).all(dim=1)
    matches = logits.detach().argmax(1).numpy() == model.predict(x)
    record = {"nan": bits(nan.numpy()), "zero": bits(zero.numpy()), "matches_deployed": bits(matches),
              "l1": [float(v) for v in grad.abs().sum(dim=1).nan_to_num(nan=-1.0)]}
    if hasattr(source, "last_adjoint_converged"):  # implicit differentiation: did the adjoint iteration converge?
        record["adjoint_converged"] = source.last_adjoint_converged
    return record


def run_corruption(model: ModelUnderTest, task: Task, x: np.ndarray, y: np.ndarray, indices: np.ndarray,
                   image_shape: tuple, seed: int) -> dict:
    """Correct flags of the deployed model on the corrupted images (corrupted with their dataset indices)."""
    from distill.corruptions import corrupt
    images = to_hwc(x, image_shape)
    corrupted = corrupt(images, task.corruption, task.severity, seed=seed, indices=indices)
    flat = from_hwc(corrupted, image_shape).reshape(len(x), -1)
    return {"correct": bits(model.predict(flat) == y)}


def check_image_shape(image_shape: tuple, config: RobustnessConfig) -> None:
    """ValueError, before any work, for an image shape that Square (alone or in AutoAttack: it needs (C, H, W)) or
    the corruptions ((H, W) or (C, H, W) with C in {1, 3}) cannot take, when the configuration runs them."""
    if (config.square or config.autoattack) and len(image_shape) != 3:
        raise ValueError(f"Square (alone or in AutoAttack) attacks images (C, H, W); got image shape {image_shape}: "
                         f"pass the images' shape, or run without Square and AutoAttack (square=False, "
                         f"autoattack=False, --no-square --no-autoattack)")
    if config.corruption_samples != 0 and not (len(image_shape) == 2 or (len(image_shape) == 3
                                                                        and image_shape[0] in (1, 3))):
        raise ValueError(f"corruptions need images (H, W) or (C, H, W) with C in {{1, 3}}; got image shape "
                         f"{image_shape}: pass the images' shape, or run without corruptions (corruption_samples=0, "
                         f"--no-corruptions)")


def to_hwc(x: np.ndarray, image_shape: tuple) -> np.ndarray:
    """Flattened images (N, D) -> (N, H, W) grayscale or (N, H, W, C), the layout the corruptions take; image_shape
    is (H, W), (1, H, W) or channels-first (C, H, W)."""
    shape = tuple(image_shape)
    if len(shape) == 2:
        return x.reshape((len(x),) + shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return np.moveaxis(x.reshape((len(x),) + shape), 1, -1)
    raise ValueError(f"corruptions need images (H, W) or (C, H, W) with C in {{1, 3}}; got image shape {shape}")


def from_hwc(images: np.ndarray, image_shape: tuple) -> np.ndarray:
    shape = tuple(image_shape)
    return images.reshape((len(images),) + shape) if len(shape) == 2 else np.moveaxis(images, -1, 1)


# ---------------------------------------------------------------------------------------------- the loop
def run_stored_part(model: ModelUnderTest, task: Task, chunk: np.ndarray, key: dict, x_test: np.ndarray,
                    y_test: np.ndarray, clean: dict, image_shape: tuple, config: RobustnessConfig,
                    directory: str) -> dict:
    """One Ray task: ``run_part`` and store the record in the PartStore at ``directory`` under its key (idempotent:
    a retry writes the same file). Returns the record."""
    record = run_part(model, task, chunk, key, x_test, y_test, clean, image_shape, config)
    PartStore(directory).put(key, record)
    return record


def _run_on_cluster(parts: list, store: PartStore, x_test, y_test, clean: dict, image_shape: tuple,
                    config: RobustnessConfig, cluster: str, threads: int, log):
    """Run the claimed ``parts`` [(model, task, chunk, key)] as Ray tasks (``run_stored_part``); yield
    ((model, task, chunk, key), record) as they finish. The claims are released at the end, whatever happens."""
    if not parts:
        return
    from ebm_sim import cluster as ray_cluster

    try:
        ray_cluster.connect(cluster, log=log)
        shared = {name: ray_cluster.put(value) for name, value in
                  (("x", x_test), ("y", y_test), ("clean", clean))}
        models = {}
        for model, _, _, _ in parts:  # each model stored once, shared by its parts
            if model.name not in models:
                models[model.name] = ray_cluster.put(model)
        arguments = [(models[model.name], task, chunk, key, shared["x"], shared["y"], shared["clean"],
                      tuple(image_shape), config, str(store.directory)) for model, task, chunk, key in parts]
        for index, record in ray_cluster.run_tasks(run_stored_part, arguments, threads=threads):
            yield parts[index], record
    finally:
        for _, _, _, key in parts:
            store.release(key)


def evaluation_key(models: list, config: RobustnessConfig, data_hash: str) -> str:
    """What identifies an evaluation's results.json: its models (model_key), budget and test data."""
    identity = {"models": {m.name: model_key(m) for m in models}, "config": config.as_dict(), "data": data_hash}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def check_report_owner(out_dir: Path, key: str, overwrite: bool) -> None:
    """Refuse (OutputError) to replace a results.json written by another evaluation (other models, budget or data)
    unless ``overwrite``: several processes may share a folder for the same evaluation (they write the same report),
    but two different evaluations in one folder would silently lose the first one's report."""
    from ebm_sim.outputs import OutputError

    path = Path(out_dir) / "results.json"
    if overwrite or not path.exists():
        return
    try:
        stored = json.loads(path.read_text()).get("evaluation_key")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored != key:
        raise OutputError(f"{path} holds the results of another evaluation (other models, budgets or data): pass "
                          f"--overwrite to replace its report (the parts it was built from stay in "
                          f"{Path(out_dir) / 'parts'}), or choose another --out-dir")


def evaluate(models: list, x_test: np.ndarray, y_test: np.ndarray, image_shape: tuple, config: RobustnessConfig,
             out_dir, *, dataset: str | None = None, progress: bool = True, log=print, overwrite: bool = False,
             cluster: str | None = None, threads: int = 1) -> dict:
    """Run (or resume) the evaluation of ``models`` and return the assembled results (also written to
    ``out_dir/results.json``). See the module docstring. A results.json of another evaluation in ``out_dir`` is
    refused before any work unless ``overwrite`` (``check_report_owner``).

    cluster: None runs the parts here, one after the other; "local", "auto" or a Ray address
    (``ebm_sim.cluster``) runs every part still to do as a Ray task (``threads`` threads each) that stores its own
    part (``run_stored_part``): the key fixes the part's file, so a retried task rewrites it and never duplicates a
    result, and the results equal this process's (the seeds come from the parts' keys, not from the order). The
    models travel to the workers pickled (torch modules and networks), the parts folder must be visible to them."""
    from tqdm import tqdm

    from ebm_sim.cluster import check_cluster

    cluster = check_cluster(cluster)
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads per task must be a positive integer, got {threads!r}")

    if np.ndim(x_test) > 2 and tuple(np.shape(x_test)[1:]) != tuple(image_shape):  # e.g. (N, H, W, C) images
        raise ValueError(f"test images have shape {tuple(np.shape(x_test)[1:])} per sample but image_shape is "
                         f"{tuple(image_shape)}: pass them in that layout (channels first), or flattened (N, D)")
    x_test = np.ascontiguousarray(x_test, dtype=np.float32).reshape(len(x_test), -1)
    y_test = np.asarray(y_test, dtype=np.int64)
    if len(x_test) != len(y_test):
        raise ValueError(f"{len(x_test)} test images but {len(y_test)} labels")
    if not len(models):
        raise ValueError("no models to evaluate")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    for model in models:
        if model.input_size != x_test.shape[1]:
            raise ValueError(f"{model.name} takes {model.input_size} inputs but the test images have {x_test.shape[1]}")
        if int(np.prod(image_shape)) != x_test.shape[1]:
            raise ValueError(f"image shape {tuple(image_shape)} does not hold {x_test.shape[1]} pixels")
        model.set_image_shape(image_shape, model.input_size)  # a conv model's own (C, H, W) or flattened
        if config.autoattack and model.num_classes is not None and model.num_classes < 4:
            raise ValueError(f"{model.name} has {model.num_classes} classes: AutoAttack's targeted attacks (APGD-T's "
                             f"DLR loss, FAB-T) need at least 4; run without AutoAttack (autoattack=False, "
                             f"--no-autoattack)")
        model.configure(config)
    check_image_shape(tuple(image_shape), config)
    if x_test.size and (x_test.min() < 0 or x_test.max() > 1 or not np.isfinite(x_test).all()):
        raise ValueError("test images must be finite and lie in [0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = PartStore(out_dir / "parts")
    data_hash = fingerprint(x_test, y_test)
    report_key = evaluation_key(models, config, data_hash)
    check_report_owner(out_dir, report_key, overwrite)
    draw = draw_examples(len(y_test), config)

    clean = {}
    for model in models:  # deployed predictions on the whole test set (needed by every attack)
        key = {"model": model_key(model), "kind": "clean", "data": data_hash}
        record = store.get(key)
        if record is None:
            start = time.perf_counter()
            record = {"predictions": model.predict(x_test).tolist(), "seconds": time.perf_counter() - start}
            if isinstance(model, EBMUnderTest):
                stats = model.relaxation_stats(x_test[draw["samples"]])
                record["relaxation"] = {"converged": bits(stats["converged"]),
                                        "residual": [float(r) for r in stats["residual"]],
                                        "steps": [int(s) for s in stats["steps"]]}
            store.put(key, record)
        clean[model.name] = record

    work = []
    for model in models:
        for task in plan(model, config):
            indices = draw[task.subset]
            step = len(indices) if task.kind == "corruption" else config.batch_size
            work += [(model, task, indices[a:a + step]) for a in range(0, len(indices), step)]
    parts = {}
    todo = []
    for model, task, chunk in work:
        key = part_key(task, model, chunk, data_hash, config)
        record = store.get(key)
        if record is None:
            todo.append((model, task, chunk, key))
        else:
            parts.setdefault((model.name, task), []).append((chunk, record))
    if todo:
        log(f"robustness: {len(work)} parts, {len(work) - len(todo)} already done in {store.directory}, "
            f"{len(todo)} to run")
    bar = tqdm(total=len(todo), desc="robustness", unit="part", disable=not progress, dynamic_ncols=True)
    while todo:  # parts claimed by another process come back until they are stored (or their owner is gone)
        waiting, remote = [], []
        for model, task, chunk, key in todo:
            bar.set_postfix_str(task.label()[:60], refresh=False)
            record = store.get(key)  # done meanwhile by another process evaluating into the same folder
            if record is None and not store.claim(key):
                waiting.append((model, task, chunk, key))
                continue
            if record is None and cluster is not None:
                remote.append((model, task, chunk, key))  # claimed: run below as a Ray task
                continue
            if record is None:
                try:
                    record = run_part(model, task, chunk, key, x_test, y_test, clean, image_shape, config)
                    store.put(key, record)
                finally:
                    store.release(key)
            parts.setdefault((model.name, task), []).append((chunk, record))
            bar.update(1)
        for (model, task, chunk, key), record in _run_on_cluster(remote, store, x_test, y_test, clean, image_shape,
                                                                config, cluster, threads, log):
            parts.setdefault((model.name, task), []).append((chunk, record))
            bar.set_postfix_str(task.label()[:60], refresh=False)
            bar.update(1)
        if waiting and len(waiting) == len(todo):
            time.sleep(CLAIM_POLL_SECONDS)
        todo = waiting
    bar.close()
    # every task's chunks in the planned order, however they came (stored earlier, finished on Ray in any order):
    # the assembled figures (sums of floats among them) then do not depend on the order the work was done in
    planned = {(model.name, task, np.asarray(chunk).tobytes()): i for i, (model, task, chunk) in enumerate(work)}
    for (name, task), items in parts.items():
        items.sort(key=lambda item: planned[(name, task, np.asarray(item[0]).tobytes())])

    results = assemble(models, parts, clean, draw, y_test, config, dataset=dataset)
    results["evaluation_key"] = report_key
    check_report_owner(out_dir, report_key, overwrite)  # again: another evaluation may have finished here meanwhile
    write_report(results, out_dir)
    return results
