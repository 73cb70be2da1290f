"""The package's shape: modules use each other through public names only, and the jobs' exit codes live in one
exception hierarchy."""

from __future__ import annotations

import ast
from pathlib import Path

from support.jobs import ROOT

SOURCES = sorted([*(ROOT / "lib" / "cxr").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


def module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "jobs"):
        return f"jobs.{path.stem}"
    parts = path.relative_to(ROOT / "lib").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` imports from: ``from ..score import x`` in cxr/jobs/score.py is
    cxr.score."""
    if not node.level:
        return node.module or ""
    module = module_name(path).split(".")
    package = module if path.stem == "__init__" else module[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def private_uses(path: Path) -> list[str]:
    """Every private name (``_x``, not ``__x__``) that ``path`` takes from another cxr module: imported by name,
    or read as an attribute of an imported cxr module."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(path, node)
            if source.split(".")[0] != "cxr" or source == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {source}.{alias.name}")
                else:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cxr":
                    aliases[alias.asname or "cxr"] = alias.name if alias.asname else "cxr"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    problems = [p for path in SOURCES for p in private_uses(path)]
    assert problems == []


def test_the_private_name_check_finds_one(tmp_path, monkeypatch):
    """The check above can fail: a module importing ``report``'s private helper, or reading one off a module."""
    fake = ROOT / "lib" / "cxr" / "jobs" / "_layout_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: PROBE if self == fake else ORIGINAL(self, *a, **k))
    assert private_uses(fake) == [
        "lib/cxr/jobs/_layout_probe.py:1 imports cxr.report._html",
        "lib/cxr/jobs/_layout_probe.py:2 imports cxr.score._load_one",
        "lib/cxr/jobs/_layout_probe.py:5 reads cxr.storage._private",
    ]


ORIGINAL = Path.read_text
PROBE = """from ..report import _html, write_report
from cxr.score import _load_one
from .. import storage
write_report
storage._private
"""


def test_every_job_failure_class_carries_its_exit_code():
    from cxr import cli, errors
    from cxr.checkpoint import CheckpointError
    from cxr.explain import LayerError
    from cxr.output import OutputError
    from cxr.sources import InputError

    expected = {
        LayerError: cli.USAGE,
        errors.UsageError: cli.USAGE,
        InputError: cli.BAD_INPUT,
        CheckpointError: cli.BAD_MODEL,
        OutputError: cli.BAD_OUTPUT,
        errors.CheckFailed: cli.CHECK_FAILED,
        errors.JobFailed: cli.FAILED,
    }
    for cls, code in expected.items():
        assert issubclass(cls, errors.CxrError) and cls.exit_code == code, cls
    assert issubclass(LayerError, ValueError)  # callers that catch ValueError still do


# Files whose long functions need no reason (none).
LONG_FUNCTION_EXEMPT: set[str] = set()


def test_no_long_function_without_a_reason():
    """A function of more than 80 lines in lib/ says in its docstring why it is long (the word 'long')."""
    unexplained = []
    for path in sorted((ROOT / "lib" / "cxr").rglob("*.py")):
        if str(path.relative_to(ROOT)) in LONG_FUNCTION_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                if "long" not in (ast.get_docstring(node) or "").lower():
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert unexplained == []
