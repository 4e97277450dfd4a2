"""Hostile and unlucky conditions against a real Orthanc with minipacs: renderers that hit
their limits, full disks under the PNGs and under the index, deletions during ingest, and an
instance that never finishes rendering before Orthanc dies (the restart loop)."""

import io
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from minipacs import synth
from orthanc_server import PLUGINS, OrthancServer
from test_reliability import indexed_ids, same_as_orthanc, wait_until
from test_sandbox import noise_image


def rss_kb(server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def rows(server) -> dict[str, dict]:
    """The index's image rows by Orthanc ID."""
    found, offset = {}, 0
    while True:
        page = server.json(f"/minipacs/images?limit=1000&offset={offset}")
        found.update((item["OrthancID"], item) for item in page["items"])
        offset += 1000
        if offset >= page["total"]:
            return found


def slices(patients=2, slices=8, seed=21):
    return [synth.encode(ds) for ds in synth.generate(patients, seed=seed, size=256,
                                                      slices=slices, anomalies=0)]


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem to fill (tmpfs: root only, as CI runs)."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_limits_cost_one_instance_and_orthanc_stays_small(tmp_path):
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs"),
                                               "RendererMemoryLimit": 150}).start()
    try:
        before = rss_kb(server)
        big = server.upload(noise_image(6000)).json()["ID"]
        normal = [server.upload(data).json()["ID"] for data in slices(1, 4)]
        server.wait_for_ingest()
        indexed = rows(server)
        image = indexed[big]
        assert image["Status"] == "render_failed"
        assert "MemoryError" in image["StatusDetail"] or "memory limit" in image["StatusDetail"]
        assert all(indexed[i]["Status"] == "rendered" for i in normal)
        assert server.alive()
        assert rss_kb(server) - before < 512_000, "Orthanc's own memory grew by > 512 MB"
        worker = server.json("/minipacs/ingest")["worker"]
        assert worker["renderers"] == 2  # one per worker, the one that failed replaced
    finally:
        server.stop()


def test_full_png_disk_loses_nothing_and_heals(tmp_path, tmpfs):
    png = tmpfs("png", "600k")
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs"),
                                               "PngDirectory": str(png)}).start()
    try:
        files = slices(1, 4)
        for data in files:
            server.upload(data)
        wait_until(lambda: server.json("/minipacs/images/count")["count"] == len(files), 120,
                   "a row for every instance")
        statuses = server.json("/minipacs/ingest")["statuses"]
        assert statuses.get("write_failed", 0) > 0, statuses
        assert same_as_orthanc(server)
        subprocess.run(["mount", "-o", "remount,size=64m", str(png)], check=True)
        wait_until(lambda: server.json("/minipacs/ingest")["statuses"] == {"rendered": len(files)},
                   120, "every PNG written after the disk was enlarged")
        files = sorted(p.name for p in png.iterdir())
        assert files == sorted(f"{i}.png" for i in indexed_ids(server)), "partial or orphan files"
        log = server.log_path.read_text()
        assert log.count("No space left on device (instances are retried") == 1, "one line per cause"
        assert "works again" in log
    finally:
        server.stop()


def test_full_index_disk_loses_nothing_and_catches_up(tmp_path, tmpfs):
    disk = tmpfs("index", "8m")
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs"),
                                               "Database": str(disk / "index.sqlite")}).start()
    try:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as out:  # leave the index no room to grow
            try:
                while True:
                    out.write(b"\0" * 4096)
            except OSError:
                pass
        files = slices(1, 4, seed=5)
        for data in files:
            server.upload(data)
        time.sleep(3)
        assert server.alive()
        filler.unlink()
        wait_until(lambda: same_as_orthanc(server), 120, "index caught up with Orthanc")
        assert server.json("/minipacs/ingest")["statuses"] == {"rendered": len(files)}
        png = server.data / "png"
        assert sorted(p.name for p in png.iterdir()) == sorted(f"{i}.png" for i in indexed_ids(server))
        assert server.log_path.read_text().count("writing the index: database or disk is full") == 1
    finally:
        server.stop()


def test_deletions_during_ingest_never_resurrect_rows(tmp_path):
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs"),
                                               "DeferWhileStoring": 0}).start()
    try:
        for data in slices(4, 4, seed=9):
            server.upload(data)
        for study in server.json("/studies")[::2]:  # while the worker is rendering them
            server.session.delete(f"{server.url}/studies/{study}").raise_for_status()
        server.wait_for_ingest()
        # Orthanc's DELETED changes come from its change thread, a little after the deletions.
        wait_until(lambda: same_as_orthanc(server), 30, "the index equal to Orthanc's instances")
        worker = server.json("/minipacs/ingest")["worker"]
        assert worker["failed"] == 0 and "Unknown resource" not in server.log_path.read_text()
        assert server.json("/minipacs/studies/count")["count"] == len(server.json("/studies"))
        png = server.data / "png"
        assert sorted(p.name for p in png.iterdir()) == sorted(f"{i}.png" for i in server.json("/instances"))
    finally:
        server.stop()


def slow_image() -> bytes:
    """A 4000² JPEG 2000 of noise: seconds to decode, so Orthanc can be killed meanwhile."""
    ds = pydicom.dcmread(io.BytesIO(noise_image(4000)))
    ds.compress(JPEG2000Lossless)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_an_instance_that_never_finishes_is_given_up_and_its_batch_mates_indexed(tmp_path):
    """Orthanc killed while rendering the same instance three times (a poison instance would do
    that by killing it): at the next start it is recorded, not queued again. Stored beside it
    while minipacs was off, its batch-mates are rendered alone after the first death."""
    bare = OrthancServer(tmp_path, Plugins=[str(PLUGINS / "libOrthancDicomWeb.so")])
    bare.config.pop("PythonScript")
    bare.start()
    try:
        slow = bare.upload(slow_image()).json()["ID"]
        others = [bare.upload(data).json()["ID"] for data in slices(1, 2, seed=3)]
    finally:
        bare.stop()
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs")})
    server.start()
    try:
        for attempt in range(3):
            wait_until(lambda: not server.json("/minipacs/ingest")["worker"]["idle"], 60, "worker busy")
            if attempt == 1:  # alone now, beside the slow one
                wait_until(lambda: set(others) <= indexed_ids(server), 60, "batch-mates indexed")
            else:
                time.sleep(0.5)
            assert slow not in indexed_ids(server), "rendered before Orthanc was killed: too fast"
            server.process.kill()
            server.process.wait()
            server.start()
        wait_until(lambda: slow in indexed_ids(server), 60, "the slow instance recorded")
        server.wait_for_ingest()
        indexed = rows(server)
        image = indexed[slow]
        assert image["Status"] == "render_failed"
        assert "given up after 3 attempts" in image["StatusDetail"]
        assert all(indexed[i]["Status"] == "rendered" for i in others)
        assert same_as_orthanc(server)
        assert server.alive()
    finally:
        server.stop()
