"""The package's layering: every subpackage imports only from the layers below it, so the tree
shows the design (docs/architecture.md) and no import cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dllama_py"

# Lowest first; a module may import from its own layer and from the layers before it.
LAYERS = ["model", "formats", "text", "engine", "cluster", "generation", "commands", "api"]
TOP_LEVEL = {"_core", "__init__"}  # the C++ core and the package itself sit below everything


def imports_of(path: Path) -> set[str]:
    """The dllama_py modules a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dllama_py"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dllama_py"))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in TOP_LEVEL or parts[1] == "converter":
        return None
    return parts[1]


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL]
    assert loose == [], f"modules outside the layers: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(LAYERS), folders


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for layer in LAYERS:
        for path in (PACKAGE / layer).rglob("*.py"):
            for module in imports_of(path):
                other = layer_of(module)
                if other is not None and other in LAYERS and LAYERS.index(other) > LAYERS.index(layer):
                    upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert upward == []


def test_the_converter_uses_only_the_model_formats_and_text():
    converter = PACKAGE.parent / "converter"
    used = {layer_of(m) for p in converter.glob("*.py") for m in imports_of(p)} - {None}
    assert used <= {"model", "formats", "text"}, used
