"""The README as a new user reads it (issue 20): its quickstart runs as written (the blocks are read from
README.md, not copied here), needs only the runtime install it names, is at most 40 lines, and the figures and
shapes the README states are the code's.

The quickstart's ``pip install`` line is checked, not run, by default (the extra it names exists and what it
installs is importable); ``FAR_README_VENV=1`` runs it for real in a fresh virtual environment (network to PyPI,
a few minutes). The far commands and the Python block run in a scratch directory, in subprocesses that cannot
import torch, ``training`` or ``export``: the runtime install must be enough.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKED = "import sys\nfor _m in ('torch', 'training', 'export', 'transformers', 'ray'):\n    sys.modules[_m] = None\n"


def quickstart() -> str:
    m = re.search(r"<!-- quickstart: from here.*?-->\n(.*?)<!-- quickstart: end -->", README, re.S)
    assert m, "README.md has no quickstart markers"
    return m.group(1)


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", text, re.S)


def test_the_quickstart_is_at_most_40_lines_and_comes_first():
    assert len(quickstart().strip().splitlines()) <= 40
    assert README.index("## Quickstart") < README.index("## Concepts") < README.index("## Reference")
    assert [lang for lang, _ in blocks(quickstart())] == ["bash", "python"]


def _pip_line() -> list[str]:
    bash = blocks(quickstart())[0][1]
    pip = [shlex.split(line.split("#")[0]) for line in bash.splitlines() if line.startswith("pip install")]
    assert len(pip) == 1
    return pip[0]


def test_the_install_line_names_the_runtime_extra_and_installs_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = _pip_line()[2]
    extras = re.fullmatch(r"\.\[(.*)\]", target).group(1).split(",")
    reqs = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    names = [re.split(r"[<>=\[ ]", r)[0].lower() for r in reqs]
    assert "torch" not in names and "onnxruntime" in names
    modules = {"pillow": "PIL", "jsonschema": "jsonschema"}
    assert all(importlib.util.find_spec(modules.get(n, n)) for n in names), names


def _far_argv(line: str, venv: Path | None) -> list[str]:
    """A ``far ...`` line: the venv's own ``far`` script, or this interpreter with torch, training and export
    blocked."""
    args = shlex.split(line.split(" #")[0])
    assert args[0] == "far"
    return [str(venv / "bin" / "far"), *args[1:]] if venv else [sys.executable, "-c", BLOCKED + _FAR, *args[1:]]


_FAR = "from far_sdk.cli.main import main; sys.exit(main(sys.argv[1:]))"


def _run_quickstart(work: Path, venv: Path | None) -> str:
    (work / "engines").symlink_to(ROOT / "engines")
    env = {**os.environ, "PYTHONPATH": "" if venv else str(ROOT)}
    bash, python = (code for _, code in blocks(quickstart()))
    for line in bash.splitlines():
        if line.startswith("pip install"):
            if venv:
                targets = [a.replace(".", str(ROOT), 1) for a in _pip_line()[2:]]  # '.[x]' is the clone
                subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *targets], check=True, timeout=1800)
            continue
        r = subprocess.run(_far_argv(line, venv), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (line, r.stderr)
    python_exe = str(venv / "bin" / "python") if venv else sys.executable
    code = (BLOCKED if not venv else "") + python + "\nprint(tuple(out.latents.shape))\n"
    r = subprocess.run([python_exe, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _check_quickstart_outputs(work: Path, stdout: str) -> None:
    names = sorted(p.name for p in (work / "out").iterdir())
    per_image = [f"class3_seed{i}.png" for i in range(4)] + [f"class7_seed{i}.png" for i in range(4, 8)]
    assert names == sorted(["grid.png", *per_image])
    with Image.open(work / "out" / "grid.png") as grid, Image.open(work / "three.png") as three:
        assert grid.size == (8 * 32 * 4, 32 * 4) and three.size == (32, 32)
    # the printed line is what the README's comment says it is, and the latents have the shape it states
    python = blocks(quickstart())[1][1]
    claimed = re.search(r"print\(.*\)\s+# (.*)", python).group(1)
    printed, shape = stdout.strip().splitlines()
    assert printed == claimed and shape == "(2, 4, 16, 16)" and "[2, 4, 16, 16]" in python


@pytest.mark.slow
def test_the_quickstart_runs_as_written_on_the_runtime_alone(tmp_path):
    stdout = _run_quickstart(tmp_path, venv=None)
    _check_quickstart_outputs(tmp_path, stdout)
    # "far generate --from-image out/class3_seed0.png makes it again, bit for bit"
    assert "`far generate --from-image out/class3_seed0.png` makes it again, bit for bit" in " ".join(README.split())
    argv = _far_argv("far generate --from-image out/class3_seed0.png --out again.png --no-progress", None)
    r = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "again.png") as a, Image.open(tmp_path / "out" / "class3_seed0.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not os.environ.get("FAR_README_VENV"), reason="FAR_README_VENV=1: a fresh venv from PyPI (network)")
def test_the_quickstart_runs_in_a_fresh_virtual_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    work = tmp_path / "work"
    work.mkdir()
    stdout = _run_quickstart(work, venv=venv)
    _check_quickstart_outputs(work, stdout)
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert r.returncode != 0  # the runtime install brought no torch


# ---- the figures and shapes the README states ----------------------------------------------------------------


def _row(option: str) -> list[str]:
    line = next(li for li in README.splitlines() if li.startswith(f"| `{option}`"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_options_table_states_the_built_in_defaults():
    from far_sdk.options import DEFAULTS

    for option in ("mode", "num_steps", "cfg", "cfg_schedule", "inner_steps", "filter"):
        value = getattr(DEFAULTS, option)
        assert _row(option)[1] == (f'`"{value}"`' if isinstance(value, str) else str(value)), option
    assert _row("temperature")[1] == f'{DEFAULTS.temperature}, `"{DEFAULTS.temperature_schedule}"`'
    assert _row("inner_sampler")[1].startswith(f'`"{DEFAULTS.inner_sampler}"`')
    assert DEFAULTS.x0_clip is False and _row("x0_clip")[1] == "no clipping"


def test_the_readme_s_numbers_are_the_code_s():
    from far_sdk.cli.main import build_parser
    from far_sdk.maths.schedules import temperature_schedule_values
    from far_sdk.options import DEFAULTS, PRESETS, resolve_plan

    text = " ".join(README.split())
    # presets: "paper" 700, "official" 1,000, "fast" 150 inner steps over the 10 default outer steps
    totals = {name: sum(resolve_plan(DEFAULTS, preset_name=name).inner_steps) for name in PRESETS}
    assert totals == {"paper": 700, "official": 1000, "fast": 150, "distilled": 40}
    assert '`"paper"` (700 DDPM steps' in text and '`"official"` (1,000' in text and '`"fast"` (150' in text
    assert '`"distilled"` (40' in text
    # the official temperature ramp 0.80 -> 1.0 at temperature 1 over 10 steps
    ramp = temperature_schedule_values(1.0, 10)
    assert f"{ramp[0]:.2f} -> {ramp[-1]:.1f}" == "0.80 -> 1.0" and "0.80 -> 1.0 at temperature 1" in text
    # far bench --baseline defaults to none
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    assert next(a for a in sub._actions if a.dest == "baseline").default == "none"
    assert "`--baseline` defaults to `none`" in text
    # out.latents: the model's channels (16 for the official KL-16 models, 4 for the demos)
    for name, channels in (("far-demo", 4), ("far-t2i-demo", 4)):
        assert (
            json.loads((ROOT / "engines" / name / "manifest.json").read_text())["model"]["token_channels"] == channels
        )
    assert "16 x 16 x 16 for the official KL-16 models, 4 x 16 x 16 for the demos" in text


def test_the_official_kl16_models_have_16_channel_latents():
    pytest.importorskip("torch")
    from training.config import FAR_CONFIGS
    from training.config_vae import VAE_CONFIGS

    assert VAE_CONFIGS["kl16"].embed_dim == 16
    assert {FAR_CONFIGS[m].token_channels for m in ("far_base", "far_large", "far_huge")} == {16}


def test_every_link_to_a_file_in_the_readme_exists():
    links = re.findall(r"\]\(((?:docs|engines|examples)/[^)#]+)\)", README)
    assert links and [p for p in links if not (ROOT / p).exists()] == []


def test_examples_quickstart_writes_one_png_per_image_and_a_grid(tmp_path):
    run_script = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    script, bundle = ROOT / "examples" / "quickstart.py", ROOT / "engines" / "far-demo"
    r = subprocess.run(
        [sys.executable, "-c", BLOCKED + run_script, str(script), str(bundle), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["class1_seed0.png", "class1_seed1.png", "class7_seed2.png", "class7_seed3.png", "grid.png"]
    assert "latents (4, 4, 16, 16)" in r.stdout
