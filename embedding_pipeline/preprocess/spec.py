"""What the model wants as input, derived from the model's own metadata (never hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass, replace

_DTYPES = {"UINT8": "uint8", "FP32": "float32", "FP16": "float16"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TensorSpec:
    """The model input a preprocessor must produce, per image (the batch dimension is added by batching).

    ``uint8`` inputs get raw pixels (the model normalises them itself); float inputs get
    ``(pixel / 255 - mean) / std`` per channel.
    """

    height: int = 224
    width: int = 224
    dtype: str = "uint8"
    channels_first: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w = self.height, self.width
        return (3, h, w) if self.channels_first else (h, w, 3)

    @property
    def layout(self) -> str:
        return "CHW" if self.channels_first else "HWC"

    def describe(self) -> str:
        return f"{self.layout} {self.dtype} {list(self.shape)}"

    @classmethod
    def from_model_input(
        cls,
        datatype: str,
        shape: tuple[int, ...],
        size: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> "TensorSpec":
        """From Triton's input metadata, e.g. ``("UINT8", (224, 224, 3))`` or ``("FP32", (3, -1, -1))``.

        ``size`` (height, width) fills spatial dimensions the model leaves dynamic (-1); it must agree with
        fixed ones, so a configured size can never silently differ from what the model was built for.
        """
        if datatype not in _DTYPES:
            raise ValueError(f"unsupported model input type {datatype}; expected one of {sorted(_DTYPES)}")
        if len(shape) != 3 or 3 not in (shape[0], shape[-1]):
            raise ValueError(f"model input shape {list(shape)} is not an image: expected (3, H, W) or (H, W, 3)")
        channels_first = shape[0] == 3 and shape[-1] != 3
        dims = (shape[1], shape[2]) if channels_first else (shape[0], shape[1])
        chosen = []
        for model_dim, wanted in zip(dims, size or (None, None)):
            if model_dim > 0:
                if wanted is not None and wanted != model_dim:
                    assert size is not None  # wanted came from it
                    raise ValueError(f"preprocess.image_size {list(size)} does not match the model input {list(shape)}")
                chosen.append(int(model_dim))
            elif wanted is not None:
                chosen.append(int(wanted))
            else:
                chosen.append(224)  # dynamic and unconfigured: the common ImageNet size
        spec = cls(height=chosen[0], width=chosen[1], dtype=_DTYPES[datatype], channels_first=channels_first)
        if mean is not None:
            spec = replace(spec, mean=_triple(mean, "mean"))
        if std is not None:
            spec = replace(spec, std=_triple(std, "std"))
        return spec


def _triple(values: tuple[float, ...], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {len(values)}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError("std values must be > 0")
    return values
