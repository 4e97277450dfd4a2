"""Memory benchmark: Orthanc's resident memory (the plugin's included) under many route calls
and many ingests, beside the same load on Orthanc without minipacs, in one run.

    .venv/bin/python bench/memory.py [--calls 100000] [--ingests 10000] [--json PATH]

A leak shows as RSS growing with the number of calls. Orthanc grows by itself too (its index
and caches follow the archive; Debian's orthanc-python 4.0 keeps every request's arguments), so
each load is also run where minipacs is not: route calls against a Python callback that only
answers ``{"ok": 1}`` to the same URIs and against Orthanc's own ``/statistics``; ingests into
bare Orthanc.
minipacs's own growth is the difference.
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
from orthanc_server import PLUGINS, OrthancServer  # noqa: E402

# orthanc-python keeps more per request when the URI has groups and GET arguments, so the
# trivial callback gets the same URIs as minipacs's routes, under /trivial/.
TRIVIAL_CALLBACK = '''import orthanc
orthanc.RegisterRestCallback("/trivial/(.*)", lambda output, uri, **request:
                             output.AnswerBuffer(b'{"ok": 1}', "application/json"))
'''


def rss_mb(server: OrthancServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def sampled(server: OrthancServer, count: int, step) -> list[tuple[int, float]]:
    """RSS at the start and after each tenth of ``count`` calls of ``step(n)``."""
    every, points = max(1, count // 10), [(0, rss_mb(server))]
    for n in range(1, count + 1):
        step(n)
        if n % every == 0:
            points.append((n, rss_mb(server)))
    return points


def growth(points: list[tuple[int, float]], per: int) -> float:
    """MB per ``per`` calls after the first tenth (the warm-up fills caches and pools)."""
    (first_n, first), (last_n, last) = points[1] if len(points) > 2 else points[0], points[-1]
    return (last - first) / max(1, last_n - first_n) * per


def ingest_files(count: int) -> list[bytes]:
    """Small synthetic slices, so that the run measures the pipeline, not the disk."""
    files, first = [], 100
    while len(files) < count:
        files += [synth.encode(ds) for ds in synth.generate(1, seed=9, size=64, slices=40, first=first)]
        first += 1
    return files[:count]


def ingests(server: OrthancServer, files: list[bytes], plugin: bool) -> list[tuple[int, float]]:
    def step(n: int) -> None:
        server.upload(files[n - 1]).raise_for_status()
        if plugin and n % max(1, len(files) // 10) == 0:
            server.wait_for_ingest()  # sample once minipacs has caught up

    return sampled(server, len(files), step)


def calls(server: OrthancServer, paths: list[str], count: int) -> list[tuple[int, float]]:
    def step(n: int) -> None:
        answer = server.get(paths[n % len(paths)])
        assert answer.status_code < 500, answer.text  # 404 for an unknown patient is expected

    return sampled(server, count, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--ingests", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    files = ingest_files(args.ingests)
    samples = {}
    with tempfile.TemporaryDirectory() as work:
        server = OrthancServer(Path(work) / "minipacs").start()
        try:
            for data in ingest_files(4):
                server.upload(data)
            server.wait_for_ingest()
            sop = server.json("/minipacs/images?limit=1")["items"][0]["SOPInstanceUID"]
            routes = ["/minipacs/counts", "/minipacs/patients?limit=10", f"/minipacs/images/{sop}",
                      f"/minipacs/images/{sop}/png", "/minipacs/anomalies", "/minipacs/patients/nobody"]
            samples["minipacs_routes"] = calls(server, routes, args.calls)
            samples["orthanc_statistics"] = calls(server, ["/statistics"], args.calls)
            samples["minipacs_ingests"] = ingests(server, files, plugin=True)
        finally:
            server.stop()
        script = Path(work) / "trivial.py"
        script.write_text(TRIVIAL_CALLBACK)
        trivial = OrthancServer(Path(work) / "trivial", PythonScript=str(script)).start()
        try:
            samples["trivial_python_callback"] = calls(
                trivial, [route.replace("/minipacs/", "/trivial/") for route in routes], args.calls)
        finally:
            trivial.stop()
        bare = OrthancServer(Path(work) / "bare", Plugins=[str(PLUGINS / "libOrthancDicomWeb.so")])
        bare.config.pop("PythonScript")
        bare.start()
        try:
            samples["bare_orthanc_ingests"] = ingests(bare, files, plugin=False)
        finally:
            bare.stop()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
               "calls": args.calls, "ingests": args.ingests, "samples": samples}
    print(f"memory benchmark: {args.calls} calls per route load, {args.ingests} ingests per server")
    for name, points in samples.items():
        per, unit = (1_000, "1,000 ingests") if name.endswith("ingests") else (10_000, "10,000 calls")
        results[f"{name}_mb_per_{per}"] = growth(points, per)
        print(f"  {name:24s} RSS {points[0][1]:6.0f} → {points[-1][1]:6.0f} MB   "
              f"{results[f'{name}_mb_per_{per}']:+6.2f} MB per {unit} after warm-up")
    results["minipacs_own_ingest_mb_per_1000"] = (results["minipacs_ingests_mb_per_1000"]
                                                  - results["bare_orthanc_ingests_mb_per_1000"])
    results["minipacs_own_route_mb_per_10000"] = (results["minipacs_routes_mb_per_10000"]
                                                  - results["trivial_python_callback_mb_per_10000"])
    print(f"  minipacs's own growth: {results['minipacs_own_route_mb_per_10000']:+.2f} MB per 10,000 "
          f"route calls, {results['minipacs_own_ingest_mb_per_1000']:+.2f} MB per 1,000 ingests")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
