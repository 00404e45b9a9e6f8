"""The commands speak in their own words (issue 20): every flag of far, far-export and far-train has help and shows
its default; errors name flags, not Python keywords, with one wording per rule; "did you mean" for flags, choices,
presets, class names and bundle paths; ``--version``; the bundle as an argument or ``--bundle``; ``far info`` in
sections; a random-init small model without ``--vae-config`` is refused with the decoder's size."""

from __future__ import annotations

import argparse
import re

import pytest
from hostile import DEMO, run_cli

from far_sdk.errors import EXIT_OK, EXIT_USAGE

T2I = DEMO.parent / "far-t2i-demo"


def _parsers():
    from export.cli import build_parser as far_export
    from far_sdk.cli.main import build_parser as far
    from training.cli import build_parser as far_train

    return [far(), far_export(), far_train()]


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def test_every_flag_of_the_three_commands_has_help_and_shows_its_default():
    pytest.importorskip("torch")  # far-export / far-train read their presets from training
    seen, missing, no_default = 0, [], []
    for top in _parsers():
        for p in _walk(top):
            p.format_help()  # --help renders
            formatter = p._get_formatter()
            for a in p._actions:
                if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                    continue
                seen += 1
                name = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
                if not a.help or a.help == argparse.SUPPRESS:
                    missing.append(name)
                meaningful = a.default not in (None, False, [], argparse.SUPPRESS) or a.default == 0
                if meaningful and a.default is not False and "default" not in formatter._get_help_string(a):
                    no_default.append(f"{name} = {a.default!r}")
    assert seen > 150 and missing == [] and no_default == []


def test_defaults_appear_in_help_as_values(capsys):
    from far_sdk.cli.main import main

    assert run_cli(main, ["generate", "--help"])[0] == EXIT_OK
    help_text = run_cli(main, ["generate", "--help"])[1]
    assert "images per --class or --prompt (diffusers' num_images_per_prompt) (default: 1)" in " ".join(
        help_text.split()
    )
    bench = " ".join(run_cli(main, ["bench", "--help"])[1].split())
    assert "--baseline {none,eager-torch}" in bench and "none (the default)" in bench
    assert "timed runs per backend and batch (default: 10)" in bench


def test_version_of_each_command():
    import far_sdk
    from far_sdk.cli.main import main

    rc, out, _ = run_cli(main, ["--version"])
    assert rc == EXIT_OK and out.strip().startswith(f"far-sdk {far_sdk.__version__}")


@pytest.mark.parametrize(
    "argv, message",
    [
        # errors raised deep in far_sdk, named by the flags of far generate
        (["--class", "3", "--eta", "0.5"], "--eta 0.5 applies only to --inner-sampler ddim"),
        (["--class", "3", "--mode", "mask", "--steps", "4"], "--mode mask runs the official 11 outer steps"),
        (
            ["--class", "3", "--mode", "mask", "--steps", "4"],
            "for --steps 4 give the levels themselves, e.g. --levels 0,4,8,12",
        ),
        (["--prompt", "a three"], "is class-conditional: give --class (class ids or names), not --prompt"),
        (["--class", "3", "--steps", "3", "--levels", "0,4"], "--steps 3 disagrees with the 2 levels given"),
        # one wording per rule: out of range below and above
        (["--class", "3", "--steps", "0"], "--steps must be an integer in 1..16, got 0"),
        (["--class", "3", "--steps", "17"], "--steps must be an integer in 1..16, got 17"),
        # did you mean: flags, choices, presets
        (
            ["--class", "3", "--inner-sampeler", "ddim"],
            "unknown flag --inner-sampeler (did you mean '--inner-sampler'?)",
        ),
        (["--class", "3", "--preset", "fats"], "one of 'distilled', 'fast', 'official', 'paper', got 'fats' (did"),
        (["--class", "3", "--filter", "fourir"], "got 'fourir' (did you mean 'fourier'?)"),
        (["--class", "3", "--bundle", str(DEMO.parent / "far-dmeo")], "two bundles given"),
    ],
)
def test_far_generate_errors_name_flags(argv, message, tmp_path):
    from far_sdk.cli.main import main

    rc, _, err = run_cli(main, ["generate", str(DEMO), "--no-progress", "--out", str(tmp_path / "x.png"), *argv])
    assert rc == EXIT_USAGE and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_python_callers_read_python_names():
    from far_sdk import Generator
    from far_sdk.errors import InvalidArgumentError

    with Generator(DEMO, backend="onnxruntime") as gen:
        with pytest.raises(InvalidArgumentError, match=r"eta=0\.5 applies only to inner_sampler='ddim'"):
            gen.plan(eta=0.5)
        with pytest.raises(InvalidArgumentError, match=r"give class_labels \(class ids or names\), not prompt \("):
            gen.generate(prompt="a three")


def test_text_bundle_given_classes_says_to_use_prompt(tmp_path):
    from far_sdk.cli.main import main

    rc, _, err = run_cli(main, ["generate", str(T2I), "--class", "3", "--out", str(tmp_path / "x.png")])
    assert rc == EXIT_USAGE and "text-conditioned (FAR-T2I): give --prompt" in err and "not --class" in err


def test_a_misspelt_bundle_path_names_the_close_one_and_the_bundle_goes_either_way(tmp_path):
    from far_sdk.cli.main import main

    rc, _, err = run_cli(main, ["info", str(DEMO.parent / "far-dmeo")])
    assert rc == 3 and f"does not exist (did you mean {DEMO}?)" in err
    rc, _, err = run_cli(main, ["info"])
    assert rc == EXIT_USAGE and "give a bundle: the first argument" in err
    by_arg, by_flag = run_cli(main, ["info", str(DEMO), "--no-verify"]), run_cli(main, ["info", "--bundle", str(DEMO)])
    assert by_arg[0] == by_flag[0] == EXIT_OK
    assert by_arg[1].splitlines()[3:] == by_flag[1].splitlines()[3:]  # the same bundle (first lines: verification)


def test_far_info_prints_sections_with_the_model_s_own_latent_shape():
    import json

    from far_sdk.cli.main import main

    rc, out, _ = run_cli(main, ["info", str(DEMO)])
    m = json.loads((DEMO / "manifest.json").read_text())
    sections = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert rc == EXIT_OK and sections[1:] == ["Model", *_SECTIONS]
    ch, g = m["model"]["token_channels"], m["model"]["grid_size"]
    assert f"out.latents: [B, {ch}, {g}, {g}]" in out and ch == 4  # the demo's are 4-channel, not kl16's 16
    assert re.search(r"--x0-clip\s+4\.0\n", out) and re.search(r"--temperature-schedule\s+official\s+\(built-in\)", out)
    assert "{" not in out  # no Python dicts
    rc, out, _ = run_cli(main, ["info", str(DEMO), "--json"])
    assert json.loads(out) == m


_SECTIONS = ["Sampling defaults (far generate flags; the bundle's unless marked built-in)", "Source", "Graphs",
             "Few-step denoiser", "Files", "TensorRT"]  # fmt: skip


def test_random_init_small_model_without_vae_config_is_refused_with_the_decoder_size(tmp_path):
    pytest.importorskip("torch")
    from export.cli import main

    out = tmp_path / "tiny"
    rc, _, err = run_cli(main, ["onnx", "--random-init", "--model", "far_tiny", "--out", str(out)])
    assert rc == EXIT_USAGE and not out.exists()
    # the official KL-16 decoder: 38,189,203 parameters (post_quant_conv + decoder), 152.8 MB in float32
    assert "38.2 M random parameters, a 152.8 MB vae_decoder.onnx" in err and "--vae-config kl16-tiny" in err


def test_a_misspelt_class_name_names_the_closest_one():
    from types import SimpleNamespace

    from far_sdk.conditioning import class_ids
    from far_sdk.errors import InvalidArgumentError

    bundle = SimpleNamespace(id2label={207: "golden retriever", 208: "Labrador retriever"}, num_classes=1000)
    assert class_ids(bundle, ["Golden Retriever", "207", 208]) == (207, 207, 208)
    with pytest.raises(
        InvalidArgumentError, match="unknown class name 'golden retreiver'; did you mean 'golden retriever'"
    ):
        class_ids(bundle, ["golden retreiver"])
