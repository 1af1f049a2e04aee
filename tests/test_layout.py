"""The package's shape, checked by parsing its source with `ast` (nothing is imported).

- No import cycle between minirlhf's modules (module-level imports only).
- No minirlhf import inside a function or class (the way a cycle is usually dodged).
- Each stage's training function stays short enough to read as its algorithm (≤ 60 lines).
- `minirlhf/__init__.py` re-exports the public API, and every name it lists exists.
"""
import ast
import importlib
import inspect
from pathlib import Path

import minirlhf

PACKAGE = Path(__file__).resolve().parent.parent / "minirlhf"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(node):
    """The minirlhf modules an Import / ImportFrom node imports (a submodule where one is named)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("minirlhf"):
        named = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return named or [node.module]
    return []


def import_graph():
    """module -> the minirlhf modules it imports at module level (the package __init__ left out:
    it is the top, importing everything, and a submodule never needs it)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {m for node in tree.body for m in imported_modules(node) if m != "minirlhf"}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "minirlhf.runs" in graph["minirlhf.sft"], "the graph sees `from minirlhf.runs import Run`"
    assert "minirlhf.baselines" in graph["minirlhf.pipeline"], "…and `from minirlhf import baselines`"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_minirlhf_import_inside_a_function_or_class():
    found = []
    for name, path in MODULES.items():
        for top in ast.parse(path.read_text()).body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found += [f"{path.name}:{n.lineno}" for n in ast.walk(top)
                          if isinstance(n, (ast.Import, ast.ImportFrom)) and (imported_modules(n)
                                                                               or getattr(n, "module", "") == "minirlhf")]
    assert not found, f"imports inside functions: {found}"


def test_training_functions_read_as_their_algorithm():
    long = []
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("train_") and name != "minirlhf.tokenizer":
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"training functions over 60 lines: {long}"


def test_no_re_exported_name_hides_a_module():
    """`from minirlhf import collect` must still give the module, not a function of that name."""
    for name in MODULES:
        importlib.import_module(name)
        if name.count(".") == 1:
            assert inspect.ismodule(getattr(minirlhf, name.split(".")[1])), name


def test_the_package_re_exports_the_public_api():
    for name in minirlhf.__all__:
        assert hasattr(minirlhf, name), name
    for name in ("dpo_loss", "gae", "ppo_policy_loss", "GPT", "train_sft", "train_ppo", "train_dpo"):
        assert name in minirlhf.__all__, name
