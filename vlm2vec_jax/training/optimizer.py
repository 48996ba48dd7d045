"""optax AdamW with warmup then linear or cosine decay, global-norm clipping and a weight-decay mask
(no decay on biases, norm scales or DoRA magnitudes: HF Trainer's rule, which VLM2Vec trains with)."""

from typing import Any

import jax
import ml_collections
import optax

# Leaves that do not decay: biases, norm weights/scales (RMSNorm's is "weight"), DoRA magnitudes.
UNDECAYED_LEAVES = ("bias", "scale", "weight")
UNDECAYED_MARK = "magnitude"


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, decay: str) -> optax.Schedule:
    """0 -> `peak` linearly over `warmup_steps`, then to 0 at `total_steps` linearly, by a cosine,
    or not at all ("constant")."""
    if decay not in ("linear", "cosine", "constant"):
        raise ValueError(f'train.schedule must be "linear", "cosine" or "constant", got {decay!r}')
    warmup_steps = min(warmup_steps, total_steps)
    rest = max(total_steps - warmup_steps, 1)
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    after = {
        "linear": optax.linear_schedule(peak, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(peak, rest),
        "constant": optax.constant_schedule(peak),
    }[decay]
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to, by the name of the leaf."""

    def decays(path: tuple, _: Any) -> bool:
        # The last dict key names the leaf (nnx Variables add a trailing `.value` attribute key).
        name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)).lower()
        return name not in UNDECAYED_LEAVES and UNDECAYED_MARK not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    schedule: optax.Schedule, *, weight_decay: float, clip_norm: float, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """Clip by global norm (0 = off), then AdamW with the decay mask."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw


def optimization(config: ml_collections.ConfigDict) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(learning-rate schedule, AdamW with clipping) of `config.train`."""
    t = config.train
    schedule = learning_rate_schedule(t.learning_rate, t.steps, t.warmup_steps, t.schedule)
    optimizer = make_optimizer(
        schedule, weight_decay=t.weight_decay, clip_norm=t.clip_norm, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps
    )
    return schedule, optimizer
