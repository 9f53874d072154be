"""The package's shape, as DESIGN.md draws it: no module imports one that imports it back
(function-local imports count: they hide a cycle, they do not break it), and the CLI stays
thin."""

from __future__ import annotations

import ast
from pathlib import Path

import cifar_job

PACKAGE = Path(cifar_job.__file__).parent


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports, anywhere in it."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "cifar_job":  # from cifar_job import events, ...
                    found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
                elif node.module.startswith("cifar_job."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.split(".")[1] for a in node.names if a.name.startswith("cifar_job.")
                }
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the modules along it."""
    found, seen = [], set()

    def walk(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycle = path[path.index(target) :]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append([*cycle, target])
            elif len(path) < len(graph):
                walk(target, [*path, target])

    for module in sorted(graph):
        walk(module, [module])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    assert graph["cli"] and graph["train"]  # the walk sees the imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_cli_holds_no_sweep_or_tracking_logic():
    """cli.py parses options and prints; planning and submitting a sweep is launch.py's,
    the sweep's MLflow parent mlflow_client.py's, a sweep's status rows status.py's."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not calls & {"make_plan", "write_plan", "ensure_sweep_parent", "client_for"}
    assert {"plan_sweep", "submit_planned", "sweep_parent", "sweep_rows"} <= calls


def test_only_slurm_py_reads_slurm_and_nothing_reads_the_environment_at_import():
    """Slurm's variables and commands (squeue, sacct, scontrol, sinfo) are read in slurm.py
    alone; the watchdog, ledger, run directory, loader and status take what they need as
    arguments. The Slurm variables the batch scripts launch.py writes set are text, not
    reads. No module reads os.environ when it is imported."""
    commands = {"squeue", "sacct", "scontrol", "sinfo"}
    found = []
    for module in sorted(Path(cifar_job.__file__).parent.glob("*.py")):
        tree = ast.parse(module.read_text())
        if module.name != "slurm.py":
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if node.value.startswith(("SLURM_", "SLURMD_")):
                        found.append(f"{module.name}:{node.lineno}: reads {node.value!r}")
                # a command line ["squeue", ...], or shutil.which("squeue")
                first = None
                if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
                    first = node.elts[0]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "which":
                    first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and first.value in commands:
                    found.append(f"{module.name}:{node.lineno}: runs {first.value!r}")
        for statement in tree.body:  # module level: what runs at import
            if isinstance(statement, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            source = ast.unparse(statement)
            if "os.environ" in source or "getenv" in source:
                found.append(f"{module.name}:{statement.lineno}: environment at import")
    assert found == []
