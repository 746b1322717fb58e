"""ebm pipeline: the configuration (defaults, TOML and YAML files, refusals), the whole study on digits with tiny
budgets (every artifact, the report, the results), skipping what is up to date, re-running only what a change
touches, resuming an interrupted stage, and report.html rendered by headless Chromium (every image loads, the tables
are there)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchattacks")

from ebm_sim.deployment import Deployment  # noqa: E402
from ebm_cli.main import main  # noqa: E402
from ebm_pipeline import STAGES, PipelineConfig, run_pipeline  # noqa: E402

TINY_TOML = """
dataset = "digits"
seed = 1

[train]
epochs = 3

[distill]
epochs = 3

[standard]
epochs = 2

[pgd_at]
epochs = 2
pgd_steps = 3

[robustness]
samples = 20
square_samples = 10
audit_samples = 10
pgd_steps = 3
audit_steps = 5
audit_restarts = 2
autoattack_iterations = 3
square_queries = 20
sweep_linf = [0.0, 0.1, 0.3]
sweep_l2 = [0.0, 0.5]
corruption_samples = 40
corruptions = ["gaussian_noise", "fog"]
severities = [1, 5]
batch_size = 20

[hardware]
limit = 60
lava_limit = 8
latency_samples = 5
repeats = 1
batch = 32
targets = ["numba_cpu", "torch_cpu", "student_torch_cpu", "student_onnxruntime_cpu", "lava_float", "lava_fixed",
           "loihi_estimate"]

[report]
trajectory_samples = 4
"""
QUIET = dict(progress=False, log=lambda msg: None)
ARTIFACTS = ("network.h5", "fixed_points_train.h5", "fixed_points_test.h5", "student.h5", "standard.h5", "pgd_at.h5",
             "robustness/results.json", "robustness/table.md", "robustness/sweeps.png", "robustness/corruptions.png",
             "lava_program.h5", "lava.json", "hardware.json", "hardware.png", "dynamics.json", "dynamics.png",
             "training.png", "report.html", "results.json", "pipeline.json")


def skipped_stages(output: str) -> set:
    return set(re.findall(r"^\[(\w+)\] up to date, skipped", output, flags=re.M))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run once through `ebm pipeline --config`."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = folder / "tiny.toml"
    config.write_text(TINY_TOML)
    out = folder / "run"
    assert main(["pipeline", "--config", str(config), "--out-dir", str(out), "--no-progress"]) == 0
    return {"config": config, "out": out, "results": json.loads((out / "results.json").read_text())}


# ---------------------------------------------------------------------------------------------- configuration
def test_defaults_files_and_refusals(tmp_path):
    digits = PipelineConfig()
    assert digits.dataset == "digits" and digits.sections["network"]["layers"] == [64, 256, 10]
    assert digits.deployment == Deployment(method="fixed_point", tol=1e-4, max_steps=30, dt=None)
    assert digits.section("robustness").samples == 200 and digits.torch_threads == 1
    assert PipelineConfig(dataset="fashion-mnist").section("robustness").eps_linf == 0.1
    toml = tmp_path / "c.toml"
    toml.write_text(TINY_TOML)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("dataset: digits\nseed: 1\ntrain: {epochs: 3}\ndistill: {epochs: 3}\n")
    from_toml, from_yaml = PipelineConfig.from_file(toml), PipelineConfig.from_file(yaml_file)
    assert from_toml.section("train").epochs == 3 == from_yaml.section("train").epochs
    assert from_toml.section("train").lr == PipelineConfig().section("train").lr  # unspecified keys keep defaults
    assert from_toml.digest("train") == from_yaml.digest("train")
    assert from_toml.digest("robustness") != from_yaml.digest("robustness")
    assert PipelineConfig.from_file(toml, seed=7).seed == 7  # flags win over the file
    for text, message in [("[magic]\nx = 1\n", "unknown configuration section"),
                          ("[train]\nepochz = 3\n", r"\[train\]: .*epochz"),
                          ("[train]\nepochs = -1\n", r"\[train\]: epochs must be a positive integer"),
                          ("[hardware]\nspeed = 1\n", r"unknown key\(s\) in \[hardware\]: speed"),
                          ("dataset = 'imagenet'\n", "no defaults for dataset 'imagenet'"),
                          ("[train]\nmethod = 'alternating'\n", "synchronous Euler"),
                          ("[train]\nlr = [1e-3, 1e-3, 1e-3]\n", r"lr does not fit \[network\] layers"),
                          ("[train\n", "not valid TOML")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            PipelineConfig.from_file(bad)
    with pytest.raises(FileNotFoundError, match="no such configuration file"):
        PipelineConfig.from_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="do not fit digits"):
        run_pipeline(PipelineConfig.from_dict({"network": {"layers": [784, 10]}}), tmp_path / "x", **QUIET)
    assert main(["pipeline", "--config", str(tmp_path / "missing.toml"), "--out-dir", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------- the study
def test_the_study_writes_every_artifact_and_the_report(study):
    out, results = study["out"], study["results"]
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    assert set(results["stages"]) == set(STAGES) - {"report"}  # the report lists the stages before it
    assert results["config"]["robustness"]["samples"] == 20 and results["config"]["seed"] == 1  # full config kept
    assert results["config"]["train"]["lr"] == PipelineConfig().sections["train"]["lr"]
    assert {row["model"] for row in results["robustness"]["table"]} == {"EBM", "distilled", "standard", "pgd-at"}
    names = {row["name"] for row in results["hardware"]["targets"]}
    assert {"numba_cpu", "lava_fixed", "loihi_estimate"} <= names
    lava = json.loads((out / "lava.json").read_text())
    assert set(lava["runs"]) == {"float", "fixed"} and lava["runs"]["float"]["numba"]["agreement"] >= 0.99
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5  # training, dynamics, sweeps, corruptions, hardware
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, no scripts
    for heading in ("Relaxation dynamics", "Distillation", "Robustness", "Lava", "hardware targets",
                    "Full configuration", "REDUCED"):
        assert heading in html, heading
    assert '&quot;autoattack_iterations&quot;: 3' in html
    dynamics = json.loads((out / "dynamics.json").read_text())
    assert set(dynamics["integrators"]) == {"fixed_point", "euler", "alternating", "rk45"}
    for trace in dynamics["traces"].values():  # energy descends and the residual falls
        assert trace["energy"][-1] < trace["energy"][0] and trace["residual"][-1] < 1e-2 * trace["residual"][0]


def test_a_rerun_skips_every_stage(study, capsys):
    before = (study["out"] / "report.html").stat().st_mtime_ns
    assert main(["pipeline", "--config", str(study["config"]), "--out-dir", str(study["out"]), "--no-progress"]) == 0
    assert skipped_stages(capsys.readouterr().out) == set(STAGES)
    assert (study["out"] / "report.html").stat().st_mtime_ns == before


def test_a_change_reruns_only_what_it_touches_and_an_interrupted_stage_resumes(study, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "copy"
    shutil.copytree(study["out"], out)
    config = tmp_path / "changed.toml"
    config.write_text(TINY_TOML.replace("pgd_steps = 3\naudit_steps", "pgd_steps = 4\naudit_steps"))

    from distill.robustness import evaluation
    real, calls = evaluation.run_attack, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluation, "run_attack", interrupted)
    assert main(["pipeline", "--config", str(config), "--out-dir", str(out), "--no-progress"]) == 130
    monkeypatch.setattr(evaluation, "run_attack", real)
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config), "--out-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert skipped_stages(printed) == set(STAGES) - {"robustness", "report"}
    assert re.search(r"robustness: \d+ parts, ([1-9]\d*) already done", printed)  # the interrupted work was kept
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["robustness"]["pgd_steps"] == 4


LARGE = """
limit_train = 600
limit_test = 200

[train]
epochs = 1
lr = 1e-3

[distill]
epochs = 2

[standard]
epochs = 1

[pgd_at]
epochs = 1
pgd_steps = 2

[robustness]
samples = 20
square_samples = 10
audit_samples = 10
pgd_steps = 2
audit_steps = 3
audit_restarts = 2
autoattack_iterations = 2
square_queries = 10
sweep_linf = [0.0, 0.3]
sweep_l2 = [0.0, 1.0]
corruption_samples = 20
corruptions = ["glass_blur", "snow", "frost", "elastic_transform", "jpeg_compression"]
severities = [5]
batch_size = 20

[hardware]
lava_limit = 3
latency_samples = 3
repeats = 1
batch = 16
targets = ["numba_cpu", "student_onnxruntime_cpu", "lava_fixed", "loihi_estimate"]

[report]
trajectory_samples = 2
"""


@pytest.mark.parametrize("dataset, data_dir, layers", [
    ("fashion-mnist", None, [784, 64, 10]),
    ("cifar10", Path(__file__).resolve().parents[2] / "shared" / "data", [3072, 64, 10])], ids=["fashion", "cifar10"])
def test_larger_datasets_run_through_every_stage(tmp_path, dataset, data_dir, layers):
    """--dataset fashion-mnist and cifar10 (RGB: corruptions, attacks and Lava on (3, 32, 32) images) on small
    subsamples: every stage runs and the report is written."""
    from ebm_sim.datasets import load_dataset
    try:
        load_dataset(dataset, data_dir, limit_test=10)
    except (FileNotFoundError, ValueError) as error:
        pytest.skip(f"{dataset} is not on this machine: {error}")
    config = tmp_path / "large.toml"
    config.write_text(f"dataset = '{dataset}'\n" + (f"data_dir = '{data_dir}'\n" if data_dir else "") + LARGE
                      + f"\n[network]\nlayers = {layers}\n")
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(config), "--out-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["limit_train"] == 600 and results["config"]["dataset"] == dataset
    assert results["robustness"]["examples"]["corruption"] == 20
    assert (out / "report.html").stat().st_size > 0
    lava = json.loads((out / "lava.json").read_text())
    assert lava["runs"]["float"]["numba"]["agreement"] == 1.0


# ---------------------------------------------------------------------------------------------- in a browser
def test_report_renders_in_headless_chromium(study):
    """Every image of report.html loads (decoded, non-zero size) and the tables are there, in a real browser."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={study['out'] / 'chromium-profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get((study["out"] / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        tables = browser.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => t.querySelectorAll('tr').length)")
        headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    finally:
        browser.quit()
    assert len(images) == 5
    for alt, complete, width, height in images:
        assert complete and width > 100 and height > 100, alt
    assert len(tables) >= 6 and all(rows >= 2 for rows in tables)
    assert "Robustness" in headings and "Full configuration" in headings
