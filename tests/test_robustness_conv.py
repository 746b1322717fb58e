"""The robustness evaluation on convolutional models (distill/robustness with ``ebm_sim.model.LayeredNetwork`` EBMs):
a layered EBM file, its distilled ``LayeredFeedForward`` student and the two same-architecture baselines (standard,
PGD-AT; ``ebm-feedforward`` version 2 files) as models under test, every attack and the corruptions on (C, H, W)
images, the "as published" truncated-BPTT source reported beside full BPTT (not in the worst case), checkpointing
of long relaxations, and resuming from parts.

Tiny data: the embedded digits (1x8x8) and a small conv EBM (two conv layers, 4x4x4 and 8x2x2, and a readout: with
one state layer alone there is no feedback and the relaxation ends after one step) whose weights
are a standard baseline's of the same architecture (EP training is tested elsewhere), deployed for exactly 12 steps
(tol 0), so that a truncation to the first 3 steps changes the gradient."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchattacks")
pytest.importorskip("pyautoattack")

from distill.baselines import train_baseline  # noqa: E402
from distill.config import BaselineConfig, DistillConfig  # noqa: E402
from distill.io import stored_content_hash  # noqa: E402
from distill.models import LayeredFeedForward  # noqa: E402
from distill.robustness import RobustnessConfig, evaluate, load_model_under_test, run_audit  # noqa: E402
from distill.robustness import evaluation  # noqa: E402
from distill.robustness.config import AS_PUBLISHED_SOURCE, CHECKPOINT_ABOVE, CHECKPOINT_PIECE  # noqa: E402
from distill.train import distill  # noqa: E402
from ebm_sim import datasets, storage  # noqa: E402
from ebm_sim.deployment import Deployment  # noqa: E402
from ebm_sim.model import LayeredNetwork, dynamics  # noqa: E402
from ebm_sim.network import Network  # noqa: E402

QUIET = dict(progress=False, log=lambda msg: None)
ARCH = "1x8x8, conv 4 k3 p1 maxpool, conv 8 k3 p1 maxpool, readout 10"  # feedback: truncation matters
DEPLOYMENT = Deployment(method="fixed_point", tol=0.0, max_steps=12)
STEPS = 3  # as_published_steps in these tests (the published value, 29, exceeds the deployment's 12 steps)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    data = datasets.load_dataset("digits")
    assert data.channels_first_shape == (1, 8, 8)
    return data


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory, digits):
    """Files of the conv EBM (its deployment stored), its distilled student and the standard and PGD-AT baselines."""
    folder = tmp_path_factory.mktemp("conv")
    shape = digits.channels_first_shape
    x = digits.x_train.reshape((-1,) + shape)
    architecture = LayeredNetwork.init(ARCH, seed=0)
    fit = BaselineConfig(epochs=2, lr=1e-2, batch_size=64, patience=None, val_fraction=0.0, seed=0)
    weights, _ = train_baseline(architecture, x, digits.y_train, fit, **QUIET)
    network = weights.to_network()
    storage.save_network(folder / "ebm.h5", network, extra_attrs={"deployment": DEPLOYMENT.as_dict()})
    r = dynamics.relax(network, x, deployment=DEPLOYMENT)
    storage.save_fixed_points(folder / "fp.h5", x, digits.y_train, r.states, r.residual, r.steps, r.converged,
                              DEPLOYMENT.relax_options(), network.content_hash())
    distill(network, storage.load_fixed_points(folder / "fp.h5", network), DistillConfig(epochs=2, lr=3e-3),
            checkpoint_path=folder / "student.h5", fixed_points_hash=stored_content_hash(folder / "fp.h5"), **QUIET)
    for kind in ("standard", "pgd-at"):
        train_baseline(architecture, x, digits.y_train, BaselineConfig(kind=kind, epochs=2, lr=1e-2, eps=0.1,
                                                                        pgd_steps=3),
                       checkpoint_path=folder / f"{kind}.h5", dataset="digits", **QUIET)
    return {"ebm": folder / "ebm.h5", "student": folder / "student.h5", "standard": folder / "standard.h5",
            "pgd-at": folder / "pgd-at.h5", "network": network}


def four_models(files, shape=(1, 8, 8)):
    return [load_model_under_test(files["ebm"], "EBM", shape, student=files["student"]),
            load_model_under_test(files["student"], "distilled", shape),
            load_model_under_test(files["standard"], "standard", shape),
            load_model_under_test(files["pgd-at"], "pgd-at", shape)]


def tiny_config(**changes):
    base = dict(samples=8, square_samples=4, audit_samples=4, pgd_steps=3, pgd_restarts=2, audit_steps=4,
                audit_restarts=2, square_queries=10, autoattack_iterations=2, min_norm_steps=4, corruption_samples=6,
                corruptions=("gaussian_noise", "zoom_blur", "contrast"), severities=(1, 5), batch_size=8,
                sweep_linf=(0.1, 0.4), sweep_l2=(0.5,), as_published=True, as_published_steps=STEPS)
    return RobustnessConfig.for_dataset("digits", **{**base, **changes})


def strip(results):
    return {n: {k: v for k, v in m.items() if k not in ("seconds", "info")} for n, m in results["models"].items()}


# ---------------------------------------------------------------------------------------------- models under test
def test_conv_files_load_as_models_under_test(conv_models, digits):
    """Version-2 feedforward files load (their native (C, H, W) shape by default); the EBM's sources take (B, C, H, W)
    images; the transfer source is the student itself; every model predicts from flattened images."""
    ebm, student, standard, pgd = four_models(conv_models, shape=None)
    assert [m.kind for m in (ebm, student, standard, pgd)] == ["ebm", "distilled", "standard", "pgd-at"]
    for model in (ebm, student, standard, pgd):
        assert model.image_shape == model.native_shape == (1, 8, 8) and model.input_size == 64
    assert isinstance(student.model, LayeredFeedForward)
    assert sorted(ebm.sources) == ["bptt", "implicit", "transfer"] and ebm.deployment == DEPLOYMENT
    x = digits.x_test[:9]
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8))
    np.testing.assert_array_equal(ebm.sources["transfer"](images).argmax(1).numpy(), student.predict(x))
    with torch.no_grad():
        for name in ("bptt", "implicit"):
            np.testing.assert_array_equal(ebm.sources[name](images).argmax(1).numpy(), ebm.predict(x))
    flat = load_model_under_test(conv_models["standard"], "flat", (64,))  # flattened images are accepted too
    np.testing.assert_array_equal(flat.predict(x), standard.predict(x))
    with pytest.raises(ValueError, match=r"takes images \(1, 8, 8\)"):
        load_model_under_test(conv_models["ebm"], "EBM", (8, 8))
    with pytest.raises(ValueError, match=r"takes images \(1, 8, 8\)"):
        load_model_under_test(conv_models["student"], "s", (8, 8))


def test_evaluation_refuses_shapes_that_attacks_or_corruptions_cannot_take(conv_models, digits, tmp_path):
    """Square needs (C, H, W), the corruptions (H, W) or (C, H, W) with C in {1, 3}: refused before any work."""
    model = load_model_under_test(conv_models["standard"], "standard", (64,))
    with pytest.raises(ValueError, match=r"Square \(alone or in AutoAttack\) attacks images \(C, H, W\)"):
        evaluate([model], digits.x_test, digits.y_test, (64,), tiny_config(), tmp_path / "a", **QUIET)
    with pytest.raises(ValueError, match="corruptions need images"):
        evaluate([model], digits.x_test, digits.y_test, (64,), tiny_config(square=False, autoattack=False), tmp_path / "b", **QUIET)
    with pytest.raises(ValueError, match=r"takes images \(1, 8, 8\)"):
        evaluate([model], digits.x_test, digits.y_test, (2, 32), tiny_config(), tmp_path / "c", **QUIET)
    with pytest.raises(ValueError, match=r"test images have shape \(8, 8, 1\) per sample but image_shape is"):
        evaluate([model], digits.x_test.reshape(-1, 8, 8, 1), digits.y_test, (1, 8, 8), tiny_config(), tmp_path,
                 **QUIET)
    three = LayeredNetwork.init("1x8x8, conv 2 k3 p1 maxpool, readout 3", seed=0)
    storage.save_network(tmp_path / "three.h5", three)
    with pytest.raises(ValueError, match="AutoAttack's targeted attacks .* need at least 4"):
        evaluate([load_model_under_test(tmp_path / "three.h5")], digits.x_test, digits.y_test % 3, (1, 8, 8),
                 tiny_config(), tmp_path / "d", **QUIET)
    assert not (tmp_path / "a" / "parts").exists() or not list((tmp_path / "a" / "parts").iterdir())


# ---------------------------------------------------------------------------------------------- as published
def test_as_published_source_is_truncated_bptt_with_the_deployed_value(conv_models, digits):
    model = load_model_under_test(conv_models["ebm"], "EBM", (1, 8, 8))
    model.configure(tiny_config())
    assert sorted(model.sources) == ["bptt", AS_PUBLISHED_SOURCE, "implicit"]
    truncated, full = model.raw_sources[AS_PUBLISHED_SOURCE], model.raw_sources["bptt"]
    assert truncated.attack_steps == STEPS and full.attack_steps is None
    assert model.source_options(AS_PUBLISHED_SOURCE) == {"attack_steps": STEPS} and model.source_options("bptt") == {}
    side = model.side_sources()[AS_PUBLISHED_SOURCE]
    assert side["label"] == f"as published (first {STEPS} unrolled steps)" and side["deployed_steps"] == 12
    x = torch.from_numpy(digits.x_test[:6].reshape(-1, 1, 8, 8))
    grads = []
    for source in (truncated, full):
        images = x.clone().requires_grad_(True)
        logits = source(images)
        grads.append(torch.autograd.grad(logits[:, 0].sum(), images)[0])
        np.testing.assert_array_equal(logits.detach().argmax(1).numpy(), model.predict(digits.x_test[:6]))
    assert not torch.allclose(grads[0], grads[1])  # what truncation changes: the gradient, not the value
    model.configure(tiny_config(as_published=False))  # configuring again removes it
    assert AS_PUBLISHED_SOURCE not in model.sources and AS_PUBLISHED_SOURCE not in model.raw_sources
    # a dense EBM has no truncated attack: refused by name
    dense = Network.init((64, 8, 10), seed=0)
    path = conv_models["ebm"].parent / "dense.h5"
    storage.save_network(path, dense)
    with pytest.raises(ValueError, match="exists for layered"):
        load_model_under_test(path, "dense", (1, 8, 8)).configure(tiny_config())


def test_checkpoint_rule_and_same_gradient(conv_models, digits):
    config = RobustnessConfig()
    assert config.checkpoint_steps == "auto" and config.as_published_steps == 29 and not config.as_published
    assert config.checkpoint_for(CHECKPOINT_ABOVE) is None
    assert config.checkpoint_for(CHECKPOINT_ABOVE + 1) == CHECKPOINT_PIECE == 10
    assert RobustnessConfig(checkpoint_steps=None).checkpoint_for(1000) is None
    assert RobustnessConfig(checkpoint_steps="none").checkpoint_steps is None
    assert RobustnessConfig(checkpoint_steps=4).checkpoint_for(5) == 4
    for bad, field in ((0, "checkpoint_steps"), ("sometimes", "checkpoint_steps"), (True, "checkpoint_steps")):
        with pytest.raises(ValueError, match=field):
            RobustnessConfig(**{field: bad})
    with pytest.raises(ValueError, match="as_published_steps"):
        RobustnessConfig(as_published_steps=0)
    with pytest.raises(ValueError, match="as_published must be True or False"):
        RobustnessConfig(as_published="yes")
    long = Deployment(method="fixed_point", tol=0.0, max_steps=CHECKPOINT_ABOVE + 10)
    model = load_model_under_test(conv_models["ebm"], "EBM", (1, 8, 8), deployment=long)
    model.configure(tiny_config(checkpoint_steps="auto"))  # bptt: 60 steps, checkpointed; truncated: 3, plain
    assert model.raw_sources["bptt"].checkpoint_steps == CHECKPOINT_PIECE
    assert model.raw_sources[AS_PUBLISHED_SOURCE].checkpoint_steps is None
    assert model.describe()["checkpoint_steps"] == {"bptt": CHECKPOINT_PIECE}
    x = torch.from_numpy(digits.x_test[:3].reshape(-1, 1, 8, 8))
    grads = []
    for chunk in (CHECKPOINT_PIECE, None):
        model.raw_sources["bptt"].checkpoint_steps = chunk
        images = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(model.raw_sources["bptt"](images)[:, 1].sum(), images)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_audit_fails_a_side_source_stronger_than_the_worst_case():
    entry = {"accuracy": 0.6, "ci95": [0.5, 0.7], "n": 100, "budget": {}}
    result = {"sweeps": {"linf": [{"eps": 0.0, "accuracy": 0.9, "pgd": 0.9}, {"eps": 0.3, "accuracy": 0.0,
                                                                             "pgd": 0.0}],
                         "l2": [{"eps": 0.0, "accuracy": 0.9, "pgd": 0.9}]},
              "comparisons": {}, "gradients": {}, "attacks": {"pgd_linf": entry},
              "side_sources": {AS_PUBLISHED_SOURCE: {"label": "as published (first 29 unrolled steps)",
                                                     "attacks": {"pgd_linf": {**entry, "accuracy": 0.59}}}}}
    assert run_audit(result, RobustnessConfig())["passed"]  # within the tolerance
    result["side_sources"][AS_PUBLISHED_SOURCE]["attacks"]["pgd_linf"]["accuracy"] = 0.3
    audit = run_audit(result, RobustnessConfig())
    assert audit["failed"] == [f"{AS_PUBLISHED_SOURCE}_not_stronger_than_worst_case"]
    assert "STRONGER in PGD-Linf" in audit["verdict"]


# ---------------------------------------------------------------------------------------------- end to end
def test_evaluation_of_the_four_conv_models_reports_as_published(conv_models, digits, tmp_path, monkeypatch):
    """Every attack (AutoAttack reduced), the sweeps, corruptions and the audit on the four conv models; the truncated
    source in its own rows beside full BPTT, outside the headline worst case."""
    config, out, shape = tiny_config(), tmp_path / "eval", digits.channels_first_shape
    results = evaluate(four_models(conv_models), digits.x_test, digits.y_test, shape, config, out, dataset="digits",
                       **QUIET)
    ebm = results["models"]["EBM"]
    assert set(ebm["attacks"]) == {"fgsm", "pgd_linf", "pgd_l2", "autoattack", "autoattack_l2", "square"}
    for column, entry in ebm["attacks"].items():  # the headline worst case is over the protocol's sources only
        assert AS_PUBLISHED_SOURCE not in entry["per_source"]
        if column != "square":  # (AutoAttack's Square: once, on the deployed model)
            black_box = {"black-box"} if column in ("autoattack", "autoattack_l2", "pgd_l2") else set()
            assert set(entry["per_source"]) == {"bptt", "implicit", "transfer"} | black_box
    side = ebm["side_sources"][AS_PUBLISHED_SOURCE]
    assert side["label"] == f"as published (first {STEPS} unrolled steps)" and side["paired_with"] == "bptt"
    assert set(side["attacks"]) == set(side["paired"]) == {"fgsm", "pgd_linf", "pgd_l2", "autoattack",
                                                           "autoattack_l2"}
    for column, entry in side["paired"].items():  # full BPTT alone is the bptt source of the worst case
        assert entry["accuracy"] == ebm["attacks"][column]["per_source"]["bptt"]["accuracy"]
        assert entry["n"] == side["attacks"][column]["n"] == config.samples
    assert [p["eps"] for p in side["sweeps"]["linf"]] == [0.1, 0.4]
    assert f"{AS_PUBLISHED_SOURCE}_not_stronger_than_worst_case" in [c["name"] for c in ebm["audit"]["checks"]]
    assert ebm["gradients"][AS_PUBLISHED_SOURCE]["nan_fraction"] == 0
    assert ebm["info"]["side_sources"][AS_PUBLISHED_SOURCE]["attack_steps"] == STEPS
    assert ebm["attacks"]["autoattack"]["budgets"]["autoattack"]["version"] == "standard, reduced budget"
    for name in ("distilled", "standard", "pgd-at"):
        r = results["models"][name]
        assert "side_sources" not in r and set(r["attacks"]["pgd_linf"]["per_source"]) == {"backprop"}
        assert r["sweeps"]["linf"][-1]["eps"] == 0.4 and r["min_norm"]["linf"]["n"] == config.samples
    for r in results["models"].values():
        assert set(r["corruptions"]["per_corruption"]) == {"gaussian_noise", "zoom_blur", "contrast"}
        assert r["corruptions"]["n"] == config.corruption_samples and r["audit"]["checks"]
    rows = {row["model"]: row for row in results["table"]}
    assert set(rows) == {"EBM", "distilled", "standard", "pgd-at"}
    assert rows["EBM"]["side_sources"][AS_PUBLISHED_SOURCE]["pgd_linf"] == side["attacks"]["pgd_linf"]["accuracy"]
    table = (out / "table.md").read_text()
    assert f"| EBM: as published (first {STEPS} unrolled steps) ({AS_PUBLISHED_SOURCE}) |" in table
    assert "| EBM: full BPTT alone (bptt) |" in table and "not in the worst case" in table
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["as_published"] is True and stored["config"]["as_published_steps"] == STEPS
    for name in ("sweeps.png", "corruptions.png"):
        assert (out / name).stat().st_size > 0
    # run again, with the images as (N, C, H, W) (the pipeline's layout): everything is found in the parts
    monkeypatch.setattr(evaluation, "run_attack", lambda *a, **k: pytest.fail("resumed work ran again"))
    again = evaluate(four_models(conv_models), digits.x_test.reshape((-1,) + shape), digits.y_test, shape, config,
                     out, dataset="digits", **QUIET)
    assert strip(again) == strip(results)


def test_interrupted_conv_evaluation_resumes_to_the_same_results(conv_models, digits, tmp_path, monkeypatch):
    config, out, shape = tiny_config(autoattack=False), tmp_path / "eval", digits.channels_first_shape
    real_run_attack, calls = evaluation.run_attack, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 30:
            raise KeyboardInterrupt
        return real_run_attack(*args, **kwargs)
    monkeypatch.setattr(evaluation, "run_attack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(four_models(conv_models), digits.x_test, digits.y_test, shape, config, out, dataset="digits",
                 **QUIET)
    assert len(list((out / "parts").glob("*.json"))) >= 30 and not (out / "results.json").exists()
    monkeypatch.setattr(evaluation, "run_attack", real_run_attack)
    results = evaluate(four_models(conv_models), digits.x_test, digits.y_test, shape, config, out, dataset="digits",
                       **QUIET)
    fresh = evaluate(four_models(conv_models), digits.x_test, digits.y_test, shape, config, tmp_path / "fresh",
                     dataset="digits", **QUIET)
    assert strip(results) == strip(fresh) and AS_PUBLISHED_SOURCE in results["models"]["EBM"]["side_sources"]


def test_as_published_parts_are_keyed_by_k_and_paired_with_full_bptt(conv_models):
    """The truncated source's parts record K; its random draws are those of full BPTT (a paired comparison); the
    audit's stronger PGD is not run for it."""
    config = tiny_config()
    model = four_models(conv_models)[0]
    model.configure(config)
    tasks = evaluation.plan(model, config)
    task = next(t for t in tasks if t.source == AS_PUBLISHED_SOURCE and t.group == "fgsm")
    chunk = np.arange(6)
    key = evaluation.part_key(task, model, chunk, "data", config)
    assert key["source_options"] == {"attack_steps": STEPS}
    bptt_key = evaluation.part_key(evaluation.Task("EBM", "attack", "fgsm", "samples", task.spec, "bptt"), model,
                                   chunk, "data", config)
    assert "source_options" not in bptt_key and evaluation.part_seed(key) == evaluation.part_seed(bptt_key)
    assert not [t for t in tasks if t.source == AS_PUBLISHED_SOURCE and t.group == "pgd-audit"]
    assert [t for t in tasks if t.source == "bptt" and t.group == "pgd-audit"]
    other = evaluation.part_key(task, four_models(conv_models)[0], chunk, "data", config)  # not configured: no K
    assert "source_options" not in other


def test_three_channel_conv_ebm_attacks_and_all_corruptions(tmp_path):
    """A 3x8x8 conv EBM (untrained) on synthetic images: Square and AutoAttack on (B, 3, H, W), the 15 corruptions
    on RGB images."""
    # readout 10: AutoAttack's targeted attacks need at least 4 classes
    network = LayeredNetwork.init("3x8x8, conv 4 k3 p1 avgpool, readout 10", seed=1, gain=2.0)
    storage.save_network(tmp_path / "rgb.h5", network,
                         extra_attrs={"deployment": Deployment(tol=1e-4, max_steps=8).as_dict()})
    rng = np.random.default_rng(0)
    x = rng.random((30, 3 * 64)).astype(np.float32)
    model = load_model_under_test(tmp_path / "rgb.h5", "rgb")
    assert model.image_shape == (3, 8, 8)
    y = model.predict(x)  # labels the EBM gets right: every attack has work to do
    config = RobustnessConfig(eps_linf=0.1, eps_l2=0.5, sweep_linf=(0.1,), sweep_l2=(0.5,), samples=6,
                              square_samples=4, audit_samples=3, pgd_steps=2, audit_steps=2, audit_restarts=1,
                              square_queries=5, autoattack_iterations=2, min_norm_steps=2, corruption_samples=4,
                              severities=(3,), batch_size=6)
    results = evaluate([model], x, y, (3, 8, 8), config, tmp_path / "out", **QUIET)
    r = results["models"]["rgb"]
    assert r["clean"]["accuracy"] == 1.0 and {"square", "autoattack"} <= set(r["attacks"])
    assert len(r["corruptions"]["per_corruption"]) == 15 and "side_sources" not in r
