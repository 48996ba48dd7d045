"""B3 batch mining: `python -m vlm2vec_jax.mine --config configs/mine_b3.py --config.teacher=DIR`.

Mines `out/batches.parquet` (train with `--config.data.batch_file=<out>/batches.parquet`) and
`out/report.json` from a teacher's embeddings of the training set. Every key is documented here.
The `data` keys read the training set exactly as the trainer does (same meaning as in
configs/common.py): a batch file indexes rows of one particular read of the data.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # batches.parquet, report.json, config.json (and embeddings.npz when a teacher model embeds).
    c.out = "runs/mine_b3"
    # METIS, cluster and batch order, B3++ draws. With data.synthetic it also names the benchmark
    # (as in training): use the training run's seed.
    c.seed = 0

    # The teacher: exactly one of the two.
    # A Hugging Face model directory, or a training workdir (its export/), that embeds the training
    # set's queries and positives (the result is kept as <out>/embeddings.npz for reruns).
    c.teacher = ""
    # An .npz with `query` (N, D), `target` (N, D) and `task` (N,) strings, rows in training-set order.
    c.teacher_embeddings = ""
    c.teacher_batch_size = 64  # items per encoding step over all local devices (teacher model only)
    c.teacher_dtype = "float32"  # teacher compute dtype: "float32" or "bfloat16"
    c.teacher_max_len = 0  # teacher text truncation in tokens; 0 = the checkpoint's own

    # B3 (docs/reference.md, "B3 batch mining").
    c.batch_size = 1024  # rows per batch (the trainer's train.batch_size); a multiple of cluster_size
    c.cluster_size = 32  # K: rows per METIS cluster; a batch is batch_size / K clusters of one task
    # Ranks skipped as likely false negatives; -1 = per meta-task: 30 retrieval and grounding,
    # 70 VQA, 0 classification (whose gold-label rows are never ranked).
    c.p = -1
    c.m = 100  # strong negatives kept per query after the p skipped: S = R[:, p:p+m]
    c.hard_negatives = 0  # h: B3++ negatives per query (train with train.hard_negatives=h); 0 = B3
    # Batch orders written to the file, each reshuffling clusters and redrawing negatives; the
    # trainer replays the file from the start when it runs out.
    c.epochs = 1
    c.ranking_block = 512  # queries per device per ranking step: memory O(block x task rows)
    # Meta-task of tasks that neither MMEB's table nor data.root's datasets.json knows (mining from
    # an npz alone); "" = such a task is an error.
    c.meta_task = ""
    c.progress = True  # progress bars on the long stages

    # The training set, read as the trainer reads it; leave root and synthetic empty to mine the
    # rows of teacher_embeddings alone.
    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # MMEB-train layout; "" with data.synthetic set = the generated benchmark
    c.data.synthetic = ""  # "default" or "small": the synthetic benchmark (generated once)
    c.data.synthetic_dir = "~/.cache/vlm2vec_jax/synthetic"  # where the synthetic benchmark is kept
    c.data.subsets = "all"  # comma-separated subset names, or "all"
    c.data.split = "original"  # MMEB-train split: "original" or "diverse_instruction"
    c.data.image_root = ""  # "" = data.root
    c.data.max_rows_per_subset = 0  # 0 = every row
    c.data.positive_prompts = False  # B3's target-side prompts on what the teacher embeds
    c.data.bad_data = "skip"  # "skip" or "error", as in training: skipped rows change the row order
    return c
