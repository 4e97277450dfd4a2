from pathlib import Path

import pytest

from minipacs.config import ConfigError, from_orthanc


def test_defaults_live_under_the_data_directory(tmp_path):
    config = from_orthanc({}, base=tmp_path)
    assert config.data_directory == tmp_path / "minipacs-data"
    assert config.png_directory == tmp_path / "minipacs-data" / "png"
    assert config.database == tmp_path / "minipacs-data" / "index.sqlite"
    assert config.png_compress_level == 1
    assert config.reconcile_on_start is True


def test_paths_are_resolved_against_the_base_and_absolute_paths_kept(tmp_path):
    config = from_orthanc({"MiniPacs": {"DataDirectory": "d", "PngDirectory": "/abs/png"}},
                          base=tmp_path)
    assert config.data_directory == tmp_path / "d"
    assert config.png_directory == Path("/abs/png")
    assert config.database == tmp_path / "d" / "index.sqlite"


@pytest.mark.parametrize("options, message", [
    ({"PngCompressLevel": "1"}, "PngCompressLevel must be of type int"),
    ({"PngCompressLevel": 10}, "within 0..9"),
    ({"PngCompressLevel": True}, "PngCompressLevel must be of type int"),
    ({"QueueSize": 0}, "at least 1"),
    ({"ReconcileOnStart": 1}, "ReconcileOnStart must be of type bool"),
    ({"DataDirectory": 3}, "DataDirectory must be of type str"),
    ({"Colour": "blue"}, "unknown MiniPacs option(s): Colour"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ConfigError) as error:
        from_orthanc({"MiniPacs": options})
    assert message in str(error.value)


def test_section_must_be_an_object():
    with pytest.raises(ConfigError, match="JSON object"):
        from_orthanc({"MiniPacs": []})
