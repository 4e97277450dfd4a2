"""The synthetic study generator: valid DICOM (dciodvfy), deterministic, varied, plausible."""

import re
import shutil
import subprocess
import time
from collections import defaultdict

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from minipacs import synth
from minipacs.render import render
from orthanc_server import OrthancServer

SEED = 7
# dciodvfy warnings accepted, each with the reason; none are left today.
DCIODVFY_WARNINGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def instances() -> list[pydicom.Dataset]:
    """Four patients, small: between them every study kind, CT pixel format, window kind and
    anomaly (one each, with ``anomalies=1``)."""
    return list(synth.generate(patients=4, seed=SEED, size=128, slices=8, anomalies=1.0))


def by_series(instances) -> dict[str, list[pydicom.Dataset]]:
    series = defaultdict(list)
    for ds in instances:
        series[ds.SeriesInstanceUID].append(ds)
    return series


def hounsfield(ds) -> np.ndarray:
    return apply_modality_lut(ds.pixel_array, ds)


def test_every_kind_passes_dciodvfy(instances, tmp_path):
    """One instance per series and every anomalous one: CT in four pixel formats, MR head and
    abdomen, CR MONOCHROME1 with and without a window, DX for presentation, secondary captures."""
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy not found: apt-get install dicom3tools"
    sample = [series[len(series) // 2] for series in by_series(instances).values()]
    sample += [ds for ds in instances if synth.anomaly_of(ds)]
    assert {ds.SOPClassUID.name for ds in sample} >= {
        "CT Image Storage", "MR Image Storage", "Computed Radiography Image Storage",
        "Digital X-Ray Image Storage - For Presentation", "Secondary Capture Image Storage"}
    problems = []
    for i, ds in enumerate(sample):
        path = tmp_path / f"{i:03d}.dcm"
        path.write_bytes(synth.encode(ds))
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True).stderr
        for line in report.splitlines():
            if line.startswith("Error") or (line.startswith("Warning") and not any(
                    known in line for known in DCIODVFY_WARNINGS)):
                problems.append(f"{ds.Modality} {ds.SeriesDescription}: {line}")
    assert not problems, "\n".join(problems)


def test_a_seed_gives_the_same_bytes_and_patients_are_independent():
    def patient(seed, index):
        return [synth.encode(ds) for ds in synth.generate(1, seed, size=64, slices=4, first=index)]

    first = patient(SEED, 2)
    assert first == patient(SEED, 2)
    alone = [synth.encode(ds) for ds in synth.generate(3, SEED, size=64, slices=4)][-len(first):]
    assert alone == first  # patient 2 is the same whether made alone or after 0 and 1
    assert patient(SEED + 1, 2) != first


def test_uids_are_valid_and_unique_across_levels_patients_and_seeds(instances):
    uid = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
    sops = [ds.SOPInstanceUID for ds in instances]
    assert len(set(sops)) == len(sops)
    parents = defaultdict(set)
    for ds in instances:
        parents[ds.SeriesInstanceUID].add(ds.StudyInstanceUID)
        parents[ds.StudyInstanceUID].add(ds.PatientID)
        for value in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert len(value) <= 64 and uid.match(value), value
    assert all(len(p) == 1 for p in parents.values())  # a series in one study, a study for one patient
    assert not set(sops) & set(parents)
    assert len({ds.PatientID for ds in instances}) == 4
    assert len({ds.StudyInstanceUID for ds in instances}) == 12  # three studies each
    other_seed = {ds.SOPInstanceUID for ds in synth.generate(1, SEED + 1, size=64, slices=4)}
    assert not other_seed & set(sops)


def test_ct_values_are_hounsfield_units_in_every_pixel_format(instances):
    formats = set()
    for series in by_series(instances).values():
        ds = series[len(series) // 3]  # mid-lung, above the broken middle slice of an anomaly
        if ds.Modality != "CT":
            continue
        formats.add((ds.BitsStored, ds.PixelRepresentation))
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        bits = ds.BitsStored - ds.PixelRepresentation  # magnitude bits
        lo = -(1 << bits) if ds.PixelRepresentation else 0
        assert lo <= ds.pixel_array.min() and ds.pixel_array.max() < 1 << bits
        hu = hounsfield(ds)
        assert np.percentile(hu, 1) < -900, ds.SeriesDescription  # air around the patient
        assert np.mean((hu > -950) & (hu < -700)) > 0.03, ds.SeriesDescription  # lungs
        assert np.percentile(hu, 99.9) > 500, ds.SeriesDescription  # bone
    assert formats == {(12, 0), (12, 1), (16, 0), (16, 1)}


def test_tissues_have_their_hounsfield_units():
    chest = synth.make_chest(np.random.default_rng(SEED))
    grid = synth.Grid(256, 1.5)
    raw_noise, texture = synth.noise_banks(np.random.default_rng(1), 256)
    soft = synth.RECONS[1]
    z = 0.6 * chest.height
    labels = synth.chest_labels(chest, grid, z, 1.0)
    hu = synth.ct_hu(chest, grid, z, 1.0, soft, synth.kernel_noise(raw_noise, soft.sharpness),
                     texture, np.random.default_rng(2))
    lung = (labels == synth.T.LUNG).astype(np.float32)
    inner = synth.binomial(synth.binomial(lung)) == 1  # away from the edges the kernel blurs
    assert -900 < np.median(hu[inner]) < -780
    assert np.median(hu[labels == synth.T.FAT]) == pytest.approx(-100, abs=30)
    assert np.median(hu[labels == synth.T.CORTEX]) > 600
    assert np.median(hu[labels == synth.T.AIR]) == pytest.approx(-1000, abs=20)
    assert (labels == synth.T.VESSEL).sum() > 50  # vessels in the lungs


def test_slices_change_smoothly_along_z(instances):
    chest = synth.make_chest(np.random.default_rng(SEED))
    grid = synth.Grid(128, 3.0)
    z = 0.5 * chest.height
    here = synth.chest_labels(chest, grid, z, 1.0)
    changed = [np.mean(here != synth.chest_labels(chest, grid, z + dz, 1.0)) for dz in (0.5, 2, 10, 80)]
    assert changed[0] < 0.03 and changed == sorted(changed) and changed[-1] > 0.25, changed
    for series in by_series(instances).values():
        if series[0].Modality in ("CT", "MR"):
            positions = np.array([ds.ImagePositionPatient[2] for ds in series], float)
            steps = np.diff(positions)
            assert np.all(steps < 0) and np.allclose(steps, steps[0], atol=0.01)
            assert [ds.InstanceNumber for ds in series] == list(range(1, len(series) + 1))
            assert all(float(ds.SliceLocation) == float(ds.ImagePositionPatient[2]) for ds in series)


def test_windows_single_multi_valued_and_absent(instances):
    kinds = set()
    for series in by_series(instances).values():
        ds = series[0]
        centre = ds.get("WindowCenter")
        kinds.add((ds.Modality, "none" if centre is None else
                   "multi" if isinstance(centre, MultiValue) else "single"))
        if isinstance(centre, MultiValue):
            assert len(centre) == len(ds.WindowWidth) == len(ds.WindowCenterWidthExplanation) > 1
    assert {("CT", "single"), ("CT", "multi"), ("CT", "none"), ("MR", "none"), ("CR", "none"),
            ("DX", "single")} <= kinds


def test_radiographs_monochrome1_and_2_render_bone_and_lead_white(instances):
    seen = set()
    for ds in instances:
        if ds.Modality in ("CR", "DX"):
            seen.add(ds.PhotometricInterpretation)
            shown = render(ds).pixels
            assert shown[:2].mean() > 240  # the collimator's shadow, whatever the photometry
            assert shown[ds.Rows // 3, :].min() < 100  # lungs or air are dark
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_mr_contrasts():
    head = synth.make_head(np.random.default_rng(SEED))
    grid = synth.Grid(128, 2.0)
    noise = np.random.default_rng(1).standard_normal((4, 24, 24), dtype=np.float32)
    labels = synth.head_labels(head, grid, 25.0, 2.5, synth.smooth_field(noise, 0.5, 128))
    assert {synth.T.GM, synth.T.WM, synth.T.CSF} <= set(np.unique(labels).tolist())
    signal = {w.name: w.lut for w in synth.HEAD_WEIGHTINGS}
    T = synth.T
    assert signal["T1 SE"][T.WM] > signal["T1 SE"][T.GM] > signal["T1 SE"][T.CSF]
    assert signal["T2 TSE"][T.CSF] > signal["T2 TSE"][T.GM] > signal["T2 TSE"][T.WM]
    assert signal["FLAIR"][T.CSF] < signal["FLAIR"][T.WM]


def test_every_anomaly_is_there_and_recognisable(instances):
    found = {synth.anomaly_of(ds): ds for ds in instances if synth.anomaly_of(ds)}
    assert set(found) == set(synth.ANOMALIES)
    dialog, photo = found["burned_in_dialog"], found["photograph"]
    assert dialog.SamplesPerPixel == photo.SamplesPerPixel == 3 and dialog.BurnedInAnnotation == "YES"
    assert photo.Modality == "XC" and photo.pixel_array.shape == (480, 640, 3)
    saturated = render(found["saturated_window"]).pixels
    assert saturated.std() < 1 and (saturated.mean() < 5 or saturated.mean() > 250)
    broken = found["corrupted_rows"]
    normal = next(ds for ds in instances if ds.SeriesInstanceUID == broken.SeriesInstanceUID
                  and ds.InstanceNumber == broken.InstanceNumber - 1)

    def row_jumps(ds):
        return np.abs(np.diff(hounsfield(ds), axis=0)).mean(axis=1).max()

    assert row_jumps(broken) > 5 * row_jumps(normal)


def test_every_instance_survives_a_round_trip_and_renders(instances):
    for ds in instances:
        read = pydicom.dcmread(pydicom.filebase.DicomBytesIO(synth.encode(ds)))
        assert read.SOPInstanceUID == ds.SOPInstanceUID
        shown = render(read)
        assert shown.pixels.dtype == np.uint8 and shown.pixels.shape[:2] == (ds.Rows, ds.Columns)


def test_cli_writes_a_folder(tmp_path):
    args = ["--patients", "2", "--seed", str(SEED), "--size", "64", "--slices", "4"]
    assert synth.main([str(tmp_path), *args]) == 0
    expected = {synth.relative_path(ds) for ds in synth.generate(2, SEED, size=64, slices=4)}
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.dcm")}
    assert written == expected
    assert pydicom.dcmread(tmp_path / sorted(written)[0]).PatientID.startswith("SYN")


def test_cli_streams_into_orthanc_over_rest_and_c_store(tmp_path):
    server = OrthancServer(tmp_path).start()
    try:
        common = ["--seed", str(SEED), "--size", "64", "--slices", "4", "--patients", "1"]
        assert synth.main(["--orthanc", server.url, "--first", "0", *common]) == 0
        assert synth.main(["--store", f"127.0.0.1:{server.dicom_port}", "--aec", server.aet,
                           "--first", "1", *common]) == 0
        sent = list(synth.generate(2, SEED, size=64, slices=4))
        server.wait_for_ingest()
        stats = server.json("/statistics")
        assert (stats["CountPatients"], stats["CountInstances"]) == (2, len(sent))
        assert server.json("/minipacs/counts")["images"] == len(sent)
        assert server.json("/minipacs/ingest")["statuses"].get("rendered") == len(sent)
    finally:
        server.stop()


def test_speed_of_512_ct_slices(record_property, capsys):
    """Measured, not asserted: the CT slices of one patient at full size, encoded."""
    start, count = time.perf_counter(), 0
    for ds in synth.generate(1, SEED, size=512, slices=40):
        synth.encode(ds)
        count += 1
    ms = 1000 * (time.perf_counter() - start) / count
    record_property("ms_per_instance", round(ms, 1))
    with capsys.disabled():
        print(f"\nsynth: {count} instances (512×512 CT, 256×256 MR, 1024² CR/DX), {ms:.1f} ms each")
