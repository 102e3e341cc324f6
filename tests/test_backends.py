"""The model, losses, metric and a training step under the JAX and PyTorch Keras backends.

Each backend runs in its own process (``KERAS_BACKEND`` is read once, at ``import keras``). The
process computes every loss and its gradient with the backend's own autodiff, builds and trains
the model (a few ``fit`` steps, then ``train_fold`` with its tf.data input), and writes the
numbers to a file; this process compares them with the float64 numpy references of
``test_losses``. A backend that is not installed is skipped (neither is a project dependency:
``pip install jax`` or ``pip install torch==2.13.0`` to run these).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import run_python

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys, time
T0 = time.time()
import numpy as np
import keras
assert keras.backend.backend() == {backend!r}, keras.backend.backend()
from saltlib import data, distribute, losses, metric, train
from saltlib.model import build_resnet_unet

inp = np.load({inputs!r})
y, x = inp["y"], inp["x"]
out = {{}}
for name, fn in losses.LOSSES.items():
    if {backend!r} == "jax":
        import jax, jax.numpy as jnp
        value = np.asarray(fn(jnp.asarray(y), jnp.asarray(x)))
        grad = np.asarray(jax.grad(lambda v: jnp.sum(fn(jnp.asarray(y), v)))(jnp.asarray(x)))
    else:
        import torch
        xt = torch.tensor(x, requires_grad=True)
        per_image = fn(torch.tensor(y), xt)
        per_image.sum().backward()
        value, grad = per_image.detach().numpy(), xt.grad.numpy()
    out[name + "_value"], out[name + "_grad"] = value, grad

out["t_losses"] = np.array(time.time() - T0)
# the model: forward pass, a few training steps, the metric, a .keras round trip
keras.utils.set_random_seed(0)
# depth 1 has every kind of layer (residual blocks, batch norm, pooling, dropout, transposed
# convolution, concatenation) and keeps JAX's per-shape compilations few
model = build_resnet_unet(base_filters=4, depth=1, blocks_per_level=1, dropout=0.1)
images = inp["images"]
masks = inp["masks"]
logits = keras.ops.convert_to_numpy(model(images[:2], training=False))
assert logits.shape == (2, 101, 101, 1) and logits.dtype == np.float32, (logits.shape, logits.dtype)
model.compile(optimizer=keras.optimizers.Adam(0.01), loss=losses.get_loss("bce+lovasz"))
hist = model.fit(images, masks[..., None].astype("float32"), batch_size=4, epochs=4, verbose=0)
out["fit_loss"] = np.array(hist.history["loss"])
pred = train.predict_logits(model, images)
out["score"] = np.array(metric.competition_score(masks, pred > 0))
model.save({tmp!r} + "/m.keras")
loaded = keras.saving.load_model({tmp!r} + "/m.keras", compile=False, safe_mode=True)
out["reload_diff"] = np.array(np.abs(
    keras.ops.convert_to_numpy(loaded(images, training=False)) - keras.ops.convert_to_numpy(model(images, training=False))
).max())

out["t_model"] = np.array(time.time() - T0)
# train_fold: the tf.data pipeline and callbacks under this backend
ds = data.load_train({data_dir!r})
folds = data.kfold(ds, 3, 42)
cfg = dict(base_filters=4, depth=1, blocks_per_level=0, dropout=0.0, mixed_precision=False, batch_size=8,
           stages=[dict(loss="lovasz", epochs=1, lr=0.01)], val_every=1)
summary = train.train_fold(ds, folds, 0, cfg, {tmp!r} + "/models", verbose=0)
out["fold_val_score"] = np.array(summary["val_score"])

try:
    distribute.get_strategy("mirrored")
    out["mirrored_refused"] = np.array(False)
except ValueError as e:
    out["mirrored_refused"] = np.array("KERAS_BACKEND=tensorflow" in str(e))
out["t_total"] = np.array(time.time() - T0)
np.savez({result!r}, **out)
print("OK")
"""


@pytest.mark.parametrize("backend,module", [("jax", "jax"), ("torch", "torch")])
def test_backend(backend, module, synthetic24, tmp_path):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {backend} backend is not installed (pip install {'jax' if module == 'jax' else 'torch==2.13.0'})")
    from test_losses import REFS, batch

    y, x = batch(11, b=4, size=16)
    masks = synthetic24.masks[:8]
    images = synthetic24.images[:8, ..., None]
    np.savez(tmp_path / "in.npz", y=y, x=x, images=images, masks=masks)
    run_python(
        SCRIPT.format(backend=backend, inputs=str(tmp_path / "in.npz"), result=str(tmp_path / "out.npz"),
                      tmp=str(tmp_path), data_dir=str(synthetic24.root)),
        timeout=500, KERAS_BACKEND=backend,
    )
    out = np.load(tmp_path / "out.npz")
    report = {}
    for name, (_, ref) in REFS.items():
        values, grads = out[name + "_value"], out[name + "_grad"]
        assert values.shape == (len(y),)
        for k in range(len(y)):
            v, g = ref(y[k], x[k])
            assert values[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (backend, name, k)
            np.testing.assert_allclose(grads[k].ravel(), g, rtol=1e-4, atol=1e-6, err_msg=f"{backend} {name} {k}")
        report[name] = float(np.max(np.abs(values - [ref(y[k], x[k])[0] for k in range(len(y))])))
    fit_loss = out["fit_loss"]
    assert np.isfinite(fit_loss).all() and fit_loss[-1] < fit_loss[0]
    assert 0 <= float(out["score"]) <= 1
    assert float(out["reload_diff"]) < 1e-5
    assert 0 <= float(out["fold_val_score"]) <= 1
    assert bool(out["mirrored_refused"])
    times = {k: round(float(out[k]), 1) for k in ("t_losses", "t_model", "t_total")}
    print(json.dumps({"backend": backend, "max_abs_loss_error": report, "fit_loss": fit_loss.tolist(),
                      "seconds": times}))
