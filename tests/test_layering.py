"""teal/ is a library: no environment variables read, no top-level script imported, no import
cycle between its modules (checked on the source, function-level imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

TEAL = Path(__file__).resolve().parent.parent / "teal"
TOP_LEVEL = {"model", "generate", "calibrate", "perplexity", "evaluate_generation", "tp",
             "scripts"}


def _modules() -> dict:
    out = {}
    for path in sorted(TEAL.rglob("*.py")):
        parts = list(path.relative_to(TEAL.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set) -> set:
    """Modules of `known` that `name` imports (a package's submodule, not the package, when
    `from package import submodule`)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = anchor + ("." + node.module if node.module else "")
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs if subs and len(subs) == len(node.names) else {base} | subs
    return out


def test_no_environment_reads_under_teal():
    for path in TEAL.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                raise AssertionError(f"{path.relative_to(TEAL.parent)}:{node.lineno} reads the "
                                     f"environment (os.{node.attr}); pass a policy or argument")


def test_no_top_level_imports_and_no_cycles():
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        imported = _imports(name, path, known)
        bad = {m for m in imported if m.split(".")[0] in TOP_LEVEL}
        assert not bad, f"{name} imports top-level modules {sorted(bad)}: pass the model in"
        graph[name] = {m for m in imported if m in known and m != name}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, f"import cycles inside teal/: {cycles}"
