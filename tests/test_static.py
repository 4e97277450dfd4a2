"""``minipacs.static``: OHIF's dist/ folder served under /ohif/, without Orthanc."""

import json

import pytest

from minipacs.static import OhifSite, app_config, content_type

# The shape of @ohif/app's index.html and webpack runtime, in miniature.
INDEX = (b'<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
         b'<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
         b'<script src="/app-config.js"></script><script defer src="/app.bundle.0f6159c501addfe9.js">'
         b'</script><link href="/app.bundle.css" rel="stylesheet"><a href="//example.org/x">x</a>'
         b'<a href="https://ohif.org/">ohif</a></head><body><div id="root"></div></body></html>')
BUNDLE = (b'// webpack/runtime/public_path\n(() => {\n__webpack_require__.p = "/";\n})();\n'
          b'const logo = (__webpack_require__.p + "assets/logo.png");\n')


@pytest.fixture
def dist(tmp_path):
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "app.bundle.0f6159c501addfe9.js").write_bytes(BUNDLE)
    (root / "plain.js").write_bytes(b"console.log('/');\n")
    (root / "app.bundle.css").write_bytes(b"@font-face{src:url(/a34f9d1faa5f3315.woff2)}"
                                          b"b{background:url(//cdn/x.png)}")
    (root / "app-config.js").write_bytes(b"window.config = {bundled: true};")
    (root / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (root / "assets" / "favicon.ico").write_bytes(b"ico")
    (root / "manifest.json").write_bytes(b"{}")
    (tmp_path / "secret.txt").write_bytes(b"TOP-SECRET-CONTENT")
    return root


def test_index_is_served_at_the_mount_with_its_absolute_paths_moved_under_it(dist):
    site = OhifSite(dist)
    for path in ("", "/", "index.html"):
        answer = site.handle("GET", path)
        assert answer.status == 200
        assert answer.content_type == "text/html; charset=utf-8"
        assert answer.headers["Cache-Control"] == "no-cache"
    body = site.handle("GET", "").body
    assert b'window.PUBLIC_URL="/ohif/"' in body
    assert b'src="/ohif/app.bundle.0f6159c501addfe9.js"' in body
    assert b'src="/ohif/app-config.js"' in body
    assert b'href="/ohif/assets/favicon.ico"' in body and b'href="/ohif/manifest.json"' in body
    # Protocol-relative and absolute URLs are left alone.
    assert b'href="//example.org/x"' in body and b'href="https://ohif.org/"' in body


def test_an_index_already_built_for_the_mount_is_not_rewritten_twice(dist):
    (dist / "index.html").write_bytes(b'<script>window.PUBLIC_URL="/ohif/"</script>'
                                      b'<script src="/ohif/app.js"></script>')
    body = OhifSite(dist).handle("GET", "").body
    assert body == b'<script>window.PUBLIC_URL="/ohif/"</script><script src="/ohif/app.js"></script>'


def test_webpack_public_path_and_css_urls_are_moved_under_the_mount(dist):
    site = OhifSite(dist)
    bundle = site.handle("GET", "app.bundle.0f6159c501addfe9.js")
    assert bundle.status == 200 and bundle.content_type.startswith("text/javascript")
    assert b'__webpack_require__.p = "/ohif/";' in bundle.body
    assert b'(__webpack_require__.p + "assets/logo.png")' in bundle.body
    assert bundle.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert site.handle("GET", "plain.js").body == b"console.log('/');\n"
    css = site.handle("GET", "app.bundle.css").body
    assert b"url(/ohif/a34f9d1faa5f3315.woff2)" in css and b"url(//cdn/x.png)" in css


def test_rewritten_files_are_cached_until_they_change(dist):
    site = OhifSite(dist)
    first = site.handle("GET", "app.bundle.0f6159c501addfe9.js").body
    assert site.handle("GET", "app.bundle.0f6159c501addfe9.js").body is first
    (dist / "app.bundle.0f6159c501addfe9.js").write_bytes(BUNDLE + b"// v2\n")
    assert site.handle("GET", "app.bundle.0f6159c501addfe9.js").body.endswith(b"// v2\n")


def test_client_side_routes_fall_back_to_index_html_but_missing_assets_are_404(dist):
    site = OhifSite(dist)
    index = site.handle("GET", "").body
    for route in ("viewer", "viewer/dicomweb", "segmentation", "viewer/1.2.840.113619.2.55",
                  "assets"):
        answer = site.handle("GET", route)
        assert (answer.status, answer.body) == (200, index), route
    for missing in ("x.js", "assets/missing.png", "nope.wasm", "chunk.css"):
        answer = site.handle("GET", missing)
        assert answer.status == 404 and answer.content_type == "application/json", missing
        assert json.loads(answer.body) == {"error": f"no such file: /ohif/{missing}",
                                           "status": 404}


def test_content_types(dist):
    site = OhifSite(dist)
    assert site.handle("GET", "0ddf166f7a343eda.wasm").content_type == "application/wasm"
    assert site.handle("GET", "assets/favicon.ico").content_type == "image/x-icon"
    assert site.handle("GET", "manifest.json").content_type == "application/json"
    assert site.handle("GET", "manifest.json").headers["Cache-Control"] == "public, max-age=3600"
    assert content_type("a34f9d1faa5f3315.woff2") == "font/woff2"
    assert content_type("LICENSE") == "application/octet-stream"


@pytest.mark.parametrize("path", ["../secret.txt", "assets/../../secret.txt", "..", "./index.html",
                                  ".hidden", "assets//favicon.ico", "..\\secret.txt",
                                  "assets/\0x.png"])
def test_no_path_leaves_the_dist_folder(dist, path):
    answer = OhifSite(dist).handle("GET", path)
    assert answer.status == 404 and b"TOP-SECRET" not in answer.body


def test_a_symbolic_link_out_of_the_dist_folder_is_not_followed(dist):
    (dist / "leak.txt").symlink_to(dist.parent / "secret.txt")
    answer = OhifSite(dist).handle("GET", "leak.txt")
    assert answer.status == 404 and b"TOP-SECRET" not in answer.body


def test_app_config_is_ours_and_points_at_orthancs_dicomweb_root(dist):
    answer = OhifSite(dist, dicomweb_root="/dicom-web/").handle("GET", "app-config.js")
    assert answer.status == 200 and answer.content_type.startswith("text/javascript")
    assert answer.headers["Cache-Control"] == "no-cache"
    text = answer.body.decode()
    assert "bundled" not in text
    assert 'window.location.origin + "/dicom-web"' in text
    config = json.loads(text.split("window.config = ", 1)[1].split(";\n", 1)[0])
    assert config["routerBasename"] == "/ohif"
    assert config["defaultDataSourceName"] == "orthanc"
    [source] = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert source["configuration"]["imageRendering"] == "wadors"
    assert 'origin + "/web/dicom"' in app_config("web/dicom").decode()


def test_not_installed_is_a_clear_404(tmp_path):
    answer = OhifSite(tmp_path / "missing").handle("GET", "viewer")
    assert answer.status == 404 and answer.content_type == "application/json"
    error = json.loads(answer.body)
    assert error["status"] == 404
    assert "OHIF is not installed" in error["error"] and "OhifDirectory" in error["error"]


def test_only_get(dist):
    answer = OhifSite(dist).handle("POST", "")
    assert answer.status == 405 and answer.headers["Allow"] == "GET"


def test_an_unreadable_file_is_a_500_not_an_exception(dist, monkeypatch):
    site = OhifSite(dist)
    monkeypatch.setattr(type(dist), "read_bytes", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    answer = site.handle("GET", "manifest.json")
    assert answer.status == 500 and b"Permission denied" in answer.body


def test_orthancs_own_ohif_plugin_is_found_among_the_plugins(tmp_path):
    """Orthanc's OHIF plugin serves /ohif/ itself: minipacs must leave that route to it."""
    from minipacs.static import official_plugin
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "libOrthancDicomWeb.so").touch()
    assert official_plugin([str(folder), "/usr/share/orthanc/plugins/libOrthancPython.so"]) is None
    (folder / "libOrthancOHIF.so").touch()
    assert official_plugin([str(folder)]) == str(folder / "libOrthancOHIF.so")
    assert official_plugin(["/opt/plugins/libOrthancOHIF.so"]) == "/opt/plugins/libOrthancOHIF.so"
    assert official_plugin([str(tmp_path / "missing")]) is None
