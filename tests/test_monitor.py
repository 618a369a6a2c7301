"""camelid.monitor: CPU counters, the decode-bandwidth arithmetic, `camelid monitor` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from camelid.config import get_preset
from camelid.model import Transformer
from camelid.monitor import (Monitor, decode_bandwidth, decode_bytes_per_step, format_sample, rss_bytes,
                             weight_bytes)
from camelid.quant import model_nbytes, quantize_model


def test_cpu_sample_is_sane():
    monitor = Monitor(system=True)
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:  # keep one core busy so the CPU share is clearly above zero
        pass
    row = monitor.sample()
    assert 0.1 < row["rss_gb"] < 1000 and rss_bytes() > 0
    assert 10 < row["cpu_percent"] <= 100 * os.cpu_count() + 10
    if os.path.exists("/proc/meminfo"):
        assert 0 < row["ram_used_gb"] < row["ram_total_gb"]
        assert 0 <= row["sys_cpu_percent"] <= 100
    assert "gpu_util" not in row
    assert format_sample("host", row).startswith("host: CPU ")


def test_gpu_monitor_without_nvml_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    monitor = Monitor(gpu=0)
    assert monitor.note == "GPU monitoring needs NVML bindings: pip install nvidia-ml-py"
    assert set(monitor.sample()) == {"cpu_percent", "rss_gb"}


def test_decode_bandwidth_arithmetic():
    config = get_preset("tiny").replace(tie_word_embeddings=False)
    model = Transformer(config).to(torch.bfloat16)
    c, B, T = config, 4, 100
    all_params = sum(p.numel() for p in model.parameters())
    weights = 2 * (all_params - c.vocab_size * c.hidden_size)  # untied: the embedding table is only looked up
    kv = 2 * c.num_hidden_layers * c.kv_size * T * B * 2  # k and v, bf16
    assert decode_bytes_per_step(model, B, T) == {"weights": weights, "kv_cache": kv, "total": weights + kv}
    # 400 tokens/s over 4 sequences = 100 steps/s
    assert decode_bandwidth(model, 400.0, B, T) == pytest.approx(100 * (weights + kv))
    # tied: the table is read whole by lm_head, once; an fp32 KV cache doubles the cache bytes
    tied = Transformer(get_preset("tiny").replace(tie_word_embeddings=True))
    per_step = decode_bytes_per_step(tied, 1, 10, kv_dtype=torch.float32)
    assert per_step["weights"] == 4 * sum(p.numel() for p in tied.parameters())
    assert per_step["kv_cache"] == 2 * c.num_hidden_layers * c.kv_size * 10 * 4
    with pytest.raises(ValueError, match="batch >= 1"):
        decode_bandwidth(model, 10.0, 0, T)


@pytest.mark.parametrize("method,modules", [("int8", r".*(proj|lm_head)"), ("int4", None), ("nf4", None)])
def test_weight_bytes_of_a_quantized_model_count_its_codes_and_scales(method, modules):
    """Quantized weights are buffers (codes + scales), not parameters: the bytes a decode step reads are the state
    dict's tensor bytes, less the embedding table (only looked up)."""
    config = get_preset("tiny").replace(tie_word_embeddings=False)
    model = quantize_model(Transformer(config), method, group_size=16, modules=modules)
    state = model.state_dict()
    embed = state["model.embed_tokens.weight"].numel() * state["model.embed_tokens.weight"].element_size()
    expected = sum(t.numel() * t.element_size() for t in state.values()) - embed
    assert weight_bytes(model) == expected == decode_bytes_per_step(model, 1, 0)["weights"]
    assert weight_bytes(model) == model_nbytes(model) - embed  # camelid.quant's own count agrees
    parameters_only = sum(p.numel() * p.element_size() for p in model.parameters()) - embed
    assert weight_bytes(model) > parameters_only  # what was counted before: the quantized layers were missing


def test_cli_monitor_once_as_json():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "camelid", "monitor", "--count", "1", "--interval", "0.1", "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    sample = json.loads(lines[0])
    assert sample["devices"] and sample["time"] > 0
    row = sample["devices"][0]
    assert ("gpu_util" in row) if torch.cuda.is_available() and "nvidia-ml-py" not in proc.stderr \
        else row["ram_total_gb"] > 0


def test_cli_monitor_bad_input():
    from camelid.cli import main

    assert main(["monitor", "--count", "0"]) == 2


def test_gpu_fields_from_nvml(monkeypatch):
    """The NVML path with a stand-in module: units converted (mW -> W, bytes -> GB), unsupported counters None."""
    from types import SimpleNamespace

    class NVMLError(Exception):
        pass

    def not_supported(handle):
        raise NVMLError("Not Supported")

    fake = SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}", nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=97, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=40e9, total=80e9),
        nvmlDeviceGetPowerUsage=not_supported, nvmlDeviceGetTemperature=lambda h, sensor: 54)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = Monitor(gpu=1)
    row = monitor.sample()
    assert monitor.note is None and monitor.name == "NVIDIA H100 80GB HBM3"
    assert {k: row[k] for k in row if k.startswith("gpu_")} == {
        "gpu_util": 97.0, "gpu_mem_used_gb": 40.0, "gpu_mem_total_gb": 80.0, "gpu_power_w": None, "gpu_temp_c": 54.0}
    assert format_sample("GPU 1", row) == "GPU 1: util 97% | mem 40.0/80.0 GB | - W | 54 C"
    from camelid.monitor import monitors

    devices, note = monitors()
    assert len(devices) == 2 and note is None and "rss_gb" not in devices[0].sample()
