"""Ray for sharded work (ebm_sim.cluster): sharded relaxation equals the single-process file bit for bit, a task
killed mid-way is retried with nothing lost or duplicated, a robustness evaluation on Ray equals the single-process
one, ``--cluster`` is validated before any work, and without it nothing imports Ray.

The Ray tests share one local Ray of 2 CPUs for the whole test run (``ray_cluster`` in tests/conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ebm_cli.main import main
from ebm_sim import batch_relax, cluster, datasets, storage
from ebm_sim.batch_relax import partial_path, relax_to_file, shard_folder
from ebm_sim.network import Network

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "benchmarks" / "results" / "networks" / "digits_64-256-10.h5"
QUIET = dict(progress=False, log=lambda msg: None)
#: attributes that may differ between two writes of the same result: the time of writing
TIMING_ATTRS = {"created"}


def file_contents(path) -> tuple[dict, dict]:
    """Every dataset (name -> array) and every root attribute of an HDF5 file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: f.attrs[k] for k in f.attrs}
    return arrays, attrs


def assert_same_file(a, b) -> None:
    """Bit for bit: the same datasets (dtype, shape, values) and the same attributes but the time of writing."""
    arrays_a, attrs_a = file_contents(a)
    arrays_b, attrs_b = file_contents(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype and np.array_equal(arrays_a[name], arrays_b[name]), name
    assert set(attrs_a) == set(attrs_b)
    for key in set(attrs_a) - TIMING_ATTRS:
        assert np.array_equal(attrs_a[key], attrs_b[key]), key


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


@pytest.fixture(scope="module")
def network():
    return Network.init((64, 40, 30, 10), seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits, network):
    """The single-process file of the digits test split (360 samples, batches of 64)."""
    path = tmp_path_factory.mktemp("single") / "fp.h5"
    relax_to_file(network, digits.x_test, digits.y_test, path, batch_size=64, **QUIET)
    return path


# ---------------------------------------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("value", ["local", "auto", "10.0.0.5:6379", "ray://head.example.org:10001", " local "])
def test_cluster_values_accepted(value):
    assert cluster.check_cluster(value) == value.strip()
    assert cluster.check_cluster(None) is None


@pytest.mark.parametrize("value", ["", "remote", "host", "host:", "host:0", "host:70000", "http://host:80", "a b:1"])
def test_bad_cluster_values_refused(value):
    with pytest.raises(ValueError, match="'local', 'auto' or a Ray address"):
        cluster.check_cluster(value)


def test_bad_cluster_option_is_a_usage_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "fp.h5"
    assert main(["relax", str(NET), "--dataset", "digits", "--cluster", "nowhere", "-o", str(out)]) == 2
    assert "must be 'local', 'auto' or a Ray address" in capsys.readouterr().err
    assert main(["robustness", str(NET), "--dataset", "digits", "--out-dir", str(tmp_path / "r"),
                 "--cluster", "head:99999"]) == 2
    assert main(["pipeline", "--quick", "--out-dir", str(tmp_path / "p"), "--cluster", "bad address"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_ray_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cluster, "ray_installed", lambda: False)
    with pytest.raises(cluster.ClusterError, match=r"pip install -e \.\[cluster\]"):
        cluster.check_cluster("local")
    assert main(["relax", str(NET), "--dataset", "digits", "--cluster", "local", "-o", str(tmp_path / "fp.h5")]) == 2
    assert "--cluster needs Ray" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_shard_size_needs_cluster(tmp_path, digits, network):
    with pytest.raises(ValueError, match="shard size needs a cluster"):
        relax_to_file(network, digits.x_test, digits.y_test, tmp_path / "fp.h5", batch_size=64, shard_size=128,
                      **QUIET)


def test_bad_shard_size_refused_before_any_work(tmp_path, digits, network):
    with pytest.raises(ValueError, match="multiple of the batch size 64"):
        relax_to_file(network, digits.x_test, digits.y_test, tmp_path / "fp.h5", batch_size=64, cluster="local",
                      shard_size=100, **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_config_takes_a_cluster_key():
    from ebm_pipeline.config import PipelineConfig
    assert PipelineConfig(dataset="digits", cluster="auto").cluster == "auto"
    assert PipelineConfig.from_dict({"dataset": "digits", "cluster": "local"}).as_dict()["cluster"] == "local"
    with pytest.raises(ValueError, match="cluster"):
        PipelineConfig(dataset="digits", cluster="somewhere")
    # the stages' digests do not depend on it: the results are the same
    assert PipelineConfig(dataset="digits", cluster="local").digest("train") == PipelineConfig().digest("train")


def test_nothing_imports_ray_without_cluster(tmp_path):
    """Importing the packages and running a command without --cluster leaves Ray out of the process."""
    code = f"""
import sys
import ebm_sim, ebm_sim.batch_relax, ebm_sim.commands, distill, distill.commands, ebm_pipeline, ebm_pipeline.run
import distill.robustness.evaluation
from ebm_cli.main import main
assert main(["relax", {str(NET)!r}, "--dataset", "digits", "--limit", "50", "--no-progress",
             "-o", {str(tmp_path / "fp.h5")!r}]) == 0
assert main(["relax", "--help"]) == 0
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_object_store_fits_a_small_dev_shm(monkeypatch):
    """Ray falls back to a slow object store in /tmp when /dev/shm is too small: the store is sized to fit it."""
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: usage(2 ** 30, 2 ** 29, 500 * 2 ** 20))
    assert cluster.default_object_store_bytes() == int(0.8 * 500 * 2 ** 20)
    monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: usage(2 ** 26, 2 ** 26, 2 ** 20))
    assert cluster.default_object_store_bytes() == cluster.MIN_OBJECT_STORE
    monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: usage(2 ** 40, 0, 2 ** 40))
    assert cluster.default_object_store_bytes() <= cluster.MAX_DEFAULT_OBJECT_STORE


def _thread_settings():
    return {name: os.environ.get(name) for name in cluster.THREAD_VARIABLES}


def test_tasks_get_their_thread_counts_numba_included(ray_cluster):
    """Ray sets OMP_NUM_THREADS only: every task also gets NUMBA_NUM_THREADS (and the BLAS variables)."""
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    assert cluster.task_env(3) == {"env_vars": {name: "3" for name in cluster.THREAD_VARIABLES}}
    [(index, seen)] = list(cluster.run_tasks(_thread_settings, [()], threads=1))
    assert index == 0 and seen == {name: "1" for name in cluster.THREAD_VARIABLES}


def test_shards_follow_the_batches():
    assert batch_relax.plan_shards(360, 128) == [(0, 128), (128, 256), (256, 360)]
    assert batch_relax.default_shard_size(360, 64, workers=2) == 128  # 6 batches, about 2 shards per worker
    assert batch_relax.default_shard_size(10, 64, workers=8) == 64


def test_a_batchs_thread_split_decides_the_last_bits(digits, network):
    """Why the shards follow the batches and the single process's thread split: a row's fixed point depends in its
    last bits on the rows relaxed beside it (retired rows leave the matrix products)."""
    from ebm_sim.relax import relax
    x = digits.x_test[:128]
    one, two = relax(network, x, threads=1), relax(network, x, threads=2)
    np.testing.assert_allclose(one.states[0], two.states[0], atol=1e-5)
    assert not all(np.array_equal(a, b) for a, b in zip(one.states, two.states))


# ---------------------------------------------------------------------------------------------- on Ray
def test_sharded_relaxation_equals_the_single_process_file(ray_cluster, tmp_path, digits, network, reference):
    out = tmp_path / "fp.h5"
    summary = relax_to_file(network, digits.x_test, digits.y_test, out, batch_size=64, cluster="local",
                            shard_size=128, **QUIET)
    assert summary["shards"] == 3 and summary["samples"] == 360 and summary["resumed_from"] == 0
    assert_same_file(reference, out)
    assert not shard_folder(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fp.h5"]


def test_sharded_relaxation_of_a_layered_network_equals_the_single_process_file(ray_cluster, tmp_path, digits):
    """A convolutional network's fixed points keep their shapes (file version 2), sharded or not."""
    from ebm_sim.model import LayeredNetwork
    network = LayeredNetwork.init("1x8x8, conv 4 k3 p1 avgpool, conv 6 k3 s2, readout 10", seed=1, gain=2.0)
    x, y = digits.x_test[:120].reshape((-1, 1, 8, 8)), digits.y_test[:120]
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    relax_to_file(network, x, y, single, batch_size=32, **QUIET)
    summary = relax_to_file(network, x, y, sharded, batch_size=32, cluster="local", shard_size=64, **QUIET)
    assert summary["shards"] == 2
    assert_same_file(single, sharded)


def test_existing_shards_are_skipped(ray_cluster, tmp_path, digits, network, reference, monkeypatch):
    """A shard already there (an earlier, interrupted run) is not relaxed again; the result is the same file."""
    out = tmp_path / "fp.h5"
    calls = []
    from ebm_sim import cluster as ray_cluster_module
    original = ray_cluster_module.run_tasks

    def first_shard_only(function, arguments, **options):  # the "interrupted" run: only the first shard is done
        arguments = list(arguments)
        calls.append(len(arguments))
        if len(calls) == 1:
            arguments = arguments[:1]
        yield from original(function, arguments, **options)

    monkeypatch.setattr(ray_cluster_module, "run_tasks", first_shard_only)
    with pytest.raises(batch_relax.RunError, match="missing"):
        relax_to_file(network, digits.x_test, digits.y_test, out, batch_size=64, cluster="local", shard_size=128,
                      **QUIET)
    assert len(list(shard_folder(out).glob("*.h5"))) == 1 and not out.exists()
    summary = relax_to_file(network, digits.x_test, digits.y_test, out, batch_size=64, cluster="local",
                            shard_size=128, **QUIET)
    assert calls == [3, 2] and summary["resumed_from"] == 128
    assert_same_file(reference, out)
    assert not shard_folder(out).exists()


def _killed_once(network, x, labels, start, stop, path, settings, threads, resume, checkpoint_every):
    """relax_shard whose first attempt on the shard starting at 128 kills its own worker process mid-way: once the
    shard's first batch is saved in its partial file (or, if the shard beats the watchdog, after its file is
    written and before the driver hears of it). The marker file beside the shards records the attempt."""
    marker = Path(path).parent.parent / f"killed-{start}"
    if start == 128 and not marker.exists():
        marker.write_text(str(os.getpid()))
        partial = partial_path(path)

        def watchdog():
            while not partial.exists():
                time.sleep(0.001)
            os._exit(1)

        threading.Thread(target=watchdog, daemon=True).start()
        batch_relax.relax_shard(network, x, labels, start, stop, path, settings, threads, resume, 1)
        os._exit(1)
    return batch_relax.relax_shard(network, x, labels, start, stop, path, settings, threads, resume,
                                   checkpoint_every)


def test_a_killed_task_is_retried_without_losing_or_duplicating_rows(ray_cluster, tmp_path, digits, network,
                                                                     reference, monkeypatch):
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    monkeypatch.setattr(batch_relax, "relax_shard", _killed_once)
    out = tmp_path / "fp.h5"
    summary = relax_to_file(network, digits.x_test, digits.y_test, out, batch_size=64, cluster="local",
                            shard_size=128, **QUIET)
    assert (tmp_path / "killed-128").exists()  # the first attempt ran and died
    fixed_points = storage.load_fixed_points(out, network)
    assert len(fixed_points) == summary["samples"] == 360  # nothing lost, nothing twice
    np.testing.assert_array_equal(fixed_points.labels, digits.y_test)
    assert_same_file(reference, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.h5", "killed-128"]


def test_a_tasks_own_error_is_raised_as_itself_and_not_retried(ray_cluster, tmp_path):
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    counter = tmp_path / "attempts"

    def refuse(value):
        with open(counter, "a") as handle:
            handle.write("x")
        raise ValueError(f"bad value {value}")

    with pytest.raises(ValueError, match="bad value 3"):
        list(cluster.run_tasks(refuse, [(3,)]))
    assert counter.read_text() == "x"


def test_ebm_relax_with_cluster_writes_the_same_file(ray_cluster, tmp_path, capsys):
    plain, sharded = tmp_path / "plain.h5", tmp_path / "sharded.h5"
    common = ["relax", str(NET), "--dataset", "digits", "--limit", "150", "--batch-size", "32", "--no-progress"]
    assert main(common + ["-o", str(plain)]) == 0
    assert main(common + ["--cluster", "local", "--shard-size", "64", "-o", str(sharded)]) == 0
    assert_same_file(plain, sharded)


# ---------------------------------------------------------------------------------------------- robustness on Ray
def test_robustness_on_ray_equals_the_single_process_evaluation(ray_cluster, tmp_path, digits, one_torch_thread):
    pytest.importorskip("torchattacks")
    pytest.importorskip("pyautoattack")
    from distill.baselines import train_baseline
    from distill.config import BaselineConfig
    from distill.robustness import RobustnessConfig, evaluate, load_model_under_test
    from distill.robustness.report import without_timings

    if not NET.exists():
        pytest.skip(f"{NET} is missing")
    train_baseline((64, 32, 10), digits.x_train, digits.y_train, BaselineConfig(kind="standard", epochs=2, lr=3e-3),
                   checkpoint_path=tmp_path / "standard.h5", dataset="digits", **QUIET)
    config = RobustnessConfig.for_dataset(
        "digits", samples=20, square_samples=10, audit_samples=10, pgd_steps=3, audit_steps=4, audit_restarts=1,
        square_queries=20, autoattack=False, min_norm=False, corruption_samples=20,
        corruptions=("gaussian_noise",), severities=(1,), batch_size=10, sweep_linf=(0.1,), sweep_l2=(1.0,))

    def run(folder, **options):
        models = [load_model_under_test(NET, "EBM", (1, 8, 8)),
                  load_model_under_test(tmp_path / "standard.h5", "standard", (1, 8, 8))]
        return evaluate(models, digits.x_test, digits.y_test, (1, 8, 8), config, tmp_path / folder, **QUIET,
                        **options)

    single = run("single")
    on_ray = run("ray", cluster="local")
    assert without_timings(on_ray) == without_timings(single)
    stored = {p.name: json.loads(p.read_text()) for p in (tmp_path / "ray" / "parts").glob("*.json")}
    assert {p.name for p in (tmp_path / "single" / "parts").glob("*.json")} == set(stored)  # one file per part
    assert not list((tmp_path / "ray" / "parts").glob(".*.claim"))  # every claim released
