"""B3 batch mining: `python -m vlm2vec_jax.mine --config configs/mine_b3.py --config.teacher=DIR`.

Mines `out/batches.parquet` (train with `--config.data.batch_file=<out>/batches.parquet`) and
`out/report.json` from a teacher's embeddings of the training set. Every key is documented here.
The `data` keys read the training set exactly as the trainer does (same meaning as in
configs/common.py): a batch file indexes rows of one particular read of the data.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = "runs/mine_b3"  # batches.parquet, report.json, config.json (and embeddings.npz with a teacher model)
    c.seed = 0  # clusters (METIS), batch order, B3++ sampling; with data.synthetic also picks the benchmark, as in training: use the training run's seed

    # The teacher: exactly one of the two.
    c.teacher = ""  # a Hugging Face model directory or a training workdir (its export/) that embeds queries and positives
    c.teacher_embeddings = ""  # an .npz with `query` (N, D), `target` (N, D), `task` (N,) strings, rows in training-set order
    c.teacher_batch_size = 64  # items per encoding step over all local devices (teacher model only)
    c.teacher_dtype = "float32"  # teacher compute dtype: "float32" or "bfloat16"
    c.teacher_max_len = 0  # teacher text truncation in tokens; 0 = the checkpoint's own

    # B3 (REFERENCE section 4).
    c.batch_size = 1024  # rows per batch (the trainer's train.batch_size); a multiple of cluster_size
    c.cluster_size = 32  # K: rows per METIS cluster; a batch is batch_size / K clusters of one task
    c.p = -1  # ranks skipped as likely false negatives; -1 = per meta-task: 30 retrieval and grounding, 70 VQA, 0 classification
    c.m = 100  # strong negatives kept per query after the p skipped: S = R[:, p:p+m]
    c.hard_negatives = 0  # h: B3++ hard negatives per query (train with train.hard_negatives = h); 0 = plain B3
    c.epochs = 1  # epochs of batch order written to the file (each reshuffles clusters and redraws negatives); the trainer replays the file
    c.ranking_block = 512  # queries per device per ranking step: memory O(ranking_block x task rows)
    c.meta_task = ""  # meta-task of tasks neither MMEB's table nor data.root's datasets.json knows (npz-only mining); "" = such a task is an error
    c.progress = True  # progress bars on the long stages

    # The training set (as the trainer reads it); with teacher_embeddings alone, leave root and synthetic empty.
    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # MMEB-train layout; "" with data.synthetic set = the generated benchmark
    c.data.synthetic = ""  # "default" or "small": the synthetic benchmark (generated once, as training does)
    c.data.synthetic_dir = "~/.cache/vlm2vec_jax/synthetic"  # where the synthetic benchmark is kept
    c.data.subsets = "all"  # comma-separated subset names, or "all"
    c.data.split = "original"  # MMEB-train split: "original" or "diverse_instruction"
    c.data.image_root = ""  # "" = data.root
    c.data.max_rows_per_subset = 0  # 0 = every row
    c.data.positive_prompts = False  # B3's target-side prompts (what the teacher embeds)
    c.data.bad_data = "skip"  # "skip" or "error": must match training, skipped rows change the row order
    return c
