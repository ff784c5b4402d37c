"""The real bundled Triton serving the real default model, checked against ONNX Runtime run in-process."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from embedding_pipeline.runtime import processes
from embedding_pipeline.serving.client import TritonClientError, TritonEmbedder
from embedding_pipeline.serving.server import PROCESS_NAME, start_triton, triton_status

pytestmark = pytest.mark.integration

SIZE = 224


def _crop(image: np.ndarray) -> np.ndarray:
    """Resize the short side to 256 and centre-crop 224 (the model's preprocessing), as uint8 RGB."""
    pil = Image.fromarray(image).convert("RGB")
    scale = 256 / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    left, top = (pil.width - SIZE) // 2, (pil.height - SIZE) // 2
    return np.asarray(pil.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import skimage.data as data

    names = ["chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle_left", "horse", "retina"]
    loaders = {"motorcycle_left": lambda: data.stereo_motorcycle()[0]}
    out = {}
    for name in names:
        image = loaders[name]() if name in loaders else getattr(data, name)()
        if image.dtype != np.uint8:
            image = (image.astype(np.float64) * 255 / max(image.max(), 1)).astype(np.uint8)
        out[name] = _crop(image)
    return out


@pytest.fixture(scope="module")
def embedder(triton_settings):
    triton = triton_settings.triton
    with TritonEmbedder(triton.url, triton.model_name, timeout_s=triton.timeout_s) as client:
        client.wait_ready(10)
        yield client


@pytest.fixture(scope="module")
def reference(triton_settings):
    """The served model.onnx, run in this process with ONNX Runtime."""
    import onnxruntime as ort

    path = triton_settings.paths.model_repository / triton_settings.triton.model_name / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def test_input_spec_comes_from_the_server(embedder, triton_settings):
    spec = embedder.input_spec()
    assert spec.datatype == "UINT8"
    assert spec.shape == (SIZE, SIZE, 3)
    assert spec.output_dim == 1280
    assert spec.max_batch_size == 32
    assert (spec.name, spec.output_name) == ("image", "embedding")
    # The label names the served file too, so a replaced model never passes for the old one.
    from embedding_pipeline.serving.models import default_model_path, file_sha256

    sha = file_sha256(default_model_path(triton_settings.paths))
    assert embedder.model_version_label() == f"image_embedder:1@{sha[:12]}"


def test_triton_matches_onnxruntime_in_process(embedder, reference, photos):
    batch = np.stack(list(photos.values()))
    served = embedder.embed(batch)
    assert served.dtype == np.float32 and served.shape == (len(batch), 1280)
    assert np.max(np.abs(served - reference(batch))) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_batch_larger_than_max_batch_size_is_split(embedder, reference, photos):
    rng = np.random.default_rng(1)
    base = list(photos.values())
    # 40 distinct images, so a misplaced chunk cannot go unnoticed.
    batch = np.stack([np.roll(base[i % len(base)], shift=int(rng.integers(0, 50)), axis=1) for i in range(40)])
    served = embedder.embed(batch)
    assert served.shape == (40, 1280)
    expected = np.concatenate([reference(batch[:20]), reference(batch[20:])])
    assert np.max(np.abs(served - expected)) <= 1e-5
    assert embedder.embed(batch[:0]).shape == (0, 1280)


def test_pretrained_weights_make_sense(embedder, photos):
    chelsea, coffee = photos["chelsea"], photos["coffee"]
    a, flipped, b = embedder.embed(np.stack([chelsea, chelsea[:, ::-1], coffee]))
    assert float(a @ flipped) > 0.8
    assert float(a @ b) < 0.5


def test_wrong_input_is_refused_before_sending(embedder):
    with pytest.raises(TritonClientError, match="224x224x3"):
        embedder.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))
    with pytest.raises(TritonClientError, match="float32"):
        embedder.embed(np.zeros((1, SIZE, SIZE, 3), dtype=np.float32))


def test_missing_model_gives_a_clear_error(triton_settings):
    with TritonEmbedder(triton_settings.triton.url, "no_such_model") as client:
        with pytest.raises(TritonClientError, match="no_such_model") as info:
            client.input_spec()
        assert triton_settings.triton.url in str(info.value)
        with pytest.raises(TritonClientError, match="'no_such_model'.*not ready"):
            client.wait_ready(0.5)


def test_start_is_idempotent(triton_settings):
    before = processes.read(triton_settings.paths.run, PROCESS_NAME)
    assert before is not None
    started = time.monotonic()
    start_triton(triton_settings)
    assert time.monotonic() - started < 1.0
    assert processes.read(triton_settings.paths.run, PROCESS_NAME) == before
    status = triton_status(triton_settings)
    assert status["managed_pid"] == before.pid and status["server_ready"] and status["model_ready"]


def test_remote_url_is_never_started(triton_settings):
    # TEST-NET-1 address: not loopback, so the pipeline must refuse rather than start a server for it.
    remote = triton_settings.model_copy(
        update={"triton": triton_settings.triton.model_copy(update={"url": "192.0.2.1:18000"})}
    )
    with pytest.raises(processes.ServiceError, match=r"'image_embedder' at http://192\.0\.2\.1:18000"):
        start_triton(remote)


def test_concurrent_requests_from_several_clients(triton_settings, reference, photos):
    # Concurrent requests let Triton hand several requests to one execute() call, which merges them into one
    # ONNX Runtime run; each caller must still get its own rows back.
    from concurrent.futures import ThreadPoolExecutor

    triton = triton_settings.triton
    images = list(photos.values())

    def work(offset: int) -> list[tuple[int, np.ndarray]]:
        # tritonclient is not thread-safe: one client per thread.
        with TritonEmbedder(triton.url, triton.model_name) as client:
            picks = [(offset + k) % len(images) for k in range(6)]
            return [(i, client.embed(images[i][None])[0]) for i in picks]

    with ThreadPoolExecutor(4) as pool:
        results = [row for rows in pool.map(work, range(4)) for row in rows]
    expected = reference(np.stack(images))
    for index, vector in results:
        assert np.max(np.abs(vector - expected[index])) <= 1e-5


def test_admin_apis_need_the_key_of_this_start(triton_settings):
    """Model loads, shared-memory registration and log settings are refused without the key the pipeline made when
    it started the server; inference-side APIs stay open; the pipeline's own calls carry the key."""
    import os
    import stat

    import requests

    from embedding_pipeline.serving import admin
    from embedding_pipeline.serving.server import base_url

    triton = triton_settings.triton
    url = base_url(triton)
    key_file = triton_settings.paths.run / admin.KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    load = f"{url}/v2/repository/models/{triton.model_name}/load"
    refused = requests.post(load, timeout=30)
    assert refused.status_code in (401, 403), refused.text
    wrong = requests.post(load, headers={admin.HEADER: "guess"}, timeout=30)
    assert wrong.status_code in (401, 403)
    for path in ("/v2/systemsharedmemory/region/x/register", "/v2/logging", "/v2/repository/index"):
        assert requests.post(f"{url}{path}", json={}, timeout=30).status_code in (401, 403), path
    allowed = requests.post(load, headers=admin.headers(triton_settings.paths.run), timeout=60)
    assert allowed.status_code == 200, allowed.text
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    assert requests.get(f"{url}/v2/models/{triton.model_name}", timeout=30).status_code == 200
