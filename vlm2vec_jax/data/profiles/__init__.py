"""Training-set profiles by name or path, for `data.profile` (configs/common.py).

"" means no profile; "train" the configured training set itself, profiled when the run starts
(image headers only: seconds for thousands of rows, about a minute per 100k); a built-in name (`BUILTIN`) one of the profiles committed next to this file
(`mmeb_shape.json`: the synthetic `mmeb_shape` scale at MMEB's 1280-token image cap, read at the
2B recipes' settings; regenerate it with `python -m vlm2vec_jax.data.profiles.mmeb_shape`); anything
else a path to a profile.json written by `python -m vlm2vec_jax.data.profile`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from vlm2vec_jax.data.profile import COMMAND, Profile, load_profile, profile_train_set

HERE = Path(__file__).resolve().parent
BUILTIN = {"mmeb_shape": HERE / "mmeb_shape.json"}
TRAIN_SET = "train"


def resolve_profile(value: str, config: ml_collections.ConfigDict | None = None) -> Profile | None:
    """The profile `data.profile` names, or None for ""; for "train", the profile of the training
    set `config` describes; ValueError naming the key otherwise."""
    if not value:
        return None
    if value == TRAIN_SET:
        if config is None:
            raise ValueError(f"data.profile={TRAIN_SET!r} profiles the run's training set: it needs the run's config")
        raw = profile_train_set(config)
        return Profile(raw["config"], raw["subsets"], raw["total"])
    path = BUILTIN.get(value, Path(value).expanduser())
    if not path.is_file():
        raise ValueError(
            f"data.profile={value!r}: no such file; give a profile.json written by python -m {COMMAND}, "
            f"or a built-in profile: {', '.join(sorted(BUILTIN))}"
        )
    try:
        return load_profile(path)
    except ValueError as e:
        raise ValueError(f"data.profile={value!r}: {e}") from e
