"""Run a Keras model with TensorFlow Lite (XNNPACK) on the CPU: float32, the same logits, faster.

On a CPU without native bfloat16 (the 2-core AMD EPYC with AVX2 of the later sessions), TensorFlow
predicts the shipped two-model bundle with flip TTA at 6.2-7.4 images/s; the same float32 graph
converted to TensorFlow Lite and run by its XNNPACK delegate on both cores at 10.7-11.1, at 94% of the
machine's matrix-multiply rate, and ``salt predict`` writes the same submission byte for byte (the
logits differ by at most 7e-7). Quantizing was measured too and left out: int8 weights and
activations ran at 12.2 against 10.7 images/s and changed 0.4% of the mask pixels; int8 weights
alone ran at 2.4. Figures: README, Speed, "TensorFlow Lite".

:func:`convert` turns a model into TensorFlow Lite bytes (its graph traced with the weights frozen:
13-14 s for the shipped ensemble, seconds for a small one) and :class:`LiteModel` predicts with
them. ``saltlib.predict`` uses them for ``runtime="tflite"`` (see :func:`resolve_runtime`).

``tf.lite.Interpreter`` is deprecated in favour of the ``ai_edge_litert`` package but still ships
with the pinned TensorFlow; where it is gone, :func:`interpreter_class` takes ``ai_edge_litert``
if installed, and :func:`available` says False otherwise (``"auto"`` then keeps Keras).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import OrderedDict

import numpy as np

RUNTIMES = ("auto", "keras", "tflite")


def interpreter_class():
    """The TensorFlow Lite interpreter class: ``tf.lite.Interpreter``, else ``ai_edge_litert``'s.

    Raises:
        ImportError: neither is installed.
    """
    import tensorflow as tf

    cls = getattr(getattr(tf, "lite", None), "Interpreter", None)
    if cls is not None:
        return cls
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError("TensorFlow Lite is not available: this TensorFlow has no tf.lite.Interpreter and "
                          "the ai_edge_litert package is not installed (pip install ai-edge-litert)") from None
    return Interpreter


class ConversionError(RuntimeError):
    """A model could not be traced or converted to TensorFlow Lite (the message says which, and why)."""


def available() -> bool:
    """Whether models can be converted to and run with TensorFlow Lite here."""
    try:
        import tensorflow as tf

        interpreter_class()
        return hasattr(tf.lite, "TFLiteConverter")
    except ImportError:
        return False


def cpu_threads() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_runtime(runtime: str) -> None:
    """Raise ValueError, listing the valid settings, unless ``runtime`` is one of :data:`RUNTIMES`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {runtime!r}")


def resolve_runtime(runtime: str) -> str:
    """``"keras"`` or ``"tflite"`` for a ``runtime`` setting.

    ``"auto"`` picks TensorFlow Lite where it is available, no GPU is visible and the machine has
    no native bfloat16 (there TensorFlow runs bfloat16 models at their fastest; TensorFlow Lite
    runs float32 only, and it was not measured against them); Keras otherwise.

    Raises:
        ValueError: an unknown setting (the message lists the valid ones), or ``"tflite"`` where
            TensorFlow Lite is not available (the message says why).
    """
    check_runtime(runtime)
    if runtime == "tflite" and not available():
        try:
            interpreter_class()
            why = "this TensorFlow has no tf.lite.TFLiteConverter"
        except ImportError as e:
            why = str(e)
        raise ValueError(f"runtime 'tflite': {why}; use runtime 'keras' (or 'auto')")
    if runtime != "auto":
        return runtime
    from . import hardware

    if not available() or hardware.gpu_bf16() is not None or hardware.native_bfloat16():
        return "keras"
    return "tflite"


def convert(model, input_shape) -> bytes:
    """Convert a Keras model to float32 TensorFlow Lite bytes, with a free batch dimension.

    The model's graph is traced once and its weights frozen into constants
    (``convert_variables_to_constants_v2``, the step TensorFlow's own converter takes), then
    converted: 13 s for the shipped two-model ensemble with TTA on 2 AVX2 cores, against 47 s
    through a SavedModel on disk (``model.export``), the fallback where that function is missing.

    Args:
        model: a ``keras.Model`` mapping float32 ``(B, *input_shape)`` to any float output (it must
            compute in float32: bfloat16 layers are not converted).
        input_shape: ``(H, W, C)``.
    Returns:
        the ``.tflite`` flatbuffer (weights in float32: about 4 bytes a parameter).
    Raises:
        ConversionError: the tracing, export or conversion failed (the message says which, and why).
    """
    import tensorflow as tf

    spec = [tf.TensorSpec([None, *input_shape], tf.float32, name="images")]
    if not model.built:  # a subclassed model (FlipEnsemble) builds on its first call
        model(np.zeros((1, *input_shape), np.float32))
    try:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    except ImportError:
        convert_variables_to_constants_v2 = None
    with tempfile.TemporaryDirectory(prefix="saltlib-tflite-") as tmp:
        try:
            if convert_variables_to_constants_v2 is not None:
                fn = tf.function(lambda images: model(images, training=False), input_signature=spec)
                converter = tf.lite.TFLiteConverter.from_concrete_functions(
                    [convert_variables_to_constants_v2(fn.get_concrete_function())])
            else:
                model.export(tmp, format="tf_saved_model", input_signature=spec, verbose=False)
                converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        except Exception as e:
            raise ConversionError(f"cannot trace model {model.name!r} for TensorFlow Lite: {type(e).__name__}: {e}") from None
        try:
            return converter.convert()
        except Exception as e:
            raise ConversionError(f"cannot convert model {model.name!r} to TensorFlow Lite: {type(e).__name__}: {e}") from None


class LiteModel:
    """A converted model, predicting NumPy batches with the TensorFlow Lite interpreter.

    Each batch size gets its own interpreter (resizing one re-plans its memory), made when first
    used and kept for the next call; the two most recently used are kept (a full batch and the last,
    partial one), so a long prediction builds at most two.

    Args:
        content: the ``.tflite`` bytes from :func:`convert`.
        num_threads: interpreter threads (None: :func:`cpu_threads`).
    """

    def __init__(self, content: bytes, num_threads: int | None = None):
        self.content = content
        self.num_threads = int(num_threads or cpu_threads())
        self._interpreters: OrderedDict = OrderedDict()
        self._interpreter(1)  # fails here, not mid-prediction, on bytes the interpreter rejects

    def _interpreter(self, batch: int):
        if batch in self._interpreters:
            self._interpreters.move_to_end(batch)
            return self._interpreters[batch]
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice, on every construction
            warnings.simplefilter("ignore", UserWarning)
            it = interpreter_class()(model_content=self.content, num_threads=self.num_threads)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        it.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
        it.allocate_tensors()
        self._interpreters[batch] = (it, inp["index"], out["index"])
        while len(self._interpreters) > 2:
            self._interpreters.popitem(last=False)
        return self._interpreters[batch]

    def predict(self, x, batch_size: int = 32) -> np.ndarray:
        """Outputs for ``x``, ``(N, *input_shape)`` float32, in batches of ``batch_size``.

        Returns:
            the model's outputs for the N inputs, stacked (float32).
        """
        x = np.asarray(x, np.float32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        outs = []
        for s in range(0, len(x), batch_size):
            chunk = x[s:s + batch_size]
            it, i, o = self._interpreter(len(chunk))
            it.set_tensor(i, np.ascontiguousarray(chunk))
            it.invoke()
            outs.append(it.get_tensor(o).copy())
        if not outs:
            raise ValueError("LiteModel.predict got no inputs")
        return np.concatenate(outs)
