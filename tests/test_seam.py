"""The backend seam is closed: only toolkit/train/backends/ names a backend, its engine or its files (issue 12).

The rest of the toolkit asks a backend what it can do (`Backend.capabilities`) and lets it read and write its own
files. Two places are left out on purpose, each for a stated reason:
- `BackendConfig` in toolkit/config.py declares the `backend.*` settings (their default and help text name the
  choices; the backends package checks the value);
- toolkit/bench/ measures each backend against the others, choosing them by config value as a user's YAML does.
"""

from __future__ import annotations

import ast
from pathlib import Path

from toolkit.train.backends import BACKENDS

TOOLKIT = Path(__file__).resolve().parent.parent / "toolkit"
ALLOWED_DIRS = (TOOLKIT / "train" / "backends", TOOLKIT / "bench")
ALLOWED_CLASSES = {("config.py", "BackendConfig")}
# What each engine writes: single/ddp's state file, FSDP's extras and DCP's files, DeepSpeed's tag and shard names.
ENGINE_FILES = ("state.pt", "fsdp_extra", ".metadata", ".distcp", "mp_rank_", "zero_pp_rank", "optim_states")
ENGINE_MODULES = ("deepspeed", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.nn.parallel")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            found.add(id(first.value))
    return found


def _skipped_nodes(tree: ast.AST, file: Path) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (file.name, node.name) in ALLOWED_CLASSES:
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def _name(file: Path) -> str:
    return str(file.relative_to(TOOLKIT.parent)) if file.is_relative_to(TOOLKIT.parent) else file.name


def leaks(file: Path) -> list[str]:
    """Backend names, engine file names and engine imports in one module's code (not its docstrings/comments)."""
    tree = ast.parse(file.read_text())
    skip = _docstrings(tree) | _skipped_nodes(tree, file)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.lower() in BACKENDS or any(name in text for name in ENGINE_FILES):
                found.append(f"{_name(file)}:{node.lineno}: {text!r}")
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        for module in modules:
            if any(module == m or module.startswith(m + ".") for m in ENGINE_MODULES):
                found.append(f"{_name(file)}:{node.lineno}: import {module}")
    return found


def test_no_code_outside_the_backends_names_a_backend_or_its_files():
    files = [f for f in TOOLKIT.rglob("*.py") if not any(f.is_relative_to(d) for d in ALLOWED_DIRS)]
    assert len(files) > 30  # the scan really walks the toolkit
    found = [leak for f in files for leak in leaks(f)]
    assert found == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """A module that tests a backend's name, globs its files or imports its engine is caught on each line."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import deepspeed\n"
        "from torch.distributed.checkpoint import load\n"
        "def f(backend, path):\n"
        "    if backend.name == 'fsdp':\n"
        "        return path / 'fsdp_extra.pt'\n"
        "    return list(path.glob('*state.pt'))\n"
    )
    assert [leak.split(":")[1] for leak in leaks(bad)] == ["1", "2", "4", "5", "6"]
