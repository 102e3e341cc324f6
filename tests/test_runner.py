"""``saltlib.runner``: checks before a run, run folders that are never reused, failed runs, the kernel
spec, provenance and the run listing.

Bad parameters (unknown key, wrong type, out of range, not a mapping, a bad ``--set``) must stop
``salt run`` before any folder exists. A failing notebook (a copy of 02 with a cell that raises)
must stop the run, keep the partial notebook and its HTML, and mark ``run.json`` failed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

import _smoke
from conftest import tree_hashes
from saltlib import cli, params, runner

SMOKE = runner.PROJECT_ROOT / "params" / "smoke.yaml"


def _yaml(tmp_path, text, name="p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- checks before anything runs
BAD_FILES = [
    ("n_fold: 3\n", r"unknown parameter 'n_fold'; did you mean 'n_folds'\?"),
    ("limit: ten\n", r"parameter 'limit' must be int, got str"),
    ("dropout: 1.5\n", r"parameter 'dropout' must be < 1.0"),
    ("base_filters: 0\n", r"parameter 'base_filters' must be >= 1"),
    ("- limit\n- 3\n", r"must be a mapping"),
    ("stages: [{loss: bce, epochs: 2}]\n", r"stage 1 needs exactly the keys"),
    ("folds: [4]\nn_folds: 3\n", r"fold 4 but n_folds is 3"),
    ("run_dir: /tmp/elsewhere\n", r"run_dir is chosen by `salt run`"),
    ("limit: [1\n", r"not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m.split()[0] for _, m in BAD_FILES])
def test_bad_parameter_file_stops_before_any_folder(tmp_path, text, message):
    runs = tmp_path / "runs"
    with pytest.raises(params.ParamError, match=message):
        runner.run_pipeline(_yaml(tmp_path, text), name="x", runs_dir=runs)
    assert not runs.exists()


BAD_SETS = [
    ("limit", r"expected KEY=VALUE"),
    ("=3", r"expected KEY=VALUE"),
    ("limitt=3", r"unknown parameter 'limitt'; did you mean 'limit'\?"),
    ("limit=abc", r"'limit' must be int"),
    ("seed=-1", r"'seed' must be >= 0"),
    ("mixed_precision=maybe", r"'mixed_precision' must be true, false or auto"),
    ("stages=[{loss: nope, epochs: 1, lr: 0.1}]", r"stage 1"),
    ("folds=[0", r"not valid YAML"),
    ("run_dir=/tmp/x", r"run_dir is chosen by `salt run`"),
]


@pytest.mark.parametrize("override,message", BAD_SETS, ids=[o for o, _ in BAD_SETS])
def test_bad_set_stops_before_any_folder(tmp_path, override, message):
    runs = tmp_path / "runs"
    with pytest.raises(params.ParamError, match=message):
        runner.run_pipeline(SMOKE, name="x", overrides=[override], runs_dir=runs)
    assert not runs.exists()


@pytest.mark.parametrize(
    "line,ok",
    [
        ("folds: list = []  # every fold", True),
        ("folds: list = []  # folds ([] = all)", False),  # papermill logs "Unable to parse line" and skips it
    ],
)
def test_unparseable_parameter_line_is_refused(tmp_path, line, ok):
    """papermill skips a parameters line it cannot parse, so the value from the YAML would never
    reach the notebook; the runner refuses such a notebook and names the line."""
    kernel = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": kernel})
    nb.cells = [nbformat.v4.new_code_cell(f"seed: int = 42  # seed\n{line}", metadata={"tags": ["parameters"]})]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    if ok:
        assert runner._declared_parameters(path) == ["seed", "folds"]
    else:
        with pytest.raises(params.ParamError, match=r"cannot parse the parameter line .*'folds' would not be set"):
            runner._declared_parameters(path)


def test_repo_notebooks_declare_parseable_parameters():
    for name in runner.NOTEBOOKS:
        path = runner.PROJECT_ROOT / "notebooks" / f"{name}.ipynb"
        assert set(runner._declared_parameters(path)) <= set(params.SPEC), path


@pytest.mark.parametrize("name", ["../escape", "a/b", "", " spaced", "x" * 200])
def test_bad_run_name(tmp_path, name):
    with pytest.raises(ValueError, match="run name"):
        runner.run_pipeline(SMOKE, name=name, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_missing_parameter_file_and_missing_data(tmp_path):
    with pytest.raises(params.ParamError, match="parameter file not found"):
        runner.run_pipeline(tmp_path / "nope.yaml", runs_dir=tmp_path / "runs")
    from saltlib.data import DataError

    with pytest.raises(DataError, match="no TGS data found"):
        runner.run_pipeline(SMOKE, overrides=[f"data_dir={tmp_path / 'empty'}"], runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_cli_reports_bad_parameters(tmp_path, capsys):
    code = cli.main(["run", str(_yaml(tmp_path, "n_fold: 3\n")), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "salt run: error:" in err and "did you mean 'n_folds'" in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- run folders
def test_generated_names_never_collide(tmp_path):
    a = runner._create_run_dir(tmp_path, None, "smoke")
    b = runner._create_run_dir(tmp_path, None, "smoke")
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("smoke-")
    with pytest.raises(FileExistsError, match="never overwritten"):
        runner._create_run_dir(tmp_path, a.name, "smoke")


def test_notebook_run_dir_defaults_to_interactive(tmp_path, monkeypatch):
    monkeypatch.setenv("SALT_RUNS_DIR", str(tmp_path / "runs"))
    assert runner.notebook_run_dir("") == (tmp_path / "runs" / "interactive").resolve()
    assert runner.notebook_run_dir(str(tmp_path / "mine")) == (tmp_path / "mine").resolve()
    assert (tmp_path / "mine").is_dir()


@pytest.mark.slow
@pytest.mark.realdata
def test_existing_run_is_never_overwritten(smoke, capsys):
    if smoke.returncode != 0:
        pytest.fail(smoke.describe())
    before = tree_hashes(smoke.run_dir)
    with pytest.raises(FileExistsError, match=f"{smoke.run_dir}.*already exists"):
        runner.run_pipeline(SMOKE, name=_smoke.RUN_NAME, runs_dir=smoke.runs_dir,
                            overrides=[f"data_dir={smoke.data_dir}"])
    code = cli.main(["run", str(SMOKE), "--name", _smoke.RUN_NAME, "--runs-dir", str(smoke.runs_dir),
                     "--set", f"data_dir={smoke.data_dir}"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert tree_hashes(smoke.run_dir) == before


# --------------------------------------------------------------------------- a failing notebook
@pytest.fixture
def failing_notebooks(tmp_path):
    """The four notebooks, with a cell that raises inserted into 02 after its derived-values cell."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for nb in runner.NOTEBOOKS:
        shutil.copy(runner.NOTEBOOKS_DIR / f"{nb}.ipynb", folder)
    path = folder / "02-train.ipynb"
    nb = nbformat.read(path, as_version=4)
    k = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    bad = nbformat.v4.new_code_cell('print("about to fail")\nraise RuntimeError("deliberate failure for the test")')
    bad["id"] = "deliberate-failure"
    nb.cells.insert(k + 2, bad)
    nbformat.write(nb, path)
    return folder


@pytest.mark.slow
@pytest.mark.realdata
def test_failing_notebook_marks_run_failed(tmp_path, failing_notebooks, real_data, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(runner.RunError, match=r"run broken failed in 02-train .*deliberate failure for the test"):
        runner.run_pipeline(SMOKE, name="broken", runs_dir=runs, notebooks_dir=failing_notebooks,
                            overrides=[f"data_dir={real_data}"])
    run = runs / "broken"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["failed_notebook"] == "02-train"
    assert "RuntimeError: deliberate failure for the test" in info["error"]
    assert "deliberate failure" in info["traceback"]
    assert [(n["name"], n["status"]) for n in info["notebooks"]] == [("01-eda", "finished"), ("02-train", "failed")]
    assert info["ended"] and info["seconds"] > 0
    # the partial notebook and its report are kept; later notebooks never ran
    partial = nbformat.read(run / "02-train.ipynb", as_version=4)
    outputs = [o for c in partial.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.output_type == "error" and o.ename == "RuntimeError" for o in outputs)
    assert "deliberate failure for the test" in (run / "02-train.html").read_text()
    assert (run / "01-eda.html").is_file()
    assert not list(run.glob("03-*")) and not list(run.glob("04-*")) and not list(run.glob("*.running.ipynb"))
    assert "failed" in (run / "index.html").read_text()
    capsys.readouterr()
    runner.list_runs(runs)
    assert "broken  failed" in capsys.readouterr().out
    assert "broken/02-train.html" in (runs / "index.html").read_text()


# --------------------------------------------------------------------------- kernel, provenance, listing
def test_ensure_kernel_is_idempotent(tmp_path):
    path = Path(runner.ensure_kernel(prefix=tmp_path))
    assert path == tmp_path / "share" / "jupyter" / "kernels" / "salt"
    spec = json.loads((path / "kernel.json").read_text())
    assert spec["argv"][-1] == runner.KERNEL_FLAG and spec["display_name"] == "Python (salt)"
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    mtime = (path / "kernel.json").stat().st_mtime_ns
    assert Path(runner.ensure_kernel(prefix=tmp_path)) == path
    assert (path / "kernel.json").stat().st_mtime_ns == mtime


def test_data_fingerprint_tracks_changes(synthetic):
    a = runner.data_fingerprint(synthetic.root)
    assert a == runner.data_fingerprint(synthetic.root)
    assert a["files"] == {"train/images": 12, "train/masks": 12, "test/images": 4}
    with open(synthetic.image_path(3), "ab") as f:
        f.write(b"\0")
    b = runner.data_fingerprint(synthetic.root)
    assert b["sha256"] != a["sha256"]
    (synthetic.root / "depths.csv").write_text("id,z\n")
    assert runner.data_fingerprint(synthetic.root)["sha256"] != b["sha256"]


def test_package_versions_and_git():
    v = runner.package_versions()
    assert v["numpy"] == np.__version__ and v["python"] == platform.python_version() and v["papermill"]
    g = runner.git_info()  # this checkout is a git repository
    assert set(g) == {"commit", "dirty", "branch"}
    assert re.fullmatch("[0-9a-f]{40}", g["commit"]) and isinstance(g["dirty"], bool)


def _git(repo, *args):
    import subprocess

    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.mark.parametrize("subfolder", ["", "proj"], ids=["project at the top", "project in a subfolder"])
def test_git_info_dirty_means_changed_tracked_files_or_new_code(tmp_path, subfolder):
    """Untracked files count only among the code a run executes (also when the project is a
    subfolder of a larger repository); ignored files never count; odd file names do not break it."""
    repo = tmp_path / "repo"
    root = repo / subfolder
    (root / "saltlib").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (root / "saltlib" / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    g = runner.git_info(root)
    assert g["dirty"] is False and g["branch"] == "main" and len(g["commit"]) == 40

    (root / "notes.txt").write_text("scratch")  # untracked, outside the code folders
    (root / os.fsdecode(b"notes-\xff.txt")).write_text("x")  # a name that is not UTF-8
    (root / "saltlib" / "__pycache__").mkdir()
    (root / "saltlib" / "__pycache__" / "a.pyc").write_bytes(b"\0")  # ignored
    assert runner.git_info(root)["dirty"] is False
    new = root / "params" / os.fsdecode(b"new run \xff.yaml")  # new code, a space and a non-UTF-8 byte
    new.parent.mkdir()
    new.write_text("seed: 1\n")
    assert runner.git_info(root)["dirty"] is True
    new.unlink()
    assert runner.git_info(root)["dirty"] is False
    (root / "saltlib" / "a.py").write_text("x = 2\n")  # a tracked change
    assert runner.git_info(root)["dirty"] is True
    _git(repo, "checkout", "--", ".")
    assert runner.git_info(root)["dirty"] is False
    _git(root, "mv", "saltlib/a.py", "saltlib/b.py")  # a staged rename, contents unchanged
    assert runner.git_info(root)["dirty"] is True
    assert runner.git_info(tmp_path / "no-such-folder") == {"commit": None, "dirty": None, "branch": None}


def _fake_run(runs, name, **info):
    (runs / name).mkdir(parents=True)
    base = {"name": name, "status": "finished", "started": f"2026-01-01T00:00:0{len(list(runs.iterdir()))}",
            "seconds": 75.0, "notebooks": [{"name": "01-eda", "status": "finished", "html": "01-eda.html"}],
            "metrics": None, "params": {"base_filters": 4, "stages": [{"loss": "bce", "epochs": 1, "lr": 0.1}]}}
    base.update(info)
    (runs / name / "run.json").write_text(json.dumps(base))


def test_list_runs_table_and_index(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs, "good", metrics={"cv_score": 0.81234, "cv_score_nested": 0.80456, "threshold": 0.2})
    _fake_run(runs, "bad", status="failed", error="02-train: boom")
    _fake_run(runs, "killed", status="running", host={"hostname": socket.gethostname(), "pid": 2 ** 22 + 12345})
    (runs / "junk").mkdir()
    (runs / "junk" / "run.json").write_text("{not json")
    _fake_run(runs, "odd", seconds="abc")  # one bad record does not stop the listing
    _fake_run(runs, "odder", metrics={"cv_score": "0.8"})
    result = runner.list_runs(runs)
    out = capsys.readouterr().out
    assert {r["name"]: r["_status"] for r in result} == {"good": "finished", "bad": "failed", "killed": "died",
                                                        "junk": "broken", "odd": "broken", "odder": "broken"}
    assert "'seconds' is 'abc', not a number" in next(r["error"] for r in result if r["name"] == "odd")
    assert out.splitlines()[0].split() == ["name", "status", "CV", "score", "nested", "duration", "started"]
    good = next(line for line in out.splitlines() if line.startswith("good"))
    assert good.split()[2:5] == ["0.8123", "0.8046", "1:15"]
    bad = next(line for line in out.splitlines() if line.startswith("bad"))
    assert bad.split()[2:4] == ["-", "-"]  # no metrics: no score, no nested score
    page = (runs / "index.html").read_text()
    assert "good/index.html" in page and "good/01-eda.html" in page and "0.8123" in page and "died" in page
    assert "<th>nested</th>" in page and "0.8046" in page


def test_list_runs_without_runs(tmp_path, capsys):
    assert runner.list_runs(tmp_path / "none") == []
    assert "no runs" in capsys.readouterr().out


# --------------------------------------------------------------------------- resuming, with stub notebooks
STUB_CODE = {
    "01-eda": 'io.write_json(RUN / "eda.json", {"ok": True})',
    "02-train": ('import os\nif os.environ.get("SALT_TEST_FAIL_02"):\n    raise RuntimeError("stub training failed")\n'
                 'io.write_json(RUN / "models" / "fold0" / "done.json", {"val_score": 0.5})'),
    "03-postprocess": 'io.write_json(RUN / "metrics.json", {"cv_score": 0.625, "n_images": limit})',
    "04-predict": 'io.write_text(RUN / "submission.csv", "id,rle_mask\\n")',
}


@pytest.fixture
def stub_notebooks(tmp_path):
    """Four tiny notebooks (no TensorFlow) that write the files the real ones would."""
    folder = tmp_path / "stubs"
    folder.mkdir()
    for nb, body in STUB_CODE.items():
        cells = [nbformat.v4.new_code_cell("from saltlib import io, runner"),
                 nbformat.v4.new_code_cell("run_dir: str = ''  # output folder\nlimit: int = 0  # images"),
                 nbformat.v4.new_code_cell("RUN = runner.notebook_run_dir(run_dir)"),
                 nbformat.v4.new_code_cell(body)]
        cells[1].metadata["tags"] = ["parameters"]
        for k, c in enumerate(cells):
            c["id"] = f"c{k}"
        nb_node = nbformat.v4.new_notebook(cells=cells)
        nb_node.metadata["kernelspec"] = {"name": "salt", "display_name": "Python (salt)", "language": "python"}
        nbformat.write(nb_node, folder / f"{nb}.ipynb")
    return folder


@pytest.mark.slow
@pytest.mark.realdata
def test_resume_a_failed_run(tmp_path, stub_notebooks, real_data, monkeypatch, capsys):
    runs = tmp_path / "runs"
    kw = dict(runs_dir=runs, notebooks_dir=stub_notebooks, overrides=[f"data_dir={real_data}"])
    monkeypatch.setenv("SALT_TEST_FAIL_02", "1")
    with pytest.raises(runner.RunError, match="stub training failed"):
        runner.run_pipeline(SMOKE, name="r", **kw)
    run = runs / "r"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    with pytest.raises(ValueError, match="needs the --name"):
        runner.run_pipeline(SMOKE, resume=True, **kw)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        runner.run_pipeline(SMOKE, name="other", resume=True, **kw)
    with pytest.raises(params.ParamError, match=r"different parameters \(limit\)"):
        runner.run_pipeline(SMOKE, name="r", resume=True, runs_dir=runs, notebooks_dir=stub_notebooks,
                            overrides=[f"data_dir={real_data}", "limit=5"])

    monkeypatch.delenv("SALT_TEST_FAIL_02")
    # resume with the run's own resolved parameters, as the error message suggests
    runner.run_pipeline(run / "params.yaml", name="r", resume=True, runs_dir=runs, notebooks_dir=stub_notebooks)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["metrics"] == {"cv_score": 0.625, "n_images": 48}
    assert [a["status"] for a in info["attempts"]] == ["failed"]
    assert "stub training failed" in info["attempts"][0]["error"]
    archived = run / "attempts" / "1"
    assert {"01-eda.ipynb", "01-eda.html", "02-train.ipynb", "02-train.html", "run.json"} <= {
        p.name for p in archived.iterdir()}
    assert json.loads((archived / "run.json").read_text())["status"] == "failed"
    assert (run / "04-predict.html").is_file() and (run / "submission.csv").is_file()
    assert "Earlier attempts" in (run / "index.html").read_text()
    with pytest.raises(FileExistsError, match="nothing to resume"):
        runner.run_pipeline(run / "params.yaml", name="r", resume=True, runs_dir=runs, notebooks_dir=stub_notebooks)
    # the CLI flag
    code = cli.main(["run", str(run / "params.yaml"), "--name", "r", "--resume", "--runs-dir", str(runs)])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_a_live_run(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "live", status="running", host={"hostname": socket.gethostname(), "pid": os.getpid()},
              params=dict(params.load(SMOKE), run_dir=None))
    with pytest.raises(FileExistsError, match="still running"):
        runner._prepare_resume(runs / "live", {})
    with pytest.raises(FileExistsError, match="still running"):  # here its process is seen: force or not
        runner._prepare_resume(runs / "live", {}, force=True)


def test_a_run_marked_running_on_another_host_resumes_only_with_force(tmp_path, capsys):
    """A session's machine is gone with the run's process; this host cannot check that pid."""
    runs = tmp_path / "runs"
    cfg = dict(params.load(SMOKE), run_dir=None)
    _fake_run(runs, "elsewhere", status="running", host={"hostname": "gone-host", "pid": 4242}, params=cfg)
    with pytest.raises(FileExistsError, match=r"marked running on host 'gone-host' \(pid 4242\), which cannot be "
                                              r"checked from .*resume with --resume --force"):
        runner._prepare_resume(runs / "elsewhere", cfg)
    assert not (runs / "elsewhere" / "attempts").exists()
    attempts = runner._prepare_resume(runs / "elsewhere", cfg, force=True)
    assert [a["status"] for a in attempts] == ["died"] and (runs / "elsewhere" / "attempts" / "1").is_dir()
    assert "marked running on host 'gone-host'; resumed here (--force)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--force only applies to --resume"):
        runner.run_pipeline(SMOKE, name="x", runs_dir=runs, force=True)


def test_a_corrupt_test_image_stops_the_run_before_anything(tmp_path, synthetic, stub_notebooks):
    import shutil

    from saltlib.data import DataError

    root = shutil.copytree(synthetic.root, tmp_path / "bad-test")
    bad = root / "test" / "images" / f"{synthetic.test_ids[0]}.png"
    bad.write_bytes(bad.read_bytes()[:60])
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=f"cannot read image {bad}: corrupt"):
        runner.run_pipeline(SMOKE, name="r", runs_dir=runs, notebooks_dir=stub_notebooks,
                            overrides=[f"data_dir={root}"])
    assert not (runs / "r").exists()


def test_resume_takes_a_parameter_added_since_the_run_as_its_default(tmp_path):
    """A run recorded before ``pad_to`` existed resumes with the default; a real change is refused."""
    runs = tmp_path / "runs"
    cfg = dict(params.load(SMOKE), run_dir=None)
    old = {k: v for k, v in cfg.items() if k != "pad_to"}
    _fake_run(runs, "old", status="failed", params=old)
    assert runner._prepare_resume(runs / "old", cfg)[0]["status"] == "failed"
    _fake_run(runs, "older", status="failed", params=old)
    with pytest.raises(params.ParamError, match=r"cannot resume run older with different parameters \(pad_to\)"):
        runner._prepare_resume(runs / "older", {**cfg, "pad_to": 128})


def test_missing_test_images_stop_the_run_before_anything(tmp_path, synthetic, stub_notebooks):
    """Notebook 04 predicts DATA/test/images after hours of training: without them, nothing starts."""
    import shutil

    from saltlib.data import DataError

    root = tmp_path / "no-test"
    shutil.copytree(synthetic.root, root)
    shutil.rmtree(root / "test" / "images")
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=r"no test images: .*test/images is not a folder .* set test_dir"):
        runner.run_pipeline(SMOKE, name="r", runs_dir=runs, notebooks_dir=stub_notebooks,
                            overrides=[f"data_dir={root}"])
    assert not (runs / "r").exists()


def test_resume_may_change_the_test_images_and_survives_an_interrupted_resume(tmp_path, synthetic, stub_notebooks,
                                                                             monkeypatch):
    runs = tmp_path / "runs"
    kw = dict(runs_dir=runs, notebooks_dir=stub_notebooks)
    monkeypatch.setenv("SALT_TEST_FAIL_02", "1")
    with pytest.raises(runner.RunError):
        runner.run_pipeline(SMOKE, name="r", overrides=[f"data_dir={synthetic.root}"], **kw)
    run = runs / "r"
    (run / "attempts" / "1").mkdir(parents=True)  # a resume killed after archiving, before run.json was rewritten
    monkeypatch.delenv("SALT_TEST_FAIL_02")
    # only the test images change (notebook 04 reads them); anything else is still refused
    with pytest.raises(params.ParamError, match=r"different parameters \(seed\)"):
        runner.run_pipeline(run / "params.yaml", name="r", resume=True, overrides=["seed=1", "test_limit=2"], **kw)
    runner.run_pipeline(run / "params.yaml", name="r", resume=True, overrides=["test_limit=2"], **kw)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["params"]["test_limit"] == 2
    assert params.read_yaml(run / "params.yaml")["test_limit"] == 2  # the folder records what ran
    assert [a["archived"] for a in info["attempts"]] == ["attempts/2"]
    assert (run / "attempts" / "2" / "02-train.ipynb").is_file()


def test_runs_index_follows_folders_and_survives_odd_records(tmp_path, capsys):
    """Links use the folder name (a renamed run keeps working links); a run.json that is valid JSON
    but not a run record is listed as broken instead of crashing `salt runs`."""
    runs = tmp_path / "runs"
    _fake_run(runs, "old-name", metrics={"cv_score": 0.5})
    (runs / "old-name").rename(runs / "new-name")
    for name, text in (("list", "[]"), ("nulls", json.dumps({"name": "nulls", "notebooks": None, "params": None})),
                       ("odd", json.dumps({"name": "odd", "notebooks": "x"}))):
        (runs / name).mkdir()
        (runs / name / "run.json").write_text(text)
    result = {r["name"]: r["_status"] for r in runner.list_runs(runs)}
    assert result == {"new-name": "finished", "list": "broken", "nulls": "?", "odd": "broken"}  # nulls: no status recorded
    page = (runs / "index.html").read_text()
    assert "new-name/index.html" in page and "new-name/01-eda.html" in page and "old-name" not in page


def test_salt_runs_reports_an_unwritable_overview_in_one_line(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    _fake_run(runs, "good")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(runs / "index.html"))

    monkeypatch.setattr(runner, "write_runs_index", denied)
    assert cli.main(["runs", "--runs-dir", str(runs)]) == 0
    out, err = capsys.readouterr()
    assert "good" in out and "could not write" in err and "Permission denied" in err
