"""The package's layout keeps its promises: folders by role in one direction (a lower layer never imports a
higher one), no import circles, no private names imported across modules, modules of at most 400 lines,
the driver's functions short, no branching on a job kind's name outside `kinds/`, and public names that
no submodule shadows."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fengshen_batch as fb

ROOT = Path(fb.__file__).resolve().parent
# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    {"__init__", "errors", "constraints", "dedup", "params", "tiny_model"},
    {"io"},
    {"spec"},
    {"engine"},
    {"model"},
    {"reports"},
    {"kinds"},
    {"workers"},
    {"job", "submission"},
    {"api", "processors"},
    {"cli", "__main__"},
]
LAYER = {top: i for i, tops in enumerate(LAYERS) for top in tops}
MAX_LINES = 400
MAX_DRIVER_FUNCTION_LINES = 60
KIND_NAMES = {"score", "generate", "judge"}


def _modules() -> dict[str, Path]:
    """Dotted name below the package (`job.run`, `kinds`) -> file."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of this package in the file: at the
    top, inside functions and under TYPE_CHECKING alike."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] + (
                node.module.split(".") if node.module else []
            )
            for alias in node.names:
                sub = ".".join([*base, alias.name])
                if sub in MODULES:  # `from . import score_sketch`: the submodule itself
                    found.append((sub, [], node.lineno))
                else:
                    found.append((".".join(base) or "__init__", [alias.name], node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fengshen_batch"):
            mod = node.module.removeprefix("fengshen_batch").lstrip(".") or "__init__"
            found.append((mod, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(name, path) if m != name} for name, path in MODULES.items()}


def test_every_relative_import_names_a_module_of_the_package():
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {mod}"
        for name, path in MODULES.items()
        for mod, _, line in _imports(name, path)
        if mod not in MODULES
    ]
    assert not missing


def test_layers_import_downwards_only():
    up = []
    for name, path in MODULES.items():
        for mod, _, line in _imports(name, path):
            here, there = LAYER[name.split(".")[0]], LAYER[mod.split(".")[0]]
            if there > here:
                up.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not up, "an arrow back up: " + "; ".join(up)


def test_no_import_circles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles


def test_no_private_names_imported_across_modules():
    private = [
        f"{path.relative_to(ROOT)}:{line}: {n} from {mod}"
        for name, path in MODULES.items()
        for mod, names, line in _imports(name, path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private


def test_modules_stay_small_and_the_drivers_functions_short():
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: lines for n, lines in big.items() if lines > MAX_LINES}
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in MODULES.items()
        if name.startswith("job")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_DRIVER_FUNCTION_LINES
    ]
    assert not long


def _compares_a_kind_name(node: ast.AST) -> bool:
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    names = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
    names |= {e.value for s in sides if isinstance(s, ast.Tuple | ast.Set | ast.List) for e in s.elts
              if isinstance(e, ast.Constant)}  # fmt: skip
    mentions_kind = any("kind" in ast.unparse(s) for s in sides)
    return mentions_kind and bool(names & KIND_NAMES)


def test_a_kinds_behaviour_is_behind_its_lookup():
    """Outside kinds/, nothing branches on a kind's name: it asks `kinds.get(spec.kind)`."""
    branches = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for name, path in MODULES.items()
        if not name.startswith("kinds")
        for node in ast.walk(ast.parse(path.read_text()))
        if _compares_a_kind_name(node)
    ]
    assert not branches


def test_public_names_are_not_shadowed_by_submodules():
    """`fb.report` stays the function after `fengshen_batch.reports` (or any module) is imported."""
    for info in pkgutil.walk_packages(fb.__path__, "fengshen_batch."):
        if info.name != "fengshen_batch.__main__":
            importlib.import_module(info.name)
    for name in fb.__all__:
        assert not isinstance(getattr(fb, name), type(sys)), f"fengshen_batch.{name} is a module"
    assert callable(fb.report) and callable(fb.run) and callable(fb.submit)


def test_the_driver_side_of_every_kind_imports_no_torch():
    """What the driver holds of a kind (its checks, schemas, merge, finish and report modules) loads without
    torch or transformers."""
    code = (
        "import sys\n"
        "import fengshen_batch.job.run, fengshen_batch.job.checks, fengshen_batch.job.finish, fengshen_batch.api\n"
        "import fengshen_batch.reports.score_report, fengshen_batch.reports.generate_report\n"
        "from fengshen_batch.kinds import KINDS, get\n"
        "from fengshen_batch.kinds.schemas import result_fields\n"
        "kinds = [get(k) for k in KINDS]\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.usefixtures("ray_cluster")
def test_a_labelled_judge_jobs_driver_imports_no_torch(tmp_path, tiny_model_dir):
    """The whole job, in a process of its own: the actors load torch, the driver that counts accuracy does not."""
    pq.write_table(
        pa.table({"id": ["a", "b"], "cands": [["x is y.", "x is z."], ["p.", "q."]], "label": [0, 1]}),
        tmp_path / "in.parquet",
    )
    spec = {"kind": "judge", "model": str(tiny_model_dir), "input": str(tmp_path / "in.parquet"),
            "output": str(tmp_path / "out"), "candidates_column": "cands", "label_column": "label"}  # fmt: skip
    code = (
        "import sys, fengshen_batch as fb\n"
        f"r = fb.run({spec!r}, progress=None)\n"
        "print(r.manifest['judge']['labelled_rows'], sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "2 []"
