"""ebm pipeline on convolutional (layered) EBMs: the configuration (arch / preset, the preset's recipe under the
pipeline's budget, quick, refusals), the whole study on the embedded digits as 1x8x8 images with a tiny budget
(every stage, results.json and report.html), Lava run on an average-pooling network and skipped with the mapping's
reason on a max-pooling one, the hardware targets' refusal recorded, and a re-run skipping the finished stages."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchattacks")

from ebm_cli.main import main  # noqa: E402
from ebm_pipeline import STAGES, PipelineConfig, run_pipeline  # noqa: E402

AVG = "1x8x8, conv 4 k3 p1 avgpool, conv 8 k3 p1 avgpool, readout 10"
MAX = "1x8x8, conv 4 k3 p1 maxpool, conv 8 k3 p1, readout 10"
TINY = {"train": {"epochs": 2, "free_steps": 10, "nudged_steps": 4}, "distill": {"epochs": 2},
        "standard": {"epochs": 1}, "pgd_at": {"epochs": 1, "pgd_steps": 2},
        "robustness": {"samples": 10, "square_samples": 5, "audit_samples": 5, "pgd_steps": 2, "audit_steps": 3,
                       "autoattack_iterations": 2, "square_queries": 10, "min_norm_steps": 5,
                       "sweep_linf": [0.0, 0.1], "sweep_l2": [0.0, 0.5], "corruption_samples": 20,
                       "corruptions": ["gaussian_noise"], "severities": [1], "batch_size": 10},
        "hardware": {"lava_limit": 3}, "report": {"trajectory_samples": 3}}
QUIET = dict(progress=False, log=lambda msg: None)


def tiny_toml(arch: str) -> str:
    lines = ['dataset = "digits"', "quick = true", "", "[network]", f'arch = "{arch}"']
    for section, values in TINY.items():
        if section == "network":
            continue
        lines += ["", f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def skipped_stages(output: str) -> set:
    return set(re.findall(r"^\[(\w+)\] up to date, skipped", output, flags=re.M))


def incomplete_stages(output: str) -> set:
    return set(re.findall(r"^\[(\w+)\] INCOMPLETE", output, flags=re.M))


@pytest.fixture(scope="module")
def avg_study(tmp_path_factory):
    """The average-pooling study run once through `ebm pipeline --config ... --arch ...` (the flag wins)."""
    folder = tmp_path_factory.mktemp("pipeline_conv")
    config = folder / "tiny.toml"
    config.write_text(tiny_toml("1x8x8, readout 10"))  # replaced by --arch
    out = folder / "run"
    assert main(["pipeline", "--config", str(config), "--arch", AVG, "--out-dir", str(out), "--no-progress"]) == 0
    return {"config": config, "out": out, "results": json.loads((out / "results.json").read_text())}


# ---------------------------------------------------------------------------------------------- configuration
def test_conv_config_recipe_budget_and_refusals(tmp_path):
    cifar = PipelineConfig(dataset="cifar10", sections={"network": {"preset": "cifar10-cpu"}})
    train = cifar.section("train")
    assert cifar.layered and cifar.kind == "conv" and train.method == "alternating"  # the preset's recipe ...
    assert train.epochs == 24 and train.cost == "cross_entropy" and train.augment == "crop_flip"  # ... at the budget
    assert abs(cifar.section("pgd_at").eps - 8 / 255) < 1e-12 and "HOURS" in cifar.budget_note()
    assert cifar.network().normalization is not None  # the preset's input normalization
    spec = PipelineConfig(dataset="cifar10", sections={"network": {"arch": "3x32x32, conv 8 k3 p1 avgpool, 16"}})
    assert spec.section("train").cost == "mse" and spec.section("train").method == "fixed_point"
    quick = PipelineConfig(dataset="cifar10", quick=True, sections={"network": {"preset": "cifar10-cpu-lava"}})
    assert quick.section("train").epochs == 2 and (quick.limit_train, quick.limit_test) == (1000, 200)
    assert "QUICK" in quick.budget_note()
    assert PipelineConfig().kind == "dense" and "five minutes" in PipelineConfig().budget_note()
    for sections, message in [({"network": {"arch": AVG, "preset": "cifar10-cpu"}}, "arch or preset, not both"),
                              ({"network": {"arch": AVG, "layers": [64, 10]}}, r"unknown key\(s\) in \[network\]"),
                              ({"network": {"preset": "nope"}}, "unknown preset 'nope'"),
                              ({"network": {"arch": "1x8x8, conv 4 k9 p0, readout 10"}}, r"\[network\]"),
                              ({"network": {"arch": AVG}, "train": {"lr": [1e-3] * 5}}, r"lr does not fit")]:
        with pytest.raises(ValueError, match=message):
            PipelineConfig(sections=sections)
    with pytest.raises(ValueError, match="convolutional study .* not 'mnist'"):
        PipelineConfig(dataset="mnist", sections={"network": {"arch": AVG}})
    with pytest.raises(ValueError, match="does not fit digits"):
        run_pipeline(PipelineConfig(sections={"network": {"arch": "3x32x32, conv 4 k3 p1, readout 10"}}),
                     tmp_path / "x", **QUIET)


# ---------------------------------------------------------------------------------------------- the study
def test_the_conv_study_runs_every_stage(avg_study):
    out, results = avg_study["out"], avg_study["results"]
    assert set(results["stages"]) == set(STAGES) - {"report"}
    assert results["kind"] == "conv" and results["architecture"] == AVG
    assert results["config"]["network"]["arch"] == AVG and "QUICK" in results["budget_note"]
    train = results["stages"]["train"]["summary"]
    assert train["layer_shapes"] == [[1, 8, 8], [4, 4, 4], [8, 2, 2]] and train["epochs"] == 2
    for name in ("network.h5", "fixed_points_train.h5", "fixed_points_test.h5", "student.h5", "standard.h5",
                 "pgd_at.h5", "lava.json", "hardware.json", "dynamics.json", "dynamics.png", "training.png",
                 "report.html", "results.json", "pipeline.json"):
        assert (out / name).stat().st_size > 0, name
    from ebm_sim import storage
    fixed_points = storage.load_fixed_points(out / "fixed_points_test.h5")
    assert fixed_points.states[0].shape[1:] == (4, 4, 4)  # fixed points keep their layer shapes
    from distill.io import load_model
    assert type(load_model(out / "student.h5")).__name__ == "LayeredFeedForward"
    assert type(load_model(out / "pgd_at.h5")).__name__ == "LayeredFeedForward"
    # Lava: an average-pooling network is mapped and run in float and fixed point
    lava = json.loads((out / "lava.json").read_text())
    assert set(lava["runs"]) == {"float", "fixed"} and lava["runs"]["fixed"]["samples"] == 3
    assert lava["runs"]["float"]["numba"]["agreement"] == 1.0 and "estimate" in lava
    # hardware: the targets' own refusal of a layered network is recorded, nothing measured
    hardware = json.loads((out / "hardware.json").read_text())
    assert hardware["targets"] == [] and "layered network" in hardware["skipped"]
    # robustness: the four models, or the ones the robustness code refused, named with its error
    robustness = results["stages"]["robustness"]
    evaluated = {row["model"] for row in robustness["summary"]["table"]}
    refused = set(robustness["summary"].get("not_evaluated", {}))
    assert evaluated | refused == {"EBM", "distilled", "standard", "pgd-at"}
    assert robustness["incomplete"] == bool(refused)
    dynamics = json.loads((out / "dynamics.json").read_text())
    assert set(dynamics["integrators"]) == {"fixed_point", "euler", "alternating", "rk45"}
    for method, trace in dynamics["traces"].items():
        assert trace["recorded"] == (method != "rk45")
        assert trace["residual"][-1] < 1e-2 * trace["residual"][0], method  # relaxed to the fixed point
    html = (out / "report.html").read_text()
    for text in ("convolutional EBM", "Architecture " + AVG, "QUICK", "Lava", "Hardware targets skipped",
                 "start and end only", "Full configuration"):
        assert text in html, text
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for name, reason in robustness["summary"].get("not_evaluated", {}).items():
        assert "Not evaluated: " + name in html


def test_a_rerun_skips_the_finished_stages(avg_study, capsys):
    capsys.readouterr()
    assert main(["pipeline", "--config", str(avg_study["config"]), "--arch", AVG, "--out-dir",
                 str(avg_study["out"]), "--no-progress"]) == 0
    output = capsys.readouterr().out
    incomplete = incomplete_stages(output)
    assert incomplete <= {"robustness"}  # only a stage the robustness code refused part of runs again
    assert skipped_stages(output) == set(STAGES) - incomplete - ({"report"} if incomplete else set())


def test_a_model_the_robustness_code_refuses_is_reported_and_retried(avg_study, tmp_path, monkeypatch):
    import shutil

    import distill.robustness
    out = tmp_path / "run"
    shutil.copytree(avg_study["out"], out)
    load = distill.robustness.load_model_under_test

    def refusing(path, name=None, *args, **kwargs):
        if name == "pgd-at":
            raise ValueError("no conv support for this one (test)")
        return load(path, name, *args, **kwargs)
    monkeypatch.setattr(distill.robustness, "load_model_under_test", refusing)
    config = PipelineConfig.from_file(avg_study["config"], network={"arch": AVG})
    results = run_pipeline(config, out, force=("robustness",), **QUIET)
    stage = results["stages"]["robustness"]
    assert stage["incomplete"] and stage["summary"]["not_evaluated"] == {
        "pgd-at": "ValueError: no conv support for this one (test)"}
    assert {row["model"] for row in results["robustness"]["table"]} == {"EBM", "distilled", "standard"}
    assert "Not evaluated: pgd-at: ValueError: no conv support" in (out / "report.html").read_text()
    ledger = json.loads((out / "pipeline.json").read_text())["stages"]
    assert "not_evaluated" not in ledger["robustness"]["summary"]  # not recorded: the next run tries again
    monkeypatch.setattr(distill.robustness, "load_model_under_test", load)
    lines = []
    results = run_pipeline(config, out, progress=False, log=lines.append)
    assert "[robustness] running" in lines and not results["stages"]["robustness"]["incomplete"]
    assert {row["model"] for row in results["robustness"]["table"]} == {"EBM", "distilled", "standard", "pgd-at"}


def test_max_pooling_skips_lava_with_the_reason_and_a_fixed_step_count_relaxes(tmp_path):
    sections = {**TINY, "network": {"arch": MAX}, "train": {**TINY["train"], "tol": 0.0}}  # a fixed step count
    pipeline_config = PipelineConfig(dataset="digits", quick=True, sections=sections)
    from ebm_pipeline.run import Pipeline
    pipeline = Pipeline(pipeline_config, tmp_path / "max", **QUIET)
    pipeline.train()
    summary = pipeline.lava()
    assert "max pooling" in summary["skipped"] and "avgpool" in summary["skipped"]
    assert json.loads((tmp_path / "max" / "lava.json").read_text()) == summary
    assert not (tmp_path / "max" / "lava_program.h5").exists()
    from ebm_pipeline.html import skipped_note
    assert "max pooling" in skipped_note("The Lava mapping", summary["skipped"])
    dynamics = pipeline.dynamics()  # deployed with tol 0: relaxed to DYNAMICS_TOL (rk45 needs one)
    assert dynamics["deployed_tol"] == 0.0 and dynamics["tol"] > 0
    assert set(dynamics["integrators"]) == {"fixed_point", "euler", "alternating", "rk45"}
    assert all(t["steps_mean"] > 0 for t in dynamics["integrators"].values())
