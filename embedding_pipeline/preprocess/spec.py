"""What the model wants as input, derived from the model's own metadata (never hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = {"UINT8": "uint8", "FP32": "float32", "FP16": "float16"}


@dataclass(frozen=True)
class TensorSpec:
    """The model input a preprocessor must produce, per image (the batch dimension is added by batching)."""

    image_size: int = 224
    dtype: str = "uint8"
    channels_first: bool = False
    # Used only for float inputs: (x / 255 - mean) / std per channel.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.image_size
        return (3, s, s) if self.channels_first else (s, s, 3)

    @classmethod
    def from_model_input(cls, datatype: str, shape: tuple[int, ...], **normalisation) -> "TensorSpec":
        """From Triton's input metadata, e.g. ``("UINT8", (224, 224, 3))`` or ``("FP32", (3, 224, 224))``."""
        if datatype not in _DTYPES:
            raise ValueError(f"unsupported model input type {datatype}; expected one of {sorted(_DTYPES)}")
        if len(shape) != 3 or 3 not in (shape[0], shape[-1]):
            raise ValueError(f"model input shape {shape} is not an image (3,H,W) or (H,W,3)")
        channels_first = shape[0] == 3 and shape[-1] != 3
        h, w = (shape[1], shape[2]) if channels_first else (shape[0], shape[1])
        if h != w or h <= 0:
            raise ValueError(f"model input {shape} must be a fixed square image")
        return cls(image_size=int(h), dtype=_DTYPES[datatype], channels_first=channels_first, **normalisation)
