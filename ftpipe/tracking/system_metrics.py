"""System metrics while a stage runs: CPU, memory and, on NVIDIA GPUs, utilization, memory, power and
temperature, sampled by ftpipe itself every `tracking.system_metrics_interval_s`.

Why not MLflow's own monitor: it reads GPUs only through nvidia-ml-py, and the GPU machine has no
MLflow at all (a stage's record goes to `mlflow-pending/` there and is uploaded later). This sampler
needs neither: Linux's /proc for CPU and memory, `nvidia-smi` (shipped with the driver) for the GPUs,
and torch's allocator for what the process itself holds. Names follow MLflow's (`system/...`), so
the UI's "System metrics" tab charts them; each sample is one step, as in MLflow.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

MIB = 2 ** 20
# nvidia-smi's CSV columns, in the order asked for, and the metric each becomes (MLflow's names)
GPU_QUERY = ("utilization.gpu", "memory.used", "memory.total", "power.draw", "power.limit", "temperature.gpu")


def read_cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot; None where /proc is missing (not Linux)."""
    try:
        fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_memory_metrics(previous_cpu: tuple[int, int] | None, current_cpu: tuple[int, int] | None,
                       meminfo: Path = Path("/proc/meminfo"), status: Path = Path("/proc/self/status")
                       ) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if previous_cpu and current_cpu and current_cpu[1] > previous_cpu[1]:
        busy, total = current_cpu[0] - previous_cpu[0], current_cpu[1] - previous_cpu[1]
        metrics["system/cpu_utilization_percentage"] = round(100.0 * busy / total, 2)
    try:
        info = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.strip()}
        used_kib = info["MemTotal"] - info["MemAvailable"]
        metrics["system/system_memory_usage_megabytes"] = round(used_kib / 1024, 1)
        metrics["system/system_memory_usage_percentage"] = round(100.0 * used_kib / info["MemTotal"], 2)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        rss = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        metrics["system/process_memory_rss_megabytes"] = round(int(rss.split()[1]) / 1024, 1)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return metrics


def parse_nvidia_smi(csv_text: str) -> dict[str, float]:
    """`nvidia-smi --query-gpu=index,<GPU_QUERY> --format=csv,noheader,nounits` as metrics; a field
    the GPU does not report ("[N/A]", "[Not Supported]") is left out."""
    metrics: dict[str, float] = {}
    for line in csv_text.strip().splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(GPU_QUERY) + 1:
            continue
        values: dict[str, float] = {}
        for name, cell in zip(GPU_QUERY, cells[1:]):
            try:
                values[name] = float(cell)
            except ValueError:
                pass
        prefix = f"system/gpu_{cells[0]}_"
        if "utilization.gpu" in values:
            metrics[prefix + "utilization_percentage"] = values["utilization.gpu"]
        if "memory.used" in values:
            metrics[prefix + "memory_usage_megabytes"] = values["memory.used"]
            if values.get("memory.total"):
                metrics[prefix + "memory_usage_percentage"] = round(
                    100.0 * values["memory.used"] / values["memory.total"], 2)
        if "power.draw" in values:
            metrics[prefix + "power_usage_watts"] = values["power.draw"]
            if values.get("power.limit"):
                metrics[prefix + "power_usage_percentage"] = round(
                    100.0 * values["power.draw"] / values["power.limit"], 2)
        if "temperature.gpu" in values:
            metrics[prefix + "temperature_celsius"] = values["temperature.gpu"]
    return metrics


def torch_cuda_metrics() -> dict[str, float]:
    """What this process's CUDA allocator holds, per device: nvidia-smi sees only the device total.
    Only where the stage itself has imported torch and started CUDA (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {f"system/gpu_{index}_torch_reserved_megabytes": round(torch.cuda.memory_reserved(index) / MIB, 1)
            for index in range(torch.cuda.device_count())}


class SystemMetricsSampler:
    """A daemon thread calling `log(metrics, step)` every `interval_s` seconds until stop()."""

    def __init__(self, interval_s: float, log: Callable[[dict[str, float], int], None],
                 nvidia_smi: str | None = None):
        self.interval_s = interval_s
        self.log = log
        self.nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ftpipe-system-metrics", daemon=True)
        self.cpu = read_cpu_times()
        self.step = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def sample(self) -> dict[str, float]:
        cpu = read_cpu_times()
        metrics = cpu_memory_metrics(self.cpu, cpu)
        self.cpu = cpu
        metrics.update(self._gpu_metrics())
        metrics.update(torch_cuda_metrics())
        return metrics

    def _gpu_metrics(self) -> dict[str, float]:
        if not self.nvidia_smi:
            return {}
        try:
            done = subprocess.run([self.nvidia_smi, f"--query-gpu=index,{','.join(GPU_QUERY)}",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is None or done.returncode != 0:
            self.nvidia_smi = None   # no driver, or it hangs: no GPU metrics rather than a slow stage
            return {}
        return parse_nvidia_smi(done.stdout)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            metrics = self.sample()
            if metrics:
                self.log(metrics, self.step)
                self.step += 1
