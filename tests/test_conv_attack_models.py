"""Attack models of layered (convolutional) EBMs (ebm_sim/model/classifier.py): the deployed relaxation's logits with
gradients by BPTT (full, truncated to the first K steps, checkpointed) and by implicit differentiation at the fixed
point, on small conv networks in float64."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ebm_sim.deployment import Deployment  # noqa: E402
from ebm_sim.model import LayeredNetwork, dynamics, energy  # noqa: E402
from ebm_sim.model.classifier import LayeredEBMClassifier, LayeredImplicitEBM  # noqa: E402
from ebm_sim.network import Network  # noqa: E402

ARCHS = {
    "maxpool-readout": "1x8x8, conv 4 k3 p1 maxpool, readout 3",
    "avgpool-readout": "1x8x8, conv 4 k3 p1 avgpool, readout 3",
    "two-convs": "1x8x8, conv 4 k3 p1 avgpool, conv 5 k3 p1 maxpool, readout 3",
    "squared-error": "1x8x8, conv 4 k3 p1 maxpool, 3",
}
NORMALIZATION = {"mean": [0.4], "std": [0.6]}


def network(name: str, gain: float = 0.8, seed: int = 1) -> LayeredNetwork:
    return LayeredNetwork.init(ARCHS[name], seed=seed, dtype=np.float64, gain=gain, normalization=NORMALIZATION)


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def input_gradient(model, x, weights=None) -> torch.Tensor:
    """d/dx of sum(logits * weights) (fixed random weights: every logit counts)."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    weights = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype).reshape(logits.shape) \
        if weights is None else weights
    (grad,) = torch.autograd.grad((logits * weights).sum(), x)
    return grad


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("logits", ["state", "field", "update"])
def test_logits_are_the_deployed_relaxations(name, logits):
    net, x = network(name), images()
    d = Deployment(method="alternating", tol=1e-5, max_steps=25)
    got = LayeredEBMClassifier(net, deployment=d, logits=logits)(x)
    params = energy.parameters(net, "torch")
    with torch.no_grad():
        relaxed = dynamics.relax(net, x, params=params, deployment=d)
        if net.cost.kind != "squared_error" or logits == "state":
            want = energy.output(net, relaxed.states, params)
        elif logits == "update":
            want = relaxed.output_update.reshape(len(x), -1)
        else:
            last = net.num_layers - 1
            h = energy.local_fields(net, net.normalize(x), relaxed.states, params=params, layers=[last])[last]
            want = net.slope * h.reshape(len(x), -1)
    assert got.shape == (len(x), net.num_classes)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    implicit = LayeredImplicitEBM(net, deployment=d, logits=logits)
    torch.testing.assert_close(implicit(x.clone().requires_grad_(True)).detach(), want, rtol=0, atol=1e-12)


def test_flattened_images_give_the_same_logits():
    net, x = network("maxpool-readout"), images()
    model = LayeredEBMClassifier(net, max_steps=10)
    torch.testing.assert_close(model(x.reshape(len(x), -1)), model(x))


@pytest.mark.parametrize("method", ["fixed_point", "euler", "alternating"])
def test_bptt_input_gradient_matches_finite_differences(method):
    net, x = network("two-convs"), images(batch=2)
    model = LayeredEBMClassifier(net, deployment=Deployment(method=method, tol=0.0, max_steps=8))
    grad = input_gradient(model, x)
    weights = torch.linspace(-1.0, 1.0, 2 * 3, dtype=torch.float64).reshape(2, 3)
    rng = np.random.default_rng(3)
    eps = 1e-6
    for flat in rng.choice(x.numel(), size=12, replace=False):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[flat] = eps
        step = step.reshape(x.shape)
        with torch.no_grad():
            difference = ((model(x + step) - model(x - step)) * weights).sum() / (2 * eps)
        assert abs(float(difference) - float(grad.reshape(-1)[flat])) <= 1e-6 * max(1.0, float(grad.abs().max()))


@pytest.mark.parametrize("name", ["two-convs", "squared-error"])
def test_truncated_gradient_is_the_k_step_relaxations_and_the_value_the_full_ones(name):
    net, x = network(name), images()
    logits = "update" if name == "squared-error" else "state"
    d = Deployment(method="fixed_point", tol=1e-7, max_steps=20)
    k = 3
    full = LayeredEBMClassifier(net, deployment=d, logits=logits)
    truncated = LayeredEBMClassifier(net, deployment=d, logits=logits, attack_steps=k)
    k_steps = LayeredEBMClassifier(net, deployment=Deployment(method="fixed_point", tol=1e-7, max_steps=k),
                                   logits=logits)
    torch.testing.assert_close(truncated(x.clone().requires_grad_(True)).detach(), full(x).detach(), rtol=0,
                               atol=1e-12)
    assert int(truncated.last_progress.steps.max()) > k  # the forward ran past the K steps
    got, want = input_gradient(truncated, x), input_gradient(k_steps, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - input_gradient(full, x)).abs().max() > 1e-6  # truncation changes the gradient here


@pytest.mark.parametrize("k", [20, 50])
def test_attack_steps_at_or_past_the_step_cap_is_full_bptt(k):
    net, x = network("two-convs"), images()
    d = Deployment(method="fixed_point", tol=1e-7, max_steps=20)
    full = LayeredEBMClassifier(net, deployment=d)
    truncated = LayeredEBMClassifier(net, deployment=d, attack_steps=k)
    torch.testing.assert_close(input_gradient(truncated, x), input_gradient(full, x), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("attack_steps", [None, 5])
def test_checkpointing_gives_the_plain_bptt_values_and_gradients(chunk, attack_steps):
    """tol > 0: samples stop at different steps, so later pieces relax a subset of the batch."""
    net, x = network("two-convs"), images(batch=5)
    d = Deployment(method="alternating", tol=1e-6, max_steps=30)
    plain = LayeredEBMClassifier(net, deployment=d, attack_steps=attack_steps)
    pieces = LayeredEBMClassifier(net, deployment=d, attack_steps=attack_steps, checkpoint_steps=chunk)
    torch.testing.assert_close(pieces(x.clone().requires_grad_(True)).detach(), plain(x).detach(), rtol=0,
                               atol=1e-12)
    steps = plain.last_progress.steps
    assert len(set(steps.tolist())) > 1, "the samples should stop at different steps here"
    torch.testing.assert_close(pieces.last_progress.steps, steps)
    torch.testing.assert_close(input_gradient(pieces, x), input_gradient(plain, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["maxpool-readout", "two-convs", "squared-error"])
def test_implicit_gradient_equals_bptt_at_a_converged_fixed_point(name):
    """Relaxed to residual < 1e-13 and the adjoint to 1e-13 relative change: the implicit gradient (of the exact
    fixed point) and BPTT's (of the relaxation) agree to 1e-8 relative to the largest entry."""
    net, x = network(name), images()
    logits = "update" if name == "squared-error" else "state"
    d = Deployment(method="fixed_point", tol=1e-13, max_steps=400)
    bptt = LayeredEBMClassifier(net, deployment=d, logits=logits)
    implicit = LayeredImplicitEBM(net, deployment=d, logits=logits, adjoint_tol=1e-13, adjoint_max_steps=400)
    want = input_gradient(bptt, x)
    got = input_gradient(implicit, x)
    assert bool(bptt.last_progress.residual.lt(1e-13).all())
    assert implicit.last_adjoint_converged == 1.0
    assert float((got - want).abs().max()) <= 1e-8 * float(want.abs().max())
    assert float(want.abs().max()) > 1e-6


def test_implicit_without_input_gradient_returns_the_deployed_logits():
    net, x = network("two-convs"), images()
    implicit = LayeredImplicitEBM(net, max_steps=15)
    with torch.no_grad():
        value = implicit(x)
    torch.testing.assert_close(implicit(x.clone().requires_grad_(True)).detach(), value)


@pytest.mark.parametrize("bad, message", [
    (lambda net: LayeredEBMClassifier(net, attack_steps=0)(images()), "attack_steps"),
    (lambda net: LayeredEBMClassifier(net, attack_steps=2.5)(images()), "attack_steps"),
    (lambda net: LayeredEBMClassifier(net, checkpoint_steps=0)(images()), "checkpoint_steps"),
    (lambda net: LayeredEBMClassifier(net, logits="energy"), "logits"),
    (lambda net: LayeredEBMClassifier(net, method="rk45"), "rk45"),
    (lambda net: LayeredEBMClassifier(net, max_steps=5, deployment=Deployment()), "not both"),
    (lambda net: LayeredEBMClassifier(net)(torch.rand(2, 1, 7, 8, dtype=torch.float64)), "input layer"),
    (lambda net: LayeredEBMClassifier(net)(torch.rand(8, dtype=torch.float64)), "images"),
    (lambda net: LayeredImplicitEBM(net)(torch.rand(2, 3, 8, 8, dtype=torch.float64)), "input layer"),
    (lambda net: LayeredImplicitEBM(net, adjoint_max_steps=0), "adjoint_max_steps"),
    (lambda net: LayeredEBMClassifier(Network.init([64, 5, 3])), "LayeredNetwork"),
])
def test_bad_arguments_raise_value_errors_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        bad(network("maxpool-readout"))


@pytest.mark.parametrize("name", ["two-convs", "squared-error"])
def test_a_layered_network_file_is_a_model_under_test(name, tmp_path):
    """distill.robustness.models: a LayeredNetwork file is deployed with ebm_sim.model.dynamics (Numba backend) at
    its stored deployment and attacked through LayeredEBMClassifier / LayeredImplicitEBM, whose logits decide as
    the deployed model does."""
    from distill.robustness.models import load_model_under_test
    from ebm_sim import storage

    net = network(name).astype(np.float32)
    d = Deployment(method="alternating", tol=1e-4, max_steps=20)
    path = tmp_path / "conv.h5"
    storage.save_network(path, net, extra_attrs={"deployment": d.as_dict()})
    model = load_model_under_test(path)
    assert model.deployment == d and model.image_shape == net.input_shape and model.input_size == 64
    x = images(batch=6).float()
    flat = x.reshape(len(x), -1).numpy()
    deployed = model.predict(flat)
    params = energy.parameters(net, "torch")
    with torch.no_grad():
        relaxed = dynamics.relax(net, x, params=params, deployment=d)
        np.testing.assert_array_equal(deployed, energy.output(net, relaxed.states, params).argmax(1).numpy())
    assert model.logits(flat).argmax(1).tolist() == deployed.tolist()
    stats = model.relaxation_stats(flat)
    np.testing.assert_array_equal(stats["steps"], relaxed.steps.numpy())
    for source in ("bptt", "implicit"):
        batch = x.clone().requires_grad_(True)
        logits = model.sources[source](batch)
        assert logits.argmax(1).tolist() == deployed.tolist()
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), batch)
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
