"""Every benchmark in one command, then one table of the results against their targets.

Each benchmark runs in a process of its own and writes its JSON into one folder; the table is
also written there, as summary.json.

    ./minipacs.sh bench [--only NAME ...] [--quick] [--out DIR]   (installs both venvs first)
    .venv/bin/python bench/run_all.py [the same options]

``--quick`` runs small sizes, to try the command out: its numbers mean little, so they go to a
new temporary folder unless ``--out`` is given, never over the results the README quotes.
A benchmark that fails is reported as such and the others still run; the exit status is 1 then.
With ``--only``, the table still lists the other benchmarks' last results found in the folder.
png_options.py writes no JSON (it compares encoders by eye) and is not run here.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
TRAINING_PYTHON = ROOT / ".venv-training" / "bin" / "python"

Row = tuple[str, str, str, bool | None]  # benchmark, result, target, met (None: no target)


def render_rows(r: dict) -> list[Row]:
    ratio = r["decode_voi_png_over_zlib_floor"]
    return [("render: decode + VOI + PNG of a 512×512 CT / zlib floor", f"{ratio:.2f}×", "≤ 2×",
             ratio <= 2)]


def scoring_rows(r: dict) -> list[Row]:
    ms = r["ms_per_image_batch_of_1"]
    return [("scoring, batch of one (preprocessing included)", f"{ms:.2f} ms per image", "≤ 3 ms",
             ms <= 3)]


def ingest_rows(r: dict) -> list[Row]:
    upload, end_to_end = r["upload_ratio"], r["end_to_end_ratio"]
    return [(f"ingest, {r['instances']} CT: upload rate with minipacs / bare Orthanc "
             f"(median of {len(r['rounds'])} rounds)",
             f"{upload:.2f} ({r['plugin_upload_per_s']:.0f}/s vs {r['bare_upload_per_s']:.0f}/s)",
             "≥ 0.9", upload >= 0.9),
            ("ingest, end to end (rendered, scored, indexed) / bare upload rate",
             f"{end_to_end:.2f} ({r['plugin_end_to_end_per_s']:.0f}/s)", "≥ 0.6", end_to_end >= 0.6),
            ("ingest with DeferWhileStoring 0: upload / end-to-end ratios",
             f"{r['no_defer_upload_ratio']:.2f} / {r['no_defer_end_to_end_ratio']:.2f}", "—", None),
            ("ingest, after the upload (minipacs catching up): CPU per instance, cores busy",
             f"{r['cpu_ms_per_instance_after_upload']:.2f} ms, {r['cores_busy_after_upload']:.2f}", "—", None),
            ("ingest, Orthanc's CPU per instance during the upload, with minipacs / bare; the "
             "clients'", f"{r['upload_cpu_ms_per_instance']:.2f} / {r['bare_upload_cpu_ms_per_instance']:.2f} ms; "
             f"{r['clients_cpu_ms_per_instance']:.2f} ms", "—", None),
            ("ingest, end to end at most, were every core busy throughout (CPU bound)",
             f"{r['end_to_end_bound_all_cores_busy']:.2f}", "—", None),
            *[(f"ingest without {part.replace('_', ' ')}: CPU per instance after the upload, "
               "end-to-end ratio", f"{r[f'without_{part}_cpu_ms_per_instance_after_upload']:.2f} ms, "
               f"{r[f'without_{part}_end_to_end_ratio']:.2f}", "—", None)
              for part in ("publishing", "model", "sandbox") if f"without_{part}_end_to_end_ratio" in r]]


def cluster_rows(r: dict) -> list[Row]:
    one, two = r["one_node_postgresql"], r["two_nodes_postgresql"]
    stores = r["png_store"]
    return [(f"cluster, {r['instances']} CT: end to end on one / two PostgreSQL nodes / one SQLite node",
             f"{one['end_to_end_per_s']:.0f} / {two['end_to_end_per_s']:.0f} / "
             f"{r['one_node_sqlite']['end_to_end_per_s']:.0f} per s", "—", None),
            ("cluster: upload with minipacs / bare Orthanc, both on PostgreSQL (one node, two)",
             f"{r['one_node_postgresql_upload_ratio_to_bare_postgresql']:.2f}, "
             f"{r['two_nodes_postgresql_upload_ratio_to_bare_postgresql']:.2f}", "—", None),
            ("cluster: every instance written once (one node, two)",
             f"{one['written_once']}, {two['written_once']}", "true", one["written_once"] and two["written_once"]),
            ("cluster: PNG write / read as file vs PostgreSQL bytea (ms)",
             f"{stores['file_write_ms']:.2f} / {stores['file_read_ms']:.2f} vs "
             f"{stores['bytea_write_ms']:.2f} / {stores['bytea_read_ms']:.2f}", "—", None)]


def stages_rows(r: dict) -> list[Row]:
    stages = ", ".join(f"{name} {ms:.2f}" for name, ms in r["stages_ms"].items())
    return [("ingest pipeline per 512×512 CT, one thread (ms)", f"{r['total_ms']:.2f}: {stages}; "
             f"an empty file costs {r['empty_file_create_ms']:.2f} to create here", "—", None)]


def latency_rows(r: dict) -> list[Row]:
    ms = r["latency_ms"]
    return [(f"ingest-to-verdict latency, {r['instances']} CT at {r['rate_asked_per_s']:g}/s",
             f"p50 {ms['p50']:.0f} ms, p99 {ms['p99']:.0f} ms, max {ms['max']:.0f} ms "
             f"({r['rate_achieved_per_s']:.1f}/s sent)", "—", None)]


def routes_rows(r: dict) -> list[Row]:
    ours = {name: s for name, s in r["routes"].items() if not name.startswith("Orthanc")}
    slowest = max(ours, key=lambda name: ours[name]["p99_ms"])
    return [(f"routes over {r['counts']['images']:,} images: p99 of the slowest minipacs route",
             f"{ours[slowest]['p99_ms']:.1f} ms ({slowest})",
             f"≤ Orthanc /patients/{{id}} ({r['target_p99_ms']:.1f} ms)", not r["slower_than_target"])]


def windows_rows(r: dict) -> list[Row]:
    sizes = r["by_fraction_of_width"]
    cells = ", ".join(f"{float(k):.0%}: {v['network']:.2f} → {v['with_checks']:.2f} → "
                      f"{v.get('with_window_head', v['with_checks']):.2f}" for k, v in sizes.items() if float(k) <= 0.2)
    worst = max(c["ms"] for c in r["window_box_ms"].values())
    return [("small dialogs flagged: network alone → with the window check → with the window head", cells, "—", None),
             ("window check per image (slowest real host)", f"{worst:.2f} ms", "—", None)]


def training_rows(r: dict) -> list[Row]:
    steady, frozen = r["images_per_s_after_first"], r.get("frozen_features_images_per_s")
    return [(f"training, {r['architecture']} at {r['input_size']}px, batch {r['batch_size']}",
             (f"frozen features {frozen:.0f} images/s once, then " if frozen else "")
             + (f"{steady:.0f} images/s per epoch" if steady else "one epoch only")
             + f" (first epoch, with tracing: {r['images_per_s_first_epoch']:.0f})", "—", None)]


def memory_rows(r: dict) -> list[Row]:
    return [("memory: Orthanc RSS growth after warm-up, minipacs / without it",
             f"{r['minipacs_routes_mb_per_10000']:+.1f} / {r['trivial_python_callback_mb_per_10000']:+.1f} MB "
             f"per 10,000 route calls (a trivial Python callback), "
             f"{r['minipacs_ingests_mb_per_1000']:+.1f} / {r['bare_orthanc_ingests_mb_per_1000']:+.1f} MB "
             f"per 1,000 ingests (bare Orthanc)", "—", None)]


@dataclass(frozen=True)
class Bench:
    script: str
    full: tuple[str, ...]  # the arguments of a run whose numbers are quoted
    quick: tuple[str, ...]
    rows: Callable[[dict], list[Row]]
    python: Path = PYTHON


BENCHES = {
    "render": Bench("render.py", (), ("--runs", "5"), render_rows),
    "scoring": Bench("scoring.py", (), ("--runs", "10"), scoring_rows),
    "ingest": Bench("ingest.py", ("--breakdown",), ("--instances", "50", "--rounds", "1", "--breakdown"),
                    ingest_rows),
    "cluster": Bench("cluster.py", (), ("--instances", "40"), cluster_rows),
    "stages": Bench("stages.py", (), ("--instances", "32"), stages_rows),
    "latency": Bench("latency.py", (), ("--rate", "10", "--seconds", "3"), latency_rows),
    "routes": Bench("routes.py", (), ("--images", "20000", "--patients", "200", "--requests", "50"),
                    routes_rows),
    "windows": Bench("windows.py", (), ("--per-size", "2"), windows_rows),
    "training": Bench("training.py", (), ("--images", "256", "--epochs", "2"), training_rows,
                      TRAINING_PYTHON),
    "memory": Bench("memory.py", ("--calls", "100000", "--ingests", "10000"),
                    ("--calls", "600", "--ingests", "50"), memory_rows),
}


def run(name: str, bench: Bench, quick: bool, out: Path) -> tuple[list[Row], bool]:
    """Run one benchmark; its summary rows, and whether it failed."""
    script = ROOT / "bench" / bench.script
    if not script.exists():
        return [(name, f"skipped: bench/{bench.script} does not exist yet", "", None)], False
    path = out / f"{name}.json"
    path.unlink(missing_ok=True)  # a failed run must not leave an older result to be summarised
    command = [str(bench.python), str(script), *(bench.quick if quick else bench.full), "--json", str(path)]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code != 0 or not path.exists():
        return [(name, f"FAILED (exit status {code})", "", False)], True
    return bench.rows(json.loads(path.read_text())), False


def table(rows: list[Row]) -> str:
    lines = [("benchmark", "result", "target", "met?")] + [
        (b, result, target, {True: "yes", False: "NO", None: "—"}[met]) for b, result, target, met in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME",
                        help=f"run only these: {', '.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the command out")
    parser.add_argument("--out", type=Path, help=f"where the JSON files go (default "
                        f"{RESULTS.relative_to(ROOT)}, or a temporary folder with --quick)")
    args = parser.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="minipacs-bench-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name, bench in BENCHES.items():
        if args.only and name not in args.only:  # the table still shows its last result, if any
            earlier = out / f"{name}.json"
            rows += bench.rows(json.loads(earlier.read_text())) if earlier.exists() else []
            continue
        bench_rows, bench_failed = run(name, bench, args.quick, out)
        rows += bench_rows
        failed += [name] * bench_failed
    summary = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "failed": failed,
               "rows": [dict(zip(("benchmark", "result", "target", "met"), row)) for row in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"\n{table(rows)}\n\nJSON in {out}" + (" (--quick: small sizes)" if args.quick else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
