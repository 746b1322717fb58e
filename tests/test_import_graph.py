"""The packages' import graph flows one way: ebm_sim <- distill <- hardware, all <- ebm_pipeline <- ebm_cli.

ebm_sim (the simulator) imports none of the other packages; distill and hardware use ebm_sim but never the pipeline
or the ``ebm`` front end; hardware uses distill's students, so distill never imports hardware; nothing imports
ebm_cli. Checked twice: by importing every ebm_sim module in a fresh interpreter, and by an AST scan of the sources
(which also sees lazy imports inside functions, and ``importlib.import_module`` with a literal name).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ebm_sim", "distill", "hardware", "ebm_pipeline", "ebm_cli")
#: package -> the project packages it must not import, even lazily
FORBIDDEN = {
    "ebm_sim": {"distill", "hardware", "ebm_pipeline", "ebm_cli"},
    "distill": {"hardware", "ebm_pipeline", "ebm_cli"},
    "hardware": {"ebm_pipeline", "ebm_cli"},
    "ebm_pipeline": {"ebm_cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path):
    """(line, absolute module name) of every import in the file, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.lineno, node.args[0].value


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_sources_import_only_downstream_packages(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    violations = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                  for path in files for line, module in _imported_modules(path)
                  if module.split(".")[0] in FORBIDDEN[package]]
    assert not violations, "\n".join(violations)


def test_importing_every_ebm_sim_module_loads_no_other_package():
    script = """
import importlib, json, pkgutil, sys
import ebm_sim
project = %r
skipped = []
for info in pkgutil.walk_packages(ebm_sim.__path__, "ebm_sim."):
    try:
        importlib.import_module(info.name)
    except ImportError as error:  # an optional dependency (torch, ...) that is not installed
        if (error.name or "").split(".")[0] in project:
            raise
        skipped.append(info.name)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in project and name.split(".")[0] != "ebm_sim")
print(json.dumps({"loaded": loaded, "skipped": skipped,
                  "imported": sorted(n for n in sys.modules if n.startswith("ebm_sim."))}))
""" % (PACKAGES,)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ebm_sim.commands" in result["imported"] and "ebm_sim.outputs" in result["imported"]
    assert result["loaded"] == [], f"importing ebm_sim loaded {result['loaded']}"


def test_the_front_end_gathers_every_package():
    """``ebm_cli`` is the one place that composes the packages' subcommands."""
    import argparse

    from ebm_cli.main import build_parser

    parser = build_parser()
    (sub,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    funcs = {name: p.get_default("func") for name, p in sub.choices.items()}
    owners = {name: func.__module__ for name, func in funcs.items() if func is not None}
    assert owners["init"] == owners["relax"] == owners["train"] == owners["info"] == "ebm_sim.commands"
    assert owners["distill"] == owners["baseline"] == owners["export-onnx"] == owners["robustness"] \
        == "distill.commands"
    assert owners["pipeline"] == "ebm_pipeline.commands"
    assert list(sub.choices) == ["init", "relax", "train", "info", "demo", "export-onnx", "distill", "baseline",
                                 "robustness", "pipeline", "hardware"]
