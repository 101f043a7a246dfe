"""The package's layers, checked on its imports (ast; nothing is imported or run).

Layers, top to bottom (STYLE.md rule 12; README.md, *Architecture*):

    adakv_local.__main__                  the ``python -m adakv_local`` entry point
    adakv_local.cli.*                     commands only
    adakv_local.server.*                  the HTTP app of ``serve``
    adakv_local.eval.*                    the measuring harness
    adakv_local.* (everything else)       the engine: Llama, the cache handle, config, policies, binding

An import never runs upward (the engine imports neither eval nor cli, eval does not import cli),
``adakv_local.testing`` (the test-model writer, for tests and scripts) is imported by no module of
the package, and no module imports another's underscore names (``from .x import _y``, ``x._y``): a
helper two modules need is public in the lower one. Imports inside functions count as well.
Private *modules* of the package (``_lib``, ``_native``) are the package's own and may be imported
by its modules; their public names may be used by anyone.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RANKS = {"engine": 0, "eval": 1, "server": 2, "cli": 3, "entry": 4}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    """The layer of a module of the package, "testing" for the test-model writer, None outside."""
    parts = module.split(".")
    if parts[0] != "adakv_local":
        return None
    if len(parts) == 1:
        return "engine"
    if parts[1] in ("cli", "eval", "server", "testing"):
        return parts[1]
    if parts[1] == "__main__":
        return "entry"
    return "engine"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "adakv_local").rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the module imported from (absolute)
    names: tuple[str, ...]  # what is taken from it; () for `import x.y`


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, module: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = resolve(module, path.name == "__init__.py", node)
            out.append(Import(node.lineno, src, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            out += [Import(node.lineno, a.name, ()) for a in node.names]
    return out


def private_attribute_uses(path: Path, module: str, modules: dict[str, Path], root: Path) -> list[str]:
    """``x._y`` where x was imported as a module of the package (``from . import evaluate``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = resolve(module, path.name == "__init__.py", node)
            for a in node.names:
                if f"{src}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{src}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != module):
            bad.append(f"{path.relative_to(root)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return bad


def private_names(path: Path, module: str, modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """Underscore names taken from another module of the package (private submodules excepted)."""
    bad = []
    for imp in imports_of(path, module):
        if layer(imp.module) is None or imp.module == module:
            continue
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__") and f"{imp.module}.{name}" not in modules:
                bad.append(f"{path.relative_to(root)}:{imp.line}: from {imp.module} import {name}")
    return bad + private_attribute_uses(path, module, modules, root)


def back_edges(path: Path, module: str, modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    here = layer(module)
    bad = []
    for imp in imports_of(path, module):
        targets = [imp.module] + [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules]
        for target in targets:
            there = layer(target)
            if there is None or target == module:
                continue
            if there == "testing" and here != "testing":
                bad.append(f"{path.relative_to(root)}:{imp.line}: {module} ({here}) imports {target}, the test-model "
                           "writer, which the runtime never imports")
            elif here in RANKS and there in RANKS and RANKS[there] > RANKS[here]:
                bad.append(f"{path.relative_to(root)}:{imp.line}: {module} ({here}) imports {target} ({there}), a "
                           "higher layer")
    return bad


def test_layers_are_known():
    modules = package_modules()
    assert {layer(m) for m in modules} == {"engine", "eval", "server", "cli", "testing", "entry"}
    for m in ("adakv_local.llama", "adakv_local.kvcache", "adakv_local.config", "adakv_local.models.registry"):
        assert layer(m) == "engine", m
    assert layer("adakv_local.eval.bench") == "eval" and layer("adakv_local.cli.common") == "cli"


def test_no_import_runs_upward():
    modules = package_modules()
    bad = [b for m, p in modules.items() for b in back_edges(p, m, modules)]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


@pytest.mark.parametrize("where", ["adakv_local", "scripts"])
def test_no_private_names_across_modules(where):
    modules = package_modules()
    paths = sorted((ROOT / where).rglob("*.py"))
    assert paths
    bad = [b for p in paths for b in private_names(p, module_name(p, ROOT), modules)]
    assert not bad, "underscore names imported from another module (make the helper public where it lives):\n" + (
        "\n".join(bad))


def test_checker_catches_what_it_should(tmp_path):
    """The checks themselves, on a fake package laid out as ours."""
    pkg = tmp_path / "adakv_local"
    (pkg / "eval").mkdir(parents=True)
    (pkg / "cli").mkdir()
    for f in ("__init__.py", "eval/__init__.py", "cli/__init__.py", "cli/common.py", "testing.py"):
        (pkg / f).write_text("")
    (pkg / "llama.py").write_text("def f():\n    from .eval.bench import run\n")  # lazy, still upward
    (pkg / "eval" / "bench.py").write_text("from ..cli.common import x\nfrom ..llama import _private\n")
    (pkg / "eval" / "tasks.py").write_text("from . import bench\nbench._helper()\nfrom .. import testing\n")
    modules = package_modules(tmp_path)
    edges = [b for m, p in modules.items() for b in back_edges(p, m, modules, tmp_path)]
    privates = [b for m, p in modules.items() for b in private_names(p, m, modules, tmp_path)]
    assert len(edges) == 3, edges  # llama -> eval.bench, eval.bench -> cli.common, eval.tasks -> testing
    assert any("adakv_local.llama (engine) imports adakv_local.eval.bench" in b for b in edges), edges
    assert sorted(b.split(": ", 1)[1] for b in privates) == [
        "adakv_local.eval.bench._helper", "from adakv_local.llama import _private"], privates


def test_config_knows_no_argparse_and_the_cli_declares_each_flag_once():
    """config.py is the options' single source and knows nothing of argparse; the CLI declares the
    eviction flags through cli.common.eviction_flag only (no command re-declares --window and the like)."""
    modules = package_modules()
    config = modules["adakv_local.config"]
    assert "argparse" not in {i.module.split(".")[0] for i in imports_of(config, "adakv_local.config")}
    from adakv_local.config import OPTIONS

    flags = {f"--{o.name.replace('_', '-')}" for o in OPTIONS}
    bad = []
    for name, path in modules.items():
        if layer(name) != "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                    and any(isinstance(a, ast.Constant) and a.value in flags for a in node.args)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.args[0].value}")
    assert not bad, "eviction flags declared outside cli.common.eviction_flag:\n" + "\n".join(bad)


def test_every_script_names_the_docs_it_reproduces():
    """scripts/ keeps what reproduces a table of docs/ (what a user runs is an `adakv-local` command): each
    script's docstring says "Reproduces docs/FILE.md, *Heading*, ...; docs/OTHER.md, *Heading*." and
    every heading named is one of that file's."""
    bad = []
    for path in sorted((ROOT / "scripts").glob("*.py")):
        doc = " ".join((ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").split())
        m = re.search(r"Reproduces (.*?\*)\.(?: |$)", doc)
        if m is None:
            bad.append(f"{path.name}: no 'Reproduces docs/FILE.md, *Heading*.' in its docstring")
            continue
        for group in m.group(1).split("; "):
            name, _, rest = group.partition(", ")
            doc_file = ROOT / name
            if not name.startswith("docs/") or not doc_file.is_file():
                bad.append(f"{path.name}: {name!r} is not a file of docs/")
                continue
            headings = {line.lstrip("#").strip() for line in doc_file.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#")}
            bad += [f"{path.name}: {name} has no heading {h!r}" for h in re.findall(r"\*(.+?)\*", rest)
                    if h not in headings]
    assert not bad, "\n".join(bad)
