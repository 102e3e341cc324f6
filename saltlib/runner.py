"""Papermill runs: notebooks 01-04 executed with a parameter file into ``papermill_runs/<name>/``.

A run folder holds::

    params.yaml            the resolved parameters (defaults + file + --set)
    run.json               status (running / finished / failed), error, git commit, package versions,
                           data fingerprint, per-notebook timings, metrics, command line, times
    01-eda.ipynb ...       the executed notebooks (``NN-name.running.ipynb`` while one runs)
    01-eda.html ...        their HTML reports (figures embedded, readable offline)
    index.html             the run's front page: status, metrics, links to the reports
    models/ bundle/ metrics.json postprocess.json submission.csv   written by the notebooks

Notebooks execute with the project's Jupyter kernel (``salt``, see :func:`ensure_kernel`) with the
``notebooks/`` folder as working directory (as in JupyterLab); they find their outputs through the
``run_dir`` parameter, which :func:`run_pipeline` sets to the run folder's absolute path. Every file
the runner writes goes through :mod:`saltlib.io` (temporary name, then rename).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import hardware, io, params

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = ("01-eda", "02-train", "03-postprocess", "04-predict")
KERNEL_NAME = "salt"
KERNEL_DISPLAY_NAME = "Python (salt)"
#: keeps C++ log lines (TensorFlow's) out of notebook outputs; they go to the terminal instead
KERNEL_FLAG = "--IPKernelApp.capture_fd_output=False"
VERSION_PACKAGES = ("tensorflow", "keras", "numpy", "pandas", "papermill", "nbconvert", "matplotlib", "saltlib")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class RunError(RuntimeError):
    """A notebook of a run failed; the message names the run, the notebook, the error and the report."""


# --------------------------------------------------------------------------- kernel
def ensure_kernel(name: str = KERNEL_NAME, display_name: str = KERNEL_DISPLAY_NAME, prefix=None) -> str:
    """Install (idempotently) the project's Jupyter kernel spec into this environment.

    The spec runs this interpreter (``sys.executable``) with ipykernel and
    ``--IPKernelApp.capture_fd_output=False``.

    Args:
        name: kernel name (``salt``).
        display_name: the name JupyterLab shows.
        prefix: environment prefix; default ``sys.prefix`` (the virtual environment).
    Returns:
        the kernel spec folder, e.g. ``.venv/share/jupyter/kernels/salt``.
    """
    prefix = Path(prefix or sys.prefix)
    spec_dir = prefix / "share" / "jupyter" / "kernels" / name
    kernel_json = spec_dir / "kernel.json"
    want = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", KERNEL_FLAG]
    if kernel_json.is_file():
        try:
            spec = json.loads(kernel_json.read_text())
            if spec.get("argv") == want and spec.get("display_name") == display_name:
                return str(spec_dir)
        except (OSError, ValueError):
            pass
    from ipykernel.kernelspec import install

    path = Path(install(kernel_name=name, display_name=display_name, prefix=str(prefix)))
    spec = json.loads((path / "kernel.json").read_text())
    spec["argv"] = want
    spec["display_name"] = display_name
    io.write_json(path / "kernel.json", spec)
    return str(path)


# --------------------------------------------------------------------------- folders
def default_runs_dir() -> Path:
    """``papermill_runs/`` in the project (or ``$SALT_RUNS_DIR`` when set)."""
    env = os.environ.get("SALT_RUNS_DIR")
    return Path(env) if env else PROJECT_ROOT / "papermill_runs"


def notebook_run_dir(run_dir: str = "") -> Path:
    """The output folder a notebook writes to: ``run_dir``, or ``papermill_runs/interactive`` when
    it is empty (a notebook opened in JupyterLab). Created if missing; returned absolute."""
    path = Path(run_dir) if run_dir else default_runs_dir() / "interactive"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def check_name(name: str, what: str = "run name") -> str:
    """``name`` if it is a safe folder name (letters, digits, ``._+-``, no slashes), else ValueError."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_', '-', '+' "
            "(no slashes or spaces, at most 128 characters)"
        )
    return name


def _create_run_dir(runs_dir: Path, name: str | None, stem: str) -> Path:
    """Create the run folder; never reuse one. An explicit name that exists is an error; a
    generated name that exists (two runs in the same second) gets a ``-2``, ``-3`` ... suffix."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    if name is not None:
        path = runs_dir / check_name(name)
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            raise FileExistsError(
                f"run folder {path} already exists; runs are never overwritten: pick another --name"
            ) from None
        return path
    base = check_name(f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    for k in range(1, 100):
        path = runs_dir / (base if k == 1 else f"{base}-{k}")
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free run name like {runs_dir / base}")


# --------------------------------------------------------------------------- provenance
#: the folders whose files a run executes (untracked files there make the checkout dirty)
CODE_DIRS = ("saltlib", "notebooks", "params", "tools")


def git_info(root=PROJECT_ROOT) -> dict:
    """``{"commit", "dirty", "branch"}`` of the project checkout (None values without git).

    ``dirty`` is True when tracked files differ from the commit, or when files that git does not
    track and does not ignore sit among the code a run executes (``saltlib/``, ``notebooks/``,
    ``params/``, ``tools/``): a new module is part of the run but not of the commit.
    """
    def git(*args):
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             errors="surrogateescape", timeout=20)  # file names need not be UTF-8
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            # two calls: tracked changes anywhere; untracked files only under the code folders (the
            # pathspecs are relative to root, so this holds when the project is a subfolder of a repo)
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")
                          or git("status", "--porcelain", "--untracked-files=all", "--", *CODE_DIRS)),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        }
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "branch": None}


def package_versions(names=VERSION_PACKAGES) -> dict:
    """Installed versions of the packages a run depends on (None where missing), plus Python's."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in names:
        candidates = (name, f"{name}-cpu") if name == "tensorflow" else (name,)
        out[name] = None
        for dist in candidates:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def data_fingerprint(root, test_dir=None) -> dict:
    """A cheap fingerprint of a data folder: sha256 over ``train.csv``, ``depths.csv`` and the sorted
    names and sizes of the PNGs in ``train/images``, ``train/masks`` and the test folder.

    Args:
        root: the Kaggle-layout data folder.
        test_dir: the test image folder if not ``root/test/images``.
    Returns:
        ``{"dir", "sha256", "files": {folder: count}}``.
    """
    root = Path(root)
    h = hashlib.sha256()
    for name in ("train.csv", "depths.csv"):
        p = root / name
        h.update(f"{name}\n".encode())
        if p.is_file():
            h.update(p.read_bytes())
    folders = {"train/images": root / "train" / "images", "train/masks": root / "train" / "masks",
               "test/images": Path(test_dir) if test_dir else root / "test" / "images"}
    counts = {}
    for label, folder in folders.items():
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        counts[label] = len(files)
        h.update(f"[{label}]\n".encode())
        for f in files:
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return {"dir": str(root), "test_dir": str(folders["test/images"]), "sha256": h.hexdigest(), "files": counts}


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reports
def render_html(ipynb, html_path=None) -> Path:
    """Render an executed notebook to a self-contained HTML report (figures embedded as base64,
    no scripts fetched from the network), written atomically next to it unless ``html_path``."""
    import nbformat
    from nbconvert import HTMLExporter

    ipynb = Path(ipynb)
    html_path = Path(html_path) if html_path else ipynb.with_suffix(".html")
    nb = nbformat.read(ipynb, as_version=4)
    exporter = HTMLExporter(mathjax_url="", require_js_url="", embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": ipynb.stem}})
    body = body.replace('<script src=""></script>', "")
    io.write_text(html_path, body)
    return html_path


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.92em}
th{background:#f3f3f3}td{white-space:nowrap}td:last-child{white-space:normal}code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow:auto;white-space:pre-wrap}
.finished{color:#1a7f37;font-weight:bold}.failed,.died{color:#c62828;font-weight:bold}.running{color:#b26a00;font-weight:bold}
"""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt_seconds(s) -> str:
    if s is None:
        return ""
    s = int(round(float(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_score(x) -> str:
    return "" if x is None else f"{float(x):.4f}"


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_run_index(run_dir) -> Path:
    """Write ``run_dir/index.html`` from ``run.json``: status, error, metrics, links to the reports,
    timings, parameters and provenance."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    status = _status(info)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>run {_esc(info['name'])}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Run {_esc(info['name'])}</h1>",
             f"<p>Status: <span class='{_esc(status)}'>{_esc(status)}</span> &middot; started {_esc(info.get('started'))}"
             f" &middot; duration {_fmt_seconds(info.get('seconds'))} &middot; parameters "
             f"<a href='params.yaml'>params.yaml</a> (from <code>{_esc(info.get('params_file'))}</code>)</p>"]
    if info.get("error"):
        parts.append(f"<h2>Error</h2><pre>{_esc(info['error'])}</pre>")
    rows = []
    for nb in info.get("notebooks", []):
        link = f"<a href='{_esc(nb['html'])}'>{_esc(nb['name'])}</a>" if nb.get("html") else _esc(nb["name"])
        ipynb = f"<a href='{_esc(nb['ipynb'])}'>ipynb</a>" if nb.get("ipynb") else ""
        rows.append((link, f"<span class='{_esc(nb['status'])}'>{_esc(nb['status'])}</span>",
                     _fmt_seconds(nb.get("seconds")), ipynb))
    parts.append("<h2>Reports</h2>" + _table(rows, ["notebook", "status", "time", "executed notebook"]))
    attempts = info.get("attempts") or []
    if attempts:
        rows = [(_esc(a.get("attempt")), f"<span class='{_esc(a.get('status'))}'>{_esc(a.get('status'))}</span>",
                 _esc(a.get("started")), _esc(a.get("error") or ""),
                 f"<a href='{_esc(a.get('archived'))}/run.json'>{_esc(a.get('archived'))}</a>") for a in attempts]
        parts.append("<h3>Earlier attempts (resumed)</h3>" + _table(rows, ["attempt", "status", "started", "error",
                                                                          "files"]))
    extra = [f"<a href='{f}'>{f}</a>" for f in ("submission.csv", "metrics.json", "postprocess.json", "run.json")
             if (run_dir / f).exists()]
    if extra:
        parts.append("<p>Files: " + " &middot; ".join(extra) + "</p>")
    metrics = info.get("metrics") or {}
    if metrics:
        rows = [(f"<b>{_esc(k)}</b>", _esc(v if not isinstance(v, float) else f"{v:.4f}"))
                for k, v in metrics.items() if not isinstance(v, (dict, list))]
        parts.append("<h2>Metrics</h2>" + _table(rows, ["metric", "value"]))
        per_fold = metrics.get("per_fold")
        if isinstance(per_fold, dict) and per_fold:
            parts.append("<h3>per fold</h3>" + _table([(_esc(k), _fmt_score(v)) for k, v in per_fold.items()],
                                                      ["fold", "score"]))
        per_class = metrics.get("per_coverage_class")
        if isinstance(per_class, dict) and per_class:
            rows = [(_esc(k), _esc(v.get("n")), _fmt_score(v.get("score"))) for k, v in per_class.items()
                    if isinstance(v, dict)]
            parts.append("<h3>per coverage class</h3>" + _table(rows, ["class", "images", "score"]))
    git = info.get("git") or {}
    data = info.get("data") or {}
    rows = [("command", f"<code>{_esc(info.get('command'))}</code>"),
            ("git commit", _esc(f"{git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}")),
            ("data", _esc(f"{data.get('dir')} sha256 {str(data.get('sha256'))[:16]}… {data.get('files')}")),
            ("host", _esc(info.get("host"))),
            ("versions", _esc(", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())))]
    parts.append("<h2>Provenance</h2>" + _table(rows))
    prm = info.get("params") or {}
    order = [k for k in params.SPEC if k in prm] + sorted(k for k in prm if k not in params.SPEC)
    parts.append("<h2>Parameters</h2>" + _table(
        [(_esc(k), f"<code>{_esc(json.dumps(prm[k]))}</code>",
          _esc(params.SPEC[k].help) if k in params.SPEC else "") for k in order],
        ["parameter", "value", "meaning"]))
    parts.append("<p><a href='../index.html'>all runs</a></p></body></html>")
    return io.write_text(run_dir / "index.html", "\n".join(parts) + "\n")


# --------------------------------------------------------------------------- running
class _PlainFormatter(logging.Formatter):
    def format(self, record):
        return record.getMessage().rstrip("\n")


def _declared_parameters(path) -> list[str]:
    """The names of the notebook's ``parameters`` cell, as papermill reads them.

    Raises:
        ParamError: papermill cannot parse a line that assigns a parameter (it only logs that, and
            the parameter would then silently keep its notebook default).
    """
    import ast

    import nbformat
    import papermill

    found = list(papermill.inspect_notebook(str(path)).keys())
    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is not None:
        for node in ast.parse(cell.source).body:
            target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id not in found:
                line = cell.source.splitlines()[node.lineno - 1]
                raise params.ParamError(
                    f"{path}: papermill cannot parse the parameter line {line!r}, so {target.id!r} would not be set "
                    "(a comment with brackets or parentheses is the usual cause)"
                )
    return found


def _error_text(exc) -> tuple[str, str]:
    """(one-line error, traceback text without ANSI colours)."""
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        line = f"cell {cell}: {ename}: {evalue}" if cell is not None else f"{ename}: {evalue}"
        tb = "\n".join(ansi.sub("", t) for t in (getattr(exc, "traceback", None) or []))
    else:
        line = f"{type(exc).__name__}: {exc}".strip()
        import traceback

        tb = "".join(traceback.format_exception(exc))
    return ansi.sub("", line), tb


def _resolve_paths(cfg: dict) -> dict:
    """Relative ``data_dir`` / ``test_dir`` are taken relative to where ``salt run`` was started."""
    cfg = dict(cfg)
    for key in ("data_dir", "test_dir"):
        if cfg.get(key):
            cfg[key] = str(Path(cfg[key]).expanduser().resolve())
    return cfg


def _params_yaml(cfg: dict, source, overrides) -> str:
    head = [f"# resolved parameters: defaults, then {source}"]
    if overrides:
        head.append("# then --set " + " --set ".join(overrides))
    head.append("# run_dir is chosen by `salt run`. Re-run with: salt run <this file> --name NEW_NAME")
    body = yaml.safe_dump({k: v for k, v in cfg.items() if k != "run_dir"}, sort_keys=False,
                          default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body


def run_pipeline(params_path, name: str | None = None, overrides=(), runs_dir=None, notebooks_dir=None,
                 kernel_name: str = KERNEL_NAME, resume: bool = False, force: bool = False) -> Path:
    """Execute notebooks 01-04 with a parameter file into a new run folder.

    Everything that can be checked is checked before the folder is created: the parameters
    (unknown keys, types, ranges, ``--set`` syntax), the run name, the notebooks and their
    ``parameters`` cells, and the data folder.

    With ``resume`` the named run, which must have failed or died (killed), is run again in its own
    folder with the same parameters: the earlier attempt's notebooks, reports and results move to
    ``attempts/<k>/`` (listed in ``run.json``), and 02 resumes training from the fold checkpoints in
    ``models/`` (finished folds are not retrained).

    Args:
        params_path: parameter YAML (keys are notebook parameters, see :data:`saltlib.params.SPEC`).
        name: run folder name; default ``<yaml stem>-YYYYmmdd-HHMMSS``. An existing folder is an error
            (unless ``resume``).
        overrides: ``"key=value"`` strings applied after the file (values read as YAML).
        runs_dir: where run folders go; default :func:`default_runs_dir`.
        notebooks_dir: folder with the four notebooks; default ``notebooks/``.
        kernel_name: Jupyter kernel to execute with (installed by :func:`ensure_kernel` if ``salt``).
        resume: continue the failed or killed run ``name`` (see above), or run the notebooks on a folder
            holding only ``models/``, trained by ``salt train PARAMS --out <runs_dir>/<name>/models``.
        force: with ``resume``, also continue a run marked running on another host (killed with its
            machine; this host cannot check its process).
    Returns:
        the finished run folder.
    Raises:
        saltlib.params.ParamError: bad parameters (nothing created).
        saltlib.data.DataError: no data folder or a missing test folder (nothing created).
        FileExistsError: the named run folder exists (it is left untouched); with ``resume``, the run
            finished or is still running (here, or on another host without ``force``).
        FileNotFoundError: with ``resume``, there is no such run.
        RunError: a notebook failed; ``run.json`` says ``failed`` and the partial notebook and its
            HTML report are kept.
    """
    from . import data

    if force and not resume:
        raise ValueError("--force only applies to --resume")
    overrides = list(overrides or ())
    raw = params.read_yaml(params_path)
    if raw.get("run_dir"):
        raise params.ParamError(f"{params_path}: run_dir is chosen by `salt run` (use --name / --runs-dir), "
                                "remove it from the file")
    cfg = _resolve_paths(params.load(params_path, overrides))
    if any(params.parse_override(o)[0] == "run_dir" for o in overrides):
        raise params.ParamError("--set run_dir: run_dir is chosen by `salt run` (use --name / --runs-dir)")
    if name is not None:
        check_name(name)
    nb_dir = Path(notebooks_dir) if notebooks_dir else NOTEBOOKS_DIR
    declared = {}
    for nb in NOTEBOOKS:
        path = nb_dir / f"{nb}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"notebook missing: {path}")
        declared[nb] = _declared_parameters(path)
        unknown = [k for k in declared[nb] if k not in params.SPEC]
        if unknown:
            raise params.ParamError(f"{path}: parameters cell declares {unknown}, not in saltlib.params.SPEC")
    data_root = data.find_data_dir(cfg["data_dir"] or None)
    # 04 predicts the test images after hours of training: a missing folder must stop the run now
    if cfg["test_dir"] and not Path(cfg["test_dir"]).is_dir():
        raise data.DataError(f"test_dir {cfg['test_dir']} is not a folder")
    if not cfg["test_dir"] and not (data_root / "test" / "images").is_dir():
        raise data.DataError(f"no test images: {data_root / 'test' / 'images'} is not a folder (notebook 04 "
                             "predicts them); set test_dir to a folder of test PNGs")
    # and each of them must read: a corrupt or wrong-size image would fail notebook 04 after the training
    data.check_pngs(cfg["test_dir"] or data_root / "test" / "images", cfg["test_limit"] or None)
    if kernel_name == KERNEL_NAME:
        ensure_kernel()

    runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
    attempts = []
    if resume:
        if name is None:
            raise ValueError("resuming needs the --name of the run to resume")
        run_dir = (runs_dir / name).resolve()
        attempts = _prepare_resume(run_dir, {k: v for k, v in cfg.items() if k != "run_dir"}, force=force)
    else:
        run_dir = _create_run_dir(runs_dir, name, Path(params_path).stem).resolve()
    cfg["run_dir"] = str(run_dir)
    recorded = params.read_yaml(run_dir / "params.yaml") if (run_dir / "params.yaml").exists() else None
    if recorded is None or any(recorded.get(k) != cfg[k] for k in RESUME_MAY_CHANGE):  # a resume may change these
        io.write_text(run_dir / "params.yaml", _params_yaml(cfg, params_path, overrides))
    info = {
        "name": run_dir.name,
        "status": "running",
        "error": None,
        "failed_notebook": None,
        "params_file": str(Path(params_path).resolve()),
        "overrides": overrides,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "cwd": os.getcwd(),
        "started": _now(),
        "ended": None,
        "seconds": None,
        "host": {"hostname": socket.gethostname(), "pid": os.getpid(), "cpus": os.cpu_count(),
                 "cpu": hardware.cpu_model(), "gpus": hardware.nvidia_gpus()},
        "git": git_info(),
        "versions": package_versions(),
        "data": data_fingerprint(data_root, cfg["test_dir"] or None),
        "kernel": kernel_name,
        "notebooks": [],
        "metrics": None,
        "params": {k: v for k, v in cfg.items() if k != "run_dir"},
        "attempts": attempts,
    }

    def save():
        io.write_json(run_dir / "run.json", info)
        write_run_index(run_dir)

    save()
    print(f"run {run_dir.name}: {run_dir}", flush=True)
    t_run = time.time()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_PlainFormatter())
    pm_log = logging.getLogger("papermill")
    old_level, old_propagate = pm_log.level, pm_log.propagate
    pm_log.addHandler(handler)
    pm_log.setLevel(logging.INFO)
    pm_log.propagate = False
    current = None
    try:
        for i, nb in enumerate(NOTEBOOKS, start=1):
            current = {"name": nb, "status": "running", "started": _now(), "seconds": None,
                       "ipynb": None, "html": None}
            info["notebooks"].append(current)
            save()
            print(f"\n=== [{i}/{len(NOTEBOOKS)}] {nb} ===", flush=True)
            _execute(nb_dir / f"{nb}.ipynb", run_dir, nb, {k: cfg[k] for k in declared[nb]},
                     {"run_dir": cfg["run_dir"]}, kernel_name, current)
            current["status"] = "finished"
            print(f"=== {nb} finished in {_fmt_seconds(current['seconds'])} ===", flush=True)
            if (run_dir / "metrics.json").is_file():
                info["metrics"] = json.loads((run_dir / "metrics.json").read_text())
            save()
        current = None
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        line, tb = _error_text(exc)
        if isinstance(exc, KeyboardInterrupt):
            line = "interrupted (KeyboardInterrupt)"
        nb = current["name"] if current else None
        if current:
            current["status"] = "failed"
        info.update(status="failed", failed_notebook=nb, error=f"{nb}: {line}" if nb else line,
                    traceback=tb[-20000:], ended=_now(), seconds=round(time.time() - t_run, 1))
        if (run_dir / "metrics.json").is_file():
            info["metrics"] = json.loads((run_dir / "metrics.json").read_text())
        save()
        _try_runs_index(runs_dir)
        if isinstance(exc, Exception) and nb:
            report = run_dir / (current.get("html") or f"{nb}.ipynb")
            raise RunError(f"run {run_dir.name} failed in {nb} ({line}); see {report}") from exc
        raise
    finally:
        pm_log.removeHandler(handler)
        pm_log.setLevel(old_level)
        pm_log.propagate = old_propagate
    info.update(status="finished", ended=_now(), seconds=round(time.time() - t_run, 1))
    save()
    _try_runs_index(runs_dir)
    metrics = info.get("metrics") or {}
    score, nested = metrics.get("cv_score"), metrics.get("cv_score_nested")
    print(f"run {run_dir.name} finished in {_fmt_seconds(info['seconds'])}"
          + (f"; CV score {score:.4f}" if isinstance(score, (int, float)) else "")
          + (f" (nested {nested:.4f})" if isinstance(nested, (int, float)) else ""), flush=True)
    return run_dir


#: parameters a resumed run may change: only notebook 04 reads them (which test images to predict),
#: and a resume runs 04 again; everything else would mix two configurations in one run folder
RESUME_MAY_CHANGE = ("test_dir", "test_limit")


def _prepare_resume(run_dir: Path, cfg: dict, force: bool = False) -> list:
    """Check that ``run_dir`` holds a failed or killed run with parameters ``cfg`` and move its
    notebooks, reports and results to ``attempts/<k>/``. Returns the updated list of attempts.

    A run marked running on another host (its machine gone, or the folder copied here) cannot be
    checked from here: it is refused unless ``force``. One running on this host is always refused."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} == {"models"}:
            # a folder whose folds were trained by `salt train --out <run>/models`: 02 skips the
            # finished folds (and resumes unfinished ones), the other notebooks run as usual
            print(f"run {run_dir.name}: using the folds trained in {run_dir / 'models'}", flush=True)
            return []
        raise FileNotFoundError(f"no run to resume: {info_path} does not exist")
    old = json.loads(info_path.read_text())
    status = _status(old)
    if status == "finished":
        raise FileExistsError(f"run {run_dir.name} finished; there is nothing to resume (pick a new --name)")
    if status == "running":
        host = old.get("host") or {}
        if host.get("hostname") == socket.gethostname():
            raise FileExistsError(f"run {run_dir.name} is still running (pid {host.get('pid')})")
        if not force:
            raise FileExistsError(
                f"run {run_dir.name} is marked running on host {host.get('hostname')!r} (pid {host.get('pid')}), "
                f"which cannot be checked from {socket.gethostname()!r}; if it is no longer running there, "
                "resume with --resume --force")
        print(f"run {run_dir.name}: marked running on host {host.get('hostname')!r}; resumed here (--force)", flush=True)
        status = "died"
    # a parameter added since the run was made counts as its default (the behaviour of that time)
    before = {**{k: v for k, v in params.defaults().items() if k in cfg}, **(old.get("params") or {})}
    differ = sorted(k for k in set(before) | set(cfg) if before.get(k) != cfg.get(k) and k not in RESUME_MAY_CHANGE)
    if differ:
        raise params.ParamError(
            f"cannot resume run {run_dir.name} with different parameters ({', '.join(differ)}); resume it with "
            f"its own: salt run {run_dir / 'params.yaml'} --name {run_dir.name} --resume"
        )
    attempts = list(old.get("attempts") or [])
    k = len(attempts) + 1
    while (run_dir / "attempts" / str(k)).exists():  # left by a resume interrupted before run.json was rewritten
        k += 1
    archive = run_dir / "attempts" / str(k)
    archive.mkdir(parents=True, exist_ok=False)
    moved = []
    for f in sorted(run_dir.iterdir()):
        if f.is_file() and (re.match(r"^\d\d-.*\.(ipynb|html)$", f.name) or f.name in (
                "metrics.json", "postprocess.json", "predict.json", "submission.csv")):
            os.replace(f, archive / f.name)
            moved.append(f.name)
    io.write_text(archive / "run.json", info_path.read_text())  # copied: the folder always keeps a run.json
    attempts.append({
        "attempt": k, "status": status, "error": old.get("error"), "failed_notebook": old.get("failed_notebook"),
        "started": old.get("started"), "ended": old.get("ended"), "seconds": old.get("seconds"),
        "notebooks": old.get("notebooks"), "command": old.get("command"), "git": old.get("git"),
        "archived": f"attempts/{k}", "files": moved,
    })
    print(f"resuming run {run_dir.name}: attempt {k} ({status}) moved to {archive}", flush=True)
    return attempts


def _execute(src, run_dir: Path, nb: str, values: dict, extra: dict, kernel_name: str, record: dict) -> None:
    """Run one notebook with papermill into ``run_dir/<nb>.running.ipynb``, then move it to
    ``<nb>.ipynb`` and render ``<nb>.html`` (also when it failed, before re-raising)."""
    import papermill

    running = run_dir / f"{nb}.running.ipynb"
    final = run_dir / f"{nb}.ipynb"
    start = time.time()
    try:
        papermill.execute_notebook(
            str(src), str(running), parameters={**values, **extra}, kernel_name=kernel_name,
            cwd=str(Path(src).parent), log_output=True, progress_bar=False,
        )
    finally:
        record["seconds"] = round(time.time() - start, 1)
        if running.is_file():
            os.replace(running, final)
            record["ipynb"] = final.name
            try:
                record["html"] = render_html(final).name
            except Exception as e:  # noqa: BLE001 - a report failure must not hide the notebook's error
                print(f"could not render {final.name} to HTML: {e}", file=sys.stderr)


# --------------------------------------------------------------------------- listing
def _status(info: dict) -> str:
    """``finished``, ``failed``, ``running``, or ``died`` for a run marked running whose process on
    this host is gone (killed)."""
    status = info.get("status", "?")
    host = info.get("host") or {}
    if status == "running" and host.get("hostname") == socket.gethostname() and host.get("pid"):
        try:
            os.kill(int(host["pid"]), 0)
        except ProcessLookupError:
            return "died"
        except (PermissionError, OSError, ValueError):
            pass
    return status


def read_runs(runs_dir=None) -> list[dict]:
    """``run.json`` of every run folder, oldest first (unreadable ones reported as ``broken``)."""
    runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
    out = []
    for p in sorted(runs_dir.glob("*/run.json")):
        try:
            info = json.loads(p.read_text())
            if not isinstance(info, dict):
                raise ValueError(f"expected a JSON object, got {type(info).__name__}")
            for key, kind in (("notebooks", list), ("params", dict), ("metrics", dict), ("host", dict)):
                if info.get(key) is not None and not isinstance(info[key], kind):
                    raise ValueError(f"{key!r} is a {type(info[key]).__name__}, not a {kind.__name__}")
            # the numbers the listings print
            shown = [("seconds", info.get("seconds"))] + [
                (k, (info.get("metrics") or {}).get(k)) for k in ("cv_score", "cv_score_nested")]
            for key, value in shown:
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"{key!r} is {value!r}, not a number")
        except (OSError, ValueError) as e:
            info = {"status": "broken", "error": str(e)}
        info["name"] = p.parent.name  # the folder: links and listings must follow a renamed run
        info["_dir"] = p.parent
        info["_status"] = _status(info)
        out.append(info)
    out.sort(key=lambda r: (str(r.get("started") or ""), r["name"]))
    return out


def _try_runs_index(runs_dir) -> None:
    try:
        write_runs_index(runs_dir)
    except Exception as e:  # noqa: BLE001 - the overview is a convenience
        print(f"could not update {Path(runs_dir) / 'index.html'}: {e}", file=sys.stderr)


def write_runs_index(runs_dir=None) -> Path:
    """Write ``runs_dir/index.html``: one row per run with status, CV score, threshold, duration,
    key parameters and links to its reports."""
    runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
    runs = read_runs(runs_dir)
    rows = []
    for r in runs:
        m = r.get("metrics") or {}
        p = r.get("params") or {}
        n = r["name"]
        links = " ".join(
            f"<a href='{_esc(n)}/{_esc(nb['html'])}'>{_esc(str(nb.get('name', ''))[:2])}</a>"
            for nb in r.get("notebooks") or [] if isinstance(nb, dict) and nb.get("html")
        )
        stages = " + ".join(f"{s.get('loss')}×{s.get('epochs')}" for s in p.get("stages") or [] if isinstance(s, dict))
        rows.append((
            f"<a href='{_esc(n)}/index.html'>{_esc(n)}</a>",
            f"<span class='{_esc(r['_status'])}'>{_esc(r['_status'])}</span>",
            _fmt_score(m.get("cv_score")), _fmt_score(m.get("cv_score_nested")),
            _esc(m.get("threshold", "")), _esc(m.get("min_size", "")), _esc(m.get("tta", "")),
            _esc(m.get("n_images", "")),
            _fmt_seconds(r.get("seconds")),
            _esc(str(r.get("started") or "")[:19].replace("T", " ")),
            _esc(f"{p.get('base_filters', '')}f d{p.get('depth', '')} {stages} folds {p.get('folds', '')}"
                 + (f" limit {p['limit']}" if p.get("limit") else "")),
            links,
        ))
    header = ["run", "status", "CV score", "nested", "cut-off", "min size", "TTA", "images", "duration", "started",
              "model / schedule", "reports"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>papermill runs</title><style>{_CSS}</style>"
            f"</head><body><h1>Runs in {_esc(runs_dir)}</h1>"
            + (_table(rows, header) if rows else "<p>No runs yet: <code>salt run params/smoke.yaml</code></p>")
            + "</body></html>\n")
    return io.write_text(runs_dir / "index.html", page)


def list_runs(runs_dir=None) -> list[dict]:
    """Print a table of runs (name, status, CV score and its nested twin, duration) and write
    ``runs_dir/index.html``.

    Returns:
        the runs' ``run.json`` contents, oldest first.
    """
    runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
    runs = read_runs(runs_dir) if runs_dir.is_dir() else []
    rows = [("name", "status", "CV score", "nested", "duration", "started")]
    for r in runs:
        m = r.get("metrics") or {}
        rows.append((r["name"], r["_status"], _fmt_score(m.get("cv_score")) or "-",
                     _fmt_score(m.get("cv_score_nested")) or "-", _fmt_seconds(r.get("seconds")) or "-",
                     str(r.get("started") or "")[:19].replace("T", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    if not runs:
        print(f"(no runs in {runs_dir})")
    if runs_dir.is_dir():
        try:
            print(f"overview: {write_runs_index(runs_dir)}")
        except OSError as e:  # the table above is the answer; the HTML overview is a convenience
            print(f"could not write {runs_dir / 'index.html'}: {e}", file=sys.stderr)
    return runs
