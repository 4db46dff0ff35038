"""Layers: finetune/ and inference/ never import data_tools/ (the converters), and the converters start without torch."""

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` statement of the file names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_finetune_and_inference_never_import_data_tools():
    files = sorted((REPO_ROOT / "finetune").rglob("*.py")) + sorted((REPO_ROOT / "inference").rglob("*.py"))
    assert len(files) > 40
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name == "data_tools" or name.startswith("data_tools.")
    ]
    assert offenders == []


def test_converters_load_without_torch():
    modules = sorted(path.stem for path in (REPO_ROOT / "data_tools").glob("*.py") if path.stem != "__init__")
    assert "format_openai" in modules and "tool_conversations" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module('data_tools.' + name)\n"
        "print(sorted(name for name in ('torch', 'transformers', 'numpy') if name in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
