import numpy as np
import pytest
import tifffile

from napari_coordgate.image_io.tiff import read_tiff, write_tiff
from napari_coordgate.report import write_report_png
from napari_coordgate.samples.specimens import (
    BUNDLED,
    TRAIN_SOURCES,
    VALIDATION_SOURCES,
    bundled_specimen,
    procedural_specimen,
    specimen_fields,
    validation_fields,
)

# what the demo and the benchmarks test and tune on: in neither the training nor the validation specimens
TEST_IMAGES = {"moon", "hubble_deep_field", "retina"}


def test_procedural_specimen_is_seeded_unit_range_and_structured():
    a = procedural_specimen((96, 128), seed=3)
    assert a.dtype == np.float32 and a.shape == (96, 128)
    assert a.min() == 0 and a.max() == pytest.approx(1)
    assert np.array_equal(a, procedural_specimen((96, 128), seed=3))
    assert not np.array_equal(a, procedural_specimen((96, 128), seed=4))
    assert a.std() > 0.02


def test_puncta_are_sub_pixel_point_sources_that_keep_their_light():
    # flux conserved and centroids where planted, each spot narrower than the 1.6 px spots of the older points
    from napari_coordgate.samples.specimens import _puncta

    n = 12
    img = _puncta((120, 120), n, np.random.default_rng(0))
    rng = np.random.default_rng(0)  # the same draws
    ys, xs, flux = rng.uniform(0, 120, n), rng.uniform(0, 120, n), rng.uniform(1.0, 2.5, n)
    checked = 0
    for y, x, f in zip(ys, xs, flux):
        alone = np.sum(np.hypot(ys - y, xs - x) < 8) == 1
        if not alone or not (4 < y < 116 and 4 < x < 116):
            continue
        r0, c0 = int(y) - 3, int(x) - 3
        spot = img[r0 : r0 + 7, c0 : c0 + 7]
        assert spot.sum() == pytest.approx(f, rel=1e-6)
        rr, cc = np.mgrid[0:7, 0:7] + 0.5  # pixel i covers [i, i + 1)
        cy, cx = (spot * rr).sum() / f + r0, (spot * cc).sum() / f + c0
        assert abs(cy - y) < 0.05 and abs(cx - x) < 0.05  # binning biases a centroid a little
        sigma = np.sqrt((spot * (rr + r0 - cy) ** 2).sum() / f)
        assert 0.4 < sigma < 0.55  # the Gaussian's 0.4 px and the pixel's own sqrt(1/12)
        checked += 1
    assert checked >= 5


def test_bundled_specimens_load_without_network():
    for name in ("cell", "coins", "moon"):
        img = bundled_specimen(name)
        assert img.ndim == 2 and img.dtype == np.float32
    with pytest.raises(ValueError, match="unknown bundled specimen"):
        bundled_specimen("kidney")  # needs a download: not offered
    assert "kidney" not in BUNDLED


def test_specimen_fields_crop_or_upscale_to_the_field():
    f = specimen_fields(3, (700, 40), seed=0, sources=("cell", "procedural", "coins"))
    assert f.shape == (3, 700, 40) and np.isfinite(f).all()


def test_validation_specimens_are_other_images_than_the_training_and_test_ones():
    bundled_val, bundled_train = set(VALIDATION_SOURCES) - {"procedural"}, set(TRAIN_SOURCES) - {"procedural"}
    assert bundled_val and bundled_val <= set(BUNDLED) and "procedural" in VALIDATION_SOURCES
    assert not bundled_val & bundled_train
    assert not TEST_IMAGES & (bundled_val | bundled_train)


def test_validation_fields_are_fixed_and_never_among_the_training_fields():
    shape = (96, 80)
    val = validation_fields(shape)
    assert val.shape == (len(VALIDATION_SOURCES), *shape) and val.dtype == np.float32
    assert np.array_equal(val, validation_fields(shape)) and np.array_equal(val[:2], validation_fields(shape, 2))
    for seed in range(4):  # the training seed never reaches them, and no training field is one of them
        train = specimen_fields(16, shape, seed=seed, sources=TRAIN_SOURCES)
        gaps = np.abs(val[:, None] - train[None]).mean(axis=(2, 3))
        assert gaps.min() > 0.02, f"seed {seed}: a validation field within {gaps.min():.4f} of a training field"
    with pytest.raises(ValueError, match="at least 1"):
        validation_fields(shape, 0)


def test_built_in_training_fields_validate_on_held_out_specimens_only():
    from napari_coordgate.optics.psf import PRESETS
    from napari_coordgate.samples.specimens import builtin_fields

    psf = PRESETS["gaussian"].with_provenance({"field_shape": [128, 160]})
    sharp, what = builtin_fields(psf, seed=0)  # what `train --psf` without --sharp trains and validates on
    val, val_what = builtin_fields(psf, seed=0, validation=True)
    assert what == "32 built-in specimen fields of 128 x 160 (mixed: bundled + procedural)" and len(sharp) == 32
    assert val_what.startswith("6 held-out specimen fields (procedural, grass") and len(val) == 6
    assert val.shape[1:] == sharp.shape[1:] == (128, 160)
    assert np.abs(val[:, None] - sharp[None]).mean(axis=(2, 3)).min() > 0.02
    assert np.array_equal(val, builtin_fields(psf, seed=5, specimens="fluorescence", validation=True)[0])
    big = PRESETS["gaussian"].with_provenance({"field_shape": [1024, 1024]})
    assert len(builtin_fields(big, validation=True)[0]) == 1  # about 0.4 megapixels of validation


def test_the_fluorescence_specimens_are_the_procedural_fields_only():
    from napari_coordgate.optics.psf import PRESETS
    from napari_coordgate.samples.specimens import SPECIMEN_SETS, TRAIN_SOURCES, builtin_fields, specimen_fields

    psf = PRESETS["gaussian"].with_provenance({"field_shape": [96, 112]})
    (mixed, _), (fluo, what) = builtin_fields(psf, 3), builtin_fields(psf, 3, "fluorescence")
    assert SPECIMEN_SETS["mixed"] == TRAIN_SOURCES and SPECIMEN_SETS["fluorescence"] == ("procedural",)
    assert np.array_equal(mixed, specimen_fields(len(mixed), (96, 112), seed=3, sources=TRAIN_SOURCES))
    assert np.array_equal(fluo, specimen_fields(len(mixed), (96, 112), seed=3, sources=("procedural",)))
    assert not np.array_equal(mixed, fluo)
    assert what.endswith("(fluorescence: procedural nuclei, filaments, puncta)")


def test_builtin_fields_refuse_a_preset_a_huge_field_and_unknown_specimens_in_one_line():
    from napari_coordgate.optics.psf import PRESETS
    from napari_coordgate.samples.specimens import builtin_fields

    cases = [({"psf": PRESETS["gaussian"], "sharp_hint": "sharp layers"},
              "give sharp images (sharp layers), or a PSF model measured"),
             ({"psf": PRESETS["gaussian"].with_provenance({"field_shape": [10000, 10000]})}, "up to 64 megapixels"),
             ({"psf": PRESETS["gaussian"].with_provenance({"field_shape": [64, 64]}), "specimens": "beads"},
              "choose mixed or fluorescence")]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            builtin_fields(**kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)


def test_tiff_round_trip_keeps_pixel_size_and_axes(tmp_path):
    data = (np.random.default_rng(0).random((2, 16, 24)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, imagej=True, resolution=(5.0, 5.0),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 0.3})
    src = read_tiff(tmp_path / "a.tif")
    write_tiff(tmp_path / "b.tif", src.data.astype(np.float32) / 2, like=src)
    out = read_tiff(tmp_path / "b.tif")
    assert out.axes == "ZYX" and out.resolution == (5.0, 5.0)
    assert out.imagej["spacing"] == pytest.approx(0.3) and out.imagej["unit"] == "um"
    assert out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, data / 2)


def test_ome_physical_size_is_carried(tmp_path):
    data = np.zeros((8, 8), np.uint16) + np.arange(8, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", data, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.065,
                                                                        "PhysicalSizeY": 0.065})
    src = read_tiff(tmp_path / "a.ome.tif")
    write_tiff(tmp_path / "b.ome.tif", src.data, like=src)
    assert 'PhysicalSizeX="0.065"' in read_tiff(tmp_path / "b.ome.tif").ome


@pytest.mark.parametrize("kind", ["imagej", "ome"])
def test_streamed_write_from_a_memory_mapped_read_keeps_data_and_metadata(tmp_path, kind):
    from napari_coordgate.image_io.tiff import write_tiff_streamed

    data = (np.random.default_rng(1).random((3, 16, 24)) * 1000).astype(np.uint16)
    if kind == "imagej":
        tifffile.imwrite(tmp_path / "a.tif", data, imagej=True, resolution=(5.0, 5.0),
                         metadata={"axes": "ZYX", "unit": "um", "spacing": 0.3})
    else:
        tifffile.imwrite(tmp_path / "a.tif", data, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.065})
    src = read_tiff(tmp_path / "a.tif", lazy=True)
    assert isinstance(src.data, np.memmap)  # uncompressed and contiguous: not read into memory

    def fill(out):
        for i in range(len(out)):  # plane by plane, as predict writes
            out[i] = src.data[i] / 2

    write_tiff_streamed(tmp_path / "b.tif", src.data.shape, fill, like=src)
    out = read_tiff(tmp_path / "b.tif")
    np.testing.assert_allclose(out.data, data / 2)
    assert out.data.dtype == np.float32 and out.axes == "ZYX"
    if kind == "imagej":
        assert out.imagej["spacing"] == pytest.approx(0.3) and out.resolution == (5.0, 5.0)
    else:
        assert 'PhysicalSizeX="0.065"' in out.ome


def test_compressed_tiff_is_read_whole_and_a_failed_stream_leaves_no_file(tmp_path):
    from napari_coordgate.image_io.tiff import write_tiff_streamed

    data = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8)
    tifffile.imwrite(tmp_path / "z.tif", data, compression="zlib")
    src = read_tiff(tmp_path / "z.tif", lazy=True)
    assert not isinstance(src.data, np.memmap)
    np.testing.assert_array_equal(src.data, data)

    def fail(out):
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        write_tiff_streamed(tmp_path / "out.tif", data.shape, fail)
    assert list(tmp_path.iterdir()) == [tmp_path / "z.tif"]


def test_unreadable_tiff_is_a_clear_error(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_tiff(tmp_path / "x.tif")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_tiff(tmp_path / "missing.tif")


def test_report_png_is_written(tmp_path):
    gt = procedural_specimen((64, 64), 0)
    p = write_report_png(tmp_path / "r.png", gt, gt * 0.9, gt * 0.95, title="t", others={"x": gt * 0.8})
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["imagej", "ome", "none"])
def test_the_pixel_size_is_read_from_imagej_or_ome_metadata(tmp_path, kind):
    import tifffile

    from napari_coordgate.image_io.tiff import pixel_size_um, read_tiff

    data = np.zeros((16, 16), np.uint16)
    path = tmp_path / f"{kind}.tif"
    if kind == "imagej":
        tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.108, 1 / 0.108), metadata={"unit": "um"})
    elif kind == "ome":
        tifffile.imwrite(path, data, ome=True, metadata={"PhysicalSizeX": 108.0, "PhysicalSizeXUnit": "nm"})
    else:
        tifffile.imwrite(path, data)
    expected = None if kind == "none" else 0.108
    got = pixel_size_um(read_tiff(path))
    assert got == expected if expected is None else abs(got - expected) < 1e-6
