"""Shipping a finished run (``salt ship``) and running the notebooks on folds trained by ``salt train``.

Both reuse the shared smoke run (tests/_smoke.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saltlib import data, metric, predict, ship

ROOT = Path(__file__).resolve().parent.parent


def test_ship_copies_bundle_and_writes_card(smoke_ok, tmp_path):
    bench = tmp_path / "bench.txt"
    bench.write_text("config  train img/s\nbundle  12.5\n")
    dest = ship.ship(smoke_ok.run_dir, "tiny", models_dir=tmp_path / "models", benchmark_file=bench)
    assert dest == tmp_path / "models" / "tiny"
    for f in ("bundle.json", "model0.keras", "params.yaml", "metrics.json", "run.json", "MODEL_CARD.md"):
        assert (dest / f).is_file(), f
    metrics = json.loads((smoke_ok.run_dir / "metrics.json").read_text())
    card = (dest / "MODEL_CARD.md").read_text()
    assert f"CV score {metrics['cv_score']:.4f}" in card
    assert f"Nested CV score {metrics['cv_score_nested']:.4f}** over the 2 folds" in card  # smoke: folds 0, 1
    assert "numbers; the nested score below measures the optimism)" in card
    assert "salt predict --model models/tiny" in card
    assert "fold 0:" in card and "epochs in" in card
    assert "bundle  12.5" in card
    rows = [f"| {row['outcome']} | {row['n']} | {row['lost']:.4f} |" for row in metrics["score_lost"]]
    assert "\n".join(rows) in card  # every outcome, in order
    shipped, original = predict.load_bundle(dest), predict.load_bundle(smoke_ok.run_dir / "bundle")
    settings = lambda b: (b.threshold, b.min_size, b.tta, b.peak_gate)  # noqa: E731
    assert settings(shipped) == settings(original)
    assert shipped.meta["source_run"] == "smoke" and shipped.meta["name"] == "tiny"
    x = np.random.default_rng(0).random((3, 101, 101, 1), dtype=np.float32)
    np.testing.assert_array_equal(shipped.predict_logits(x), original.predict_logits(x))


def test_card_names_a_fold_trained_with_another_recipe(smoke_ok, tmp_path):
    """A finished fold reused under another parameter file: the card says so, and its reproduce
    line carries the fold's recorded values as ``--set`` overrides that the parameter loader reads
    back to that recipe."""
    import re
    import shlex

    from saltlib import params, train

    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    recipe_path = run / "models" / "fold0" / "recipe.json"
    recorded = json.loads(recipe_path.read_text())
    assert recorded == train.recipe(json.loads((run / "run.json").read_text())["params"])  # smoke: same
    other = {**recorded, "dropout": 0.45, "stages": [{"loss": "bce", "epochs": 3, "lr": 0.002}]}
    recipe_path.write_text(json.dumps(other))
    card = (ship.ship(run, "mixed", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    assert "its recipe differs from `params.yaml`" in card and "dropout 0.45" in card
    assert "stages bce for 3 epochs from lr 0.002" in card
    line = next(l for l in card.splitlines() if "salt train" in l and "--folds 0" in l)
    assert "--set" in line
    args = shlex.split(line.split("#")[0])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert train.recipe(params.load(run / "params.yaml", overrides=overrides)) == other
    assert not re.search(r"salt train \S+ --folds 0 --out \S+\s+# resumable", card)  # no plain line for fold 0


def test_card_names_the_hardware_of_a_fold_trained_elsewhere(smoke_ok, tmp_path):
    """A fold trained on another machine (tools/gpu_cv.py unpack records ``hardware``): the card
    names it on the fold's line and keeps its minutes out of the CPU-core-hours."""
    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    done_path = run / "models" / "fold0" / "done.json"
    done = json.loads(done_path.read_text())
    done_path.write_text(json.dumps({**done, "hardware": "one test GPU", "seconds": 120.0}))
    cpu_path = run / "models" / "fold1" / "done.json"  # fold 1: trained here; give it a known time
    cpu_path.write_text(json.dumps({**json.loads(cpu_path.read_text()), "seconds": 900.0}))
    host = json.loads((run / "run.json").read_text())["host"]
    cpu_time = f"{0.25:.2f} h of training" if host.get("gpus") else f"{0.25 * (host['cpus'] or 1):.1f} CPU-core-hours"
    card = (ship.ship(run, "gpu", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    fold_line = next(l for l in card.splitlines() if l.startswith("- fold 0:"))
    assert "2.0 min" in fold_line and "on one test GPU" in fold_line
    hardware = next(l for l in card.splitlines() if l.startswith("- Hardware:"))
    assert cpu_time in hardware  # fold 1's 15 min only
    assert "Fold(s) [0]: 2.0 min of training" in hardware


def test_card_states_a_corrected_training_time(smoke_ok, tmp_path):
    """A fold whose done.json carries ``seconds_note`` (a training time corrected by hand, and why):
    the card prints the corrected time with the note on that fold's line, and no note elsewhere."""
    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    done_path = run / "models" / "fold0" / "done.json"
    note = "from history.csv's epoch times (timing.json lost 22 epochs)"
    done_path.write_text(json.dumps({**json.loads(done_path.read_text()), "seconds": 7200.0, "seconds_note": note}))
    card = (ship.ship(run, "noted", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    lines = {l[:8]: l for l in card.splitlines() if l.startswith("- fold ")}
    assert "2.00 h" in lines["- fold 0"] and lines["- fold 0"].endswith(f"; training time {note}")
    assert note not in lines["- fold 1"] and "; training time " not in lines["- fold 1"]


def test_card_names_a_fine_tuned_fold_and_its_command(smoke_ok, tmp_path):
    """A fold fine-tuned from a shipped model (tools/pseudo_label.py writes init.json and
    finetune.json): its line says where it started and on how many pseudo-labels, and the
    reproduce section gives the fine-tuning command for it instead of a ``salt train`` line."""
    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    fold = run / "models" / "fold0"
    (fold / "init.json").write_text(json.dumps({"init_from": "models/base/model0.keras", "sha256": "ab" * 32}))
    command = "python tools/pseudo_label.py train --bundle models/base --fold 0 --params p.yaml --out x"
    (fold / "finetune.json").write_text(json.dumps({"command": command, "labels": "labels0.npz",
                                                    "labels_sha256": "cd" * 32, "n_labels": 641}))
    recipe = json.loads((fold / "recipe.json").read_text())  # fine-tuning stages differ from params.yaml's
    recipe["stages"] = [{"loss": "lovasz", "epochs": 3, "lr": 0.0005}]
    (fold / "recipe.json").write_text(json.dumps(recipe))
    card = (ship.ship(run, "ft", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    fold_line = next(l for l in card.splitlines() if l.startswith("- fold 0:"))
    assert "fine-tuned** from `models/base/model0.keras` (SHA-256 abababababab" in fold_line
    assert "on 641 pseudo-labelled test images as well (`labels0.npz`)" in fold_line
    assert "fine-tuned" not in next(l for l in card.splitlines() if l.startswith("- fold 1:"))
    reproduce = card.split("## Reproduce")[1]
    assert command in reproduce
    train_lines = [l for l in reproduce.splitlines() if "salt train" in l]
    assert train_lines and all("--folds 1 " in l for l in train_lines)  # fold 0 is not trained from scratch


def test_card_facts_come_from_the_run_records(smoke_ok, tmp_path):
    """Data folder, limit, processor, GPUs and a dirty checkout are read from run.json (written where
    the run trained), not assumed; a metric with no images to measure it (None) prints as n/a; a run
    that did not record where the score is lost gets no table of it."""
    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    info = json.loads((run / "run.json").read_text())
    info["host"].update(cpu="Test CPU 9000", gpus=["NVIDIA Test GPU"], cpus=16)
    info["data"].update(dir="/elsewhere/tgs", files={**info["data"]["files"], "train/images": 400})
    info["params"]["limit"] = 48
    info["git"]["dirty"] = True
    (run / "run.json").write_text(json.dumps(info))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("score_lost")  # as runs before 2026-11-27 recorded it
    (run / "metrics.json").write_text(json.dumps({**metrics, "empty_accuracy": None}))
    card = (ship.ship(run, "records", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    line = lambda start: next(l for l in card.splitlines() if l.startswith(start))  # noqa: E731
    assert "the first 48 of the 400 labelled images in `/elsewhere/tgs`" in line("- Data:")
    assert "16 CPU cores (Test CPU 9000), GPU(s): NVIDIA Test GPU" in line("- Hardware:")
    assert "h of training (wall time)" in line("- Hardware:") and "CPU-core-hours" not in line("- Hardware:")
    assert "uncommitted changes" in line("- Code:")
    assert "Empty images predicted empty: n/a" in card
    assert "Where the score is lost" not in card and "| class | images | score |" in card
    assert "Flip TTA or not, the cut-off, the small-mask size and the largest-logit gate were chosen" in card  # gates tried
    info["host"]["gpus"] = []
    (run / "run.json").write_text(json.dumps(info))
    card = ship.model_card(run, "records")
    assert "(Test CPU 9000), no GPU;" in card and "CPU-core-hours" in card


@pytest.mark.parametrize("chosen, grid, says", [
    (1.0, [0.0, 1.0], "and the largest-logit gate were chosen on these same images (four numbers"),
    (None, [0.0, 1.0], "gate were chosen on these same images (no gate was chosen, but the choice was among 2 gates as well; four numbers"),
    (None, [], "the cut-off and the small-mask size were chosen on these same images (three numbers"),
])
def test_card_counts_the_gate_among_the_tuned_numbers_when_it_was_tried(smoke_ok, tmp_path, chosen, grid, says):
    """Trying gates and choosing none still tunes on the same images: the card says so."""
    run = tmp_path / "run"
    shutil.copytree(smoke_ok.run_dir, run)
    info = json.loads((run / "run.json").read_text())
    info["params"]["peak_gates"] = grid
    (run / "run.json").write_text(json.dumps(info))
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "peak_gate": chosen}))
    card = (ship.ship(run, "gates", models_dir=tmp_path / "models") / "MODEL_CARD.md").read_text()
    assert says in " ".join(line.strip() for line in card.splitlines())


@pytest.mark.parametrize(
    "folds,bundle_folds,expected,absent",
    [
        ([0], [], "the bundle is this fold's model", "not shipped"),
        ([0, 1], [], "models of fold(s) [0, 1]. the ensemble's gain cannot be measured", "not shipped"),
        ([0, 1, 2, 3, 4], [0, 1], "models of fold(s) [0, 1]; the other folds' models", "bundle is this"),
        ([0, 1, 2], [2], "models of fold(s) [2]; the other folds' models were trained to score the recipe on all 30",
         "ensemble's gain"),
    ],
)
def test_bundle_sentence(folds, bundle_folds, expected, absent):
    text = ship._bundle_sentence({"folds": folds, "bundle_folds": bundle_folds, "n_images": 30}).lower()
    assert expected in text and absent not in text


def test_ship_never_overwrites(smoke_ok, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        ship.ship(smoke_ok.run_dir, "taken", models_dir=tmp_path)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failed_ship_leaves_nothing(smoke_ok, tmp_path, monkeypatch):
    """A run folder without params.yaml is refused before anything is written; a failure while
    writing leaves no half bundle (or hidden work folder) to block a retry."""
    run = shutil.copytree(smoke_ok.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("*.html", "*.ipynb"))
    (run / "params.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="params.yaml is missing"):
        ship.ship(run, "half", models_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()
    (run / "params.yaml").write_text((smoke_ok.run_dir / "params.yaml").read_text())
    write_text = ship.io.write_text

    def full_disk(path, text):
        if Path(path).name == "MODEL_CARD.md":  # the last file: the models and records are already there
            raise OSError(28, "No space left on device")
        return write_text(path, text)

    monkeypatch.setattr(ship.io, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ship.ship(run, "half", models_dir=tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(ship.io, "write_text", write_text)
    dest = ship.ship(run, "half", models_dir=tmp_path / "models")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["half"] and (dest / "MODEL_CARD.md").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # like any new folder, not mkdtemp's 0700


def test_ship_refuses_unfinished_run(smoke_ok, tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    info = json.loads((smoke_ok.run_dir / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    with pytest.raises(ValueError, match="failed"):
        ship.ship(run, "x", models_dir=tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="run.json"):
        ship.ship(tmp_path / "nothing", "x", models_dir=tmp_path / "models")


@pytest.mark.slow
def test_notebooks_on_folds_trained_by_salt_train(smoke_ok, tmp_path):
    """`salt train --out RUNS/NAME/models` then `salt run --name NAME --resume`: 02 skips the fold."""
    runs = tmp_path / "runs"
    shutil.copytree(smoke_ok.run_dir / "models", runs / "pre" / "models")
    done_before = (runs / "pre" / "models" / "fold0" / "done.json").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "saltlib.cli", "run", str(ROOT / "params" / "smoke.yaml"), "--name", "pre",
         "--resume", "--runs-dir", str(runs), "--set", f"data_dir={smoke_ok.data_dir}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fold 0: already trained" in proc.stdout
    info = json.loads((runs / "pre" / "run.json").read_text())
    assert info["status"] == "finished" and info["attempts"] == []
    assert (runs / "pre" / "models" / "fold0" / "done.json").read_text() == done_before
    assert (runs / "pre" / "submission.csv").is_file() and (runs / "pre" / "params.yaml").is_file()
    # a folder with anything besides models/ is not taken for a pre-trained one
    (runs / "other" / "models").mkdir(parents=True)
    (runs / "other" / "stray.txt").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "saltlib.cli", "run", str(ROOT / "params" / "smoke.yaml"), "--name", "other",
         "--resume", "--runs-dir", str(runs), "--set", f"data_dir={smoke_ok.data_dir}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode != 0 and "no run to resume" in proc.stderr


SHIPPED = sorted(p for p in (ROOT / "models").iterdir() if (p / "bundle.json").is_file() and not p.name.startswith("."))


def test_a_bundle_is_shipped():
    """The project ships at least one bundle (otherwise the checks below would silently not run)."""
    assert SHIPPED, f"no bundle in {ROOT / 'models'}"


@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_bundles_are_complete(bundle_dir):
    """Every committed bundle: files match their sha256, models together under 25 MB, a model card
    and the recipe beside them, and the models predict 101x101 masks."""
    import hashlib

    spec = predict.read_bundle_spec(bundle_dir)
    total = 0
    for name in spec["models"]:
        blob = (bundle_dir / name).read_bytes()
        total += len(blob)
        assert hashlib.sha256(blob).hexdigest() == spec["sha256"][name], name
    assert total < 25e6, f"{bundle_dir.name}: models total {total / 1e6:.1f} MB"
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "CV score" in card and "## Reproduce" in card
    assert (bundle_dir / "params.yaml").is_file() and (bundle_dir / "metrics.json").is_file()
    if (bundle_dir / "bundle_cv.json").is_file():  # re-scored by tools/bundle_cv.py --write: the card says what it recorded
        assert ship.check_section(json.loads((bundle_dir / "bundle_cv.json").read_text())) in card
    # the bundle predicts with the post-processing notebook 03 chose and scored (metrics.json, the card)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    assert [spec[k] for k in ("threshold", "min_size", "tta", "peak_gate")] == \
        [metrics[k] for k in ("threshold", "min_size", "tta", "peak_gate")]
    assert spec["meta"]["cv_score"] == metrics["cv_score"] and f"CV score {metrics['cv_score']:.4f}" in card
    bundle = predict.load_bundle(bundle_dir)
    x = np.random.default_rng(0).random((3, 101, 101, 1)).astype(np.float32)
    masks = bundle.predict_masks(x)
    assert masks.shape == (3, 101, 101) and masks.dtype == bool
    logits = bundle.predict_logits(x)
    np.testing.assert_array_equal(masks, predict.postprocess(logits, spec["threshold"], spec["min_size"], spec["peak_gate"]))
    assert all(m.sum() == 0 or m.sum() >= spec["min_size"] for m in masks)


@pytest.mark.realdata
@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_bundles_find_salt_in_real_images(bundle_dir, real_data):
    """A sanity check of the stored models, not a score to report: on the first 64 labelled images
    (most of which each model trained on) the bundle scores well above what an all-empty
    prediction scores, and predicts salt on some images and none on others."""
    ds = data.load_train(real_data, check_rle=False, limit=64)
    pred = predict.load_bundle(bundle_dir).predict_masks(ds.images)
    empty = pred.sum(axis=(1, 2)) == 0
    baseline = metric.competition_score(ds.masks, np.zeros_like(ds.masks))
    assert 0 < empty.sum() < len(ds)
    assert metric.competition_score(ds.masks, pred) > baseline + 0.2


@pytest.mark.parametrize("name", ["../outside", "a/b", ""])
def test_ship_refuses_a_name_that_is_not_a_folder_name(smoke_ok, tmp_path, name):
    with pytest.raises(ValueError, match="bundle name .* is not allowed"):
        ship.ship(smoke_ok.run_dir, name, models_dir=tmp_path / "models")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "models").exists()


CHECK = {  # the fields tools/bundle_cv.py returns and the card section uses
    "n_images": 1360, "folds": [0, 1], "compute_dtype": "float32", "matched": "as bundle.json records them",
    "checked": "held-out ids match bundle.json", "shipped": 0.80791, "per_fold": {0: 0.80742, 1: 0.80838},
    "untuned": 0.79551, "card": 0.80846, "nested": 0.80471, "nested_over": "the 2 folds", "nested_gates": True,
    "nested_no_gates": 0.80611, "seconds": 263.4, "date": "2026-11-27", "commit": "1ac910e0123", "dirty": False,
    "cpu": "AMD EPYC 7B13, 2 cores", "command": "python tools/bundle_cv.py models/x --write",
}
CARD = "# Model card: x\n\n## Score\n\n- CV score 0.8085\n\n## Post-processing (bundle.json)\n\n- cut-off\n"


def test_check_section_states_the_tools_figures():
    text = ship.check_section(CHECK)
    assert text.startswith(ship.CHECK_BEGIN + "\n## Checked from this folder's files\n") and text.endswith(ship.CHECK_END + "\n")
    for part in ("`python tools/bundle_cv.py models/x --write` on 2026-11-27 (git 1ac910e, AMD EPYC 7B13, 2 cores, 263 s)",
                 "the 1360 held-out images of fold(s) [0, 1]", "computing in float32", "score **0.8079**",
                 "(fold 0: 0.8074, fold 1: 0.8084) and 0.7955 at logit 0",
                 "The CV score above (0.8085) comes from the logits saved at training time",
                 "the size and the gate chosen on the others only: **0.8047** (0.8061 with no gate in the grid)",
                 "Models as bundle.json records them; held-out ids match bundle.json."):
        assert part in text, part
    many = ship.check_section({**CHECK, "per_fold": {10: 0.5, 2: 0.25}})  # folds in number order, as JSON keys too
    assert "(fold 2: 0.2500, fold 10: 0.5000)" in many
    assert ship.check_section(json.loads(json.dumps({**CHECK, "per_fold": {10: 0.5, 2: 0.25}}, sort_keys=True))) == many
    # a card score over more folds than the bundle's (folds 0-4 tuned, folds 0-1 bundled): said, not compared
    wider = ship.check_section({**CHECK, "card_folds": [0, 1, 2, 3, 4]})
    assert "The CV score above (0.8085) is over other images, fold(s) [0, 1, 2, 3, 4]" in wider
    assert "comes from the logits saved" not in wider
    assert "comes from the logits saved" in ship.check_section({**CHECK, "card_folds": [1, 0]})
    bare = ship.check_section({**CHECK, "card": None, "nested_gates": False, "nested_no_gates": None, "dirty": True})
    assert "with uncommitted changes" in bare and "training time" not in bare and "gate" not in bare


def test_write_check_inserts_then_replaces_the_section(tmp_path):
    (tmp_path / "MODEL_CARD.md").write_text(CARD)
    card = ship.write_check(tmp_path, CHECK)
    first = card.read_text()
    head, _, tail = CARD.partition("\n## Post-processing")
    assert first == head + "\n" + ship.check_section(CHECK) + "\n## Post-processing" + tail
    assert json.loads((tmp_path / "bundle_cv.json").read_text())["shipped"] == CHECK["shipped"]
    second = ship.write_check(tmp_path, {**CHECK, "shipped": 0.5}).read_text()  # a rerun: one section, new figures
    assert second.count(ship.CHECK_BEGIN) == 1 and "score **0.5000**" in second and "0.8079" not in second
    assert ship.write_check(tmp_path, CHECK).read_text() == first


@pytest.mark.parametrize("card, error, message", [
    (None, FileNotFoundError, "MODEL_CARD.md is missing"),
    ("# Model card\n\n## Score\n", ValueError, "no '## Post-processing' section"),
    (CARD + ship.CHECK_BEGIN + "\nold text\n", ValueError, "without"),
])
def test_write_check_refuses_a_card_it_cannot_place_the_section_in(tmp_path, card, error, message):
    if card is not None:
        (tmp_path / "MODEL_CARD.md").write_text(card)
    with pytest.raises(error, match=message):
        ship.write_check(tmp_path, CHECK)
    assert not (tmp_path / "bundle_cv.json").exists()
    assert card is None or (tmp_path / "MODEL_CARD.md").read_text() == card
