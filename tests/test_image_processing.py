"""vlm2vec_jax.processing.image against the real transformers `Qwen2VLImageProcessorPil`.

Random-noise images: smooth images hide resize differences, noise does not.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)
from transformers.vision_utils import get_vision_position_ids

from vlm2vec_jax.models.backbones import BACKBONES
from vlm2vec_jax.models.model_dir_files import HUB_PREPROCESSOR_CONFIG, image_processor_settings
from vlm2vec_jax.processing.image import (
    ImageError,
    ImageProcessorConfig,
    ProcessedImage,
    load_image,
    process_image,
    smart_resize,
    vision_patch_positions,
)


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def hf_process(image, **kwargs) -> tuple[np.ndarray, tuple[int, ...]]:
    out = Qwen2VLImageProcessorPil(**kwargs)(images=image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_matches(ours: ProcessedImage, ref: tuple[np.ndarray, tuple[int, ...]]) -> None:
    pixel_values, grid = ref
    assert ours.grid_thw == grid
    assert ours.patches.dtype == np.float32
    assert ours.patches.shape == pixel_values.shape
    # Exact: the README says bit for bit.
    np.testing.assert_array_equal(ours.patches, pixel_values)


@pytest.mark.parametrize(
    "h,w",
    [(28, 28), (56, 56), (224, 224), (100, 333), (480, 640), (1000, 37), (37, 1000), (29, 57), (333, 100)],
)
def test_matches_transformers(h: int, w: int) -> None:
    img = Image.fromarray(noise(h, w, seed=h * 7919 + w))
    assert_matches(process_image(img), hf_process(img))


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
@pytest.mark.parametrize("h,w", [(100, 333), (480, 640), (37, 1000)])
def test_each_backbones_processor_matches_transformers(tmp_path: Path, model_type: str, h: int, w: int) -> None:
    """The settings a backbone's released models carry (Qwen3-VL: 16-px patches, a 32-px resize
    factor, mean and std 0.5), written by transformers' processor and read back by ours."""
    Qwen2VLImageProcessorPil(**image_processor_settings(model_type)).save_pretrained(tmp_path)
    config = ImageProcessorConfig.from_pretrained_dir(tmp_path)
    img = Image.fromarray(noise(h, w, seed=h + 3 * w))
    ours = process_image(img, config)
    assert_matches(ours, hf_process(img, **image_processor_settings(model_type)))
    assert ours.patches.shape[1] == 3 * 2 * image_processor_settings(model_type)["patch_size"] ** 2


@pytest.mark.parametrize("h,w", [(10, 20), (27, 100), (100, 27), (1, 1), (27, 27)])
def test_small_images_are_blown_up_to_56(h: int, w: int) -> None:
    """VLM2Vec's collator: a side under 28 px -> 56x56 bicubic, then the processor."""
    img = Image.fromarray(noise(h, w, seed=h + w))
    ours = process_image(img)
    assert ours.grid_thw == (1, 4, 4)
    assert_matches(ours, hf_process(img.resize((56, 56), Image.Resampling.BICUBIC)))


def test_grayscale() -> None:
    gray = noise(90, 130, channels=1, seed=3)
    ref = hf_process(Image.fromarray(gray, mode="L"))
    assert_matches(process_image(Image.fromarray(gray, mode="L")), ref)
    assert_matches(process_image(gray), ref)
    assert_matches(process_image(gray[:, :, None]), ref)


def test_rgba_composited_on_white() -> None:
    rgba = noise(120, 90, channels=4, seed=4)
    pil = Image.fromarray(rgba, mode="RGBA")
    assert_matches(process_image(pil), hf_process(pil))
    assert_matches(process_image(rgba), hf_process(rgba))
    # Fully transparent pixels become white.
    clear = rgba.copy()
    clear[..., 3] = 0
    assert (np.asarray(load_image(clear)) == 255).all()
    assert (np.asarray(load_image(Image.fromarray(clear, mode="RGBA"))) == 255).all()


def test_palette_with_transparency() -> None:
    pal = Image.fromarray(noise(64, 64, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    assert_matches(process_image(pal), hf_process(pal))


def test_pixel_bounds_overrides() -> None:
    img = Image.fromarray(noise(480, 640, seed=6))
    small_max = 28 * 28 * 64
    ours = process_image(img, ImageProcessorConfig(max_pixels=small_max))
    assert_matches(ours, hf_process(img, max_pixels=small_max))
    assert ours.grid_thw[1] * ours.grid_thw[2] * 14 * 14 <= small_max

    tiny = Image.fromarray(noise(40, 60, seed=7))
    big_min = 28 * 28 * 16
    assert_matches(process_image(tiny, ImageProcessorConfig(min_pixels=big_min)), hf_process(tiny, min_pixels=big_min))


def test_num_tokens() -> None:
    ours = process_image(noise(480, 640))
    assert ours.grid_thw == (1, 34, 46)
    assert ours.num_tokens == 34 * 46 // 4
    assert ours.patches.shape == (34 * 46, 1176)


def test_all_input_kinds_agree(tmp_path: Path) -> None:
    arr = noise(77, 150, seed=8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    png = path.read_bytes()
    expected = process_image(arr)
    for source in (str(path), path, png, Image.open(path), Image.fromarray(arr)):
        got = process_image(source)
        assert got.grid_thw == expected.grid_thw
        np.testing.assert_array_equal(got.patches, expected.patches)
    assert_matches(expected, hf_process(arr))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (150, 77)


def _write_config(directory: Path, payload: dict) -> Path:
    directory.mkdir()
    (directory / "preprocessor_config.json").write_text(json.dumps(payload))
    return directory


HUB_JSON = HUB_PREPROCESSOR_CONFIG
V5_JSON = {
    "size": {"shortest_edge": 6272, "longest_edge": 401408},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessor",
}


@pytest.mark.parametrize("payload,expected", [(HUB_JSON, (3136, 12845056)), (V5_JSON, (6272, 401408))])
def test_preprocessor_config_spellings(tmp_path: Path, payload: dict, expected: tuple[int, int]) -> None:
    directory = _write_config(tmp_path / "ckpt", payload)
    cfg = ImageProcessorConfig.from_pretrained_dir(directory)
    assert (cfg.min_pixels, cfg.max_pixels) == expected
    hf = Qwen2VLImageProcessorPil.from_pretrained(directory)
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == expected
    assert cfg.image_mean == tuple(payload["image_mean"]) and cfg.merge_size == 2

    img = Image.fromarray(noise(900, 1200, seed=9))
    out = hf(images=img, return_tensors="np")
    assert_matches(process_image(img, cfg), (out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])))

    overridden = ImageProcessorConfig.from_pretrained_dir(directory, min_pixels=100, max_pixels=200_000)
    assert (overridden.min_pixels, overridden.max_pixels) == (100, 200_000)


def test_preprocessor_config_missing_and_broken(tmp_path: Path) -> None:
    assert ImageProcessorConfig.from_pretrained_dir(tmp_path) == ImageProcessorConfig()
    assert ImageProcessorConfig.from_pretrained_dir(tmp_path, max_pixels=5000).max_pixels == 5000
    defaults = ImageProcessorConfig()
    assert (defaults.min_pixels, defaults.max_pixels) == (3136, 1003520)
    hf = Qwen2VLImageProcessorPil()
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (defaults.min_pixels, defaults.max_pixels)

    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained_dir(tmp_path)


def test_smart_resize_sweep() -> None:
    sides = [1, 2, 13, 14, 27, 28, 29, 41, 42, 43, 55, 56, 70, 99, 100, 223, 224, 480, 640, 1000, 1023, 4000, 5601]
    bounds = [(3136, 1003520), (3136, 12845056), (100, 28 * 28 * 16), (28 * 28 * 64, 28 * 28 * 128)]
    checked = 0
    for h in sides:
        for w in sides:
            for lo, hi in bounds:
                try:
                    expected = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                    continue
                assert smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == expected
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 34, 46), (1, 72, 2), (1, 2, 72), (2, 6, 8)])
def test_patch_positions_match_transformers(grid: tuple[int, int, int]) -> None:
    ours = vision_patch_positions(grid, merge_size=2)
    ref = get_vision_position_ids(torch.tensor([grid]), 2).numpy()
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)


def test_patch_positions_follow_patch_order() -> None:
    """Row r of the positions is where row r of the patches came from."""
    arr = noise(56, 84, seed=10)
    out = process_image(arr)
    pos = vision_patch_positions(out.grid_thw, out.merge_size)
    ref = hf_process(arr)[0]
    for i in (0, 1, 2, 5, len(pos) - 1):
        r, c = pos[i]
        patch = np.asarray(load_image(arr))[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14, 0]
        # First channel, first temporal copy: a 14x14 block of normalized pixels.
        lut0 = (patch.astype(np.float64) / 255).astype(np.float32)
        expected = (lut0 - np.float32(0.48145466)) / np.float32(0.26862954)
        np.testing.assert_array_equal(out.patches[i, :196].reshape(14, 14), expected)
        np.testing.assert_array_equal(ref[i, :196].reshape(14, 14), expected)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "gone.jpg"
    with pytest.raises(ImageError, match="gone.jpg") as info:
        process_image(missing)
    assert "not found" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(noise(200, 200, seed=11)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png") as info:
        load_image(path)
    assert "truncated" in str(info.value)


def test_corrupt_data(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG definitely not an image" * 10)
    with pytest.raises(ImageError, match="garbage.png"):
        load_image(path)
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"not an image at all")
    with pytest.raises(ImageError, match="array"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="array"):
        load_image(np.zeros((8, 8, 2), dtype=np.uint8))


def test_extreme_aspect_ratio_raises() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        process_image(noise(28, 28 * 201))
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
