"""Training-set profiles by name or path, for `data.profile` (configs/common.py).

"" means no profile; a built-in name (`BUILTIN`) one of the profiles committed next to this file
(`mmeb_shape.json`: the synthetic `mmeb_shape` scale at MMEB's 1280-token image cap, read at the
2B recipes' settings; regenerate it with `python -m vlm2vec_jax.data.profiles.mmeb_shape`); anything
else a path to a profile.json written by `python -m vlm2vec_jax.data.profile`.
"""

from __future__ import annotations

from pathlib import Path

from vlm2vec_jax.data.profile import COMMAND, Profile, load_profile

HERE = Path(__file__).resolve().parent
BUILTIN = {"mmeb_shape": HERE / "mmeb_shape.json"}


def resolve_profile(value: str) -> Profile | None:
    """The profile `data.profile` names, or None for ""; ValueError naming the key otherwise."""
    if not value:
        return None
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
