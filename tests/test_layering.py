"""The import rules the layout promises: stages never import each other, and no layer imports one above it.

Layers, lowest first: `pipeline.errors` and `pipeline.faults`, `pipeline.config`, `data`, `pipeline.models` and
`pipeline.training`, `reward_model`, `pipeline.orchestration`, `pipeline.apps`, and on top the
`chatpipe` command line and the stages. Imports inside functions count too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "data", "reward_model", "stages")

RANKS = {
    "pipeline.errors": 0,
    "pipeline.faults": 0,
    "pipeline.digests": 0,
    "pipeline.config": 1,
    "data": 2,
    "pipeline.models": 3,
    "pipeline.training": 3,
    "pipeline.evaluation": 3,
    "reward_model": 4,
    "pipeline.orchestration": 5,
    "pipeline.apps": 6,
    "pipeline.cli": 7,
    "stages": 7,
}


def layer(module: str) -> str:
    """The entry of RANKS a dotted module name falls under."""
    parts = module.split(".")
    for length in (2, 1):
        name = ".".join(parts[:length])
        if name in RANKS:
            return name
    raise AssertionError(f"{module}: not in any layer; add its package to RANKS in {Path(__file__).name}")


def all_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every absolute import in the project's packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                found += [(module, target, node.lineno) for target in targets]
    return found


def project_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of a project package."""
    return [(module, target, line) for module, target, line in all_imports() if target.split(".")[0] in PACKAGES]


def test_the_import_scan_sees_the_project():
    imports = project_imports()
    assert ("stages.ppo.__main__", "pipeline.training.loop") in {(source, target) for source, target, _ in imports}
    assert len(imports) > 100


def test_no_stage_imports_another_stage():
    crossings = [
        f"{source}:{line} imports {target}"
        for source, target, line in project_imports()
        if target.startswith("stages.") and source.split(".")[:2] != target.split(".")[:2]
    ]
    assert not crossings, "shared code belongs in data/, reward_model/ or pipeline/:\n" + "\n".join(crossings)


def test_no_layer_imports_a_layer_above_it():
    upward = [
        f"{source}:{line} ({layer(source)}) imports {target} ({layer(target)})"
        for source, target, line in project_imports()
        if RANKS[layer(target)] > RANKS[layer(source)]
    ]
    assert not upward, "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_the_library_does_not_import_what_only_the_bench_extra_installs():
    """trl is in the `bench` extra, not a runtime dependency: a library module importing it would
    fail on a plain `pip install chatpipe`."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(requirement).name for requirement in project["dependencies"]}
    bench = {Requirement(requirement).name for requirement in project["optional-dependencies"]["bench"]}
    bench_only = {"trl"}
    assert bench_only <= bench and not bench_only & runtime
    found = [
        f"{module}:{line} imports {target}" for module, target, line in all_imports() if target.split(".")[0] in bench_only
    ]
    assert not found, "move the import to bench/, or the package to `dependencies`:\n" + "\n".join(found)
