"""The ResNet-U-Net: a U-Net (Ronneberger et al. 2015) whose levels are pre-activation residual
blocks (He et al. 2016) with batch normalization (Ioffe and Szegedy 2015). It runs at the native
101x101 size: the decoder's transposed convolutions use ``valid`` padding where a skip connection
has an odd size (6 -> 12 -> 25 -> 50 -> 101), so no padding or cropping is needed.

With ``empty_head`` it also has an image-level head in the style of the top TGS solutions (deep
supervision with an empty/non-empty classifier): the globally pooled bottleneck predicts whether the
image holds salt, and its features reach every pixel of the final 1x1 convolution, so a whole image
can be switched off at once. For training, ``aux_outputs`` stacks the heads as channels (see
:func:`build_resnet_unet`); :func:`saltlib.losses.with_empty_head` is the matching loss.

With ``upscale`` k > 1 the network works on the image enlarged k times (bilinear, inside the model,
e.g. 101 -> 202 as several top TGS solutions did, for small salt bodies) and average-pools its
logits back over k x k blocks, so the model still maps 101x101 images to 101x101 logits and
everything around it (data, losses, bundles, ``salt predict``) is unchanged.

With ``pad_to`` (e.g. 128, as many TGS solutions padded 101 -> 128) the network works on the image
zero-padded to that size, every halving then even, and crops its logits back to 101x101.

Two decoder options of the top TGS solutions: ``scse`` recalibrates each decoder level's output with
concurrent spatial and channel squeeze-and-excitation (Roy, Navab and Wachinger 2018), and
``hypercolumn`` feeds the final convolution with every decoder level's output, resized to full size
(Hariharan et al. 2015), not only the last one's.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

#: width of the image-level features that ``empty_head`` broadcasts to every pixel
IMAGE_FEATURES = 16
#: channel squeeze ratio of the scSE blocks (a 16-channel level squeezes to 4 units)
SCSE_REDUCTION = 4


def _bn_relu(x, name, dtype):
    x = layers.BatchNormalization(name=f"{name}_bn", dtype=dtype)(x)
    return layers.Activation("relu", name=f"{name}_relu", dtype=dtype)(x)


def residual_block(x, filters: int, name: str, activate: bool = False, dtype=None):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input.

    Args:
        x: ``(B, H, W, filters)`` tensor.
        filters: channels (must equal the input's).
        name: prefix for the layer names.
        activate: add a final BN-ReLU (used on the last block of a level).
    Returns:
        tensor of the same shape.
    """
    y = _bn_relu(x, f"{name}_pre", dtype)
    y = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv1", dtype=dtype)(y)
    y = _bn_relu(y, f"{name}_mid", dtype)
    y = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv2", dtype=dtype)(y)
    y = layers.Add(name=f"{name}_add", dtype=dtype)([y, x])
    if activate:
        y = _bn_relu(y, f"{name}_out", dtype)
    return y


def scse_block(x, name: str, reduction: int = SCSE_REDUCTION, dtype=None):
    """Concurrent spatial and channel squeeze-and-excitation (scSE, Roy et al. 2018).

    The channel branch (cSE) pools the map globally, squeezes it through a ReLU layer of
    ``max(1, C // reduction)`` units and rescales each channel by a sigmoid gate in (0, 1); the
    spatial branch (sSE) rescales each pixel by a sigmoid of a 1x1 convolution to one channel. The
    output is the sum of the two rescaled maps.

    Args:
        x: ``(B, H, W, C)`` tensor.
        name: prefix for the layer names (``{name}_cse_pool``, ``_cse_fc1``, ``_cse_fc2``,
            ``_cse_scale``, ``_sse_conv``, ``_sse_scale``, ``_add``).
        reduction: channel squeeze ratio.
        dtype: Keras dtype policy of the layers.
    Returns:
        tensor of the same shape.
    """
    channels = x.shape[-1]
    c = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_cse_pool", dtype=dtype)(x)
    c = layers.Dense(max(1, channels // reduction), activation="relu", name=f"{name}_cse_fc1", dtype=dtype)(c)
    c = layers.Dense(channels, activation="sigmoid", name=f"{name}_cse_fc2", dtype=dtype)(c)
    c = layers.Multiply(name=f"{name}_cse_scale", dtype=dtype)([x, c])
    s = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_sse_conv", dtype=dtype)(x)
    s = layers.Multiply(name=f"{name}_sse_scale", dtype=dtype)([x, s])
    return layers.Add(name=f"{name}_add", dtype=dtype)([c, s])


@keras.saving.register_keras_serializable(package="saltlib")
class Conv2D(layers.Conv2D):
    """A 1x1 convolution of the channel concatenation of parts that arrive at different sizes,
    computed part by part: each part is projected by its slice of the kernel where it is, and only
    the projection is enlarged to the output size, then the parts are summed with the bias.

    ``conv(concat(enlarge(parts))) == sum(enlarge(conv_part(part)))``, as a 1x1 convolution, bilinear
    resizing and broadcasting are all linear, channel by channel; the second form enlarges
    ``filters`` channels per part instead of all of the part's. The training form of
    :func:`build_resnet_unet` computes its final convolutions (``logits``, ``seg_logits``) so when they
    see the hypercolumn or the image features (:func:`project_head` does the same for inference).

    The class keeps Keras' name on purpose: weight files (``.weights.h5``, the training checkpoints)
    address a layer by its class name and position, so checkpoints of a model built with
    ``keras.layers.Conv2D`` here load into this one and back. The kernel has the shape the concatenated
    form's would, ``(1, 1, sum of the parts' channels, filters)``.

    Args:
        filters: output channels.
        modes: one per part, in channel order: ``"same"`` (already ``(B, *size, C)``), ``"resize"``
            (``(B, h, w, C)``, enlarged bilinearly to ``size`` as ``layers.Resizing`` does) or
            ``"spread"`` (``(B, C)`` features, the same at every pixel); at least one not ``"spread"``.
        size: ``(H, W)`` of the output.
        **kwargs: ``layers.Conv2D`` options (``name``, ``dtype``, initializers, ...).
    """

    def __init__(self, filters, modes, size, **kwargs):
        kwargs.pop("kernel_size", None)
        super().__init__(filters, 1, **kwargs)
        self.input_spec = None  # a list of tensors, not the one map Conv2D's spec describes
        self.modes, self.size = tuple(modes), tuple(int(v) for v in size)
        if set(self.modes) - {"same", "resize", "spread"} or all(m == "spread" for m in self.modes):
            raise ValueError(f"{self.name}: modes {self.modes} must be same/resize/spread, not all spread")

    def build(self, input_shape):
        if len(input_shape) != len(self.modes):
            raise ValueError(f"{self.name}: {len(input_shape)} inputs for {len(self.modes)} modes")
        self.part_channels = [int(shape[-1]) for shape in input_shape]
        super().build((None, *self.size, sum(self.part_channels)))
        self.input_spec = None

    def compute_output_shape(self, input_shape):
        first = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape  # parts, or the
        return (first[0], *self.size, self.filters)  # concatenation Conv2D.build asks about

    def call(self, inputs):
        ops = keras.ops
        out, start = None, 0
        for x, mode, c in zip(inputs, self.modes, self.part_channels):
            y = ops.matmul(x, ops.cast(self.kernel[0, 0, start:start + c, :], x.dtype))
            start += c
            if mode == "resize":
                y = ops.image.resize(y, self.size, interpolation="bilinear")
            elif mode == "spread":
                y = y[:, None, None, :]
            out = y if out is None else out + y
        if self.use_bias:
            out = out + ops.cast(self.bias, out.dtype)
        return out  # (B, *size, filters): a part not "spread" has the full size, the sums broadcast

    def get_config(self):
        return {**super().get_config(), "modes": list(self.modes), "size": list(self.size)}


def _level(x, filters, blocks, name, dtype):
    x = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv", dtype=dtype)(x)
    for b in range(blocks):
        x = residual_block(x, filters, f"{name}_res{b + 1}", activate=b == blocks - 1, dtype=dtype)
    return x


def build_resnet_unet(
    input_shape=(101, 101, 1),
    base_filters: int = 16,
    depth: int = 4,
    blocks_per_level: int = 2,
    dropout: float = 0.5,
    dtype_policy: str | None = None,
    empty_head: bool = False,
    aux_outputs: bool = False,
    upscale: int = 1,
    pad_to: int = 0,
    scse: bool = False,
    hypercolumn: bool = False,
    name: str = "resnet_unet",
) -> keras.Model:
    """Build the ResNet-U-Net.

    Args:
        input_shape: ``(H, W, C)``; 101x101 works natively, as does any size whose halvings the
            decoder can undo (``same`` or ``valid`` transposed convolutions).
        base_filters: channels of the first level; level ``i`` has ``base_filters * 2**i`` and the
            bottleneck ``base_filters * 2**depth``.
        depth: number of down-sampling levels (4 gives 101 -> 50 -> 25 -> 12 -> 6).
        blocks_per_level: residual blocks after each level's first convolution.
        dropout: rate after each pooling and each skip concatenation (half of it after the first
            pooling); 0 disables dropout.
        dtype_policy: Keras dtype policy for the layers, e.g. ``"mixed_bfloat16"``; the output
            layer always computes in float32.
        empty_head: add the image-level head: global average pooling of the bottleneck, a dense
            layer ``image_fc`` (``IMAGE_FEATURES`` units, ReLU) whose features are broadcast to every
            pixel and concatenated with the decoder's before the final ``logits`` convolution, and a
            dense ``image_logit`` (salt present?) fed by ``image_fc``.
        aux_outputs: with ``empty_head``, the training form: output ``(B, H, W, 3)`` with channel 0
            the fused logits (the inference output), channel 1 ``seg_logits`` (a 1x1 convolution of
            the decoder's features alone, for deep supervision on images with salt) and channel 2
            the image logit repeated over the pixels. The inference form (False) has the same
            layers with weights less those two heads (``seg_logits``, ``image_logit``), so weights
            carry over by layer name; the training form computes its final convolutions part by
            part (:class:`Conv2D`: the same function, with the hypercolumn about 1.2x faster to
            train), so it lacks the inference form's resizing and concatenation layers.
        upscale: integer factor k: a bilinear ``upscale`` layer enlarges the input to
            ``(k*H, k*W)``, the U-Net (and its head) run at that size, and a ``downscale`` layer
            averages the output over k x k blocks back to ``(H, W)``. 1: no resizing layers.
        pad_to: 0 (no padding) or a size at least ``(k*H, k*W)``: a ``pad`` layer adds zeros around
            the (enlarged) image, split evenly with the extra row/column at the bottom/right (101 ->
            128: 13 above, 14 below), the U-Net (and its head) run at ``pad_to x pad_to``, and a
            ``crop`` layer cuts the logits back before any ``downscale``.
        scse: end every decoder level with an scSE block (:func:`scse_block`, layers ``dec{i}_scse_*``).
        hypercolumn: the final convolution(s) see the concatenation (``hypercolumn``) of every
            decoder level's output, the coarser ones enlarged bilinearly (``hyper{i}_resize``) to
            the full size: ``base_filters * (2**depth - 1)`` channels instead of ``base_filters``
            (with ``depth`` 1 there is one decoder level and nothing to add).
        name: model name.
    Returns:
        a ``keras.Model`` mapping ``(B, H, W, C)`` images in [0, 1] to ``(B, H, W, 1)`` float32
        logits (apply a sigmoid for probabilities), or ``(B, H, W, 3)`` with ``aux_outputs``.
    """
    if aux_outputs and not empty_head:
        raise ValueError("aux_outputs needs empty_head=True (they are the image head's training outputs)")
    if depth < 1 or base_filters < 1 or blocks_per_level < 0 or not 0 <= dropout < 1 or upscale < 1:
        raise ValueError(
            f"bad model shape: depth={depth}, base_filters={base_filters}, "
            f"blocks_per_level={blocks_per_level}, dropout={dropout}, upscale={upscale}"
        )
    dt = dtype_policy
    inputs = keras.Input(shape=input_shape, name="image")
    h, w = input_shape[0] * upscale, input_shape[1] * upscale
    if pad_to and pad_to < max(h, w):
        raise ValueError(f"pad_to={pad_to} is smaller than the {'enlarged ' if upscale > 1 else ''}input ({h}x{w})")
    crop = (_halves(pad_to - h), _halves(pad_to - w)) if pad_to else None  # ((top, bottom), (left, right))
    x = inputs
    if upscale > 1:
        x = layers.Resizing(h, w, interpolation="bilinear", name="upscale")(x)
    if crop:
        x = layers.ZeroPadding2D(crop, name="pad")(x)
        h = w = pad_to
    skips = []
    for i in range(depth):
        x = _level(x, base_filters * 2**i, blocks_per_level, f"enc{i + 1}", dt)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i + 1}_pool", dtype=dt)(x)
        if dropout:
            x = layers.Dropout(dropout / 2 if i == 0 else dropout, name=f"enc{i + 1}_drop", dtype=dt)(x)
    x = _level(x, base_filters * 2**depth, blocks_per_level, "middle", dt)
    bottleneck = x
    decoded = []  # each decoder level's output, dec{depth} (coarsest) first
    for i in reversed(range(depth)):
        skip = skips[i]
        f = base_filters * 2**i
        in_size, out_size = x.shape[1], skip.shape[1]
        padding = "same" if out_size == 2 * in_size else "valid"
        if padding == "valid" and out_size != 2 * in_size + 1:
            raise ValueError(f"cannot up-sample {in_size} to {out_size} at level {i + 1}")
        x = layers.Conv2DTranspose(f, 3, strides=2, padding=padding, name=f"dec{i + 1}_up", dtype=dt)(x)
        x = layers.Concatenate(name=f"dec{i + 1}_concat", dtype=dt)([x, skip])
        if dropout:
            x = layers.Dropout(dropout, name=f"dec{i + 1}_drop", dtype=dt)(x)
        x = _level(x, f, blocks_per_level, f"dec{i + 1}", dt)
        if scse:
            x = scse_block(x, f"dec{i + 1}_scse", dtype=dt)
        decoded.append(x)
    parts, modes = [x], ["same"]  # what the final convolutions see, in channel order
    training_form = empty_head and aux_outputs  # convolves the parts where they are (Conv2D above)
    if hypercolumn and depth > 1:
        finest, *coarser = reversed(decoded)  # dec1, then dec2, dec3, ...
        parts, modes = [finest, *coarser], ["same"] + ["resize"] * len(coarser)
        if not training_form:
            enlarged = [
                layers.Resizing(*finest.shape[1:3], interpolation="bilinear", name=f"hyper{i + 2}_resize",
                                dtype=dt)(d)
                for i, d in enumerate(coarser)
            ]
            x = layers.Concatenate(name="hypercolumn", dtype=dt)([finest, *enlarged])
    if not empty_head:
        outputs = layers.Conv2D(1, 1, name="logits", dtype="float32")(x)
        return keras.Model(inputs, _downscale(_crop(outputs, crop), upscale), name=name)
    image = layers.GlobalAveragePooling2D(name="image_pool", dtype=dt)(bottleneck)
    image = layers.Dense(IMAGE_FEATURES, activation="relu", name="image_fc", dtype=dt)(image)
    image_logit = layers.Dense(1, name="image_logit", dtype="float32")(image)
    if not aux_outputs:
        spread = layers.Reshape((1, 1, IMAGE_FEATURES), name="image_reshape", dtype=dt)(image)
        spread = layers.UpSampling2D((h, w), name="image_spread", dtype=dt)(spread)
        fused = layers.Concatenate(name="fuse_concat", dtype=dt)([x, spread])
        logits = layers.Conv2D(1, 1, name="logits", dtype="float32")(fused)
        return keras.Model(inputs, _downscale(_crop(logits, crop), upscale), name=name)
    # the training form: the same function, each final convolution computed part by part before any
    # enlargement (Conv2D above; about 1.2x faster training with the hypercolumn)
    size = parts[0].shape[1:3]
    logits = Conv2D(1, [*modes, "spread"], size, name="logits", dtype="float32")([*parts, image])
    seg_logits = Conv2D(1, modes, size, name="seg_logits", dtype="float32")(parts)
    image_map = layers.Reshape((1, 1, 1), name="image_logit_reshape", dtype="float32")(image_logit)
    image_map = layers.UpSampling2D((h, w), name="image_logit_spread", dtype="float32")(image_map)
    outputs = layers.Concatenate(name="heads", dtype="float32")([logits, seg_logits, image_map])
    return keras.Model(inputs, _downscale(_crop(outputs, crop), upscale), name=name)


def _halves(n: int) -> tuple[int, int]:
    """``n`` rows (or columns) of padding split in two, the extra one last: 27 -> (13, 14)."""
    return n // 2, n - n // 2


def _crop(x, crop):
    """Cut the ``pad`` layer's border off the logits (``crop`` None: no padding, ``x`` as it is)."""
    return x if crop is None else layers.Cropping2D(crop, name="crop", dtype="float32")(x)


def _downscale(x, upscale: int):
    """Average ``(B, k*H, k*W, C)`` logits over k x k blocks to ``(B, H, W, C)`` (k = ``upscale``)."""
    if upscale == 1:
        return x
    return layers.AveragePooling2D(upscale, name="downscale", dtype="float32")(x)


def _producer(tensor):
    """The layer whose output ``tensor`` is (a functional model's symbolic tensor)."""
    return tensor._keras_history.operation


def project_head(model) -> keras.Model:
    """The same function as ``model``, with its final 1x1 ``logits`` convolution moved in front of
    the enlargements that feed it: an inference speed-up for the hypercolumn and the image head.

    ``logits`` is linear, and so are bilinear resizing and nearest up-sampling, channel by channel,
    so ``conv(resize(x)) == resize(conv(x))``: each part of the concatenation the final convolution
    sees (``hypercolumn``, ``fuse_concat``) is projected to one channel by its slice of the kernel
    where it is small (a coarse decoder level before ``hyper{i}_resize``, the image features
    before ``image_spread``) and only that channel is enlarged; the parts are summed (``logits``,
    an ``Add``). With the hypercolumn that replaces enlarging 224 channels (16 base filters) to
    101x101 by enlarging 3. The projections compute in float32, so for a bfloat16 model the result
    differs from ``model``'s by bfloat16 rounding of the enlarged features (which it skips) only.

    The result shares ``model``'s layers and weights up to the projections (new layers holding
    slices of the ``logits`` kernel). It is for inference: the training form (``aux_outputs``),
    and models whose output is not the ``logits`` layer's (``pad_to``, ``upscale``) or that have
    nothing to project (no hypercolumn and no image head), come back unchanged.

    Args:
        model: a functional model from :func:`build_resnet_unet` (or loaded from its file).
    Returns:
        a ``keras.Model`` with the same input and output shapes, or ``model`` itself.
    """
    names = {layer.name for layer in model.layers}
    if "logits" not in names or len(model.outputs) != 1:
        return model
    head = model.get_layer("logits")
    if model.outputs[0] is not head.output or head.kernel_size != (1, 1) or head.activation.__name__ != "linear":
        return model
    leaves, stack = [], [head.input]  # the concatenated tensors, in channel order
    while stack:
        t = stack.pop(0)
        op = _producer(t)
        if isinstance(op, layers.Concatenate) and op.axis in (-1, 3):
            stack = list(op.input) + stack
        else:
            leaves.append(t)
    enlarge = (layers.Resizing, layers.UpSampling2D)
    if not any(isinstance(_producer(t), enlarge) for t in leaves):
        return model
    kernel, bias = head.get_weights()
    parts, start = [], 0
    for t in leaves:
        op = _producer(t)
        channels = t.shape[-1]
        w = kernel[:, :, start:start + channels, :]
        start += channels
        small = isinstance(op, enlarge)
        proj = layers.Conv2D(1, 1, use_bias=not parts, dtype="float32", name=f"logits_{op.name}")
        y = proj(op.input if small else t)
        proj.set_weights([w, bias] if not parts else [w])
        if small:
            y = type(op).from_config({**op.get_config(), "name": f"{op.name}_1ch", "dtype": "float32"})(y)
        parts.append(y)
    if start != kernel.shape[2]:
        return model  # the concatenation is not what the kernel expects: leave the model alone
    out = layers.Add(name="logits", dtype="float32")(parts) if len(parts) > 1 else parts[0]
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one tensor, as the model takes it
    return keras.Model(inputs, out, name=model.name)


@keras.saving.register_keras_serializable(package="saltlib")
class FoldedBatchNorm(layers.Layer):
    """Stands where a ``BatchNormalization`` was whose inference affine map :func:`fold_batchnorm`
    moved into the convolution before it: passes its input through unchanged (and takes the
    ``training`` and ``mask`` arguments the batch norm's call had)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _consumers(model) -> dict:
    """``id(tensor)`` -> number of layer calls in ``model`` that take it as an input."""
    count = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                count[id(t)] = count.get(id(t), 0) + 1
    return count


def fold_batchnorm(model) -> keras.Model:
    """The same function as ``model`` at inference, with every batch normalization that directly
    follows a convolution folded into that convolution's kernel and bias: an inference speed-up.

    At inference a ``BatchNormalization`` is the affine map ``x * s + (beta - mean * s)`` per
    channel, with ``s = gamma / sqrt(moving_variance + epsilon)``; after a convolution ``conv(x) =
    x * K + b`` it is the convolution with kernel ``K * s`` and bias ``(b - mean) * s + beta``.
    That holds where the convolution is linear, is called once and its output feeds that batch
    norm alone: in the ResNet-U-Net, the middle batch norm of every residual block (18 of the 45
    of the 16-filter, depth-4, two-block model). The others follow an ``Add`` or a tensor that the
    residual sum also takes, and stay. A mixed-bfloat16 batch norm computes in float32 between two
    casts, so each folded one saves five passes over its map; on the 2-core AVX512-BF16 CPU the
    shipped bundle's images/s rose by about a sixth (README, Speed).

    The folded weights are computed in float32 from the stored ones and stored in the
    convolution's variable dtype: for a model with float32 variables the logits equal ``model``'s
    within float32 rounding; with bfloat16 variables the folded kernel is rounded to bfloat16 once
    more, an error of the size bfloat16 computing makes anyway. Only for inference: the batch
    norms' training behaviour (batch statistics) is gone.

    Args:
        model: a functional model (from :func:`build_resnet_unet`, loaded from its file, or
            :func:`project_head`'s result).
    Returns:
        a new ``keras.Model`` with the same inputs, outputs and layer names (copies: ``model`` is
        left as it was; each folded batch norm becomes a :class:`FoldedBatchNorm`), or ``model``
        itself where nothing folds.
    """
    used = _consumers(model)
    fold = {}  # convolution name -> the batch norm folded into it
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        t = layer.input
        conv = _producer(t)
        if (
            type(conv) is layers.Conv2D  # not the part-by-part Conv2D above, nor a transposed one
            and layer.axis in (-1, len(t.shape) - 1)
            and conv.activation.__name__ == "linear"
            and len(conv._inbound_nodes) == 1
            and used.get(id(t)) == 1
        ):
            fold[conv.name] = layer
    if not fold:
        return model
    folded_bns = {bn.name for bn in fold.values()}

    def clone(layer):  # a copy of every layer, so that ``model``'s layers keep their one call each
        if layer.name in folded_bns:
            return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy)
        if layer.name in fold:
            return layers.Conv2D.from_config({**layer.get_config(), "use_bias": True})
        return layer.__class__.from_config(layer.get_config())

    out = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in fold:
            out.get_layer(layer.name).set_weights(_folded(layer, fold[layer.name]))
        elif layer.name not in folded_bns and layer.weights:
            out.get_layer(layer.name).set_weights(layer.get_weights())
    return out


def _folded(conv, bn) -> list:
    """``[kernel, bias]`` of the convolution ``conv`` followed by the batch norm ``bn`` (inference), in float32."""
    def f32(v):
        return None if v is None else np.asarray(keras.ops.convert_to_numpy(v), np.float32)

    kernel, bias = f32(conv.kernel), f32(conv.bias) if conv.use_bias else np.float32(0)
    gamma, beta, mean, var = (f32(v) for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    scale = (np.float32(1) if gamma is None else gamma) / np.sqrt(var + np.float32(bn.epsilon))
    offset = (np.float32(0) if beta is None else beta) - mean * scale
    return [kernel * scale, (bias * scale + offset).astype(np.float32)]


def inference_form(model) -> keras.Model:
    """``model`` as ``salt predict`` runs it: :func:`fold_batchnorm`, then :func:`project_head`.
    The same logits (within float32 rounding, or the bfloat16 rounding of the folded kernels)."""
    return project_head(fold_batchnorm(model))


class FlipEnsemble(keras.Model):
    """Several salt models as one: the mean of their logits, with left-right flip TTA if asked.

    Calling it on ``(B, H, W, 1)`` images gives ``(B, H, W)`` float32 logits: each member's logits
    (with ``tta``, averaged with those of the flipped images, flipped back), then the mean over
    the members, the same numbers as predicting member by member. One graph for every member and
    both flips lets the backend overlap them and saves the per-call overhead of ``predict``: on the
    2-core AVX2 CPU, the shipped two-model bundle with TTA used 7% less CPU time per image than with
    one ``predict`` call per member and flip (14 interleaved timings of 128 images; images/s median
    6.61 against 6.53, best 8.95 against 7.90, slowest 6.2 against 4.2).

    Args:
        members: Keras models mapping ``(B, H, W, 1)`` images to ``(B, H, W, 1)`` logits (any
            compute dtype; the output is cast to float32).
        tta: also predict the left-right flipped images (doubles each member's batch).
        name: the model's name.
    """

    def __init__(self, members, tta: bool = False, name: str = "flip_ensemble"):
        super().__init__(name=name)
        if not members:
            raise ValueError("FlipEnsemble needs at least one member model")
        self.members = list(members)
        self.tta = bool(tta)

    def call(self, images):
        ops = keras.ops
        x = ops.concatenate([images, ops.flip(images, axis=2)], axis=0) if self.tta else images
        total = None
        for member in self.members:
            logits = ops.cast(member(x, training=False), "float32")[..., 0]
            if self.tta:
                n = ops.shape(images)[0]
                logits = 0.5 * (logits[:n] + ops.flip(logits[n:], axis=2))
            total = logits if total is None else total + logits
        return total / len(self.members)
