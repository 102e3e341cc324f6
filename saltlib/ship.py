"""Shipping a run's model bundle into ``models/<name>/`` with a model card.

``salt ship papermill_runs/<run> --name NAME`` copies the run's ``bundle/`` (the fold models and the
post-processing that notebook 03 chose), its ``params.yaml`` and ``metrics.json``, and writes
``MODEL_CARD.md`` from the run's records: the recipe, the CV score per fold, the training time and
hardware, and the commands that reproduce it. A finished run is required.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import io, predict, train

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is this a finished run folder?")
    return path.read_text()


def _read_json(path: Path) -> dict:
    return json.loads(_read_text(path))


def _describe(diff: dict) -> str:
    """``{key: value}`` as card text; stages spelled out."""
    parts = []
    for k, v in diff.items():
        if k == "stages":
            v = "; ".join(f"{s['loss']} for {s['epochs']} epochs from lr {s['lr']:g}" for s in v)
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def _train_commands(name: str, folds: list, fold_diff: dict) -> list:
    """The ``salt train`` lines that reproduce ``folds``: one for the folds that follow
    ``params.yaml``, and one per fold whose recipe differs (``--set`` with its recorded values).
    ``fold_diff`` may name other folds (fine-tuned ones, reproduced by their own command): skipped."""
    out = f"--out papermill_runs/{name}/models"
    same = [f for f in folds if f not in fold_diff]
    lines = []
    if same:
        lines.append(f".venv/bin/salt train models/{name}/params.yaml --folds {','.join(map(str, same))} {out}   # resumable")
    for f in sorted(set(fold_diff) & set(folds)):
        sets = " ".join(f"--set '{k}={json.dumps(v)}'" for k, v in fold_diff[f].items())
        lines.append(f".venv/bin/salt train models/{name}/params.yaml --folds {f} {out} {sets}")
    return lines


def _finetune_sentence(record: dict) -> str:
    """How a fine-tuned fold started (``init.json``, and ``finetune.json`` of tools/pseudo_label.py)."""
    text = (f"; **fine-tuned** from `{record['init_from']}` (SHA-256 {record['sha256'][:12]}…), whose own training"
            " time is not counted here")
    if record.get("n_labels"):
        text += f", on {record['n_labels']} pseudo-labelled test images as well (`{record.get('labels')}`)"
    return text


def _restored_sentence(record: dict) -> str:
    """Where a fold folder rebuilt from a shipped bundle came from (``done.json``'s ``restored_from``,
    written by tools/fold_from_bundle.py)."""
    at = f" at git {record['commit'][:7]}" if record.get("commit") else ""
    return (f"; **model file from the bundle `{record['bundle']}`{at}** (`{record['model']}`, SHA-256"
            f" {record['sha256'][:12]}…), its fold folder rebuilt by tools/fold_from_bundle.py: scored here, training"
            f" time from {record.get('seconds_from', 'that bundle')}")


def _bundle_sentence(metrics: dict) -> str:
    """Which folds' models the bundle holds, and what that means for the score."""
    folds, bundled = metrics["folds"], metrics.get("bundle_folds") or metrics["folds"]
    if len(bundled) == 1 and len(folds) == 1:
        return "- The bundle is this fold's model."
    text = f"- The bundle averages the logits of the models of fold(s) {bundled}"
    if len(bundled) < len(folds):
        text += (f"; the other folds' models were trained to score the recipe on all {metrics['n_images']}"
                 " images and tune the post-processing, and are not shipped (size)")
    if len(bundled) > 1:
        text += ". The ensemble's gain cannot be measured on these folds (each model trained on the others' folds)"
    return text + "."


def _pct(x) -> str:
    """``0.968`` -> ``"96.8%"``; None (no such images in the scored set) -> ``"n/a"``."""
    return "n/a" if x is None else f"{x:.1%}"


def _data_sentence(info: dict) -> str:
    """The card's data line, from the run's records (folder, file counts, fingerprint, ``limit``)."""
    d, p = info.get("data") or {}, info.get("params") or {}
    files = d.get("files") or {}
    n = files.get("train/images")
    used = (f"the first {p['limit']} of the {n} labelled images" if p.get("limit") else f"the {n} labelled images")
    return (f"- Data: {used if n is not None else 'the labelled images'} in `{d.get('dir', '?')}`"
            f" (data fingerprint sha256 {str(d.get('sha256'))[:16]}…, in `run.json`, copied here).")


def _score_lost_table(heading: str, rows: list) -> list:
    """Markdown lines: a blank line, ``heading`` and the table of :func:`saltlib.evaluate.score_lost`'s ``rows``."""
    return ["", heading, "", "| outcome | images | score lost |", "| --- | --- | --- |"] + [
        f"| {row['outcome']} | {row['n']} | {row['lost']:.4f} |" for row in rows
    ]


def model_card(run_dir, name: str, benchmark: str | None = None) -> str:
    """The Markdown model card of a finished run.

    Args:
        run_dir: the run folder (``papermill_runs/<run>``).
        name: the bundle name under ``models/``.
        benchmark: optional text printed by ``benchmarks/benchmark.py``, shown verbatim.
    Returns:
        the card's text.
    """
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json")
    metrics = _read_json(run_dir / "metrics.json")
    p = info.get("params") or {}
    folds = sorted((run_dir / "models").glob("fold*/done.json"))
    fold_rows = [json.loads(f.read_text()) for f in folds]
    # folds trained with another recipe than the run's parameter file (a finished fold reused)
    fold_diff = {}
    for f, r in zip(folds, fold_rows):
        recipe_path = f.parent / "recipe.json"
        if recipe_path.exists():
            diff = train.recipe_diff(io.read_json(recipe_path), p)
            if diff:
                fold_diff[r["fold"]] = {k: a for k, (a, _) in diff.items()}
    # folds fine-tuned from a shipped model (tools/pseudo_label.py): where they started, and how
    finetuned = {}
    for f, r in zip(folds, fold_rows):
        if (f.parent / "init.json").exists():
            finetuned[r["fold"]] = {**io.read_json(f.parent / "init.json"),
                                    **(io.read_json(f.parent / "finetune.json") if (f.parent / "finetune.json").exists()
                                       else {})}
    cpu = info.get("host", {}).get("cpus")
    if metrics.get("peak_gate") is not None:  # a gate chosen
        tuned = "Flip TTA or not, the cut-off, the small-mask size and the largest-logit gate were chosen on these same images (four"
    elif p.get("peak_gates"):
        tuned = ("Flip TTA or not, the cut-off, the small-mask size and the largest-logit gate were chosen on these same images"
                 f" (no gate was chosen, but the choice was among {len(p['peak_gates'])} gates as well; four")
    else:
        tuned = "Flip TTA or not, the cut-off and the small-mask size were chosen on these same images (three"
    lines = [
        f"# Model card: {name}",
        "",
        "A ResNet-U-Net (U-Net with pre-activation residual blocks) trained from scratch for the TGS Salt",
        "Identification Challenge: 101x101 seismic images in, one salt logit per pixel out.",
        "",
        "## Score",
        "",
        f"- **CV score {metrics['cv_score']:.4f}**: the competition metric (mean over IoU thresholds 0.50..0.95",
        f"  of [IoU > t], per image, averaged) on {metrics['n_images']} labelled images the model did not train",
        f"  on: fold(s) {metrics['folds']} of a {metrics['n_folds']}-fold split stratified by salt coverage, with the",
        "  post-processing below. "
        + tuned,
        "  numbers"
        + ("; the nested score below measures the optimism" if metrics.get("cv_score_nested") is not None else "")
        + "); the score at logit 0 without TTA or small-mask removal is",
        f"  {metrics['cv_score_untuned']:.4f}.",
        *([f"- **Nested CV score {metrics['cv_score_nested']:.4f}** over {metrics.get('nested_over', 'the folds')}: each"
           " post-processed with the settings chosen on the others' images only, so no setting was tuned on the"
           " images it scores."]
          if metrics.get("cv_score_nested") is not None else []),
        "- Per fold: " + ", ".join(f"fold {f}: {s:.4f}" for f, s in metrics["per_fold"].items())
        + (". Each fold is scored by its own model, which did not train on it." if len(metrics["per_fold"]) > 1 else ""),
        _bundle_sentence(metrics),
        f"- Empty images predicted empty: {_pct(metrics.get('empty_accuracy'))}; salt images with salt predicted:"
        f" {_pct(metrics.get('salt_recall'))}.",
        "- Per coverage class (0 = empty, k = up to k*10% salt):",
        "",
        "| class | images | score |",
        "| --- | --- | --- |",
    ]
    for c, row in sorted(metrics["per_coverage_class"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {c} | {row['n']} | {row['score']:.4f} |")
    if metrics.get("score_lost"):  # runs before 2026-11-27 did not record it
        lines += _score_lost_table("- Where the score is lost (points of the CV score, adding up to 1 - CV score):",
                                   metrics["score_lost"])
    lines += [
        "",
        "## Post-processing (bundle.json)",
        "",
        f"- cut-off: logit > {metrics['threshold']:+.2f}; "
        + (f"masks under {metrics['min_size']} pixels are emptied" if metrics["min_size"] else "no small-mask removal")
        + (f"; images whose largest logit is at most {metrics['peak_gate']:+.2f} are predicted empty"
           if metrics.get("peak_gate") is not None else "")
        + f"; flip TTA: {'yes' if metrics['tta'] else 'no'}.",
        "",
        "## Recipe",
        "",
        f"- Parameter file: `params.yaml` here (from `{Path(info.get('params_file', '?')).name}`).",
        f"- Model: {p.get('base_filters')} base filters, depth {p.get('depth')}, {p.get('blocks_per_level')}"
        f" residual blocks per level, dropout {p.get('dropout')}, "
        + ("image-level (empty/non-empty) head with deep supervision, " if p.get("empty_head") else "")
        + (f"input enlarged {p['upscale']}x inside the model, " if p.get("upscale", 1) > 1 else "")
        + (f"input zero-padded to {p['pad_to']}x{p['pad_to']} inside the model, " if p.get("pad_to") else "")
        + ("scSE blocks in the decoder, " if p.get("scse") else "")
        + ("hypercolumn (every decoder level feeds the final convolution), " if p.get("hypercolumn") else "")
        + {"auto": "bfloat16 mixed precision where the training machine had it natively (`mixed_precision: auto`)",
           True: "bfloat16 mixed precision", False: "float32"}.get(p.get("mixed_precision"), "float32") + ".",
        "- Stages: " + "; ".join(f"{s['loss']} for {s['epochs']} epochs from lr {s['lr']:g} (cosine)" for s in p.get("stages", [])),
        f"- Batch {p.get('batch_size')}, Adam; augmentation: flip {p.get('flip')}, zoom {p.get('zoom')}"
        f" (p {p.get('p_zoom')}), brightness/contrast {p.get('brightness')}. Seed {p.get('seed')}.",
        _data_sentence(info),
        "",
        "## Training",
        "",
    ]
    for r in fold_rows:
        lines.append(
            f"- fold {r['fold']}: {r['n_train']} training images, {r['epochs']} epochs in "
            + (f"{r['seconds'] / 3600:.2f} h" if r["seconds"] >= 600 else f"{r['seconds'] / 60:.1f} min")
            + f" ({r.get('train_images_per_s', float('nan')):.1f} images/s, validation included)"
            + (f" on {r['hardware']}" if r.get("hardware") else "")
            + (f"; **its recipe differs from `params.yaml`**: {_describe(fold_diff[r['fold']])}"
               if r["fold"] in fold_diff else "")
            + (_finetune_sentence(finetuned[r["fold"]]) if r["fold"] in finetuned else "")
            + (_restored_sentence(r["restored_from"]) if r.get("restored_from") else "")
            + (f"; training time {r['seconds_note']}" if r.get("seconds_note") else "")
        )
    cpu_s = sum(r.get("seconds", 0) for r in fold_rows if not r.get("hardware"))
    other = [r for r in fold_rows if r.get("hardware")]
    host = info.get("host") or {}
    gpus = host.get("gpus")  # recorded by `salt run` since 2026-11-27; None in older runs
    lines += [
        f"- Hardware: {cpu} CPU cores ({host.get('cpu') or 'processor not recorded'}), "
        + ("no GPU" if gpus == [] else f"GPU(s): {', '.join(gpus)}" if gpus else "GPUs not recorded")
        + (f", for fold(s) {[r['fold'] for r in fold_rows if not r.get('hardware')]}" if other else "")
        + (f"; {cpu_s / 3600:.2f} h of training (wall time)." if gpus else
           f"; {cpu_s / 3600 * (cpu or 1):.1f} CPU-core-hours of training (wall time x cores).")
        + (f" Fold(s) {[r['fold'] for r in other]}: {sum(r['seconds'] for r in other) / 60:.1f} min of training"
           " summed over the folds, on the hardware named above (folds trained at the same time share it;"
           " tools/gpu_cv.py; the `salt train` lines below reproduce them on a CPU)." if other else ""),
        f"- Code: git commit {info.get('git', {}).get('commit')}"
        + (" **with uncommitted changes** (the commit alone does not reproduce it)" if info.get("git", {}).get("dirty")
           else "") + "; versions: "
        + ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items()),
        "",
        "## Reproduce",
        "",
        "```bash",
        "make setup",
        *_train_commands(name, [r["fold"] for r in fold_rows if r["fold"] not in finetuned], fold_diff),
        *[f"{v['command']}   # fold {f}: fine-tuning (its --out holds fold{f}/; copy it to papermill_runs/{name}/models)"
          for f, v in sorted(finetuned.items()) if v.get("command")],
        f".venv/bin/salt run models/{name}/params.yaml --name {name} --resume               # notebooks 01-04",
        f".venv/bin/salt ship papermill_runs/{name} --name {name}-repro   # models/{name} is never overwritten",
        "```",
        "",
        "## Use",
        "",
        "```bash",
        f".venv/bin/salt predict --model models/{name} --images DIR_OF_PNGS --out submission.csv",
        "```",
    ]
    if benchmark:
        text = "\n".join(l for l in benchmark.strip().splitlines() if not l.startswith("wrote "))
        lines += ["", "## Speed (benchmarks/benchmark.py, this machine)", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


CHECK_BEGIN = "<!-- bundle_cv: written by `tools/bundle_cv.py --write`; rerun it to update -->"
CHECK_END = "<!-- /bundle_cv -->"


def check_section(result: dict) -> str:
    """The model card's section on a re-scoring of the bundle from its own files.

    Args:
        result: what ``tools/bundle_cv.py`` returns (scores, folds, the run's date, commit, CPU,
            seconds and command).
    Returns:
        Markdown, between :data:`CHECK_BEGIN` and :data:`CHECK_END`.
    """
    r = result
    per_fold = ", ".join(f"fold {f}: {s:.4f}" for f, s in sorted(r["per_fold"].items(), key=lambda kv: int(kv[0])))
    gates = r.get("nested_gates")
    lines = [
        CHECK_BEGIN,
        "## Checked from this folder's files",
        "",
        f"`{r['command']}` on {r['date']} (git {str(r.get('commit'))[:7]}"
        + (" with uncommitted changes" if r.get("dirty") else "") + f", {r.get('cpu') or 'CPU not recorded'},"
        f" {r['seconds']:.0f} s): the {r['n_images']} held-out images of fold(s) {r['folds']}, each through the"
        f" stored model(s) of its fold computing in {r['compute_dtype']}, score **{r['shipped']:.4f}** with the"
        f" post-processing below ({per_fold}) and {r['untuned']:.4f} at logit 0 without TTA or small-mask removal.",
    ]
    card_folds = r.get("card_folds")
    if r.get("card") is not None and card_folds is not None and sorted(card_folds) != sorted(int(f) for f in r["folds"]):
        lines[-1] += (f" The CV score above ({r['card']:.4f}) is over other images, fold(s) {card_folds} (the"
                      " bundle's models and the other folds' own), from the logits saved at training time.")
    elif r.get("card") is not None:
        lines[-1] += f" The CV score above ({r['card']:.4f}) comes from the logits saved at training time."
    lines[-1] += (
        f" Nested over {r['nested_over']}, with flip TTA or not, the cut-off, the size"
        + (" and the gate" if gates else "") + f" chosen on the others only: **{r['nested']:.4f}**"
        + (f" ({r['nested_no_gates']:.4f} with no gate in the grid)" if r.get("nested_no_gates") is not None else "")
        + f". Models {r['matched']}; {r['checked']}."
    )
    if r.get("score_lost"):  # checks before 2026-11-27 did not record it
        lines += _score_lost_table("Where the score is lost as shipped (points of the score, adding up to 1 - score):",
                                   r["score_lost"])
    return "\n".join(lines + [CHECK_END]) + "\n"


def place_check(card: str, section: str, where: str = "MODEL_CARD.md") -> str:
    """``card`` with ``section`` in place of an earlier check section, or before ``## Post-processing``.

    Raises:
        ValueError: the card has a start marker without an end marker, or no ``## Post-processing``
            (``where`` names it).
    """
    if CHECK_BEGIN in card:
        head, _, rest = card.partition(CHECK_BEGIN)
        if CHECK_END not in rest:
            raise ValueError(f"{where}: {CHECK_BEGIN!r} without {CHECK_END!r}")
        tail = rest.partition(CHECK_END)[2]
        return head + section + (tail[1:] if tail.startswith("\n") else tail)
    if "\n## Post-processing" in card:
        head, _, rest = card.partition("\n## Post-processing")
        return head + "\n" + section + "\n## Post-processing" + rest
    raise ValueError(f"{where}: no '## Post-processing' section to put the check before")


def card_path(bundle_dir) -> Path:
    """The bundle's ``MODEL_CARD.md``, checked to take a check section (before any scoring is done).

    Raises:
        FileNotFoundError: the folder has no ``MODEL_CARD.md``.
        ValueError: see :func:`place_check`.
    """
    path = Path(bundle_dir) / "MODEL_CARD.md"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {bundle_dir} a shipped bundle (`salt ship`)?")
    place_check(path.read_text(), "", str(path))
    return path


def write_check(bundle_dir, result: dict) -> Path:
    """Record a re-scoring of a shipped bundle: ``bundle_cv.json`` and the card's section
    (:func:`check_section`, placed by :func:`place_check`).

    Returns:
        the model card's path.
    Raises:
        FileNotFoundError, ValueError: see :func:`card_path`; nothing is written then.
    """
    path = card_path(bundle_dir)
    card = place_check(path.read_text(), check_section(result), str(path))
    io.write_json(Path(bundle_dir) / "bundle_cv.json", result)
    io.write_text(path, card)
    return path


def ship(run_dir, name: str, models_dir=None, benchmark_file=None) -> Path:
    """Copy a finished run's bundle to ``models/<name>/`` and write its model card.

    Raises:
        FileExistsError: ``models/<name>`` exists (shipped bundles are not overwritten).
        FileNotFoundError: the run lacks ``run.json``, ``metrics.json`` or ``bundle/``.
        ValueError: ``name`` is not a plain folder name (a slash, a space, ``..``).
    """
    from .runner import check_name

    run_dir = Path(run_dir)
    dest = Path(models_dir or PROJECT_ROOT / "models") / check_name(name, "bundle name")
    if dest.exists():
        raise FileExistsError(f"{dest} exists; shipped bundles are not overwritten (pick another --name)")
    info = _read_json(run_dir / "run.json")
    if info.get("status") != "finished":
        raise ValueError(f"run {run_dir} is {info.get('status')!r}, not finished")
    spec = predict.read_bundle_spec(run_dir / "bundle")
    benchmark = Path(benchmark_file).read_text() if benchmark_file else None
    card = model_card(run_dir, name, benchmark)
    copied = {f: _read_text(run_dir / f) for f in ("params.yaml", "metrics.json", "run.json")}  # run.json: provenance
    models = [run_dir / "bundle" / m for m in spec["models"]]
    meta = {**(spec.get("meta") or {}), "name": name, "source_run": run_dir.name}
    # built in a hidden sibling folder and renamed at the end: a failure leaves no half bundle behind,
    # and a bundle shipped meanwhile by another process is not overwritten
    with io.atomic_dir(dest, "pick another --name") as tmp:
        predict.write_bundle(tmp, models, spec["threshold"], spec["min_size"], spec["tta"], meta=meta,
                             peak_gate=spec["peak_gate"])
        for f, text in copied.items():
            io.write_text(tmp / f, text)
        io.write_text(tmp / "MODEL_CARD.md", card)
    return dest
