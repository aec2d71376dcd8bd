"""The layering rule of DESIGN.md §1, checked on the import graph of the installed package.

geometry ← data ← policy (model, tokenization, prompts, generation) ← rewards/metrics ← training, and beside
training, inference ← face. An import may only reach its own layer or a lower one, and training and
inference never import each other. Every ``import`` statement counts — also the lazy ones inside
functions — except those under ``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mg3d

ROOT = Path(mg3d.__file__).resolve().parent

#: (layer, module prefixes) — a module belongs to the entry with its longest matching prefix
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "geometry": (
        0,
        ("mg3d", "mg3d.errors", "mg3d.atomic", "mg3d.boxes", "mg3d.frames", "mg3d.checkpointing"),
    ),
    "data": (1, ("mg3d.data",)),
    "policy": (
        2,
        (
            "mg3d.model",
            "mg3d.lora",
            "mg3d.sharding",
            "mg3d.chat_template",
            "mg3d.tokenization",
            "mg3d.prompts",
            "mg3d.generation",
            "mg3d.grounding",
            "mg3d.trl_processor",
            "mg3d.testing",
        ),
    ),
    "rewards": (3, ("mg3d.rewards", "mg3d.evaluation", "mg3d.viz")),
    "training": (4, ("mg3d.grpo", "mg3d.sft")),
    "inference": (4, ("mg3d.grounder", "mg3d.bundle", "mg3d.predictions", "mg3d.inference_settings")),
    "face": (5, ("mg3d.cli", "mg3d.studies")),
}
SIBLINGS_THAT_NEVER_MEET = {("training", "inference"), ("inference", "training")}


def layer_of(module: str) -> str:
    best, length = None, -1
    for name, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports_of(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, imported mg3d module) for every executed import statement of a file, in line order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mg3d"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "mg3d":
                found.append((node.lineno, target))
    return sorted(found)


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        if importer == "mg3d":  # the public face: lazy names only (see mg3d/__init__.py)
            continue
        here = layer_of(importer)
        for line, target in imports_of(path):
            there = layer_of(target)
            if LAYERS[there][0] > LAYERS[here][0] or (here, there) in SIBLINGS_THAT_NEVER_MEET:
                out.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {here} module {importer} imports {there} {target}"
                )
    return out


def test_no_import_runs_against_the_layers() -> None:
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker must catch lazy imports and relative imports, and skip TYPE_CHECKING blocks."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mg3d.grpo.module import GRPOModule\n"
        "def f():\n    from mg3d.grounder import Grounder\n"
        "from ..grpo import loss\n"
    )
    fake = tmp_path / "probe.py"
    fake.write_text(src, encoding="utf-8")
    assert imports_of(fake, "mg3d.data.probe") == [(5, "mg3d.grounder"), (6, "mg3d.grpo")]
    assert layer_of("mg3d.grounder") == "inference" and layer_of("mg3d.data.transforms.config") == "data"


@pytest.mark.parametrize(
    "name", ["Grounder", "GRPOModule", "GroundingDataModule", "GroundingRecord", "Box", "CoordinateFrame"]
)
def test_public_face(name: str) -> None:
    obj = getattr(mg3d, name)
    assert obj.__name__ == name and name in mg3d.__all__
