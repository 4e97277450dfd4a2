"""Orthanc's official OHIF plugin owns /ohif/ when it is loaded: minipacs must not collide.

Debian packages no orthanc-ohif (neither bookworm nor trixie nor sid), so the test builds a real
Orthanc C plugin, tests/ohif_standin_plugin.c, with gcc against Debian's orthanc-dev header: it
has the official plugin's library name (libOrthancOHIF.so), plugin name ("ohif") and default
route (/ohif/), and answers with a marker. What is tested is minipacs's side: it recognises the
library among Orthanc's ``Plugins`` and leaves the route alone. The Python plugin is listed first,
so minipacs would register /ohif/ first, and Orthanc silently gives a route to its first
registration: had minipacs not stepped aside, the marker would not come back.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from orthanc_server import PLUGINS, OrthancServer

SOURCE = Path(__file__).with_name("ohif_standin_plugin.c")
HEADER = Path("/usr/include/orthanc/OrthancCPlugin.h")


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """libOrthancOHIF.so, alone in a folder of its own."""
    if not shutil.which("gcc") or not HEADER.is_file():
        pytest.fail(f"gcc or {HEADER} missing: ./minipacs.sh setup --dev installs gcc and "
                    "orthanc-dev")
    library = tmp_path_factory.mktemp("ohif-plugin") / "libOrthancOHIF.so"
    built = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
                            "-o", str(library), str(SOURCE)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return library


@pytest.mark.parametrize("entry", ["library", "folder"])
def test_minipacs_leaves_ohif_to_the_official_plugin(standin, tmp_path, entry):
    listed = standin if entry == "library" else standin.parent  # Orthanc loads a folder's libraries
    server = OrthancServer(tmp_path, Plugins=[str(PLUGINS / "libOrthancPython.so"),
                                              str(PLUGINS / "libOrthancDicomWeb.so"), str(listed)])
    server.start()
    try:
        assert {"python", "ohif"} <= set(server.json("/plugins"))
        for path in ("/ohif", "/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3",
                     "/ohif/app-config.js"):
            answer = server.get(path)
            assert answer.status_code == 200, path
            # The stand-in echoes the path it was called with (Orthanc drops a final "/").
            assert answer.text == f"ohif-standin {path.split('?')[0].rstrip('/')}\n", path
        # minipacs itself is up, and its UI's viewer links (../ohif/viewer?StudyInstanceUIDs=)
        # now lead to the official plugin.
        assert server.json("/minipacs/counts")["images"] == 0
        assert "../ohif/viewer?StudyInstanceUIDs=" in server.get("/minipacs/ui").text
    finally:
        server.stop()
    said = f"Orthanc's OHIF plugin ({standin}) serves /ohif/: minipacs links to it"
    assert said in server.log_tail(400)
