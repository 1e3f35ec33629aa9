"""The host allocator of a CPU run: glibc's malloc tuned to keep freed memory for reuse
(train.host_allocator=retain), so a train step's large buffers are not unmapped and faulted in again
every step."""
from __future__ import annotations

import ctypes
import os
import platform

RETAINED = False  # whether this process's heap is retained now (retain_host_memory)
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
RETAIN_TRIM_BYTES = 2**31 - 1  # the largest value mallopt takes (a C int): 2 GiB


def _glibc():
    """The process's C library through ctypes when it is glibc (the only one with these knobs), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
            return None
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def retain_host_memory(retain: bool = True) -> bool:
    """Make glibc keep freed host memory for reuse (``retain``), or go back to its stock behaviour.

    A CPU train step allocates and frees the same large buffers every step (a 50257 x 256 fp32
    gradient is 51 MB). glibc serves a block above its mmap threshold (at most 32 MiB) that no free
    heap chunk fits with a fresh mmap and unmaps it on free, so each step page-faults and the kernel
    zeroes those pages again; at V50257 that was 15 % of the step (README, Throughput). Retaining sets
    M_MMAP_MAX = 0 (the main arena serves every block from the heap; glibc still maps a block that
    another thread's arena cannot grow to) and M_TRIM_THRESHOLD = 2 GiB (the heap top is not returned
    to the system below that), so freed blocks are reused. The process's resident memory then stays
    near its peak instead of shrinking between steps; what it allocates does not change.

    ``retain=False`` approximates glibc's defaults as they stand once a process has warmed up: mmap
    for blocks above 32 MiB (the ceiling of glibc's sliding threshold; setting any of these parameters
    fixes it there), a trim threshold of twice that, and the free heap top trimmed now. Free chunks
    inside the heap stay there and keep serving blocks they fit, so a process that retained is not
    a fresh one again.

    Process-wide. Returns False, changing nothing, where the C library is not glibc (macOS, musl)."""
    global RETAINED
    libc = _glibc()
    if libc is None:
        return False
    RETAINED = retain
    if retain:
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_BYTES)
    else:
        ok = (libc.mallopt(M_MMAP_MAX, 65536) and libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
              and libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20))
        libc.malloc_trim(0)
    return bool(ok)


# A retained heap holds 1.5-1.8x a step's tensors (fragmentation: the next step's blocks do not
# fit the holes the last one left); 'auto' retains only where twice the step's peak fits.
RETAIN_HEADROOM = 2.0


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2: limit, usage
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))  # v1


def available_bytes(meminfo: str = "/proc/meminfo", cgroups=CGROUP_FILES) -> int | None:
    """What a new allocation can get without swapping (bytes): MemAvailable of /proc/meminfo, or less
    under a cgroup memory limit (a container, a Slurm or Kubernetes job: v2 memory.max - memory.current,
    v1 limit_in_bytes - usage_in_bytes); None where neither can be read (not Linux)."""
    found = []
    try:
        for line in open(meminfo):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in cgroups:
        try:
            found.append(max(0, int(open(limit).read().strip()) - int(open(usage).read().strip())))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            pass
    return min(found) if found else None


def choose_host_allocator(setting: str, peak_bytes: int, available: int | None) -> tuple[str, str | None]:
    """The host allocator a CPU run uses for ``train.host_allocator`` = ``setting`` ('auto', 'retain',
    'system'), given a lower bound on its step peak (bytes) and the memory available at its start
    (bytes; None: unknown). 'auto' is 'retain' unless RETAIN_HEADROOM x ``peak_bytes`` exceeds
    ``available`` (``peak_bytes`` times LOCAL_WORLD_SIZE under torchrun, whose ranks on one host share
    its memory): a retained heap can hold 1.5-1.8x a step's tensors (measured on the
    paper's shapes: benchmarks/results/README.md, "The paper's shapes"), which would turn a run that
    fits into one that runs out of memory. Returns (allocator, why) with ``why`` a line to log when
    'auto' chose 'system', else None."""
    if setting != "auto":
        return setting, None
    peak_bytes *= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's ranks on this host share it
    if available is None or RETAIN_HEADROOM * peak_bytes <= available:
        return "retain", None
    gb = 1e9
    return "system", (f"host allocator: system (train.host_allocator=auto): a retained heap could reach "
                      f"{RETAIN_HEADROOM:g} x this run's {peak_bytes / gb:.1f} GB step peak, more than the "
                      f"{available / gb:.1f} GB available; set train.host_allocator=retain to retain anyway")
