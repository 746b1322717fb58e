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
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ebm_sim.storage import write_json, write_text

from .config import PipelineConfig
from .stages import Ledger, file_hash, stage_key

STAGES = ("train", "relax", "distill", "standard", "pgd_at", "robustness", "lava", "hardware", "dynamics", "report")
BUDGET_NOTES = {"digits": "Embedded default (8x8 digits): budgets scaled so that the whole study fits in about five "
                          "minutes on a 2-core CPU (200 attacked test images, PGD 20 steps, AutoAttack and Square at "
                          "a reduced budget, FMN 50 steps, 100 images through Lava); see the configuration below."}


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
        layers = config.sections["network"]["layers"]
        if layers[0] != self.data.num_features or layers[-1] != self.data.num_classes:
            raise ValueError(f"[network] layers {'-'.join(map(str, layers))} do not fit {self.data.name}: its images "
                             f"have {self.data.num_features} pixels and it has {self.data.num_classes} classes")
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
        entry = self.ledger.record(name, key, outputs, summary, seconds)
        self.log(f"[{name}] done in {seconds:.1f} s")
        self.stages[name] = {**entry, "skipped": False}
        return summary

    # ------------------------------------------------------------------ stages
    def train(self) -> dict:
        from ebm_sim.network import Network
        from ebm_sim.training import fit

        cfg = self.config
        net_cfg, train_cfg, path = cfg.sections["network"], cfg.section("train"), self.path("network.h5")

        def work():
            def start(resume, overwrite):
                if overwrite:
                    path.unlink()
                network = Network.init(net_cfg["layers"], seed=cfg.seed, gain=net_cfg["gain"],
                                       activation=net_cfg["activation"])
                return fit(network, self.data.x_train, self.data.y_train, self.data.x_test, self.data.y_test,
                           train_cfg, checkpoint_path=path, resume=resume, progress=self.progress, log=self.log,
                           extra_attrs={"dataset": self.data.name, "init": {"seed": cfg.seed, "gain": net_cfg["gain"]}},
                           num_classes=self.data.num_classes)
            network = _resumable(path, start)
            history = network.history
            return [path], {"layer_sizes": list(network.layer_sizes), "epochs": len(history["test_acc"]),
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
                              split=split, limit=limit, progress=self.progress, log=self.log, **d.relax_options())
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

        def work():
            def start(resume, overwrite):
                return run_baseline(kind, self.config.dataset, net_cfg["layers"], path, data_dir=self.config.data_dir,
                                    limit_train=self.config.limit_train, limit_test=self.config.limit_test,
                                    data_seed=0, activation=net_cfg["activation"], resume=resume,
                                    overwrite=overwrite, progress=self.progress, log=self.log, **options)
            summary = _resumable(path, start)
            summary.pop("path", None)
            return [path], summary
        return self.stage(name, [self.config.digest("network", name)], work)

    def robustness(self) -> dict:
        from distill.robustness import evaluate, load_model_under_test

        folder = self.path("robustness")
        shape = self.data.channels_first_shape

        def work():
            deployment = self.config.deployment
            models = [load_model_under_test(self.path("network.h5"), "EBM", shape, student=self.path("student.h5"),
                                            deployment=deployment)]
            models += [load_model_under_test(self.path(f"{file}.h5"), name, shape)
                       for name, file in (("distilled", "student"), ("standard", "standard"), ("pgd-at", "pgd_at"))]
            results = evaluate(models, self.data.x_test, self.data.y_test, shape, self.config.section("robustness"),
                               folder, dataset=self.data.name, progress=self.progress, log=self.log,
                               overwrite=True)  # the pipeline owns its folder: a stale report is replaced
            outputs = [folder / n for n in ("results.json", "table.md", "sweeps.png", "corruptions.png")
                       if (folder / n).exists()]
            return outputs, {"table": results["table"],
                             "audit": {n: m["audit"]["verdict"] for n, m in results["models"].items()}}
        return self.stage("robustness", [self.config.digest("robustness"), self.config.deployment.as_dict(),
                                         self.hash_of("network.h5", "student.h5", "standard.h5", "pgd_at.h5")], work)

    def relaxation_options(self) -> dict:
        """The Lava graph's dt, steps and tol: the EBM's deployment."""
        from hardware.mapping import relaxation_of
        return relaxation_of(self.config.deployment)

    def lava(self) -> dict:
        from ebm_sim import storage
        from hardware.evaluate import estimate_report, lava_report, load_test_inputs
        from hardware.lava_file import save_program
        from hardware.mapping import to_program

        hardware = self.config.sections["hardware"]

        def work():
            network = storage.load_dense_network(self.path("network.h5"), "ebm pipeline")
            x, y = load_test_inputs(self.config.dataset, self.config.data_dir, hardware["lava_limit"],
                                    network.layer_sizes[0])
            runs, programs = {}, {}
            for kind in ("float", "fixed"):
                programs[kind] = to_program(network, kind, **self.relaxation_options())
                runs[kind] = lava_report(programs[kind], x, y, network, progress=self.progress)
            save_program(self.path("lava_program.h5"), programs["fixed"])
            estimate = estimate_report(programs["fixed"], x, y)
            summary = {"runs": runs, "estimate": estimate,
                       "fixed_accuracy_drop_points": 100 * (runs["float"]["accuracy"] - runs["fixed"]["accuracy"])}
            write_json(self.path("lava.json"), summary)
            return [self.path("lava_program.h5"), self.path("lava.json")], summary
        return self.stage("lava", [self.relaxation_options(), hardware["lava_limit"], self.hash_of("network.h5")],
                          work)

    def hardware(self) -> dict:
        from hardware.targets import CompareSpec, compare, format_table, plot_bars

        h = self.config.sections["hardware"]

        def work():
            spec = CompareSpec(network=str(self.path("network.h5")), dataset=self.config.dataset,
                               data_dir=self.config.data_dir, limit=h["limit"] or self.config.limit_test,
                               student=str(self.path("student.h5")),
                               batch=h["batch"], latency_samples=h["latency_samples"], repeats=h["repeats"],
                               lava_limit=h["lava_limit"], **self.relaxation_options())
            result = compare(spec, h["targets"], progress=self.progress)
            result["table"] = format_table(result)
            write_json(self.path("hardware.json"), result)
            plot_bars(result, self.path("hardware.png"))
            return [self.path("hardware.json"), self.path("hardware.png")], {"failed": result["failed"]}
        return self.stage("hardware", [h, self.config.limit_test, self.relaxation_options(),
                                       self.hash_of("network.h5", "student.h5")], work)

    def dynamics(self) -> dict:
        from ebm_sim import storage

        from .plots import plot_relaxation, relaxation_traces

        samples = self.config.sections["report"]["trajectory_samples"]
        d = self.config.deployment

        def work():
            network = storage.load_dense_network(self.path("network.h5"), "ebm pipeline")
            traces = relaxation_traces(network, self.data.x_test[:samples], d.tol, max_steps=200)
            plot_relaxation(traces, self.path("dynamics.png"),
                            f"{'-'.join(map(str, network.layer_sizes))} EBM, {samples} {self.data.name} test images")
            summary = {"samples": samples, "tol": d.tol,
                       "integrators": {m: {k: t[k] for k in ("steps_mean", "converged", "seconds")}
                                       for m, t in traces.items()}}
            write_json(self.path("dynamics.json"), {**summary, "traces": traces})
            return [self.path("dynamics.json"), self.path("dynamics.png")], summary
        return self.stage("dynamics", [samples, d.tol, self.hash_of("network.h5")], work)

    def report(self, started: float) -> dict:
        from ebm_sim import storage
        from distill.io import load_feedforward

        from .html import render
        from .plots import plot_training

        def work():
            histories = {"EBM (EP)": storage.load_dense_network(self.path("network.h5"), "ebm pipeline").history}
            for name, file in (("distilled", "student"), ("standard", "standard"), ("pgd-at", "pgd_at")):
                histories[name] = load_feedforward(self.path(f"{file}.h5")).history
            plot_training(histories, self.path("training.png"))
            robustness = json.loads(self.path("robustness/results.json").read_text())
            hardware = json.loads(self.path("hardware.json").read_text())
            context = self.results(robustness, hardware, started)
            images = {"training": self.path("training.png"), "dynamics": self.path("dynamics.png"),
                      "sweeps": self.path("robustness/sweeps.png"), "hardware": self.path("hardware.png")}
            if self.path("robustness/corruptions.png").exists():
                images["corruptions"] = self.path("robustness/corruptions.png")
            html_path = write_text(self.path("report.html"), render(context, images))
            write_json(self.path("results.json"), context)
            return [self.path("training.png"), html_path, self.path("results.json")], {"report": str(html_path)}
        inputs = [n for n in ("network.h5", "student.h5", "standard.h5", "pgd_at.h5", "robustness/results.json",
                              "hardware.json", "lava.json", "dynamics.json")]
        return self.stage("report", [self.config.as_dict(), self.hash_of(*inputs)], work)

    def results(self, robustness: dict, hardware: dict, started: float) -> dict:
        from ebm_sim.storage import artifact_info
        return {"config": self.config.as_dict(), "deployment": self.config.deployment.as_dict(),
                "budget_note": BUDGET_NOTES.get(self.config.dataset, "Budgets: see the configuration below."),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "toolkit_version": artifact_info(self.path("network.h5"))["toolkit_version"],
                "total_seconds": time.perf_counter() - started,
                "stages": {name: {"skipped": s["skipped"], "seconds": s["seconds"], "outputs": list(s["outputs"]),
                                  "summary": s["summary"]} for name, s in self.stages.items()},
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
