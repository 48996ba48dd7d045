"""The training run: set up model, data, mesh and state (fresh or resumed), then step, log,
evaluate, checkpoint and export until `train.steps`, or until SIGTERM (preemption: save and exit).

Every process of a multi-host run executes this same code on its slice of each global batch.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from vlm2vec_jax.cli_config import dump_config
from vlm2vec_jax.data.bad_data import BadDataReport
from vlm2vec_jax.data.packing import pack_record
from vlm2vec_jax.data.profiles import resolve_profile
from vlm2vec_jax.data.pipeline import TrainBatchSource, make_train_iterator
from vlm2vec_jax.data.registry import eval_datasets
from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation.evaluate import evaluate
from vlm2vec_jax.evaluation.summary import summarize
from vlm2vec_jax.models.lora import has_lora, lora_config_of, merge_lora
from vlm2vec_jax.models.model_dir import EXPORT_DIR
from vlm2vec_jax.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_peft_adapter
from vlm2vec_jax.models.hf_export import save_pretrained
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.processing.image import ImageProcessorConfig
from vlm2vec_jax.processing.text import TextProcessor
from vlm2vec_jax.training import data_setup
from vlm2vec_jax.training.checkpoint import Checkpointer
from vlm2vec_jax.training.compiled_step import compile_step
from vlm2vec_jax.training.metrics_log import MetricsLog
from vlm2vec_jax.training.model_init import RANDOM, init_dirs, init_model, write_random_model_dir
from vlm2vec_jax.training.pack_budget import packing_budget, packs
from vlm2vec_jax.training.optimizer import optimization
from vlm2vec_jax.training.placement import device_batch, place
from vlm2vec_jax.training.sharding import batch_size_of, make_mesh
from vlm2vec_jax.training.state import abstract_train_state, init_train_state, param_shardings
from vlm2vec_jax.training.throughput import StepFlops, peak_flops
from vlm2vec_jax.training.trainable import add_adapters, master_weights, split_for_training

log = logging.getLogger(__name__)
EXPORT_FORMATS = ("merged", "peft")


def device_memory_error(err: Exception, step: int, config: ml_collections.ConfigDict) -> MemoryError | None:
    """What to raise when XLA could not allocate the step's buffers at 0-based `step`: a MemoryError
    naming the step and the keys that shrink a step's live memory; None for any other error. Only
    the first line of XLA's report goes in the message (the CLI prints it on one line)."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    first = text.strip().splitlines()[0]
    t = config.train
    chunk = (f"lower train.gc_chunk_size (now {t.gc_chunk_size}) or, when packed, train.pack_text_rows / "
             "train.pack_vision_rows" if t.gc_chunk_size else
             "turn GradCache on (train.gc_chunk_size > 0: the batch is encoded in chunks)")
    return MemoryError(
        f"step {step + 1}: out of device memory ({first}). To fit: {chunk}; enable model.remat (now "
        f"{config.model.remat}); or shard the parameters (mesh.fsdp). Nothing was saved from this step; "
        "rerun with the change to resume from the latest checkpoint"
    )


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: training stops, nothing is saved from the failing step. The message
    names the step (1-based, as metrics.jsonl and checkpoints count) and which checkpoint to resume
    from: one saved right before the failing step holds the very parameters the loss came from."""


class Trainer:
    """One training run described by a config (keys: configs/common.py)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config
        self.workdir = Path(config.workdir).expanduser().absolute()
        self.is_main = jax.process_index() == 0
        self.stop_requested = False
        self.report = BadDataReport()

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        c = self.config
        self.profile = resolve_profile(c.data.profile, c)  # first: a bad path fails before any work
        check_export(c)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            dump_config(c, self.workdir / "config.json")
        train_root, self.eval_root = data_setup.data_roots(c)
        self.train_set = data_setup.load_train_set(c, train_root)
        self.plan = data_setup.batch_plan(c, self.train_set)
        self.model_dir = self._model_dir()
        model = init_model(
            c.model.init if c.model.init == RANDOM else "hf",
            self.model_dir if c.model.init == RANDOM else Path(c.model.init).expanduser(), seed=c.seed,
            dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat, attention=c.model.attention,
            lora_dropout=c.lora.dropout,
        )
        self.model_config = model.config
        if has_lora(model):
            a = lora_config_of(model)
            use = "training these adapters (lora.* other than dropout unused)" if c.train.mode == "lora" else "merged in (train.mode=full)"
            self._print(f"model.init is a PEFT adapter (rank {a.rank}, alpha {a.alpha:g}, {'DoRA' if a.use_dora else 'LoRA'} "
                        f"on {','.join(a.targets)}): {use}")
        add_adapters(model, c)
        self.graphdef, params, frozen = split_for_training(model, c.train.mode, c.train.freeze_vision)
        params = master_weights(params)
        self.mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        self.schedule, self.optimizer = optimization(c)
        self.abstract = abstract_train_state(params, self.optimizer, self.mesh)
        self.frozen = place(frozen, param_shardings(frozen, self.mesh))
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
        latest = self.checkpointer.latest_step()
        if latest is None:
            self.state = init_train_state(place(params, jax.tree.map(lambda a: a.sharding, self.abstract.params)), self.optimizer, self.abstract)
            self.start_step = 0
            # rows the reader already dropped (a missing image file): counted from the first line on; a
            # resumed run gets them back with the checkpoint's counts below
            self.report.merge(self.train_set.report)
        else:
            self.state, meta = self.checkpointer.restore(latest, self.abstract)
            self.start_step = int(meta["data_position"])
            self.report = self.report.merge(BadDataReport.from_metrics(meta.get("bad_data", {})))
            self._print(f"resumed from {self.workdir / 'checkpoints'} at step {self.start_step}")
        self.key = jax.random.key(c.seed)
        self.metrics_log = MetricsLog(self.workdir, enabled=self.is_main)

    def _model_dir(self) -> Path:
        """`model.init`'s directory; for a random init, the tokenizer/config directory written once
        into the workdir from the training texts."""
        c = self.config
        if not c.model.init:
            raise ValueError(
                "model.init is empty: set it to a local Hugging Face directory of a supported backbone "
                "(qwen2_vl, qwen2_5_vl, qwen3_vl), or to 'random'"
            )
        if c.model.init != RANDOM:
            return init_dirs(c.model.init)[1]  # a PEFT adapter's own processor files, else its base's
        out = self.workdir / "model_init"
        if self.is_main:
            corpus = (side.text for pair in self.train_set for side in (pair.query, pair.positive))
            write_random_model_dir(
                out, c.model.architecture.to_dict(), corpus, min_pixels=c.model.min_pixels, max_pixels=c.model.max_pixels
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("model_init written")
        return out

    def _records(self) -> Iterator[dict[str, Any]]:
        c = self.config
        source = TrainBatchSource(
            self.train_set, self.plan, self.model_dir, max_len=c.model.max_len, target_max_len=c.model.target_max_len, num_steps=c.train.steps,
            num_hard_negatives=c.train.hard_negatives, min_pixels=c.model.min_pixels, max_pixels=c.model.max_pixels,
            rope_rule=c.model.position_rule, bad_data=c.data.bad_data,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        self.packing = packing_budget(c, source, self.mesh, self.model_config, self.profile) if packs(c) else None
        if self.packing is not None:
            b = self.packing
            sized = (f"from data.profile={c.data.profile}" if self.profile
                     else "covering the padded chunks; data.profile=train sizes them from your data")
            self._print(f"packing ({sized}): per chunk "
                        f"{b.text_rows} text rows x {b.text_len} tokens, {b.vision_rows} vision rows x {b.vision_patches} "
                        f"patches; up to {b.chunks} chunks per device shard")
        if c.train.packing and self.packing is None:
            self._print("train.packing: without GradCache (train.gc_chunk_size=0) a step is one chunk of fixed shape, so "
                        "packing cannot save compute unless train.pack_text_rows sizes it; running the fixed-shape step")
        self.image_config = source.image_config
        return make_train_iterator(source, self.start_step, c.data.num_workers, c.data.prefetch)

    def _pack(self, record: dict[str, Any]) -> dict[str, Any]:
        """This host's record laid out in packed chunks per local device shard (`train.packing`)."""
        if self.packing is None:
            return record
        c, host = self.config, jax.process_index()
        queries = record["valid"].shape[0]
        return pack_record(
            record, self.packing, shards=batch_size_of(self.mesh) // jax.process_count(), first_query=host * queries,
            first_target=host * record["target_valid"].shape[0], global_queries=c.train.batch_size,
        )

    def _compile(self, batch: dict[str, Any]) -> tuple[jax.stages.Compiled, StepFlops]:
        """The compiled step and its model FLOPs (matmuls over the global batch)."""
        step = compile_step(
            self.config, self.graphdef, self.schedule, self.optimizer, self.mesh, self.abstract, self.frozen, batch, self.key,
            self.image_config,
        )
        self._print(f"compiled the training step in {step.seconds:.1f} s; per-device memory: {_describe_memory(step.memory)}")
        return step.compiled, step.flops

    # ------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train to `train.steps` (or until SIGTERM); returns the last logged metrics."""
        self.setup()
        c = self.config
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        records = self._records()
        last: dict[str, Any] = {}
        try:
            step_fn, flops, peak = None, StepFlops(0.0, 0.0), peak_flops()
            progress = tqdm(total=c.train.steps, initial=self.start_step, desc="train", unit="step", disable=not self.is_main)
            tick = time.perf_counter()
            for step in range(self.start_step, c.train.steps):
                record = self._pack(next(records))
                self.report = self.report.merge(record.pop("bad_data"))
                batch = device_batch(record, self.mesh)
                if step_fn is None:
                    step_fn, flops = self._compile(batch)
                    tick = time.perf_counter()
                self.state, metrics = self._step(step_fn, batch, step, record["rows"])
                now = time.perf_counter()
                elapsed, tick = now - tick, now
                metrics.update(
                    examples_per_s=c.train.batch_size / elapsed,
                    tokens_per_s=metrics.pop("tokens") / elapsed,
                    # a packed step's chunk loops ran `packed_chunks` times (the step reports it); 0 for scans
                    mfu=flops.at(metrics.get("packed_chunks", 0.0)) / elapsed / peak,
                    step_time_s=elapsed,
                )
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                done = step + 1
                if done % c.train.log_every == 0 or done == c.train.steps:
                    self.metrics_log.write(done, {**metrics, **self.report.metrics()})
                last = metrics
                if self._should(c.eval.every, done) and done != c.train.steps:
                    last.update(self.evaluate(done))
                    tick = time.perf_counter()
                if self._preempted():
                    self.save(done)
                    self._print(f"SIGTERM: saved step {done} to {self.workdir / 'checkpoints'}; exiting")
                    return last
                if self._should(c.checkpoint.every, done) and done != c.train.steps:
                    self.save(done)
            progress.close()
            end = int(self.state.step)
            if self.start_step < c.train.steps or self.checkpointer.latest_step() != end:
                self.save(end)
            if c.eval.every >= 0:
                last.update(self.evaluate(end))
            if c.export.at_end:
                self.export(self.workdir / EXPORT_DIR)
            return last
        finally:
            signal.signal(signal.SIGTERM, previous)
            if hasattr(records, "close"):
                records.close()
            self.checkpointer.close()
            self.metrics_log.close()

    def _step(self, step_fn, batch: dict[str, Any], step: int, rows: np.ndarray):
        try:  # dispatch is asynchronous: an allocation failure surfaces when the metrics are read
            state, metrics = step_fn(self.state, self.frozen, batch, self.key)
            metrics = {k: float(v) for k, v in metrics.items()}
        except jax.errors.JaxRuntimeError as err:
            memory = device_memory_error(err, step, self.config)
            if memory is None:
                raise
            log.error("step %d: %s", step + 1, err)  # XLA's whole report (on GPU: the live buffers)
            raise memory from err
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"step {step + 1} (batch {step} of the plan, training rows {rows[:8].tolist()}{'...' if len(rows) > 8 else ''}): "
                f"loss is {metrics['loss']}. Nothing was saved from this step. {self._resume_advice(step)}"
            )
        return state, metrics

    def _resume_advice(self, step: int) -> str:
        """Which checkpoint to resume from after a non-finite loss at 0-based `step`. A checkpoint at
        `step` holds the parameters that loss was computed from: resuming from it recomputes the same
        loss on the same batch, so only a change to the loss itself (temperature) gets past it."""
        directory = self.workdir / "checkpoints"
        steps = sorted(self.checkpointer.manager.all_steps())
        earlier = [s for s in steps if s < step]
        previous = f"step {earlier[-1]}" if earlier else "none"
        if step in steps:
            return (
                f"The latest checkpoint, step {step} in {directory}, holds the parameters this loss came from: "
                "resuming from it repeats the failure unless the loss changes (raise train.temperature). To retry "
                f"with a lower train.learning_rate, delete {directory / str(step)} and rerun to resume from the "
                f"checkpoint before it ({previous})."
            )
        return (
            f"The last good checkpoint is {previous if earlier else 'none (no checkpoint yet)'} in {directory}. "
            "Lower train.learning_rate or raise train.temperature, then rerun to resume from it."
        )

    @staticmethod
    def _should(every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _preempted(self) -> bool:
        """True on every host once any host got SIGTERM (all must save the same step)."""
        if jax.process_count() == 1:
            return self.stop_requested
        flags = multihost_utils.process_allgather(np.asarray(self.stop_requested))
        return bool(np.any(flags))

    # ------------------------------------------------------------------- save, evaluate, export
    def save(self, step: int) -> None:
        meta = {"data_position": step, "bad_data": self.report.metrics(), "config": self.config.to_dict()}
        self.checkpointer.save(step, self.state, meta)

    def current_model(self) -> VisionLanguageModel:
        """The model with the current weights, gathered onto every host (for eval and export)."""
        gather = lambda x: x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)  # noqa: E731
        params, frozen = jax.tree.map(gather, (self.state.params, self.frozen))
        return nnx.merge(self.graphdef, params, frozen)

    def evaluate(self, step: int) -> dict[str, float]:
        """Precision@1 on the eval datasets, logged as eval/<dataset> and eval/<group>."""
        if self.eval_root is None:
            return {}
        c = self.config
        embedder = Embedder(
            self.current_model(),
            TextProcessor.from_pretrained_dir(self.model_dir),
            ImageProcessorConfig.from_pretrained_dir(self.model_dir, min_pixels=c.model.min_pixels, max_pixels=c.model.max_pixels),
            position_rule=c.model.position_rule,
        )
        queries = data_setup.load_eval_queries(c, self.eval_root)
        scores = evaluate(embedder, queries, batch_size=c.eval.batch_size, show_progress=self.is_main)
        summary = summarize(scores, eval_datasets(self.eval_root))
        values = {f"eval/{name}": score.acc for name, score in scores.items()}
        values.update({f"eval/{group}": g.acc for group, g in summary.groups.items() if g.acc is not None})
        self.metrics_log.write(step, values)
        self._print(f"step {step}: eval/overall Precision@1 = {values.get('eval/overall', float('nan')):.3f}\n" + summary.markdown())
        return values

    def export(self, out: Path) -> Path:
        """`export.format` "merged": a Hugging Face directory with LoRA merged, loadable by
        transformers and `Embedder`; "peft": the adapters alone as a PEFT directory on top of the
        run's base (`base_model_name_or_path`). The other format's files are removed from `out`, so
        a reader never finds both."""
        c = self.config
        model = self.current_model()
        base = self.model_dir if c.model.init == RANDOM else init_dirs(c.model.init)[0].absolute()
        if c.export.format == "merged" and c.train.mode == "lora":
            merge_lora(model)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            stale = (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if c.export.format == "merged" else ("config.json", "model*.safetensors*")
            for pattern in stale:
                for old in out.glob(pattern):
                    old.unlink()
            if c.export.format == "peft":
                write_peft_adapter(model, out, base=base, processor=self.model_dir)
            else:
                save_pretrained(model, out, source_dir=base)
            self._print(f"exported {out} ({c.export.format})")
        return out

    def _print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)


def check_export(config: ml_collections.ConfigDict) -> None:
    """Reject an `export.format` the run could not write, before any training."""
    c = config
    if c.export.format not in EXPORT_FORMATS:
        raise ValueError(f"export.format must be one of {EXPORT_FORMATS}, got {c.export.format!r}")
    if c.export.format == "peft" and c.export.at_end:
        if c.train.mode != "lora":
            raise ValueError("export.format=peft needs train.mode=lora: a full fine-tune has no adapters to export (use export.format=merged)")
        if c.model.init == RANDOM:
            raise ValueError("export.format=peft needs a base on disk, but model.init=random has no saved weights (use export.format=merged)")


def _describe_memory(memory: Any) -> str:
    if memory is None:
        return "unavailable on this backend"
    gib = 2.0**30
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return ", ".join(f"{f.removesuffix('_size_in_bytes')} {getattr(memory, f, 0) / gib:.3f} GiB" for f in fields)
