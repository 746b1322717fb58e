"""The numba backend of the interactions (ebm_sim.model.numba_ops) against the numpy reference: fields, ``forward()``
and the routed pre field against the separate calls, parameter gradients, energies, relaxed states and per-sample
steps, in float64 (to ~1e-10) and float32 (to ~1e-5), on test_model's cases and on single convolutions of every
geometry (stride 2 and 3, padding, odd sizes whose trailing row/column pooling drops, max-pool ties)."""
import numpy as np
import pytest
from test_model import CASES, binary, case

from ebm_sim.model import Conv2d, implementation
from ebm_sim.model import energy as E
from ebm_sim.model.dynamics import relax
from ebm_sim.model.ep import ep_gradient

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}


def as_dtype(dtype, net, *arrays):
    """The network and arrays (or lists of arrays) in ``dtype``."""
    cast = [[a.astype(dtype) for a in x] if isinstance(x, list) else x.astype(dtype) for x in arrays]
    return (net.astype(dtype), *cast)


def close(got, want, dtype):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def fields(impl, i, params, s_pre, s_post):
    """(post field, pre field) from one forward of s_pre, the pre field routed by its routing."""
    post, routing = impl.forward(i, params, s_pre)
    return post, impl.pre_field(i, params, s_pre, s_post, routing)


def check_interaction(i, params, s_pre, s_post, dtype):
    """post_field, pre_field, forward() and parameter_gradient of one binary interaction: numba = numpy, and
    forward()'s post field and the pre field routed by its routing = the two separate calls exactly."""
    numba, numpy = implementation(i.kind, "numba"), implementation(i.kind, "numpy")
    post, pre = numba.post_field(i, params, s_pre), numba.pre_field(i, params, s_pre, s_post)
    close(post, numpy.post_field(i, params, s_pre), dtype)
    close(pre, numpy.pre_field(i, params, s_pre, s_post), dtype)
    if hasattr(numba, "forward"):
        both = fields(numba, i, params, s_pre, s_post)
        np.testing.assert_array_equal(both[0], post)
        np.testing.assert_array_equal(both[1], pre)
    want = numpy.parameter_gradient(i, params, s_pre, s_post)
    for key, value in numba.parameter_gradient(i, params, s_pre, s_post).items():
        close(value, want[key], dtype)


# ------------------------------------------------------------------------------------------ test_model's networks
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_numba_matches_numpy_fields_energy_and_gradients(name, dtype):
    net, x, states, target = as_dtype(dtype, *case(name))
    params = E.parameters(net, "numba")
    assert params.backend == "numba" and params.interactions[0] is net.interactions[0].params
    every = [x] + states
    for i in binary(net):
        check_interaction(i, i.params, every[i.pre], every[i.post], dtype)
    for beta in (0.0, 0.6):
        for got, want in zip(E.local_fields(net, x, states, beta, target, params),
                             E.local_fields(net, x, states, beta, target)):
            close(got, want, dtype)
        clamped = E.clamped_fields(net, x, params)
        for got, want in zip(E.local_fields(net, x, states, beta, target, params, clamped=clamped),
                             E.local_fields(net, x, states, beta, target)):
            close(got, want, dtype)
        np.testing.assert_allclose(E.energy(net, x, states, beta, target, params),
                                   E.energy(net, x, states, beta, target), rtol=TOLERANCE[dtype])
    for got, want in zip(E.parameter_gradient(net, x, states, params), E.parameter_gradient(net, x, states)):
        for key in want:
            close(got[key], want[key], dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["euler", "fixed_point", "alternating"])
def test_numba_relaxation_matches_numpy_states_and_per_sample_steps(method, dtype):
    tol = 1e-7 if dtype == np.float64 else 1e-4
    for name in sorted(CASES):
        net, x, _, _ = case(name, batch=5, gain=0.8)
        net, x = as_dtype(dtype, net, x)
        want = relax(net, x, method, tol=tol, max_steps=200)
        got = relax(net, x, method, tol=tol, max_steps=200, params=E.parameters(net, "numba"))
        assert want.converged.all() and want.steps.min() > 1, name
        np.testing.assert_array_equal(got.steps, want.steps, err_msg=name)
        for g, w in zip(got.states, want.states):
            np.testing.assert_allclose(g, w, rtol=0, atol=TOLERANCE[dtype], err_msg=name)
        np.testing.assert_array_equal(np.clip(got.output_update, 0, 1), got.states[-1])


def test_numba_ep_gradient_matches_numpy():
    net, x, _, target = case("maxpool+avgpool", seed=2, batch=4, gain=0.6)
    want = ep_gradient(net, x, target, beta=0.1, free_steps=40, nudged_steps=10)
    got = ep_gradient(net, x, target, beta=0.1, free_steps=40, nudged_steps=10, params=E.parameters(net, "numba"))
    for g, w in zip(got.interactions + [got.cost], want.interactions + [want.cost]):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------ single convolutions
GEOMETRIES = [  # kernel, stride, padding, pool, input (C, H, W)
    (3, 2, 1, "max", (2, 11, 9)),   # conv 6x5: the odd column is dropped
    (3, 2, 2, "avg", (3, 3, 2)),    # conv 3x2: the odd row is dropped; (W + 2P - k) mod S = 1 (a skipped column)
    (2, 2, 0, None, (2, 9, 9)),     # stride 2 skips the last row and column
    (3, 3, 1, "max", (1, 13, 10)),  # stride 3, conv 5x4
    (4, 1, 2, "avg", (2, 7, 6)),    # even kernel, large padding
    (1, 1, 0, "max", (3, 5, 7)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}{g[3]}{'x'.join(map(str, g[4]))}")
def test_numba_conv_matches_numpy_for_every_geometry(geometry, dtype):
    kernel, stride, padding, pool, shape = geometry
    i = Conv2d(0, 1, kernel=kernel, stride=stride, padding=padding, pool=pool)
    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    post_shape = i.output_shape(shape, 4)
    i.init_params(rng, shape, post_shape, dtype)
    s_pre = rng.standard_normal((3,) + shape).astype(dtype)
    s_post = rng.standard_normal((3,) + post_shape).astype(dtype)
    check_interaction(i, i.params, s_pre, s_post, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_ties_route_to_the_first_maximum(dtype):
    """Ties (a constant input, integer weights and states: every sum is exact in any order) go to the first maximum in
    row-major window order, as the numpy reference; an odd trailing row/column is dropped."""
    i = Conv2d(0, 1, kernel=3, stride=1, padding=1, pool="max")
    params = {"weight": np.random.default_rng(0).integers(-2, 3, size=(3, 2, 3, 3)).astype(dtype)}
    s_pre = np.ones((2, 2, 7, 9), dtype=dtype)
    s_post = np.random.default_rng(1).integers(0, 4, size=(2,) + i.output_shape((2, 7, 9), 3)).astype(dtype)
    numba, numpy = implementation("conv2d", "numba"), implementation("conv2d", "numpy")
    np.testing.assert_array_equal(numba.pre_field(i, params, s_pre, s_post),
                                  numpy.pre_field(i, params, s_pre, s_post))
    np.testing.assert_array_equal(numba.parameter_gradient(i, params, s_pre, s_post)["weight"],
                                  numpy.parameter_gradient(i, params, s_pre, s_post)["weight"])

    pooled = Conv2d(0, 1, kernel=1, pool="max")
    ones = {"weight": np.ones((1, 1, 1, 1), dtype=dtype)}
    u = np.array([[[[1.0, 3.0, 0.0], [3.0, 2.0, 5.0], [9.0, 9.0, 9.0]]]], dtype=dtype)
    post, pre = fields(numba, pooled, ones, u, np.array([[[[7.0]]]], dtype=dtype))
    np.testing.assert_array_equal(post, [[[[3.0]]]])
    np.testing.assert_array_equal(pre, [[[[0.0, 7.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])


def test_returned_fields_do_not_share_the_workspace():
    """A later call of the same geometry (same workspace) leaves earlier results alone (fields, and the routing a
    forward returned)."""
    i = Conv2d(0, 1, kernel=3, padding=1, pool="max")
    rng = np.random.default_rng(0)
    params = {"weight": rng.standard_normal((2, 2, 3, 3))}
    s_pre, s_post = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 2, 3, 3))
    numba = implementation("conv2d", "numba")
    first = numba.forward(i, params, s_pre) + (fields(numba, i, params, s_pre, s_post)[1],)
    saved = [a.copy() for a in first]
    fields(numba, i, params, -s_pre, -s_post)
    numba.parameter_gradient(i, params, 2 * s_pre, s_post)
    for a, b in zip(first, saved):
        np.testing.assert_array_equal(a, b)


def test_shapes_that_do_not_fit_are_refused():
    """The kernels do not check bounds: a wrong s_pre or s_post shape is a ValueError, not a stray write."""
    i = Conv2d(0, 1, kernel=3, padding=1, pool="max")
    params = {"weight": np.zeros((2, 3, 3, 3))}
    numba = implementation("conv2d", "numba")
    with pytest.raises(ValueError, match="does not fit"):
        numba.post_field(i, params, np.zeros((1, 2, 6, 6)))
    with pytest.raises(ValueError, match="s_post has shape"):
        numba.pre_field(i, params, np.zeros((1, 3, 6, 6)), np.zeros((1, 2, 6, 6)))


# ------------------------------------------------------------------------------------------ Winograd F(2x2, 3x3)
@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Every 3x3 stride-1 convolution runs by Winograd, however few its channels and tiles."""
    from ebm_sim.model import winograd
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)


WINOGRAD_GEOMETRIES = [  # padding, pool, input (C, H, W)
    (1, "max", (3, 9, 11)),   # odd conv map: the pooling drops a row and a column, the last tiles are cut
    (0, "avg", (2, 8, 7)),
    (2, None, (4, 5, 6)),     # the transpose's padding is 0
    (1, None, (2, 1, 1)),     # one pixel
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geometry", WINOGRAD_GEOMETRIES, ids=lambda g: f"p{g[0]}{g[1]}{'x'.join(map(str, g[2]))}")
def test_winograd_convolutions_match_numpy(geometry, dtype, winograd_everywhere):
    padding, pool, shape = geometry
    i = Conv2d(1, 2, kernel=3, padding=padding, pool=pool)
    rng = np.random.default_rng(padding)
    post_shape = i.output_shape(shape, 5)
    i.init_params(rng, shape, post_shape, dtype)
    prepared = implementation("conv2d", "numba").prepare(i, i.params, 3, shape)
    assert {"winograd_post", "winograd_pre"} <= set(prepared) and prepared["weight"] is i.params["weight"]
    s_pre = rng.standard_normal((3,) + shape).astype(dtype)
    s_post = rng.standard_normal((3,) + post_shape).astype(dtype)
    check_interaction(i, prepared, s_pre, s_post, dtype)


@pytest.mark.parametrize("method", ["fixed_point", "alternating"])
def test_winograd_relaxation_matches_numpy(method, winograd_everywhere):
    net, x, _, _ = case("maxpool+avgpool", batch=5, gain=0.8)
    prepared = E.prepare(net, E.parameters(net, "numba"), 5)
    assert any("winograd_pre" in p for p in prepared.interactions)
    want = relax(net, x, method, tol=1e-7, max_steps=200)
    got = relax(net, x, method, tol=1e-7, max_steps=200, params=E.parameters(net, "numba"))
    np.testing.assert_array_equal(got.steps, want.steps)
    for g, w in zip(got.states, want.states):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


def test_winograd_only_where_it_pays():
    from ebm_sim.model import winograd
    assert winograd.worthwhile(3, 1, 1, 128, 4, 16, 16)
    assert not winograd.worthwhile(3, 2, 1, 128, 4, 16, 16)    # strided
    assert not winograd.worthwhile(5, 1, 2, 128, 4, 16, 16)    # 5x5
    assert not winograd.worthwhile(3, 1, 3, 128, 4, 16, 16)    # padding past the transpose's
    assert not winograd.worthwhile(3, 1, 1, 64, 128, 32, 32)   # 64 input channels: im2col
    assert not winograd.worthwhile(3, 1, 1, 512, 1, 16, 16)    # 64 tiles at batch 1
    net, _, _, _ = case("maxpool+avgpool")                      # 2-4 channels: nothing to prepare
    params = E.parameters(net, "numba")
    assert E.prepare(net, params, 3) is params


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_stopped_samples_leave_the_batch_and_each_ends_as_alone(backend):
    """Samples converge at different steps; the relaxation steps only those still running (gathered), and each
    sample's states, steps and output update equal those of a relaxation of that sample alone."""
    net, x, _, _ = case("maxpool+avgpool", batch=6, gain=0.8)
    x[:3] *= 0.05  # nearly blank images settle sooner
    params = E.parameters(net, backend)
    together = relax(net, x, "fixed_point", tol=1e-6, max_steps=200, params=params)
    assert together.steps.min() < together.steps.max()
    for b in range(len(x)):
        alone = relax(net, x[b:b + 1], "fixed_point", tol=1e-6, max_steps=200, params=params)
        assert alone.steps[0] == together.steps[b]
        for s_alone, s_together in zip(alone.states, together.states):
            np.testing.assert_allclose(s_together[b:b + 1], s_alone, rtol=0, atol=1e-12)
        np.testing.assert_allclose(together.output_update[b:b + 1], alone.output_update, rtol=0, atol=1e-12)
