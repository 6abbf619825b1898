"""The folders show the systems, and the imports run one way (minigen/__init__.py's list): a package imports only
the top-level modules and the packages listed for it, so each system can be read without those after it."""

from __future__ import annotations

import ast
from pathlib import Path

import minigen

ROOT = Path(minigen.__file__).parent
TOP = ""  # the top-level modules: what every system uses
# package -> what it may import besides itself
MAY_IMPORT = {TOP: set(), "diffusion": {TOP}, "fid": {TOP}, "lora": {TOP}, "gan": {TOP, "fid"},
              "sd": {TOP, "diffusion", "lora"}, "finetune": {TOP, "diffusion", "lora", "sd"},
              "merge": {TOP, "lora", "sd"}, "evaluate": {TOP, "fid", "sd", "finetune"}}


def system_of(module: str) -> str:
    """'minigen.sd.model' -> 'sd'; 'minigen.io' (a top-level module) -> TOP."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else TOP


def imported_modules(path: Path) -> list[str]:
    """The minigen modules `path` imports, absolute ('from . import a' gives each name as a module)."""
    here = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = ".".join(here[:len(here) - node.level + 1] + ((node.module,) if node.module else ())) \
            if node.level else node.module or ""
        if base.startswith("minigen"):
            found += [base] if node.module else [f"{base}.{a.name}" for a in node.names]
    return found


def test_every_package_imports_only_what_comes_before_it():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mine = system_of(module)
        wrong += [f"{module} imports {target}" for target in imported_modules(path)
                  if system_of(target) not in MAY_IMPORT[mine] | {mine}]
    assert not wrong, wrong
    assert set(MAY_IMPORT) - {TOP} == {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}


def test_no_library_file_imports_a_command_line_tool():
    tools = {p.stem for p in ROOT.parent.glob("*.py")}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            assert not set(names) & tools, (path, names)


def test_modules_are_read_in_one_sitting():
    """No library file over ~400 lines (the samplers, one function each, would be the exception)."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 410}
    assert not long, long
