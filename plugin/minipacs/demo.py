"""Load the demo archive into a running Orthanc: ``python -m minipacs.demo --url URL``.

A few synthetic patients (chest CT, MR, CR/DX; see :mod:`minipacs.synth`) with one anomalous
instance in most of them, so a newcomer sees rendered series and the kinds of images minipacs
is there to catch. Uses only the standard library and the plugin's own dependencies.
"""

import argparse
import json
import os
import sys
import urllib.error

from . import synth
from .client import Orthanc

PATIENTS, SEED, SLICES, ANOMALIES = 4, 2026, 12, 0.75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8042")
    parser.add_argument("--user", default=os.environ.get("MINIPACS_USER"),
                        help="Orthanc user, if authentication is on (default: $MINIPACS_USER)")
    parser.add_argument("--password", default=os.environ.get("MINIPACS_PASSWORD"),
                        help="(default: $MINIPACS_PASSWORD)")
    parser.add_argument("--if-empty", action="store_true",
                        help="do nothing if Orthanc already holds instances")
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for Orthanc")
    args = parser.parse_args(argv)
    orthanc = Orthanc(args.url, args.user, args.password)
    try:
        orthanc.wait_until_up(args.wait)
        if args.if_empty and orthanc.request("/statistics")["CountInstances"] > 0:
            print("minipacs demo: the archive is not empty; nothing loaded", file=sys.stderr)
            return 0
        count = 0
        for ds in synth.generate(PATIENTS, SEED, slices=SLICES, anomalies=ANOMALIES):
            orthanc.request("/instances", synth.encode(ds))
            count += 1
        stats = orthanc.wait_for_ingest(120)
        counts = orthanc.request("/minipacs/counts")
    except urllib.error.URLError as exc:
        print(f"minipacs demo: {exc}", file=sys.stderr)
        return 1
    print(f"minipacs demo: {count} synthetic instances stored; index: {json.dumps(counts)}; "
          f"statuses: {json.dumps(stats['statuses'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
