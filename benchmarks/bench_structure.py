"""Measure the code structure of a package: module sizes, long functions, import cycles,
private names imported across modules and repeated blocks, printed as Markdown tables.

    python benchmarks/bench_structure.py                      # src/fedgrain of this checkout
    python benchmarks/bench_structure.py --src /tmp/old/src/fedgrain --out /tmp/before.md

Conventions:

* lines are physical lines (blank lines and comments included);
* a function's length runs from its ``def`` line to its ``end_lineno`` (decorators left out);
  nested functions and methods are counted on their own as well as inside their parent;
* the import graph has an edge ``a -> b`` for every import in ``a`` that names the package's
  module ``b``: ``import p.b`` and ``from p import b`` (``b`` a module) give ``p.b``,
  ``from p.b import name`` (``name`` not a module) gives ``p.b``; relative imports are
  resolved; a parent package's ``__init__`` run implicitly by importing a submodule is not an
  edge. "Module-level" imports are those outside any function body (class bodies and
  ``if``/``try`` blocks at the top count as module-level);
* a private name is a name with one leading underscore (not a dunder) imported with
  ``from X import _name`` where ``X`` is another module of the package; private modules
  imported that way (``from p import _mod``) are listed apart;
* repeated blocks are counted by the ``duplicates`` command (on PATH) over the source folder.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG_MODULE = 400
LONG_FUNCTION = 80
MEDIUM_FUNCTION = 50


@dataclass
class Module:
    name: str
    path: Path
    rel: str
    is_package: bool
    lines: int
    tree: ast.Module


@dataclass
class Function:
    qualname: str
    rel: str
    lineno: int
    length: int


@dataclass
class Import:
    source: str
    target: str
    lineno: int
    where: str  # "module", "function" or "typing" (under ``if TYPE_CHECKING:``)


@dataclass
class PrivateImport:
    source: str
    rel: str
    lineno: int
    target: str
    name: str
    is_module: bool
    where: str


@dataclass
class Graph:
    imports: list[Import] = field(default_factory=list)
    private: list[PrivateImport] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def edges(self, *wheres: str) -> dict[str, set[str]]:
        """The graph of the imports made in the given places."""
        out: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if imp.where in wheres:
                out[imp.source].add(imp.target)
        return out


# -- reading ------------------------------------------------------------------------------------


def load_modules(src: Path) -> dict[str, Module]:
    package = src.name
    modules: dict[str, Module] = {}
    for path in sorted(src.rglob("*.py")):
        rel_parts = path.relative_to(src).parts
        if any(part == "__pycache__" or part.startswith(".") for part in rel_parts):
            continue
        parts = [package, *rel_parts[:-1]]
        is_package = path.name == "__init__.py"
        if not is_package:
            parts.append(path.stem)
        name = ".".join(parts)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name=name, path=path, rel=path.relative_to(src).as_posix(),
                               is_package=is_package, lines=len(text.splitlines()),
                               tree=ast.parse(text, filename=str(path)))
    return modules


# -- functions ----------------------------------------------------------------------------------


def functions(module: Module) -> list[Function]:
    out: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qual = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                out.append(Function(qual, module.rel, child.lineno, length))
                visit(child, qual + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(module.tree, "")
    return out


# -- imports ------------------------------------------------------------------------------------


def _known_prefix(name: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST):
    """Yield ``(node, where)`` for every import statement in ``tree``: ``where`` is
    "function" inside a function body, else "typing" under ``if TYPE_CHECKING:``, else
    "module"."""
    stack: list[tuple[ast.AST, str]] = [(tree, "module")]
    while stack:
        node, where = stack.pop()
        typing_body = (isinstance(node, ast.If) and _is_type_checking(node.test)
                       and where == "module")
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = "function"
            elif typing_body and child in node.body:
                inner = "typing"
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, inner
            stack.append((child, inner))


def import_graph(modules: dict[str, Module]) -> Graph:
    graph = Graph(modules=sorted(modules))
    for module in modules.values():
        found: list[tuple[str, int, str]] = []
        for node, where in _walk_imports(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known_prefix(alias.name, modules)
                    if target:
                        found.append((target, node.lineno, where))
                continue
            origin = _resolve_from(module, node)
            origin_known = _known_prefix(origin, modules) if origin else None
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                is_module = alias.name != "*" and sub in modules
                target = sub if is_module else origin_known
                if target:
                    found.append((target, node.lineno, where))
                private = (alias.name.startswith("_") and not alias.name.startswith("__"))
                if private and origin_known and target != module.name:
                    graph.private.append(PrivateImport(
                        source=module.name, rel=module.rel, lineno=node.lineno,
                        target=target, name=alias.name, is_module=is_module,
                        where=where))
        for target, lineno, where in found:
            if target != module.name:
                graph.imports.append(Import(module.name, target, lineno, where))
    return graph


def tarjan(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of ``edges`` (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, sorted(edges.get(root, ()))))
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found = [c for c in tarjan(edges) if len(c) > 1]
    return sorted(found, key=lambda c: (-len(c), c))


# -- duplicates ---------------------------------------------------------------------------------


def duplicates(src: Path, seconds: int) -> tuple[int | None, str]:
    """The number of pairs ``duplicates`` lists over ``src`` and its raw output."""
    exe = shutil.which("duplicates")
    if exe is None:
        return None, "duplicates: not on PATH"
    cmd = [exe, "--repo", str(src), "--most", "200", "--seconds", str(seconds)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    raw = (run.stdout + run.stderr).strip()
    first = raw.splitlines()[0] if raw else ""
    match = re.match(r"(\d+) pairs?\b", first)
    if match:
        count = int(match.group(1))
    elif first.startswith("no duplicates"):
        count = 0
    else:
        rows = len(re.findall(r"^D\d+ ", raw, flags=re.M))
        more = re.search(r"\(\+(\d+) more pairs?\)", raw)
        count = rows + (int(more.group(1)) if more else 0)
    return count, f"$ {' '.join(cmd)}\n{raw}"


# -- report -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---:" if h in ("lines", "length", "line", "#") else "---"
                              for h in header) + " |"]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return out


def report(src: Path, dup_seconds: int) -> str:
    modules = load_modules(src)
    if not modules:
        raise SystemExit(f"no Python modules under {src}")
    funcs = [f for m in modules.values() for f in functions(m)]
    graph = import_graph(modules)
    views = [  # (title, the places whose imports count, cycles)
        ("All imports (module level and inside functions)", ("module", "function")),
        ("Module-level imports only", ("module",)),
        ("All imports and `if TYPE_CHECKING:` imports", ("module", "function", "typing")),
    ]
    found = [(title, wheres, cycles(graph.edges(*wheres))) for title, wheres in views]
    all_cycles, top_cycles, typed_cycles = (c for _, _, c in found)
    private_names = [p for p in graph.private if not p.is_module]
    private_modules = [p for p in graph.private if p.is_module]
    dup_count, dup_raw = duplicates(src, dup_seconds)

    by_lines = sorted(modules.values(), key=lambda m: (-m.lines, m.rel))
    total = sum(m.lines for m in by_lines)
    big = [m for m in by_lines if m.lines > BIG_MODULE]
    long_funcs = sorted((f for f in funcs if f.length > LONG_FUNCTION),
                        key=lambda f: (-f.length, f.rel, f.lineno))
    n_medium = sum(f.length > MEDIUM_FUNCTION for f in funcs)

    out = [f"# Code structure of `{src}`", ""]
    out += ["## Summary", ""]
    out += _table(["measure", "value"], [
        ["modules", len(modules)],
        ["physical lines", total],
        [f"modules over {BIG_MODULE} lines", len(big)],
        ["functions and methods", len(funcs)],
        [f"functions over {MEDIUM_FUNCTION} lines", n_medium],
        [f"functions over {LONG_FUNCTION} lines", len(long_funcs)],
        ["import cycles (all imports)",
         f"{len(all_cycles)} ({sum(map(len, all_cycles))} modules)"],
        ["import cycles (module-level imports only)",
         f"{len(top_cycles)} ({sum(map(len, top_cycles))} modules)"],
        ["import cycles (also counting `if TYPE_CHECKING:` imports)",
         f"{len(typed_cycles)} ({sum(map(len, typed_cycles))} modules)"],
        ["private names imported across modules", len(private_names)],
        ["private modules imported with `from X import _mod`", len(private_modules)],
        ["repeated-block pairs (`duplicates`)", "n/a" if dup_count is None else dup_count],
    ])

    out += ["", "## Lines per module", ""]
    out += _table(["#", "module", "file", "lines"],
                  [[i, f"`{m.name}`", m.rel, m.lines] for i, m in enumerate(by_lines, 1)])
    out += [f"| | **total** | {len(modules)} modules | **{total}** |", "",
            f"Modules over {BIG_MODULE} lines: **{len(big)}**."]

    out += ["", f"## Functions and methods over {LONG_FUNCTION} lines", ""]
    if long_funcs:
        out += _table(["function", "file", "line", "length"],
                      [[f"`{f.qualname}`", f.rel, f.lineno, f.length] for f in long_funcs])
    else:
        out.append("None.")
    out += ["", f"Functions over {MEDIUM_FUNCTION} lines: **{n_medium}**; over "
                f"{LONG_FUNCTION} lines: **{len(long_funcs)}** (of {len(funcs)})."]

    out += ["", "## Import cycles", "",
            f"Strongly connected components of more than one module: **{len(all_cycles)}** "
            f"counting every import that runs (module level and inside functions), "
            f"**{len(top_cycles)}** counting module-level imports only, "
            f"**{len(typed_cycles)}** when imports under `if TYPE_CHECKING:` (which never run) "
            "count as well.", ""]
    places: dict[tuple[str, str], set[str]] = {}
    for imp in graph.imports:
        places.setdefault((imp.source, imp.target), set()).add(imp.where)
    for title, wheres, comps in found:
        out += [f"### {title}", ""]
        if not comps:
            out += ["None.", ""]
            continue
        edges = graph.edges(*wheres)
        rows = []
        for n, comp in enumerate(comps, 1):
            members = set(comp)
            inner = sorted((a, b) for a in comp for b in edges[a] if b in members)
            marks = []
            for a, b in inner:
                kinds = places[a, b] & set(wheres)
                note = "" if "module" in kinds else (
                    " (in function)" if "function" in kinds else " (typing only)")
                marks.append(f"{a} -> {b}{note}")
            rows.append([n, len(comp), ", ".join(f"`{m}`" for m in comp),
                         "<br>".join(marks)])
        out += _table(["#", "modules", "members", "edges inside the component"], rows)
        out.append("")

    out += ["## Private names imported across modules", ""]
    if private_names:
        out += _table(["importer", "line", "from", "name", "where"],
                      [[p.rel, p.lineno, f"`{p.target}`", f"`{p.name}`",
                        p.where]
                       for p in sorted(private_names, key=lambda p: (p.rel, p.lineno, p.name))])
    else:
        out.append("None.")
    out += ["", f"Count: **{len(private_names)}** imports "
                f"({len({(p.target, p.name) for p in private_names})} distinct names)."]
    if private_modules:
        out += ["", "Private modules imported by `from X import _mod` (not counted above): "
                + ", ".join(sorted({f"`{p.target}` in {p.rel}" for p in private_modules}))
                + "."]

    out += ["", "## Repeated blocks", "",
            "Pairs listed by `duplicates`: "
            + ("**n/a**" if dup_count is None else f"**{dup_count}**") + ".", "",
            "<details><summary>raw output of duplicates</summary>", "", "```text", dup_raw,
            "```", "", "</details>", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=REPO / "src" / "fedgrain",
                        help="the package folder to measure (default: src/fedgrain)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the Markdown here instead of stdout")
    parser.add_argument("--dup-seconds", type=int, default=120,
                        help="time limit passed to duplicates (default: 120)")
    args = parser.parse_args(argv)
    src = args.src.resolve()
    if not src.is_dir():
        parser.error(f"--src {src} is not a folder")
    text = report(src, args.dup_seconds)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
