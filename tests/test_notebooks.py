"""The committed notebooks and the smoke run of the whole pipeline.

Static checks (fast): the notebooks carry no outputs and each has exactly one ``parameters`` cell
whose names, types and defaults, over all four notebooks, are exactly ``saltlib.params.SPEC``.

The smoke run (``salt run params/smoke.yaml``, shared with the other test modules, a few minutes):
four executed notebooks and HTML reports, ``metrics.json`` with a CV score, a decodable
``submission.csv`` with one row per test image, ``run.json`` finished with its provenance, and
progress (notebook names, Keras' per-epoch lines) on the terminal.
"""

from __future__ import annotations

import ast
import json
import re

import nbformat
import numpy as np
import papermill
import pytest

from saltlib import data, litert, params, rle, runner

NOTEBOOK_PATHS = [runner.NOTEBOOKS_DIR / f"{nb}.ipynb" for nb in runner.NOTEBOOKS]


# --------------------------------------------------------------------------- committed notebooks
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {k} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {k} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == runner.KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_exactly_one_parameters_cell_typed_and_commented(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    cell = nb.cells[tagged[0]]
    assert cell.cell_type == "code"
    for line in cell.source.splitlines():
        if re.match(r"^\w", line):  # a parameter's first line (a long list may continue on indented lines)
            assert re.match(r'^\w+: (int|float|bool|str|list|"Union\[bool, str\]") = .+', line), (
                f"{path.name}: parameter line should read 'name: type = value  # comment': {line!r}")
    for name, p in papermill.inspect_notebook(str(path)).items():
        assert p["help"].strip(), f"{path.name}: parameter {name!r} has no comment"
    # derived values come right after the parameters, in their own cell
    assert nb.cells[tagged[0] + 1].cell_type == "code"


def test_parameters_cells_equal_spec():
    seen = {}
    for path in NOTEBOOK_PATHS:
        for name, p in papermill.inspect_notebook(str(path)).items():
            assert name in params.SPEC, f"{path.name} declares {name!r}, which saltlib.params.SPEC lacks"
            spec = params.SPEC[name]
            default = ast.literal_eval(p["default"])
            assert default == spec.default and type(default) is type(spec.default), (
                f"{path.name}: default of {name!r} is {default!r}, SPEC says {spec.default!r}")
            want = f"Union[{', '.join(t.__name__ for t in spec.type)}]" if isinstance(spec.type, tuple) else spec.type.__name__
            assert p["inferred_type_name"] == want, (
                f"{path.name}: {name!r} is annotated {p['inferred_type_name']}, SPEC says {want}")
            seen.setdefault(name, []).append(path.stem)
    missing = sorted(set(params.SPEC) - set(seen))
    assert not missing, f"SPEC parameters used by no notebook: {missing}"
    assert all("run_dir" in [k for k in papermill.inspect_notebook(str(p))] for p in NOTEBOOK_PATHS)


@pytest.mark.parametrize("name", ["smoke", "default", "full"])
def test_parameter_files_are_valid(name):
    path = runner.PROJECT_ROOT / "params" / f"{name}.yaml"
    values = params.load(path)
    raw = params.read_yaml(path)
    assert "run_dir" not in raw
    assert set(raw) <= set(params.SPEC)
    if name == "default":
        assert values["limit"] == 0 and values["test_limit"] == 0 and values["mixed_precision"] == "auto"
    if name == "full":
        assert values["folds"] == list(range(values["n_folds"]))


# --------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_run_finishes_with_progress(smoke_ok):
    out = smoke_ok.stdout
    for i, nb in enumerate(runner.NOTEBOOKS, start=1):
        assert f"[{i}/4] {nb}" in out
        assert f"{nb} finished" in out
    assert re.search(r"^\d+/\d+ - \d+s - .*loss: [0-9.]+", out, re.M), "Keras' per-epoch lines not shown"
    assert f"report: {smoke_ok.run_dir / 'index.html'}" in out
    metrics = json.loads((smoke_ok.run_dir / "metrics.json").read_text())
    assert f"CV score {metrics['cv_score']:.4f} (nested {metrics['cv_score_nested']:.4f})" in out


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_run_folder(smoke_ok):
    run = smoke_ok.run_dir
    for nb in runner.NOTEBOOKS:
        executed = nbformat.read(run / f"{nb}.ipynb", as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]
        assert not errors, f"{nb}: {errors[0]}"
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and f"run_dir = \"{run}\"" in injected[0].source
        report = (run / f"{nb}.html").read_text()
        assert "data:image/png;base64," in report, f"{nb}.html has no embedded figure"
        assert not re.search(r"<script[^>]+src=[\"']https?://", report), f"{nb}.html loads scripts from the web"
    assert not list(run.glob("*.running.ipynb"))
    assert not list(run.rglob(".*.tmp*")), "temporary files left behind"
    for f in ("params.yaml", "run.json", "index.html", "metrics.json", "postprocess.json", "eda.json",
              "train.json", "predict.json", "bundle/bundle.json", "models/fold0/model.keras",
              "models/fold0/oof.npz", "models/fold1/model.keras", "models/fold1/oof.npz"):
        assert (run / f).is_file(), f"missing {f}"
    pred = json.loads((run / "predict.json").read_text())  # the runtime predict_folder picked here
    assert pred["runtime"] == litert.resolve_runtime("auto") and pred["n_images"] > 0
    assert (smoke_ok.runs_dir / "index.html").is_file()
    assert "smoke/index.html" in (smoke_ok.runs_dir / "index.html").read_text()
    eda = json.loads((run / "eda.json").read_text())
    masks = data.load_train(smoke_ok.data_dir, limit=48).masks
    assert eda["n_images"] == 48 and eda["n_column_masks"] == int(data.column_masks(masks).sum())
    assert "Masks drawn as whole columns" in (run / "01-eda.html").read_text()


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_metrics_and_run_json(smoke_ok):
    run = smoke_ok.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["cv_score"] <= 1.0
    assert metrics["n_images"] == 32  # 48 images, 3 folds, folds 0 and 1 held out in turn
    assert set(metrics["per_fold"]) == {"0", "1"}
    assert sum(v["n"] for v in metrics["per_coverage_class"].values()) == 32
    for key in ("threshold", "min_size", "tta", "empty_accuracy", "cv_score_untuned"):
        assert key in metrics
    # where the score is lost: every held-out image in one outcome, the losses adding up to 1 - score
    lost = metrics["score_lost"]
    assert [row["outcome"] for row in lost][:3] == ["no salt, none predicted", "no salt, salt predicted", "salt, none predicted"]
    assert sum(row["n"] for row in lost) == 32
    assert sum(row["lost"] for row in lost) == pytest.approx(1 - metrics["cv_score"], abs=1e-9)
    assert "Where the score is lost" in (run / "03-postprocess.html").read_text()
    # each fold post-processed with the settings chosen on the other fold
    assert 0.0 <= metrics["cv_score_nested"] <= 1.0 and set(metrics["nested_choice"]) == {"0", "1"}
    assert metrics["nested_over"] == "the 2 folds"
    for choice in metrics["nested_choice"].values():
        assert choice["label"] in ("plain", "flip TTA") and choice["min_size"] in (0, 10, 50)
    post = json.loads((run / "postprocess.json").read_text())
    assert post["threshold"] == metrics["threshold"] and post["min_size"] in (0, 10, 50)
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["threshold"] == metrics["threshold"] and bundle["tta"] == metrics["tta"]
    # the peak gates of smoke.yaml were tried; the one chosen (or none) reached the bundle
    assert post["peak_gates"] == [0.0, 1.0] and metrics["peak_gate"] in (None, 0.0, 1.0)
    assert bundle.get("peak_gate") == metrics["peak_gate"] == post["peak_gate"]
    assert metrics["bundle_folds"] == [0] and bundle["meta"]["tuned_on_folds"] == [0, 1]
    assert len(bundle["models"]) == 1  # fold 1 is scored and tuned on, not bundled
    split0 = json.loads((run / "models" / "fold0" / "split.json").read_text())
    assert bundle["meta"]["members"] == {"0": [0]}
    assert bundle["meta"]["val_ids_sha256"] == {"0": split0["val_ids_sha256"]}

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["error"] is None
    assert [n["name"] for n in info["notebooks"]] == list(runner.NOTEBOOKS)
    assert all(n["status"] == "finished" and n["seconds"] > 0 for n in info["notebooks"])
    assert info["metrics"] == metrics
    assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"] or "") and isinstance(info["git"]["dirty"], bool)
    for pkg in ("tensorflow", "keras", "numpy", "pandas", "papermill"):
        assert info["versions"][pkg], pkg
    assert re.fullmatch(r"[0-9a-f]{64}", info["data"]["sha256"])
    assert info["data"]["files"]["train/images"] >= 48
    assert info["started"] and info["ended"] and info["seconds"] > 0
    assert "smoke.yaml" in info["command"] and "--name smoke" in info["command"]
    # the resolved parameters can be run again as they are
    again = params.load(run / "params.yaml")
    assert again == {**info["params"], "run_dir": ""}
    assert again["limit"] == 48 and again["data_dir"] == str(smoke_ok.data_dir.resolve())


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_submission_decodes(smoke_ok):
    from saltlib import data, predict

    sub = predict.read_submission(smoke_ok.run_dir / "submission.csv")
    expected = data.list_pngs(smoke_ok.data_dir / "test" / "images")[:16]
    assert list(sub.columns) == ["id", "rle_mask"]
    assert sorted(sub["id"]) == expected, "one row per test image"
    masks = np.stack([rle.decode(r) for r in sub["rle_mask"]])
    assert masks.shape == (16, 101, 101) and masks.dtype == bool
    lines = (smoke_ok.run_dir / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,rle_mask" and len(lines) == 17


@pytest.mark.slow
@pytest.mark.realdata
def test_salt_runs_lists_the_smoke_run(smoke_ok, capsys):
    runs = runner.list_runs(smoke_ok.runs_dir)
    out = capsys.readouterr().out
    assert [r["name"] for r in runs] == ["smoke"]
    row = next(line for line in out.splitlines() if line.startswith("smoke"))
    metrics = json.loads((smoke_ok.run_dir / "metrics.json").read_text())
    assert row.split()[1:4] == ["finished", f"{metrics['cv_score']:.4f}", f"{metrics['cv_score_nested']:.4f}"]
    page = (smoke_ok.runs_dir / "index.html").read_text()
    for nb in runner.NOTEBOOKS:
        assert f"smoke/{nb}.html" in page


# --------------------------------------------------------------------------- shared figures
def test_viz_figures_draw_edge_cases():
    """Every helper draws what it says on empty, partial and full masks (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from saltlib import metric, viz

    rng = np.random.default_rng(0)
    images = rng.random((5, 101, 101, 1)).astype(np.float32)
    masks = np.zeros((5, 101, 101), bool)
    masks[1, 50:] = True
    masks[2] = True
    preds = np.zeros_like(masks)
    preds[1, 40:] = True
    preds[3] = True  # full prediction: framed, since it has no contour
    fig = viz.gallery(images, masks, preds, titles=[str(i) for i in range(5)], ncols=3, suptitle="t")
    ax = fig.axes
    assert len(ax) == 6 and not ax[5].axison and [a.get_title() for a in ax[:5]] == ["0", "1", "2", "3", "4"]
    assert [len(a.images) for a in ax[:5]] == [1, 2, 2, 1, 1]  # the true mask is a second image where there is salt
    assert [len(a.lines) for a in ax[:5]] == [0, 0, 0, 1, 0]  # the full prediction's frame
    assert len(ax[1].collections) > 0 and not any(len(a.collections) for a in (ax[0], ax[2], ax[3], ax[4]))  # contour

    cov = masks.reshape(5, -1).mean(1)  # 0, 51/101, 1, 0, 0
    hist_ax = viz.coverage_histogram(cov).axes[0]
    heights = [r.get_height() for r in hist_ax.patches]
    assert sum(heights[:-1]) == 2 and heights[-1] == 3  # 2 images with salt in the histogram, 3 empty in the bar
    assert [t.get_text() for t in hist_ax.get_legend().get_texts()] == ["with salt (2)", "empty (3)"]

    # 4 finite depths in 4 different bins (100, 200, 300 and 500 over 100..500): 4 means; NaN left out
    means = viz.depth_vs_coverage(np.array([100.0, 200, 300, np.nan, 500]), cov).axes[0].lines
    assert len(means) == 1 and np.allclose(means[0].get_ydata(), cov[[0, 1, 2, 4]])
    assert not viz.depth_vs_coverage(np.full(5, 7.0), cov).axes[0].lines  # a single depth: no bins

    fig = viz.intensity_histograms(images[:0], masks[:0])  # no images (a limit whose subset is all black)
    assert fig.axes[1].get_legend() is None
    fig = viz.intensity_histograms(images, masks)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["salt pixels", "other pixels"]

    hist = pd.DataFrame({"stage": [1, 1, 2, 2], "epoch": [1, 2, 1, 2], "loss": [0.7, 0.5, 1.2, 1.0],
                         "lr": [1e-3, 1e-4, 1e-3, 1e-5], "val_score": [np.nan, 0.4, np.nan, 0.6]})
    loss_ax, val_ax, _ = viz.learning_curves({0: hist, 1: hist.assign(val_score=np.nan)}).axes
    assert len(loss_ax.lines) == 4  # two folds' losses, and each fold's stage boundary at epoch 2.5
    assert sorted(line.get_xdata()[0] for line in loss_ax.lines if line.get_label().startswith("_")) == [2.5, 2.5]
    curves = [line for line in val_ax.lines if line.get_label() == "fold 0"]  # fold 1 has no validation score
    assert len(curves) == 1 and list(curves[0].get_ydata()) == [0.4, 0.6]
    assert not any(line.get_label() == "fold 1" for line in val_ax.lines)

    logits = rng.normal(size=(5, 101, 101)).astype(np.float32)
    sweep = metric.sweep_thresholds(masks, logits, np.linspace(-1, 1, 5), (0, 10))
    panels = viz.threshold_curves({"plain": sweep, "flip TTA": sweep}, chosen={"label": "plain", **sweep}).axes
    assert [[line.get_label() for line in a.lines] for a in panels] == [
        ["min size 0", "min size 10", "chosen"], ["min size 0", "min size 10"]]

    table = pd.DataFrame({"n": [3, 1, 1], "score": [1.0, 0.2, 0.5]}, index=[0, 1, 10])
    bar_ax = viz.score_by_class(table).axes[0]
    assert [r.get_height() for r in bar_ax.patches] == [1.0, 0.2, 0.5]
    assert [t.get_text() for t in bar_ax.texts] == ["3", "1", "1"]
    assert [t.get_text() for t in bar_ax.get_xticklabels()] == ["empty", "0-10%", "90-100%"]

    share_ax = viz.coverage_comparison({"a": cov, "b": cov[:2]}).axes[0]
    bars = share_ax.containers
    assert len(bars) == 2 and all(sum(r.get_height() for r in c) == pytest.approx(1.0) for c in bars)
    plt.close("all")
