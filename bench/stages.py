"""Where an instance's CPU goes: each stage of the ingest pipeline timed on its own, one thread,
over the synthetic 512×512 CT slices of bench/ingest.py, outside Orthanc.

    .venv/bin/python bench/stages.py [--instances 400] [--json PATH]

Beside the stages, the cost of creating an empty file in the same folder: the floor of writing
one PNG per instance on this disk (Orthanc pays it too, for its own copy of each file). This is
what bounds the end-to-end ingest ratio: see README, Performance.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "bench")]

from common import context, write_results  # noqa: E402
from ingest import ct_slices  # noqa: E402
from minipacs import ingest, render, worker  # noqa: E402
from minipacs.config import DEFAULT_MODEL  # noqa: E402
from minipacs.index import Index  # noqa: E402
from minipacs.orthanc_ids import orthanc_ids  # noqa: E402
from minipacs.preprocess import batch  # noqa: E402
from minipacs.scoring import ModelSlot  # noqa: E402

class _NoOrthanc:
    """The files are well formed: describe() never has to ask Orthanc."""

    def ids(self, instance_id):
        raise AssertionError(f"{instance_id}: the synthetic files need no lookup")


def stage_ms(files: list[bytes], work: Path) -> dict[str, float]:
    """Milliseconds per instance of each stage, the whole run timed twice (the second kept)."""
    models = ModelSlot(DEFAULT_MODEL, None)
    models.try_load()
    index = Index(work / "index.sqlite")
    spent: dict[str, float] = {}

    def timed(stage, function, *args):
        start = time.perf_counter()
        result = function(*args)
        spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
        return result

    for run in range(2):
        spent.clear()
        shown, records = [], []
        for n, data in enumerate(files):
            ds = timed("parse (pydicom)", ingest.read_dataset, data)
            ids = orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            record = timed("hierarchy tags", ingest.describe, ds, ids.instance, _NoOrthanc())
            pixels = timed("decode + VOI", render.render, ds, 0, 0, None).pixels
            png = timed("PNG deflate", render.encode_png, pixels, 1)
            timed("PNG file", ingest.write_png, work / f"{run}-{n}.png", png)
            shown.append(pixels)
            record.image["status"] = "rendered"
            records.append(record)
            if len(shown) == worker.BATCH or n == len(files) - 1:
                scorer = models.scorer
                inputs = timed("preprocessing", batch, shown, scorer.info.input_size)
                timed("model (batches of 16)", scorer.session.run, None, {scorer.input_name: inputs})
                timed("index rows (batches of 16)", index.put_many, records)
                shown, records = [], []
    return {stage: 1000 * seconds / len(files) for stage, seconds in spent.items()}


def empty_file_ms(work: Path, count: int) -> float:
    start = time.perf_counter()
    for n in range(count):
        open(work / f"empty-{n}", "xb").close()
    return 1000 * (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    files = ct_slices(args.instances)
    with tempfile.TemporaryDirectory() as work:  # the disk bench/ingest.py's servers use
        stages = stage_ms(files, Path(work))
        create = empty_file_ms(Path(work), args.instances)
    total = sum(stages.values())
    results = {**context(), "instances": len(files), "stages_ms": stages, "total_ms": total,
               "empty_file_create_ms": create}
    print(f"ingest stages, one thread, {len(files)} CT 512×512 (ms per instance):")
    for stage, ms in stages.items():
        print(f"  {stage:26s} {ms:6.2f}")
    print(f"  {'total':26s} {total:6.2f}\n  creating an empty file on this disk: {create:.2f} ms")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
