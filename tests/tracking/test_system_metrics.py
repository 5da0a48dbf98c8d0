"""ftpipe.tracking.system_metrics: CPU and memory from /proc, GPUs from nvidia-smi (a fake one here, printing
what an H100 prints), sampled on a thread into MLflow-named `system/...` metrics."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from ftpipe.tracking.system_metrics import SystemMetricsSampler, cpu_memory_metrics, parse_nvidia_smi, read_cpu_times

# `nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total,power.draw,power.limit,
#  temperature.gpu --format=csv,noheader,nounits` on two GPUs, the second one without power readings
NVIDIA_SMI_OUTPUT = "0, 87, 8243, 81559, 412.35, 700.00, 54\n1, 0, 1, 81559, [N/A], [N/A], 31\n"


def fake_nvidia_smi(folder: Path, output: str = NVIDIA_SMI_OUTPUT, exit_code: int = 0) -> str:
    path = folder / "nvidia-smi"
    path.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_nvidia_smi_csv_becomes_mlflow_named_gpu_metrics():
    metrics = parse_nvidia_smi(NVIDIA_SMI_OUTPUT)
    assert metrics["system/gpu_0_utilization_percentage"] == 87.0
    assert metrics["system/gpu_0_memory_usage_megabytes"] == 8243.0
    assert metrics["system/gpu_0_memory_usage_percentage"] == round(100 * 8243 / 81559, 2)
    assert metrics["system/gpu_0_power_usage_watts"] == 412.35
    assert metrics["system/gpu_0_power_usage_percentage"] == round(100 * 412.35 / 700, 2)
    assert metrics["system/gpu_0_temperature_celsius"] == 54.0
    assert metrics["system/gpu_1_utilization_percentage"] == 0.0
    assert not any(key.startswith("system/gpu_1_power") for key in metrics)   # [N/A]: left out, not 0
    assert parse_nvidia_smi("No devices were found\n") == {}


def test_cpu_and_memory_from_proc(tmp_path):
    (tmp_path / "stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    before = read_cpu_times(tmp_path / "stat")
    assert before == (200, 1000)
    (tmp_path / "stat").write_text("cpu  250 0 150 800 100 0 0 0 0 0\n")   # +200 busy of +300
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   18000000 kB\n")
    (tmp_path / "status").write_text("Name:\tpython\nVmRSS:\t  512000 kB\n")
    metrics = cpu_memory_metrics(before, read_cpu_times(tmp_path / "stat"), tmp_path / "meminfo", tmp_path / "status")
    assert metrics == {"system/cpu_utilization_percentage": 66.67,
                       "system/system_memory_usage_megabytes": 5859.4,   # (24e6 - 18e6) KiB
                       "system/system_memory_usage_percentage": 25.0,
                       "system/process_memory_rss_megabytes": 500.0}
    assert read_cpu_times(tmp_path / "missing") is None


def test_the_sampler_logs_numbered_samples_until_stopped(tmp_path):
    logged: list[tuple[dict, int]] = []
    sampler = SystemMetricsSampler(0.05, lambda metrics, step: logged.append((metrics, step)),
                                   nvidia_smi=fake_nvidia_smi(tmp_path))
    sampler.start()
    deadline = time.time() + 10
    while len(logged) < 3 and time.time() < deadline:
        time.sleep(0.02)
    sampler.stop()
    count = len(logged)
    time.sleep(0.2)
    assert len(logged) == count >= 3   # stopped: no more samples
    assert [step for _, step in logged] == list(range(count))
    first = logged[0][0]
    assert first["system/gpu_0_utilization_percentage"] == 87.0
    assert first["system/system_memory_usage_megabytes"] > 0 and first["system/process_memory_rss_megabytes"] > 0
    assert "system/cpu_utilization_percentage" in logged[-1][0]


def test_a_failing_nvidia_smi_is_dropped_and_cpu_sampling_goes_on(tmp_path):
    sampler = SystemMetricsSampler(1.0, lambda metrics, step: None,
                                   nvidia_smi=fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", exit_code=9))
    metrics = sampler.sample()
    assert sampler.nvidia_smi is None and not any(key.startswith("system/gpu") for key in metrics)
    assert "system/system_memory_usage_megabytes" in metrics
    assert os.path.exists(tmp_path / "nvidia-smi")
