"""A small client of Orthanc's REST API (standard library only: it runs from the plugin's venv),
for the demo loader and the synthetic-data CLI."""

import base64
import json
import time
import urllib.error
import urllib.request


class Orthanc:
    """The few calls of Orthanc's REST API the command-line tools need."""

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

    def wait_for_ingest(self, seconds: float) -> dict:
        """Wait until the minipacs worker has caught up; return ``/minipacs/ingest``."""
        deadline = time.monotonic() + seconds
        while True:
            stats = self.request("/minipacs/ingest")
            if stats["worker"]["idle"] or time.monotonic() > deadline:
                return stats
            time.sleep(0.25)
