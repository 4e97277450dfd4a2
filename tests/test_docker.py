"""The Docker image, built from a clean clone and run read-only: healthy, demo data,
authentication, C-STORE, not root, a clean `docker stop`, nothing lost across containers on one
volume, and a rebuild after a code-only change that reuses every layer but the code's.

No registry is reachable here, so the base `debian:bookworm-slim` is made from Debian's packages
(`debootstrap --variant=minbase`, `docker import`), with this machine's CA certificates (a
TLS-inspecting proxy's included) so that pip and npm reach their registries during the build;
they stay in the test's base image, never in the shipped Dockerfile.
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from corpus import find
from orthanc_server import ROOT, free_port

DOCKER = "/usr/bin/docker"
BASE = "debian:bookworm-slim"
IMAGE = "minipacs:test"
PASSWORD = "test-secret"
CA_DIR = Path("/usr/local/share/ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """Docker's daemon: the one running, or one started here (as root, as CI runs)."""
    if not Path(DOCKER).exists() or not shutil.which("dockerd"):
        pytest.skip("Debian's docker.io is not installed (./minipacs.sh setup --dev installs it)")
    started = None
    if docker("info", check=False).returncode != 0:
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "w")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while docker("info", check=False).returncode != 0:
            if started.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"no Docker daemon can run here: dockerd exited {started.poll()}")
            time.sleep(1)
    yield
    if started is not None:
        started.terminate()
        started.wait(60)


def make_base(work: Path) -> None:
    """`debian:bookworm-slim` from Debian's packages, trusting what this machine trusts."""
    root = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root),
                    "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=1200)
    # What Debian's slim images leave out too: the package cache, documentation, translations.
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                   "usr/share/man", "usr/share/info", "usr/share/locale"):
        for leftover in (root / folder).glob("*"):
            if leftover.is_file():
                leftover.unlink()
            elif leftover.is_dir() and folder.startswith("usr/"):
                shutil.rmtree(leftover)
    extra = root / "usr/local/share/ca-certificates"
    extra.mkdir(parents=True, exist_ok=True)
    for cert in CA_DIR.glob("*.crt"):
        shutil.copy(cert, extra / cert.name)
    if CA_BUNDLE.exists():
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
    changes = [f"ENV {name}={CA_BUNDLE}" for name in
               ("PIP_CERT", "NODE_EXTRA_CA_CERTS", "npm_config_cafile", "SSL_CERT_FILE")]
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([DOCKER, "import", *[a for c in changes for a in ("--change", c)], "-", BASE],
                   stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(daemon, tmp_path_factory):
    work = tmp_path_factory.mktemp("docker")
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        make_base(work)
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    started = time.monotonic()
    docker("build", "-q", "-t", IMAGE, str(clone), timeout=1800)
    built_s = time.monotonic() - started
    # A code-only change: every layer before the code's comes from the cache.
    with open(clone / "plugin/minipacs/__init__.py", "a") as code:
        code.write("\n# a code-only change\n")
    started = time.monotonic()
    rebuild = docker("build", "-t", IMAGE, str(clone), timeout=900)
    rebuilt_s = time.monotonic() - started
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    yield {"size": size, "built_s": built_s, "rebuilt_s": rebuilt_s,
           "rebuild_log": rebuild.stdout + rebuild.stderr}
    docker("image", "rm", "-f", IMAGE, check=False)


class Container:
    def __init__(self, volume: str):
        self.http, self.dicom = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.name = f"minipacs-test-{self.http}"
        docker("run", "-d", "--name", self.name, "--health-interval", "2s", "--read-only",
               "-p", f"127.0.0.1:{self.http}:8042", "-p", f"127.0.0.1:{self.dicom}:4242",
               "-e", f"MINIPACS_PASSWORD={PASSWORD}", "-v", f"{volume}:/var/lib/minipacs", IMAGE)
        self.auth = ("minipacs", PASSWORD)

    def state(self, field: str) -> str:
        return docker("inspect", "-f", f"{{{{{field}}}}}", self.name).stdout.strip()

    def wait_healthy(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while self.state(".State.Health.Status") != "healthy":
            assert self.state(".State.Running") == "true", docker("logs", self.name).stderr[-3000:]
            assert time.monotonic() < deadline, docker("logs", self.name).stderr[-3000:]
            time.sleep(1)

    def json(self, path: str):
        answer = requests.get(self.url + path, auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def wait_for(self, images: int, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while not (self.json("/minipacs/counts")["images"] == images
                   and self.json("/minipacs/ingest")["worker"]["idle"]):
            assert time.monotonic() < deadline, self.json("/minipacs/ingest")
            time.sleep(1)

    def stop(self) -> int:
        docker("stop", "-t", "30", self.name, timeout=120)
        code = int(self.state(".State.ExitCode"))
        docker("rm", self.name)
        return code


def test_the_image_runs_keeps_its_data_and_stops_cleanly(image, capsys):
    with capsys.disabled():
        print(f"\nminipacs image: {image['size'] / 1e6:.0f} MB; built in {image['built_s']:.0f} s, "
              f"rebuilt after a code-only change in {image['rebuilt_s']:.1f} s")
    assert image["size"] <= 500e6, f"{image['size'] / 1e6:.0f} MB"
    steps = image["rebuild_log"].split("\nStep ")
    pip = next(step for step in steps if "pip install" in step)
    assert "Using cache" in pip, "a code-only change re-ran pip:\n" + image["rebuild_log"][-3000:]
    assert image["rebuilt_s"] <= 15
    volume = f"minipacs-test-{free_port()}"
    first = Container(volume)
    try:
        first.wait_healthy()
        assert requests.get(first.url + "/minipacs/counts", timeout=10).status_code == 401
        first.wait_for(164)  # the demo archive
        assert first.json("/minipacs/anomalies")["total"] >= 3
        assert docker("exec", first.name, "id", "-u").stdout.strip() != "0"
        sent = subprocess.run(["storescu", "-aec", "MINIPACS", "127.0.0.1", str(first.dicom),
                               str(find("CT_small.dcm"))], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        first.wait_for(165)
        counts = first.json("/minipacs/counts")
        assert first.json("/minipacs/ingest")["worker"]["renderers"] == 2
        logs = docker("logs", first.name).stderr + docker("logs", first.name).stdout
        assert "Traceback" not in logs and "disk I/O error" not in logs, logs[-3000:]
        assert first.stop() == 0, "docker stop must end the container with status 0"
        second = Container(volume)
        try:
            second.wait_healthy()
            second.wait_for(165)
            assert second.json("/minipacs/counts") == counts
            system = requests.get(second.url + "/system", auth=second.auth, timeout=10).json()
            assert system["Version"].startswith("1.10")
        finally:
            assert second.stop() == 0
    finally:
        docker("rm", "-f", first.name, check=False)
        docker("volume", "rm", "-f", volume, check=False)
