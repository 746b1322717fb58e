"""One Deployment value: validated once, stored with a trained network, read by relax, the Torch twin, the attacks'
models, the Lava mapper and the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ebm_sim import storage, torch_twin
from ebm_sim.datasets import load_digits
from ebm_sim.deployment import Deployment
from ebm_sim.network import Network
from ebm_sim.relax import relax
from ebm_sim.training import TrainConfig, fit


@pytest.fixture(scope="module")
def problem():
    network = Network.init((12, 16, 8, 5), seed=0, dtype=np.float64, gain=1.2)
    x = np.random.default_rng(1).random((9, 12))
    return network, x


@pytest.mark.parametrize("values, message", [
    (dict(method="heun"), "deployment method must be one of fixed_point, euler, alternating, rk45"),
    (dict(method="solve_ivp"), "deployment method must be one of"),  # the slow reference is not a deployment
    (dict(method="euler", dt=1.5), "overshoots"),
    (dict(method="alternating", dt=0.5), "fixed-point iteration"),
    (dict(tol=-1e-3), "tol must be a finite number >= 0"),
    (dict(tol=float("nan")), "tol must be a finite number >= 0"),
    (dict(method="rk45", tol=0.0), "tol must be > 0 for the adaptive method"),
    (dict(max_steps=0), "max_steps must be an integer >= 1"),
    (dict(max_steps=2.5), "max_steps must be an integer >= 1"),
    (dict(initial_state="random"), "initial_state must be one of zeros"),
])
def test_bad_values_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        Deployment(**values)


def test_round_trip_and_unknown_keys():
    d = Deployment(method="euler", dt=0.25, tol=1e-3, max_steps=40)
    assert Deployment.from_dict(d.as_dict()) == d
    assert d.step == 0.25 and Deployment().step == 1.0 and Deployment(method="euler").step == 0.5
    with pytest.raises(ValueError, match="unknown key.*steps"):
        Deployment.from_dict({"method": "euler", "steps": 3})


@pytest.mark.parametrize("method, dt", [("fixed_point", None), ("euler", 0.5), ("alternating", None)])
def test_relax_and_the_twin_take_the_deployment(problem, method, dt):
    network, x = problem
    d = Deployment(method=method, dt=dt, tol=1e-6, max_steps=25)
    explicit = relax(network, x, method=method, dt=dt, tol=1e-6, max_steps=25)
    deployed = relax(network, x, deployment=d)
    for a, b in zip(explicit.states, deployed.states):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(explicit.steps, deployed.steps)
    twin = torch_twin.relax(network, x, deployment=d)
    np.testing.assert_array_equal(twin.steps.numpy(), deployed.steps)
    for a, b in zip(twin.states, deployed.states):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-12)
    classifier = torch_twin.EBMClassifier(network, deployment=d)
    assert classifier.deployment == d
    with torch.no_grad():
        np.testing.assert_allclose(classifier(torch.from_numpy(x)).numpy(), deployed.states[-1], atol=1e-12)


def test_a_deployment_and_its_fields_together_are_ambiguous(problem):
    network, x = problem
    with pytest.raises(ValueError, match="pass either a deployment or method, max_steps, not both"):
        relax(network, x, method="euler", max_steps=5, deployment=Deployment())
    with pytest.raises(ValueError, match="pass either a deployment or tol"):
        torch_twin.relax(network, x, tol=0.0, deployment=Deployment())
    with pytest.raises(ValueError, match="must be an ebm_sim.deployment.Deployment"):
        relax(network, x, deployment={"method": "euler"})
    with pytest.raises(ValueError, match="the Torch twin relaxes with"):
        torch_twin.EBMClassifier(network, deployment=Deployment(method="rk45", dt=0.1))


def test_training_stores_the_deployment_and_old_files_still_tell_it(tmp_path):
    data = load_digits()
    config = TrainConfig(epochs=1, batch_size=32, method="euler", dt=0.5, tol=1e-3, free_steps=12, nudged_steps=4)
    path = tmp_path / "net.h5"
    fit(Network.init((64, 16, 10), seed=0), data.x_train[:64], data.y_train[:64], data.x_test[:32],
        data.y_test[:32], config, checkpoint_path=path, progress=False, log=lambda *_: None)
    expected = Deployment(method="euler", dt=0.5, tol=1e-3, max_steps=12)
    assert storage.artifact_info(path)["summary"]["extra"]["deployment"] == expected.as_dict()
    assert Deployment.of_network_file(path) == expected
    # a file written before the deployment was stored: the training configuration's free phase
    assert Deployment.of_extra({"config": config.as_dict()}) == expected
    # an untrained network: the defaults
    untrained = tmp_path / "untrained.h5"
    storage.save_network(untrained, Network.init((4, 3), seed=0))
    assert Deployment.of_network_file(untrained) == Deployment()


def test_the_lava_mapper_reads_the_deployment(problem, tmp_path):
    from hardware import mapping
    from hardware.evaluate import program_from_file
    network = Network.init((12, 16, 5), seed=0, dtype=np.float64)
    d = Deployment(method="euler", dt=0.5, tol=1e-3, max_steps=12)
    program = mapping.to_program(network, "float", deployment=d)
    assert (program.dt, program.steps, program.tol) == (0.5, 12, 1e-3)
    assert mapping.to_program(network, "float", deployment=d, steps=7).steps == 7  # an explicit option wins
    with pytest.raises(ValueError, match="deployed with 'alternating'.*synchronous Euler"):
        mapping.relaxation_of(Deployment(method="alternating"))
    path = tmp_path / "euler.h5"
    storage.save_network(path, network, extra_attrs={"deployment": d.as_dict()})
    program, _ = program_from_file(path, "float")
    assert (program.dt, program.steps, program.tol) == (0.5, 12, 1e-3)


def test_layered_networks_take_the_deployment():
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.model.dynamics import relax as relax_layered
    net = LayeredNetwork.init("2x6x6, conv 3 k3 p1 maxpool, 5", seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((4, 2, 6, 6))
    d = Deployment(method="euler", dt=0.5, tol=1e-6, max_steps=40)
    a, b = relax_layered(net, x, deployment=d), relax_layered(net, x, "euler", 1e-6, 40, 0.5)
    np.testing.assert_array_equal(a.steps, b.steps)
    for s, t in zip(a.states, b.states):
        np.testing.assert_array_equal(s, t)
    with pytest.raises(ValueError, match="pass either a deployment or max_steps"):
        relax_layered(net, x, max_steps=3, deployment=d)
