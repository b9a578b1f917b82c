"""Machine figures for status, health and metrics: psutil for CPU and memory, NVML for GPUs.

A machine without GPUs, without a driver or without the NVML library is reported as such
(`gpus: []` plus `gpu_error`), never raised.
"""

from __future__ import annotations

from typing import Any

import psutil

from pool.cpus import usable_cpus


def system_stats(cores: tuple[int, ...] | None = None) -> dict[str, Any]:
    """CPU %, memory, and per-GPU load and memory; the CPUs this pool may use (`cores`: its
    own where --cpu-affinity pinned the calling process to a part of them).

    cpu_percent is measured since the previous call (psutil keeps the last sample), so the
    server calls this on a steady tick and the first figure after start-up is 0.0.
    """
    memory = psutil.virtual_memory()
    gpus, gpu_error = gpu_stats()
    cpus = usable_cpus(cores=cores)  # read each time: a pod's CPU limit can be resized in place
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count() or 0,
        "cpus_usable": cpus.usable,  # this pool's: its affinity and its cgroup's CPU limit
        "cpu_limit": cpus.limit,
        "load_average": list(psutil.getloadavg()),
        "memory_percent": memory.percent,
        "memory_used_bytes": memory.total - memory.available,
        "memory_total_bytes": memory.total,
        "gpus": gpus,
        "gpu_error": gpu_error,
    }


def gpu_stats() -> tuple[list[dict[str, Any]], str | None]:
    """(one dict per GPU, None) or ([], why there are none)."""
    nvml = _nvml()
    if nvml is None:
        return [], _NVML["error"]
    try:
        return [_one_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())], None
    except nvml.NVMLError as exc:
        return [], f"NVML: {exc}"


# NVML is initialised once per process and kept: nvmlInit can take tens of milliseconds,
# too long to pay every second inside the serve loop.
_NVML: dict[str, Any] = {"module": None, "error": None}


def _nvml() -> Any:
    if _NVML["module"] is None and _NVML["error"] is None:
        try:
            import pynvml
        except ImportError:
            _NVML["error"] = "nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            _NVML["error"] = f"no NVIDIA driver: {exc}"
            return None
        _NVML["module"] = pynvml
    return _NVML["module"]


def _one_gpu(pynvml: Any, index: int) -> dict[str, Any]:
    """One GPU's figures. Only its handle must answer: a MIG instance or a vGPU does not
    report utilisation (NVML: Not Supported), and that must not hide the GPU itself (device
    choice, a surge rotation's free memory) as one failed query would."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _query(pynvml, pynvml.nvmlDeviceGetName, handle)
    memory = _query(pynvml, pynvml.nvmlDeviceGetMemoryInfo, handle)
    util = _query(pynvml, pynvml.nvmlDeviceGetUtilizationRates, handle)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else (name or f"GPU {index}"),
        "load_percent": None if util is None else float(util.gpu),
        "memory_used_bytes": 0 if memory is None else int(memory.used),
        "memory_total_bytes": 0 if memory is None else int(memory.total),
    }


def _query(pynvml: Any, call: Any, handle: Any) -> Any:
    """One NVML query; None where this GPU does not answer it."""
    try:
        return call(handle)
    except pynvml.NVMLError:
        return None
