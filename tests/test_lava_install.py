"""The Lava install: the Python 3.11 fix in hardware/lava_compat.py, and a tiny Lava network run on the CPU.

Lava is part of the install contract (`make` installs lava-nc 0.10.0 and applies the fix), so these tests do
not skip when Lava is missing: a missing or unpatched Lava is a broken install.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hardware import lava_compat
from hardware.lava_compat import BROKEN, FIXED, apply, patch_source, var_model_path

SNIPPET = (
    "from dataclasses import dataclass\n\n"
    "{decorator}\n"
    "class ByteEncoder:\n"
    "    pass\n\n"
    "@dataclass\n"
    "class Other:\n"
    "    encoder: ByteEncoder = ByteEncoder()\n"
)
BROKEN_SNIPPET = SNIPPET.format(decorator="@dataclass")
FIXED_SNIPPET = SNIPPET.format(decorator="@dataclass(frozen=True)")


# ------------------------------------------------------------------------------------------------ patch_source
def test_patch_source_fixes_broken_snippet():
    new, changed = patch_source(BROKEN_SNIPPET)
    assert changed
    assert new == FIXED_SNIPPET
    assert FIXED in new and "@dataclass\nclass Other:" in new  # only ByteEncoder touched


def test_patch_source_is_idempotent():
    new, changed = patch_source(FIXED_SNIPPET)
    assert not changed and new == FIXED_SNIPPET
    again, changed_again = patch_source(patch_source(BROKEN_SNIPPET)[0])
    assert not changed_again and again == FIXED_SNIPPET


def test_patch_source_refuses_unrelated_text():
    with pytest.raises(RuntimeError, match="ByteEncoder"):
        patch_source("print('hello')\n")
    with pytest.raises(RuntimeError, match="0.10.0"):
        patch_source("@dataclass\nclass SomethingElse:\n    pass\n")


def test_patched_snippet_really_works_on_this_python():
    """The reason for the fix: a mutable dataclass default fails on 3.11; the frozen one does not."""
    import sys
    if sys.version_info >= (3, 11):
        with pytest.raises(ValueError, match="mutable default"):
            exec(compile(BROKEN_SNIPPET, "<broken>", "exec"), {})
    namespace: dict = {}
    exec(compile(FIXED_SNIPPET, "<fixed>", "exec"), namespace)
    assert namespace["Other"]().encoder == namespace["ByteEncoder"]()


def test_apply_on_a_copy(tmp_path):
    target = tmp_path / "magma" / "compiler" / "var_model.py"
    target.parent.mkdir(parents=True)
    target.write_text(BROKEN_SNIPPET)
    cache = target.parent / "__pycache__"
    cache.mkdir()
    stale = cache / "var_model.cpython-311.pyc"
    stale.write_bytes(b"stale")
    unrelated = cache / "other.cpython-311.pyc"
    unrelated.write_bytes(b"keep")
    assert apply(target) is True
    assert target.read_text() == FIXED_SNIPPET
    assert not stale.exists() and unrelated.exists()
    assert apply(target) is False
    assert target.read_text() == FIXED_SNIPPET
    assert sorted(p.name for p in target.parent.iterdir()) == ["__pycache__", "var_model.py"]  # no temp left


def test_apply_refuses_unexpected_file_and_leaves_it(tmp_path):
    target = tmp_path / "var_model.py"
    target.write_text("x = 1\n")
    with pytest.raises(RuntimeError):
        apply(target)
    assert target.read_text() == "x = 1\n"


# ------------------------------------------------------------------------------------------------ installed lava
def test_installed_lava_is_already_fixed():
    path = var_model_path()
    assert path.name == "var_model.py" and path.parent.name == "compiler"
    text = path.read_text()
    assert FIXED in text and BROKEN not in text
    before = path.stat().st_mtime_ns
    assert apply() is False  # already in place: nothing written
    assert path.stat().st_mtime_ns == before


def test_lava_compat_script_reports_already_in_place():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, lava_compat.__file__], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(lava_compat.PATCHES)
    assert all("already in place" in line for line in lines)
    assert "var_model.py" in lines[0] and "multiprocessing.py" in lines[1]


def test_start_method_patch_on_snippets():
    patch = lava_compat.START_METHOD
    broken = "import multiprocessing as mp\nif True:\n    mp.set_start_method('fork')\n"
    fixed, changed = patch_source(broken, patch)
    assert changed and patch.fixed in fixed and patch_source(fixed, patch) == (fixed, False)
    with pytest.raises(RuntimeError, match="start-method"):
        patch_source("x = 1\n", patch)


def test_lava_runtime_imports_after_the_multiprocessing_context_was_fixed():
    """tqdm's lock fixes the multiprocessing context; unpatched, Lava's import-time set_start_method then raises
    'context has already been set'. Checked in a fresh interpreter so the order is certain."""
    import subprocess
    import sys
    code = ("import multiprocessing as mp, tqdm\n"
            "tqdm.tqdm.get_lock()\n"
            "assert mp.get_start_method(allow_none=True) is not None\n"
            "import lava.magma.runtime.message_infrastructure.multiprocessing\n"
            "print(mp.get_start_method())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "fork"


def test_installed_compiler_imports_and_byteencoder_is_frozen():
    from lava.magma.compiler import var_model
    assert dataclasses.is_dataclass(var_model.ByteEncoder)
    assert var_model.ByteEncoder.__dataclass_params__.frozen
    hash(var_model.ByteEncoder())


# ------------------------------------------------------------------------------------------------ a Lava run
def _two_layer_network(bias, vth, weights, du2, vth2):
    """LIF (2 neurons, constant bias, no leak) -> Dense (1x2) -> LIF (1 neuron, no spikes, no voltage leak)."""
    from lava.proc.dense.process import Dense
    from lava.proc.lif.process import LIF

    src = LIF(shape=(2,), vth=vth, du=0, dv=0, bias_mant=np.asarray(bias), name="src")
    dense = Dense(weights=np.asarray(weights), name="w")
    dst = LIF(shape=(1,), vth=vth2, du=du2, dv=0, bias_mant=0, name="dst")
    src.s_out.connect(dense.s_in)
    dense.a_out.connect(dst.a_in)
    return src, dense, dst


def test_lava_float_network_runs_and_matches_hand_computation():
    """Hand computation (floating_pt LIF: u <- u(1-du) + a_in; v <- v(1-dv) + u + bias; spike if v > vth, reset 0).

    Source neurons, bias 1.0 and 0.75, vth 2.5: neuron 0 spikes at steps 3, 6, 9, 12; neuron 1 at 4, 8, 12.
    Dense sends at step t the input it received at step t-1 (one-step delay). The target has du = 1, so
    u(t) = W s(t-1), and v integrates it: after 10 steps v = 2.0 * 3 (n0 at 3, 6, 9) + 0.5 * 2 (n1 at 4, 8)
    = 7.0, u = 2.0 (n0 spiked at 9). After 3 more steps (13): v = 2.0 * 4 + 0.5 * 3 = 9.5.
    """
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg

    src, _, dst = _two_layer_network(bias=[1.0, 0.75], vth=2.5, weights=[[2.0, 0.5]], du2=1.0, vth2=1e9)
    try:
        cfg = Loihi2SimCfg(select_tag="floating_pt")
        dst.run(condition=RunSteps(num_steps=10), run_cfg=cfg)
        np.testing.assert_allclose(dst.v.get(), [7.0])
        np.testing.assert_allclose(dst.u.get(), [2.0])
        np.testing.assert_allclose(src.v.get(), [1.0, 1.5])  # 1 step after n0's reset, 2 after n1's
        dst.run(condition=RunSteps(num_steps=3), run_cfg=cfg)  # the run continues from its state
        np.testing.assert_allclose(dst.v.get(), [9.5])
    finally:
        dst.stop()


def test_lava_fixed_point_network_matches_hand_computation():
    """Bit-accurate models: vth and synaptic input are shifted left by 6 bits, du = 4095 (+1 offset) clears u.

    Source bias 100 and 75, vth 4 -> 256: neuron 0 spikes at 3, 6, 9; neuron 1 at 4, 8 (as in the float case).
    Weights 4 and 2 (8-bit, excitatory): target u(10) = 4 << 6 = 256, v(10) = 3 * 256 + 2 * 128 = 1024.
    """
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg

    src, _, dst = _two_layer_network(bias=[100, 75], vth=4, weights=[[4, 2]], du2=4095, vth2=100000)
    try:
        dst.run(condition=RunSteps(num_steps=10), run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
        np.testing.assert_array_equal(dst.v.get(), [1024])
        np.testing.assert_array_equal(dst.u.get(), [256])
        np.testing.assert_array_equal(src.v.get(), [100, 150])
    finally:
        dst.stop()
