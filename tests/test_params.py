"""Parameter checking: unknown keys, types, ranges, stages, YAML reading and --set overrides."""

from __future__ import annotations

import math
import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from saltlib import params
from saltlib.params import SPEC, ParamError


def test_defaults_pass_check_and_cover_spec():
    d = params.defaults()
    assert set(d) == set(SPEC)
    assert params.check(d) == d
    d["folds"].append(99)  # defaults() hands out copies
    assert params.defaults()["folds"] == SPEC["folds"].default


def test_every_parameter_is_documented():
    for key, p in SPEC.items():
        assert p.help and len(p.help) > 10, key
        assert isinstance(p.default, p.type) and not (p.type is int and isinstance(p.default, bool)), key


# --------------------------------------------------------------------------- unknown keys, types
@pytest.mark.parametrize(
    "key,hint",
    [("base_filter", "base_filters"), ("n_fold", "n_folds"), ("stage", "stages"), ("Seed", "seed"), ("zzz", None), (3, None)],
)
def test_unknown_key_named_with_suggestion(key, hint):
    with pytest.raises(ParamError, match=f"unknown parameter {key!r}") as info:
        params.check({key: 1}, "my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ")
    if hint:
        assert f"did you mean {hint!r}" in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("seed", True),  # bool is not an int
        ("seed", 1.0),
        ("seed", "42"),
        ("seed", None),
        ("base_filters", 16.5),
        ("dropout", "0.5"),  # str for float
        ("dropout", True),
        ("dropout", None),
        ("dropout", float("nan")),
        ("dropout", float("inf")),
        ("min_lr", 10**400),  # an int too big for a float
        ("mixed_precision", 1),  # int for bool
        ("mixed_precision", "true"),
        ("strategy", 3),
        ("folds", 0),  # int for list
        ("folds", "0,1"),
        ("stages", {"loss": "bce", "epochs": 1, "lr": 0.1}),  # one stage, not a list
        ("run_dir", 5),
    ],
)
def test_wrong_types_named(key, value):
    with pytest.raises(ParamError, match=f"parameter {key!r} must be"):
        params.check({key: value}, "p.yaml")


def test_int_accepted_for_float_and_converted():
    out = params.check({"dropout": 0, "zoom": 0})
    assert out == {"dropout": 0.0, "zoom": 0.0}
    assert isinstance(out["dropout"], float)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("n_folds", 1, "must be >= 2"),
        ("n_folds", 21, "must be <= 20"),
        ("depth", 0, "must be >= 1"),
        ("depth", 6, "must be <= 5"),
        ("dropout", 1.0, "must be < 1.0"),
        ("dropout", -0.1, "must be >= 0.0"),
        ("min_lr", 0.0, "must be > 0.0"),
        ("batch_size", 0, "must be >= 1"),
        ("limit", -1, "must be >= 0"),
        ("zoom", 0.6, "must be <= 0.5"),
        ("strategy", "tpu", "must be one of"),
        ("folds", [0, True], "items must be integers"),
        ("folds", [0, 1.0], "items must be integers"),
        ("folds", [-1], "items must be in"),
        ("min_sizes", [0, 10202], "items must be in"),
        ("min_sizes", [], "must list at least one value"),
    ],
)
def test_out_of_range_named(key, value, message):
    with pytest.raises(ParamError, match=f"parameter {key!r} {message}".replace("(", r"\(")) as info:
        params.check({key: value}, "p.yaml")
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_folds_must_be_below_n_folds():
    with pytest.raises(ParamError, match="fold 3 but n_folds is 3"):
        params.check({"n_folds": 3, "folds": [0, 3]})
    with pytest.raises(ParamError, match="fold 5 but n_folds is 5"):
        params.check({"folds": [5]})  # checked against the default n_folds
    assert params.check({"n_folds": 2, "folds": [1]})["folds"] == [1]
    assert params.check({"n_folds": 2}) == {"n_folds": 2}  # the default folds [0] fits


@pytest.mark.parametrize("value,message", [([0.5, "x"], "finite numbers, got 'x'"), ([float("nan")], "finite"),
                                           ([True], "finite numbers, got True")])
def test_peak_gates_must_be_numbers(value, message):
    with pytest.raises(ParamError, match=f"'peak_gates' items must be {message}"):
        params.check({"peak_gates": value})
    assert params.check({"peak_gates": [-1, 0.5]}) == {"peak_gates": [-1, 0.5]}


def test_bundle_folds_must_be_trained_folds(tmp_path):
    with pytest.raises(ParamError, match=r"'bundle_folds' has fold 3, which is not in 'folds' \[0, 1\]"):
        params.check({"folds": [0, 1], "bundle_folds": [0, 3]})
    path = write(tmp_path, "folds: [0, 1, 2]\nbundle_folds: [0, 1]\n")
    assert params.load(path)["bundle_folds"] == [0, 1]
    assert params.load(path, ["bundle_folds=[2]"])["bundle_folds"] == [2]  # --set alone, checked with the file's folds
    with pytest.raises(ParamError, match="'bundle_folds' has fold 1"):
        params.load(path, ["folds=[0]"])  # a change of folds that leaves a bundled fold out
    assert params.load(write(tmp_path, "folds: [3]\n"))["bundle_folds"] == []  # default: every trained fold


@pytest.mark.parametrize(
    "stages,message",
    [
        ([], "at least one stage"),
        (["bce"], "stage 1 must be a mapping"),
        ([{"loss": "bce", "epochs": 1}], "missing \\['lr'\\]"),
        ([{"loss": "bce", "epochs": 1, "lr": 0.1, "momentum": 0.9}], "unknown \\['momentum'\\]"),
        ([{"loss": "bce", "epochs": 1, "lr": 0.1}, {"loss": "focal", "epochs": 1, "lr": 0.1}], "stage 2: unknown loss 'focal'"),
        ([{"loss": "nan*bce", "epochs": 1, "lr": 0.1}], "bad loss weight"),
        ([{"loss": 3, "epochs": 1, "lr": 0.1}], "stage 1: loss must be"),
        ([{"loss": "bce", "epochs": -1, "lr": 0.1}], "epochs must be an integer >= 0"),
        ([{"loss": "bce", "epochs": 1.5, "lr": 0.1}], "epochs must be an integer"),
        ([{"loss": "bce", "epochs": True, "lr": 0.1}], "epochs must be an integer"),
        ([{"loss": "bce", "epochs": 1, "lr": 0}], "lr must be a number > 0"),
        ([{"loss": "bce", "epochs": 1, "lr": -0.1}], "lr must be a number > 0"),
        ([{"loss": "bce", "epochs": 1, "lr": "0.1"}], "lr must be a number"),
        ([{"loss": "bce", "epochs": 1, "lr": float("nan")}], "lr must be a number"),
        ([{"loss": "bce", "epochs": 1, "lr": 10**400}], "lr must be a number"),
        ([{"loss": "bce", "epochs": 1, "lr": True}], "lr must be a number"),
    ],
)
def test_stages_validation(stages, message):
    with pytest.raises(ParamError, match="parameter 'stages'") as info:
        params.check({"stages": stages})
    assert re.search(message, str(info.value)), str(info.value)


def test_valid_stages_pass():
    stages = [{"loss": "bce", "epochs": 0, "lr": 1}, {"loss": "0.5*bce+lovasz", "epochs": 3, "lr": 1e-4}]
    assert params.check({"stages": stages})["stages"] == stages


# --------------------------------------------------------------------------- property-based
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(sorted(SPEC)) | st.text(max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, json_like, max_size=4) | json_like)
def test_random_values_only_raise_param_error(values):
    try:
        out = params.check(values, "random")
    except ParamError as e:
        assert str(e).startswith("random")
        return
    assert isinstance(values, dict) and set(out) == set(values)
    assert set(out) <= set(SPEC)


def _stage():
    return st.fixed_dictionaries({
        "loss": st.sampled_from(["bce", "lovasz", "symmetric_lovasz", "bce+lovasz", "0.5*bce+2*lovasz", "dice"]),
        "epochs": st.integers(0, 100),
        "lr": st.floats(1e-7, 10, allow_nan=False) | st.integers(1, 3),
    })


def _floats(lo, hi, hi_open=False):
    return st.floats(lo, hi, allow_nan=False, exclude_max=hi_open) | st.integers(math.ceil(lo), math.floor(hi) - hi_open)


VALID = {
    "run_dir": st.text(max_size=10),
    "data_dir": st.text(max_size=10),
    "limit": st.integers(0, 10**6),
    "seed": st.integers(0, 2**40),
    "n_folds": st.just(20),
    "folds": st.lists(st.integers(0, 19), min_size=1, max_size=5, unique=True),  # at least one, each once (checked)
    "base_filters": st.integers(1, 256),
    "depth": st.integers(1, 5),
    "blocks_per_level": st.integers(0, 8),
    "dropout": _floats(0.0, 1.0, hi_open=True),
    "mixed_precision": st.booleans() | st.just("auto"),
    "batch_size": st.integers(1, 4096),
    "stages": st.lists(_stage(), min_size=1, max_size=3),
    "min_lr": st.floats(1e-12, 1.0) | st.integers(1, 5),
    "flip": st.booleans(),
    "zoom": _floats(0.0, 0.5),
    "p_zoom": _floats(0.0, 1.0),
    "brightness": _floats(0.0, 0.5),
    "val_every": st.integers(0, 100),
    "strategy": st.sampled_from(["default", "mirrored", "multi_worker"]),
    "n_samples": st.integers(1, 100),
    "min_sizes": st.lists(st.integers(0, 10201), min_size=1, max_size=6),
    "test_dir": st.text(max_size=10),
    "test_limit": st.integers(0, 10**6),
}


@st.composite
def valid_params(draw):
    out = {}
    for key in sorted(SPEC):
        if draw(st.booleans()):
            # parameters added to SPEC after this test was written are drawn at their default
            out[key] = draw(VALID.get(key, st.just(SPEC[key].default)))
    if "folds" in out:
        out["n_folds"] = 20  # folds up to 19 need it (cross-checked against n_folds)
    return out


@settings(max_examples=300, deadline=None)
@given(valid_params())
def test_valid_values_pass(values):
    out = params.check(values, "valid")
    assert set(out) == set(values)
    for key, value in out.items():
        if SPEC[key].type is float:
            assert isinstance(value, float) and value == values[key]
        else:
            assert value == values[key]


# --------------------------------------------------------------------------- --set and YAML files
@pytest.mark.parametrize(
    "text,expected",
    [
        ("seed=3", ("seed", 3)),
        ("dropout=0.5", ("dropout", 0.5)),
        ("min_lr=1e-5", ("min_lr", 1e-5)),  # YAML 1.1 would read this as a string
        ("min_lr=2.5E-3", ("min_lr", 2.5e-3)),
        ("flip=false", ("flip", False)),
        ("flip=true", ("flip", True)),
        ("folds=[0, 2]", ("folds", [0, 2])),
        ("strategy=mirrored", ("strategy", "mirrored")),
        ("run_dir=", ("run_dir", "")),
        (" seed = 7", ("seed", 7)),
        ("data_dir=a=b", ("data_dir", "a=b")),
        ("stages=[{loss: bce, epochs: 2, lr: 0.01}]", ("stages", [{"loss": "bce", "epochs": 2, "lr": 0.01}])),
        ("data_dir='007'", ("data_dir", "007")),
    ],
)
def test_parse_override_types(text, expected):
    assert params.parse_override(text) == expected


@pytest.mark.parametrize("text,message", [("seed", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("seed=[1,", "not valid YAML")])
def test_parse_override_errors(text, message):
    with pytest.raises(ParamError, match=message):
        params.parse_override(text)


def test_parse_override_refuses_python_tags():
    with pytest.raises(ParamError, match="not valid YAML"):
        params.parse_override("seed=!!python/object/apply:os.getcwd []")


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,message",
    [
        ("- seed: 1\n- depth: 2\n", "must be a mapping"),
        ("42\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        ("seed: [1, 2\n", "not valid YAML"),
        ("seed: 1\n  depth: 2\n", "not valid YAML"),
        ("\tseed: 1\n", "not valid YAML"),
        ("seed: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        ("seed: !!python/name:os.system\n", "not valid YAML"),
        ("? !!python/tuple [1, 2]\n: 3\n", "not valid YAML"),
    ],
)
def test_read_yaml_rejects(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ParamError, match=message) as info:
        params.read_yaml(path)
    assert str(path) in str(info.value)


def test_read_yaml_missing_file(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        params.read_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ParamError, match="not found"):
        params.read_yaml(tmp_path)  # a folder is not a file


def test_read_yaml_empty_file_is_empty_mapping(tmp_path):
    assert params.read_yaml(write(tmp_path, "# only a comment\n")) == {}


def test_read_yaml_does_not_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ParamError):
        params.load(path)
    assert not marker.exists()


def test_load_layers_defaults_file_and_overrides(tmp_path):
    path = write(tmp_path, "seed: 5\nmin_lr: 1e-4\nstages:\n  - {loss: bce, epochs: 2, lr: 0.01}\n")
    out = params.load(path, ["seed=9", "flip=false"])
    assert out["seed"] == 9 and out["flip"] is False and out["min_lr"] == 1e-4
    assert out["stages"] == [{"loss": "bce", "epochs": 2, "lr": 0.01}]
    assert out["depth"] == SPEC["depth"].default
    assert set(out) == set(SPEC)


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("seeed: 5\n", [], "unknown parameter 'seeed'; did you mean 'seed'"),
        ("depth: 9\n", [], "'depth' must be <= 5"),
        ("dropout: high\n", [], "'dropout' must be a finite float, got str"),
        ("min_lr: .inf\n", [], "'min_lr' must be a finite float, got float inf"),
        ("seed: 1\n", ["depth=x"], "--set depth=x: parameter 'depth' must be int"),
        ("seed: 1\n", ["n_folds=2", "folds=[0,1,2]"], "fold 2 but n_folds is 2"),
    ],
)
def test_load_errors_name_key_and_source(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ParamError, match=message.replace("[", r"\[")):
        params.load(path, overrides)


def test_repo_parameter_files_are_valid():
    from conftest import ROOT

    files = sorted((ROOT / "params").glob("*.yaml"))
    assert files, "no parameter files in params/"
    for path in files:
        loaded = params.load(path)
        assert set(loaded) == set(SPEC), path
        raw = yaml.safe_load(path.read_text()) or {}
        assert set(raw) <= set(SPEC), path


def test_a_key_given_twice_is_refused(tmp_path):
    """Plain YAML keeps the last of two equal keys silently; a parameter file must not."""
    path = write(tmp_path, "seed: 1\nlimit: 4\nseed: 7\n")
    with pytest.raises(ParamError, match=r"p.yaml: key 'seed' is given twice \(lines 1 and 3\)"):
        params.load(path)
    nested = write(tmp_path, "stages:\n  - {loss: bce, epochs: 1, lr: 0.1, epochs: 2}\n", "n.yaml")
    with pytest.raises(ParamError, match="n.yaml: key 'epochs' is given twice"):
        params.load(nested)
    with pytest.raises(ParamError, match=r"--set 'stages=.*key 'lr' is given twice"):
        params.load(None, ["stages=[{loss: bce, epochs: 1, lr: 0.1, lr: 0.2}]"])


def test_override_is_checked_against_the_file_not_the_defaults(tmp_path):
    path = write(tmp_path, "n_folds: 10\nfolds: [0]\n")
    assert params.load(path, ["folds=[7]"])["folds"] == [7]  # the file's n_folds is 10
    with pytest.raises(ParamError, match="--set folds=\\[12\\]: parameter 'folds' has fold 12 but n_folds is 10"):
        params.load(path, ["folds=[12]"])
    with pytest.raises(ParamError, match="--set n_folds=5: parameter 'folds' has fold 7 but n_folds is 5"):
        params.load(path, ["folds=[7]", "n_folds=5"])


def test_folds_must_not_be_empty(tmp_path):
    with pytest.raises(ParamError, match="p.yaml: parameter 'folds' is empty"):
        params.load(write(tmp_path, "folds: []\n"))
    with pytest.raises(ParamError, match="--set folds=\\[\\]: parameter 'folds' is empty"):
        params.load(None, ["folds=[]"])


def test_snapshots_must_be_earlier_stages(tmp_path):
    two = "stages:\n  - {loss: bce, epochs: 1, lr: 0.1}\n  - {loss: lovasz, epochs: 1, lr: 0.1}\n"
    assert params.load(write(tmp_path, two + "snapshots: [1]\n"))["snapshots"] == [1]
    with pytest.raises(ParamError, match=r"p.yaml: parameter 'snapshots' has stage 2, but of the 2 in 'stages' only stage 1 is earlier"):
        params.load(write(tmp_path, two + "snapshots: [2]\n"))
    # a --set that shortens the stages under the file's snapshots is blamed on that --set
    with pytest.raises(ParamError, match=r"--set stages=.*'snapshots' has stage 1, but 'stages' has one stage, so none is"):
        params.load(write(tmp_path, two + "snapshots: [1]\n"), ["stages=[{loss: bce, epochs: 1, lr: 0.1}]"])


def test_pad_to_must_hold_the_input(tmp_path):
    assert params.load(write(tmp_path, "pad_to: 128\n"))["pad_to"] == 128
    assert params.load(write(tmp_path, "pad_to: 0\nupscale: 2\n"))["pad_to"] == 0
    with pytest.raises(ParamError, match=r"p.yaml: parameter 'pad_to' is 100, smaller than the model's input \(101 x upscale 1 = 101\)"):
        params.load(write(tmp_path, "pad_to: 100\n"))
    # an upscale given later that outgrows the file's padding is blamed on the --set
    with pytest.raises(ParamError, match=r"--set upscale=2: parameter 'pad_to' is 128, smaller than .* = 202\)"):
        params.load(write(tmp_path, "pad_to: 128\n"), ["upscale=2"])
    with pytest.raises(ParamError, match=r"parameter 'pad_to' must be >= 0"):
        params.load(None, ["pad_to=-1"])


@pytest.mark.parametrize("key", ["folds", "bundle_folds"])
def test_a_fold_listed_twice_is_refused(key):
    """[0, 0] would train and ship the same fold's model twice and count its images twice."""
    with pytest.raises(ParamError, match=rf"--set {key}=\[0, 1, 0\]: parameter '{key}' lists 0 more than once"):
        params.load(None, ["folds=[0, 1]", f"{key}=[0, 1, 0]"])
