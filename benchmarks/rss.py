"""Peak memory of one stage run as a child process (the memory benchmarks share it)."""

import os
import subprocess
import time
from pathlib import Path


def run_child(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run `command`; return (peak RSS in MiB, wall seconds) of that child alone; raise if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own rusage (getrusage(RUSAGE_CHILDREN) would mix all children).
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB
