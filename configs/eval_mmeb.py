"""MMEB evaluation: `python -m vlm2vec_jax.eval --config configs/eval_mmeb.py --config.model=DIR`.

The defaults evaluate on the built-in synthetic benchmark
(`python -m vlm2vec_jax.data.synthetic --out data/synthetic`); point `data.root` at a clone of
MMEB-eval for the real 36 datasets. A `0` or `""` below means "not set / the model's own value".
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # A Hugging Face model directory (config.json + *.safetensors), or a training workdir, whose
    # `<workdir>/export/` is then used. Required.
    config.model = ""
    config.data = ml_collections.ConfigDict()
    # An MMEB-eval layout: <root>/<Dataset>/test-*.parquet (+ an optional datasets.json).
    config.data.root = "data/synthetic/eval"
    # Where the parquet image paths are relative to; "" = data.root.
    config.data.image_root = ""
    # Parquet split name: <Dataset>/<split>-*.parquet.
    config.data.split = "test"
    # First N queries of each dataset (quick runs); 0 = all of them.
    config.data.max_rows = 0
    # Rows with a missing image: "error" (stop, naming dataset, row and path) or "skip" (drop and
    # report how many; the scores then cover fewer queries than the benchmark).
    config.data.bad_data = "error"
    # Comma-separated dataset folder names, or "all" (every folder with `split` files).
    config.datasets = "all"
    # Comma-separated caption-corpus parquet files (image_path, captions; see
    # vlm2vec_jax/evaluation/corpus.py) scored by Recall@1/5/10 both ways; "" = none.
    config.corpora = ""
    # Output directory: <dataset>_score.json, summary.json, summary.md, config.json.
    config.out = "out"
    # Keep embeddings on disk so a rerun of the same model encodes nothing.
    config.cache = True
    # Root of the embedding cache; "" = <out>/cache. Multi-host runs need a directory all hosts share.
    config.cache_dir = ""
    # Items per encoding step over all local devices; a multiple of the local device count.
    config.batch_size = 16
    # Compute dtype: "float32" or "bfloat16" (parameters are stored in it too).
    config.dtype = "float32"
    # M-RoPE position ids: "hf5" (transformers 5.x) or "legacy" (released VLM2Vec checkpoints).
    config.position_rule = "hf5"
    # Prefix B3's target prompts ("Represent the class label: ", ...) to the candidates. On for
    # B3-trained models; off for VLM2Vec's released checkpoints, which were trained without them.
    config.positive_prompts = True
    # How items become the model's text: "raw" (VLM2Vec, B3: the text as given) or
    # "qwen3_vl_embedding" (Qwen3-VL-Embedding's chat layout, `instruction` as its system turn).
    config.prompt_format = "raw"
    config.instruction = "Represent the user's input."
    # Score Matryoshka prefixes of this many dimensions (renormalised); 0 = the full width. The
    # cache keeps full-width vectors, so evaluating several widths encodes once.
    config.dim = 0
    # Longest text in tokens (image tokens are never cut); 0 = no limit.
    config.max_len = 0
    # Image pixel bounds for resizing; 0 = the checkpoint's preprocessor_config.json.
    config.min_pixels = 0
    config.max_pixels = 0
    # Progress bars on stderr.
    config.progress = True
    # Call jax.distributed.initialize() first (multi-host; coordinator and ids from the environment).
    config.distributed = False
    return config
