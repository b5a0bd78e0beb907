"""Every DVC stage declares the code it runs (issue 16 item 1).

A stage whose command imports a module its ``deps`` do not cover is not re-run when that module
changes (RL once missed ``rl_rollout.py``, where the reward lives). For each stage of ``dvc.yaml``
this test follows the stage's command (``trimpi <verb>`` -> ``module:run_<verb>`` in
``pipeline/cli.py``) through the project's own code and checks that every module it can reach is
covered by a dep (the file itself or a directory above it).

Reachability is function-granular, not module-granular, because this codebase imports inside
functions on purpose (``trimpi --help`` stays instant) and a module-level closure would make, e.g.,
``model init`` depend on every policy module through one constant it reads from ``clevr_policy.py``.
A *unit* is a module's import-time code or one of its top-level functions/classes (a class with
all its methods). Reaching a unit reaches: the import-time code of every module it imports; the
functions and classes it names (by bare name, through a ``from x import name`` or ``module.attr``).
Over-approximations that remain (both branches of an ``if``, every method of a class) only ever add
deps, never hide one. Modules with nothing to execute (empty ``__init__.py``) need no dep.
"""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "flows", "validation")


def _file(module: str) -> Path | None:
    p = REPO.joinpath(*module.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


class Module:
    """One parsed module: its top-level definitions and what its names refer to."""

    def __init__(self, name: str):
        self.name, self.path = name, _file(name)
        self.tree = ast.parse(self.path.read_text(encoding="utf-8"))
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                            ast.ClassDef))}
        self.aliases: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attribute or None)
        for node in ast.walk(self.tree):  # names bound by any import in the module (module level or not)
            for local, target in _bound(node):
                self.aliases.setdefault(local, target)

    @property
    def executes(self) -> bool:
        body = [n for n in self.tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        return bool(body)

    def import_time_nodes(self) -> list[ast.AST]:
        """What runs on import: every top-level statement, but of a def only its decorators and defaults,
        and of a class only what is not a method."""
        out: list[ast.AST] = []
        for n in self.tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out += n.decorator_list + n.args.defaults + [d for d in n.args.kw_defaults if d is not None]
            elif isinstance(n, ast.ClassDef):
                out += n.decorator_list + n.bases + [s for s in n.body
                                                     if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
            else:
                out.append(n)
        return out


def _bound(node: ast.AST):
    """(local name, (module, attribute)) for the project names an import statement binds."""
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.split(".")[0] in OURS:
                yield (a.asname or a.name.split(".")[0]), (a.name if a.asname else a.name.split(".")[0], None)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in OURS:
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            yield (a.asname or a.name), ((sub, None) if _file(sub) else (node.module, a.name))


class Reach:
    """Units reachable from an entry point, and the modules they live in."""

    def __init__(self):
        self.mods: dict[str, Module] = {}
        self.seen: set[tuple[str, str | None]] = set()

    def mod(self, name: str) -> Module:
        if name not in self.mods:
            self.mods[name] = Module(name)
        return self.mods[name]

    def add(self, module: str, unit: str | None = None) -> None:
        todo = [(module, unit)]
        while todo:
            m, u = todo.pop()
            if (m, u) in self.seen or _file(m) is None:
                continue
            self.seen.add((m, u))
            parts = m.split(".")
            todo += [(".".join(parts[:i]), None) for i in range(1, len(parts))]  # parent packages run first
            mod = self.mod(m)
            if u is not None:
                todo.append((m, None))
                if u not in mod.defs:  # a constant or a re-exported name: import-time code covers it
                    alias = mod.aliases.get(u)
                    if alias:
                        todo.append(alias)
                    continue
                nodes = [mod.defs[u]]
            else:
                nodes = mod.import_time_nodes()
            for node in nodes:
                if u is None and isinstance(node, (ast.Import, ast.ImportFrom)):
                    # a module-level import runs the imported module; its names count where they are used
                    todo += [(target[0], None) for _, target in _bound(node)]
                    continue
                for sub in ast.walk(node):
                    for _, target in _bound(sub):  # imported inside a function: imported to be used
                        todo.append(target)
                        todo.append((target[0], None))
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                        if sub.id in mod.defs:
                            todo.append((m, sub.id))
                        elif sub.id in mod.aliases:
                            todo.append(mod.aliases[sub.id])
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                        target = mod.aliases.get(sub.value.id)
                        if target and target[1] is None:  # module.attr
                            sub_mod = f"{target[0]}.{sub.attr}"
                            todo.append((sub_mod, None) if _file(sub_mod) else (target[0], sub.attr))

    def files(self) -> set[str]:
        return {str(self.mods[m].path.relative_to(REPO)) for m, _ in self.seen if self.mods[m].executes}


def stages() -> dict[str, dict]:
    out = {}
    for name, st in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        out[name] = st.get("do", st)  # foreach stages: the template
    return out


def code_of(stage: dict) -> set[str]:
    from pipeline.cli import COMMANDS, _find

    argv = shlex.split(stage["cmd"])
    assert argv[0] == "trimpi", f"a stage runs `trimpi <verb>`, not {argv[0]!r}"
    found = _find(argv[1:])
    assert found, f"no trimpi command {' '.join(argv[1:3])!r}"
    module, name = COMMANDS[found[0]][0].split(":")
    reach = Reach()
    for unit in (None, f"configure_{name}", f"run_{name}"):
        reach.add(module, unit)
    return reach.files()


def uncovered(files: set[str], deps: list) -> list[str]:
    deps = [str(d).split()[0].rstrip("/") for d in deps]
    return sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_a_declared_dep(name):
    st = stages()[name]
    missing = uncovered(code_of(st), st.get("deps", []))
    assert not missing, f"dvc.yaml stage {name!r} runs code it does not declare; add to its deps: {missing}"


def test_the_reachability_sees_through_function_level_imports():
    """The cases that made item 1 an issue: RL's reward and sampling, evaluation's masking and renderers."""
    rl, ev = code_of(stages()["rl"]), code_of(stages()["evaluate"])
    assert "pipeline/train/rl_rollout.py" in rl and "pipeline/evaluate/gta_scoring.py" in rl  # task_reward -> GTA
    assert {"pipeline/model/masking.py", "pipeline/policy/clevr.py", "pipeline/policy/gta.py"} <= ev
    assert "pipeline/train/rl.py" not in ev and "pipeline/cli.py" not in rl  # the dispatcher is not a stage's code
    assert uncovered({"pipeline/train/rl_rollout.py"}, ["pipeline/train"]) == []
    assert uncovered({"pipeline/train/rl_rollout.py"}, ["pipeline/train/rl.py"]) == ["pipeline/train/rl_rollout.py"]
