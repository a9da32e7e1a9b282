"""The core is a framework: it never imports the built-in plugins, never asks the registry for one of them by
name, and its modules import each other without a cycle (function-level imports included)."""

import ast
import importlib.metadata
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "tarkit"
PLUGINS = CORE.parent / "plugins"


def core_modules() -> dict[str, ast.Module]:
    return {f"tarkit.{path.stem}": ast.parse(path.read_text(), str(path)) for path in sorted(CORE.glob("*.py"))}


def builtin_plugin_names() -> set[str]:
    """Names the tarkit distribution registers for plugins that live in ``tarkit_plugins``."""
    entry_points = importlib.metadata.distribution("tarkit").entry_points
    return {ep.name for ep in entry_points if ep.group.startswith("tarkit.") and ep.value.startswith("tarkit_plugins")}


def imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_core_imports_no_plugin():
    offenders = {
        name: sorted(m for m in imported_modules(tree) if m.split(".")[0] == "tarkit_plugins")
        for name, tree in core_modules().items()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_core_asks_the_registry_for_no_builtin_plugin_by_name():
    builtin = builtin_plugin_names()
    assert {"siglip2", "simvq", "text_aligned", "hf_causal_lm", "ar"} <= builtin  # the test sees the real names
    offenders = []
    for module, tree in core_modules().items():
        for node in ast.walk(tree):
            if (  # registry.get(group, "siglip2") / registry.create(group, "siglip2", ...)
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "create")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "registry"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                offenders.append(f"{module}:{node.lineno} registry.{node.func.attr}(..., {node.args[1].value!r})")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # def load_lm(path, lm="hf_causal_lm")
                defaults = [*node.args.defaults, *node.args.kw_defaults]
                for default in defaults:
                    if isinstance(default, ast.Constant) and default.value in builtin:
                        offenders.append(f"{module}:{node.lineno} {node.name}(... = {default.value!r})")
    assert not offenders


def test_the_core_modules_import_each_other_without_a_cycle():
    modules = core_modules()
    graph = {name: {m for m in imported_modules(tree) if m in modules and m != name} for name, tree in modules.items()}
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join([*path[path.index(node) :], node]))
            return
        if node in done:
            return
        for child in sorted(graph[node]):
            visit(child, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles


def test_the_core_is_at_most_2500_lines():
    """Interfaces, registry, CLI and shared machinery fit in 2,500 lines; Tar's own logic lives in plugins."""
    lines = {path.name: len(path.read_text().splitlines()) for path in CORE.glob("*.py")}
    assert sum(lines.values()) <= 2500, sorted(lines.items(), key=lambda item: -item[1])[:5]


def test_lm_agnostic_code_drives_language_models_through_the_interface_only():
    """No reaching past ``LanguageModel`` into a Hugging Face model's internals (its decoder stack or head): not
    in the core, nor in the built-in modules that serve every LM plugin (pipelines, generation, reflection)."""
    hf_internals = {"base_model", "get_output_embeddings", "get_input_embeddings", "lm_head"}
    lm_agnostic = {
        f"tarkit_plugins.{path.relative_to(PLUGINS).with_suffix('').as_posix().replace('/', '.')}": ast.parse(
            path.read_text(), str(path)
        )
        for path in (PLUGINS / "pipelines.py", PLUGINS / "lm" / "generation.py", PLUGINS / "lm" / "reflect.py")
    }
    offenders = [
        f"{module}:{node.lineno} .{node.attr}"
        for module, tree in {**core_modules(), **lm_agnostic}.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in hf_internals
    ]
    assert not offenders
