"""What this machine offers the engines: its CPU's features and how many cores a process may use.

Read from Linux's ``/proc`` and cgroup files; elsewhere the answers fall back to what Python
knows (``os.cpu_count()``) and to "no bf16".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# CPU features that decide which kernels (and so which answers) a variant gets.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8")  # fmt: skip


# oneDNN's own cap on the instructions its kernels use (Paddle's and OpenVINO's CPU kernels), set
# to work around a kernel's fault: below AVX512_CORE_BF16 bf16 runs on reference kernels
# (OpenVINO's crashed), as absent as on a CPU without it.
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                      "AVX512_CORE_VNNI"}  # fmt: skip


def isa_cap() -> str | None:
    """oneDNN's instruction-set cap from the environment, if any (``AVX2``...)."""
    for variable in ISA_CAP_VARIABLES:
        if value := os.environ.get(variable, "").strip().upper():
            return value
    return None


def cpu_features() -> dict[str, Any]:
    """This CPU's model name and the flags that matter to the engines (recorded with figures),
    and oneDNN's instruction-set cap when one is set."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    features = {"model": model, "flags": [f for f in CPU_FEATURES if f in flags]}
    return features | ({"isa_cap": cap} if (cap := isa_cap()) else {})


def cpu_supports_bf16() -> bool:
    features = cpu_features()
    has_it = bool({"avx512_bf16", "amx_bf16"} & set(features["flags"]))
    return has_it and features.get("isa_cap") not in _CAPS_WITHOUT_BF16


def resolve_threads(threads: int | None) -> int:
    """A thread count as the settings and flags give it: 0 or None means every core."""
    return threads or default_threads()


def default_threads() -> int:
    """All cores this process may use: its CPU affinity (taskset, a container's cpuset), which
    ``os.cpu_count()`` ignores, and no more than its CPU quota, rounded up (``docker run --cpus
    2``, a Kubernetes CPU limit), which the affinity does not show: a container limited to 2 CPUs
    on a 64-core host would otherwise start 64 workers, each with its model."""
    affinity = hasattr(os, "sched_getaffinity")
    cores = (len(os.sched_getaffinity(0)) if affinity else os.cpu_count()) or 1
    quota = cpu_quota()
    return min(cores, max(1, math.ceil(quota))) if quota else cores


def cpu_quota(
    cgroups: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")
) -> float | None:
    """Cores' worth of CPU time this process's cgroup may use (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when unlimited or unknown. The cgroup's
    own folder first, then the mount's root: a container sees its own cgroup there."""
    try:
        memberships = [line.split(":", 2) for line in own.read_text().splitlines()]
    except OSError:
        return None
    for _, controllers, path in (m for m in memberships if len(m) == 3):
        if controllers == "":
            folders, files = [cgroups], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            folders = [cgroups / "cpu", cgroups / "cpu,cpuacct"]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for folder in [f / path.lstrip("/") for f in folders] + folders:
            try:  # v2 has "quota period" in one file ("max period": unlimited), v1 two files
                values = " ".join((folder / name).read_text().strip() for name in files).split()
                quota, period = float(values[0]), float(values[1])
            except (OSError, ValueError, IndexError):
                continue
            return quota / period if quota > 0 and period > 0 else None
    return None


def cores_free(cores: int, loadavg: str = "/proc/loadavg") -> bool:
    """Whether no more threads are runnable on the machine right now than it has ``cores``, the
    caller included (``/proc/loadavg``'s run queue, a snapshot). A lone image takes every core
    only then: once another worker is busy its second thread would wait for a core while both
    engines' threads spin, and a few requests wait 3–5× the median (docs/benchmarks.md). A CPU
    average over a window cannot tell: at 1 client the two workers take turns, each half busy.
    Without ``/proc`` (not Linux): True, every lone image on every core."""
    try:
        with open(loadavg) as file:
            running = int(file.read().split()[3].partition("/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running <= cores
