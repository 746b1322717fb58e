"""The relax benchmark runs end to end in quick mode and reports what the issue asks for (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_matmul_flop_count_of_the_synchronous_kernel():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from relax import numba_matmul_flops
    finally:
        sys.path.pop(0)
    from ebm_sim.network import Network
    network = Network.init((784, 512, 512, 10), seed=0)
    steps = np.array([3, 5])
    # input projection once per sample; per step and sample W_1 s_1, W_1^T s_2, W_2 s_2, W_2^T s_3
    expected = 2 * 784 * 512 * 2 + (4 * 512 * 512 + 4 * 512 * 10) * 8
    assert numba_matmul_flops(network, steps) == expected


def test_relax_benchmark_quick(tmp_path):
    out = tmp_path / "relax.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "relax.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    for key in ("numba_over_torch_batch1", "numba_over_torch_batch256", "gemm_fraction_batch256"):
        assert np.isfinite(printed[key]) and printed[key] > 0
    for batch in ("1", "256"):
        row = printed["per_batch"][batch]
        for name in ("numba_fixed_point", "numba_euler", "numba_alternating", "numba_rk45", "torch_fixed_point",
                     "torch_fixed_point_hoisted", "numpy_fixed_point", "solve_ivp"):
            assert row[name]["time_to_equilibrium_s"] > 0 and row[name]["steps"] > 0, name
            assert row[name].get("converged", 1.0) == 1.0, name
        # the same equations stop after the same number of synchronous steps in numba and torch
        assert row["numba_fixed_point"]["steps"] == row["torch_fixed_point"]["steps"]


def test_train_benchmark_quick(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--quick", "--out", str(out),
                           "--networks-dir", str(tmp_path / "networks")],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "dataset-fashion-mnist" in done.stderr:
        import pytest
        pytest.skip("Fashion-MNIST is not installed (make data)")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    for key in ("digits_test_acc", "fashion_test_acc", "fashion_deep_test_acc", "fashion_epoch_s",
                "numba_over_torch_epoch"):
        assert np.isfinite(printed[key]) and printed[key] > 0
    assert printed["digits_test_acc"] > 0.9  # digits trains in full even in quick mode
    # the floor: the same epoch's matrix products alone, in the same process, below the epoch itself
    breakdown = printed["speed"]["breakdown"]
    assert 0 < printed["products_floor_epoch_s"] == breakdown["products_floor_epoch_s"]
    assert breakdown["one_core_over_products_floor"] == breakdown["epoch_s_one_core"] / breakdown[
        "products_floor_epoch_s"] > 0
    # the speed comparison really runs the same steps on both sides
    assert printed["speed"]["numba"]["same_steps"]["free_steps_mean"] == 30
    assert printed["speed"]["numba"]["same_steps"]["nudged_steps_mean"] == 10
    assert (tmp_path / "networks" / "digits_64-256-10.h5").exists()
    conv = printed["speed"]["conv_breakdown"]  # the cifar10-cpu EP epoch (real CIFAR-10 beside the repository)
    if "skipped" not in conv:
        assert set(conv["phases_s"]) == {"free", "nudged", "gradient", "optimizer", "other"}
        assert conv["phases_s"]["free"] > 0 and conv["phases_s"]["nudged"] > 0 and conv["epoch_gflop"] > 1000
        assert printed["conv_epoch_s"] == conv["epoch_s_10k"] and 0 < printed["conv_epoch_gemm_fraction"]


def test_conv_epoch_flops_count_one_convolution_per_relaxing_layer_and_step():
    """conv_epoch_flops: per sample, each phase convolves the clamped input once, each step convolves each relaxing
    pre layer once and transposes once, the gradient correlates both states of the contrast."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train import conv_epoch_flops
    finally:
        sys.path.pop(0)
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.training import TrainConfig
    network = LayeredNetwork.init("1x4x4, conv 2 k3 p1 maxpool, conv 3 k1, 5", seed=0)
    first, second = 2 * 1 * 9 * 16, 3 * 2 * 1 * 4  # MACs: 3x3 kernels over 4x4, 1x1 over the pooled 2x2
    config = TrainConfig(nudging="symmetric", free_steps=4, nudged_steps=2)
    dense = 5 * 3 * 2 * 2
    steps = 4 + 2 * 2
    expected = 2 * 7 * (3 * first + 2 * steps * (second + dense) + 2 * (first + second + dense))
    assert conv_epoch_flops(network, config, 7) == expected


def test_distill_benchmark_quick(tmp_path):
    out = tmp_path / "distill.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    for key in ("ebm_test_acc", "distilled_test_acc", "agreement", "speedup_batch1", "speedup_batch256",
                "speedup_batch1_int8", "int8_test_acc", "int8_agreement"):
        assert np.isfinite(printed[key]) and printed[key] > 0
    case = printed["cases"]["deep"]
    assert case["int8_agreement"] > 0.5 and case["cost"]["student_onnxruntime_int8"]["agreement_with_float_student"] > 0.9
    assert case["ebm_test_acc"] > 0.9 and case["agreement"] > 0.5  # a trained EBM and a student that learned
    assert case["cost"]["student_numpy"]["agrees_with_torch"] == 1.0
    assert set(case["cost"]) == {"numba_fixed_point", "numba_alternating", "torch_fixed_point", "student_torch",
                                 "student_onnxruntime", "student_onnxruntime_int8", "student_numpy"}


def test_robustness_benchmark_quick(tmp_path):
    out = tmp_path / "robustness.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--quick", "--no-progress",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    assert set(printed["models"]) == {"EBM", "distilled", "standard", "pgd-at"}
    for name, model in printed["models"].items():
        for key in ("clean", "pgd_linf", "autoattack", "square", "corruption_mean"):
            assert 0.0 <= model[key] <= 1.0, (name, key)
        assert isinstance(model["audit_passed"], bool) and model["pgd_linf"] <= model["clean"]
    assert set(printed["models"]["EBM"]["per_source"]["pgd_linf"]) == {"bptt", "implicit", "transfer"}
    assert printed["models"]["EBM"]["clean"] > 0.9 and printed["cost_minutes"]["total_this_run"] > 0


def test_cifar_benchmark_quick(tmp_path):
    import pytest
    data = ROOT.parent / "shared" / "data"
    if not (data / "cifar-10-batches-py").is_dir():
        pytest.skip("no CIFAR-10 images beside the repository (the benchmark's default --data-dir)")
    out = tmp_path / "cifar.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cifar.py"), "--quick", "--no-progress",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    assert set(printed["models"]) == {"EBM", "distilled", "standard", "pgd-at"}
    for name, model in printed["models"].items():
        for key in ("clean", "pgd_linf", "pgd_l2", "square", "corruption_mean"):
            assert 0.0 <= model[key] <= 1.0, (name, key)
        assert isinstance(model["audit_passed"], bool) and model["pgd_linf"] <= model["clean"]
    assert set(printed["models"]["EBM"]["per_source"]["pgd_linf"]) == {"bptt", "implicit", "transfer"}
    assert 0.0 <= printed["ebm_truncated_pgd_linf"] <= 1.0
    assert printed["truncation"]["attack_steps"] < printed["truncation"]["deployed_steps"]
    assert printed["speedup_batch1"] > 0 and "EP-CNN (published)" in printed["side_by_side"]
    assert printed["lava_float_agreement"] is None and "max-pools" in printed["lava"]["reason"]
    onnx = printed["onnx"]  # the conv student in ONNX, float and int8, on the quick run's 100 test images
    assert onnx["float"]["prediction_agreement"] == 1.0 and onnx["float"]["max_abs_difference"] < 1e-3
    assert onnx["int8"]["quantization"] == "int8" and 0.0 <= onnx["int8"]["agreement_with_ebm"] <= 1.0
    assert printed["onnx_int8_accuracy"] == onnx["int8"]["accuracy_onnx"] and onnx["float"]["n"] == 100


def test_scale_benchmark_quick(tmp_path):
    """benchmarks/scale.py --quick (about a minute: two local Rays, each started once): the keys the issue asks for,
    and the Ray results equal to the single-process ones."""
    import pytest
    pytest.importorskip("ray")
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    for key in ("relax_speedup_2_workers", "robustness_speedup_2_workers"):
        assert np.isfinite(printed[key]) and printed[key] > 0
    assert np.isfinite(printed["ray_overhead_s"]) and np.isfinite(printed["ray_overhead_fraction"])
    assert printed["relax_matches_single_process"] is True and printed["robustness_matches_single_process"] is True
    assert printed["ddp_matches_single"] is True and printed["ddp"]["tolerance"] > 0


def test_a_quick_run_never_writes_over_the_recorded_results(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import RESULTS, output_path
    finally:
        sys.path.pop(0)
    import pytest
    assert output_path("relax", quick=False) == RESULTS / "relax.json"
    assert output_path("relax", quick=True) == RESULTS / "quick" / "relax.json"
    assert output_path("relax", quick=True, out=tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(SystemExit, match="never writes over the recorded full results"):
        output_path("relax", quick=True, out=RESULTS / "relax.json")
    for script in ("relax", "train", "distill", "hardware", "robustness", "conv", "cifar", "scale"):
        recorded = RESULTS / f"{script}.json"
        before = recorded.read_bytes() if recorded.exists() else None
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out",
                               str(recorded)], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "never writes over the recorded full results" in done.stderr, script
        assert (recorded.read_bytes() if recorded.exists() else None) == before, script


def test_cifar_cost_estimate_counts_autoattacks_square_once_when_shared():
    """AutoAttack's Linf Square is the standalone Square's part when both attack the same examples: the estimate
    counts its queries once; on other examples (or in L2) it counts them apart."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cifar import cost_estimate
    finally:
        sys.path.pop(0)
    from distill.robustness.config import RobustnessConfig
    times = {"model": {"gradient": 0.0, "forward": 1.0}}  # seconds per forward pass: the estimate counts forwards
    base = dict(samples=100, autoattack_samples=50, square_queries=1000, corruption_samples=1, corruptions=("contrast",),
                severities=(1,), autoattack_norms=("Linf",))
    shared = cost_estimate(times, RobustnessConfig(square_samples=50, **base))["model"]["forwards"]
    apart = cost_estimate(times, RobustnessConfig(square_samples=40, **base))["model"]["forwards"]
    corruption = 1
    assert shared == 1000 * 50 + corruption
    assert apart == 1000 * 50 + 1000 * 40 + corruption
    both = cost_estimate(times, RobustnessConfig(square_samples=50, **{**base, "autoattack_norms": ("Linf", "L2")}))
    assert both["model"]["forwards"] == 2 * 1000 * 50 + corruption


def test_cifar_lava_agreement_runs_the_float_program_of_a_finished_network(tmp_path):
    """benchmarks/cifar.py's lava_agreement: a network file still holding a training checkpoint (or none) gives no
    agreement and says why; a finished Lava-mappable network's float program predicts as the simulator."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cifar import lava_agreement
    finally:
        sys.path.pop(0)
    from ebm_cli.main import main
    path = tmp_path / "cifar10-cpu-lava.h5"
    images = np.random.default_rng(0).uniform(size=(6, 3, 8, 8)).astype(np.float32)
    data = (None, None, images, np.arange(6) % 4)
    missing = lava_agreement(data, path)
    assert missing["agreement"] is None and "--train-lava" in missing["reason"] and "max-pools" in missing["reason"]
    assert main(["init", "--arch", "3x8x8, conv 4 k3 p1 avgpool, conv 6 k3 s2 p1, readout 4", "-o", str(path)]) == 0
    found = lava_agreement(data, path, samples=5)
    assert found["agreement"] == found["float"]["agreement"] == 1.0 and found["samples"] == 5
    assert 0.0 <= found["fixed"]["agreement"] <= 1.0 and found["network"] == path.name


def test_train_benchmark_keeps_stored_networks_unless_asked(tmp_path):
    """benchmarks/train.py's accuracy groups never replace a trained network already stored (the distillation and
    robustness benchmarks measured it) unless --overwrite-networks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train import accuracy_group
    finally:
        sys.path.pop(0)
    first = accuracy_group("digits", False, tmp_path)
    path = tmp_path / "digits_64-256-10.h5"
    assert first["network_file"] == str(path) and "network_file_kept" not in first
    stored = path.read_bytes()
    again = accuracy_group("digits", False, tmp_path)
    assert again["network_file"] is None and again["network_file_kept"] == str(path)
    assert path.read_bytes() == stored
    replaced = accuracy_group("digits", False, tmp_path, overwrite_networks=True)
    assert replaced["network_file"] == str(path) and path.read_bytes() != stored  # the history's timings differ
