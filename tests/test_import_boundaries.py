"""Import boundaries of the package, read from the source with `ast` (every import, lazy ones inside
functions included), so a wrong import fails here before it tangles the layers:

- library code does not import the test helpers: only `vlm2vec_jax/testing/` imports `vlm2vec_jax.testing`
  (testing may import the library, never the reverse);
- nothing imports a command line (`python -m vlm2vec_jax.<verb>`): what two CLIs share lives in a
  library module;
- `vlm2vec_jax/models/` imports nothing of the layers built on it (training, data, mining, evaluation).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vlm2vec_jax"
TESTING = "vlm2vec_jax.testing"
# The command lines: modules run with `python -m`, imported by nothing.
CLI_MODULES = frozenset({
    "vlm2vec_jax.train", "vlm2vec_jax.eval", "vlm2vec_jax.mine", "vlm2vec_jax.demo",
    "vlm2vec_jax.data.profiles.mmeb_shape",  # regenerates the built-in profile file
})
# Library modules that also run as a script (`if __name__ == "__main__"`): imported for what they define.
LIBRARY_WITH_MAIN = frozenset({"vlm2vec_jax.data.synthetic", "vlm2vec_jax.data.profile"})
MODELS = "vlm2vec_jax.models"
ABOVE_MODELS = ("vlm2vec_jax.training", "vlm2vec_jax.data", "vlm2vec_jax.mining", "vlm2vec_jax.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """{dotted name: (file, parsed source)} of every module under vlm2vec_jax/."""
    return {module_name(f): (f, ast.parse(f.read_text(), filename=str(f))) for f in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `tree` imports. `from a import b` yields `a` and `a.b` (b may
    be a submodule); relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(imported: str, package: str) -> bool:
    return imported == package or imported.startswith(package + ".")


def has_main_guard(tree: ast.Module) -> bool:
    """A top-level `if __name__ == "__main__":`."""
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)):
            return True
    return False


def violations(mods: dict[str, tuple[Path, ast.Module]]) -> list[str]:
    """One message per offending import statement and rule, naming the file, line and import."""
    found: dict[tuple[str, int, str], str] = {}
    for name, (path, tree) in mods.items():
        where = str(path.relative_to(REPO))
        for line, imported in imports(name, path, tree):
            if within(imported, TESTING) and not within(name, TESTING):
                found.setdefault((where, line, "testing"), f"{where}:{line} imports {imported}: library code must not "
                                 f"import the test helpers ({TESTING}); move what it needs into a library module")
            cli = next((c for c in CLI_MODULES if within(imported, c)), None)
            if cli is not None and name != cli:
                found.setdefault((where, line, "cli"), f"{where}:{line} imports {imported}: {cli} is a command line; "
                                 "move what is shared into a library module")
            above = next((a for a in ABOVE_MODELS if within(imported, a)), None)
            if above is not None and within(name, MODELS):
                found.setdefault((where, line, "models"), f"{where}:{line} imports {imported}: {MODELS} must not "
                                 f"import {above}, a layer built on it")
    return sorted(found.values())


@pytest.fixture(scope="module")
def mods() -> dict[str, tuple[Path, ast.Module]]:
    return modules()


def test_no_module_crosses_a_boundary(mods) -> None:
    found = violations(mods)
    assert not found, "import boundary violations:\n" + "\n".join(found)


def test_every_script_is_classified(mods) -> None:
    """A module runnable as a script is either a CLI (imported by nothing) or a listed library module."""
    scripts = {name for name, (_, tree) in mods.items() if has_main_guard(tree)}
    assert scripts - CLI_MODULES - LIBRARY_WITH_MAIN == set(), (
        "new `if __name__ == '__main__'` modules: add each to CLI_MODULES or LIBRARY_WITH_MAIN in this test")
    assert CLI_MODULES <= set(mods) and LIBRARY_WITH_MAIN <= set(mods)


def test_the_checks_see_imports(mods) -> None:
    """The parser finds what a module imports (lazy and relative imports too), and each rule fires on
    an offending import, naming the file and the import."""
    demo = {i for _, i in imports("vlm2vec_jax.demo", *mods["vlm2vec_jax.demo"])}
    assert "vlm2vec_jax.training.job.run_job" in demo
    lazy = {i for _, i in imports("vlm2vec_jax.training.job", *mods["vlm2vec_jax.training.job"])}
    assert "vlm2vec_jax.training.loop.Trainer" in lazy  # imported inside a function
    fake = {
        "vlm2vec_jax.training.x": (PACKAGE / "training/x.py", ast.parse("from vlm2vec_jax.testing import tiny_checkpoint")),
        "vlm2vec_jax.mine2": (PACKAGE / "mine2.py", ast.parse("def f():\n    from vlm2vec_jax import eval")),
        "vlm2vec_jax.models.y": (PACKAGE / "models/y.py", ast.parse("from ..data import records")),
        "vlm2vec_jax.testing.z": (PACKAGE / "testing/z.py", ast.parse("from vlm2vec_jax.testing.tiny_checkpoint import tiny_image")),
    }
    found = violations(fake)
    assert len(found) == 3, found
    assert found[0].startswith("vlm2vec_jax/mine2.py:2 imports vlm2vec_jax.eval:"), found
    assert found[1].startswith("vlm2vec_jax/models/y.py:1 imports vlm2vec_jax.data:"), found
    assert found[2].startswith("vlm2vec_jax/training/x.py:1 imports vlm2vec_jax.testing:"), found
