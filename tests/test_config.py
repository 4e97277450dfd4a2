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
    assert config.defer_while_storing == 10


def test_paths_are_resolved_against_the_base_and_absolute_paths_kept(tmp_path):
    config = from_orthanc({"MiniPacs": {"DataDirectory": "d", "PngDirectory": "/abs/png"}},
                          base=tmp_path)
    assert config.data_directory == tmp_path / "d"
    assert config.png_directory == Path("/abs/png")
    assert config.database == tmp_path / "d" / "index.sqlite"


@pytest.mark.parametrize("options, message", [
    ({"PngCompressLevel": "1"}, "PngCompressLevel must be of type int"),
    ({"PngCompressLevel": 4}, "within 0..3"),
    ({"PngCompressLevel": True}, "PngCompressLevel must be of type int"),
    ({"QueueSize": 0}, "at least 1"),
    ({"DeferWhileStoring": -1}, "DeferWhileStoring must be within 0..3600"),
    ({"DeferWhileStoring": 0.5}, "DeferWhileStoring must be of type int"),
    ({"ReconcileOnStart": 1}, "ReconcileOnStart must be of type bool"),
    ({"DataDirectory": 3}, "DataDirectory must be of type str"),
    ({"Colour": "blue"}, "unknown MiniPacs option(s): Colour"),
    ({"PostgreSQL": "dbname=m", "Database": "i.sqlite"}, "name two indexes"),
    ({"PostgreSQL": ""}, "PostgreSQL must be a connection string"),
    ({"PostgreSQL": 5432}, "PostgreSQL must be of type str"),
    ({"ClaimLease": 1}, "ClaimLease must be within 3..3600"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ConfigError) as error:
        from_orthanc({"MiniPacs": options})
    assert message in str(error.value)


def test_section_must_be_an_object():
    with pytest.raises(ConfigError, match="JSON object"):
        from_orthanc({"MiniPacs": []})


def test_model_defaults_to_the_shipped_one_and_can_be_turned_off(tmp_path):
    from minipacs.config import DEFAULT_MODEL

    assert from_orthanc({}).model_path == DEFAULT_MODEL
    assert DEFAULT_MODEL.parent.name == "models"
    assert from_orthanc({"MiniPacs": {"ModelPath": ""}}).model_path is None
    assert from_orthanc({"MiniPacs": {"ModelPath": "m.onnx"}}, base=tmp_path).model_path == tmp_path / "m.onnx"
    assert from_orthanc({}).anomaly_threshold is None
    assert from_orthanc({"MiniPacs": {"AnomalyThreshold": 1}}).anomaly_threshold == 1.0


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", True])
def test_threshold_must_be_a_probability(value):
    with pytest.raises(ConfigError, match="AnomalyThreshold must be a number within"):
        from_orthanc({"MiniPacs": {"AnomalyThreshold": value}})


def test_ohif_directory_defaults_to_the_repository_install_and_is_resolved(tmp_path):
    from minipacs.config import DEFAULT_OHIF

    assert from_orthanc({}, base=tmp_path).ohif_directory == DEFAULT_OHIF
    assert DEFAULT_OHIF == Path(__file__).resolve().parent.parent / ".ohif" / "dist"
    config = from_orthanc({"MiniPacs": {"OhifDirectory": "ohif/dist"}}, base=tmp_path)
    assert config.ohif_directory == tmp_path / "ohif" / "dist"


@pytest.mark.parametrize("value, message", [(3, "OhifDirectory must be of type str"),
                                            ("", "OhifDirectory must not be empty")])
def test_bad_ohif_directory_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        from_orthanc({"MiniPacs": {"OhifDirectory": value}})


def test_the_index_is_sqlite_unless_a_postgresql_connection_string_is_given(tmp_path):
    assert from_orthanc({}, tmp_path).postgresql is None
    config = from_orthanc({"MiniPacs": {"PostgreSQL": "postgresql://m@db/minipacs"}}, tmp_path)
    assert (config.postgresql, config.claim_lease) == ("postgresql://m@db/minipacs", 30)
