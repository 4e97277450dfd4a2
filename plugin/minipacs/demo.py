"""Load demo data into a running Orthanc: ``python -m minipacs.demo --url http://localhost:8042``.

The demo archive is pydicom's own test corpus (real DICOM of many modalities, encodings and
deliberately broken files), so a newcomer sees rendered images, objects without pixels and
recorded failures at once. Uses only the standard library: it runs from the plugin's venv.
"""

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom.data


def demo_files() -> list[Path]:
    return sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


class Orthanc:
    """The few calls of Orthanc's REST API the loader needs."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {}
        if user:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(self, path: str, data: bytes | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                     method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=60) as answer:
            return json.loads(answer.read())

    def wait_until_up(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.request("/system")
                return
            except (urllib.error.URLError, ConnectionError) as exc:
                if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)


def load(orthanc: Orthanc, files: list[Path]) -> tuple[int, int]:
    """Upload files over REST; return (accepted, rejected): Orthanc refuses non-DICOM files."""
    accepted = rejected = 0
    for path in files:
        try:
            orthanc.request("/instances", path.read_bytes())
            accepted += 1
        except urllib.error.HTTPError:
            rejected += 1
    return accepted, rejected


def wait_for_ingest(orthanc: Orthanc, seconds: float) -> dict:
    """Wait until the minipacs worker has caught up; return its stats."""
    deadline = time.monotonic() + seconds
    while True:
        stats = orthanc.request("/minipacs/ingest")
        if stats["worker"]["idle"] or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


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
    orthanc.wait_until_up(args.wait)
    if args.if_empty and orthanc.request("/statistics")["CountInstances"] > 0:
        print("minipacs demo: the archive is not empty; nothing loaded", file=sys.stderr)
        return 0
    accepted, rejected = load(orthanc, demo_files())
    stats = wait_for_ingest(orthanc, 120)
    counts = orthanc.request("/minipacs/counts")
    print(f"minipacs demo: {accepted} files stored, {rejected} refused by Orthanc; index: "
          f"{json.dumps(counts)}; statuses: {json.dumps(stats['statuses'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
