"""MMEB evaluation CLI:

    python -m vlm2vec_jax.eval --config configs/eval_mmeb.py --config.model=DIR [--config.key=value ...]

Reads the MMEB-eval layout at `data.root`, encodes every distinct side once (cached under
`cache_dir`), scores Precision@1 per dataset, optionally Recall@k on caption corpora, writes the
score files, `summary.json`, `summary.md` and `config.json` into `out`, and prints the summary.
Every key is documented in configs/eval_mmeb.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import jax
from ml_collections import ConfigDict

from vlm2vec_jax.cli_config import ConfigError, dump_config, run_cli
from vlm2vec_jax.data.bad_data import BadDataError, BadDataPolicy, BadDataReport
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.registry import UnknownDatasetError, eval_datasets
from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation import (
    evaluate,
    evaluate_corpus,
    read_caption_corpus,
    report_markdown,
    summarize,
    write_report,
)
from vlm2vec_jax.models.model_dir import resolve_model_dir
from vlm2vec_jax.models.pooling import check_matryoshka_dim
from vlm2vec_jax.processing.prompt_formats import PROMPT_FORMATS
from vlm2vec_jax.processing.rope_index import ROPE_RULES

DTYPES = ("float32", "bfloat16")


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _check_choices(config: ConfigDict) -> None:
    """Reject values the run would only trip over later, after loading the model."""
    choices = {
        "dtype": DTYPES, "position_rule": ROPE_RULES, "prompt_format": PROMPT_FORMATS, "data.bad_data": get_args(BadDataPolicy),
    }
    for key, allowed in choices.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise ConfigError(f"config.{key} must be one of {list(allowed)}, got {value!r}")
    devices = jax.local_device_count()
    if config.batch_size < 1 or config.batch_size % devices:
        raise ConfigError(f"config.batch_size must be a positive multiple of the {devices} local devices")


def main(config: ConfigDict) -> int:
    """Run the evaluation `config` describes; returns the exit code."""
    if config.distributed:
        jax.distributed.initialize()
    _check_choices(config)
    model_dir = resolve_model_dir(config.model)
    datasets = "all" if config.datasets.strip() == "all" else _names(config.datasets)
    if not datasets:
        raise ConfigError("config.datasets is empty: give comma-separated dataset names or 'all'")
    out = Path(config.out)
    cache_dir = (config.cache_dir or out / "cache") if config.cache else None
    lead = jax.process_index() == 0
    label = Path(config.model).resolve().name
    image_root = config.data.image_root or None
    try:
        embedder = Embedder.from_pretrained(
            model_dir, dtype=config.dtype, max_len=config.max_len or None, position_rule=config.position_rule,
            min_pixels=config.min_pixels or None, max_pixels=config.max_pixels or None,
            prompt_format=config.prompt_format, instruction=config.instruction,
        )
        try:
            check_matryoshka_dim(config.dim or None, embedder.dim)
        except ValueError as err:
            raise ConfigError(f"config.{err}, or 0 for all of it") from None
        skipped = BadDataReport()
        queries = read_mmeb_eval(
            config.data.root, datasets, split=config.data.split, image_root=image_root,
            positive_prompts=config.positive_prompts, bad_data=config.data.bad_data,
            max_rows=config.data.max_rows or None, report=skipped,
        )
        corpora = [read_caption_corpus(file, image_root=image_root) for file in _names(config.corpora)]
        run = dict(batch_size=config.batch_size, cache_dir=cache_dir, show_progress=config.progress and lead, dim=config.dim or None)
        scores = evaluate(embedder, queries, **run)
        corpus_scores = [evaluate_corpus(embedder, corpus, **run) for corpus in corpora]
        summary = summarize(scores, eval_datasets(config.data.root))
    except (BadDataError, UnknownDatasetError, FileNotFoundError) as e:
        print(f"vlm2vec_jax.eval: error: {e}", file=sys.stderr)
        return 1
    if lead:
        write_report(out, summary, corpus_scores, model=label)
        dump_config(config, out / "config.json")
        if skipped.total:
            print(f"skipped rows (bad_data=skip): {skipped.metrics()}")
        print(report_markdown(summary, corpus_scores, model=label), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, command="vlm2vec_jax.eval", example_config="configs/eval_mmeb.py"))
