"""Ingest benchmark: the same synthetic 512×512 CT instances uploaded by parallel REST clients to
(a) bare Orthanc and (b) Orthanc with minipacs, in one run on one machine.

    .venv/bin/python bench/ingest.py [--instances 1000] [--clients 4] [--rounds 3] [--breakdown]
                                     [--json PATH]

Reports the upload throughput ratio b/a (does storing wait for minipacs?) and the end-to-end
rate of b, until every instance is rendered, scored and indexed, over a's upload rate; b runs
with the default DeferWhileStoring, then with 0 (rendering beside storing). Bare Orthanc's
own rate moves by ±10 % from one upload to the next on a shared 2-core machine, so ``--rounds``
rounds of (a, b, b with 0) run back to back and each ratio is the median of its rounds'. Once
b's upload has ended, the CPU time of Orthanc's process is minipacs's catching up: reported as
ms per instance and cores busy, the two numbers that bound the end-to-end ratio. Orthanc's CPU
per instance during the upload, with minipacs and bare, says what minipacs adds to storing
without the noise of the rates. With the CPU that bare Orthanc's upload costs (Orthanc's and
the clients'), the catching up gives the best end-to-end ratio the machine allows, were every
core busy from the first upload to the last verdict.
``--breakdown`` adds, to every round, minipacs in the configurations that leave out part of its
work (publishing flags into Orthanc, ``PublishToOrthanc`` none; scoring and so publishing too,
with no model; the sandbox, rendering in Orthanc's process): what each costs
inside Orthanc (its renderer processes included), and the end-to-end ratio left.
Targets: upload ratio ≥ 0.9, end-to-end ratio ≥ 0.6.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

from common import context, cpu_seconds, write_results  # noqa: E402
from minipacs import synth  # noqa: E402
from orthanc_server import PLUGINS, OrthancServer  # noqa: E402

CORES = os.cpu_count() or 1


def ct_slices(count: int) -> list[bytes]:
    files, first = [], 0
    while len(files) < count:
        files += [synth.encode(ds) for ds in synth.generate(1, seed=8, size=512, slices=40, first=first)
                  if ds.Modality == "CT" and not synth.anomaly_of(ds)]
        first += 1
    return files[:count]


def upload_all(url: str, files: list[bytes], clients: int) -> float:
    """Seconds to POST every file with ``clients`` parallel connections."""
    sessions = [requests.Session() for _ in range(clients)]

    def send(i: int) -> None:
        answer = sessions[i % clients].post(url + "/instances", data=files[i], timeout=120)
        if not answer.ok:  # Orthanc's answer says why
            raise RuntimeError(f"upload {i}: {answer.status_code} {answer.text[:1000]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(len(files))))
    return time.perf_counter() - start


def wait_until_processed(server: OrthancServer, count: int, timeout: float = 3600) -> None:
    """Until the worker has handled ``count`` instances, asked every 20 ms (the tests' idle check
    polls every 200 ms, which would add up to 0.4 s to a 5 s run)."""
    deadline = time.monotonic() + timeout
    while True:
        worker = server.json("/minipacs/ingest")["worker"]
        if worker["processed"] + worker["failed"] >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} instances not processed after {timeout} s: {worker}")
        time.sleep(0.02)


def wait_until_renderers(server: OrthancServer, count: int, timeout: float = 120) -> None:
    """Until minipacs's sandboxed renderers have started (at Orthanc's start, in the background):
    their start-up is a cost per Orthanc start, not per instance."""
    deadline = time.monotonic() + timeout
    while server.json("/minipacs/ingest")["worker"]["renderers"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} renderers not started after {timeout} s")
        time.sleep(0.05)


#: Configurations that leave out part of minipacs's work, each a supported one (see README).
WITHOUT = {"publishing": lambda config: config["MiniPacs"].update(PublishToOrthanc="none"),
           "model": lambda config: config["MiniPacs"].update(ModelPath=""),
           "sandbox": lambda config: config["MiniPacs"].update(Sandbox=False)}


def ingest_with_minipacs(work: Path, files: list[bytes], clients: int, defer: int | None,
                         without: str = "") -> tuple[float, float, str, dict]:
    """Seconds to upload, seconds until all is indexed, the model's version, and what Orthanc's
    process spent during the upload and after it, minipacs catching up (CPU ms per instance,
    cores busy). ``DeferWhileStoring`` is ``defer``, or minipacs's default where None;
    ``without`` names a part of the work left out (a key of ``WITHOUT``)."""
    plugin = OrthancServer(work)
    if defer is not None:
        plugin.config["MiniPacs"]["DeferWhileStoring"] = defer
    if without:
        WITHOUT[without](plugin.config)
    plugin.start()
    try:
        model = plugin.json("/minipacs/model").get("Version")
        if plugin.config["MiniPacs"].get("Sandbox", True):  # started once, not per instance
            wait_until_renderers(plugin, plugin.config["MiniPacs"].get("Workers", 2))
        cpu_before_upload, start = cpu_seconds(plugin.process.pid), time.perf_counter()
        upload_s = upload_all(plugin.url, files, clients)
        cpu_after_upload = cpu_seconds(plugin.process.pid)
        wait_until_processed(plugin, len(files))
        end_to_end_s = time.perf_counter() - start
        catch_up_cpu = cpu_seconds(plugin.process.pid) - cpu_after_upload
        assert plugin.json("/minipacs/counts")["images"] == len(files)
    finally:
        plugin.stop()
    after = {"upload_cpu_ms_per_instance": 1000 * (cpu_after_upload - cpu_before_upload) / len(files),
             "cpu_ms_per_instance_after_upload": 1000 * catch_up_cpu / len(files),
             "cores_busy_after_upload": catch_up_cpu / max(end_to_end_s - upload_s, 1e-9)}
    return upload_s, end_to_end_s, model, after


def own_cpu_seconds() -> float:
    """CPU time of this process (the REST clients' threads, during an upload)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bare_upload(work: Path, files: list[bytes], clients: int) -> tuple[float, float, float]:
    """Seconds to upload to bare Orthanc, and the CPU seconds that cost Orthanc and the clients."""
    bare = OrthancServer(work, Plugins=[str(PLUGINS / "libOrthancDicomWeb.so")])
    bare.config.pop("PythonScript")
    bare.start()
    try:
        orthanc_cpu, clients_cpu = cpu_seconds(bare.process.pid), own_cpu_seconds()
        upload_s = upload_all(bare.url, files, clients)
        return (upload_s, cpu_seconds(bare.process.pid) - orthanc_cpu,
                own_cpu_seconds() - clients_cpu)
    finally:
        bare.stop()


def one_round(work: Path, files: list[bytes], clients: int, breakdown: bool = False) -> dict:
    """Bare Orthanc, then minipacs with its default DeferWhileStoring and with 0 (rendering
    beside storing), and with ``breakdown`` without parts of its work, back to back: each ratio
    against the bare run of its own round."""
    bare_s, orthanc_cpu, clients_cpu = bare_upload(work / "bare", files, clients)
    n = len(files)
    result = {"bare_upload_per_s": n / bare_s,
              "bare_upload_cpu_ms_per_instance": 1000 * orthanc_cpu / n,
              "clients_cpu_ms_per_instance": 1000 * clients_cpu / n}
    for defer, prefix in ((None, ""), (0, "no_defer_")):
        upload_s, end_to_end_s, result["model"], after = ingest_with_minipacs(
            work / f"defer-{prefix or 'default'}", files, clients, defer)
        if defer is None:  # the catching up is all minipacs's
            result.update(after)
            # With every core busy from the first upload to the last verdict: the most CPU allows.
            cpu_s = orthanc_cpu + clients_cpu + after["cpu_ms_per_instance_after_upload"] * n / 1000
            result["end_to_end_bound_all_cores_busy"] = bare_s / (cpu_s / CORES)
        result.update({f"{prefix}upload_ratio": bare_s / upload_s,
                       f"{prefix}end_to_end_ratio": bare_s / end_to_end_s,
                       f"{prefix}plugin_upload_per_s": n / upload_s,
                       f"{prefix}plugin_end_to_end_per_s": n / end_to_end_s})
    for without in WITHOUT if breakdown else ():
        prefix = f"without_{without}_"
        upload_s, end_to_end_s, _, after = ingest_with_minipacs(work / prefix, files, clients, None,
                                                                without)
        result.update({f"{prefix}{key}": value for key, value in after.items()})
        result[f"{prefix}end_to_end_ratio"] = bare_s / end_to_end_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="also run without the score metadata, and without a model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = context()  # before the run adds its own load
    files = ct_slices(args.instances)
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            rounds.append(one_round(Path(work), files, args.clients, args.breakdown))
        print(f"  round {n + 1}: " + ", ".join(f"{key} {value:.2f}" for key, value in rounds[-1].items()
                                             if key.endswith("ratio")), flush=True)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "model"}
    results = {**run, "instances": len(files), "clients": args.clients, "model": rounds[0]["model"],
               **median, "rounds": rounds}
    print(f"ingest benchmark: {len(files)} CT 512×512 instances, {args.clients} REST clients, "
          f"model {results['model']}, median of {len(rounds)} rounds")
    print(f"  bare Orthanc upload     {results['bare_upload_per_s']:7.1f} /s")
    print(f"  with minipacs upload    {results['plugin_upload_per_s']:7.1f} /s   "
          f"ratio {results['upload_ratio']:.2f} (target >= 0.9)")
    print(f"  with minipacs end to end{results['plugin_end_to_end_per_s']:7.1f} /s   "
          f"ratio {results['end_to_end_ratio']:.2f} (target >= 0.6)")
    print(f"  DeferWhileStoring 0: upload ratio {results['no_defer_upload_ratio']:.2f}, "
          f"end to end {results['no_defer_end_to_end_ratio']:.2f}")
    print(f"  after the upload: {results['cpu_ms_per_instance_after_upload']:.2f} ms CPU per instance, "
          f"{results['cores_busy_after_upload']:.2f} cores busy")
    print(f"  during the upload, Orthanc's CPU per instance: {results['upload_cpu_ms_per_instance']:.2f} ms "
          f"with minipacs, {results['bare_upload_cpu_ms_per_instance']:.2f} ms bare; the clients' "
          f"{results['clients_cpu_ms_per_instance']:.2f} ms")
    print("  with every core busy from the first upload to the last verdict, end to end could "
          f"reach at most {results['end_to_end_bound_all_cores_busy']:.2f}")
    for without in WITHOUT if args.breakdown else ():
        prefix = f"without_{without}_"
        print(f"  without {without.replace('_', ' ')}: "
              f"{results[prefix + 'cpu_ms_per_instance_after_upload']:.2f} ms CPU per instance "
              f"after the upload, end to end {results[prefix + 'end_to_end_ratio']:.2f}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
