"""A real PostgreSQL from Debian's packages, in a temporary folder, on a free loopback port.

PostgreSQL refuses to run as root: as root (CI, containers), the cluster belongs to the
``postgres`` user that Debian's package creates, and its programs run through ``runuser``.
"""

import glob
import os
import shutil
import tempfile
import subprocess
import time
from pathlib import Path

from orthanc_server import free_port

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))


def available() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if not BINARIES:
        return "Debian's postgresql package is not installed (./minipacs.sh setup --dev installs it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser"
    return None


class PostgresServer:
    """A cluster in a folder of its own (owned by ``postgres`` where the tests run as root, so
    that no folder of the caller's needs opening), removed when stopped."""

    def __init__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="minipacs-pg-"))
        self.data = self.workdir / "data"
        self.port = free_port()
        self.bin = Path(BINARIES[-1])
        self.log_path = self.workdir / "postgres.log"
        self.process: subprocess.Popen | None = None

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def start(self, timeout: float = 60) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        subprocess.run(self._as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", "minipacs",
                                       "--auth=trust", "-E", "UTF8", "--locale=C"]),
                       check=True, capture_output=True)
        log = open(self.log_path, "ab")  # opened here: the log is the caller's to read
        self.process = subprocess.Popen(
            self._as_owner([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data}",
                            "-c", "max_connections=300", "-c", "fsync=off"]),
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://minipacs@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "minipacs", name], check=True, capture_output=True)
        return self.dsn(name)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # "smart" shutdown would wait for clients: fast one
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
