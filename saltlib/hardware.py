"""What the machine computes natively: bfloat16 or not.

bfloat16 ("bf16") mixed precision roughly doubles training speed on CPUs with the AVX512-BF16 or
AMX-BF16 instructions and on NVIDIA GPUs from Ampere (compute capability 8.0) on. Elsewhere oneDNN
emulates it, and it is much slower than float32. Measured on a 2-core AMD EPYC with AVX2 but no
AVX-512 (2026-11-26, one short run), for the 16-filter ResNet-U-Net at 101x101: training 1.0 images/s in
``mixed_bfloat16`` against 6.2 in float32; inference of a shipped bfloat16 model 17 images/s
against 25 after :func:`saltlib.predict.load_bundle` turned it into float32.

Nothing here imports TensorFlow unless a GPU question is asked.
"""

from __future__ import annotations

import os
from pathlib import Path

#: CPU flags (``/proc/cpuinfo``) of instructions that compute bfloat16 natively
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: ``SALT_BF16=1`` or ``0`` overrides the detection (e.g. for a CPU this module does not know)
ENV_OVERRIDE = "SALT_BF16"


def _cpuinfo_value(keys: tuple[str, ...], cpuinfo: str | None = None) -> str | None:
    """The value of the first line of ``/proc/cpuinfo`` (or ``cpuinfo``) whose key is one of ``keys``
    (the first processor's), or None where there is no such line or no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where there is none).

    Args:
        cpuinfo: the file's text (None: read ``/proc/cpuinfo``; on other systems the set is empty).
    Returns:
        the set of flags, e.g. ``{"avx2", "fma", "avx512_bf16", ...}``.
    """
    return set((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())  # x86 / ARM


def cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 on x86; BF16 on ARM)."""
    flags = cpu_flags(cpuinfo)
    return bool(flags & set(BF16_CPU_FLAGS)) or "bf16" in flags


def gpu_bf16() -> bool | None:
    """Whether every visible GPU computes bfloat16 natively (compute capability >= 8.0).

    Asks TensorFlow, or JAX where TensorFlow is not installed (``tools/gpu_cv.py`` machines).

    Returns:
        None when no GPU is seen; otherwise True or False.
    """
    try:
        import tensorflow as tf
    except ImportError:
        tf = None
    if tf is not None:
        gpus = tf.config.list_physical_devices("GPU")
        caps = [tuple(tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0)) for g in gpus]
    else:
        try:
            import jax
        except ImportError:
            return None
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        caps = [tuple(int(v) for v in str(getattr(d, "compute_capability", "0.0")).split(".")[:2]) for d in gpus]
    if not gpus:
        return None
    return all(cc >= (8, 0) for cc in caps)


def _forced() -> bool | None:
    """The ``SALT_BF16`` override: True, False, or None where it is unset (or not 0/1)."""
    value = os.environ.get(ENV_OVERRIDE, "").strip()
    return {"1": True, "0": False}.get(value)


def native_bfloat16() -> bool:
    """Whether bfloat16 compute is fast here: on the GPUs if any is seen, else on the CPU.

    ``SALT_BF16=1`` / ``SALT_BF16=0`` in the environment overrides the answer.
    """
    forced = _forced()
    if forced is not None:
        return forced
    gpu = gpu_bf16()
    return cpu_bf16() if gpu is None else gpu


def describe() -> str:
    """One line for logs: whether bfloat16 is native here and why."""
    forced = _forced()
    if forced is not None:
        return f"bfloat16 {'native' if forced else 'not native'} ({ENV_OVERRIDE}={int(forced)})"
    gpu = gpu_bf16()
    if gpu is not None:
        return f"bfloat16 {'native' if gpu else 'not native'} on the GPU(s) (compute capability {'>=' if gpu else '<'} 8.0)"
    if cpu_bf16():
        return "bfloat16 native on the CPU (" + ", ".join(sorted(cpu_flags() & {*BF16_CPU_FLAGS, "bf16"})) + ")"
    return "bfloat16 not native on this CPU (no avx512_bf16 / amx_bf16): emulated, slower than float32"


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (None where it is not there)."""
    return _cpuinfo_value(("model name",), cpuinfo)


def nvidia_gpus() -> list[str]:
    """Names of the NVIDIA GPUs that ``nvidia-smi -L`` lists ([] without the tool or a GPU). Cheap:
    no TensorFlow import, so run records can say what trained."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.split(":", 1)[1].split("(UUID")[0].strip() for line in out.stdout.splitlines()
            if line.startswith("GPU ") and ":" in line]
