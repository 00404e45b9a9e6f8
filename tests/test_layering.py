"""The repository's layering, checked as a reader would check it (issues 15 and 19).

far_sdk is built in floors, each importing only from its own floor or below, so its import graph runs one way:

    errors, fileio, images  <-  maths/  <-  options, compat  <-  bundle/  <-  backends/, text, conditioning
        <-  pipeline  <-  bench/, scale/  <-  cli/

``import far_sdk`` loads neither torch, ``training`` nor ``export``; the only place it reaches into ``training`` is
the torch backend, and it never imports ``export``; no file of the project is longer than one sitting.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Lines per source file (far_sdk, training, export, scripts, examples) and per test module.
MAX_LINES, MAX_TEST_LINES = 400, 450

#: far_sdk's floors, lowest first: a module's floor is that of its longest matching prefix.
FLOORS = [
    ("far_sdk.errors", "far_sdk.fileio", "far_sdk.images"),
    ("far_sdk.maths",),
    ("far_sdk.options", "far_sdk.compat"),
    ("far_sdk.bundle",),
    ("far_sdk.backends", "far_sdk.text", "far_sdk.conditioning"),
    ("far_sdk.pipeline",),
    ("far_sdk.bench", "far_sdk.scale"),
    ("far_sdk.cli",),
]

CHECK = """
import importlib, pkgutil, sys
import far_sdk
names = [m.name for m in pkgutil.walk_packages(far_sdk.__path__, "far_sdk.")]
for n in names:
    importlib.import_module(n)
leaked = sorted({k.split(".")[0] for k in sys.modules} & {"torch", "training", "export"})
print(len(names), leaked)
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "far_sdk").rglob("*.py")}


def _far_sdk_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The far_sdk modules ``path`` imports, at any depth (deferred imports count): ``from far_sdk.x import y``
    names module far_sdk.x.y when that is a module, else far_sdk.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("far_sdk")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("far_sdk"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found & set(modules)


def _floor(module: str) -> int:
    best = (-1, -1)  # (prefix length, floor)
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    return best[1]


def test_importing_every_far_sdk_module_loads_no_torch_training_or_export():
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    count, leaked = out.split(" ", 1)
    assert int(count) >= 40 and leaked.strip() == "[]", out


def test_every_far_sdk_module_sits_on_a_floor():
    modules = _modules()
    faces = {m for m in modules if m == "far_sdk" or modules[m].name == "__init__.py"}
    assert {m for m in modules if m not in faces and _floor(m) < 0} == set()


def test_far_sdk_imports_run_one_way_down_the_floors():
    """No module imports a module on a higher floor (package faces, the __init__ files, only hand names on)."""
    modules = _modules()
    upward = []
    for m, path in modules.items():
        if path.name == "__init__.py":
            continue
        for dep in _far_sdk_imports(path, modules):
            if modules[dep].name != "__init__.py" and _floor(dep) > _floor(m):
                upward.append(f"{m} (floor {_floor(m)}) -> {dep} (floor {_floor(dep)})")
    assert upward == []


def test_far_sdk_import_graph_has_no_cycle():
    modules = _modules()
    graph = {
        m: {d for d in _far_sdk_imports(p, modules) if modules[d].name != "__init__.py"}
        for m, p in modules.items()
        if p.name != "__init__.py"
    }
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d) :] + [m, d] if d in stack else [m, d])
                return True
            if state.get(d) is None and visit(d, stack + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), " -> ".join(cycle)


def _imports(path: Path) -> set[str]:
    """Top-level package of every import statement in ``path`` (at any depth: lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_far_sdk_reaches_training_only_from_the_torch_backend_and_never_imports_export():
    users = {
        p.relative_to(ROOT).as_posix(): _imports(p) & {"training", "export"} for p in (ROOT / "far_sdk").rglob("*.py")
    }
    assert {p for p, used in users.items() if "export" in used} == set()
    assert {p for p, used in users.items() if "training" in used} == {"far_sdk/backends/torch/backend.py"}


def test_training_never_imports_export_and_no_private_name_crosses_a_module():
    """training sits below export; a leading-underscore name is its module's own (issue 19)."""
    crossing = []
    for d in ("far_sdk", "training", "export"):
        for p in (ROOT / d).rglob("*.py"):
            tree = ast.parse(p.read_text(), str(p))
            if d == "training":
                assert "export" not in _imports(p), p
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and node.module.split(".")[0] in ("far_sdk", "training", "export")
                    or isinstance(node, ast.ImportFrom)
                    and node.level
                ):
                    crossing += [
                        f"{p.relative_to(ROOT)}: {a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert crossing == []


def test_no_file_is_longer_than_one_sitting():
    files = [
        p for d in ("far_sdk", "training", "export", "scripts", "examples", "tests") for p in (ROOT / d).rglob("*.py")
    ]
    long = {}
    for p in files:
        limit = MAX_TEST_LINES if p.relative_to(ROOT).parts[0] == "tests" else MAX_LINES
        if (n := len(p.read_text().splitlines())) > limit:
            long[p.relative_to(ROOT).as_posix()] = n
    assert len(files) > 80 and long == {}


def test_backend_options_list_is_exactly_what_the_backends_take():
    """far_sdk.backends.base.BACKEND_OPTIONS (what backend="auto" may pass on) against the constructors' own
    keyword parameters, read from their signatures: a new option cannot be forgotten in the list."""
    import importlib.util
    import inspect

    from far_sdk.backends.base import BACKEND_OPTIONS
    from far_sdk.backends.onnxruntime import OnnxRuntimeBackend
    from far_sdk.backends.tensorrt.backend import TensorRTBackend
    from far_sdk.backends.torch.backend import TorchBackend

    classes = [OnnxRuntimeBackend, TensorRTBackend, TorchBackend]
    if importlib.util.find_spec("torch") is not None:
        from training.eager import OfficialEagerBackend

        classes.append(OfficialEagerBackend)
    taken = set()
    for cls in classes:
        params = inspect.signature(cls.__init__).parameters.values()
        taken |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert taken == set(BACKEND_OPTIONS)
