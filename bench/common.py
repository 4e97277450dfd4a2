"""What every benchmark here shares: timing, the run's context and writing the results."""

import json
import os
import platform
import time
from pathlib import Path


def per_call_ms(function, runs: int) -> float:
    """Best of 5 batches of ``runs`` calls: the least disturbed by the machine's other work."""
    function()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(runs):
            function()
        best = min(best, (time.perf_counter() - start) / runs)
    return best * 1000


def write_results(path: Path | None, results: dict) -> None:
    """Write the results as JSON, if a path was given (the README quotes these files)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def context() -> dict:
    """When and where a run happened, with the load it shared the machine with: timings on a
    busy 2-core machine mean little without it."""
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "load_average_1min_at_start": os.getloadavg()[0]}


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that a process and its children have used so far, from /proc
    (Linux): minipacs's sandboxed renderers are children of Orthanc's process. Children that
    have ended count through their parent's cutime and cstime."""
    fields = _stat(pid)
    ticks = sum(int(fields[k]) for k in (11, 12, 13, 14))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                child = _stat(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if child[1] == str(pid):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")
