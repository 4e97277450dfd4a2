import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import pydicom_data_files, pydicom_test_files  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc + minipacs, loaded with pydicom's test files over REST and pydicom-data's
    files over C-STORE, once for the whole session."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    try:
        server.rest_results = {p: server.upload(p.read_bytes()).status_code
                               for p in pydicom_test_files()}
        server.storescu_result = server.storescu(pydicom_data_files())
        server.wait_for_ingest()
        yield server
    finally:
        server.stop()
        print(f"\n--- Orthanc log tail ({server.log_path}) ---\n{server.log_tail(30)}")
