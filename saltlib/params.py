"""Run parameters: one specification, checked before anything runs.

Every key of a parameter YAML is a parameter of one or more notebooks (the cell tagged
``parameters``); :data:`SPEC` lists them with their type, default, allowed range and meaning.
Papermill only warns about unknown parameters, so :func:`check` refuses them, along with wrong
types and out-of-range values, naming the key.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml


class ParamError(ValueError):
    """A parameter file or value is wrong; the message names the key (and file)."""


class _Loader(yaml.SafeLoader):
    """The safe YAML loader that also reads ``1e-5`` (no dot) as a float, as YAML 1.2 does, and
    refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ParamError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            except TypeError:  # an unhashable key: let the base class report it
                break
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _finite(x) -> bool:
    """``math.isfinite`` that says False (instead of raising) for ints too big for a float."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Param:
    type: type | tuple  # int, float, bool, str, list
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None

    return check


def _one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {list(choices)}"

    return check


def _bool_or_auto(v):
    return None if isinstance(v, bool) or v == "auto" else "must be true, false or auto"


def _number_list(v):
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not _finite(x):
            return f"items must be finite numbers, got {x!r}"
    return None


def _int_list(lo=None, hi=None, nonempty=False, unique=False):
    def check(v):
        if nonempty and not v:
            return "must list at least one value"
        for i, x in enumerate(v):
            if not isinstance(x, int) or isinstance(x, bool):
                return f"items must be integers, got {x!r}"
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                return f"items must be in [{lo}, {hi}], got {x}"
            if unique and x in v[:i]:
                return f"lists {x!r} more than once"
        return None

    return check


def _stages(v):
    from .losses import get_loss

    if not v:
        return "needs at least one stage"
    for i, st in enumerate(v):
        where = f"stage {i + 1}"
        if not isinstance(st, dict):
            return f"{where} must be a mapping like {{loss: bce, epochs: 10, lr: 0.001}}, got {st!r}"
        extra = set(st) - {"loss", "epochs", "lr"}
        missing = {"loss", "epochs", "lr"} - set(st)
        if extra or missing:
            return f"{where} needs exactly the keys loss, epochs, lr (missing {sorted(missing)}, unknown {sorted(extra)})"
        try:
            get_loss(st["loss"])
        except ValueError as e:
            return f"{where}: {e}"
        if not isinstance(st["epochs"], int) or isinstance(st["epochs"], bool) or st["epochs"] < 0:
            return f"{where}: epochs must be an integer >= 0, got {st['epochs']!r}"
        lr = st["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not _finite(lr) or lr <= 0:
            return f"{where}: lr must be a number > 0, got {lr!r}"
    return None


SPEC: dict[str, Param] = {
    # where things are
    "run_dir": Param(str, "", "output folder of the run ('' = papermill_runs/interactive); set by `salt run`"),
    "data_dir": Param(str, "", "Kaggle-layout data folder ('' = SALT_DATA_DIR, data/, ../shared/data/tgs-salt)"),
    "limit": Param(int, 0, "use only the first N training images (0 = all)", _range(0)),
    "seed": Param(int, 42, "seed for folds, weights, shuffling and augmentation", _range(0)),
    # cross-validation
    "n_folds": Param(int, 5, "number of stratified folds", _range(2, 20)),
    "folds": Param(list, [0], "folds to train (each held out once)", _int_list(0, 19, unique=True)),
    "bundle_folds": Param(list, [], "folds whose models go into the bundle ([] = every fold in 'folds'); "
                          "post-processing is tuned on all folds' held-out images either way", _int_list(0, 19, unique=True)),
    # model
    "base_filters": Param(int, 16, "channels of the first U-Net level", _range(1, 256)),
    "depth": Param(int, 4, "down-sampling levels (4: 101->50->25->12->6)", _range(1, 5)),
    "blocks_per_level": Param(int, 2, "residual blocks per level", _range(0, 8)),
    "dropout": Param(float, 0.25, "dropout rate after pooling and skip concatenation", _range(0.0, 1.0, hi_open=True)),
    "empty_head": Param(bool, False, "image-level salt/no-salt head fused into the output, with deep supervision"),
    "image_loss_weight": Param(float, 0.1, "with empty_head: weight of the image logit's salt-present cross-entropy "
                               "in the training loss", _range(0.0, 100.0)),
    "upscale": Param(int, 1, "enlarge the 101x101 input k times inside the model (bilinear; 2: 202x202) and "
                     "average the logits back (1 = native size)", _range(1, 4)),
    "pad_to": Param(int, 0, "zero-pad the (enlarged) input to this size inside the model and crop the logits back "
                    "(0 = no padding; 128: 101->128, every halving even)", _range(0, 1024)),
    "scse": Param(bool, False, "end every decoder level with a concurrent spatial and channel squeeze-and-excitation "
                  "(scSE) block"),
    "hypercolumn": Param(bool, False, "the final convolution sees every decoder level's output, resized to full size "
                         "(hypercolumn), not only the last one's"),
    "mixed_precision": Param((bool, str), "auto", "bfloat16 compute with float32 weights: true, false, or auto (bfloat16 "
                             "where the CPU has AVX512-BF16/AMX or the GPU is Ampere or newer; elsewhere it is emulated "
                             "and slower than float32)", _bool_or_auto),
    # training
    "batch_size": Param(int, 32, "images per step (per replica)", _range(1, 4096)),
    "stages": Param(list, [{"loss": "bce", "epochs": 30, "lr": 0.003}, {"loss": "lovasz", "epochs": 30, "lr": 0.001}],
                    "training stages: loss name, epochs and peak learning rate (cosine decay)", _stages),
    "snapshots": Param(list, [], "earlier stages whose final weights join the fold's ensemble (snapshot ensemble)", _int_list(1, 20)),
    "min_lr": Param(float, 1e-5, "learning rate at the end of each stage's cosine decay", _range(0.0, lo_open=True)),
    "flip": Param(bool, True, "random left-right flips"),
    "zoom": Param(float, 0.1, "largest zoom-in crop fraction (scale + shift augmentation)", _range(0.0, 0.5)),
    "p_zoom": Param(float, 0.5, "probability of the zoom augmentation", _range(0.0, 1.0)),
    "brightness": Param(float, 0.1, "largest brightness/contrast change", _range(0.0, 0.5)),
    "val_every": Param(int, 1, "score the held-out fold every N epochs (0 = never)", _range(0)),
    "strategy": Param(str, "default", "tf.distribute strategy", _one_of("default", "mirrored", "multi_worker")),
    # notebooks
    "n_samples": Param(int, 12, "images shown in galleries", _range(1, 100)),
    "min_sizes": Param(list, [0, 10, 25, 50, 100, 200], "small-mask sizes (pixels) tried in post-processing", _int_list(0, 10201, nonempty=True)),
    "peak_gates": Param(list, [], "largest-logit gates tried in post-processing: an image whose largest logit "
                        "is at most g is predicted empty ([] = no gate)", _number_list),
    "test_dir": Param(str, "", "folder of test PNGs ('' = DATA/test/images)"),
    "test_limit": Param(int, 0, "predict only the first N test images (0 = all)", _range(0)),
}


def defaults() -> dict:
    """Every parameter at its default (deep copies of lists)."""
    import copy

    return {k: copy.deepcopy(p.default) for k, p in SPEC.items()}


def _type_ok(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if kind is float:
        return "a finite float"  # NaN and infinities are floats, but no parameter takes them
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def check(values: dict, source: str = "parameters", base: dict | None = None) -> dict:
    """Check parameter values against :data:`SPEC`, each alone and then together.

    Args:
        values: parameter name -> value (a partial set is fine).
        source: where they came from, for messages (a file name or ``--set``).
        base: the values these complete or override (default: the defaults); the checks that tie
            keys together (``folds`` < ``n_folds``, ``bundle_folds`` within ``folds``, ``snapshots``
            earlier than the last of ``stages``, ``pad_to`` at least the input) run on ``base`` updated with ``values``.
    Returns:
        ``values`` with ints given for float parameters turned into floats.
    Raises:
        ParamError: for the first unknown key (with a close match if any), wrong type or bad value.
    """
    if not isinstance(values, dict):
        raise ParamError(f"{source}: must be a mapping of parameter: value, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        if key not in SPEC:
            close = difflib.get_close_matches(str(key), SPEC, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParamError(f"{source}: unknown parameter {key!r}{hint}")
        p = SPEC[key]
        if not _type_ok(value, p.type):
            raise ParamError(
                f"{source}: parameter {key!r} must be {_type_name(p.type)}, got {type(value).__name__} {value!r}"
            )
        if p.type is float:
            value = float(value)
        if p.check:
            complaint = p.check(value)
            if complaint:
                raise ParamError(f"{source}: parameter {key!r} {complaint} (got {value!r})")
        out[key] = value
    _check_together({**(defaults() if base is None else base), **out}, set(out), source)
    return out


def _check_together(merged: dict, given: set, source: str) -> None:
    """The checks that tie keys together, on complete values ``merged``; only those that involve a
    key in ``given`` (the keys ``source`` set) run, so an error blames the source that caused it."""
    if given & {"folds", "n_folds"}:
        if not merged["folds"]:
            raise ParamError(f"{source}: parameter 'folds' is empty: list at least one fold to train")
        bad = [f for f in merged["folds"] if f >= merged["n_folds"]]
        if bad:
            raise ParamError(f"{source}: parameter 'folds' has fold {bad[0]} but n_folds is {merged['n_folds']}")
    if given & {"folds", "bundle_folds"}:
        bad = [f for f in merged["bundle_folds"] if f not in merged["folds"]]
        if bad:
            raise ParamError(
                f"{source}: parameter 'bundle_folds' has fold {bad[0]}, which is not in 'folds' {merged['folds']}"
            )
    if given & {"pad_to", "upscale"} and merged["pad_to"] and merged["pad_to"] < 101 * merged["upscale"]:
        raise ParamError(
            f"{source}: parameter 'pad_to' is {merged['pad_to']}, smaller than the model's input "
            f"(101 x upscale {merged['upscale']} = {101 * merged['upscale']}); use 0 for no padding"
        )
    if given & {"snapshots", "stages"}:
        n = len(merged["stages"])
        bad = [k for k in merged["snapshots"] if not 1 <= k < n]
        if bad:
            earlier = (f"of the {n} in 'stages' only stages 1 to {n - 1} are" if n > 2 else
                       "of the 2 in 'stages' only stage 1 is" if n == 2 else "'stages' has one stage, so none is")
            raise ParamError(
                f"{source}: parameter 'snapshots' has stage {bad[0]}, but {earlier} earlier than the last "
                "(the last stage's weights are the model itself)"
            )


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value read as YAML (``epochs=3`` gives an int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamError(f"--set {text!r}: expected KEY=VALUE")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamError(f"--set {text!r}: value is not valid YAML ({e})") from None
    except ParamError as e:
        raise ParamError(f"--set {text!r}: {e}") from None
    return key.strip(), value


def read_yaml(path) -> dict:
    """Read a parameter file with the safe YAML loader (``1e-5`` is a float); it must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML ({e})") from None
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamError(f"{path}: must be a mapping of parameter: value, got {type(values).__name__}")
    return values


def load(path=None, overrides=()) -> dict:
    """Defaults, then the file, then ``KEY=VALUE`` overrides, each checked.

    Returns:
        the complete, checked parameter dict.
    """
    values = defaults()
    if path is not None:
        values.update(check(read_yaml(path), str(path)))
    for text in overrides or ():
        key, value = parse_override(text)
        values.update(check({key: value}, f"--set {text}", base=values))
    check(values, str(path or "parameters"))
    return values
