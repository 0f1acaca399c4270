"""The import rules of the architecture (DESIGN §0), read off the source's import statements
(module level and inside functions alike):

- no two-way imports between flowsim's modules;
- the zoo (flowsim.models) imports nothing of flowsim;
- integrators import neither dynamics, problem, laws, the record nor simulate;
- dynamics import neither integrators nor the record;
- the record imports neither dynamics nor integrators;
- the terms, the seam between dynamics and integrators, import neither.

A rule that does not hold yet is listed in KNOWN_VIOLATIONS with why; the test fails on any
violation outside the list, and on a listed one that no longer occurs (remove it then)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"flowsim": "flowsim", "integrators": "flowsim.integrators", "models": "flowsim.models"}

#: (importer prefix, forbidden prefix, why the rule holds)
RULES = [
    ("flowsim.models", "flowsim", "the zoo is plain PyTorch"),
    ("flowsim.integrators", "flowsim.dynamics", "integrators take terms, not dynamics"),
    ("flowsim.integrators", "flowsim.problem", "integrators see a term, never the problem"),
    ("flowsim.integrators", "flowsim.laws", "integrators know nothing of laws"),
    ("flowsim.integrators", "flowsim.record", "integrators know nothing of the record"),
    ("flowsim.integrators", "flowsim.simulation", "integrators know nothing of simulate"),
    ("flowsim.dynamics", "flowsim.integrators", "dynamics hand terms; the default table pairs them"),
    ("flowsim.dynamics", "flowsim.record", "dynamics know nothing of the record"),
    ("flowsim.record", "flowsim.dynamics", "the record observes save points"),
    ("flowsim.record", "flowsim.integrators", "the record observes save points"),
    ("flowsim.terms", "flowsim.dynamics", "the seam imports neither side"),
    ("flowsim.terms", "flowsim.integrators", "the seam imports neither side"),
]

#: (importer, imported) pairs that break a rule today, and why they are still there
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every flowsim module -> the flowsim modules it imports (a name imported from a package
    resolves to its submodule when it is one)."""
    sources = {_module_name(p): p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                imported.add(module)
                imported |= {f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in sources}
        graph[name] = {m for m in imported if m == "flowsim" or m.startswith("flowsim.")} - {name}
    return graph


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    found = set()
    for importer, imported in graph.items():
        for source, forbidden, _ in RULES:
            if _within(importer, source):
                found |= {(importer, m) for m in imported if _within(m, forbidden) and not _within(m, source)}
    for a, imported in graph.items():
        for b in imported:
            related = _within(a, b) or _within(b, a)  # a package and its own submodules
            if a in graph.get(b, ()) and not related and a < b:
                found.add((a, b))
    return found


def test_the_graph_sees_real_imports():
    """The reader finds imports it must find (so an empty list of violations means something)."""
    graph = import_graph()
    assert "flowsim.terms" in graph["flowsim.dynamics.base"]
    assert "flowsim.terms" in graph["flowsim.integrators.rk"]
    assert "flowsim.errors" in graph["flowsim.integrators.base"]
    assert "flowsim.integrators" in graph["flowsim.defaults"]
    assert violations({"flowsim.a": {"flowsim.b"}, "flowsim.b": {"flowsim.a"}}) == {("flowsim.a", "flowsim.b")}
    assert violations({"flowsim.integrators.x": {"flowsim.dynamics"}}) == {("flowsim.integrators.x", "flowsim.dynamics")}


def test_import_rules_hold():
    found = violations(import_graph())
    new = sorted(found - set(KNOWN_VIOLATIONS))
    gone = sorted(set(KNOWN_VIOLATIONS) - found)
    assert not new, f"imports that break the architecture's rules: {new}"
    assert not gone, f"listed violations that no longer occur (remove them from KNOWN_VIOLATIONS): {gone}"


def test_every_integrator_declares_its_term_and_order():
    """Every integrator a config may name (GaussLegendre included) says which term it takes and
    states its order (its value is measured in test_integrator_orders)."""
    from flowsim.integrators import INTEGRATORS
    from flowsim.terms import Term

    assert "GaussLegendre" in INTEGRATORS
    for cls in INTEGRATORS.values():
        assert issubclass(cls.term, Term), cls
        assert "order" in {name for klass in cls.__mro__[:-2] for name in vars(klass)}, cls


def test_every_package_is_installed():
    """pyproject.toml lists its packages by name: a new subpackage missing there would import
    from a checkout (editable install) and be absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(init) for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed
