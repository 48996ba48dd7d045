"""Image sizes for the synthetic benchmark's `mmeb_shape` scale: canvases shaped like MMEB-train's.

The synthetic scenes are 84x84 (nine merged Qwen2-VL tokens). MMEB's images are not: natural photos
cost about 230-750 image tokens (640x480 is 391), a few are small, and documents (DocVQA,
InfographicsVQA, ChartQA: half of MMEB-train's VQA subsets) reach the processor's 1280-token cap,
tall or wide. A `Shapes` mix draws one `Canvas` per scene from a seeded RNG, with every area a
fraction of `Shapes.max_pixels`, so one field scales the whole distribution: the default cap of
320 tokens keeps CPU benchmarks cheap, 28*28*1280 gives MMEB's document sizes.

On its canvas the scene is drawn scaled into a square (`Canvas.scene_box`) with its discrete content
unchanged, so every task stays what it was: a photo letterboxes it, a document sets it as a figure in
a page of pseudo-text. Pseudo-words are consonant-vowel syllables: they never spell a colour, shape
or number word, so a page names nothing that the hold-out or the answers are about.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "JPEG_QUALITY",
    "PAGE",
    "Canvas",
    "Shapes",
    "big_text_mask",
    "draw_canvas",
    "paint_page",
    "scaled_box",
    "text_size",
]

JPEG_QUALITY = 90
PAGE = (250, 250, 246)
TEXT_INK = (90, 90, 90)
TITLE_INK = (30, 30, 60)
LINE_HEIGHT = 14  # the bitmap font's 11 px and a gap
MARGIN = 10
_CONSONANTS = "bdfgklmnpstv"  # no c, h, q, r, w, x, y, z: CV-syllables then spell no vocabulary word
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Shapes:
    """An image-size mix. Areas are fractions of `max_pixels` (no image exceeds it), aspects are
    width / height. Each scene is a document with its meta-task's share (`document_shares`, 0 where
    not listed), else small with `small_share`, else a photo; a drawn aspect is jittered by up to
    `aspect_jitter` (relative), so sizes rarely repeat. Images of `jpeg_min_pixels` or more are
    written as JPEG, smaller ones (thumbnails, most crops) as PNG."""

    max_pixels: int = 28 * 28 * 320
    small_share: float = 0.1
    small_area: tuple[float, float] = (0.01, 0.05)
    photo_area: tuple[float, float] = (0.18, 0.6)  # MMEB's 230-750 of 1280 tokens
    photo_aspects: tuple[float, ...] = (4 / 3, 4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)
    document_area: tuple[float, float] = (0.6, 1.0)
    document_aspects: tuple[float, ...] = (1 / 1.414, 1 / 1.414, 1 / 2, 1 / 3, 16 / 9, 2.0, 3.0)
    document_shares: tuple[tuple[str, float], ...] = (
        ("vqa", 0.5), ("classification", 0.05), ("retrieval", 0.05), ("grounding", 0.0)
    )  # fmt: skip
    aspect_jitter: float = 0.06
    jpeg_min_pixels: int = 96 * 96


@dataclass(frozen=True)
class Canvas:
    """A written image's size and layout: the scene is drawn into the square `scene_box` (left,
    top, side); a document's page text comes from `text_seed`."""

    kind: str  # "small" | "photo" | "document"
    width: int
    height: int
    scene_box: tuple[int, int, int]
    text_seed: int = 0


def draw_canvas(rng: random.Random, shapes: Shapes, meta_task: str) -> Canvas:
    """One canvas of the mix, for a scene of a dataset of `meta_task`."""
    u = rng.random()
    document = dict(shapes.document_shares).get(meta_task, 0.0)
    if u < document:
        kind, area, aspects = "document", shapes.document_area, shapes.document_aspects
    elif u < document + (1 - document) * shapes.small_share:
        kind, area, aspects = "small", shapes.small_area, shapes.photo_aspects
    else:
        kind, area, aspects = "photo", shapes.photo_area, shapes.photo_aspects
    pixels = rng.uniform(*area) * shapes.max_pixels
    aspect = rng.choice(aspects) * (1 + rng.uniform(-shapes.aspect_jitter, shapes.aspect_jitter))
    width, height = max(28, round(math.sqrt(pixels * aspect))), max(28, round(math.sqrt(pixels / aspect)))
    while width * height > shapes.max_pixels:
        width, height = (width - 1, height) if width >= height else (width, height - 1)
    short = min(width, height)
    if kind != "document":  # a photo: the scene fills the short side, somewhere along the long one
        side = short
        return Canvas(kind, width, height, (rng.randint(0, width - side), rng.randint(0, height - side), side))
    side = round(short * rng.uniform(0.6, 0.85))  # a figure on a page, clear of its margins
    left = rng.randint(min(MARGIN, width - side), max(width - side - MARGIN, 0))
    top = rng.randint(min(LINE_HEIGHT + MARGIN, height - side), max(height - side - MARGIN, 0))
    return Canvas(kind, width, height, (left, top, side), rng.getrandbits(32))


def scaled_box(canvas: Canvas, box: tuple[int, int, int, int], scene_size: int) -> tuple[int, int, int, int]:
    """A box in scene coordinates (0..scene_size) as a box of the canvas."""
    left, top, side = canvas.scene_box
    k = side / scene_size
    return (left + round(box[0] * k), top + round(box[1] * k), left + round(box[2] * k), top + round(box[3] * k))


@cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()  # the bitmap font: no FreeType, same pixels everywhere


def big_text_mask(text: str, width: int, height: int) -> Image.Image:
    """`text` in the bitmap font as an "L" mask scaled (nearest) to width x height."""
    _, _, w, h = _font().getbbox(text)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=_font(), fill=255)
    return mask.resize((max(1, width), max(1, height)), Image.Resampling.NEAREST)


def text_size(text: str) -> tuple[int, int]:
    """Width and height of `text` in the bitmap font."""
    _, _, w, h = _font().getbbox(text)
    return w, h


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 4)))


def _line(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(_word(rng))
    return " ".join(words)[:chars].rstrip()


def paint_page(img: Image.Image, canvas: Canvas) -> None:
    """A document's page around its figure: a title at double size, then lines of pseudo-text in
    paragraphs, in the column(s) the figure leaves free. The figure's square is left untouched."""
    rng = random.Random(canvas.text_seed)
    draw = ImageDraw.Draw(img)
    char_w, _ = text_size("m")
    left, top, side = canvas.scene_box
    title = _line(rng, max(1, (canvas.width - 2 * MARGIN) // (2 * char_w)) // 2).capitalize()
    w, h = text_size(title)
    img.paste(TITLE_INK, (MARGIN, MARGIN // 2), big_text_mask(title, 2 * w, 2 * h))
    y = MARGIN // 2 + 2 * h + MARGIN
    while y + LINE_HEIGHT < canvas.height - MARGIN // 2:
        if rng.random() < 0.12:  # a paragraph break
            y += LINE_HEIGHT // 2
        beside = y + LINE_HEIGHT > top - MARGIN // 2 and y < top + side + MARGIN // 2
        spans = [(MARGIN, canvas.width - MARGIN)]
        if beside:  # the free columns left and right of the figure
            spans = [(MARGIN, left - MARGIN), (left + side + MARGIN, canvas.width - MARGIN)]
        for x0, x1 in spans:
            chars = (x1 - x0) // char_w - rng.randint(0, 8)
            if chars >= 6:
                draw.text((x0, y), _line(rng, chars), font=_font(), fill=TEXT_INK)
        y += LINE_HEIGHT
