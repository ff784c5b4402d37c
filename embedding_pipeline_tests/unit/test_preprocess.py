"""Decode + JAX kernels against a Pillow reference of the same resize/crop, and the decode edge cases."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from embedding_pipeline.preprocess import kernels
from embedding_pipeline.preprocess.decode import DecodeOptions, Geometry
from embedding_pipeline.preprocess.preprocessor import Preprocessor
from embedding_pipeline.preprocess.spec import TensorSpec
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.images import encode, oriented


def pillow_reference(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Pillow's BILINEAR resize of the same float box (crop policy)."""
    h, w = array.shape[:2]
    top, left, box_h, box_w = geometry.box(h, w)
    box = (left, top, left + box_w, top + box_h)
    return np.asarray(Image.fromarray(array).resize((geometry.width, geometry.height), Image.BILINEAR, box=box))


def pillow_two_step(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Pillow's own `reducing_gap` path: an integer reduce (as decode does for big images), then BILINEAR."""
    factor = math.ceil(geometry.scale(*array.shape[:2]) / 2)
    reduced = np.asarray(Image.fromarray(array).reduce(factor)) if factor >= 2 else array
    return pillow_reference(reduced, geometry)


@pytest.fixture(scope="module")
def preprocessor(tmp_path_factory):
    return Preprocessor(TensorSpec(), batch_size=4, cache_dir=tmp_path_factory.mktemp("jax"))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "rocket"])
def test_matches_pillow_within_two_grey_levels(preprocessor, name):
    photo = load_photo(name)
    out = preprocessor.prepare([encode(photo)])
    assert out.errors == [None]
    (tensor,) = out.tensors
    assert tensor.shape == (224, 224, 3) and tensor.dtype == np.uint8
    assert _max_diff(tensor, pillow_reference(photo, preprocessor.geometry)) <= 2


def test_large_png_is_reduced_and_still_matches(preprocessor):
    # 1600 px: three times the output size, so decode must reduce it before the 5-tap kernel.
    big = np.asarray(Image.fromarray(load_photo("coffee")).resize((1600, 1200), Image.BICUBIC))
    (tensor,) = preprocessor.prepare([encode(big)]).tensors
    # Exactly what Pillow gives for the same two steps (its own `reducing_gap` path: reduce, then resample)...
    assert _max_diff(tensor, pillow_two_step(big, preprocessor.geometry)) <= 2
    # ...and close to a single full-resolution resample.
    assert np.abs(tensor.astype(int) - pillow_reference(big, preprocessor.geometry).astype(int)).mean() < 1.5


def test_large_jpeg_uses_reduced_decode_and_stays_close(preprocessor):
    big = np.asarray(Image.fromarray(load_photo("coffee")).resize((2400, 1600), Image.BICUBIC))
    out = preprocessor.prepare([encode(big, "JPEG", quality=95)])
    ref = pillow_reference(big, preprocessor.geometry)
    # Draft decoding averages in the DCT domain: close to, not identical with, a full decode.
    assert np.abs(out.tensors[0].astype(int) - ref.astype(int)).mean() < 2.0


def test_pad_policy_letterboxes_with_the_pad_colour():
    photo = load_photo("rocket")  # 427 x 640, wider than tall
    prep = Preprocessor(TensorSpec(height=64, width=64), policy="pad", pad_color=(10, 20, 30), batch_size=2)
    (tensor,) = prep.prepare([encode(photo)]).tensors
    h, w = photo.shape[:2]
    content = round(64 * h / w)  # rows that hold the image
    band = (64 - content) // 2
    assert (tensor[: band - 1] == (10, 20, 30)).all() and (tensor[-(band - 1) :] == (10, 20, 30)).all()
    ref = np.asarray(Image.fromarray(photo).resize((64, content), Image.BILINEAR))
    assert np.abs(tensor[band + 1 : band + content - 1].astype(int) - ref[1:-1].astype(int)).mean() < 2.0


def test_non_square_output_matches_pillow():
    spec = TensorSpec(height=48, width=96)
    prep = Preprocessor(spec, resize_size=55, batch_size=2)
    photo = load_photo("astronaut")
    (tensor,) = prep.prepare([encode(photo)]).tensors
    assert tensor.shape == (48, 96, 3)
    assert _max_diff(tensor, pillow_two_step(photo, prep.geometry)) <= 2


def test_mixed_sizes_and_short_batches_compile_once(tmp_path):
    spec = TensorSpec(height=40, width=40)  # a shape no other test uses
    prep = Preprocessor(spec, batch_size=4)
    key = (40, 40, "uint8", False, 4)
    before = kernels.traces[key]
    sizes = [(30, 20), (480, 640), (1, 1), (20, 2000), (333, 333), (97, 13), (1200, 800)]
    images = [encode(np.full((h, w, 3), 99, np.uint8)) for h, w in sizes]
    out = prep.prepare_all(images)
    assert out.errors == [None] * len(sizes) and out.tensors.shape == (7, 40, 40, 3)
    assert np.abs(out.tensors.astype(int) - 99).max() <= 1  # a flat image stays flat, whatever its size
    prep.prepare(images[:1])
    assert kernels.traces[key] - before == 1


def test_bad_items_are_reported_with_kinds_and_good_ones_kept(preprocessor):
    good = encode(load_photo("chelsea"), "JPEG")
    out = preprocessor.prepare([b"garbage", good, good[: len(good) * 2 // 3]])
    assert out.errors[0].kind == "decode_error" and "cannot decode image" in out.errors[0].message
    assert out.errors[1] is None
    assert out.errors[2].kind == "truncated"
    assert out.tensors.shape == (1, 224, 224, 3)


def test_truncated_files_are_accepted_only_when_configured():
    good = encode(load_photo("chelsea"), "JPEG")
    cut = good[: len(good) * 2 // 3]
    prep = Preprocessor(TensorSpec(height=32, width=32), batch_size=1, options=DecodeOptions(allow_truncated=True))
    assert prep.prepare([cut]).errors == [None]
    strict = Preprocessor(TensorSpec(height=32, width=32), batch_size=1)
    assert strict.prepare([cut]).errors[0].kind == "truncated"


def test_pixel_limit_is_configurable():
    image = encode(np.zeros((100, 100, 3), np.uint8))
    prep = Preprocessor(TensorSpec(height=32, width=32), batch_size=1, options=DecodeOptions(max_pixels=5000))
    error = prep.prepare([image]).errors[0]
    assert error.kind == "too_many_pixels" and "100x100" in error.message


def test_modes_are_converted_to_rgb(preprocessor):
    grey = load_photo("camera")
    rgba = np.dstack([load_photo("chelsea"), np.full((300, 451), 128, np.uint8)])
    out = preprocessor.prepare([encode(grey), encode(rgba), encode(grey.astype(np.uint16) * 256)])
    assert out.errors == [None, None, None]
    assert np.allclose(out.tensors[0][..., 0], out.tensors[0][..., 1])
    # A 16-bit image scaled to 8 bits gives the same picture as the 8-bit one.
    assert _max_diff(out.tensors[0], out.tensors[2]) <= 2


def test_alpha_is_composited_on_the_configured_background():
    clear = encode(np.zeros((20, 20, 4), np.uint8))  # fully transparent
    prep = Preprocessor(TensorSpec(height=8, width=8), batch_size=1, options=DecodeOptions(background=(0, 128, 255)))
    (tensor,) = prep.prepare([clear]).tensors
    assert (tensor == (0, 128, 255)).all()


def test_cmyk_jpeg_and_animated_gif_decode():
    photo = load_photo("coffee")
    buf = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buf, "JPEG", quality=95)
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    prep = Preprocessor(TensorSpec(height=64, width=64), batch_size=3)
    out = prep.prepare([buf.getvalue(), gif.getvalue(), encode(photo)])
    assert out.errors == [None, None, None]
    cmyk, first_frame, plain = out.tensors.astype(int)
    assert np.abs(cmyk - plain).mean() < 12
    assert np.abs(first_frame - plain).mean() < 12  # the first frame, not the inverted second one


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(preprocessor, orientation):
    photo = load_photo("coffee")
    upright = preprocessor.prepare([encode(photo, "PNG")]).tensors[0]
    rotated = preprocessor.prepare([oriented(photo, orientation, "PNG")]).tensors[0]
    assert _max_diff(rotated, upright) <= 2


def test_float_nchw_spec_normalises():
    spec = TensorSpec.from_model_input("FP32", (3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert spec.channels_first and (spec.height, spec.width) == (64, 64)
    prep = Preprocessor(spec, batch_size=2)
    white = encode(np.full((80, 100, 3), 255, np.uint8))
    out = prep.prepare([white])
    assert out.tensors.shape == (1, 3, 64, 64) and out.tensors.dtype == np.float32
    assert np.allclose(out.tensors, 1.0, atol=1e-5)


def test_spec_follows_the_model_and_rejects_conflicts():
    assert TensorSpec.from_model_input("FP32", (3, -1, -1), size=(299, 299)).shape == (3, 299, 299)
    assert TensorSpec.from_model_input("UINT8", (-1, -1, 3)).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="does not match the model input"):
        TensorSpec.from_model_input("UINT8", (224, 224, 3), size=(299, 299))
    with pytest.raises(ValueError):
        TensorSpec.from_model_input("FP32", (1280,))
    with pytest.raises(ValueError):
        TensorSpec.from_model_input("INT64", (224, 224, 3))


def test_seed_api_single_batch_and_errors(tmp_path):
    from embedding_pipeline.preprocess.jax_preprocessor import JAXImagePreprocessor, PreprocessError
    from embedding_pipeline.settings import load_settings

    settings = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})
    pre = JAXImagePreprocessor(image_size=(48, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), settings=settings)
    white = tmp_path / "white.png"
    white.write_bytes(encode(np.full((60, 50, 3), 255, np.uint8)))
    single = pre.preprocess_single(white)
    assert single.shape == (3, 48, 32) and single.dtype == np.float32 and np.allclose(single, 1.0, atol=1e-5)
    assert pre.preprocess_batch([white, str(white)]).shape == (2, 3, 48, 32)
    with pytest.raises(PreprocessError) as info:
        pre.preprocess_batch([white, tmp_path / "missing.png", b"not an image"])
    assert set(info.value.errors) == {1, 2} and "file not found" in info.value.errors[1]
    many = pre.preprocess_many([b"junk", white])
    assert many.tensors.shape == (1, 3, 48, 32) and many.errors[0].kind == "decode_error"
