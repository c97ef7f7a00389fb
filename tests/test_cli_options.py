"""Every command's options against the library they feed: a choice list is the library's constant, a default shown
by --help is the library's default. A new option with choices or a default must be tied here (or say why not)."""
from __future__ import annotations

import dataclasses
import inspect
import re

import click
import pytest
from click.testing import CliRunner

import model
from cli import main
from model.checkpoint import CHECKPOINT_CHOICES
from model.config import SCHEDULES, TrainConfig
from model.export import EXPORT_FORMATS
from model.features import FEATURE_LAYERS, extract_features, video_sources
from model.predict import Prediction, load_run, predict_videos
from model.counting import model_summary
from model.clips import CROP_CHOICES
from model.evaluate import evaluate_run
from model.networks import WEIGHT_INITS
from model.runtime import PRECISIONS
from pipeline.build_rgbf import STORAGE, BuildConfig, build_rgbf
from pipeline.datasets import DATASET_KINDS, index_dataset
from pipeline.decode import DecodeConfig
from pipeline.demo_data import MAX_FRAMES, MOTIONS, NUM_SPLITS, DemoDataError, make_demo_dataset, plan_videos
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.flow import BACKENDS, TORCH_SOLVERS, TVL1_BACKENDS
from pipeline.inspect import render_strip
from pipeline.rgbf import MODALITIES
from pipeline.tvl1_params import TVL1Params

# (command, parameter) -> the library constant its click.Choice mirrors.
LIBRARY_CHOICES = {
    ("extract-flow", "kind"): DATASET_KINDS,
    ("extract-flow", "backend"): BACKENDS,
    ("extract-flow", "solver"): TORCH_SOLVERS,
    ("extract-flow", "storage"): tuple(STORAGE),
    ("build-rgbf", "storage"): tuple(STORAGE),
    ("train", "modality"): MODALITIES,
    ("train", "schedule"): tuple(SCHEDULES),
    ("train", "weight_init"): WEIGHT_INITS,
    ("train", "precision"): PRECISIONS,
    ("evaluate", "crops"): tuple(str(n) for n in CROP_CHOICES),
    ("predict", "crops"): tuple(str(n) for n in CROP_CHOICES),
    ("predict", "choice"): CHECKPOINT_CHOICES,
    ("predict", "flow_backend"): TVL1_BACKENDS,
    ("features", "choice"): CHECKPOINT_CHOICES,
    ("features", "flow_backend"): TVL1_BACKENDS,
    ("features", "layer"): tuple(FEATURE_LAYERS),
    ("export", "fmt"): EXPORT_FORMATS,
    ("export", "choice"): CHECKPOINT_CHOICES,
}
# Choices with no library constant to mirror, checked against what the library accepts instead.
ACCEPTED_CHOICES = {
    ("train", "device"): lambda value: TrainConfig(shard_dir="s", out_dir="o", model="c3d-b5", device=value),
    ("evaluate", "feature_layer"): lambda value: model.build_model("c3d-b5", num_classes=2).get_submodule(value),
}

# command -> (the library callables whose parameters its options fill, option -> library parameter names).
LIBRARY_DEFAULTS = {
    "models": ([model_summary], {}),
    "extract-flow": ([DecodeConfig, ExtractConfig, TVL1Params, index_dataset, extract_flow, BuildConfig],
                     {"size": ("height", "width"), "timeout": ("timeout_s",)}),
    "build-rgbf": ([BuildConfig, build_rgbf], {}),
    "inspect": ([render_strip], {"frames": ("n",)}),
    "make-demo-data": ([make_demo_dataset], {"size": ("height", "width")}),
    "train": ([TrainConfig], {"modality": ("input",), "clip": ("clip_len", "crop", "crop")}),
    "evaluate": ([evaluate_run], {}),
    "predict": ([predict_videos, load_run, Prediction.top], {"flow_backend": ("flow_backend_name",), "top_k": ("k",)}),
    "features": ([extract_features, video_sources, load_run], {"flow_backend": ("flow_backend_name",)}),
    "export": ([load_run], {}),
}
# Defaults the CLI has and the library does not (the library takes them as required arguments).
CLI_ONLY_DEFAULTS = {
    ("extract-flow", "kind"): "index_dataset takes the kind as a required argument",
    ("evaluate", "splits"): "evaluate_run takes the splits as a required argument",
}
# --device auto is resolved by the CLI (model.runtime.resolve_device); the library takes the resolved device.
RESOLVED_BY_CLI = {("predict", "device"), ("features", "device")}


def _commands() -> dict[str, click.Command]:
    return dict(main.commands)


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


def _library_default(targets: list, names: tuple[str, ...]):
    """The defaults of ``names`` in the first target whose signature has them all, else None."""
    for target in targets:
        params = inspect.signature(target).parameters
        if all(name in params and params[name].default is not inspect.Parameter.empty for name in names):
            values = tuple(params[name].default for name in names)
            return values[0] if len(values) == 1 else values
    return None


def _cli_default(command: click.Command, option: click.Option):
    """The default as the command receives it (type conversion and callback applied)."""
    ctx = click.Context(command)
    value = option.type_cast_value(ctx, option.get_default(ctx))
    return option.callback(ctx, option, value) if option.callback else value


def test_every_command_is_walked() -> None:
    assert set(_commands()) == set(LIBRARY_DEFAULTS), "tie the new command's options to the library here"


@pytest.mark.parametrize("name", sorted(LIBRARY_DEFAULTS))
def test_choice_lists_are_the_library_constants(name: str) -> None:
    command = _commands()[name]
    for option in _options(command):
        if not isinstance(option.type, click.Choice):
            continue
        key = (name, option.name)
        if key in ACCEPTED_CHOICES:
            for value in option.type.choices:
                ACCEPTED_CHOICES[key](value)  # raises if the library refuses it
        else:
            assert key in LIBRARY_CHOICES, f"{name} --{option.name}: which library constant does it mirror?"
            assert tuple(option.type.choices) == tuple(LIBRARY_CHOICES[key]), key
        if option.show_default:
            assert _cli_default(command, option) in option.type.choices, key


@pytest.mark.parametrize("name", sorted(LIBRARY_DEFAULTS))
def test_defaults_are_the_library_defaults(name: str) -> None:
    command = _commands()[name]
    targets, renames = LIBRARY_DEFAULTS[name]
    for option in _options(command):
        if option.is_flag or not option.show_default:  # the defaults --help shows
            continue
        key = (name, option.name)
        if key in RESOLVED_BY_CLI:
            assert _cli_default(command, option) == "auto", key
            continue
        if key in CLI_ONLY_DEFAULTS:
            assert _library_default(targets, renames.get(option.name, (option.name,))) is None, key
            continue
        expected = _library_default(targets, renames.get(option.name, (option.name,)))
        assert expected is not None, f"{name} --{option.name}: no library default to compare with"
        value = _cli_default(command, option)
        if isinstance(value, str) and not isinstance(expected, str):
            value = tuple(value.split(",")) if isinstance(expected, tuple) else type(expected)(value)
        assert value == expected, (key, value, expected)


def test_help_text_defaults_are_the_library_defaults() -> None:
    """Options whose default is "not given" (a --schedule preset may fill them) state TrainConfig's in words."""
    train = _commands()["train"]
    helps = {option.name: option.help or "" for option in _options(train)}
    for name in ("batch_size", "workers", "weight_init"):
        assert f"[default: {getattr(TrainConfig, name)}" in helps[name], name
    assert f"[default: {TrainConfig.dropout:g}" in helps["dropout"]
    for init in WEIGHT_INITS:
        assert f"{init}:" in helps["weight_init"], init
    for schedule, preset in SCHEDULES.items():
        assert f"{schedule}: lr {preset.get('lr', TrainConfig.lr):g} " in helps["schedule"]
        assert f"{preset.get('epochs', TrainConfig.epochs)} epochs" in helps["schedule"].split(f"{schedule}:")[1]


def test_demo_data_ranges_are_the_generator_limits() -> None:
    ranges = {option.name: option.type for option in _options(_commands()["make-demo-data"])}
    assert (ranges["classes"].min, ranges["classes"].max) == (2, len(MOTIONS))
    assert (ranges["groups"].min, ranges["groups"].max) == (NUM_SPLITS, 99)
    assert ranges["frames"].max == MAX_FRAMES
    plan_videos(len(MOTIONS), NUM_SPLITS, NUM_SPLITS)  # the ends of the ranges are accepted, one past them not
    with pytest.raises(DemoDataError):
        plan_videos(len(MOTIONS) + 1, NUM_SPLITS, NUM_SPLITS)
    with pytest.raises(DemoDataError):
        plan_videos(2, NUM_SPLITS, NUM_SPLITS - 1)


def test_every_tvl1_parameter_is_an_option() -> None:
    """extract-flow exposes each TV-L1 parameter under its OpenCV name (the initial flow is not a user setting)."""
    names = {option.name for option in _options(_commands()["extract-flow"])}
    fields = {field.name for field in dataclasses.fields(TVL1Params)} - {"useInitialFlow"}
    assert fields <= names


def test_tvl1_ranges_are_the_library_bounds_and_help_shows_them() -> None:
    """Each bounded TV-L1 option carries the library's range (so --help states it and click refuses outside it), and
    every value just outside a bound is refused by the library too (--gamma -1 was accepted)."""
    from pipeline.tvl1_params import BOUNDS

    command = _commands()["extract-flow"]
    ranges = {option.name: option.type for option in _options(command)}
    for name, bound in BOUNDS.items():
        kind = ranges[name]
        assert (kind.min, kind.max, kind.min_open, kind.max_open) == (bound.min, bound.max, bound.min_open,
                                                                    bound.max_open), name
        delta = 1 if isinstance(getattr(TVL1Params(), name), int) else 1e-6
        for end, open_, step in ((bound.min, bound.min_open, -1), (bound.max, bound.max_open, 1)):
            if end is None:
                continue
            outside = end if open_ else end + step * delta
            with pytest.raises(ValueError, match=name.rstrip("_")):
                TVL1Params(**{name: outside})
    help_text = " ".join(CliRunner().invoke(main, ["extract-flow", "--help"]).output.split())
    assert "None" not in help_text
    for flag in ("--tau", "--lambda", "--theta", "--epsilon", "--scale-step", "--gamma"):
        assert re.search(rf"{flag} FINITE FLOAT [^[]*\[default: [^]]*; (x>=?0|0<x<1)\]", help_text), flag


def test_a_negative_gamma_is_refused_before_anything_is_created(tmp_path) -> None:
    (tmp_path / "root").mkdir()
    result = CliRunner().invoke(main, ["extract-flow", str(tmp_path / "root"), str(tmp_path / "out"), "--gamma", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--gamma': -1.0 is not in the range x>=0" in result.output
    assert not (tmp_path / "out").exists()
