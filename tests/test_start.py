"""The README's start command, end to end: Orthanc + minipacs come up with the demo archive."""

import json
import os
import signal
import subprocess
import time

import requests

from orthanc_server import ROOT, free_port


def test_start_command_serves_the_demo_archive(tmp_path):
    config = json.loads((ROOT / "orthanc.json").read_text())
    port = free_port()
    config.update(HttpPort=port, DicomPort=free_port(), StorageDirectory=str(tmp_path / "orthanc"),
                  IndexDirectory=str(tmp_path / "orthanc"))
    config["MiniPacs"]["DataDirectory"] = str(tmp_path / "minipacs")
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / "start.log", "w+")
    start = subprocess.Popen([str(ROOT / "minipacs.sh"), "start", str(path)], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in (tmp_path / "start.log").read_text():
            assert start.poll() is None, (tmp_path / "start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "start.log").read_text()[-3000:]
            time.sleep(0.5)
        patients = requests.get(f"{url}/minipacs/patients/count", timeout=10).json()["count"]
        assert patients == 4 == requests.get(f"{url}/statistics", timeout=10).json()["CountPatients"]
        statuses = requests.get(f"{url}/minipacs/ingest", timeout=10).json()["statuses"]
        assert statuses["rendered"] == requests.get(f"{url}/statistics").json()["CountInstances"]
        assert "demo: " in (tmp_path / "start.log").read_text()
        # Only this host may connect (RemoteAccessAllowed false): gzip would cost time, save none.
        page = requests.get(f"{url}/minipacs/images", headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert page.ok and "Content-Encoding" not in page.headers and len(page.content) > 2000
    finally:
        os.killpg(start.pid, signal.SIGINT)
        start.wait(60)
    # Ctrl-C stops Orthanc too.
    try:
        requests.get(f"{url}/system", timeout=2)
        raise AssertionError("Orthanc still answers after the start command was stopped")
    except requests.ConnectionError:
        pass


def test_demo_loads_only_into_an_empty_archive(tmp_path):
    from orthanc_server import OrthancServer

    server = OrthancServer(tmp_path).start()
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
        python = str(ROOT / ".venv" / "bin" / "python")
        first = subprocess.run([python, "-m", "minipacs.demo", "--url", server.url, "--if-empty"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        counts = server.json("/minipacs/counts")
        assert counts["patients"] == 4 and counts["images"] > 50
        second = subprocess.run([python, "-m", "minipacs.demo", "--url", server.url, "--if-empty"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert "not empty" in second.stderr and server.json("/minipacs/counts") == counts
    finally:
        server.stop()
