"""Scoring benchmark: what the anomaly model adds per image, and its throughput in batches.

    .venv/bin/python bench/scoring.py [--model PATH] [--json PATH]

Measured on synthetic 512×512 CT slices rendered by minipacs; preprocessing is included, since
the plugin pays for it too. Target: ≤ 3 ms per image, batch of one.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "bench")]

from minipacs import synth  # noqa: E402
from minipacs.config import DEFAULT_MODEL  # noqa: E402
from minipacs.render import render  # noqa: E402
from minipacs.scoring import Scorer  # noqa: E402
from common import per_call_ms, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scorer = Scorer(args.model)
    images = [render(ds).pixels for ds in synth.generate(1, seed=5, size=512, slices=8, anomalies=0)
              if ds.Modality == "CT"][:32]
    one = per_call_ms(lambda: scorer.score(images[0]), args.runs)
    batch = per_call_ms(lambda: scorer.scores(images), max(1, args.runs // 10))
    results = {"model": scorer.info.version, "input_size": scorer.info.input_size,
               "image": list(images[0].shape), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, Python {platform.python_version()}",
               "ms_per_image_batch_of_1": one, "ms_per_batch_of_32": batch,
               "images_per_s_batch_of_32": 32 / batch * 1000}
    print(f"scoring benchmark: model {scorer.info.version} ({scorer.info.input_size}px input)")
    print(f"  batch of 1:  {one:7.3f} ms per image (target <= 3 ms)")
    print(f"  batch of 32: {batch / 32:7.3f} ms per image, {results['images_per_s_batch_of_32']:.0f} images/s")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
