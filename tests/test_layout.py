"""The package's shape, read from the source: no import circles, scripts that import only minillm, one
job per module named in its docstring's first line, no module over ~600 lines, one command-line system.

Run: .venv/bin/python -m pytest -q tests/test_layout.py
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minillm"
SCRIPTS = ["train_pretrain.py", "train_sft.py", "train_orpo.py", "evaluate.py"]
LONG_FILES_ALLOWED = {"minillm/kernels/triton_attention.py"}  # the Triton kernel: forward and backward


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = {d for d in imported(path) if d in mods and d != name}
        # `import minillm.x` also imports the package minillm itself: not an edge worth tracking
        graph[name] = {d for d in deps if d != "minillm"}
    return graph


def test_no_import_circles():
    graph = package_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_model_does_not_import_its_checkpoint_code():
    assert "minillm.hf" not in imported(PACKAGE / "model.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_only_minillm_never_each_other(script):
    names = imported(ROOT / script)
    others = {Path(s).stem for s in SCRIPTS} - {Path(script).stem}
    assert not names & others, f"{script} imports another script"
    assert any(n.startswith("minillm") for n in names)


def test_each_module_names_its_job_and_stays_short():
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert doc and len(doc.splitlines()[0]) > 20, f"{name}: no docstring naming its job"
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert rel in LONG_FILES_ALLOWED or lines <= 600, f"{rel}: {lines} lines"


def test_one_command_line_system():
    """Every CLI parses its options with minillm.options (dataclass fields -> flags); none uses argparse."""
    files = list(PACKAGE.rglob("*.py")) + [ROOT / s for s in SCRIPTS] + sorted((ROOT / "demo").glob("*.py")) \
        + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    for path in files:
        assert "argparse" not in imported(path), f"{path.relative_to(ROOT)} uses argparse"


def test_the_sample_world_is_not_in_the_library():
    assert not (PACKAGE / "sample_world.py").exists()
    assert not any("sample_world" in d for deps in package_graph().values() for d in deps)
