"""The full set of training keys with their defaults; every recipe starts from `base()` and changes
what it needs. Every key is documented here, once.

Override any key on the command line: `--config.train.steps=200 --config.workdir=/tmp/run`.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # checkpoints, metrics.jsonl, tensorboard/, export/; a run restarted here resumes
    c.seed = 0  # model init, LoRA init, dropout, random batches
    c.dry_run = False  # compile the training step only, on `topology.devices` simulated CPU devices, from abstract shapes (no weights, no data): print per-device memory, FLOPs per step and the projected step time, write workdir/dry_run.json

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"  # "random" (architecture below), a Hugging Face directory of a supported backbone (its config.json's model_type: qwen2_vl, qwen2_5_vl, qwen3_vl), or a PEFT LoRA/DoRA adapter directory (its base from base_model_name_or_path; train.mode=lora trains its adapters, which then set rank, alpha, targets and DoRA instead of lora.*; train.mode=full starts from the merged weights)
    c.model.geometry = ""  # dry runs without model.init, a real geometry: "2b" or "7b" (Qwen2-VL), "qwen3vl-2b" or "qwen3vl-8b" (a Hugging Face model.init gives its config.json instead)
    c.model.architecture = ml_collections.ConfigDict(  # only for init="random"; model_type: the backbone (qwen2_vl, qwen2_5_vl, qwen3_vl)
        dict(model_type="qwen2_vl", text_hidden=128, text_layers=2, heads=4, kv_heads=2, intermediate=512,
             vision_dim=64, vision_depth=2, vision_heads=2, vocab_size=1024)
    )
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"
    c.model.param_dtype = "float32"  # storage of frozen weights; trained weights are always float32
    c.model.remat = False  # recompute layer activations in the backward pass (memory for compute)
    c.model.attention = "auto"  # attention kernel: "auto" (dense on CPU, "xla" = jax.nn.dot_product_attention on GPU, "splash" = Pallas splash attention with segment ids on TPU), or one of those by name
    c.model.min_pixels = 3136  # image resize bounds (Qwen2-VL's smart_resize), override the checkpoint's
    c.model.max_pixels = 7056  # 84x84: 9 merged tokens
    c.model.max_len = 64  # tokens per query (every query is padded to this: fixed shapes); longer texts are truncated
    c.model.target_max_len = 0  # tokens per target (positives and hard negatives); 0 = max_len. Targets are often much shorter than queries (a label, an answer, an image): padding them to max_len wastes compute
    c.model.position_rule = "hf5"  # "hf5" (transformers 5.x M-RoPE) or "legacy" (VLM2Vec 4.x)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 64.0  # scale = alpha / rank (PEFT)
    c.lora.dropout = 0.1
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the language model's
    c.lora.dora = True  # DoRA (what released VLM2Vec / B3 models use)

    c.train = ml_collections.ConfigDict()
    c.train.mode = "lora"  # "lora" (adapters only) or "full" (every language-model weight)
    c.train.freeze_vision = True  # keep the vision tower fixed (VLM2Vec does)
    c.train.steps = 1000
    c.train.batch_size = 64  # global: queries per step over all devices and hosts
    c.train.gc_chunk_size = 0  # GradCache queries per device per chunk; 0 = no caching
    c.train.hard_negatives = 0  # explicit / mined hard-negative targets per query
    c.train.temperature = 0.02
    c.train.matryoshka_dims = ""  # e.g. "64,128,256,512,1024": InfoNCE on these renormalised prefixes of the vectors is added to the full width's (Matryoshka; Qwen3-VL-Embedding-2B serves 64..2048), so `Embedder.encode(..., dim=k)` stays accurate
    c.train.mask_duplicate_targets = False  # in-batch copies of a query's positive (a repeated label or answer) are not its negatives; VLM2Vec counts them as negatives
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 100
    c.train.schedule = "linear"  # decay after warmup: "linear", "cosine" or "constant"
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.packing = True  # pack sequences into fixed token / patch budgets per GradCache chunk (data/packing.py): a step runs as many chunks as its batch fills. Takes effect with GradCache (gc_chunk_size > 0) or explicit pack_text_rows; False = every sequence padded to max_len and the largest image (fixed shapes)
    c.train.pack_text_len = 0  # tokens per packed text row; 0 = max(max_len, target_max_len). A shorter row (the longest sequence your data has, from a profile) wastes less attention; a sequence over it is an error naming its training row
    c.train.pack_text_rows = 0  # text rows of pack_text_len tokens per packed chunk; 0 = the tokens of one padded GradCache chunk
    c.train.pack_vision_rows = 0  # vision rows (each the largest image max_pixels allows) per packed chunk; 0 = the images of one padded chunk
    c.train.pack_chunks = 0  # packed chunks a device may fill per step (array capacity, memory); 0 = twice the padded chunk count (1 without GradCache); a batch over it is an error naming this key
    c.train.cache_vision = True  # with the vision tower frozen (freeze_vision), packed GradCache runs it once per chunk and keeps its image features for the second pass instead of running it again (memory: pack_chunks x image tokens x text width per device); False recomputes them, as the PyTorch originals do
    c.train.log_every = 10  # steps between metrics.jsonl lines (the progress bar updates every step)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1  # > 1 shards parameters too (FSDP)
    c.mesh.tensor = 1  # > 1 splits heads and MLP columns Megatron-style (by logical axes; best when it divides kv heads)

    c.topology = ml_collections.ConfigDict()  # the target hardware of a dry run (training runs use the devices they find)
    c.topology.devices = 8  # accelerators of the target, simulated as CPU devices; the mesh keys above lay them out
    c.topology.device_memory_gib = 80.0  # per accelerator (H100 80GB; TPU v5p 95)
    c.topology.peak_tflops = 989.0  # dense bf16 per accelerator (H100 989; TPU v5p 459; A100 312)
    c.topology.mfu = 0.4  # model FLOPs utilisation assumed for the projected step time

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # MMEB-train layout; "" with data.synthetic set = the generated benchmark
    c.data.synthetic = ""  # "default", "small", "demo" or "mmeb_shape" (MMEB's image sizes and lengths): generate (once) and use the synthetic benchmark
    c.data.synthetic_dir = "~/.cache/vlm2vec_jax/synthetic"  # where the synthetic benchmark is kept
    c.data.subsets = "all"  # comma-separated subset names, or "all"
    c.data.split = "original"  # MMEB-train split: "original" or "diverse_instruction"
    c.data.image_root = ""  # "" = data.root
    c.data.max_rows_per_subset = 0  # 0 = every row
    c.data.positive_prompts = False  # B3's target-side prompts
    c.data.batch_file = ""  # a mined B3 batch file (parquet); "" = random batches
    c.data.homogeneous = True  # random batches of one task each (VLM2Vec's sampler); False = mixed
    c.data.profile = ""  # dry runs: "" = the worst case the fixed shapes pay; "train" (the run's own training set, profiled at start: image headers only, about a minute per 100k rows), a profile.json written by `python -m vlm2vec_jax.data.profile`, or "mmeb_shape" (built in: the mmeb_shape scale at MMEB's 1280-token image cap). With a profile the dry run reports flops_useful on batches drawn from it, and with train.packing both the dry run and training size the packed chunks from it (rows as long as its longest sequence and image; train.pack_* keys win)
    c.data.bad_data = "skip"  # "skip" (mask and count) or "error"
    c.data.num_workers = 2  # grain worker processes building batches; 0 = in the training process
    c.data.prefetch = 2  # batches each worker builds ahead

    c.eval = ml_collections.ConfigDict()
    c.eval.root = ""  # MMEB-eval layout; "" with data.synthetic = the benchmark's eval/
    c.eval.datasets = "all"
    c.eval.every = 0  # steps between evaluations; 0 = only at the end; -1 = never
    c.eval.batch_size = 64
    c.eval.max_queries = 0  # per dataset; 0 = all

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200  # steps between checkpoints (and at the end, and on SIGTERM)
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True  # write workdir/export, loadable by transformers (merged) or PEFT (peft) and by Embedder
    c.export.format = "merged"  # "merged": the whole model with LoRA folded in (a Hugging Face directory); "peft": only the adapters (train.mode=lora, a model.init on disk) as a PEFT directory (adapter_config.json + adapter_model.safetensors, base_model_name_or_path = the base of model.init)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "host:port"; "auto" = always jax.distributed.initialize() (TPU VM slices: launch/tpu_pod.sh); "" = auto-detect from the environment (SLURM, GKE TPU, Open MPI) or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.local_devices = 0  # CPU only: devices per process (jax_num_cpu_devices); 0 = default
    return c
