"""Memory benchmark: Orthanc's resident memory (the plugin's included) under many route calls
and many ingests. A leak shows as RSS growing with the number of calls.

    .venv/bin/python bench/memory.py [--calls 100000] [--ingests 10000] [--json PATH]
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

from common import write_results  # noqa: E402
from minipacs import synth  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402


def rss_mb(server: OrthancServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--ingests", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    samples = {"route_calls": [], "ingests": []}
    with tempfile.TemporaryDirectory() as work:
        server = OrthancServer(Path(work)).start()
        try:
            for ds in synth.generate(1, seed=9, size=64, slices=4):
                server.upload(synth.encode(ds))
            server.wait_for_ingest()
            sop = server.json("/minipacs/images?limit=1")["items"][0]["SOPInstanceUID"]
            routes = ["/minipacs/counts", "/minipacs/patients?limit=10", f"/minipacs/images/{sop}",
                      f"/minipacs/images/{sop}/png", "/minipacs/anomalies", "/minipacs/patients/nobody"]
            step = max(1, args.calls // 10)
            samples["route_calls"].append((0, rss_mb(server)))
            for done in range(1, args.calls + 1):
                server.get(routes[done % len(routes)])
                if done % step == 0:
                    samples["route_calls"].append((done, rss_mb(server)))
            # Ingests: small synthetic slices, so that the run measures the pipeline, not disk.
            made, step = 0, max(1, args.ingests // 10)
            samples["ingests"].append((0, rss_mb(server)))
            index = 100
            while made < args.ingests:
                for ds in synth.generate(1, seed=9, size=64, slices=40, first=index):
                    server.upload(synth.encode(ds))
                    made += 1
                    if made % step == 0:
                        server.wait_for_ingest()
                        samples["ingests"].append((made, rss_mb(server)))
                    if made >= args.ingests:
                        break
                index += 1
        finally:
            server.stop()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), **samples}
    for phase, points in samples.items():
        (first_n, first), (last_n, last) = points[1] if len(points) > 1 else points[0], points[-1]
        per_10k = (last - first) / max(1, last_n - first_n) * 10_000
        results[f"{phase}_mb_per_10k_after_warmup"] = per_10k
        print(f"{phase}: RSS {points[0][1]:.0f} MB at start, {first:.0f} MB after {first_n}, "
              f"{last:.0f} MB after {last_n}: {per_10k:+.1f} MB per 10,000 after warm-up")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
