"""A small client of Orthanc's REST API (standard library only: it runs from the plugin's venv),
for the demo loader and the synthetic-data CLI, and for the plugin's metadata writes where
Orthanc checks revisions (its in-process API cannot send ``If-Match``)."""

import base64
import json
import ssl
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

    def _send(self, method: str, path: str, data: bytes | None = None,
              headers: dict[str, str] | None = None):
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={**self.headers, **(headers or {})})
        # Loopback to Orthanc itself: its certificate (SslEnabled) is its own, not a CA's.
        unverified = ssl._create_unverified_context() if self.url.startswith("https") else None
        return urllib.request.urlopen(req, timeout=30, context=unverified)

    def revised(self, method: str, path: str, data: bytes | None = None, tries: int = 3) -> None:
        """PUT or DELETE a metadata with Orthanc's revisions (``CheckRevisions``): ``If-Match``
        the current revision where there is one, asked again when another writer came first."""
        for attempt in range(tries):
            headers = {}
            try:
                with self._send("GET", path) as current:
                    headers["If-Match"] = current.headers.get("ETag", "").strip('"')
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                if method == "DELETE":  # nothing to delete
                    return
            try:
                self._send(method, path, data, headers).close()
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 409 or attempt == tries - 1:  # 409: a newer revision came first
                    raise

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
