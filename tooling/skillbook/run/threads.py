"""How many torch/OpenMP threads a run uses: the cores free right now, unless the user chose.

Two threads on two cores that another job also uses run the tiny model's training 6.5x slower than
one thread (20 steps: 31.7 s vs 4.8 s): OpenMP threads spin at every barrier waiting for a sibling that
lost its core. So a run samples how busy the cores it may use are (a quarter second of /proc/stat,
minus this process's own time) and takes the free ones. OMP_NUM_THREADS, when set, always wins;
torchrun sets it to 1 per worker when it starts several.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

SAMPLE_SECONDS = 0.25
CHOSEN_ENV = "SKILLBOOK_CHOSEN_THREADS"  # marks an OMP_NUM_THREADS that apply() set, not the user


class ThreadChoice(NamedTuple):
    threads: int
    reason: str


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_ticks(cores: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over `cores`, from /proc/stat; None off Linux."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores}
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def _own_ticks() -> int:
    """This process's user + system clock ticks, all its threads together."""
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def busy_elsewhere(cores: list[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of `cores` other processes keep busy, sampled over `seconds`; None where unmeasurable."""
    before = _cpu_ticks(cores)
    if before is None:
        return None
    own_before = _own_ticks()
    time.sleep(seconds)
    after = _cpu_ticks(cores)
    if after is None or after[1] <= before[1]:
        return None
    busy = after[0] - before[0] - (_own_ticks() - own_before)
    return max(0.0, busy / (after[1] - before[1]) * len(cores))


def choose_threads(environ: dict | None = None, busy: float | None = -1.0) -> ThreadChoice:
    """The thread count for a run and why. `busy` (cores used by others) is measured unless given."""
    env = os.environ if environ is None else environ
    cores = usable_cores()
    user = env.get("OMP_NUM_THREADS", "").strip()
    if user and user != env.get(CHOSEN_ENV):
        if user.isdigit() and int(user) > 0:
            return ThreadChoice(int(user), f"OMP_NUM_THREADS={user}")
        return ThreadChoice(len(cores), f"OMP_NUM_THREADS={user!r} is not a positive integer; ignored")
    if busy == -1.0:
        busy = busy_elsewhere(cores)
    if busy is None:
        return ThreadChoice(len(cores), f"{len(cores)} usable cores (load not measurable here)")
    free = max(1, min(len(cores), round(len(cores) - busy)))
    why = f"{len(cores)} usable cores, {busy:.1f} busy with other work"
    return ThreadChoice(free, why + "; set OMP_NUM_THREADS to choose" if free < len(cores) else why)


def apply(choice: ThreadChoice) -> None:
    """Use `choice.threads` for torch's intra-op pool (loaded now if the environment has torch)."""
    if "torch" not in sys.modules:
        if "OMP_NUM_THREADS" not in os.environ or os.environ.get(CHOSEN_ENV) == os.environ["OMP_NUM_THREADS"]:
            os.environ["OMP_NUM_THREADS"] = os.environ[CHOSEN_ENV] = str(choice.threads)  # read when torch loads
        return
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
