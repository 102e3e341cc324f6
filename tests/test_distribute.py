"""tf.distribute strategies: MirroredStrategy over two logical CPUs trains a fold with the batch
and learning rate scaled by the number of replicas; bad names and a missing TF_CONFIG are refused.

Logical devices must be configured before TensorFlow initializes, so the mirrored run happens in
a fresh Python process.
"""

from __future__ import annotations

import json
import math
import socket

import pandas as pd
import pytest

import tensorflow as tf  # noqa: F401  (a hard dependency: a broken install fails, never skips)

from conftest import run_python  # noqa: E402
from saltlib import distribute  # noqa: E402

MIRRORED = r"""
import json, sys
from saltlib import distribute
distribute.split_cpu(2)  # before TensorFlow starts
from saltlib import data, train
ds = data.load_train({data_dir!r})
folds = data.kfold(ds, 3, 42)
cfg = dict(base_filters=4, depth=2, blocks_per_level=1, dropout=0.0, mixed_precision=False, batch_size=4,
           stages=[dict(loss="bce+lovasz", epochs=2, lr=0.01)], min_lr=1e-5, val_every=1,
           strategy="mirrored")
summary = train.train_fold(ds, folds, 0, cfg, {out!r}, verbose=0)
strategy = distribute.get_strategy("mirrored")
print("RESULT " + json.dumps(dict(summary=summary, replicas=strategy.num_replicas_in_sync,
                                  devices=list(strategy.extended.worker_devices))))
"""


@pytest.mark.slow
def test_mirrored_two_logical_cpus_trains_a_fold(synthetic24, tmp_path):
    out = tmp_path / "models"
    proc = run_python(MIRRORED.format(data_dir=str(synthetic24.root), out=str(out)), timeout=400)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["replicas"] == 2
    assert len(result["devices"]) == 2 and all("CPU" in d for d in result["devices"])
    log = proc.stdout
    # 16 training images, 4 per replica: a global batch of 8, 2 steps per epoch; lr 0.01 x 2
    assert "2 replica(s), global batch 8" in log
    assert "lr 0.02 (cosine)" in log
    summary = result["summary"]
    assert summary["n_train"] == 16 and 0 <= summary["val_score"] <= 1
    hist = pd.read_csv(out / "fold0" / "history.csv")
    assert len(hist) == 2 and hist["loss"].notna().all()
    # after epoch 1 (2 of 4 steps) the cosine schedule is half-way down from the scaled peak 0.02
    alpha = 1e-5 / 0.02
    expected = 0.02 * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * 2 / 4)) + alpha)
    assert hist["lr"].iloc[0] == pytest.approx(expected, rel=1e-4)
    assert (out / "fold0" / "model.keras").exists() and (out / "fold0" / "done.json").exists()


MULTI_WORKER = r"""
import json
from saltlib import distribute
strategy = distribute.get_strategy("multi_worker")
import keras, numpy as np
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
model.fit(np.ones((8, 4), "float32"), np.zeros((8, 1), "float32"), batch_size=4, epochs=1, verbose=0)
import tensorflow as tf
print("RESULT " + json.dumps(dict(multi_worker=isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
                                  replicas=strategy.num_replicas_in_sync)))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_single_worker_cluster(tmp_path):
    """The README's multi-worker launch, with a one-worker cluster on this machine."""
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{_free_port()}"]}, "task": {"type": "worker", "index": 0}}
    proc = run_python(MULTI_WORKER, timeout=300, TF_CONFIG=json.dumps(tf_config))
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"multi_worker": True, "replicas": 1}


def test_default_strategy_has_one_replica():
    assert distribute.get_strategy("default").num_replicas_in_sync == 1


def test_non_tensorflow_backend_gets_single_device(monkeypatch):
    """Under JAX (say) 'default' needs no TensorFlow; distributed strategies are refused by name."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    s = distribute.get_strategy("default")
    assert isinstance(s, distribute.SingleDevice) and s.num_replicas_in_sync == 1
    with s.scope():
        pass
    with pytest.raises(ValueError, match="'mirrored' needs KERAS_BACKEND=tensorflow"):
        distribute.get_strategy("mirrored")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        distribute.get_strategy("multi_worker")


@pytest.mark.parametrize("name", ["", "Mirrored", "tpu", "parameter_server", None])
def test_unknown_strategy(name):
    with pytest.raises(ValueError, match="unknown strategy"):
        distribute.get_strategy(name)


def test_strategy_names_match_the_parameter_spec():
    from saltlib.params import SPEC

    SPEC["strategy"].check("mirrored")
    assert all(SPEC["strategy"].check(n) is None for n in distribute.STRATEGIES)
    assert SPEC["strategy"].check("tpu") is not None
