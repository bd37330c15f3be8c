"""The package's import graph, read with ``ast`` (nothing imported): module-level imports form no cycle, the
fine-tuning task modules (``stages/tasks/``) import only their shared base, the data task modules (pretrain,
vqa, classification, retrieval) import none of each other, and each downstream DataModule reaches only its own
task module (the shared base none)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "umd_lightning"


def module_name(path: Path) -> str:
    parts = [p for p in path.relative_to(PACKAGE.parent).with_suffix("").parts if p != "__init__"]
    return ".".join(parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: top_level_imports(path, set(paths)) for name, path in paths.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports at module level, directly or through other modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


DATA_TASKS = {f"umd_lightning.data.{name}" for name in ("pretrain", "vqa", "classification", "retrieval")}


def test_module_level_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert "umd_lightning.stages.finetune" in graph and "umd_lightning.predict" in graph
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            # A package's __init__ re-exporting its own modules is not a cycle of the modules themselves.
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_task_modules_import_only_their_base() -> None:
    graph = import_graph()
    tasks = {name for name in graph if name.startswith("umd_lightning.stages.tasks.") and not name.endswith(".base")}
    assert tasks == {f"umd_lightning.stages.tasks.{t}" for t in ("vqa", "classification", "retrieval")}
    for task in tasks:
        siblings = {t for t in graph[task] if t.startswith("umd_lightning.stages.")}
        assert siblings == {"umd_lightning.stages.tasks.base"}, (task, siblings)


def test_data_task_modules_import_no_other_task_module() -> None:
    """Pre-training, VQA, classification and retrieval read shared publishers through ``data/sources/`` and shared
    file rules through ``data/files.py``, never through each other."""
    graph = import_graph()
    tasks = DATA_TASKS
    crossing = {task: sorted(graph[task] & tasks) for task in sorted(tasks) if graph[task] & tasks}
    assert not crossing, crossing
    sources = {name for name in graph if name.startswith("umd_lightning.data.sources.")}
    assert {"umd_lightning.data.sources.roco", "umd_lightning.data.sources.medpix"} <= sources
    assert all(not graph[source] & tasks for source in sources)


def test_downstream_datamodules_reach_only_their_own_task_module() -> None:
    """The downstream DataModule base (``datamodules/downstream.py``) reaches no data task module, directly or
    through another module, and each task's DataModule reaches only its own (``datamodules/vqa.py`` -> ``vqa.py``)."""
    graph = import_graph()
    base = "umd_lightning.data.datamodules.downstream"
    assert not reachable(graph, base) & DATA_TASKS, sorted(reachable(graph, base) & DATA_TASKS)
    for task in ("vqa", "classification", "retrieval"):
        datamodule = f"umd_lightning.data.datamodules.{task}"
        assert base in graph[datamodule]
        assert reachable(graph, datamodule) & DATA_TASKS == {f"umd_lightning.data.{task}"}, (
            datamodule,
            sorted(reachable(graph, datamodule) & DATA_TASKS),
        )
