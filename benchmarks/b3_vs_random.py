"""B3's claim in miniature: the demo model trained with random batches and with B3 batches.

1. `random`: configs/demo.py with seeded random batches of one task each (VLM2Vec's sampler: the
   same one-task-per-batch structure B3 batches have), `--steps` steps of `--batch-size`.
2. Mining: `python -m vlm2vec_jax.mine` with that model as the teacher (B3 uses a model trained
   without hard negatives of the same size), clusters of `--cluster-size`, enough epochs of batches
   for the steps.
3. `b3`: the same config, seed, steps and batch size, from the same random initialisation, on the
   mined batch file.
4. With `--warm-start` (B3 fine-tunes a pretrained model, not random weights): two more runs start
   from the `random` run's export, `--steps` more steps each, one on random batches
   (`random_then_random`) and one on the mined batches (`random_then_b3`).

Every run is evaluated by the trainer at its end (MMEB protocol, the default scale's synthetic eval
datasets with their one-edit distractors, `--eval-queries` per dataset); the script prints their
Precision@1 side by side and writes them to `<out>/b3_vs_random.json`. Every stage is the project's
own CLI in a subprocess, so the figures are those a user gets. A rerun reuses finished stages: a
finished run is read, an interrupted one resumes, mining is skipped when its batch file exists.

    python benchmarks/b3_vs_random.py [--out runs/b3_vs_random] [--steps 350] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from vlm2vec_jax.data.synthetic import SCALES, TRAIN_SUBSETS

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC_TRAIN_ROWS = SCALES["default"].train_rows * len(TRAIN_SUBSETS)  # the demo's training set


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def final_eval(workdir: Path, steps: int) -> dict[str, float] | None:
    """The evaluation a finished run logged at `steps` (without the `eval/` prefix), or None."""
    metrics = workdir / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    evals = [line for line in lines if "eval/overall" in line and line["step"] == steps]
    return {key.removeprefix("eval/"): value for key, value in evals[-1].items() if key.startswith("eval/")} if evals else None


def train(workdir: Path, args: argparse.Namespace, *extra: str) -> dict[str, float]:
    """The run's final evaluation: trained (or resumed) by the trainer unless it already finished."""
    if (scores := final_eval(workdir, args.steps)) is not None:
        return scores
    run([
        sys.executable, "-m", "vlm2vec_jax.train", "--config", "configs/demo.py",
        f"--config.workdir={workdir}", f"--config.seed={args.seed}",
        f"--config.train.steps={args.steps}", f"--config.train.batch_size={args.batch_size}",
        f"--config.train.learning_rate={args.learning_rate}",
        f"--config.train.mask_duplicate_targets={args.mask_duplicates}",
        "--config.data.homogeneous=True", "--config.eval.every=0",
        "--config.data.synthetic=default",  # the near-duplicate eval pools, where batch composition shows
        f"--config.eval.max_queries={args.eval_queries}", f"--config.checkpoint.every={args.steps}",
        *extra,
    ])
    if (scores := final_eval(workdir, args.steps)) is None:
        raise SystemExit(f"{workdir}/metrics.jsonl holds no evaluation at step {args.steps}")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "b3_vs_random")
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cluster-size", type=int, default=16, help="B3's K: rows per mined cluster")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--mask-duplicates", action=argparse.BooleanOptionalAction, default=False,
                        help="train.mask_duplicate_targets in both runs (off: VLM2Vec's and B3's loss)")
    parser.add_argument("--eval-queries", type=int, default=100, help="per eval dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start", action="store_true", help="also compare both from the random run's model")
    args = parser.parse_args()
    out = args.out.resolve()

    random_run, b3_run, mined = out / "random", out / "b3", out / "mined"
    random_scores = train(random_run, args)

    batches = mined / "batches.parquet"
    if not batches.is_file():
        epochs = math.ceil(args.steps * args.batch_size / SYNTHETIC_TRAIN_ROWS) + 1  # + the rows dropped per epoch
        run([
            sys.executable, "-m", "vlm2vec_jax.mine", "--config", "configs/mine_b3.py",
            f"--config.out={mined}", f"--config.seed={args.seed}", f"--config.teacher={random_run}",
            "--config.data.synthetic=default", f"--config.batch_size={args.batch_size}",
            f"--config.cluster_size={args.cluster_size}", f"--config.epochs={epochs}",
        ])
    runs = {"random batches": random_scores, "B3 batches": train(b3_run, args, f"--config.data.batch_file={batches}")}
    if args.warm_start:
        warm = f"--config.model.init={random_run / 'export'}"
        runs["random, then random"] = train(out / "random_then_random", args, warm)
        runs["random, then B3"] = train(out / "random_then_b3", args, warm, f"--config.data.batch_file={batches}")

    names = sorted(random_scores)
    print(f"\n| P@1 | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for label, scores in runs.items():
        print(f"| {label} | {' | '.join(f'{scores[n]:.3f}' for n in names)} |")
    print("\noverall: " + ", ".join(f"{label} {scores['overall']:.3f}" for label, scores in runs.items()))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    (out / "b3_vs_random.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
