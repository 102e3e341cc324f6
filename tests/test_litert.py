"""Tests of saltlib.litert (TensorFlow Lite runtime) and of bundles that predict with it.

Reference checks: the converted model's outputs against Keras' on the same inputs, and the
hand-computed ramp ensemble of tests/test_predict.py."""

from __future__ import annotations

import numpy as np
import pytest

from saltlib import litert, predict

from test_predict import bundle_dir, models, ramp_model, tiny_images, tiny_model  # noqa: F401 (fixtures)

#: on the tests that convert or run models; the runtime choice is tested without TensorFlow Lite too
needs_tflite = pytest.mark.skipif(not litert.available(), reason="TensorFlow Lite is not available here")


@pytest.fixture(scope="module")
def tiny():
    """A tiny U-Net and its TensorFlow Lite conversion."""
    m = tiny_model(3)
    return m, litert.LiteModel(litert.convert(m, (101, 101, 1)))


@needs_tflite
@pytest.mark.parametrize("n,batch_size", [(1, 1), (5, 2), (7, 8), (10, 3)])
def test_lite_model_matches_keras(tiny, n, batch_size):
    """Same logits as Keras for any batch size, including partial last batches."""
    m, lite = tiny
    x = tiny_images(n, seed=n)
    got = lite.predict(x, batch_size=batch_size)
    assert got.shape == (n, 101, 101, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, m.predict(x, verbose=0), atol=1e-5)
    assert len(lite._interpreters) <= 2  # a full batch and the last one, at most


@needs_tflite
def test_lite_model_rejects_bad_input(tiny):
    _, lite = tiny
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        lite.predict(tiny_images(2), batch_size=0)
    with pytest.raises(ValueError, match="no inputs"):
        lite.predict(np.zeros((0, 101, 101, 1), np.float32))


@needs_tflite
def test_lite_model_rejects_bytes_that_are_not_a_model():
    with pytest.raises(ValueError):
        litert.LiteModel(b"not a flatbuffer")


@needs_tflite
@pytest.mark.parametrize("n,batch_size", [(5, 64), (7, 1), (3, 4)])
def test_bundle_tflite_ensemble_hand_computed(n, batch_size):
    """Two ramp models (see test_predict.test_ensemble_flip_tta_hand_computed): with TTA the mean
    is 0.75 x image, without 1.5 x image x column / 100, through TensorFlow Lite as through Keras."""
    b = predict.Bundle(models=[ramp_model(0), ramp_model(1)], tta=True, runtime="tflite")
    x = tiny_images(n)[..., 0]
    np.testing.assert_allclose(b.predict_logits(x, batch_size=batch_size), 0.75 * x, rtol=1e-6, atol=1e-6)
    no_tta = b.predict_logits(x, batch_size=batch_size, tta=False)
    np.testing.assert_allclose(no_tta, 1.5 * x * np.arange(101) / 100, rtol=1e-6, atol=1e-6)
    assert no_tta.dtype == np.float32 and no_tta.shape == (n, 101, 101)
    assert b.lite(True) is b.lite(True) and b.lite(True) is not b.lite(False)  # converted once per setting


@needs_tflite
def test_bundle_runtimes_agree(bundle_dir):
    """A saved bundle of two tiny U-Nets: the same logits with either runtime."""
    k = predict.load_bundle(bundle_dir, runtime="keras")
    t = predict.load_bundle(bundle_dir, runtime="tflite")
    assert (k.runtime, t.runtime) == ("keras", "tflite") and "with tflite" in t.describe()
    x = tiny_images(9, seed=4)
    np.testing.assert_allclose(t.predict_logits(x, batch_size=4), k.predict_logits(x, batch_size=4), atol=1e-5)


@needs_tflite
def test_bundle_rejects_unknown_runtime(bundle_dir):
    with pytest.raises(ValueError, match="runtime must be one of 'auto', 'keras', 'tflite', got 'onnx'"):
        predict.load_bundle(bundle_dir, runtime="onnx")
    with pytest.raises(ValueError, match="float32 only"):
        predict.load_bundle(bundle_dir, runtime="tflite", compute_dtype="stored")
    # "auto" with the stored compute dtype keeps Keras (TensorFlow Lite would recompute in float32)
    assert predict.load_bundle(bundle_dir, runtime="auto", compute_dtype="stored").runtime == "keras"
    b = predict.Bundle(models=[ramp_model(0)], runtime="auto")
    with pytest.raises(ValueError, match="Bundle.runtime must be 'keras' or 'tflite', got 'auto'"):
        b.predict_logits(tiny_images(1))


@needs_tflite
def test_bundle_tflite_refuses_bfloat16_models():
    import keras

    from saltlib.model import build_resnet_unet

    m = build_resnet_unet(base_filters=2, depth=1, blocks_per_level=1, dropout=0.0, dtype_policy="mixed_bfloat16")
    b = predict.Bundle(models=[m], runtime="tflite")
    with pytest.raises(ValueError, match="TensorFlow Lite runs float32 models; these compute in bfloat16"):
        b.predict_logits(tiny_images(1))
    assert keras.config.dtype_policy().name == "float32"  # building with a policy leaves the global one


@needs_tflite
@pytest.mark.parametrize("forced,expected", [("1", "keras"), ("0", "tflite")])
def test_resolve_runtime_auto_follows_native_bfloat16(monkeypatch, forced, expected):
    """``auto``: Keras where bfloat16 is native (SALT_BF16=1 says so), TensorFlow Lite elsewhere
    (without a GPU, as in these tests)."""
    from saltlib import hardware

    monkeypatch.setenv("SALT_BF16", forced)
    monkeypatch.setattr(hardware, "gpu_bf16", lambda: None)
    assert litert.resolve_runtime("auto") == expected
    assert litert.resolve_runtime("keras") == "keras" and litert.resolve_runtime("tflite") == "tflite"


def test_resolve_runtime_auto_keeps_keras_on_a_gpu_or_without_tflite(monkeypatch):
    from saltlib import hardware

    monkeypatch.setenv("SALT_BF16", "0")
    monkeypatch.setattr(hardware, "gpu_bf16", lambda: False)  # a GPU without native bfloat16
    assert litert.resolve_runtime("auto") == "keras"
    monkeypatch.setattr(hardware, "gpu_bf16", lambda: None)
    monkeypatch.setattr(litert, "available", lambda: False)
    assert litert.resolve_runtime("auto") == "keras"
    with pytest.raises(ValueError, match="runtime 'tflite': .*use runtime 'keras'"):
        litert.resolve_runtime("tflite")  # asked for by name where it is missing: said so, not a traceback later
