"""Qwen2-VL image preprocessing in numpy + PIL, matching transformers' `Qwen2VLImageProcessorPil`
(which Qwen2.5-VL and Qwen3-VL use too, with their own patch size and normalisation).

The pipeline is the one transformers runs without torchvision: RGB conversion (alpha composited
onto white), `smart_resize` to a multiple of 28, PIL bicubic resize on uint8, rescale by 1/255,
CLIP normalization, and patchify into (gh*gw, C*T*P*P) rows in 2x2-merge-block-major order. Our
rescale + normalize is a per-channel 256-entry lookup table built with transformers' own dtype
sequence (float64 rescale, float32 normalize), so the values are bit-identical while the hot path
is a single uint8 gather per channel. Training splits the two halves: `patchify` keeps uint8
patches on the host (1/8 of the bytes through the data pipeline), `normalize_patches` runs the
same table on the device.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

__all__ = [
    "ImageError",
    "ImageProcessorConfig",
    "ProcessedImage",
    "load_image",
    "normalize_patches",
    "patchify",
    "process_image",
    "patch_dim",
    "raw_patch_dim",
    "smart_resize",
    "vision_patch_positions",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
# VLM2Vec's collator blows images with a side under 28 px up to 56x56 (bicubic) before the processor.
SMALL_IMAGE_SIDE = 28
SMALL_IMAGE_RESIZE = (56, 56)

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image could not be read or decoded."""


def load_image(source: ImageSource) -> Image.Image:
    """Load `source` (path, bytes, PIL image or uint8 array) as a fully decoded RGB PIL image.

    Decoding is forced here so truncated files fail at load time with a clear message, not deep
    inside a data loader. Transparency is composited onto white as transformers does (for arrays
    with its numpy formula, for PIL images with `alpha_composite`). No EXIF rotation is applied,
    as in VLM2Vec, which opens files with plain `Image.open`.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        what = f"image file '{os.fspath(source)}'"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = f"image bytes ({len(source)} bytes)"
        source = io.BytesIO(source)
    elif isinstance(source, Image.Image):
        what = "PIL image"
    else:
        raise ImageError(
            f"cannot load an image from {type(source).__name__}; pass a path, bytes, a PIL image "
            "or a uint8 numpy array"
        )
    img = None
    try:
        img = source if isinstance(source, Image.Image) else Image.open(source)
        img.load()
    except FileNotFoundError as e:
        raise ImageError(f"{what}: file not found ({e.strerror}); check the path and image_dir") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if img is not None and img is not source:
            img.close()
        raise ImageError(
            f"{what}: cannot read or decode ({type(e).__name__}: {e}); the data is corrupt, truncated or "
            "not an image; re-download it or drop this sample"
        ) from e
    return _pil_to_rgb(img)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion exactly as transformers' `convert_to_rgb` for PIL inputs."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """RGB conversion exactly as transformers' `convert_to_rgb` for channels-last uint8 arrays."""
    if arr.dtype != np.uint8:
        raise ImageError(f"image array: dtype {arr.dtype} is not supported; convert it to uint8 (0-255)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    if arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[..., 3:4] / 255
        rgb = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return Image.fromarray(rgb, mode="RGB")
    raise ImageError(
        f"image array: shape {arr.shape} is not supported; pass (H, W), (H, W, 3) or (H, W, 4) uint8"
    )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min, max], aspect kept.

    Identical to transformers' Qwen2-VL `smart_resize` (Python `round`, so ties go to even).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Qwen2-VL image processor settings (defaults are transformers' class defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | os.PathLike,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` in `path`; explicit arguments override the file.

        Hub files spell the pixel bounds as top-level `min_pixels`/`max_pixels`; transformers 5.x
        writes `size: {shortest_edge, longest_edge}`. When both appear the top-level keys win,
        as in transformers' constructor. A missing file gives the defaults.
        """
        file = os.path.join(os.fspath(path), "preprocessor_config.json")
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raw = {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read image processor config {file}: {e}; fix or delete the file") from e
        if not isinstance(raw, dict):
            raise ValueError(f"image processor config {file} must hold a JSON object, got {type(raw).__name__}")
        size = raw.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"image processor config {file}: `size` must be an object, got {size!r}")
        fields: dict = {}
        file_min = raw.get("min_pixels", size.get("shortest_edge"))
        file_max = raw.get("max_pixels", size.get("longest_edge"))
        if file_min is not None:
            fields["min_pixels"] = int(file_min)
        if file_max is not None:
            fields["max_pixels"] = int(file_max)
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if raw.get(key) is not None:
                fields[key] = int(raw[key])
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                fields[key] = tuple(float(v) for v in raw[key])
        if min_pixels is not None:
            fields["min_pixels"] = min_pixels
        if max_pixels is not None:
            fields["max_pixels"] = max_pixels
        return cls(**fields)


@dataclass
class ProcessedImage:
    """One image as the vision tower consumes it."""

    patches: np.ndarray  # block-major over merge x merge blocks: float32 (gh*gw, C*T*P*P), or `patchify`'s uint8 (gh*gw, C*P*P)
    grid_thw: tuple[int, int, int]  # (1, gh, gw) in patch units
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Number of `<|image_pad|>` tokens: the merger folds merge x merge patches into one."""
        _, gh, gw = self.grid_thw
        return gh * gw // self.merge_size**2


@lru_cache(maxsize=8)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32 table of transformers' rescale+normalize for every uint8 value.

    Mirrors its dtypes exactly: rescale in float64 then cast to float32, normalize in float32.
    """
    values = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    lut = ((values[:, None] - mean32) / std32).T.copy()
    lut.flags.writeable = False
    return lut


def resized_size(width: int, height: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) that `process_image` resizes a width x height image to: a side under 28 px
    blows the image up to 56 x 56 first, then `smart_resize`. Needs only the size, so a header
    suffices (the training-set profile measures images this way, without decoding them)."""
    if width < SMALL_IMAGE_SIDE or height < SMALL_IMAGE_SIDE:
        width, height = SMALL_IMAGE_RESIZE
    factor = config.patch_size * config.merge_size
    return smart_resize(height, width, factor=factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels)


def patchify(source: ImageSource, config: ImageProcessorConfig | None = None) -> ProcessedImage:
    """Load, resize and patchify one image, keeping its uint8 pixels: patches (gh*gw, C*P*P), one
    frame (a still image repeats it over T). An eighth of the bytes of `process_image`'s float32
    patches: what training records carry to the device, which normalises (`normalize_patches`)."""
    config = config or ImageProcessorConfig()
    img = load_image(source)
    if img.width < SMALL_IMAGE_SIDE or img.height < SMALL_IMAGE_SIDE:
        img = img.resize(SMALL_IMAGE_RESIZE, Image.Resampling.BICUBIC)
    p, m = config.patch_size, config.merge_size
    height, width = resized_size(img.width, img.height, config)
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(img)  # (H, W, C) uint8
    channels = pixels.shape[2]
    gh, gw = height // p, width // p
    blocks = (
        pixels.reshape(gh // m, m, p, gw // m, m, p, channels)
        .transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, P, P)
        .reshape(gh * gw, channels * p * p)
    )
    return ProcessedImage(patches=blocks, grid_thw=(1, gh, gw), merge_size=m)


def patch_dim(config: ImageProcessorConfig, channels: int = 3) -> int:
    """Width of `process_image`'s float32 patches: C * T * P * P (what the vision tower embeds)."""
    return channels * config.temporal_patch_size * config.patch_size**2


def raw_patch_dim(config: ImageProcessorConfig, channels: int = 3) -> int:
    """Width of `patchify`'s uint8 patches: C * P * P (the frame is repeated over T on the device)."""
    return channels * config.patch_size**2


def normalize_patches(raw: Any, config: ImageProcessorConfig) -> Any:
    """uint8 patches (..., C*P*P) -> the model's float32 patches (..., C*T*P*P): rescale, normalise
    (the lookup table, so bit-identical to transformers) and repeat the frame over T. Takes numpy
    or JAX arrays (`jnp` ops on a jax.Array): the same function runs on the host and on the device."""
    xp = np if isinstance(raw, np.ndarray) else jnp
    lut = xp.asarray(_normalize_lut(tuple(config.image_mean), tuple(config.image_std)))
    channels, t = lut.shape[0], config.temporal_patch_size
    # explicit P*P, not -1: a side with no images (text-only targets) has zero rows, and a zero-size
    # array cannot infer a -1 dimension
    frames = raw.reshape(*raw.shape[:-1], channels, raw.shape[-1] // channels)
    values = lut[xp.arange(channels)[:, None], frames.astype(xp.int32)]  # (..., C, P*P)
    values = xp.broadcast_to(values[..., None, :], (*values.shape[:-1], t, values.shape[-1]))
    return values.reshape(*raw.shape[:-1], channels * t * frames.shape[-1])


def process_image(source: ImageSource, config: ImageProcessorConfig | None = None) -> ProcessedImage:
    """Load and preprocess one image into Qwen2-VL vision patches (matches transformers to float32 bits)."""
    config = config or ImageProcessorConfig()
    image = patchify(source, config)
    return ProcessedImage(normalize_patches(image.patches, config), image.grid_thw, image.merge_size)


def vision_patch_positions(grid_thw: tuple[int, int, int], merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch, int32 (t*gh*gw, 2), in the block-major order of `process_image`.

    Same as transformers' `get_vision_position_ids`; the vision rotary embedding reads these.
    """
    t, gh, gw = (int(v) for v in grid_thw)
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.int32), np.arange(gw, dtype=np.int32), indexing="ij")
    block = (gh // merge_size, merge_size, gw // merge_size, merge_size)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(block).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))
