"""Data-parallel EP training and distillation with torch.distributed (ebm_sim/distributed.py): two gloo processes on
127.0.0.1 (spawn) give the result of one process on the same global minibatches (to the stated tolerance), keep
identical replicas, resume from a checkpoint written by rank 0, fail together, and `ebm train/distill --nproc 2`
work from the command line. Each launch costs a few seconds (spawn, imports, Numba compilation): a handful only."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from ebm_cli.main import main  # noqa: E402
from ebm_sim import distributed, storage  # noqa: E402
from ebm_sim.distributed import SMALL_PROBLEM, TOLERANCE, PeerFailure, World, compare_runs, launch  # noqa: E402
from ebm_sim.network import Network  # noqa: E402
from ebm_sim.training import TrainConfig, fit, parameters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SMALL_CONV = "1x8x8, conv 4 k3 p1 maxpool, readout 10"


def _relative_difference(a_list, b_list) -> float:
    scale = max(float(np.abs(a).max()) for a in a_list)
    return max(float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in zip(a_list, b_list)) / scale


# ---------------------------------------------------------------------------------------------- rank functions
def _ep_ranks(world, folder):
    """Two epochs straight, then one epoch with a checkpoint resumed to two (every rank reads the file)."""
    path = f"{folder}/net.h5"
    straight = distributed._train_small(world, SMALL_PROBLEM)
    distributed._train_small(world, SMALL_PROBLEM, checkpoint_path=path, epochs=1)
    resumed = distributed._train_small(world, SMALL_PROBLEM, checkpoint_path=path, resume=True)
    return straight, resumed


def _distill_ranks(world, folder):
    return _distill_small(world, folder)


def _distill_small(world, folder, interrupt=False):
    """Distill a small random 64-32-10 network from its fixed points on 300 digits (constant schedule, 2 epochs):
    interrupt=True stops with Ctrl-C when epoch 2 ends (``folder``/student.h5 holds the checkpoint of epoch 1); else
    2 epochs straight and the interrupted run resumed from that file. Returns (straight parameters, its history,
    resumed parameters, the replicas' checksum spread)."""
    from distill.config import DistillConfig
    from distill.train import distill
    from ebm_sim.datasets import load_digits
    from ebm_sim.relax import relax

    torch.set_num_threads(1)
    network = Network.init((64, 32, 10), seed=2)
    cached = f"{folder}/fixed_points.npz"  # computed once: BLAS threads change the last bits, and the fingerprint
    try:
        with np.load(cached) as saved:
            x, y, states = saved["x"], saved["y"], [saved["s1"], saved["s2"]]
    except FileNotFoundError:
        data = load_digits()
        x, y = data.x_train[:300], data.y_train[:300]
        states = relax(network, x, method="fixed_point", tol=1e-4, max_steps=200).states
        np.savez(cached, x=x, y=y, s1=states[0], s2=states[1])
    ones = np.ones(len(y))
    fixed_points = storage.FixedPointDataset(x, y, states, 0 * ones, ones.astype(np.int64), ones > 0,
                                             {"dataset": "digits"}, network.content_hash())
    config = DistillConfig(epochs=2, batch_size=32, lr=3e-3, schedule="constant", patience=None, seed=0)
    checkpoint = dict(checkpoint_path=f"{folder}/student.h5", fixed_points_hash="0" * 64, progress=False,
                      world=world)
    if interrupt:
        def log(message):
            if message.startswith("epoch 2/"):
                raise KeyboardInterrupt
        distill(network, fixed_points, config, log=log, **checkpoint)
        return None
    straight, history = distill(network, fixed_points, config, progress=False, log=lambda *_: None, world=world)
    resumed, _ = distill(network, fixed_points, config, resume=True, log=lambda *_: None, **checkpoint)
    values = lambda model: [p.detach().numpy().copy() for p in model.parameters()]  # noqa: E731
    spread = 0.0 if world is None else world.checksum_spread(values(straight))
    return values(straight), history, values(resumed), spread


def _failing_ranks(world):
    """Rank 1 fails in a minibatch and says so; rank 0, waiting in the same all_reduce, stops with PeerFailure."""
    like = [np.zeros(3, np.float32)]
    if world.rank == 1:
        world.average(None, 0.0, like=like, failed=True)
        raise ValueError("rank 1 diverged")
    try:
        world.average([np.ones(3, np.float32)], 0.5, like=like)
    except PeerFailure:
        return "stopped"
    return "went on"


# ---------------------------------------------------------------------------------------------- tests
def test_two_gloo_processes_train_like_one_and_resume(tmp_path):
    """The EP tolerance: parameters after 2 epochs (24 Adam steps of a 64-32-10 network on 600 digits, batch 50)
    within TOLERANCE (1e-5) of the largest |parameter|, the same train and test accuracies, identical replicas on
    the two ranks; 1 epoch checkpointed by rank 0 and resumed to 2 ends exactly where 2 straight epochs do."""
    single = distributed._train_small(None, SMALL_PROBLEM)
    ranks = launch(_ep_ranks, 2, (str(tmp_path),))
    straight = [rank[0] for rank in ranks]
    report = compare_runs(single, straight)
    assert report["matches"], report
    assert report["max_rel_diff"] <= TOLERANCE and report["replica_spread"] == 0.0
    assert report["history_max_diff"] < 1e-5  # losses, accuracies, steps (seconds aside)
    resumed = ranks[0][1]
    for a, b in zip(straight[0][0], resumed[0]):
        np.testing.assert_array_equal(a, b)
    assert resumed[1]["epoch"] == [1.0, 2.0] and resumed[1]["test_acc"] == straight[0][1]["test_acc"]
    assert ranks[1][1][3] == 0.0  # the resumed replicas are identical too
    stored = storage.load_network(tmp_path / "net.h5")  # written by rank 0 only, atomically: a complete file
    assert stored.history["epoch"] == [1.0, 2.0]
    for a, b in zip(parameters(stored), resumed[0]):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("*.lock"))


def test_distillation_on_two_processes_matches_one_and_resumes(tmp_path):
    """Students distilled by 2 gloo processes: parameters within 1e-5 (relative) of one process's, the same
    history to 1e-5; a run interrupted (Ctrl-C) after its first checkpoint resumes on 2 processes (every rank reads
    the file, rank 0 rewrites it) to the parameters of the straight run. (Rank 0's checkpoints during a run:
    test_ebm_distill_nproc_2_matches_one_process.)"""
    import shutil

    from distill import io as dio

    (tmp_path / "one").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _distill_small(None, str(tmp_path / "one"), interrupt=True)
    assert dio.load_feedforward(tmp_path / "one" / "student.h5").checkpoint_state["epoch"] == 1
    shutil.copy(tmp_path / "one" / "student.h5", tmp_path / "student.h5")
    shutil.copy(tmp_path / "one" / "fixed_points.npz", tmp_path / "fixed_points.npz")
    single = _distill_small(None, str(tmp_path / "one"))
    ranks = launch(_distill_ranks, 2, (str(tmp_path),))
    straight, history, resumed, spread = ranks[0]
    assert _relative_difference(single[0], straight) < 1e-5
    assert max(abs(a - b) for key in ("train_loss", "val_loss", "val_agreement")
               for a, b in zip(single[1][key], history[key])) < 1e-5
    assert spread == 0.0 and ranks[1][3] == 0.0
    # epoch 1 of the resumed run was one process's: equal to the straight runs up to the same rounding
    assert _relative_difference(straight, resumed) < 1e-5 and _relative_difference(single[2], resumed) < 1e-5
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in single[0]]),
                                  np.concatenate([a.ravel() for a in single[2]]))  # one process resumes exactly
    assert dio.load_feedforward(tmp_path / "student.h5").checkpoint is None  # rank 0 wrote the final file


def test_a_failing_rank_stops_every_rank_with_its_own_error():
    with pytest.raises(ValueError, match="rank 1 diverged"):
        launch(_failing_ranks, 2)


def test_ebm_train_nproc_2_conv_matches_one_process(tmp_path, capfd):
    """`ebm train --nproc 2` on a small LayeredNetwork (torch backend): the file rank 0 wrote holds parameters
    within the tolerance of one process's, and the same accuracies."""
    common = ["train", "--dataset", "digits", "--arch", SMALL_CONV, "--optimizer", "sgd", "--lr", "0.1",
              "--batch-size", "32", "--limit-train", "192", "--limit-test", "64", "--epochs", "1", "--no-progress"]
    assert main(common + ["-o", str(tmp_path / "one.h5")]) == 0
    assert main(common + ["--nproc", "2", "-o", str(tmp_path / "two.h5")]) == 0
    out = capfd.readouterr().out  # the ranks' output goes to the file descriptors
    assert out.count("epoch 1/1:") == 2 and "2 processes" in out  # rank 0 alone logs
    one, two = storage.load_network(tmp_path / "one.h5"), storage.load_network(tmp_path / "two.h5")
    assert _relative_difference(one.parameter_arrays(), two.parameter_arrays()) < TOLERANCE
    assert one.history["test_acc"] == two.history["test_acc"] and one.history["train_acc"] == two.history["train_acc"]


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--nproc", "3", "--batch-size", "2"], "cannot give each of 3 processes a slice"),
])
def test_bad_nproc_is_refused_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "net.h5"
    assert main(["train", "--dataset", "digits", "--layers", "64,8,10", "--epochs", "1", "-o", str(out)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_fit_refuses_a_batch_smaller_than_the_world():
    network = Network.init((64, 8, 10))
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="cannot give each of 4 processes"):
        fit(network, x, y, x, y, TrainConfig(epochs=1, batch_size=2), world=World(rank=0, size=4), progress=False)


def test_world_shares_cover_a_minibatch_contiguously():
    for rows in (1, 7, 50):
        shares = [World(rank=r, size=3).share(rows) for r in range(3)]
        assert shares[0].start == 0 and shares[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    assert World(rank=0, size=2).share(50) == slice(0, 25)


def test_launch_validates_the_process_count():
    with pytest.raises(ValueError, match="positive integer"):
        launch(_failing_ranks, 0)


def test_ebm_distill_nproc_2_matches_one_process(tmp_path, capfd):
    from distill import io as dio

    net, fp = tmp_path / "net.h5", tmp_path / "fp.h5"
    assert main(["init", "--layers", "64,16,10", "--seed", "1", "-o", str(net)]) == 0
    assert main(["relax", str(net), "--dataset", "digits", "--split", "train", "--limit", "200", "--no-progress",
                 "-o", str(fp)]) == 0
    common = ["distill", str(net), str(fp), "--epochs", "2", "--batch-size", "32", "--no-progress"]
    assert main(common + ["-o", str(tmp_path / "one.h5")]) == 0
    assert main(common + ["--nproc", "2", "-o", str(tmp_path / "two.h5")]) == 0
    out = capfd.readouterr().out
    assert out.count("distilled in 2 epochs") == 2  # the parent prints rank 0's summary once
    one, two = dio.load_feedforward(tmp_path / "one.h5"), dio.load_feedforward(tmp_path / "two.h5")
    assert _relative_difference([p.detach().numpy() for p in one.model.parameters()],
                                [p.detach().numpy() for p in two.model.parameters()]) < TOLERANCE
    assert main(common + ["--nproc", "64", "-o", str(tmp_path / "three.h5")]) == 2  # more processes than rows
    assert "cannot give each of 64 processes a slice" in capfd.readouterr().err
    assert not (tmp_path / "three.h5").exists()
