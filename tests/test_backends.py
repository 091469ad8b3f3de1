"""The engine on every Keras 3 backend, in subprocesses with KERAS_BACKEND=jax and
=torch: `pruning` imports no TensorFlow there, a model with one of each common
handler keeps zero-filter invariance, and its pruned `.keras` file loads and gives
the same outputs under another backend. The whole handler suite per backend is
marked slow. Needs the `backends` extra (jax and torch CPU builds)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRUNE_AND_SAVE = """
import sys, numpy as np, keras
import pruning
assert not any(m.startswith("tensorflow") for m in sys.modules), "pruning imported TensorFlow"
sys.path.insert(0, "tests")
from conftest import prune_zeroed, relative_diff
L = keras.layers
keras.utils.set_random_seed(0)
inp = keras.Input((12, 12, 3))
x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="stem")(inp)))
y = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(L.DepthwiseConv2D(3, padding="same")(x))
g = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(y))
g = L.Conv2D(8, 1, activation="sigmoid", name="se")(L.Conv2D(4, 1, activation="relu", name="sq")(g))
a, b = L.Conv2D(4, 1, name="a")(x), L.Conv2D(4, 1, name="b")(x)
z = keras.ops.relu(x + y * g) + L.Concatenate()([a, b])
z = L.Conv2DTranspose(6, 2, strides=2, name="up")(z)
model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(z)))
before, after, cnn, plan, pruned = prune_zeroed(model, ratio=0.5)
assert len(plan.keep) == 7 and relative_diff(before, after) < 1e-4, (plan, relative_diff(before, after))
assert pruned.count_params() < model.count_params()
x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32")
pruned.save(sys.argv[1] + "/pruned.keras")
np.save(sys.argv[1] + "/x.npy", x)
np.save(sys.argv[1] + "/y.npy", keras.ops.convert_to_numpy(pruned(x)))
print(keras.backend.backend())
"""

LOAD_AND_COMPARE = """
import sys, numpy as np, keras
model = keras.models.load_model(sys.argv[1] + "/pruned.keras")
y = keras.ops.convert_to_numpy(model(np.load(sys.argv[1] + "/x.npy")))
np.testing.assert_allclose(y, np.load(sys.argv[1] + "/y.npy"), rtol=1e-5, atol=1e-5)
print(keras.backend.backend(), "same outputs")
"""


def _needs(backend):
    module = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"KERAS_BACKEND={backend} needs {module}: pip install -e '.[backends]'")


def _run(backend, args, timeout=600):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"KERAS_BACKEND={backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_handler_suite_on_backend(backend):
    """Every handler test on the backend (slow: eager JAX compiles each op)."""
    _needs(backend)
    out = _run(backend, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_handlers.py",
                         "tests/test_rebuild.py::test_zero_filter_invariance"])
    assert " passed" in out and "failed" not in out


@pytest.mark.parametrize("source,target", [("jax", "torch"), ("torch", "tensorflow")])
def test_prune_on_backend_then_load_on_another(source, target, tmp_path):
    """Zero-filter invariance of BN, depthwise, grouped, SE, index-mapped ties, ops and
    Conv2DTranspose under `source`, then the `.keras` file under `target`."""
    _needs(source)
    _needs(target)
    assert _run(source, ["-c", PRUNE_AND_SAVE, str(tmp_path)]).strip().endswith(source)
    assert "same outputs" in _run(target, ["-c", LOAD_AND_COMPARE, str(tmp_path)])
    assert np.load(tmp_path / "y.npy").shape == (2, 3)
