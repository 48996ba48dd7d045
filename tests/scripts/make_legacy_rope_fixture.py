"""Writes tests/fixtures/legacy_rope_index.json: golden M-RoPE positions from transformers 4.x.

The ``"legacy"`` rule of `vlm2vec_jax.processing.rope_index` reproduces the `get_rope_index` that
VLM2Vec runs: its vendored `src/model/vlm_backbone/qwen2_vl/modeling_qwen2_vl.py` copies it from
transformers 4.x, and its requirements.txt pins transformers==4.52.3, whose
`Qwen2VLModel.get_rope_index` has the same logic (4.52 only moved it from
`Qwen2VLForConditionalGeneration` to `Qwen2VLModel`). `tests/test_rope_index_legacy.py` checks our
rule against this file; it needs neither torch nor transformers 4.x.

Run it under a throwaway environment, never the project's (which has transformers 5.x):

    python3 -m venv /tmp/tf4
    /tmp/tf4/bin/pip install torch==2.13.0 transformers==4.52.3
    /tmp/tf4/bin/python tests/scripts/make_legacy_rope_fixture.py

No download: the model is built from a tiny random config with Qwen2-VL's real special token ids.
Each case is one padded batch, laid out as `Batcher` lays it out (real tokens left- or
right-aligned, `<|endoftext|>` in the padding, attention mask 0 there), with `image_grid_thw`
holding every image of the batch in order, as Qwen2-VL's processor returns it. Cases marked
``deviation`` are inputs 4.x mishandles, where `rope_index`'s docstring says it deliberately
differs; they are kept to show what 4.x does there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_rope_index.json"

PAD, START, END, IMAGE, VIDEO = 151643, 151652, 151653, 151655, 151656
MERGE = 2
rng = np.random.default_rng(0)


def text(n: int) -> list[int]:
    """n ordinary text token ids (none of them special)."""
    return rng.integers(1000, 150000, size=n).tolist()


def img(t: int, h: int, w: int) -> tuple[int, int, int]:
    return (t, h, w)


def row(*parts) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Token ids and grids of one sequence: an int = that many text tokens, a grid = that image's
    pads, "S"/"E" = <|vision_start|>/<|vision_end|>."""
    ids, grids = [], []
    for part in parts:
        if isinstance(part, int):
            ids += text(part)
        elif isinstance(part, tuple):
            t, h, w = part
            ids += [IMAGE] * (t * h * w // MERGE**2)
            grids.append(part)
        else:
            ids.append({"S": START, "E": END}[part])
    return ids, grids


# VLM2Vec's Qwen2-VL prompts put bare <|image_pad|> runs before the instruction; the Qwen2-VL chat
# template frames each image as <|vision_start|> pads <|vision_end|>.
CASES: list[tuple[str, str, list, str | None]] = [
    ("text only", "right", [[9]], None),
    ("text only batch, right padding", "right", [[5], [11], [8]], None),
    ("text only batch, left padding", "left", [[5], [11], [8]], None),
    ("one image with vision_start, non-square", "right", [[3, "S", img(1, 4, 6), "E", 7]], None),
    ("one image with vision_start first", "right", [["S", img(1, 6, 6), "E", 5]], None),
    ("one image with vision_start, larger non-square grid", "right", [[4, "S", img(1, 12, 20), "E", 6]], None),
    ("VLM2Vec prompt: image first, no vision_start", "right", [[img(1, 6, 4), 9]], None),
    ("image mid-text, no vision_start", "right", [[4, img(1, 4, 8), 5]], None),
    (
        "two images with vision_start, different aspect ratios",
        "right",
        [[2, "S", img(1, 4, 8), "E", 5, "S", img(1, 8, 4), "E", 3]],
        None,
    ),
    ("two adjacent framed images", "right", [[1, "S", img(1, 4, 4), "E", "S", img(1, 2, 6), "E", 2]], None),
    ("two images, no vision_start", "right", [[img(1, 10, 2), 4, img(1, 2, 6), 1]], None),
    (
        "framed image then bare image",
        "right",
        [[2, "S", img(1, 4, 6), "E", 3, img(1, 6, 4), 2]],
        None,
    ),
    ("stray vision_start before text, bare image", "right", [[2, "S", 3, img(1, 4, 4), 2]], None),
    (
        "mixed batch, right padding: framed, text, bare",
        "right",
        [[3, "S", img(1, 4, 6), "E", 7], [12], [img(1, 6, 6), 4]],
        None,
    ),
    (
        "mixed batch, left padding: framed, text, bare",
        "left",
        [[3, "S", img(1, 4, 6), "E", 7], [12], [img(1, 6, 6), 4]],
        None,
    ),
    (
        "VLM2Vec batch, right padding: bare images and text",
        "right",
        [[img(1, 4, 8), 6], [10], [img(1, 8, 8), 3]],
        None,
    ),
    (
        "VLM2Vec batch, left padding: bare images and text",
        "left",
        [[img(1, 4, 8), 6], [10], [img(1, 8, 8), 3]],
        None,
    ),
    (
        "framed batch, left padding: two rows with images",
        "left",
        [["S", img(1, 4, 4), "E", 2], [1, "S", img(1, 6, 2), "E", 4, "S", img(1, 2, 4), "E", 1]],
        None,
    ),
    (
        "bare image before framed image",
        "right",
        [[2, img(1, 4, 4), 3, "S", img(1, 4, 8), "E", 2]],
        "4.x counts 1 image (one <|vision_start|>+pad pair) but lays out the first pad run it finds, "
        "the bare one, in 3-D with the first grid; the framed image's pads are numbered like text",
    ),
    (
        "bare-image row before framed-image row",
        "right",
        [[img(1, 4, 4), 3], [2, "S", img(1, 4, 8), "E", 2]],
        "4.x's image counter is global over the batch and does not advance for bare images, so row 1 "
        "reads row 0's grid (1, 4, 4) and lays out 4 of its 8 pads in 3-D",
    ),
]


def build_case(name: str, side: str, rows: list, deviation: str | None, model: Qwen2VLModel) -> dict:
    seqs = [row(*parts) for parts in rows]
    length = max(len(ids) for ids, _ in seqs)
    input_ids = np.full((len(seqs), length), PAD, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, (ids, _) in enumerate(seqs):
        cols = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        input_ids[i, cols] = ids
        mask[i, cols] = 1
    grids = [g for _, gs in seqs for g in gs]
    with torch.no_grad():
        position_ids, deltas = model.get_rope_index(
            torch.from_numpy(input_ids),
            torch.tensor(grids, dtype=torch.long) if grids else None,
            None,
            torch.from_numpy(mask),
        )
    return {
        "name": name,
        "padding_side": side,
        "deviation": deviation,
        "input_ids": input_ids.tolist(),
        "attention_mask": mask.tolist(),
        "image_grid_thw": grids or None,
        "images_per_row": [len(gs) for _, gs in seqs],
        "position_ids": position_ids.tolist(),
        "rope_deltas": deltas.reshape(-1).tolist(),
    }


def main() -> None:
    if not transformers.__version__.startswith("4."):
        sys.exit(f"needs transformers 4.x (VLM2Vec pins 4.52.3), found {transformers.__version__}")
    config = Qwen2VLConfig(
        vocab_size=152064,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "spatial_merge_size": MERGE},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    model = Qwen2VLModel(config).eval()
    cfg = model.config
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_config.spatial_merge_size) == (IMAGE, START, MERGE)
    fixture = {
        "about": "golden get_rope_index outputs; regenerate with tests/scripts/make_legacy_rope_fixture.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "function": f"{Qwen2VLModel.__qualname__}.get_rope_index(input_ids, image_grid_thw, None, attention_mask)",
        "spatial_merge_size": MERGE,
        "token_ids": {
            "pad": PAD,
            "vision_start": START,
            "vision_end": END,
            "image_pad": IMAGE,
            "video_pad": VIDEO,
        },
        "cases": [build_case(*case, model) for case in CASES],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the file small and its diffs readable.
    head = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(head)[:-1] + ', "cases": [']
    lines.append(",\n".join(json.dumps(case, separators=(",", ":")) for case in fixture["cases"]))
    lines.append("]}")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(fixture['cases'])} cases, transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
