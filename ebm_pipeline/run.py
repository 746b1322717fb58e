"""``ebm pipeline``: the whole study on one dataset, stage by stage, resumable.

    results = run_pipeline(PipelineConfig.for_dataset("digits"), "runs/pipeline")

Stages (artifacts in ``out_dir``):
  train       EP training of the EBM                                  network.h5
  relax       its fixed points on the training and test sets          fixed_points_train.h5, fixed_points_test.h5
  distill     the feedforward student                                 student.h5
  standard    backprop baseline, same architecture                    standard.h5
  pgd_at      PGD adversarially trained baseline                       pgd_at.h5
  robustness  attacks, corruptions and the audit on the four models   robustness/ (results.json, table.md, PNGs)
  lava        Lava export (fixed point) and Lava runs, float and fixed lava_program.h5, lava.json
  hardware    latency and energy across targets                       hardware.json, hardware.png
  dynamics    the relaxation per integrator                           dynamics.json, dynamics.png
  report      training curves, the self-contained page, all results  training.png, report.html, results.json
Every stage shows progress, writes its artifacts atomically, and is skipped on a re-run when its artifacts are
there and match its inputs (see :mod:`ebm_pipeline.stages`); an interrupted stage resumes its own partial work.

A convolutional (layered) EBM ([network] arch or preset) goes through the same stages: EP training on (N, C, H, W)
images, fixed points with their layer shapes, a LayeredFeedForward student and baselines of the same architecture,
the four models' robustness (a model the robustness code refuses is reported with its error and the stage left
incomplete, so that a re-run tries it again), Lava for a network it can carry (average pooling or none, synchronous
updates; otherwise the stage records the mapping's refusal in lava.json and the report), the hardware targets where
they take the network (they refuse layered ones for now: the refusal is recorded in hardware.json and the report),
and the relaxation per integrator.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ebm_sim.storage import write_json, write_text

from .config import BUDGET_NOTES, PipelineConfig  # noqa: F401 (BUDGET_NOTES: kept importable from here)
from .stages import Ledger, file_hash, stage_key

STAGES = ("train", "relax", "distill", "standard", "pgd_at", "robustness", "lava", "hardware", "dynamics", "report")
MODELS = (("EBM", "network"), ("distilled", "student"), ("standard", "standard"), ("pgd-at", "pgd_at"))
#: the dynamics stage's tolerance for an EBM deployed with a fixed step count (tol 0, e.g. the CIFAR presets)
DYNAMICS_TOL = 1e-4


def _resumable(path: Path, start):
    """start(resume, overwrite) for a training whose output file may hold an interrupted run: resume it when it
    does; start over when it cannot be resumed (finished, or other settings)."""
    if path.exists():
        try:
            return start(True, False)
        except ValueError as error:
            if "resume" not in str(error):
                raise
    return start(False, path.exists())


class Pipeline:
    """One run of the pipeline (see the module docstring); ``run()`` returns the results dict."""

    def __init__(self, config: PipelineConfig, out_dir, progress: bool = True, log=print, force=()):
        from ebm_sim.datasets import load_dataset

        self.config, self.out = config, Path(out_dir)
        self.progress, self.log = progress, log
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} to force; the stages are {', '.join(STAGES)}")
        self.force = set(force)
        self.data = load_dataset(config.dataset, config.data_dir, config.limit_train, config.limit_test)
        self.layered = config.layered
        if self.layered:  # the untrained network: its architecture, checked against the data before any work
            self.architecture = config.network()
            shape = tuple(self.data.channels_first_shape)
            if (tuple(self.architecture.input_shape) != shape
                    or self.architecture.num_classes != self.data.num_classes):
                raise ValueError(f"[network] {config.architecture_text()} does not fit {self.data.name}: it takes "
                                 f"{'x'.join(map(str, self.architecture.input_shape))} inputs and gives "
                                 f"{self.architecture.num_classes} classes; {self.data.name} has "
                                 f"{'x'.join(map(str, shape))} images and {self.data.num_classes} classes")
        else:
            layers = config.sections["network"]["layers"]
            if layers[0] != self.data.num_features or layers[-1] != self.data.num_classes:
                raise ValueError(f"[network] layers {'-'.join(map(str, layers))} do not fit {self.data.name}: its "
                                 f"images have {self.data.num_features} pixels and it has {self.data.num_classes} "
                                 f"classes")
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.out)
        from distill.fitting import fingerprint
        self.data_hash = fingerprint(self.data.x_train, self.data.y_train, self.data.x_test, self.data.y_test)
        self.stages = {}

    # ------------------------------------------------------------------ plumbing
    def path(self, name: str) -> Path:
        return self.out / name

    def hash_of(self, *names) -> list:
        return [file_hash(self.path(n)) for n in names]

    def images(self, split: str) -> np.ndarray:
        """The split's inputs as the EBM takes them: (N, n_0) for a dense network, (N, C, H, W) for a layered one."""
        x = self.data.x_train if split == "train" else self.data.x_test
        return x.reshape((x.shape[0],) + tuple(self.data.channels_first_shape)) if self.layered else x

    def load_network(self):
        """The trained EBM (network.h5), dense or layered."""
        from ebm_sim import storage
        return storage.load_network(self.path("network.h5"))

    def stage(self, name: str, key_parts: list, work) -> dict:
        """Run stage ``name`` unless the ledger holds it with the same key and intact outputs."""
        key = stage_key(name, self.data_hash, *key_parts)
        entry = None if name in self.force else self.ledger.finished(name, key)
        if entry is not None:
            self.log(f"[{name}] up to date, skipped ({', '.join(entry['outputs'])})")
            self.stages[name] = {**entry, "skipped": True}
            return entry["summary"]
        self.log(f"[{name}] running")
        start = time.perf_counter()
        outputs, summary = work()
        seconds = time.perf_counter() - start
        if summary.get("incomplete"):  # not recorded: the next run tries it again
            entry = self.ledger.entry(key, outputs, summary, seconds)
            self.log(f"[{name}] INCOMPLETE after {seconds:.1f} s: {summary['incomplete']}")
        else:
            entry = self.ledger.record(name, key, outputs, summary, seconds)
            self.log(f"[{name}] done in {seconds:.1f} s" + (f" (skipped: {summary['skipped']})"
                                                            if summary.get("skipped") else ""))
        self.stages[name] = {**entry, "skipped": False}
        return summary

    # ------------------------------------------------------------------ stages
    def train(self) -> dict:
        from ebm_sim.training import fit

        cfg = self.config
        net_cfg, train_cfg, path = cfg.sections["network"], cfg.section("train"), self.path("network.h5")

        def work():
            def start(resume, overwrite):
                if overwrite:
                    path.unlink()
                return fit(cfg.network(), self.images("train"), self.data.y_train, self.images("test"),
                           self.data.y_test, train_cfg, checkpoint_path=path, resume=resume, progress=self.progress,
                           log=self.log, extra_attrs={"dataset": self.data.name,
                                                      "init": {"seed": cfg.seed, "gain": net_cfg["gain"]}},
                           num_classes=self.data.num_classes)
            network = _resumable(path, start)
            history = network.history
            shape = ({"layer_shapes": [list(s) for s in network.layer_shapes],
                      "architecture": cfg.architecture_text(),
                      "parameters": int(sum(p.size for p in network.parameter_arrays()))}
                     if self.layered else {"layer_sizes": list(network.layer_sizes)})
            return [path], {**shape, "epochs": len(history["test_acc"]),
                            "test_acc": history["test_acc"][-1], "train_acc": history["train_acc"][-1],
                            "seconds_per_epoch": float(np.mean(history["seconds"]))}
        return self.stage("train", [cfg.digest("network", "train")], work)

    def relax(self) -> dict:
        from ebm_sim.batch_relax import run_relax

        d = self.config.deployment

        def work():
            outputs, summary = [], {}
            for split in ("train", "test"):
                out = self.path(f"fixed_points_{split}.h5")
                limit = self.config.limit_train if split == "train" else self.config.limit_test
                s = run_relax(self.path("network.h5"), self.config.dataset, out, data_dir=self.config.data_dir,
                              split=split, limit=limit, progress=self.progress, log=self.log,
                              cluster=self.config.cluster, **d.relax_options())
                outputs.append(out)
                summary[split] = {k: s[k] for k in ("samples", "accuracy", "converged") if k in s}
            return outputs, summary
        return self.stage("relax", [d.as_dict(), self.config.limit_train, self.config.limit_test,
                                    self.hash_of("network.h5")], work)

    def distill(self) -> dict:
        from distill.commands import run_distill

        path = self.path("student.h5")
        options = {"seed": self.config.seed, **self.config.sections["distill"]}

        def work():
            def start(resume, overwrite):
                return run_distill(self.path("network.h5"), self.path("fixed_points_train.h5"), path,
                                   test_fixed_points=self.path("fixed_points_test.h5"), resume=resume,
                                   overwrite=overwrite, progress=self.progress, log=self.log, **options)
            summary = _resumable(path, start)
            summary.pop("path", None)
            return [path], summary
        return self.stage("distill", [self.config.digest("distill"),
                                      self.hash_of("network.h5", "fixed_points_train.h5", "fixed_points_test.h5")],
                          work)

    def baseline(self, name: str) -> dict:
        from distill.commands import run_baseline

        path = self.path(f"{name}.h5")
        options = {"seed": self.config.seed, **self.config.sections[name]}
        options.pop("kind", None)
        kind = "standard" if name == "standard" else "pgd-at"
        net_cfg = self.config.sections["network"]
        architecture = self.architecture if self.layered else net_cfg["layers"]  # a network gives its layers only

        def work():
            def start(resume, overwrite):
                return run_baseline(kind, self.config.dataset, architecture, path, data_dir=self.config.data_dir,
                                    limit_train=self.config.limit_train, limit_test=self.config.limit_test,
                                    data_seed=0, activation=net_cfg.get("activation"), resume=resume,
                                    overwrite=overwrite, progress=self.progress, log=self.log, **options)
            summary = _resumable(path, start)
            summary.pop("path", None)
            return [path], summary
        return self.stage(name, [self.config.digest("network", name)], work)

    def robustness(self) -> dict:
        """The four models under attack, corruption and the audit. For a layered EBM the robustness code's support
        is new: a model it refuses (at loading or during the evaluation) is reported in the summary's
        ``not_evaluated`` with the error, the others are evaluated, and the stage is left incomplete (re-run)."""
        from distill.robustness import evaluate, load_model_under_test

        folder = self.path("robustness")
        shape = self.data.channels_first_shape

        def refused(error) -> str:
            if not self.layered:  # the dense study is supported throughout: an error is an error
                raise error
            self.log(f"[robustness] refused for the convolutional study: {type(error).__name__}: {error}")
            return f"{type(error).__name__}: {error}"

        def work():
            deployment = self.config.deployment
            models, not_evaluated = [], {}
            for name, file in MODELS:
                options = ({"student": self.path("student.h5"), "deployment": deployment} if name == "EBM" else {})
                try:
                    models.append(load_model_under_test(self.path(f"{file}.h5"), name, shape, **options))
                except Exception as error:  # noqa: BLE001 (reported, see refused)
                    not_evaluated[name] = refused(error)
            results = None
            if models:
                try:
                    results = evaluate(models, self.data.x_test, self.data.y_test, shape,
                                       self.config.section("robustness"), folder, dataset=self.data.name,
                                       progress=self.progress, log=self.log, cluster=self.config.cluster,
                                       overwrite=True)  # the pipeline owns its folder: a stale report is replaced
                except Exception as error:  # noqa: BLE001 (reported, see refused)
                    reason = refused(error)
                    not_evaluated.update({m.name: reason for m in models})
            outputs = [folder / n for n in ("results.json", "table.md", "sweeps.png", "corruptions.png")
                       if results is not None and (folder / n).exists()]
            summary = {"table": results["table"] if results else [],
                       "audit": {n: m["audit"]["verdict"] for n, m in results["models"].items()} if results else {}}
            if not_evaluated:
                summary["not_evaluated"] = not_evaluated
                summary["incomplete"] = (f"the robustness evaluation refused {', '.join(not_evaluated)} (see "
                                         f"not_evaluated); the stage runs again on the next run")
            return outputs, summary
        return self.stage("robustness", [self.config.digest("robustness"), self.config.deployment.as_dict(),
                                         self.hash_of("network.h5", "student.h5", "standard.h5", "pgd_at.h5")], work)

    def relaxation_options(self) -> dict:
        """The Lava graph's dt, steps and tol: the EBM's deployment."""
        from hardware.mapping import relaxation_of
        return relaxation_of(self.config.deployment)

    def relaxation_key(self):
        """What the lava and hardware stages depend on of the deployment: the Lava relaxation of a dense EBM (the
        configuration guarantees one), the deployment itself for a layered one (Lava may refuse its method)."""
        return self.config.deployment.as_dict() if self.layered else self.relaxation_options()

    def lava_refusal(self, network) -> str | None:
        """Why the Lava graph cannot carry this layered network (max pooling, a method other than synchronous
        updates, ...: the mapping's own message), or None. Dense networks are checked by the configuration."""
        if not self.layered:
            return None
        from hardware.layered_mapping import check_layered_mappable
        try:
            check_layered_mappable(network)
            self.relaxation_options()
        except ValueError as error:
            return str(error)
        return None

    def lava(self) -> dict:
        from hardware.evaluate import estimate_report, lava_report, load_test_inputs
        from hardware.lava_file import save_program
        from hardware.mapping import to_program

        hardware = self.config.sections["hardware"]

        def work():
            network = self.load_network()
            reason = self.lava_refusal(network)
            if reason is not None:
                summary = {"skipped": reason}
                write_json(self.path("lava.json"), summary)
                return [self.path("lava.json")], summary
            inputs = int(np.prod(network.input_shape)) if self.layered else network.layer_sizes[0]
            x, y = load_test_inputs(self.config.dataset, self.config.data_dir, hardware["lava_limit"], inputs)
            runs, programs = {}, {}
            for kind in ("float", "fixed"):
                programs[kind] = to_program(network, kind, **self.relaxation_options())
                runs[kind] = lava_report(programs[kind], x, y, network, progress=self.progress)
            outputs, summary = [], {}
            try:
                save_program(self.path("lava_program.h5"), programs["fixed"])
                outputs.append(self.path("lava_program.h5"))
            except ValueError as error:  # the export format holds dense chains only: say so, the runs stand
                if not self.layered:
                    raise
                summary["export"] = f"lava_program.h5 not written: {error}"
            estimate = estimate_report(programs["fixed"], x, y)
            summary.update({"runs": runs, "estimate": estimate,
                            "fixed_accuracy_drop_points": 100 * (runs["float"]["accuracy"]
                                                                 - runs["fixed"]["accuracy"])})
            write_json(self.path("lava.json"), summary)
            return outputs + [self.path("lava.json")], summary
        return self.stage("lava", [self.relaxation_key(), hardware["lava_limit"], self.hash_of("network.h5")],
                          work)

    def hardware(self) -> dict:
        from hardware.targets import CompareSpec, check_spec, compare, format_table, plot_bars

        h = self.config.sections["hardware"]

        def work():
            try:
                spec = CompareSpec(network=str(self.path("network.h5")), dataset=self.config.dataset,
                                   data_dir=self.config.data_dir, limit=h["limit"] or self.config.limit_test,
                                   student=str(self.path("student.h5")),
                                   batch=h["batch"], latency_samples=h["latency_samples"], repeats=h["repeats"],
                                   lava_limit=h["lava_limit"], **({} if self.layered else self.relaxation_options()))
                if self.layered:  # the targets' own check: they load the network, the data and the student
                    check_spec(spec)
            except ValueError as error:  # a layered network the targets do not take (yet): say why, measure none
                if not self.layered:
                    raise
                result = {"skipped": str(error), "targets": [], "failed": [], "n_samples": 0}
                write_json(self.path("hardware.json"), result)
                return [self.path("hardware.json")], {"failed": [], "skipped": str(error)}
            result = compare(spec, h["targets"], progress=self.progress)
            result["table"] = format_table(result)
            write_json(self.path("hardware.json"), result)
            plot_bars(result, self.path("hardware.png"))
            return [self.path("hardware.json"), self.path("hardware.png")], {"failed": result["failed"]}
        return self.stage("hardware", [h, self.config.limit_test, self.relaxation_key(),
                                       self.hash_of("network.h5", "student.h5")], work)

    def dynamics(self) -> dict:
        """The relaxation of a few test images with every integrator, to the deployed tolerance, or to
        DYNAMICS_TOL when the EBM is deployed with a fixed step count (tol 0: rk45 needs a tolerance)."""
        from .plots import plot_relaxation, relaxation_traces

        samples = self.config.sections["report"]["trajectory_samples"]
        d = self.config.deployment
        tol = d.tol if d.tol > 0 else DYNAMICS_TOL

        def work():
            network = self.load_network()
            traces = relaxation_traces(network, self.images("test")[:samples], tol, max_steps=200)
            plot_relaxation(traces, self.path("dynamics.png"),
                            f"{self.config.architecture_text()} EBM, {samples} {self.data.name} test images")
            summary = {"samples": samples, "tol": tol, "deployed_tol": d.tol,
                       "integrators": {m: {k: t[k] for k in ("steps_mean", "converged", "seconds", "recorded")}
                                       for m, t in traces.items()}}
            write_json(self.path("dynamics.json"), {**summary, "traces": traces})
            return [self.path("dynamics.json"), self.path("dynamics.png")], summary
        return self.stage("dynamics", [samples, d.tol, self.hash_of("network.h5")], work)

    def report(self, started: float) -> dict:
        from distill.io import load_feedforward

        from .html import render
        from .plots import plot_training

        def work():
            histories = {"EBM (EP)": self.load_network().history}
            for name, file in MODELS[1:]:
                histories[name] = load_feedforward(self.path(f"{file}.h5")).history
            plot_training(histories, self.path("training.png"))
            # the robustness stage's results (those of the models it evaluated), or None when it wrote none
            evaluated = "robustness/results.json" in self.stages["robustness"]["outputs"]
            robustness = json.loads(self.path("robustness/results.json").read_text()) if evaluated else None
            hardware = json.loads(self.path("hardware.json").read_text())
            context = self.results(robustness, hardware, started)
            images = {"training": self.path("training.png"), "dynamics": self.path("dynamics.png")}
            for name, file in (("sweeps", "robustness/sweeps.png"), ("corruptions", "robustness/corruptions.png"),
                               ("hardware", "hardware.png")):
                if self.path(file).exists() and (robustness is not None or not file.startswith("robustness")):
                    images[name] = self.path(file)
            html_path = write_text(self.path("report.html"), render(context, images))
            write_json(self.path("results.json"), context)
            return [self.path("training.png"), html_path, self.path("results.json")], {"report": str(html_path)}
        inputs = [n for n in ("network.h5", "student.h5", "standard.h5", "pgd_at.h5", "robustness/results.json",
                              "hardware.json", "lava.json", "dynamics.json") if self.path(n).exists()]
        incomplete = sorted(n for n, s in self.stages.items() if s["summary"].get("incomplete"))
        return self.stage("report", [self.config.as_dict(), self.hash_of(*inputs)] + ([incomplete] if incomplete
                                                                                      else []), work)

    def results(self, robustness: dict | None, hardware: dict, started: float) -> dict:
        """results.json: the configuration, deployment, budget, every stage's summary, the robustness results
        (None when the stage evaluated nothing complete) and the hardware comparison."""
        from ebm_sim.storage import artifact_info
        return {"config": self.config.as_dict(), "deployment": self.config.deployment.as_dict(),
                "kind": self.config.kind, "architecture": self.config.architecture_text(),
                "budget_note": self.config.budget_note(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "toolkit_version": artifact_info(self.path("network.h5"))["toolkit_version"],
                "total_seconds": time.perf_counter() - started,
                "stages": {name: {"skipped": s["skipped"], "seconds": s["seconds"], "outputs": list(s["outputs"]),
                                  "summary": s["summary"], "incomplete": bool(s["summary"].get("incomplete"))}
                           for name, s in self.stages.items()},
                "robustness": robustness, "hardware": hardware}

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        """Run the stages, holding the output folder's lock: a second pipeline on the same folder is refused at once
        (ebm_sim.outputs.exclusive) instead of both writing its artifacts."""
        import torch

        from ebm_sim.outputs import claim

        threads = torch.get_num_threads()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        try:
            with claim(self.out, kind="folder", log=self.log):
                self.ledger = Ledger(self.out)  # as it is now that no other pipeline writes here
                return self._run_stages()
        finally:
            torch.set_num_threads(threads)

    def _run_stages(self) -> dict:
        started = time.perf_counter()
        self.train()
        self.relax()
        self.distill()
        self.baseline("standard")
        self.baseline("pgd_at")
        self.robustness()
        self.lava()
        self.hardware()
        self.dynamics()
        self.report(started)
        return json.loads(self.path("results.json").read_text())


def run_pipeline(config: PipelineConfig, out_dir, *, progress: bool = True, log=print, force=()) -> dict:
    """Run (or resume) the pipeline; returns the results (also in out_dir/results.json, report in report.html)."""
    return Pipeline(config, out_dir, progress=progress, log=log, force=force).run()
