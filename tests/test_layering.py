"""The repository's layering, checked as a reader would check it (issue 15): ``far_sdk`` imports neither
torch, ``training`` nor ``export`` when its modules load; the only place it reaches into ``training`` is
the torch backend, and it never imports ``export``; no source file is longer than one sitting."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450

CHECK = """
import importlib, pkgutil, sys
import far_sdk
names = [m.name for m in pkgutil.walk_packages(far_sdk.__path__, "far_sdk.")]
for n in names:
    importlib.import_module(n)
leaked = sorted({k.split(".")[0] for k in sys.modules} & {"torch", "training", "export"})
print(len(names), leaked)
"""


def test_importing_every_far_sdk_module_loads_no_torch_training_or_export():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    count, leaked = out.split(" ", 1)
    assert int(count) >= 20 and leaked.strip() == "[]", out


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
    users = {p.relative_to(ROOT).as_posix(): _imports(p) & {"training", "export"} for p in (ROOT / "far_sdk").rglob("*.py")}
    assert {p for p, used in users.items() if "export" in used} == set()
    assert {p for p, used in users.items() if "training" in used} == {"far_sdk/backends/torch/backend.py"}


def test_no_source_file_is_longer_than_one_sitting():
    files = [p for d in ("far_sdk", "training", "export", "scripts", "examples", "tests") for p in (ROOT / d).rglob("*.py")]
    long = {p.relative_to(ROOT).as_posix(): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 50 and long == {}


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
