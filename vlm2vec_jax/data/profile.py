"""Training-set profile: the exact lengths training will feed the model, per subset, from image headers.

    python -m vlm2vec_jax.data.profile --config configs/<train>.py [--config.key=value ...] --out profile.json

The CLI parses the training config as `run_cli` does (a usage error exits 2, a data error prints one
line and exits 1), shows a progress bar over rows and prints a table per subset. From Python:
`profile_train_set(config) -> dict`, `write_profile(profile, path)`, `load_profile(path) -> Profile`.

Why: a dry run's FLOPs and a packer's token / patch budgets need the real distribution of sequence
lengths and image sizes, not the worst case the fixed shapes pay every step. Counting is exact: a
profile is per-sequence data in compact form, not an estimate.

Reading is the trainer's own: `data_roots` and `load_train_set` (so `data.subsets`,
`data.max_rows_per_subset`, `data.split`, B3's prompts mean what they mean in training, and the rows
are the rows training keeps, in its global order), and a `TrainBatchSource` for the tokenizer, the
truncation lengths, the image processor's bounds and the vision-row patch limit. The tokenizer is
`model.init`'s; for `model.init=random` the one a run already wrote into `<workdir>/model_init`, else
the one such a run would learn from these rows, built in a temporary directory (never in the workdir:
a capped read would learn another vocabulary than the run).

Counting, for one sequence (a query, a positive target or a hard negative, as the pipeline builds it):
- `image_tokens`: merged vision tokens of its image, 0 without one. From the header size only
  (`PIL.Image.open(path).size`, nothing decoded), with `process_image`'s rule: a side under 28 px is
  first blown up to 56x56, then `smart_resize` to multiples of patch * merge (28) within the
  processor's [min_pixels, max_pixels] (`model.min_pixels` / `model.max_pixels` win, as in training);
  image_tokens = (h / 28) * (w / 28).
- `patches`: image_tokens * merge**2, the vision tower's rows for it.
- `text_tokens`: the sequence's length in ids as the model sees it, image tokens INCLUDED: the prompt
  (image placeholder prepended where the text has none, B3's target prompt) tokenized by the training
  tokenizer, its placeholder expanded to `image_tokens` ids, then truncated to `model.max_len`
  (queries) or `model.target_max_len` (targets and negatives) as the pipeline truncates: text tokens
  are dropped, image tokens kept. `truncated` counts the sequences that were cut.
- `negative`: with `train.hard_negatives` = h > 0, each used row's first h explicit negatives; with
  `data.batch_file`, the positives of the rows mined for it, over one pass of the file (every
  occurrence of a row), attributed to the query row's subset. Queries and targets are per row.

Bad data, as training meets it under `data.bad_data=skip` (whatever the config says: a profile names
every bad row rather than stopping at the first): the reader's checks (a missing image file, an empty
side, a placeholder without an image) drop the row; an image whose header does not parse, or whose
size `smart_resize` or the vision row refuses, is what the pipeline's decode rejects: a bad query or
positive drops its row, a bad negative only itself. Each is named under its subset. A file truncated
after its header is measured here, and only fails when training decodes it.

JSON layout (`version` 1):

    {"version": 1, "seconds": float,
     "config": {"data.root": ..., "data.subsets": ..., "data.max_rows_per_subset": ..., "model.max_len": ...,
                "model.target_max_len": ..., "model.min_pixels": ..., "model.max_pixels": ..., "patch_size": 14,
                "merge_size": 2, "patches_per_row": ..., "tokenizer": ..., "negatives_from": ..., ...},
     "definitions": {key: meaning},
     "subsets": {name: Subset}, "total": Subset without "bad"}
    Subset = {"rows": rows read (after the cap), "used_rows": rows training uses,
              "bad": [{"row": file row, "field", "path", "reason", "problem"}], "bad_counts": {reason: n},
              (field: the parquet column for a row the reader skipped; "query.image", "positive.image" or
              "negatives[k].image" for an image the pipeline would reject)
              "query": Side, "target": Side, "negative": Side}
    Side = {"sequences": n, "truncated": n, "text_tokens": Hist, "image_tokens": Hist, "patches": Hist,
            "images_per_sequence": Hist,
            "joint": {"text_tokens": [...], "image_tokens": [...], "counts": [...]}}
    Hist = {"values": [sorted distinct], "counts": [...], "n", "sum", "mean", "p50", "p90", "p99", "max"}

`joint` is the exact distribution of (text_tokens, image_tokens) pairs, so per-sequence lengths with
their images can be rebuilt (`Profile.lengths`, `Profile.image_tokens`); percentiles are nearest-rank.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vlm2vec_jax.cli_config import REPORTED_ERRORS, ConfigError, run_cli
from vlm2vec_jax.data.bad_data import CORRUPT_IMAGE, MISSING_IMAGE, BadDataHandler
from vlm2vec_jax.data.batch_plan import RandomBatchPlan
from vlm2vec_jax.data.mmeb_train import TrainSet
from vlm2vec_jax.data.pipeline import TrainBatchSource
from vlm2vec_jax.data.prompts import to_backbone_text
from vlm2vec_jax.data.records import Side
from vlm2vec_jax.processing.image import ImageProcessorConfig, resized_size
from vlm2vec_jax.processing.text import TextProcessor, with_image_placeholder
from vlm2vec_jax.training.data_setup import batch_plan, data_roots, load_train_set

__all__ = [
    "SIDES",
    "VERSION",
    "Profile",
    "histogram",
    "image_tokens_from_header",
    "load_profile",
    "profile_train_set",
    "summary_table",
    "write_profile",
]

VERSION = 1
SIDES = ("query", "target", "negative")
COMMAND = "vlm2vec_jax.data.profile"
DEFINITIONS = {
    "text_tokens": "ids of the whole sequence as the model sees it: prompt tokens plus image_tokens, after truncation",
    "image_tokens": "merged vision tokens of the sequence's image (0 without one), smart_resize of the header size",
    "patches": "vision patches of the sequence's image: image_tokens * merge_size**2",
    "images_per_sequence": "images the sequence carries (0 or 1)",
    "truncated": "sequences longer than their side's max length before truncation",
    "joint": "exact counts of (text_tokens, image_tokens) pairs",
}
_CHUNK = 2048  # rows tokenized per batch call (the Rust tokenizer runs a batch in parallel)


@dataclass(frozen=True)
class _BadImage:
    reason: str
    problem: str


def image_tokens_from_header(path: str, config: ImageProcessorConfig, max_patches: int) -> int:
    """Merged vision tokens `process_image` would give the image at `path`, from its header alone;
    `max_patches`: the vision row's limit, over which the pipeline rejects an image. Raises
    FileNotFoundError, or ValueError for a header that does not parse or a size that cannot be used."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read the image header of {path} ({type(e).__name__}: {e})") from e
    p, m = config.patch_size, config.merge_size
    try:
        h, w = resized_size(width, height, config)
    except ValueError as e:  # decodes, but no usable shape (aspect ratio over 200), as the pipeline says
        raise ValueError(f"image file {path}: {e}") from e
    patches = (h // p) * (w // p)
    if patches > max_patches:
        raise ValueError(f"image file {path}: {patches} patches, over the {max_patches} of max_pixels")
    return patches // m**2


class _Measurer:
    """Untruncated length and image tokens of sides; each image header and each distinct prompt
    is read or tokenized once (MMEB repeats both: one instruction per classification subset,
    "Represent the given image." on every image target, class labels)."""

    def __init__(self, source: TrainBatchSource) -> None:
        self.text = TextProcessor(source.text.tokenizer, source.text.image_token)  # no max_len: full lengths
        self.image_config = source.image_config
        self.max_patches = source.patches_per_row
        self._images: dict[str, int | _BadImage] = {}
        self._lengths: dict[tuple[str, int], int] = {}  # (prompt, images) -> ids with one per placeholder

    def image(self, path: str) -> int | _BadImage:
        if path not in self._images:
            try:
                self._images[path] = image_tokens_from_header(path, self.image_config, self.max_patches)
            except FileNotFoundError:
                self._images[path] = _BadImage(MISSING_IMAGE, f"image file not found: {path}")
            except ValueError as e:
                self._images[path] = _BadImage(CORRUPT_IMAGE, str(e))
        return self._images[path]

    def sides(self, sides: Sequence[Side]) -> tuple[np.ndarray, np.ndarray, list[_BadImage | None]]:
        """(full lengths, image tokens, bad image or None) per side; a bad side's numbers are 0.
        A prompt's length with its placeholder expanded to n ids is its length at one id plus n - 1."""
        images = [0 if s.image is None else self.image(s.image) for s in sides]
        bad = [i if isinstance(i, _BadImage) else None for i in images]
        good = [k for k, b in enumerate(bad) if b is None]
        keys = [
            (with_image_placeholder(to_backbone_text(sides[k].text), sides[k].image is not None, self.text.image_token),
             int(sides[k].image is not None))
            for k in good
        ]
        new = [key for key in dict.fromkeys(keys) if key not in self._lengths]
        ids = self.text.encode_batch([text for text, _ in new], [[1] * n for _, n in new])
        self._lengths.update((key, len(i)) for key, i in zip(new, ids))
        full, tokens = np.zeros(len(sides), np.int64), np.zeros(len(sides), np.int64)
        tokens[good] = [images[k] for k in good]
        full[good] = [self._lengths[key] - key[1] + images[k] for key, k in zip(keys, good)]
        return full, tokens, bad


@dataclass
class _Sequences:
    """One side's sequences over the training set: owner = the global row each belongs to."""

    owner: np.ndarray
    full: np.ndarray
    image_tokens: np.ndarray
    ok: np.ndarray
    limit: int

    @property
    def tokens(self) -> np.ndarray:
        return np.minimum(self.full, self.limit)  # the pipeline keeps image tokens, drops text past the limit

    def select(self, keep: np.ndarray) -> _Sequences:
        return _Sequences(self.owner[keep], self.full[keep], self.image_tokens[keep], self.ok[keep], self.limit)


class _NamingHandler(BadDataHandler):
    """The reader's handler: skips every bad row, whatever `data.bad_data`, and keeps its name."""

    def __init__(self) -> None:
        super().__init__("skip")
        self.rejected: list[dict[str, Any]] = []
        self._image: str | None = None

    def check_side(self, side: Side, **where: Any) -> bool:
        self._image = side.image
        return super().check_side(side, **where)

    def reject(
        self, dataset: str, row: int, column: str, reason: str, problem: str, cause: BaseException | None = None
    ) -> None:
        entry = {"row": row, "field": column, "path": self._image, "reason": reason, "problem": problem}
        self.rejected.append({"dataset": dataset, **entry})
        super().reject(dataset, row, column, reason, problem, cause)


def _read_train_set(config: ml_collections.ConfigDict, root: Path) -> tuple[TrainSet, list[dict[str, Any]]]:
    """`load_train_set` as training calls it, and every row its reader skipped, named: the rows and
    their order stay exactly the trainer's (a batch file's indices depend on them)."""
    handler = _NamingHandler()
    return load_train_set(config, root, handler), handler.rejected


@contextmanager
def _processor_dir(config: ml_collections.ConfigDict, train_set: TrainSet) -> Iterator[tuple[Path, str]]:
    """(directory with the training tokenizer and preprocessor_config.json, how it was found)."""
    init = config.model.init
    if not init:
        raise ValueError(
            "model.init is empty: set it to a local Hugging Face directory of a supported backbone "
            "(qwen2_vl, qwen2_5_vl, qwen3_vl), or to 'random'"
        )
    from vlm2vec_jax.training.model_init import RANDOM, write_random_model_dir

    if init != RANDOM:
        yield Path(init).expanduser(), str(Path(init).expanduser())
        return
    written = Path(config.workdir).expanduser().absolute() / "model_init"
    if (written / "config.json").is_file():
        yield written, str(written)
        return
    with tempfile.TemporaryDirectory(prefix="profile-tokenizer-") as tmp:
        corpus = (side.text for pair in train_set for side in (pair.query, pair.positive))
        out = write_random_model_dir(
            Path(tmp) / "model_init", config.model.architecture.to_dict(), corpus,
            min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
        )
        yield out, "learned from these rows as model.init=random does (temporary)"


def histogram(values: np.ndarray) -> dict[str, Any]:
    """Exact counts by value plus sum, mean and nearest-rank p50 / p90 / p99 / max (None when empty)."""
    distinct, counts = np.unique(np.asarray(values, np.int64), return_counts=True)
    n = int(counts.sum())
    out: dict[str, Any] = {"values": distinct.tolist(), "counts": counts.tolist(), "n": n}
    if not n:
        return {**out, **dict.fromkeys(("sum", "mean", "p50", "p90", "p99", "max"))}
    total = int((distinct * counts).sum())
    cumulative = np.cumsum(counts)
    ranks = {f"p{q}": int(distinct[np.searchsorted(cumulative, -(-q * n // 100))]) for q in (50, 90, 99)}
    return {**out, "sum": total, "mean": total / n, **ranks, "max": int(distinct[-1])}


def _side_stats(seqs: _Sequences, merge_units: int) -> dict[str, Any]:
    tokens, images = seqs.tokens, seqs.image_tokens
    pairs, counts = np.unique(np.stack([tokens, images], 1).reshape(-1, 2), axis=0, return_counts=True)
    return {
        "sequences": int(tokens.size),
        "truncated": int((seqs.full > seqs.limit).sum()),
        "text_tokens": histogram(tokens),
        "image_tokens": histogram(images),
        "patches": histogram(images * merge_units),
        "images_per_sequence": histogram((images > 0).astype(np.int64)),
        "joint": {"text_tokens": pairs[:, 0].tolist(), "image_tokens": pairs[:, 1].tolist(), "counts": counts.tolist()},
    }


def _measure_rows(
    train_set: TrainSet, measure: _Measurer, hard_negatives: int, limits: dict[str, int], progress: bool
) -> tuple[dict[str, _Sequences], dict[str, list[dict[str, Any]]]]:
    """Every row's query and positive and its first `hard_negatives` explicit negatives, measured,
    and the bad images among them, named by subset."""
    n = len(train_set)
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {side: [] for side in SIDES}
    bad: dict[str, list[dict[str, Any]]] = {name: [] for name in train_set.names}
    with tqdm(total=n, desc="profile", unit="row", disable=not progress) as bar:
        for lo in range(0, n, _CHUNK):
            pairs = train_set[lo : lo + _CHUNK]
            owned = {
                "query": [(lo + i, p, "query", p.query) for i, p in enumerate(pairs)],
                "target": [(lo + i, p, "positive", p.positive) for i, p in enumerate(pairs)],
                "negative": [
                    (lo + i, p, f"negatives[{k}]", side)
                    for i, p in enumerate(pairs) for k, side in enumerate(p.negatives[:hard_negatives])
                ],
            }
            for side, items in owned.items():
                full, images, problems = measure.sides([s for *_, s in items])
                ok = np.asarray([b is None for b in problems], bool)
                parts[side].append((np.asarray([i for i, *_ in items], np.int64), full, images, ok))
                for (_, pair, field, s), problem in zip(items, problems):
                    if problem is not None:
                        bad[pair.dataset].append({
                            "row": pair.row, "field": f"{field}.image", "path": s.image,
                            "reason": problem.reason, "problem": problem.problem,
                        })
            bar.update(len(pairs))
    seqs = {side: _Sequences(*(np.concatenate(c) for c in zip(*parts[side])), limits[side]) for side in SIDES}
    return seqs, bad


def _mined_negatives(config: ml_collections.ConfigDict, train_set: TrainSet, positives: _Sequences) -> _Sequences:
    """With a batch file: the positives of the rows mined for each row, over one pass of the file."""
    plan = batch_plan(config, train_set)
    h = config.train.hard_negatives
    owners, mined = [], []
    for step in range(plan.steps_per_epoch):
        planned = plan.batch(step)
        for row, rows in zip(planned.rows, planned.hard_negatives):
            owners += [int(row)] * min(h, len(rows))
            mined += rows[:h].tolist()
    index = np.asarray(mined, np.int64)
    owner = np.asarray(owners, np.int64)
    return _Sequences(owner, positives.full[index], positives.image_tokens[index], positives.ok[index], positives.limit)


def profile_train_set(config: ml_collections.ConfigDict, progress: bool = False) -> dict[str, Any]:
    """The profile (module docstring's layout) of the training set `config` describes."""
    start = time.perf_counter()
    root, _ = data_roots(config)
    train_set, rejected = _read_train_set(config, root)
    if not len(train_set):
        first = f"; the first: {rejected[0]['problem']}" if rejected else ""
        raise ValueError(f"no usable training row under {root} ({len(rejected)} bad rows skipped{first})")
    with _processor_dir(config, train_set) as (model_dir, tokenizer):
        source = TrainBatchSource(
            train_set, RandomBatchPlan([p.dataset for p in train_set], 1, config.seed, False),  # per row: any plan
            model_dir, max_len=config.model.max_len, target_max_len=config.model.target_max_len, num_steps=0,
            num_hard_negatives=config.train.hard_negatives, min_pixels=config.model.min_pixels,
            max_pixels=config.model.max_pixels, rope_rule=config.model.position_rule, bad_data=config.data.bad_data,
        )
        limits = {"query": source.max_len, "target": source.target_max_len, "negative": source.target_max_len}
        seqs, bad = _measure_rows(train_set, _Measurer(source), source.num_hard_negatives, limits, progress)
    if config.data.batch_file and source.num_hard_negatives:
        seqs["negative"] = _mined_negatives(config, train_set, seqs["target"])
    used = seqs["query"].ok & seqs["target"].ok  # the pipeline masks a row whose query or positive is bad
    seqs = {side: s.select(used[s.owner] & s.ok) for side, s in seqs.items()}
    skipped = Counter(name for name, _ in {(e["dataset"], e["row"]) for e in rejected})  # a row may have 2 bad sides
    read = {name: len(train_set.subset_range(name)) + skipped[name] for name in train_set.names}
    for entry in rejected:
        bad[entry.pop("dataset")].append(entry)
    return {
        "version": VERSION,
        "seconds": time.perf_counter() - start,
        "config": _config_summary(config, root, source, tokenizer, train_set),
        "definitions": DEFINITIONS,
        **_aggregate(train_set, seqs, used, bad, read, source.image_config.merge_size**2),
    }


def _aggregate(
    train_set: TrainSet, seqs: dict[str, _Sequences], used: np.ndarray, bad: dict[str, list[dict[str, Any]]],
    read: dict[str, int], merge_units: int,
) -> dict[str, Any]:
    """Per-subset and total sections from the per-sequence measurements."""
    offsets = np.asarray(train_set.offsets)
    subsets = {}
    for i, name in enumerate(train_set.names):
        entries = sorted(bad[name], key=lambda e: (e["row"], e["field"]))
        subsets[name] = {
            "rows": read[name],
            "used_rows": int(used[offsets[i] : offsets[i + 1]].sum()),
            "bad": entries,
            "bad_counts": dict(Counter(e["reason"] for e in entries)),
            **{
                side: _side_stats(s.select((s.owner >= offsets[i]) & (s.owner < offsets[i + 1])), merge_units)
                for side, s in seqs.items()
            },
        }
    total = {
        "rows": sum(read.values()),
        "used_rows": int(used.sum()),
        "bad_counts": dict(sum((Counter(s["bad_counts"]) for s in subsets.values()), Counter())),
        **{side: _side_stats(s, merge_units) for side, s in seqs.items()},
    }
    return {"subsets": subsets, "total": total}


def _config_summary(
    config: ml_collections.ConfigDict, root: Path, source: TrainBatchSource, tokenizer: str, train_set: TrainSet
) -> dict[str, Any]:
    """The keys the counts depend on, as resolved for this read."""
    image = source.image_config
    if not source.num_hard_negatives:
        negatives = "none (train.hard_negatives=0)"
    elif config.data.batch_file:
        negatives = f"mined rows' positives, one pass of {config.data.batch_file}"
    else:
        negatives = "explicit negatives (neg_text / neg_image_path)"
    return {
        "data.root": str(root),
        "data.image_root": config.data.image_root or str(root),
        "data.subsets": list(train_set.names),
        "data.split": config.data.split,
        "data.max_rows_per_subset": config.data.max_rows_per_subset,
        "data.positive_prompts": config.data.positive_prompts,
        "data.bad_data": config.data.bad_data,
        "data.batch_file": config.data.batch_file,
        "train.hard_negatives": source.num_hard_negatives,
        "train_set_fingerprint": train_set.fingerprint,
        "model.init": config.model.init,
        "tokenizer": tokenizer,
        "model.max_len": source.max_len,
        "model.target_max_len": source.target_max_len,
        "model.min_pixels": image.min_pixels,
        "model.max_pixels": image.max_pixels,
        "patch_size": image.patch_size,
        "merge_size": image.merge_size,
        "patches_per_row": source.patches_per_row,
        "negatives_from": negatives,
    }


@dataclass(frozen=True)
class Profile:
    """A profile read back (`load_profile`): the JSON's sections, and per-sequence arrays rebuilt
    from the exact joint counts, for FLOPs estimates and packing budgets."""

    config: dict[str, Any]
    subsets: dict[str, dict[str, Any]]
    total: dict[str, Any]

    def side(self, side: str, subset: str | None = None) -> dict[str, Any]:
        """One side's section (`SIDES`), of `subset` or (None) of the whole training set."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {list(SIDES)}, got {side!r}")
        if subset is not None and subset not in self.subsets:
            raise KeyError(f"no subset {subset!r} in this profile; it has {list(self.subsets)}")
        return (self.total if subset is None else self.subsets[subset])[side]

    def lengths(self, side: str, subset: str | None = None) -> np.ndarray:
        """Every sequence's `text_tokens` (text plus image tokens, truncated), sorted by
        (text_tokens, image_tokens): element i belongs with `image_tokens(...)[i]`."""
        joint = self.side(side, subset)["joint"]
        return np.repeat(np.asarray(joint["text_tokens"], np.int64), joint["counts"])

    def image_tokens(self, side: str, subset: str | None = None) -> np.ndarray:
        """Every sequence's image tokens, in the order of `lengths`."""
        joint = self.side(side, subset)["joint"]
        return np.repeat(np.asarray(joint["image_tokens"], np.int64), joint["counts"])

    def patches(self, side: str, subset: str | None = None) -> np.ndarray:
        """Every sequence's vision patches (image_tokens * merge_size**2), in the order of `lengths`."""
        return self.image_tokens(side, subset) * self.config["merge_size"] ** 2

    def bad(self, subset: str | None = None) -> list[dict[str, Any]]:
        """The bad rows named (each with its subset added), of one subset or of all."""
        names = list(self.subsets) if subset is None else [subset]
        return [{"subset": name, **entry} for name in names for entry in self.subsets[name]["bad"]]


def write_profile(profile: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `profile` as JSON, atomically (a reader never sees half a file). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile JSON; ValueError naming the file when it is not one of this version."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the training-set profile {os.fspath(path)}: {e}") from e
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not {"config", "subsets", "total"} <= raw.keys():
        found = raw.get("version") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(
            f"{os.fspath(path)} is not a version-{VERSION} training-set profile (found version {found!r}); "
            f"write it again with python -m {COMMAND}"
        )
    return Profile(raw["config"], raw["subsets"], raw["total"])


def summary_table(profile: dict[str, Any]) -> str:
    """One line per subset and the total: rows used, mean / p99 / max text_tokens of each side, bad rows."""
    header = " ".join(f"{side + ' mean/p99/max':>24}" for side in SIDES)
    lines = [f"{'subset':<24} {'rows':>8} {'used':>8} {header}   bad"]
    for name, section in [*profile["subsets"].items(), ("total", profile["total"])]:
        cells = []
        for side in SIDES:
            h = section[side]["text_tokens"]
            cells.append(f"{'-':>24}" if not h["n"] else f"{h['mean']:>10.1f} / {h['p99']:>5} / {h['max']:>5}")
        bad = sum(section["bad_counts"].values())
        lines.append(f"{name:<24} {section['rows']:>8} {section['used_rows']:>8} " + " ".join(cells) + f" {bad:>5}")
    return "\n".join(lines) + "\n"


def main(config: ml_collections.ConfigDict, out: str | None = None) -> int:
    """Profile the training set of `config` into `out`; returns the exit code."""
    if not out:
        raise ConfigError(f"missing --out PATH, the profile JSON to write; usage: python -m {COMMAND} --config "
                          "configs/<train>.py [--config.key=value ...] --out profile.json")
    try:
        profile = profile_train_set(config, progress=True)
    except REPORTED_ERRORS as err:
        print(f"{COMMAND}: error: {err}", file=sys.stderr)
        return 1
    write_profile(profile, out)
    print(summary_table(profile), end="")
    print(f"{profile['total']['rows']} rows profiled in {profile['seconds']:.1f} s -> {out}")
    return 0


def cli(argv: Sequence[str]) -> int:
    """`argv` (program name first) with `--out PATH` / `--out=PATH` taken out, the rest parsed as
    every CLI of the project parses it (`run_cli`)."""
    rest, out = [argv[0]], None
    args = iter(argv[1:])
    for arg in args:
        if arg == "--out":
            out = next(args, None)
        elif arg.startswith("--out="):
            out = arg.removeprefix("--out=")
        else:
            rest.append(arg)
    return run_cli(partial(main, out=out), rest, command=COMMAND, example_config="configs/demo.py")


if __name__ == "__main__":
    sys.exit(cli(sys.argv))
