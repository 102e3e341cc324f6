"""Model bundles, post-processing and Kaggle submissions.

A *bundle* is a folder that holds everything needed to turn images into a submission::

    BUNDLE/model0.keras, model1.keras, ...   the ensemble members (Keras 3 ``.keras`` files)
    BUNDLE/bundle.json                        {"models": ["model0.keras", ...],
                                               "threshold": 0.0,        # logit units
                                               "min_size": 0,           # smaller masks become empty
                                               "tta": true,             # left-right flip TTA
                                               "peak_gate": 1.0,        # optional: an image whose largest
                                                                        # logit is <= this is empty
                                               "input_shape": [101, 101, 1],
                                               "meta": {...},           # free-form (CV score, recipe, ...)
                                               "sha256": {"model0.keras": "..."}}  # optional check

``bundle.json`` is written last and atomically, so a folder without it is an incomplete bundle and
a folder with it has every file it lists. Models are loaded with Keras' safe mode and no pickle is
used anywhere.

:func:`predict_folder` is what ``salt predict`` and notebook ``04-predict`` call.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import data, io, rle, train
from .data import DataError

BUNDLE_FILE = "bundle.json"
INPUT_SHAPE = (data.IMAGE_SIZE, data.IMAGE_SIZE, 1)
REQUIRED_KEYS = ("models", "threshold", "min_size", "tta")
OPTIONAL_KEYS = ("peak_gate", "input_shape", "meta", "sha256")
#: images predicted per chunk in :func:`predict_folder` (bounds the memory held by logits)
CHUNK_SIZE = 1000
#: the most images per TensorFlow Lite call: XNNPACK ran the shipped bundle (with TTA) at 10.2-10.8
#: images/s in batches of 8, 9.4-9.8 in 32, 8.2-9.1 in 64 (2-core AVX2 CPU, 192 images, 3 timings each)
LITE_BATCH = 8


class BundleError(ValueError):
    """A model bundle folder is missing, incomplete or malformed. The message names the file."""


class NonFiniteLogitsError(ValueError):
    """Logits hold NaN or infinity (a diverged model).

    Attributes:
        indices: positions (along N) of the images with a non-finite logit, ascending.
    """

    def __init__(self, indices):
        self.indices = [int(i) for i in indices]
        super().__init__(
            f"NaN or infinite logits for {len(self.indices)} image(s), first at index {self.indices[0]} "
            "(a diverged model?)"
        )

    def __reduce__(self):  # pickles (e.g. across processes) with its indices, not its message
        return type(self), (self.indices,)


def check_finite(logits) -> None:
    """Refuse NaN or infinite logits: ``NaN > threshold`` is False, so a diverged model would
    otherwise read as "no salt".

    Args:
        logits: ``(N, ...)`` one array of logits per image (any integer dtype passes).
    Raises:
        NonFiniteLogitsError: naming the images (positions along N) with a non-finite logit.
    """
    a = np.asarray(logits)
    if a.dtype.kind == "f" and len(a):
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        if len(bad):
            raise NonFiniteLogitsError(bad)


# --------------------------------------------------------------------------- post-processing
def postprocess(logits, threshold: float = 0.0, min_size: int = 0, peak_gate: float | None = None) -> np.ndarray:
    """Turn logits into salt masks.

    Args:
        logits: ``(N, H, W)`` or ``(N, H, W, 1)`` (or a single ``(H, W)``) logits; any threshold
            in the same units works (probabilities too).
        threshold: a pixel is salt where ``logits > threshold``.
        min_size: a mask with fewer than ``min_size`` salt pixels becomes empty (0 keeps all).
        peak_gate: an image whose largest logit is ``<= peak_gate`` becomes empty: the model must
            be this sure of some pixel before any salt is drawn (None keeps all).
    Returns:
        bool ``(N, H, W)`` masks.
    Raises:
        NonFiniteLogitsError: some logits are NaN or infinite (``NaN > threshold`` is False, so a
            diverged model would otherwise read as "no salt"); ``.indices`` names the images.
    """
    a = np.asarray(logits)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"postprocess expects (N,H,W) or (N,H,W,1) logits, got shape {a.shape}")
    check_finite(a)
    masks = a > np.float64(threshold)  # in float64, as metric.sweep_thresholds compares (a logit equal to 0.1f)
    if peak_gate is not None:
        peak = a.reshape(len(a), -1).max(axis=1) if a.size else np.zeros(len(a))
        masks[peak <= peak_gate] = False
    if min_size > 0:
        small = masks.sum(axis=(1, 2)) < min_size
        masks[small] = False
    return masks


# --------------------------------------------------------------------------- bundles
@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes:
        models: the ``keras.Model`` ensemble members (each maps ``(B,101,101,1)`` images to logits).
        threshold: logit cut-off used by :meth:`predict_masks`.
        min_size: masks with fewer salt pixels become empty.
        tta: whether predictions average in the left-right flipped prediction.
        peak_gate: images whose largest logit is at most this become empty (None: off).
        meta: free-form metadata from ``bundle.json``.
        path: the bundle folder.
        files: the model file names, in the order of ``models``.
        input_shape: ``(H, W, C)`` the models expect.
        runtime: what runs the models: ``"keras"`` (TensorFlow) or ``"tflite"`` (the ensemble
            converted once to TensorFlow Lite, float32, :mod:`saltlib.litert`; the same logits
            within about 1e-6, 1.4-1.8x faster on a CPU without native bfloat16).
    """

    models: list
    threshold: float = 0.0
    min_size: int = 0
    tta: bool = False
    peak_gate: float | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    files: list = field(default_factory=list)
    input_shape: tuple = INPUT_SHAPE
    runtime: str = "keras"
    _ensembles: dict = field(default_factory=dict, repr=False, compare=False)

    def predict_logits(self, images, batch_size: int = 64, tta: bool | None = None) -> np.ndarray:
        """Ensemble logits: the mean over models (each with flip TTA if enabled).

        Args:
            images: ``(N, 101, 101, 1)`` or ``(N, 101, 101)`` float32 images in [0, 1].
            batch_size: images per forward pass of a model (with TTA half of them are the
                flipped copies; TensorFlow Lite takes at most ``LITE_BATCH`` images a call).
            tta: override the bundle's TTA setting (None keeps it).
        Returns:
            ``(N, 101, 101)`` float32 logits, the same numbers as
            :func:`saltlib.train.predict_logits` model by model, averaged; computed by
            :meth:`ensemble` in one graph (with ``runtime="tflite"``, by its TensorFlow Lite
            conversion, :meth:`lite`).
        """
        if self.runtime not in ("keras", "tflite"):
            raise ValueError(f"Bundle.runtime must be 'keras' or 'tflite', got {self.runtime!r} "
                             "(load_bundle resolves 'auto')")
        x = _as_images(images, self.input_shape)
        use_tta = self.tta if tta is None else bool(tta)
        if len(x) == 0:
            return np.zeros((0,) + tuple(self.input_shape[:2]), np.float32)
        # with TTA each member sees the batch and its flip at once: half as many images per batch
        per_batch = max(1, batch_size // 2) if use_tta else batch_size
        if self.runtime == "tflite":
            logits = self.lite(use_tta).predict(x, batch_size=min(per_batch, LITE_BATCH))
        else:
            logits = train.predict_batches(self.ensemble(use_tta), x, per_batch)  # not .predict: README, Speed
        return np.asarray(logits, np.float32)

    def ensemble(self, tta: bool):
        """The models as one :class:`saltlib.model.FlipEnsemble` (built once per ``tta`` and model list)."""
        from .model import FlipEnsemble

        key = (bool(tta), tuple(id(m) for m in self.models))
        if key not in self._ensembles:
            self._ensembles[key] = FlipEnsemble(self.models, tta=bool(tta))
        return self._ensembles[key]

    def lite(self, tta: bool):
        """:meth:`ensemble` converted to TensorFlow Lite, a :class:`saltlib.litert.LiteModel` (converted
        once per ``tta`` and model list: about 13 s for the shipped two-model bundle on 2 cores)."""
        from . import litert

        key = ("tflite", bool(tta), tuple(id(m) for m in self.models))
        if key not in self._ensembles:
            if self.compute_dtype != "float32":
                raise ValueError(f"bundle {self.path}: TensorFlow Lite runs float32 models; these compute in "
                                 f"{self.compute_dtype} (load the bundle with compute_dtype='float32')")
            self._ensembles[key] = litert.LiteModel(litert.convert(self.ensemble(tta), self.input_shape))
        return self._ensembles[key]

    def predict_masks(self, images, batch_size: int = 64) -> np.ndarray:
        """:meth:`predict_logits` then :func:`postprocess` with the bundle's settings: bool ``(N,101,101)``."""
        return postprocess(self.predict_logits(images, batch_size), self.threshold, self.min_size, self.peak_gate)

    @property
    def compute_dtype(self) -> str:
        """``"bfloat16"`` if any model computes in bfloat16, else ``"float32"``."""
        return "bfloat16" if any(_computes_bfloat16(m) for m in self.models) else "float32"

    def describe(self) -> str:
        """One line: number of models, compute dtype, TTA, threshold, min_size and folder."""
        return (
            f"bundle {self.path}: {len(self.models)} model(s) computing in {self.compute_dtype} with {self.runtime}, "
            f"tta={self.tta}, "
            f"threshold={self.threshold:g}, min_size={self.min_size}"
            + (f", peak_gate={self.peak_gate:g}" if self.peak_gate is not None else "")
        )


def _as_images(images, input_shape) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != tuple(input_shape):
        raise ValueError(f"expected images of shape (N,{','.join(map(str, input_shape))}), got {x.shape}")
    return x


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_settings(threshold, min_size, tta, where: str, peak_gate=None):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise BundleError(f"{where}: threshold must be a number, got {threshold!r}")
    if not math.isfinite(float(threshold)):
        raise BundleError(f"{where}: threshold must be finite, got {threshold!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise BundleError(f"{where}: min_size must be an integer >= 0, got {min_size!r}")
    if not isinstance(tta, (bool, np.bool_)):
        raise BundleError(f"{where}: tta must be true or false, got {tta!r}")
    if peak_gate is not None and (
        isinstance(peak_gate, bool) or not isinstance(peak_gate, (int, float, np.floating, np.integer))
        or not math.isfinite(float(peak_gate))
    ):
        raise BundleError(f"{where}: peak_gate must be a finite number or null, got {peak_gate!r}")


def write_bundle(dest, model_paths, threshold: float, min_size: int, tta: bool, meta=None,
                 peak_gate: float | None = None) -> Path:
    """Write a model bundle folder.

    The models are copied to ``dest/model<i>.keras`` (staged under temporary names, then renamed)
    and ``bundle.json`` is written last, atomically; an existing ``bundle.json`` is removed first.
    So a crash at any point leaves either a complete bundle or a folder without ``bundle.json``
    (which :func:`load_bundle` reports as incomplete), never one pointing at missing files.

    Args:
        dest: the bundle folder (created if needed).
        model_paths: ``.keras`` files of the ensemble members (at least one).
        threshold: logit cut-off.
        min_size: minimum salt pixels of a non-empty mask.
        tta: use left-right flip TTA.
        meta: JSON-serializable dict stored as ``"meta"`` (CV score, recipe, ...).
        peak_gate: images whose largest logit is at most this become empty (None: off; the key
            is then left out, so the file reads as before the gate existed).
    Returns:
        ``dest`` as a Path.
    Raises:
        BundleError: no models, a model file that is missing or not a ``.keras`` archive, or bad
            settings.
    """
    dest = Path(dest)
    sources = [Path(p) for p in model_paths]
    if not sources:
        raise BundleError(f"{dest}: a bundle needs at least one model")
    for p in sources:
        if not p.is_file():
            raise BundleError(f"model file not found: {p}")
        if not zipfile.is_zipfile(p):
            raise BundleError(f"{p} is not a Keras .keras archive")
    _check_settings(threshold, min_size, tta, str(dest), peak_gate)
    meta = dict(meta or {})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / BUNDLE_FILE).unlink(missing_ok=True)  # the folder is incomplete until we finish

    names = [f"model{i}.keras" for i in range(len(sources))]
    staged = []
    try:
        for src in sources:  # stage every copy first: sources may be files of this very folder
            # a fresh name that copyfile creates, so the file gets the usual mode (mkstemp's is 0600)
            tmp = dest / f".staged.{secrets.token_hex(8)}.keras.tmp"
            staged.append(tmp)
            shutil.copyfile(src, tmp)
        for tmp, name in zip(staged, names):
            os.replace(tmp, dest / name)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    for old in dest.glob("model*.keras"):  # members of an earlier, larger bundle
        if re.fullmatch(r"model\d+\.keras", old.name) and old.name not in names:
            old.unlink()
    spec = {
        "models": names,
        "threshold": float(threshold),
        "min_size": int(min_size),
        "tta": bool(tta),
        **({"peak_gate": float(peak_gate)} if peak_gate is not None else {}),
        "input_shape": list(INPUT_SHAPE),
        "meta": meta,
        "sha256": {n: _sha256(dest / n) for n in names},
    }
    io.write_json(dest / BUNDLE_FILE, spec)
    return dest


def read_bundle_spec(path) -> dict:
    """Read and check ``bundle.json`` of a bundle folder without loading any model.

    Checks that the folder and ``bundle.json`` exist, that it is a JSON object with exactly the
    known keys and well-typed values, and that every listed model file exists (and matches its
    checksum when one is recorded).

    Returns:
        the parsed dict (``input_shape`` and ``meta`` filled in when absent).
    Raises:
        BundleError: naming the missing or bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle folder not found: {path}")
    spec_path = path / BUNDLE_FILE
    if not spec_path.is_file():
        raise BundleError(
            f"incomplete model bundle: {spec_path} is missing (write bundles with saltlib.predict.write_bundle)"
        )
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{spec_path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise BundleError(f"{spec_path} must hold a JSON object, got {type(spec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise BundleError(f"{spec_path} lacks key(s) {missing}")
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise BundleError(f"{spec_path} has unknown key(s) {unknown}; known: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    models = spec["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise BundleError(f"{spec_path}: 'models' must be a non-empty list of file names, got {models!r}")
    if len(set(models)) < len(models):  # the same model twice: double the time, and a wrong ensemble weight
        dup = next(m for i, m in enumerate(models) if m in models[:i])
        raise BundleError(f"{spec_path}: model {dup!r} is listed more than once")
    for m in models:
        if Path(m).name != m or m in (".", ".."):
            raise BundleError(f"{spec_path}: model {m!r} must be a plain file name inside the bundle folder")
    _check_settings(spec["threshold"], spec["min_size"], spec["tta"], str(spec_path), spec.setdefault("peak_gate", None))
    shape = spec.setdefault("input_shape", list(INPUT_SHAPE))
    if not isinstance(shape, list) or tuple(shape) != INPUT_SHAPE:
        raise BundleError(f"{spec_path}: input_shape must be {list(INPUT_SHAPE)}, got {shape!r}")
    if not isinstance(spec.setdefault("meta", {}), dict):
        raise BundleError(f"{spec_path}: 'meta' must be a JSON object")
    sums = spec.get("sha256")
    if sums is not None and not isinstance(sums, dict):
        raise BundleError(f"{spec_path}: 'sha256' must map file names to hex digests")
    for m in models:
        f = path / m
        if not f.is_file():
            raise BundleError(f"incomplete model bundle: {f} (listed in {spec_path}) is missing")
        if sums and m in sums and _sha256(f) != sums[m]:
            raise BundleError(f"{f} is damaged: its SHA-256 does not match the one in {spec_path}")
    return spec


def _float32_twin(model):
    """The same network computing in float32: ``model``'s config with every bfloat16 dtype policy
    replaced by ``"float32"``, rebuilt, with the weights cast to float32 (exactly: bfloat16 is a
    truncated float32). Logits differ from the bfloat16 model's only by its rounding."""
    import keras

    def fix(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and "bfloat16" in str((node.get("config") or {}).get("name")):
                node["config"]["name"] = "float32"
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    config = model.get_config()
    fix(config)
    twin = model.__class__.from_config(config)
    twin.set_weights([np.asarray(keras.ops.convert_to_numpy(w), np.float32) for w in model.weights])
    return twin


def _computes_bfloat16(model) -> bool:
    return any("bfloat16" in str(layer.dtype_policy.compute_dtype) for layer in model.layers)


def load_bundle(path, compute_dtype: str = "auto", members=None, runtime: str = "keras") -> Bundle:
    """Load a model bundle folder written by :func:`write_bundle`.

    Models load with ``keras.saving.load_model(p, compile=False, safe_mode=True)`` (no arbitrary
    code, no pickle). Models stored in bfloat16 (mixed-precision recipes) compute in bfloat16
    only where the machine does so natively (:func:`saltlib.hardware.native_bfloat16`): elsewhere
    it is emulated and slower than float32, so they are rebuilt to compute in float32. Each model
    then takes its inference form (:func:`saltlib.model.inference_form`, the same logits): the
    batch norms that follow a convolution are folded into it (:func:`saltlib.model.fold_batchnorm`),
    and a final 1x1 convolution that sees enlarged features (the hypercolumn, the image head) is
    moved in front of the enlargements (:func:`saltlib.model.project_head`: with the hypercolumn
    1.6x the images/s on the 2-core AVX512-BF16 CPU).

    Args:
        path: the bundle folder.
        compute_dtype: ``"auto"`` (as above), ``"float32"`` (always rebuild bfloat16 models in
            float32) or ``"stored"`` (compute as stored).
        members: indices into the bundle's model list to load (e.g. ``[0]``: the first fold model
            alone, half the inference time of a two-model bundle, without the ensemble's gain);
            None loads them all, as shipped.
        runtime: ``"keras"`` (default), ``"tflite"`` (TensorFlow Lite, float32: with ``"auto"``
            compute, bfloat16 models are rebuilt in float32) or ``"auto"``
            (:func:`saltlib.litert.resolve_runtime`: TensorFlow Lite on a CPU without native
            bfloat16, Keras elsewhere, and Keras with ``compute_dtype="stored"``).
    Returns:
        a :class:`Bundle`.
    Raises:
        BundleError: naming the file, for a missing folder, a missing or malformed ``bundle.json``
            (bad JSON, missing/unknown keys, wrong types), a listed model file that is missing,
            damaged or cannot be loaded, or a model with the wrong input/output shape.
        ValueError: an unknown ``compute_dtype`` or ``runtime``, ``runtime="tflite"`` with
            ``compute_dtype="stored"``, or ``members`` that are not distinct indices of the
            bundle's models (the message names the bundle and the valid range).
    """
    from . import litert

    if compute_dtype not in ("auto", "float32", "stored"):
        raise ValueError(f"compute_dtype must be 'auto', 'float32' or 'stored', got {compute_dtype!r}")
    litert.check_runtime(runtime)  # before reading any file, as compute_dtype
    if runtime == "tflite" and compute_dtype == "stored":
        raise ValueError("runtime 'tflite' runs float32 only: use compute_dtype 'auto' or 'float32', not 'stored'")
    path = Path(path)
    spec = read_bundle_spec(path)  # before importing Keras: an incomplete folder fails in milliseconds
    files = list(spec["models"])
    if members is not None:
        files = [files[k] for k in _check_members(members, len(files), path)]
    import keras

    from . import hardware
    from .model import inference_form

    # "stored" asks for the stored compute dtype, which TensorFlow Lite may not run: "auto" keeps Keras then
    runtime = "keras" if runtime == "auto" and compute_dtype == "stored" else litert.resolve_runtime(runtime)
    if runtime == "tflite":
        compute_dtype = "float32"
    models = []
    for m in files:
        f = path / m
        try:
            model = keras.saving.load_model(f, compile=False, safe_mode=True)
        except Exception as e:  # Keras raises many kinds (zip, h5, config, safe-mode errors)
            raise BundleError(f"cannot load model {f}: {type(e).__name__}: {e}") from None
        in_shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
        out_shape = tuple(model.output_shape[1:]) if not isinstance(model.output_shape, list) else None
        if in_shape != INPUT_SHAPE or out_shape != INPUT_SHAPE:
            raise BundleError(
                f"model {f} maps {in_shape} to {out_shape}; a salt model maps {INPUT_SHAPE} images to {INPUT_SHAPE} logits"
            )
        if _computes_bfloat16(model) and (
            compute_dtype == "float32" or (compute_dtype == "auto" and not hardware.native_bfloat16())
        ):
            model = _float32_twin(model)
        models.append(inference_form(model))  # batch norms folded, final convolution in front of the enlargements
    return Bundle(
        models=models,
        threshold=float(spec["threshold"]),
        min_size=int(spec["min_size"]),
        tta=bool(spec["tta"]),
        peak_gate=None if spec["peak_gate"] is None else float(spec["peak_gate"]),
        meta=spec["meta"],
        path=path,
        files=files,
        input_shape=INPUT_SHAPE,
        runtime=runtime,
    )


def _check_members(members, n: int, path) -> list[int]:
    """Validate ``members`` (indices into a bundle of ``n`` models): non-empty, in range, no repeats."""
    try:
        idx = [int(k) for k in members]
        ok = all(float(k) == int(k) for k in members)
    except (TypeError, ValueError):
        idx, ok = [], False
    if not ok or not idx or len(set(idx)) != len(idx) or not all(0 <= k < n for k in idx):
        raise ValueError(
            f"members {members!r} for bundle {path}: "
            f"give distinct indices of its {n} model(s), 0..{n - 1}"
        )
    return idx


# --------------------------------------------------------------------------- submissions
def _write_rle_csv(ids, rles, out_csv, masks=None) -> Path:
    """Write ``id,rle_mask`` to a temporary file, read it back and check it, then rename it."""
    out_csv = Path(out_csv)
    ids = [str(i) for i in ids]
    rles = list(rles)
    if len(ids) != len(rles):
        raise ValueError(f"{len(ids)} ids but {len(rles)} masks")
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(f"duplicate image id {dup!r} in submission")
    if out_csv.is_dir():
        raise DataError(f"submission path {out_csv} is a folder")
    with io.atomic_path(out_csv) as tmp:
        pd.DataFrame({"id": ids, "rle_mask": rles}).to_csv(tmp, index=False)
        back = read_submission(tmp, decode=False)
        if back["id"].tolist() != ids or back["rle_mask"].tolist() != rles:
            raise DataError(f"submission {out_csv} did not read back as written")
        for k, (i, r) in enumerate(zip(ids, rles)):
            try:
                decoded = rle.decode(r)
            except ValueError as e:
                raise DataError(f"submission {out_csv}: RLE of id {i!r} does not decode: {e}") from None
            if masks is not None and not np.array_equal(decoded, masks[k]):
                raise DataError(f"submission {out_csv}: RLE of id {i!r} does not decode to its mask")
    return out_csv


def write_submission(ids, masks, out_csv) -> Path:
    """Write a Kaggle submission CSV (``id,rle_mask``) atomically and check it.

    The CSV goes to a temporary file beside ``out_csv``, is read back and every RLE decoded and
    compared with its mask, and only then renamed onto ``out_csv``; a failure leaves no file
    behind and an existing ``out_csv`` untouched.

    Args:
        ids: ``(N,)`` image ids.
        masks: ``(N, 101, 101)`` bool (or 0/1) masks.
        out_csv: the CSV to write.
    Returns:
        ``out_csv`` as a Path.
    """
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    masks = masks > 0
    return _write_rle_csv(ids, [rle.encode(m) for m in masks], out_csv, masks=masks)


def read_submission(path, decode: bool = True) -> pd.DataFrame:
    """Read a submission CSV.

    Args:
        path: the CSV.
        decode: decode every RLE to check it.
    Returns:
        DataFrame with string columns ``id`` and ``rle_mask`` (``""`` for an empty mask).
    Raises:
        DataError: a missing file, missing columns, repeated ids or (with ``decode``) a malformed RLE,
            naming the file and id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing submission file: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas parser errors
        raise DataError(f"cannot parse submission {path}: {e}") from e
    if list(df.columns) != ["id", "rle_mask"]:
        raise DataError(f"submission {path} must have columns ['id', 'rle_mask'], found {list(df.columns)}")
    if df["id"].duplicated().any():
        raise DataError(f"submission {path} repeats id {df['id'][df['id'].duplicated()].iloc[0]!r}")
    if decode:
        for i, r in zip(df["id"], df["rle_mask"]):
            try:
                rle.decode(r)
            except ValueError as e:
                raise DataError(f"submission {path}: RLE of id {i!r} does not decode: {e}") from None
    return df


# --------------------------------------------------------------------------- folders
def _check_writable(out_csv: Path) -> None:
    """Fail before any work if ``out_csv`` cannot be written (a folder, or no write permission)."""
    if out_csv.is_dir():
        raise DataError(f"output {out_csv} is a folder; give a CSV file path")
    # the folders it needs are made when the CSV is written, so a run that fails leaves none behind:
    # here the nearest existing one must take new files
    base = out_csv.parent
    while not os.path.lexists(base) and base != base.parent:  # a dangling link is there, and not a folder
        base = base.parent
    if not base.is_dir():
        raise DataError(f"cannot write the output {out_csv}: {base} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{out_csv.name}.", suffix=".check", dir=base):
            pass
    except OSError as e:
        raise DataError(f"cannot write the output {out_csv}: {e}") from None


def predict_folder(model_dir, images_dir, out_csv, batch_size: int = 64, chunk_size: int = CHUNK_SIZE,
                   verbose: bool = True, compute_dtype: str = "auto", tta: bool | None = None,
                   members=None, runtime: str = "auto") -> Path:
    """Predict every ``*.png`` in a folder with a bundle and write a Kaggle submission.

    Order of work: check the bundle's files (fails fast on an incomplete bundle), list the
    images, load the models, read all images (fails on a corrupt or wrong-size image before
    anything is predicted or written; 18,000 images take about 0.75 GB as float32), predict in
    chunks of ``chunk_size`` images (ensemble, TTA and post-processing as the bundle says), then
    write the CSV atomically and check it by reading it back and decoding every RLE.

    Args:
        model_dir: the bundle folder (see :func:`write_bundle`).
        images_dir: folder of 101x101 PNGs; the ids are the file stems.
        out_csv: submission CSV to write (replaced only if everything succeeds).
        batch_size: images per forward pass.
        chunk_size: images predicted between progress lines (bounds the logits held in memory).
        verbose: print progress (one line per chunk with images/s).
        compute_dtype: passed to :func:`load_bundle` (``"auto"``: bfloat16 models compute in
            float32 where the machine has no native bfloat16).
        tta: override the bundle's flip TTA (None: as stored). ``False`` halves the time.
        members: predict with these of the bundle's models only (indices; None: all, as stored).
        runtime: passed to :func:`load_bundle` (``"auto"``: TensorFlow Lite on a CPU without native
            bfloat16, converted once after loading; Keras elsewhere).
    Returns:
        ``out_csv`` as a Path.
    Raises:
        BundleError: the bundle is missing or incomplete.
        DataError: the image folder is missing or holds no PNG, or an image is unreadable,
            corrupt or of the wrong size (the message names it).
    """
    log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    out_csv = Path(out_csv)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    _check_writable(out_csv)
    t0 = time.time()
    n_models = len(read_bundle_spec(model_dir)["models"])  # cheap checks first: bundle.json and its files,
    if members is not None:  # the model indices, then the image folder
        _check_members(members, n_models, model_dir)
    images_dir = Path(images_dir)
    ids = data.list_pngs(images_dir)
    if not ids:
        raise DataError(f"no PNG files in {images_dir}")
    bundle = load_bundle(model_dir, compute_dtype=compute_dtype, members=members, runtime=runtime)
    overrides = []
    if tta is not None and bool(tta) != bundle.tta:
        bundle.tta = bool(tta)
        overrides.append(f"tta={bundle.tta}")
    if len(bundle.files) != n_models:
        overrides.append(f"models {', '.join(bundle.files)} only")
    log(f"{bundle.describe()} (loaded in {time.time() - t0:.1f} s)")
    if overrides:
        log(f"not as shipped: {'; '.join(overrides)} (the bundle's CV score does not apply)")
    if bundle.runtime == "tflite":  # converted before reading: a failure costs no reading time
        t1 = time.time()
        bundle.lite(bundle.tta)
        log(f"converted the ensemble to TensorFlow Lite in {time.time() - t1:.1f} s")
    t1 = time.time()
    images = data.read_images([images_dir / f"{i}.png" for i in ids])
    log(f"read {len(ids)} images from {images_dir} in {time.time() - t1:.1f} s")

    rles: list[str] = []
    n_empty = 0
    t2 = time.time()
    n_chunks = math.ceil(len(ids) / chunk_size)
    for c in range(n_chunks):
        chunk = images[c * chunk_size:(c + 1) * chunk_size]
        logits = bundle.predict_logits(chunk, batch_size=batch_size)
        try:
            masks = postprocess(logits, bundle.threshold, bundle.min_size, bundle.peak_gate)
        except NonFiniteLogitsError as e:
            names = [str(ids[c * chunk_size + b]) for b in e.indices[:5]]
            raise ValueError(f"{bundle.path}: the models predict NaN or infinite logits for {len(e.indices)} image(s) "
                             f"of {images_dir}, e.g. {', '.join(names)} (a diverged model?); nothing written to "
                             f"{out_csv}") from None
        n_empty += int((~masks.any(axis=(1, 2))).sum())
        rles.extend(rle.encode(m) for m in masks)
        done, spent = len(rles), time.time() - t2
        rate = done / max(spent, 1e-9)
        log(
            f"chunk {c + 1}/{n_chunks}: {done}/{len(ids)} images, {rate:.1f} images/s, "
            f"{spent:.0f} s elapsed, ~{(len(ids) - done) / rate:.0f} s left"
        )
    del images
    _write_rle_csv(ids, rles, out_csv)
    log(
        f"{out_csv}: {len(ids)} rows ({n_empty} empty masks), read back and every RLE decoded; "
        f"total {time.time() - t0:.1f} s"
    )
    return out_csv

