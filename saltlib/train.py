"""Staged, resumable training of one cross-validation fold.

A fold trains through *stages* (for example BCE, then the Lovász hinge), each with its own loss
and a cosine learning-rate decay. Every epoch is checkpointed with ``keras.callbacks.BackupAndRestore``
(weights, optimizer state and epoch), and a finished stage leaves its weights behind, so a killed
run started again in the same folder resumes from its last completed epoch, and a finished fold is
not retrained. Inside :func:`stop_at_epoch_end` (``salt train`` uses it) SIGINT or SIGTERM stops
training at the end of the epoch in progress, after its checkpoint, so no epoch is lost.

Files in a fold folder ``OUT/fold<k>/``::

    stage<i>.weights.h5   weights after stage i finished (the last one alone also marks the
                          stages before it finished)
    backup<i>/            the in-progress stage's checkpoint (BackupAndRestore, written atomically)
    history.csv           one row per epoch: stage, loss, learning rate, val_score
    model.keras           the final model for inference (bfloat16 weights if mixed precision)
    snapshot<i>.keras     stage i's final weights, for each stage listed in ``snapshots``
    oof.npz               out-of-fold ids, logits and flipped-TTA logits (float16) of the fold's
                          ensemble: the mean over model.keras and the snapshots
    recipe.json           the recipe the fold was started with (see :func:`recipe`)
    split.json            which images it trains and validates on (see :func:`split_record`)
    init.json             the model file a fine-tuned fold started from (``init_from``) and its SHA-256
    done.json             marks the fold finished, with its scores and timings
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import io, metric, params

TRAIN_KEYS = (
    "seed", "n_folds", "base_filters", "depth", "blocks_per_level", "dropout", "empty_head", "image_loss_weight", "upscale",
    "pad_to", "scse", "hypercolumn", "mixed_precision", "batch_size", "stages", "snapshots", "min_lr", "flip", "zoom", "p_zoom", "brightness",
    "val_every", "strategy",
)
#: training configuration defaults, taken from the parameter specification
DEFAULTS = {k: v for k, v in params.defaults().items() if k in TRAIN_KEYS}
#: keys that do not change the trained weights, left out of a fold's recorded recipe
#: (``snapshots`` only picks which finished stages join the ensemble)
NOT_RECIPE = ("val_every", "strategy", "snapshots")


def recipe(cfg: dict) -> dict:
    """The part of a training configuration that decides a fold's weights (``recipe.json``).

    Args:
        cfg: training configuration; missing keys take :data:`DEFAULTS`.
    Returns:
        dict of the :data:`TRAIN_KEYS` less :data:`NOT_RECIPE`, JSON-normalised (tuples as lists).
    """
    cfg = {**DEFAULTS, **cfg}
    return json.loads(json.dumps({k: cfg[k] for k in TRAIN_KEYS if k not in NOT_RECIPE}))


def _plain(v):
    """``v`` with tuples as lists and numpy scalars as Python numbers, recursively (what a parameter
    file would give), so configurations built in code pass the same checks."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def recipe_diff(recorded: dict, cfg: dict) -> dict:
    """Keys whose recorded value differs from ``cfg``'s, as ``{key: (recorded, cfg)}``. A key that
    a recipe recorded before it existed counts as its default (the behaviour of that time)."""
    now, recorded = recipe(cfg), recipe({k: v for k, v in recorded.items() if k in TRAIN_KEYS})
    return {k: (recorded[k], now[k]) for k in now if recorded[k] != now[k]}


def _diff_text(diff: dict, here: str) -> str:
    """A :func:`recipe_diff` result as ``"key: recorded there, value <here>; ..."``."""
    return "; ".join(f"{k}: {a!r} there, {b!r} {here}" for k, (a, b) in diff.items())


def split_record(ids, folds: np.ndarray, fold: int) -> dict:
    """What a fold trains and validates on (``split.json``): image counts and a digest of the
    held-out ids, so a resume on other data (another ``limit`` or ``data_dir``, a changed data set)
    is caught even though the recipe is the same.

    Args:
        ids: ``(N,)`` image ids of the data set.
        folds: ``(N,)`` fold number of each image.
        fold: the held-out fold.
    Returns:
        dict with ``train_images``, ``val_images`` and ``val_ids_sha256`` (of the sorted held-out ids).
    """
    import hashlib

    val = sorted(str(i) for i in np.asarray(ids)[np.asarray(folds) == fold])
    return {"train_images": int(len(folds) - len(val)), "val_images": len(val),
            "val_ids_sha256": hashlib.sha256("\n".join(val).encode()).hexdigest()}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say). The message says why."""


class StopRequested(Exception):
    """Training stopped because a signal asked it to (see :func:`stop_at_epoch_end`): at an epoch's
    end, after that epoch's checkpoint, or between stages or folds. Starting the same training
    again resumes it. ``signum`` is the signal; the message says where it stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


#: the signal that asked training to stop (set by :func:`stop_at_epoch_end`'s handler), or None
_STOP = {"signum": None}


@contextlib.contextmanager
def stop_at_epoch_end(signals=(signal.SIGINT, signal.SIGTERM), exit_as: str | None = None):
    """Within the block, the first of ``signals`` asks :func:`train_fold` to stop at the end of
    the epoch in progress (after its checkpoint and history row), which then raises
    :class:`StopRequested`; a second one stops at once (``KeyboardInterrupt``, losing the epoch in
    progress, as a kill does). The previous handlers are put back on leaving.

    With ``exit_as`` (a command's name), a :class:`StopRequested` leaving the block is printed to
    stderr as ``"<exit_as>: <message>"`` and becomes ``SystemExit(128 + signal number)``, the status
    of a process that signal killed; without it, it propagates.

    SIGINT is handled even when the process started with it ignored, as a command started with
    ``nohup ... &`` does: there ``kill -INT`` used to do nothing at all. Outside the main thread
    (where Python cannot install handlers) the block changes nothing.
    """
    if exit_as is not None:
        try:
            with stop_at_epoch_end(signals):
                yield
        except StopRequested as e:
            print(f"{exit_as}: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        return
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _STOP["signum"] is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        _STOP["signum"] = signum
        print(f"{signal.Signals(signum).name} received: training stops at the end of this epoch, after its "
              "checkpoint (send it again to stop at once)", flush=True)

    previous = {s: signal.signal(s, handler) for s in signals}
    _STOP["signum"] = None
    try:
        yield
    finally:
        for s, h in previous.items():  # None: a handler not set from Python, put back as the default
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _STOP["signum"] = None


def _check_stop(where: str) -> None:
    """Raise :class:`StopRequested` ("stopped <where>") if a signal asked training to stop."""
    signum = _STOP["signum"]
    if signum is not None:
        raise StopRequested(f"{signal.Signals(signum).name}: stopped {where}; run the same command again to resume",
                            signum)


def jit_compile() -> bool:
    """Whether ``fit`` compiles its step with XLA: yes under JAX, where without it every operation
    of every step is dispatched eagerly, one at a time (a GPU then does not finish an epoch in
    minutes); no under TensorFlow, whose XLA step is ~4x slower on these CPUs, nor under torch."""
    import keras

    return keras.backend.backend() == "jax"


def use_bfloat16(cfg: dict) -> bool:
    """Whether a configuration computes in bfloat16: ``mixed_precision`` True or False as given,
    ``"auto"`` where this machine computes bfloat16 natively (:func:`saltlib.hardware.native_bfloat16`)."""
    mp = {**DEFAULTS, **cfg}["mixed_precision"]
    if mp == "auto":
        from . import hardware

        return hardware.native_bfloat16()
    return bool(mp)


def build_model(cfg: dict, for_inference: bool = False):
    """The ResNet-U-Net described by a training configuration.

    Args:
        cfg: training configuration (``base_filters``, ``depth``, ``blocks_per_level``,
            ``dropout``, ``empty_head``, ``upscale``, ``pad_to``, ``scse``, ``hypercolumn``,
            ``mixed_precision``; missing keys take :data:`DEFAULTS`).
            ``mixed_precision: "auto"`` is resolved by :func:`use_bfloat16`.
        for_inference: the model that is saved and shipped. With bfloat16 compute it keeps
            the weights themselves in bfloat16 (``"bfloat16"`` policy): half the file size, and on
            fold 0 of the shipped model the same score (0.7963 against 0.7962 with float32
            weights); training keeps float32 weights (``"mixed_bfloat16"``). With ``empty_head``
            it outputs the fused logits alone; training adds the auxiliary outputs.
    """
    from .model import build_resnet_unet

    cfg = {**DEFAULTS, **cfg}
    policy = None
    if use_bfloat16(cfg):
        policy = "bfloat16" if for_inference else "mixed_bfloat16"
    return build_resnet_unet(
        base_filters=cfg["base_filters"],
        depth=cfg["depth"],
        blocks_per_level=cfg["blocks_per_level"],
        dropout=cfg["dropout"],
        dtype_policy=policy,
        empty_head=cfg["empty_head"],
        aux_outputs=cfg["empty_head"] and not for_inference,
        upscale=cfg["upscale"],
        pad_to=cfg["pad_to"],
        scse=cfg["scse"],
        hypercolumn=cfg["hypercolumn"],
    )


def stage_loss(cfg: dict, spec: str):
    """The loss a stage compiles with: :func:`saltlib.losses.get_loss` of ``spec``, wrapped by
    :func:`saltlib.losses.with_empty_head` (image term weighted by ``image_loss_weight``) for a model
    with ``empty_head`` (whose training form has the auxiliary outputs)."""
    from . import losses

    cfg = {**DEFAULTS, **cfg}
    loss = losses.get_loss(spec)
    return losses.with_empty_head(loss, image_weight=cfg["image_loss_weight"]) if cfg["empty_head"] else loss


def save_model(model, cfg: dict, path) -> Path:
    """Save ``model`` as a ``.keras`` file for inference, atomically: no optimizer state (a third
    of the size) and, for mixed-precision models, bfloat16 weights (half again; see
    :func:`build_model`). The weights are copied, layer by layer by name, into a fresh, uncompiled
    inference model built from ``cfg`` (which lacks any training-only output layer).
    """
    clean = build_model(cfg, for_inference=True)
    for layer in clean.layers:
        if layer.weights:  # the layers without weights (resizing, concatenations) differ between the forms
            layer.set_weights(model.get_layer(layer.name).get_weights())
    with io.atomic_path(path) as tmp:
        clean.save(tmp)
    return Path(path)



def write_oof(fold_dir, members, ids, images, masks) -> dict:
    """Score a fold's saved models on its held-out images and write ``fold_dir/oof.npz``.

    Each member file is loaded as saved (so the scores are those of what a bundle ships) and
    predicts ``images`` with and without flip TTA; the fold's logits are the members' mean.

    Args:
        fold_dir: the fold folder holding the member files.
        members: file names in ``fold_dir`` (``["model.keras"]``, plus any snapshots).
        ids: ``(M,)`` ids of the held-out images.
        images: ``(M, H, W, 1)`` held-out images in [0, 1].
        masks: ``(M, H, W)`` their masks.
    Returns:
        ``{"val_score", "val_score_tta", "member_scores_tta"}``: the competition metric at logit 0
        of the mean logits, of the mean TTA logits, and of each member's TTA logits.
    """
    import keras

    member_scores, logits, logits_tta = {}, 0.0, 0.0
    for name in members:
        member = keras.saving.load_model(Path(fold_dir) / name, compile=False)
        one, one_tta = predict_logits(member, images), predict_logits(member, images, tta=True)
        member_scores[name] = metric.competition_score(masks, one_tta > 0)
        logits, logits_tta = logits + one / len(members), logits_tta + one_tta / len(members)
    with io.atomic_path(Path(fold_dir) / "oof.npz") as tmp:
        np.savez_compressed(tmp, ids=np.asarray(ids), logits=logits.astype(np.float16),
                            logits_tta=logits_tta.astype(np.float16))
    return {"val_score": metric.competition_score(masks, logits > 0),
            "val_score_tta": metric.competition_score(masks, logits_tta > 0),
            "member_scores_tta": member_scores}


def load_oof(models_dir, dataset, split: np.ndarray, folds) -> dict:
    """The out-of-fold predictions that :func:`train_fold` saved (``fold<k>/oof.npz``), in one set.

    Args:
        models_dir: the run's model folder (``papermill_runs/<run>/models``).
        dataset: the :class:`saltlib.data.SaltDataset` the folds were made from.
        split: ``(N,)`` fold of each image of ``dataset`` (:func:`saltlib.data.kfold`).
        folds: the folds to read.
    Returns:
        dict of arrays concatenated over ``folds``: ``idx`` (positions in ``dataset``), ``logits``
        and ``logits_tta`` (float32 ``(M, H, W)``) and ``fold``.
    Raises:
        ValueError: naming the file, when a fold's saved ids are not that fold of ``split`` (another
            seed, n_folds or limit) or not all among ``dataset``'s images (another limit or data folder).
    """
    position = {i: k for k, i in enumerate(dataset.ids)}
    out = {"idx": [], "logits": [], "logits_tta": [], "fold": []}
    for f in folds:
        path = Path(models_dir) / f"fold{f}" / "oof.npz"
        z = np.load(path)
        unknown = [str(i) for i in z["ids"] if i not in position]
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} of its {len(z['ids'])} out-of-fold ids (e.g. {unknown[0]!r}) "
                             f"are not among the {len(position)} images loaded (limit or data folder changed?)")
        k = np.array([position[i] for i in z["ids"]], int)
        if not (split[k] == f).all() or len(k) != (split == f).sum():
            raise ValueError(f"{path}: out-of-fold ids differ from fold {f} of the split (seed, n_folds or limit changed?)")
        out["idx"].append(k)
        out["logits"].append(z["logits"].astype(np.float32))
        out["logits_tta"].append(z["logits_tta"].astype(np.float32))
        out["fold"].append(np.full(len(k), f))
    return {key: np.concatenate(v) for key, v in out.items()}


def predict_batches(model, images, batch_size: int = 64) -> np.ndarray:
    """``model``'s output for ``images`` (a numpy array, first axis the images), batch by batch.

    Each batch goes through ``model.predict_on_batch``; the last one is padded with zeros to
    ``batch_size`` and cut back, so the compiled step keeps one input shape (no retracing). The
    same numbers as ``model.predict``, which feeds the batches through a ``tf.data`` pipeline under
    TensorFlow: on the 2-core AVX512-BF16 CPU here that ran on one core in most timings (a fixed
    ~1.28 s per batch, whatever the model), while ``predict_on_batch`` kept both busy (README, Speed).

    Args:
        model: a Keras model taking ``(batch, ...)`` float32 inputs.
        images: ``(N, ...)`` array; ``N`` may be 0 or not a multiple of ``batch_size``.
        batch_size: images per call (>= 1).
    Returns:
        the outputs stacked along the first axis (``(N, ...)``; with ``N == 0``, one batch of
        zeros is run to learn the output shape and an empty array of it is returned).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = np.asarray(images)
    outs = []
    for start in range(0, max(len(images), 1), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:  # pad the last (or an empty) batch to the compiled shape
            batch = np.concatenate([batch, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
        outs.append(np.asarray(model.predict_on_batch(batch))[:n])
    return np.concatenate(outs)


def predict_logits(model, images, batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Logits ``(N, H, W)`` float32 for ``(N, H, W, 1)`` images; ``tta`` averages in the
    left-right flipped prediction (flipped back). Batches as :func:`predict_batches`."""
    out = predict_batches(model, images, batch_size).astype(np.float32)[..., 0]
    if tta:
        flipped = predict_batches(model, images[:, :, ::-1], batch_size)
        out = 0.5 * (out + flipped[..., 0][:, :, ::-1].astype(np.float32))
    return out


def _callbacks_module():
    import keras

    class ValScore(keras.callbacks.Callback):
        """Adds ``val_score`` (competition metric at logit 0) and the learning rate to the logs."""

        def __init__(self, images, masks, every, stage):
            super().__init__()
            self.images, self.masks, self.every, self.stage = images, masks, every, stage

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            logs["stage"] = self.stage
            lr = self.model.optimizer.learning_rate
            logs["lr"] = float(np.asarray(lr))
            if len(self.images) and self.every and (epoch + 1) % self.every == 0:
                logits = predict_logits(self.model, self.images)
                logs["val_score"] = metric.competition_score(self.masks, logits > 0)
            else:
                logs["val_score"] = float("nan")

    class StopOnNaN(keras.callbacks.Callback):
        """Raises :class:`TrainingError` as soon as the loss is NaN or infinite."""

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.model.stop_training = True
                raise TrainingError(
                    f"loss became {loss} at batch {batch}; lower the learning rate or check the data"
                )

    class History(keras.callbacks.Callback):
        """Appends each epoch's logs to a CSV, rewriting it atomically."""

        def __init__(self, path, stage):
            super().__init__()
            self.path, self.stage = Path(path), stage

        def on_epoch_end(self, epoch, logs=None):
            import pandas as pd

            rows = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()
            if len(rows):
                rows = rows[~((rows["stage"] == self.stage) & (rows["epoch"] >= epoch + 1))]
            row = {"stage": self.stage, "epoch": epoch + 1, "time": time.time()}
            row.update({k: float(v) for k, v in (logs or {}).items() if k != "stage"})
            rows = pd.concat([rows, pd.DataFrame([row])], ignore_index=True)
            io.write_text(self.path, rows.to_csv(index=False))

    class Timing(keras.callbacks.Callback):
        """Adds the stage's training time to ``timing.json`` at every epoch's end, so that a run
        killed without warning (SIGKILL, a machine taken away) keeps the seconds of the epochs it
        finished. ``total()`` is the time so far: the seconds recorded before plus this stage's.
        ``stage_end`` (stage number as a string -> seconds when its weights were saved) is written
        along: tools/park_fold.py carries a fold's time at its last finished stage from it."""

        def __init__(self, path, seconds_before, stage_end):
            super().__init__()
            self.path, self.before, self.start = Path(path), float(seconds_before), time.time()
            self.stage_end = stage_end

        def total(self) -> float:
            return self.before + time.time() - self.start

        def write(self, seconds: float) -> None:
            io.write_json(self.path, {"seconds": seconds, "stage_end": self.stage_end})

        def on_epoch_end(self, epoch, logs=None):
            self.write(self.total())

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        """``BackupAndRestore`` whose checkpoint is written so that a kill at any moment leaves a
        consistent one behind.

        Keras writes ``latest.weights.h5`` in place, then the epoch counter: a SIGKILL during the
        write left a truncated file, and one between the two left the new weights under the old
        counter, so the resumed run repeated an epoch from weights that had already trained it.
        Here each checkpoint's weights go to a new file named by its epoch (written to a temporary
        name and renamed), then the counter, which names that file, replaces the old one
        atomically; only then is the previous weights file removed. A kill before the counter is
        replaced resumes from the previous checkpoint, whose weights are still there, so the
        resumed run repeats the epoch exactly as an uninterrupted one trains it. A backup written
        by the earlier scheme (no file named in the counter) loads ``latest.weights.h5`` as before.
        (Overrides the private ``_save_model`` and ``_load_model`` of the pinned Keras 3.15.)
        """

        def _save_model(self):
            folder = Path(self.backup_dir)
            folder.mkdir(parents=True, exist_ok=True)
            name = f"epoch{self._current_epoch}-batch{self._last_batch_seen}.weights.h5"
            with io.atomic_path(folder / name) as tmp:
                self.model.save_weights(str(tmp))
            io.write_text(
                self._training_metadata_path,
                json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}),
            )
            for old in folder.glob("*.weights.h5"):
                if old.name != name:
                    old.unlink(missing_ok=True)

        def _load_model(self):
            meta = Path(self._training_metadata_path)
            if meta.is_file():
                name = json.loads(meta.read_text()).get("weights")
                if name:
                    self._weights_path = str(Path(self.backup_dir) / name)
            super()._load_model()

    class StopAtEpochEnd(keras.callbacks.Callback):
        """Ends ``fit`` after the epoch in which :func:`stop_at_epoch_end`'s handler ran. Listed
        after the checkpoint callback, so that epoch is saved first. ``epochs_done`` counts the
        stage's epochs finished (those of an earlier, resumed process included)."""

        def __init__(self):
            super().__init__()
            self.epochs_done = None

        def on_epoch_end(self, epoch, logs=None):
            self.epochs_done = epoch + 1
            if _STOP["signum"] is not None:
                self.model.stop_training = True

    return ValScore, StopOnNaN, History, AtomicBackupAndRestore, Timing, StopAtEpochEnd


def _has_hypercolumn(model) -> bool:
    """Whether ``model``'s final convolution sees the hypercolumn: the inference form's
    concatenation layer, or the training form's part-by-part convolution (:class:`saltlib.model.Conv2D`)."""
    return any(layer.name == "hypercolumn" or "resize" in getattr(layer, "modes", ()) for layer in model.layers)


def init_weights(model, source) -> dict:
    """Copy the weights of a saved model into ``model``, layer by layer by name (fine-tuning).

    ``source`` is usually a shipped inference model (``.keras``), which lacks the training-only
    layers of an ``empty_head`` model: ``seg_logits`` (the decoder-only 1x1 convolution) then
    starts as the decoder part of the fused ``logits`` convolution (its first input channels are
    the decoder's), so the deep-supervision loss starts near the fused one instead of at random;
    ``image_logit`` keeps its fresh initialisation. Weights are cast to the model's variable dtype
    (a bfloat16 file into a float32 training model).

    ``model`` may also grow ``source``'s architecture by the decoder options ``scse`` and
    ``hypercolumn`` (same shape otherwise), starting as the same function: the final 1x1
    convolutions (``logits``, ``seg_logits``) keep ``source``'s kernel for the finest decoder
    level's channels (first) and the image features (last), with zeros for the coarser levels the
    hypercolumn adds between them; every new scSE block starts as the identity (its two sigmoid
    gates' layers, ``*_cse_fc2`` and ``*_sse_conv``, zeroed: both gates 0.5, and the block's output,
    the sum of the two rescaled maps, is its input).

    Args:
        model: the model to fill (built by :func:`build_model`).
        source: path of a ``.keras`` model with the same architecture (layer names and shapes), or
            the same less scSE blocks or the hypercolumn.
    Returns:
        dict with ``copied`` (layer names), ``fresh`` (layers of ``model`` with weights that
        ``source`` lacks, left as built or derived as above) and ``grown`` (layers copied with
        zero-filled input channels, or new scSE layers set to the identity).
    Raises:
        ValueError: naming the layer, where a layer of both models has weights of another shape
            (other than the hypercolumn's channels).
    """
    import keras

    src = keras.saving.load_model(source, compile=False, safe_mode=True)
    src_layers = {layer.name: layer for layer in src.layers}
    # the hypercolumn added: its coarser levels' channels sit between the finest level's and the image's
    hyper = _has_hypercolumn(model) and not _has_hypercolumn(src)
    finest = model.get_layer("dec1_conv").filters if hyper else None
    copied, fresh, grown = [], [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in src_layers:
            fresh.append(layer.name)
            continue
        new = [np.asarray(w, dtype=np.float32) for w in src_layers[layer.name].get_weights()]
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if hyper and layer.name in ("logits", "seg_logits") and len(new) == 2 and new[0].ndim == 4:
            added = shapes[0][2] - new[0].shape[2]
            if added > 0 and new[0].shape[:2] == shapes[0][:2] and new[0].shape[3] == shapes[0][3]:
                zeros = np.zeros((*new[0].shape[:2], added, new[0].shape[3]), np.float32)
                new[0] = np.concatenate([new[0][:, :, :finest], zeros, new[0][:, :, finest:]], axis=2)
                grown.append(layer.name)
        if [w.shape for w in new] != shapes:
            raise ValueError(f"{source}: layer {layer.name!r} has weights {[w.shape for w in new]}, "
                             f"the model to fine-tune {shapes}: another architecture")
        layer.set_weights(new)
        copied.append(layer.name)
    if "seg_logits" in fresh and "logits" in copied:
        kernel, bias = model.get_layer("logits").get_weights()
        seg = model.get_layer("seg_logits")
        channels = seg.get_weights()[0].shape[2]
        seg.set_weights([kernel[:, :, :channels, :], bias])
    for name in list(fresh):  # new scSE blocks: both gates at sigmoid(0) = 0.5, the block the identity
        if "_scse_" in name and name.endswith(("_cse_fc2", "_sse_conv")):
            layer = model.get_layer(name)
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
            grown.append(name)
    return {"copied": copied, "fresh": fresh, "grown": grown}


def train_fold(dataset, folds: np.ndarray, fold: int, cfg: dict, out_dir, verbose: int = 2,
               init_from=None) -> dict:
    """Train (or resume, or skip if finished) one fold and return its summary.

    Args:
        dataset: a :class:`saltlib.data.SaltDataset` with masks.
        folds: ``(N,)`` fold number of each image (see :func:`saltlib.data.kfold`).
        fold: the fold held out for validation.
        cfg: training configuration; missing keys take :data:`DEFAULTS`.
        out_dir: the run's model folder; this fold writes ``out_dir/fold<fold>/``.
        verbose: Keras ``fit`` verbosity (2 = one line per epoch, good for logs).
        init_from: a saved model (``.keras``) whose weights the fold starts from instead of a fresh
            initialisation (fine-tuning, see :func:`init_weights`); recorded in ``init.json`` with
            its SHA-256, and a fold started from another file (or from scratch) is not resumed.
            Images whose ``folds`` entry is negative are only ever trained on (for example
            pseudo-labelled test images): they are never a fold's validation images.
    Returns:
        dict with ``fold``, ``val_score`` (the fold's ensemble, logit 0, no TTA), ``val_score_tta``,
        ``models`` (the ensemble's files), ``member_scores_tta`` (each file alone, with TTA),
        ``epochs``, ``seconds`` (training time, summed over resumed sessions) and file paths.
    Raises:
        saltlib.params.ParamError: a configuration value :mod:`saltlib.params` refuses (before
            anything is written).
        TrainingError: on a NaN loss.
        StopRequested: within :func:`stop_at_epoch_end`, when a signal asked training to stop
            (everything finished so far is kept; calling again resumes).
    """
    import keras

    from . import augment, distribute

    cfg = {k: _plain(v) for k, v in {**DEFAULTS, **cfg}.items()}
    # the parameter checks of a run, for direct callers too (types, ranges, snapshots before the last stage)
    params.check({k: cfg[k] for k in TRAIN_KEYS}, f"fold {fold} training configuration",
                 base={**params.defaults(), **cfg})
    if not (np.asarray(folds) == fold).any():
        raise ValueError(f"fold {fold} holds no images: the split has folds {np.unique(folds).tolist()}")
    _check_stop(f"before fold {fold}")
    fold_dir = Path(out_dir) / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    done_path, recipe_path = fold_dir / "done.json", fold_dir / "recipe.json"
    # a fold records its recipe when it starts; a different recipe may reuse a finished fold
    # (said aloud, and the model card lists each fold's recipe) but never resumes a half-trained one
    now = recipe(cfg)
    recorded = io.read_json(recipe_path) if recipe_path.exists() else None
    diff = recipe_diff(recorded, cfg) if recorded is not None else {}
    # the images: a fold recorded before split.json existed is taken as it is
    split_path, split = fold_dir / "split.json", split_record(dataset.ids, folds, fold)
    old_split = io.read_json(split_path) if split_path.exists() else None
    split_diff = {k: (old_split[k], v) for k, v in split.items() if old_split and old_split.get(k) != v}
    if done_path.exists():
        summary = json.loads(done_path.read_text())
        print(f"fold {fold}: already trained (val_score {summary['val_score']:.4f}), skipping")
        if diff:
            print(f"fold {fold}: NOTE it was trained with a different recipe ({recipe_path}): "
                  + _diff_text(diff, "here"))
        if split_diff:
            print(f"fold {fold}: NOTE it was trained on other images ({split_path}): " + _diff_text(split_diff, "here")
                  + "; its out-of-fold scores are for those images")
        return summary
    if split_diff:
        raise ValueError(
            f"fold {fold} in {fold_dir} was started on other images ({split_path}); resuming it would train on "
            "held-out images: " + _diff_text(split_diff, "now") + ". Use another --out folder, or the same data "
            "(limit, data_dir)."
        )
    extends = (  # more stages after finished ones (a warm restart added later) is a clean resume
        set(diff) == {"stages"}
        and now["stages"][: len(recorded["stages"])] == recorded["stages"]
        and (fold_dir / f"stage{len(recorded['stages'])}.weights.h5").exists()
    )
    if diff and not extends:
        raise ValueError(
            f"fold {fold} in {fold_dir} was started with a different recipe ({recipe_path}); resuming it would "
            "mix two recipes: " + _diff_text(diff, "now") + ". Use another --out folder, or the recorded values."
        )
    init_path = fold_dir / "init.json"
    init = None
    if init_from is not None:
        from .predict import _sha256

        init = {"init_from": str(init_from), "sha256": _sha256(init_from)}
    old_init = io.read_json(init_path) if init_path.exists() else None
    started = recipe_path.exists()
    if started and (old_init or {}).get("sha256") != (init or {}).get("sha256"):
        raise ValueError(
            f"fold {fold} in {fold_dir} was started from {old_init['init_from'] if old_init else 'a fresh initialisation'}"
            f" ({init_path}); resuming it from {init['init_from'] if init else 'a fresh initialisation'} would mix "
            "two starts. Use another --out folder."
        )
    if init is not None and not started:
        io.write_json(init_path, init)
    if extends or not recipe_path.exists():
        io.write_json(recipe_path, now)
    if old_split is None:
        io.write_json(split_path, split)

    train_idx, val_idx = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    x_tr, y_tr = dataset.images[train_idx], dataset.masks[train_idx]
    x_va, y_va = dataset.images[val_idx], dataset.masks[val_idx]
    strategy = distribute.get_strategy(cfg["strategy"])
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg["batch_size"] * replicas
    steps = math.ceil(len(train_idx) / global_batch)
    ValScore, StopOnNaN, History, Backup, Timing, StopAtEpochEnd = _callbacks_module()
    timing_path = fold_dir / "timing.json"
    timing = io.read_json(timing_path) if timing_path.exists() else {}
    seconds, stage_end = float(timing.get("seconds", 0.0)), dict(timing.get("stage_end", {}))

    from . import hardware

    bf16, native = use_bfloat16(cfg), hardware.native_bfloat16()
    print(f"fold {fold}: {'bfloat16 mixed precision' if bf16 else 'float32'} "
          f"(mixed_precision: {cfg['mixed_precision']}; {hardware.describe()})")
    if bf16 and not native:
        print(f"fold {fold}: WARNING mixed_precision: true on a machine without native bfloat16: it is emulated and "
              "trains several times slower than float32 (6x on an AVX2 CPU); set mixed_precision: auto or false")
    # the last stage whose weights are kept marks every stage before it finished, so a fold folder
    # may keep only that file (tools/park_fold.py carries such a folder between machines)
    last_done = max((s for s in range(1, len(cfg["stages"]) + 1) if (fold_dir / f"stage{s}.weights.h5").exists()),
                    default=0)
    missing = [s for s in sorted(set(cfg["snapshots"]))
               if s < last_done and not (fold_dir / f"stage{s}.weights.h5").exists()]
    if missing:
        raise ValueError(f"fold {fold} in {fold_dir}: snapshots {cfg['snapshots']} need stage{missing[0]}.weights.h5, "
                         f"which is gone (only later stages' weights are kept)")
    keras.utils.set_random_seed(cfg["seed"] + fold)
    with strategy.scope():
        model = build_model(cfg)
    if init is not None and not last_done:
        # a resumed stage 1 loads its backup over these in fit(); later stages load their own weights
        copied = init_weights(model, init_from)
        print(f"fold {fold}: weights from {init_from} ({len(copied['copied'])} layers"
              + (f"; fresh: {', '.join(copied['fresh'])}" if copied["fresh"] else "")
              + (f"; grown to the same function: {', '.join(copied['grown'])}" if copied["grown"] else "") + ")")
    print(
        f"fold {fold}: {len(train_idx)} train / {len(val_idx)} val images, "
        f"{model.count_params():,} parameters, {replicas} replica(s), global batch {global_batch}"
    )
    for s, stage in enumerate(cfg["stages"], start=1):
        stage_path = fold_dir / f"stage{s}.weights.h5"
        if s < last_done:
            print(f"fold {fold} stage {s} ({stage['loss']}): finished earlier")
            continue
        if s == last_done:
            print(f"fold {fold} stage {s} ({stage['loss']}): finished earlier, loading its weights")
            model.load_weights(stage_path)
            continue
        _check_stop(f"before fold {fold}'s stage {s} of {len(cfg['stages'])}")
        if s > 1:
            model.load_weights(fold_dir / f"stage{s - 1}.weights.h5")
        lr = stage["lr"] * replicas
        with strategy.scope():
            schedule = keras.optimizers.schedules.CosineDecay(
                lr, decay_steps=max(1, stage["epochs"] * steps), alpha=min(1.0, cfg["min_lr"] / lr)
            )
            model.compile(
                optimizer=keras.optimizers.Adam(schedule),
                loss=stage_loss(cfg, stage["loss"]),
                jit_compile=jit_compile(),
            )
        # the epoch BackupAndRestore will resume at: the data stream starts there too, so a resumed
        # stage sees the batches an uninterrupted one would have (not epoch 1's again)
        meta = fold_dir / f"backup{s}" / "training_metadata.json"
        initial_epoch = int(io.read_json(meta)["epoch"]) if meta.is_file() else 0
        ds = augment.make_dataset(
            x_tr, y_tr, global_batch, training=True, seed=cfg["seed"] + 1000 * fold + s, initial_epoch=initial_epoch,
            flip=cfg["flip"], zoom=cfg["zoom"], p_zoom=cfg["p_zoom"], brightness=cfg["brightness"],
        )
        backup = Backup(str(fold_dir / f"backup{s}"), delete_checkpoint=False)
        print(f"fold {fold} stage {s}: loss {stage['loss']}, {stage['epochs']} epochs, lr {lr:g} (cosine)")
        # Keras' BackupAndRestore resumes by setting model._initial_epoch, which then outlives its
        # fit(): a later stage of the same process would start at that epoch with a fresh
        # optimizer (fewer epochs, and a cosine schedule that never decays). Clear it per stage.
        model._initial_epoch = None
        timer, stopper = Timing(timing_path, seconds, stage_end), StopAtEpochEnd()
        try:
            model.fit(
                ds,
                epochs=stage["epochs"],
                steps_per_epoch=steps,  # the training stream is endless (augment.make_dataset)
                verbose=verbose,
                shuffle=False,
                # History before backup: a kill between the two repeats the epoch (its row is
                # rewritten) instead of skipping it with no row in history.csv
                callbacks=[
                    StopOnNaN(),
                    ValScore(x_va, y_va, cfg["val_every"], s),
                    timer,
                    History(fold_dir / "history.csv", s),
                    backup,
                    stopper,
                ],
            )
        finally:
            seconds = timer.total()
            timer.write(seconds)
        if stopper.epochs_done is not None and stopper.epochs_done < stage["epochs"]:
            _check_stop(f"fold {fold} after epoch {stopper.epochs_done} of stage {s}'s {stage['epochs']} "
                        f"(checkpoint in {fold_dir / f'backup{s}'})")
        with io.atomic_path(stage_path) as tmp:
            model.save_weights(tmp)
        stage_end[str(s)] = seconds
        timer.write(seconds)
        shutil.rmtree(fold_dir / f"backup{s}", ignore_errors=True)
    _check_stop(f"fold {fold} after its last stage (its models and out-of-fold scores are made when it resumes)")

    # the fold's ensemble: the final model and any snapshots, saved for inference; out-of-fold
    # logits come from the saved files, so they are exactly what a bundle predicts
    snapshots = sorted(set(cfg["snapshots"]))
    members = ["model.keras"] + [f"snapshot{s}.keras" for s in snapshots]
    save_model(model, cfg, fold_dir / "model.keras")
    for s in snapshots:
        model.load_weights(fold_dir / f"stage{s}.weights.h5")
        save_model(model, cfg, fold_dir / f"snapshot{s}.keras")
    scores = write_oof(fold_dir, members, dataset.ids[val_idx], x_va, y_va)
    summary = {
        "fold": fold,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_score": scores["val_score"],
        "val_score_tta": scores["val_score_tta"],
        "models": members,
        "member_scores_tta": scores["member_scores_tta"],
        "epochs": int(sum(st["epochs"] for st in cfg["stages"])),
        "seconds": round(seconds, 1),
        "train_images_per_s": round(
            len(train_idx) * sum(st["epochs"] for st in cfg["stages"]) / max(seconds, 1e-9), 2
        ),
    }
    io.write_json(done_path, summary)
    print(f"fold {fold}: val_score {summary['val_score']:.4f}, with flip TTA {summary['val_score_tta']:.4f}")
    return summary
