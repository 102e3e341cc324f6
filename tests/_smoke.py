"""One smoke run of the whole pipeline, shared by the test modules that inspect it.

``salt run params/smoke.yaml`` (notebooks 01-04 through papermill, 48 images, a tiny model) runs once
per pytest process into a temporary runs folder; every module's fixture gets the same result, so the
suite pays for it once (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_NAME = "smoke"
_CACHE: dict = {}


@dataclass
class SmokeRun:
    """Result of the shared smoke run.

    Attributes:
        runs_dir: the temporary runs folder.
        run_dir: ``runs_dir/smoke``.
        returncode: exit status of ``salt run``.
        stdout, stderr: its output (progress lines, cell output, Keras' per-epoch lines).
        seconds: wall time of the command.
        data_dir: the data folder passed with ``--set data_dir=...``.
    """

    runs_dir: Path
    run_dir: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    data_dir: Path

    def describe(self) -> str:
        return (f"salt run exited {self.returncode} after {self.seconds:.0f} s\n--- stdout (end) ---\n"
                f"{self.stdout[-4000:]}\n--- stderr (end) ---\n{self.stderr[-4000:]}")


def get(tmp_path_factory, data_dir) -> SmokeRun:
    """Run the smoke pipeline the first time it is asked for; return the cached result after."""
    if "run" not in _CACHE:
        runs_dir = tmp_path_factory.mktemp("smoke_runs")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("MPLCONFIGDIR", "/tmp/salt-mpl")
        start = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "saltlib.cli", "run", str(ROOT / "params" / "smoke.yaml"),
             "--name", RUN_NAME, "--runs-dir", str(runs_dir), "--set", f"data_dir={data_dir}"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
        )
        _CACHE["run"] = SmokeRun(runs_dir, runs_dir / RUN_NAME, proc.returncode, proc.stdout, proc.stderr,
                                 time.time() - start, Path(data_dir))
        print(f"\nsmoke run: {_CACHE['run'].seconds:.0f} s wall (exit {proc.returncode})", file=sys.stderr)
    return _CACHE["run"]
