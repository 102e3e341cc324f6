"""The ResNet-U-Net: shapes, dtypes, layer names, .keras round trip, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

import keras

from saltlib.model import build_resnet_unet  # noqa: E402


def images(b=2, size=101, seed=0):
    return np.random.default_rng(seed).random((b, size, size, 1)).astype(np.float32)


@pytest.mark.parametrize(
    "base_filters,depth,blocks",
    [(4, 1, 0), (4, 2, 1), (2, 4, 2), (2, 5, 1)],
)
def test_output_shape_and_dtype(base_filters, depth, blocks):
    model = build_resnet_unet(base_filters=base_filters, depth=depth, blocks_per_level=blocks)
    assert model.input_shape == (None, 101, 101, 1)
    assert model.output_shape == (None, 101, 101, 1)
    out = model(images(3), training=False)
    assert tuple(out.shape) == (3, 101, 101, 1)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.isfinite(np.asarray(out)).all()


def test_widths_double_per_level():
    model = build_resnet_unet(base_filters=3, depth=3, blocks_per_level=1)
    for i in range(3):
        assert model.get_layer(f"enc{i + 1}_conv").filters == 3 * 2**i
        assert model.get_layer(f"dec{i + 1}_conv").filters == 3 * 2**i
    assert model.get_layer("middle_conv").filters == 3 * 2**3


def test_other_input_sizes():
    model = build_resnet_unet(input_shape=(128, 128, 1), base_filters=2, depth=3, blocks_per_level=1)
    assert model.output_shape == (None, 128, 128, 1)
    model = build_resnet_unet(input_shape=(99, 99, 2), base_filters=2, depth=2, blocks_per_level=0)
    assert model.output_shape == (None, 99, 99, 1)


def test_mixed_bfloat16_keeps_float32_logits():
    model = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1, dtype_policy="mixed_bfloat16")
    out = model(images(2), training=False)
    assert tuple(out.shape) == (2, 101, 101, 1)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert model.get_layer("enc1_conv").compute_dtype == "bfloat16"
    assert model.get_layer("enc1_conv").variable_dtype == "float32"  # weights stay float32
    assert model.get_layer("logits").compute_dtype == "float32"
    # bf16 compute gives close to, but not exactly, the float32 model's logits with the same weights
    ref = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1)
    ref.set_weights(model.get_weights())
    x = images(2, seed=1)
    a, b = np.asarray(model(x, training=False)), np.asarray(ref(x, training=False))
    assert np.abs(a - b).max() < 0.1 * (np.abs(b).max() + 1)
    assert not np.array_equal(a, b)  # it did compute in bfloat16


def test_named_layers():
    model = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=2)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    for name in [
        "image", "enc1_conv", "enc1_res1_conv1", "enc1_res2_out_bn", "enc1_pool", "enc1_drop",
        "enc2_conv", "middle_conv", "middle_res2_conv2", "dec2_up", "dec2_concat", "dec1_up",
        "dec1_res1_add", "logits",
    ]:
        assert name in names, name
    assert model.name == "resnet_unet"
    assert model.get_layer("logits").filters == 1


def test_dropout_zero_has_no_dropout_layers():
    model = build_resnet_unet(base_filters=4, depth=2, dropout=0.0)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    model = build_resnet_unet(base_filters=4, depth=2, dropout=0.4)
    rates = {layer.name: layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)}
    assert rates["enc1_drop"] == pytest.approx(0.2) and rates["enc2_drop"] == pytest.approx(0.4)


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_keras_save_load_round_trip(tmp_path, policy):
    model = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1, dtype_policy=policy)
    # move batch-norm statistics and weights away from their initial values first
    model.compile(optimizer="adam", loss="mse")
    x = images(4, seed=2)
    model.fit(x, (x > 0.5).astype(np.float32), epochs=1, batch_size=2, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(
        np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False))
    )
    if policy:
        assert loaded.get_layer("enc1_conv").compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 0},
        {"depth": -1},
        {"base_filters": 0},
        {"blocks_per_level": -1},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="bad model shape"):
        build_resnet_unet(**kwargs)


# --------------------------------------------------------------------------- the empty head
@pytest.mark.parametrize("size", [101, 64])
def test_empty_head_shapes_and_layers(size):
    from saltlib.model import IMAGE_FEATURES

    kw = dict(input_shape=(size, size, 1), base_filters=4, depth=2, blocks_per_level=1, empty_head=True)
    infer = build_resnet_unet(**kw)
    train_form = build_resnet_unet(**kw, aux_outputs=True, dtype_policy="mixed_bfloat16")
    x = images(3, size=size)
    assert infer(x).shape == (3, size, size, 1)
    out = np.asarray(train_form(x, training=False))
    assert out.shape == (3, size, size, 3) and out.dtype == np.float32
    # channel 2 is one image logit per image, repeated over the pixels
    np.testing.assert_array_equal(out[..., 2], np.broadcast_to(out[:, :1, :1, 2], out[..., 2].shape))
    # the final convolution sees the decoder's 4 channels and the image features
    assert infer.get_layer("logits").kernel.shape == (1, 1, 4 + IMAGE_FEATURES, 1)
    names = {layer.name for layer in infer.layers}
    assert {"image_pool", "image_fc", "fuse_concat"} <= names
    assert not {"seg_logits", "image_logit"} & names  # training outputs only
    weighted = {layer.name for layer in infer.layers if layer.weights}
    assert weighted <= {layer.name for layer in train_form.layers}  # weights carry over by name


def test_empty_head_image_features_reach_every_pixel():
    """The fused logits depend on the image head: changing image_fc's bias shifts every pixel."""
    model = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1, dropout=0.0, empty_head=True)
    x = images(2)
    before = np.asarray(model(x))
    fc = model.get_layer("image_fc")
    fc.bias.assign(np.full(fc.bias.shape, 5.0, np.float32))
    kernel = model.get_layer("logits").kernel
    kernel.assign(np.ones(kernel.shape, np.float32))
    after = np.asarray(model(x))
    assert (np.abs(after - before) > 1e-3).mean() == 1.0


def test_aux_outputs_need_the_empty_head():
    with pytest.raises(ValueError, match="aux_outputs needs empty_head"):
        build_resnet_unet(base_filters=4, depth=2, aux_outputs=True)


# --------------------------------------------------------------------------- upscale, pad_to
def _block_mean(a, k: int):
    """``(N, k*101, k*101, C)`` -> ``(N, 101, 101, C)``: the mean of each k x k block (numpy)."""
    return a.reshape(len(a), 101, k, 101, k, a.shape[-1]).mean(axis=(2, 4))


def _check_train_form_and_saving(model, x, out, tmp_path, empty_head, **shape):
    """With the image head, the training form of the same ``shape`` outputs the three stacked heads
    at 101x101; and the model, saved and loaded, predicts ``out`` again."""
    if empty_head:
        train_form = build_resnet_unet(base_filters=2, blocks_per_level=1, empty_head=True, aux_outputs=True, **shape)
        assert train_form.output_shape == (None, 101, 101, 3)
    path = tmp_path / "m.keras"
    model.save(path)
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(path)(x)), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upscale,empty_head", [(2, False), (2, True), (3, False)])
def test_upscale_runs_the_unet_larger_and_averages_back(upscale, empty_head, tmp_path):
    """101x101 in and out; inside, the U-Net (and the head) run at k*101, and the output is the mean of
    each k x k block of the full-size logits (checked against numpy)."""
    model = build_resnet_unet(base_filters=2, depth=2, blocks_per_level=1, dropout=0.0, empty_head=empty_head,
                              upscale=upscale)
    size = 101 * upscale
    assert model.get_layer("upscale").output.shape[1:3] == (size, size)
    assert model.get_layer("enc1_conv").output.shape[1:3] == (size, size)
    x = images(2)
    out = np.asarray(model(x))
    assert out.shape == (2, 101, 101, 1)
    full = np.asarray(keras.Model(model.input, model.get_layer("logits").output)(x))
    assert full.shape == (2, size, size, 1)
    np.testing.assert_allclose(out, _block_mean(full, upscale), rtol=1e-5, atol=1e-5)
    _check_train_form_and_saving(model, x, out, tmp_path, empty_head, depth=2, upscale=upscale)


def test_upscale_one_adds_no_layers_and_zero_is_rejected():
    names = {layer.name for layer in build_resnet_unet(base_filters=2, depth=2, upscale=1).layers}
    assert not {"upscale", "downscale"} & names
    with pytest.raises(ValueError, match="upscale=0"):
        build_resnet_unet(base_filters=2, depth=2, upscale=0)


@pytest.mark.parametrize("pad_to,upscale,empty_head,border", [
    (128, 1, False, ((13, 14), (13, 14))),
    (128, 1, True, ((13, 14), (13, 14))),
    (102, 1, False, ((0, 1), (0, 1))),
    (208, 2, False, ((3, 3), (3, 3))),
])
def test_pad_to_runs_the_unet_on_the_padded_image_and_crops_back(pad_to, upscale, empty_head, border, tmp_path):
    """101x101 in and out; inside, zeros around the (enlarged) image, every level at the padded
    size (128: 128 -> 64 -> 32 -> 16, halvings all even), and the output is the centre of the
    full-size logits, cut where the image was (checked by slicing)."""
    model = build_resnet_unet(base_filters=2, depth=3, blocks_per_level=1, dropout=0.0, empty_head=empty_head,
                              upscale=upscale, pad_to=pad_to)
    assert model.get_layer("pad").padding == border
    assert model.get_layer("enc1_conv").output.shape[1:3] == (pad_to, pad_to)
    assert [model.get_layer(f"enc{i}_pool").output.shape[1] for i in (1, 2, 3)] == [pad_to // 2, pad_to // 4, pad_to // 8]
    x = images(2)
    padded = np.asarray(keras.Model(model.input, model.get_layer("pad").output)(x))
    (top, bottom), (left, right) = border
    size = 101 * upscale
    assert padded.shape == (2, pad_to, pad_to, 1) and top + size + bottom == pad_to
    inner = padded[:, top:top + size, left:left + size]
    assert padded.sum() == pytest.approx(inner.sum(), rel=1e-6)  # zeros outside the image
    full = np.asarray(keras.Model(model.input, model.get_layer("logits").output)(x))
    centre = full[:, top:top + size, left:left + size]
    out = np.asarray(model(x))
    assert out.shape == (2, 101, 101, 1)
    np.testing.assert_allclose(out, _block_mean(centre, upscale), rtol=1e-5, atol=1e-5)
    _check_train_form_and_saving(model, x, out, tmp_path, empty_head, depth=3, upscale=upscale, pad_to=pad_to)


def test_pad_to_zero_adds_no_layers_and_a_small_size_is_rejected():
    names = {layer.name for layer in build_resnet_unet(base_filters=2, depth=2).layers}
    assert not {"pad", "crop"} & names
    with pytest.raises(ValueError, match=r"pad_to=100 is smaller than the input \(101x101\)"):
        build_resnet_unet(base_filters=2, depth=2, pad_to=100)
    with pytest.raises(ValueError, match=r"pad_to=128 is smaller than the enlarged input \(202x202\)"):
        build_resnet_unet(base_filters=2, depth=2, upscale=2, pad_to=128)


# --------------------------------------------------------------------------- scSE, hypercolumn
def test_scse_block_matches_numpy():
    """scSE = x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + x * sigmoid(conv1x1(x)), checked in numpy."""
    from saltlib.model import scse_block

    rng = np.random.default_rng(3)
    inp = keras.Input((5, 7, 8))
    model = keras.Model(inp, scse_block(inp, "s", reduction=4))
    assert model.get_layer("s_cse_fc1").units == 2 and model.get_layer("s_cse_fc2").units == 8
    for layer in model.layers:  # random weights, biases included
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])
    x = rng.normal(size=(2, 5, 7, 8)).astype(np.float32)

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    w1, b1 = model.get_layer("s_cse_fc1").get_weights()
    w2, b2 = model.get_layer("s_cse_fc2").get_weights()
    ws, bs = model.get_layer("s_sse_conv").get_weights()
    gate_c = sigmoid(np.maximum(x.mean(axis=(1, 2)) @ w1 + b1, 0) @ w2 + b2)  # (B, C)
    gate_s = sigmoid(x @ ws[0, 0] + bs)  # (B, H, W, 1)
    expected = x * gate_c[:, None, None, :] + x * gate_s
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-5)


def test_scse_ends_every_decoder_level():
    model = build_resnet_unet(base_filters=4, depth=3, blocks_per_level=1, scse=True)
    for i in (1, 2, 3):
        assert model.get_layer(f"dec{i}_scse_add").output.shape[-1] == 4 * 2 ** (i - 1)
    plain = {layer.name for layer in build_resnet_unet(base_filters=4, depth=3, blocks_per_level=1).layers}
    assert not any("scse" in n for n in plain)
    assert model.output_shape == (None, 101, 101, 1)


@pytest.mark.parametrize("empty_head", [False, True])
def test_hypercolumn_feeds_every_decoder_level_to_the_logits(empty_head):
    from saltlib.model import IMAGE_FEATURES

    model = build_resnet_unet(base_filters=4, depth=3, blocks_per_level=1, dropout=0.0, hypercolumn=True,
                              empty_head=empty_head)
    # dec1 (4 channels at 101) + dec2 (8 at 50) + dec3 (16 at 25), the coarse ones resized to 101
    assert model.get_layer("hypercolumn").output.shape[1:] == (101, 101, 4 + 8 + 16)
    assert [model.get_layer(f"hyper{i}_resize").output.shape[1:3] for i in (2, 3)] == [(101, 101)] * 2
    assert model.get_layer("logits").kernel.shape[2] == 28 + (IMAGE_FEATURES if empty_head else 0)
    # the coarsest decoder level now reaches the logits directly: zero its weights in the final
    # convolution and the output changes
    x = images(2)
    before = np.asarray(model(x))
    kernel = model.get_layer("logits").kernel
    k = np.asarray(kernel).copy()
    k[:, :, 12:28] = 0  # dec3's 16 channels
    kernel.assign(k)
    assert np.abs(np.asarray(model(x)) - before).max() > 1e-4


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_scse_hypercolumn_train_form_saving_and_gradients(policy, tmp_path):
    kw = dict(base_filters=2, depth=2, blocks_per_level=1, scse=True, hypercolumn=True, empty_head=True)
    train_form = build_resnet_unet(**kw, aux_outputs=True, dtype_policy=policy)
    assert train_form.output_shape == (None, 101, 101, 3)
    infer = build_resnet_unet(**kw, dtype_policy=policy)
    assert {layer.name for layer in infer.layers if layer.weights} <= {layer.name for layer in train_form.layers}
    x = images(4, seed=5)
    train_form.compile(optimizer="adam", loss="mse")
    before = [np.asarray(w).copy() for w in train_form.get_layer("dec2_scse_sse_conv").get_weights()]
    train_form.fit(x, np.repeat((x > 0.5).astype(np.float32), 3, axis=-1), epochs=1, batch_size=2, verbose=0)
    after = train_form.get_layer("dec2_scse_sse_conv").get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(after, before))  # gradients reach the coarse scSE block
    out = np.asarray(infer(x))
    infer.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)(x)), out)


# --------------------------------------------------------------------------- project_head
def _with_weights_of(model, policy):
    """``model``'s network rebuilt with another dtype policy and its weights (float32 reference)."""
    twin = build_resnet_unet(**_HEAD_KW[model.name], dtype_policy=policy, name=model.name)
    twin.set_weights([np.asarray(w, np.float32) for w in model.get_weights()])
    return twin


_HEAD_KW = {
    "hc": dict(hypercolumn=True),
    "hc_head": dict(hypercolumn=True, empty_head=True),
    "se_hc_head": dict(scse=True, hypercolumn=True, empty_head=True),
    "head": dict(empty_head=True),
}
for _kw in _HEAD_KW.values():
    _kw.update(base_filters=3, depth=3, blocks_per_level=1, dropout=0.1)


def _randomized(name, policy, seed=0):
    """A model of ``_HEAD_KW[name]`` with random weights everywhere (batch-norm statistics too), so
    every input channel of the final convolution matters."""
    model = build_resnet_unet(**_HEAD_KW[name], dtype_policy=policy, name=name)
    rng = np.random.default_rng(seed)
    model.set_weights([
        rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in w.path
        else (rng.normal(0, 0.3, w.shape)).astype(np.float32)
        for w in model.weights
    ])
    return model


@pytest.mark.parametrize("name", list(_HEAD_KW))
def test_project_head_gives_the_same_logits_in_float32(name):
    from saltlib.model import project_head

    model = _randomized(name, None)
    fast = project_head(model)
    assert fast is not model
    assert fast.input_shape == model.input_shape and fast.output_shape == model.output_shape
    assert fast.count_params() == model.count_params()  # the kernel's slices, one bias
    x = images(3, seed=1)
    want = np.asarray(model(x, training=False))
    got = np.asarray(fast(x, training=False))
    assert want.std() > 0.01  # not a constant map
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    names = {layer.name for layer in fast.layers}
    # nothing with many channels is enlarged any more: every enlargement carries one channel
    assert "hypercolumn" not in names and "fuse_concat" not in names
    enlarged = [layer for layer in fast.layers if layer.name.endswith("_1ch")]
    assert enlarged and all(layer.output.shape[-1] == 1 for layer in enlarged)
    if "hypercolumn" in _HEAD_KW[name]:
        assert {"hyper2_resize_1ch", "hyper3_resize_1ch"} <= names
    # the original model is untouched and still computes what it did
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), want)


@pytest.mark.parametrize("name", ["hc_head", "se_hc_head"])
def test_project_head_in_bfloat16_is_as_close_to_float32_as_the_model(name):
    """In mixed bfloat16 the projection skips rounding the enlarged features to bfloat16, so its
    logits differ from the model's by that rounding: no further from the float32 computation."""
    from saltlib.model import project_head

    model = _randomized(name, "mixed_bfloat16")
    x = images(3, seed=2)
    exact = np.asarray(_with_weights_of(model, None)(x, training=False))
    err_model = np.abs(np.asarray(model(x, training=False)) - exact).max()
    err_fast = np.abs(np.asarray(project_head(model)(x, training=False)) - exact).max()
    assert err_fast <= 1.5 * err_model + 1e-6, (err_fast, err_model)


@pytest.mark.parametrize("kw", [
    dict(),  # no enlargement feeds the final convolution
    dict(hypercolumn=True, empty_head=True, aux_outputs=True),  # the training form
    dict(hypercolumn=True, pad_to=128),  # the logits are cropped afterwards
    dict(hypercolumn=True, upscale=2),  # ... or averaged back
    dict(hypercolumn=True, depth=1),  # one decoder level: no hypercolumn at all
])
def test_project_head_leaves_other_models_alone(kw):
    from saltlib.model import project_head

    model = build_resnet_unet(**{**dict(base_filters=2, depth=2, blocks_per_level=1, dropout=0.0), **kw})
    assert project_head(model) is model


def test_project_head_of_a_saved_model(tmp_path):
    """Bundles hold ``.keras`` files: the projection works on a loaded model too."""
    from saltlib.model import project_head

    model = _randomized("se_hc_head", None, seed=3)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False, safe_mode=True)
    x = images(2, seed=4)
    want = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(project_head(loaded)(x)), want, atol=2e-5 * np.abs(want).max(), rtol=0)


# --------------------------------------------------------------------------- fold_batchnorm / inference_form
@pytest.mark.parametrize("name", list(_HEAD_KW) + ["plain"])
def test_fold_batchnorm_gives_the_same_logits_in_float32(name):
    """Random weights and batch-norm statistics everywhere: folding changes nothing but the
    layers (float32 rounding only), and leaves the model it folded as it was."""
    from saltlib.model import FoldedBatchNorm, fold_batchnorm

    if name == "plain":
        _HEAD_KW["plain"] = dict(base_filters=3, depth=3, blocks_per_level=1, dropout=0.1)
    try:
        model = _randomized(name, None)
    finally:
        _HEAD_KW.pop("plain", None) if name == "plain" else None
    folded = fold_batchnorm(model)
    assert folded is not model
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    # depth 3, one block per level: 7 levels, each block's middle batch norm folds into its conv1;
    # the batch norms before the block (its input also feeds the residual sum) and after it (an Add's) stay
    mids = sorted(n for n in kinds if n.endswith("_mid_bn"))
    assert len(mids) == 7 and all(kinds[n] == "FoldedBatchNorm" for n in mids)
    assert [n for n, k in kinds.items() if k == "FoldedBatchNorm"] == [n for n in kinds if n.endswith("_mid_bn")]
    assert all(kinds[n] == "BatchNormalization" for n in kinds if n.endswith(("_pre_bn", "_out_bn")))
    assert isinstance(folded.get_layer("enc1_res1_mid_bn"), FoldedBatchNorm)
    assert folded.get_layer("enc1_res1_conv1").use_bias
    x = images(3, seed=5)
    want = np.asarray(model(x, training=False))
    assert want.std() > 0.01
    np.testing.assert_allclose(np.asarray(folded(x, training=False)), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    # the model itself is untouched: its layers called once each, its weights and logits as before
    assert all(len(layer._inbound_nodes) == 1 for layer in model.layers)
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), want)
    again = fold_batchnorm(model)  # so it folds again, the same way
    np.testing.assert_array_equal(np.asarray(again(x, training=False)), np.asarray(folded(x, training=False)))


def test_fold_batchnorm_folds_the_arithmetic_by_hand():
    """One convolution (1x1, 2 -> 2 channels, with bias) and its batch norm, against the formula
    written out: ``(x K + b - mean) * gamma / sqrt(var + eps) + beta``."""
    from saltlib.model import fold_batchnorm

    inputs = keras.Input((3, 3, 2))
    conv = keras.layers.Conv2D(2, 1, name="c")
    bn = keras.layers.BatchNormalization(name="bn", epsilon=0.5)
    model = keras.Model(inputs, bn(conv(inputs)))
    conv.set_weights([np.array([[[[1.0, 2.0], [3.0, -1.0]]]], np.float32), np.array([0.5, -0.5], np.float32)])
    bn.set_weights([np.array(v, np.float32) for v in ([2.0, 1.0], [0.1, 0.0], [1.0, -1.0], [3.5, 0.5])])
    x = np.zeros((1, 3, 3, 2), np.float32)
    x[0, 0, 0] = [1.0, 1.0]
    # pixel (0, 0): conv = [1 + 3 + 0.5, 2 - 1 - 0.5] = [4.5, 0.5]; bn: [(4.5 - 1) * 2 / 2 + 0.1,
    # (0.5 + 1) * 1 / 1 + 0] = [3.6, 1.5]; a zero pixel: conv = [0.5, -0.5] -> [-0.4, 0.5]
    folded = fold_batchnorm(model)
    got = np.asarray(folded(x))
    np.testing.assert_allclose(got[0, 0, 0], [3.6, 1.5], rtol=1e-6)
    np.testing.assert_allclose(got[0, 1, 1], [-0.4, 0.5], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-6, atol=1e-7)
    kernel, bias = folded.get_layer("c").get_weights()
    np.testing.assert_allclose(kernel[0, 0], [[1.0, 2.0], [3.0, -1.0]], rtol=1e-6)  # scales 2/2 and 1/1
    np.testing.assert_allclose(bias, [-0.4, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(blocks_per_level=0),  # a level is a convolution alone: no batch norm at all
])
def test_fold_batchnorm_leaves_models_without_a_foldable_pair_alone(kw):
    from saltlib.model import fold_batchnorm

    model = build_resnet_unet(**{**dict(base_filters=2, depth=2, dropout=0.0), **kw})
    assert fold_batchnorm(model) is model


def test_fold_batchnorm_keeps_a_convolution_whose_output_goes_elsewhere_too():
    """A batch norm whose input also feeds another layer (or that follows an activation) stays."""
    from saltlib.model import fold_batchnorm

    inputs = keras.Input((4, 4, 1))
    c1 = keras.layers.Conv2D(2, 1, name="c1")(inputs)
    b1 = keras.layers.BatchNormalization(name="b1")(c1)
    c2 = keras.layers.Conv2D(2, 1, activation="relu", name="c2")(inputs)
    b2 = keras.layers.BatchNormalization(name="b2")(c2)
    model = keras.Model(inputs, keras.layers.Add(name="sum")([b1, c1, b2]))
    assert fold_batchnorm(model) is model


@pytest.mark.parametrize("name", ["hc_head", "se_hc_head"])
def test_inference_form_in_bfloat16_is_as_close_to_float32_as_the_model(name):
    """Folded and projected in mixed bfloat16: no further from the float32 network than the model."""
    from saltlib.model import inference_form

    model = _randomized(name, "mixed_bfloat16")
    x = images(3, seed=2)
    exact = np.asarray(_with_weights_of(model, None)(x, training=False))
    err_model = np.abs(np.asarray(model(x, training=False)) - exact).max()
    err_fast = np.abs(np.asarray(inference_form(model)(x, training=False)) - exact).max()
    assert err_fast <= 1.5 * err_model + 1e-6, (err_fast, err_model)


def test_inference_form_of_a_saved_model(tmp_path):
    """Bundles hold ``.keras`` files: the loaded model folds and projects, to the same logits."""
    from saltlib.model import inference_form

    model = _randomized("se_hc_head", None, seed=3)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False, safe_mode=True)
    fast = inference_form(loaded)
    names = {type(layer).__name__ for layer in fast.layers}
    assert "FoldedBatchNorm" in names and "hypercolumn" not in {layer.name for layer in fast.layers}
    x = images(2, seed=4)
    want = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(fast(x)), want, atol=2e-5 * np.abs(want).max(), rtol=0)


# --------------------------------------------------------------------------- the training form's final convolutions
def _concatenated_training_form(**kw):
    """The training form as it was built before its final convolutions went part by part: the
    inference form's graph (hypercolumn and image features enlarged and concatenated) plus the two
    training heads, as plain ``keras.layers.Conv2D``: the reference."""
    from keras import layers

    infer = build_resnet_unet(**kw)
    fused = infer.get_layer("fuse_concat")
    x = fused.input[0]
    logits = infer.get_layer("logits").output
    image_logit = layers.Dense(1, name="image_logit", dtype="float32")(infer.get_layer("image_fc").output)
    seg_logits = layers.Conv2D(1, 1, name="seg_logits", dtype="float32")(x)
    image_map = layers.Reshape((1, 1, 1), dtype="float32")(image_logit)
    image_map = layers.UpSampling2D(logits.shape[1:3], dtype="float32")(image_map)
    out = layers.Concatenate(dtype="float32")([logits, seg_logits, image_map])
    if "crop" in {layer.name for layer in infer.layers}:
        out = layers.Cropping2D(infer.get_layer("crop").cropping, dtype="float32")(out)
    return keras.Model(infer.inputs, out)


@pytest.mark.parametrize("kw", [
    dict(hypercolumn=True, scse=True),
    dict(hypercolumn=True),
    dict(),  # the image features alone are projected
    dict(hypercolumn=True, pad_to=112),
])
def test_training_form_convolves_part_by_part_as_the_concatenation_does(kw, tmp_path):
    """The training form's ``logits`` and ``seg_logits`` (:class:`saltlib.model.Conv2D`, part by part)
    compute what the concatenated form computes (float32, random weights everywhere), and the two
    forms' weight files (the training checkpoints) load into each other."""
    kw = dict(base_filters=3, depth=3, blocks_per_level=1, dropout=0.1, empty_head=True, **kw)
    reference = _concatenated_training_form(**kw)
    rng = np.random.default_rng(1)
    reference.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in w.path
                           else rng.normal(0, 0.3, w.shape).astype(np.float32) for w in reference.weights])
    part_by_part = build_resnet_unet(**kw, aux_outputs=True)
    assert type(part_by_part.get_layer("logits")).__module__ == "saltlib.model"
    reference.save_weights(tmp_path / "a.weights.h5")
    part_by_part.load_weights(tmp_path / "a.weights.h5")
    x = images(3, seed=2)
    want = np.asarray(reference(x, training=False))
    np.testing.assert_allclose(np.asarray(part_by_part(x, training=False)), want, atol=1e-5 * np.abs(want).max())
    part_by_part.save_weights(tmp_path / "b.weights.h5")
    back = _concatenated_training_form(**kw)
    back.load_weights(tmp_path / "b.weights.h5")
    np.testing.assert_array_equal(np.asarray(back(x, training=False)), want)


def test_part_by_part_conv2d_checks_and_config():
    from saltlib.model import Conv2D

    with pytest.raises(ValueError, match="not all spread"):
        Conv2D(1, ["spread"], (5, 5))
    with pytest.raises(ValueError, match="same/resize/spread"):
        Conv2D(1, ["same", "nearest"], (5, 5))
    layer = Conv2D(2, ["same", "resize", "spread"], (6, 6), name="c")
    parts = [np.ones((1, 6, 6, 2), np.float32), np.ones((1, 3, 3, 4), np.float32), np.ones((1, 5), np.float32)]
    out = np.asarray(layer(parts))
    assert out.shape == (1, 6, 6, 2) and layer.kernel.shape == (1, 1, 11, 2)
    # constant inputs: every pixel is the kernel's column sums plus the bias
    np.testing.assert_allclose(out[0, 3, 3], np.asarray(layer.kernel)[0, 0].sum(0) + np.asarray(layer.bias), rtol=1e-5)
    again = Conv2D.from_config(layer.get_config())
    assert (again.modes, again.size, again.filters) == (("same", "resize", "spread"), (6, 6), 2)
    with pytest.raises(ValueError, match="2 inputs for 3 modes"):
        Conv2D(1, ["same", "resize", "spread"], (6, 6))(parts[:2])
