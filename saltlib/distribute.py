"""Choosing a ``tf.distribute`` strategy by name (distributed ones need the TensorFlow backend)."""

from __future__ import annotations

import os

STRATEGIES = ("default", "mirrored", "multi_worker")


class SingleDevice:
    """The ``default`` strategy under a non-TensorFlow backend: one device, nothing distributed
    (the backend places the model; JAX picks the GPU when it has one)."""

    num_replicas_in_sync = 1

    def scope(self):
        import contextlib

        return contextlib.nullcontext()


def get_strategy(name: str = "default"):
    """Return a ``tf.distribute.Strategy``.

    Args:
        name: ``"default"`` (one device: the GPU if any, else the CPU), ``"mirrored"`` (all local
            GPUs, or the logical CPU devices when there is no GPU) or ``"multi_worker"``
            (``MultiWorkerMirroredStrategy``; the cluster comes from the ``TF_CONFIG`` variable).
    Returns:
        the strategy; ``strategy.num_replicas_in_sync`` gives the number of model copies.
    Raises:
        ValueError: for an unknown name, or a distributed strategy under a non-TensorFlow backend.
    """
    import keras

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    if keras.backend.backend() != "tensorflow":
        if name != "default":
            raise ValueError(
                f"strategy {name!r} needs KERAS_BACKEND=tensorflow (now {keras.backend.backend()!r})"
            )
        return SingleDevice()
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if "TF_CONFIG" not in os.environ:
        raise ValueError("strategy 'multi_worker' needs TF_CONFIG describing the cluster (see README)")
    return tf.distribute.MultiWorkerMirroredStrategy()


def split_cpu(n: int = 2) -> None:
    """Split the first CPU into ``n`` logical devices (before TensorFlow starts), for testing
    ``MirroredStrategy`` without GPUs."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
