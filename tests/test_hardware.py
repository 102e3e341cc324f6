"""Tests of saltlib.hardware (native bfloat16 detection) and of ``mixed_precision: auto``."""

from __future__ import annotations

import pytest

from saltlib import hardware, train

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n"
X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
X86_AMX = "flags\t\t: avx512f amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize("text,native", [
    (X86_BF16, True), (X86_AVX2, False), (X86_AMX, True), (ARM_BF16, True), (ARM_OLD, False), ("", False),
])
def test_cpu_bf16_from_cpuinfo(text, native):
    assert hardware.cpu_bf16(text) is native


def test_cpu_flags_reads_the_first_processor():
    assert hardware.cpu_flags(X86_BF16) == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert hardware.cpu_flags("no flags here\n") == set()


@pytest.mark.parametrize("value,native", [("1", True), ("0", False)])
def test_env_override(monkeypatch, value, native):
    monkeypatch.setenv(hardware.ENV_OVERRIDE, value)
    assert hardware.native_bfloat16() is native
    assert f"SALT_BF16={value}" in hardware.describe()


@pytest.mark.parametrize("gpu,cpu,native,says", [
    (None, X86_BF16, True, "native on the CPU (avx512_bf16)"),  # no GPU: the CPU decides
    (None, X86_AVX2, False, "not native on this CPU"),
    (True, X86_AVX2, True, "native on the GPU(s)"),  # a GPU decides, whatever the CPU
    (False, X86_BF16, False, "not native on the GPU(s) (compute capability < 8.0)"),
])
def test_detection_without_override_asks_the_gpu_first(monkeypatch, gpu, cpu, native, says):
    monkeypatch.delenv(hardware.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(hardware, "gpu_bf16", lambda: gpu)
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None, _f=hardware.cpu_flags: _f(cpu))
    assert hardware.native_bfloat16() is native
    assert says in hardware.describe()


@pytest.mark.parametrize("setting,native,expected", [
    (True, "0", True), (False, "1", False), ("auto", "1", True), ("auto", "0", False),
])
def test_mixed_precision_auto(monkeypatch, setting, native, expected):
    monkeypatch.setenv(hardware.ENV_OVERRIDE, native)
    cfg = {"base_filters": 2, "depth": 1, "blocks_per_level": 0, "dropout": 0.0, "mixed_precision": setting}
    assert train.use_bfloat16(cfg) is expected
    model = train.build_model(cfg)
    assert model.get_layer("enc1_conv").dtype_policy.name == ("mixed_bfloat16" if expected else "float32")
    saved = train.build_model(cfg, for_inference=True)
    assert saved.get_layer("enc1_conv").dtype_policy.name == ("bfloat16" if expected else "float32")


def test_cpu_model_from_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: avx2\n"
    assert hardware.cpu_model(text) == "AMD EPYC 7B13"
    assert hardware.cpu_model("processor\t: 0\n") is None


def test_nvidia_gpus_from_nvidia_smi(tmp_path, monkeypatch):
    """Names from ``nvidia-smi -L``; [] where the tool is missing or fails (no GPU)."""
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-5678)'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hardware.nvidia_gpus() == ["NVIDIA H200", "NVIDIA H200"]
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert hardware.nvidia_gpus() == []
    tool.unlink()
    assert hardware.nvidia_gpus() == []
