"""The integrator registry (ebm_sim.integrators): every record is honoured by every backend it names, a backend it
does not name refuses the method before any work with a message listing the ones it has, dt rules are the record's,
and the one Dormand-Prince tableau is consistent."""
import numpy as np
import pytest

from ebm_sim import integrators, torch_twin
from ebm_sim.integrators import DORMAND_PRINCE, INTEGRATORS
from ebm_sim.model import LayeredNetwork
from ebm_sim.model import energy as model_energy
from ebm_sim.model.dynamics import relax as layered_relax
from ebm_sim.network import Network
from ebm_sim.relax import RelaxSettings, relax


def dense_case():
    net = Network.init((5, 4, 3), seed=0, dtype=np.float64, gain=0.5)
    x = np.random.default_rng(0).random((2, 5))
    return net, x


def layered_case():
    net = LayeredNetwork.init("1x6x6, conv 2 k3 p1 maxpool, 4", seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((2, 1, 6, 6))
    return net, x


def dense_relax(method, backend):
    net, x = dense_case()
    if backend == "torch":
        result = torch_twin.relax(net, x, method, tol=1e-6, max_steps=500)
        return [s.numpy() for s in result.states]
    return relax(net, x, method, tol=1e-6, max_steps=500, backend=backend).states


def layered_relax_on(method, backend):
    net, x = layered_case()
    params = model_energy.parameters(net, backend)
    if backend == "torch":
        import torch
        x = torch.tensor(x)
    result = layered_relax(net, x, method, tol=1e-6, max_steps=500, params=params)
    return [np.asarray(s) for s in result.states]


RUNNERS = {"dense": dense_relax, "layered": layered_relax_on}
BACKENDS = {"dense": ("numba", "numpy", "torch"), "layered": ("numpy", "torch", "numba")}


@pytest.mark.parametrize("kind", ["dense", "layered"])
def test_every_backend_a_record_names_runs_the_method_and_reaches_the_same_fixed_point(kind):
    reference = None
    for name, record in INTEGRATORS.items():
        for backend in record.backends[kind]:
            states = RUNNERS[kind](name, backend)
            if reference is None:
                reference = states
            for got, want in zip(states, reference):
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{kind} {name} on {backend}")


@pytest.mark.parametrize("kind", ["dense", "layered"])
def test_a_backend_the_record_does_not_name_refuses_the_method_naming_the_ones_it_has(kind):
    refused = [(name, backend) for name, record in INTEGRATORS.items() for backend in BACKENDS[kind]
               if backend not in record.backends[kind]]
    assert refused  # rk45 on torch at least
    for name, backend in refused:
        if kind == "dense" and backend != "torch":
            continue  # the dense relax runs every method on numba or numpy
        with pytest.raises(ValueError, match=f"relaxes with .*not '{name}'") as error:
            RUNNERS[kind](name, backend)
        for allowed in integrators.methods(kind, backend):
            assert allowed in str(error.value)


def test_dt_rules_come_from_the_record():
    assert RelaxSettings(method="euler").dt == INTEGRATORS["euler"].default_dt
    assert RelaxSettings(method="rk45").dt == INTEGRATORS["rk45"].default_dt
    with pytest.raises(ValueError, match="fixed-point iteration"):
        RelaxSettings(method="alternating", dt=0.5)
    with pytest.raises(ValueError, match="overshoots"):
        RelaxSettings(method="euler", dt=1.5)
    with pytest.raises(ValueError, match="unknown method 'heun'; choose one of fixed_point, euler, alternating"):
        RelaxSettings(method="heun")
    net, x = dense_case()
    with pytest.raises(ValueError, match="fixed-point iteration"):
        torch_twin.relax(net, x, "fixed_point", dt=0.5)
    lnet, lx = layered_case()
    with pytest.raises(ValueError, match="fixed-point iteration"):
        layered_relax(lnet, lx, "alternating", dt=0.5)


def test_alternating_records_update_two_groups_the_others_one():
    for name, record in INTEGRATORS.items():
        groups = record.update_groups(5)
        assert sorted(sum(groups, [])) == list(range(5))
        assert groups == ([[0, 2, 4], [1, 3]] if name == "alternating" else [[0, 1, 2, 3, 4]])


def test_dormand_prince_tableau_is_consistent():
    tableau = DORMAND_PRINCE
    np.testing.assert_allclose(tableau.a.sum(axis=1), tableau.c, atol=1e-14)  # row sums are the nodes
    np.testing.assert_allclose(tableau.a[-1], tableau.b[:-1], atol=0)  # first same as last
    assert tableau.b.sum() == pytest.approx(1.0, abs=1e-14)
    assert tableau.e.sum() == pytest.approx(0.0, abs=1e-14)  # both solutions are consistent
    embedded = tableau.b - tableau.e  # the fourth-order weights (Dormand & Prince 1980)
    np.testing.assert_allclose(embedded, [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
                                          1 / 40], atol=1e-15)
