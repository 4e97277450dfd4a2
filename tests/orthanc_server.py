"""A real Orthanc with the minipacs plugin, on free loopback ports, for the tests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import requests

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")


# storescu's option that proposes a file's (compressed) transfer syntax.
_STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.4.50": "--propose-jpeg8",
    "1.2.840.10008.1.2.4.51": "--propose-jpeg12",
    "1.2.840.10008.1.2.4.57": "--propose-lossless",
    "1.2.840.10008.1.2.4.70": "--propose-lossless",
    "1.2.840.10008.1.2.4.80": "--propose-jls-lossless",
    "1.2.840.10008.1.2.4.81": "--propose-jls-lossy",
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.91": "--propose-j2k-lossy",
    "1.2.840.10008.1.2.5": "--propose-rle",
    "1.2.840.10008.1.2.1.99": "--propose-deflated",
}


def _transfer_syntax(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """Start/stop one Orthanc process whose storage and minipacs data live in ``workdir``."""

    def __init__(self, workdir: Path, **overrides):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.aet = "MINIPACS"
        self.data = self.workdir / "minipacs"
        self.config = {
            "Name": "minipacs-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,  # as orthanc.json: the clients are on this host
            "Plugins": [str(PLUGINS / "libOrthancPython.so"), str(PLUGINS / "libOrthancDicomWeb.so")],
            "PythonScript": str(ROOT / "plugin" / "minipacs_plugin.py"),
            "UserMetadata": {"MiniPacsAnomalyScore": 4301, "MiniPacsFlagged": 4302,
                             "MiniPacsAnomalyReason": 4303},
            "MiniPacs": {"DataDirectory": str(self.data)},
            **overrides,
        }
        self.log_path = self.workdir / "orthanc.log"
        self.session = requests.Session()
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "OrthancServer":
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        env = dict(os.environ)
        venv_site = subprocess.run(  # as minipacs.sh asks it, whatever the Python version
            [ROOT / ".venv" / "bin" / "python", "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip()
        env["PYTHONPATH"] = f"{venv_site}:{ROOT / 'plugin'}"
        self.process = subprocess.Popen([ORTHANC, str(config_path)], cwd=self.workdir, env=env,
                                        stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.session.get(self.url + "/system", timeout=2).status_code in (200, 401):
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM, as systemd and `docker stop` send; Orthanc's exit status (-9: killed)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # REST helpers ---------------------------------------------------------------------------

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def json(self, path: str):
        answer = self.get(path)
        answer.raise_for_status()
        return answer.json()

    def upload(self, data: bytes) -> requests.Response:
        return self.session.post(self.url + "/instances", data=data, timeout=60)

    def storescu(self, files: list[Path]) -> subprocess.CompletedProcess:
        """Send files over DICOM C-STORE with DCMTK's storescu, in their own transfer syntax.

        storescu proposes uncompressed syntaxes unless told otherwise, and cannot transcode
        compressed files, so the files go in one association per proposal option.
        """
        groups: dict[str, list[str]] = {}
        for path in files:
            option = _STORESCU_PROPOSAL.get(_transfer_syntax(path), "--propose-uncompr")
            groups.setdefault(option, []).append(str(path))
        outputs, code = [], 0
        for option, paths in groups.items():
            done = subprocess.run(["storescu", "--no-halt", option, "-aec", self.aet, "127.0.0.1",
                                   str(self.dicom_port), *paths],
                                  capture_output=True, text=True, timeout=300)
            code = code or done.returncode
            outputs.append(done.stderr)
        return subprocess.CompletedProcess(["storescu"], code, "", "".join(outputs))

    def wait_for_ingest(self, timeout: float = 300) -> dict:
        """Block until the plugin's worker has processed everything queued. Orthanc announces a
        new instance from its change thread, a little after the store has answered, so the
        worker must be found idle twice in a row, a poll apart."""
        deadline = time.monotonic() + timeout
        idle_before = False
        while True:
            stats = self.json("/minipacs/ingest")
            if stats["worker"]["idle"] and idle_before:
                return stats
            idle_before = stats["worker"]["idle"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest not idle after {timeout}s: {stats}")
            time.sleep(0.2)
