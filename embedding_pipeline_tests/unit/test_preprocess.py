"""Decode + JAX kernels against a Pillow reference of the same resize/crop."""

import numpy as np
import pytest
from PIL import Image

from embedding_pipeline.preprocess.decode import Geometry
from embedding_pipeline.preprocess.preprocessor import Preprocessor
from embedding_pipeline.preprocess.spec import TensorSpec
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.images import encode


def pillow_reference(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    h, w = array.shape[:2]
    top, left, side_y, side_x = geometry.crop_box(h, w)
    box = (left, top, left + side_x, top + side_y)
    size = (geometry.image_size, geometry.image_size)
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR, box=box))


@pytest.fixture(scope="module")
def preprocessor(tmp_path_factory):
    return Preprocessor(TensorSpec(), batch_size=4, cache_dir=tmp_path_factory.mktemp("jax"))


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "rocket"])
def test_matches_pillow_within_two_grey_levels(preprocessor, name):
    photo = load_photo(name)
    out = preprocessor.prepare([encode(photo)])
    assert out.errors == [None]
    (tensor,) = out.tensors
    assert tensor.shape == (224, 224, 3) and tensor.dtype == np.uint8
    diff = np.abs(tensor.astype(int) - pillow_reference(photo, preprocessor.geometry).astype(int))
    assert diff.max() <= 2


def test_large_jpeg_uses_reduced_decode_and_stays_close(preprocessor):
    big = np.asarray(Image.fromarray(load_photo("coffee")).resize((2400, 1600), Image.BICUBIC))
    out = preprocessor.prepare([encode(big, "JPEG", quality=95)])
    ref = pillow_reference(big, preprocessor.geometry)
    # Draft decoding averages in the DCT domain: close to, not identical with, a full decode.
    assert np.abs(out.tensors[0].astype(int) - ref.astype(int)).mean() < 2.0


def test_bad_items_are_reported_and_good_ones_kept(preprocessor):
    good = encode(load_photo("chelsea"))
    truncated = good[: len(good) // 3]
    out = preprocessor.prepare([b"garbage", good, truncated])
    assert out.errors[0].startswith("cannot decode image")
    assert out.errors[1] is None
    assert out.errors[2] is not None
    assert out.tensors.shape == (1, 224, 224, 3)


def test_modes_are_converted_to_rgb(preprocessor):
    grey = load_photo("camera")
    rgba = np.dstack([load_photo("chelsea"), np.full((300, 451), 128, np.uint8)])
    out = preprocessor.prepare([encode(grey), encode(rgba), encode(grey.astype(np.uint16) * 256)])
    assert out.errors == [None, None, None]
    assert np.allclose(out.tensors[0][..., 0], out.tensors[0][..., 1])
    # A 16-bit image scaled to 8 bits gives the same picture as the 8-bit one.
    assert np.abs(out.tensors[0].astype(int) - out.tensors[2].astype(int)).max() <= 2


def test_exif_orientation_is_applied(preprocessor):
    photo = load_photo("coffee")
    img = Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1)))  # stored rotated...
    exif = img.getexif()
    exif[0x0112] = 6  # ...and tagged "rotate 90° clockwise to display"
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    upright = preprocessor.prepare([encode(photo, "JPEG", quality=95)]).tensors[0]
    oriented = preprocessor.prepare([buf.getvalue()]).tensors[0]
    assert np.abs(oriented.astype(int) - upright.astype(int)).mean() < 3


def test_float_nchw_spec_normalises():
    spec = TensorSpec.from_model_input("FP32", (3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert spec.channels_first and spec.image_size == 64
    prep = Preprocessor(spec, batch_size=2)
    white = encode(np.full((80, 100, 3), 255, np.uint8))
    out = prep.prepare([white])
    assert out.tensors.shape == (1, 3, 64, 64) and out.tensors.dtype == np.float32
    assert np.allclose(out.tensors, 1.0, atol=1e-5)


def test_spec_rejects_non_images():
    with pytest.raises(ValueError):
        TensorSpec.from_model_input("FP32", (1280,))
    with pytest.raises(ValueError):
        TensorSpec.from_model_input("INT64", (224, 224, 3))
