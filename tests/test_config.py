"""The one config system: recursive loading, unknown keys, Literal choices, overrides, YAML round trips, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from multiway.config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    from_dict,
    load_config,
    load_yaml,
    parse_args,
    to_dict,
    to_yaml,
)


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    mode: Literal["cosine", "linear"] = "cosine"  # the schedule


@dataclass
class Middle:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    middle: Middle = field(default_factory=lambda: Middle(name="default"))
    steps: int = 10
    clip: float | None = 3.0
    batch: dict[str, int] = field(default_factory=lambda: {"text": 4})
    source: str | list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def test_nested_build_and_coercion():
    cfg = from_dict(Outer, {"middle": {"name": "x", "inner": {"lr": "2e-4", "betas": [0.9, "0.999"]}},
                            "steps": 20.0, "clip": None, "batch": {"text": "8"}, "source": ["a", "b"]})
    assert cfg.middle.inner.lr == 2e-4 and cfg.middle.inner.betas == (0.9, 0.999)
    assert cfg.steps == 20 and isinstance(cfg.steps, int) and cfg.clip is None and cfg.batch == {"text": 8}
    assert cfg.source == ["a", "b"] and from_dict(Outer, {"source": "a"}).source == "a"
    # a partial section keeps its default's other values (Middle.name has no class default)
    assert from_dict(Outer, {"middle": {"tags": ["t"]}}).middle == Middle(name="default", tags=["t"])


@pytest.mark.parametrize("data, path, valid", [
    ({"stepz": 1}, "stepz", "valid keys of Outer: ['batch', 'clip', 'extra', 'middle', 'source', 'steps']"),
    ({"middle": {"nmae": "x"}}, "middle.nmae", "valid keys of middle: ['inner', 'name', 'tags']"),
    ({"middle": {"inner": {"lrr": 1}}}, "middle.inner.lrr", "valid keys of middle.inner: ['betas', 'lr', 'mode']"),
])
def test_unknown_keys_at_every_level_name_the_path_and_the_valid_keys(data, path, valid):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert f"unknown key '{path}'" in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("data, message", [
    ({"steps": "ten"}, "steps: expected int, got 'ten'"),
    ({"steps": 1.5}, "steps: expected int, got 1.5"),
    ({"middle": {"inner": {"betas": [0.9]}}}, "middle.inner.betas: expected 2 values"),
    ({"middle": {"inner": {"lr": [1]}}}, "middle.inner.lr: expected float"),
    ({"middle": "x"}, "middle: expected a mapping of Middle keys"),
    ({"batch": {"text": "many"}}, "batch.text: expected int"),
    ({"middle": {"inner": {"mode": "step"}}}, "middle.inner.mode='step' is not supported; accepted values: 'cosine', 'linear'"),
])
def test_wrong_types_and_choices_name_the_field_the_expectation_and_the_value(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_dict(Outer, data)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key \['name'\] of Middle"):
        from_dict(Middle, {})


def test_overrides_nested_and_yaml_valued():
    cfg = apply_overrides(Outer(), ["middle.inner.lr=2e-3", "middle.inner.betas=[0.9, 0.999]", "clip=null",
                                    "middle.name=run", "batch.pair=2", "extra.note=hello world"])
    assert cfg.middle.inner.lr == 2e-3 and isinstance(cfg.middle.inner.lr, float)
    assert cfg.middle.inner.betas == (0.9, 0.999) and cfg.clip is None and cfg.middle.name == "run"
    assert cfg.batch == {"text": 4, "pair": 2} and cfg.extra == {"note": "hello world"}
    with pytest.raises(ConfigError, match=r"unknown key 'middle.inner.lrr'; valid keys of middle.inner"):
        apply_overrides(Outer(), ["middle.inner.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(Outer(), ["middle.inner.lr"])
    with pytest.raises(ConfigError, match="steps is a value"):
        apply_overrides(Outer(), ["steps.x=1"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "d=[1, 2]"]) == {"a": {"b": 1, "c": 2}, "d": [1, 2]}


def test_yaml_floats_and_round_trip(tmp_path):
    assert load_yaml("lr: 2e-3\nn: 5E+2")["lr"] == 2e-3 and isinstance(load_yaml("n: 5E+2")["n"], float)
    cfg = apply_overrides(Outer(), ["middle.inner.lr=1e-6", "source=[x]"])
    text = to_yaml(cfg)
    assert "(" not in text  # tuples are written as YAML lists
    assert from_dict(Outer, load_yaml(text)) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(Outer, path, ["steps=3"]) == dataclasses.replace(cfg, steps=3)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Outer, path)


def _runner_configs() -> list[Any]:
    """One instance of every runner's config dataclass (the defaults and a changed copy)."""
    from multiway.meter.config import tiny_config
    from multiway.model.config import get_config
    from multiway.tokenizers.vqkd import VQKD_PRESETS
    from multiway.tokenizers.vqkd_training import VQKDTrainConfig
    from multiway.train.config import TrainConfig
    from multiway.train.pretrain import PretrainConfig

    return [
        get_config("beit3_tiny_patch8_32"), get_config("beit3_base_patch16_224", position_init_std=None),
        TrainConfig(out_dir="runs/x", max_steps=5, betas=(0.9, 0.999), grad_clip=None), PretrainConfig(),
        tiny_config("vit"), *VQKD_PRESETS.values(), VQKDTrainConfig(out="tok.safetensors", model={"n_code": 32}),
    ]


@pytest.mark.parametrize("cfg", _runner_configs(), ids=lambda c: type(c).__name__)
def test_every_runner_config_round_trips_through_yaml(cfg):
    assert from_dict(type(cfg), load_yaml(to_yaml(cfg))) == cfg
    assert to_dict(from_dict(type(cfg), to_dict(cfg))) == to_dict(cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiway")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run")
    p.add_argument("task")
    p.add_argument("--flag", action="store_true")
    add_config_arguments(p)
    sub.add_parser("plain")
    return parser


def test_cli_overrides_anywhere_and_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nmiddle:\n  name: file\n")
    args = parse_args(_parser(), ["run", "vqa", "--config", str(path), "middle.inner.lr=2e-4", "--flag", "clip=1"])
    assert args.task == "vqa" and args.flag
    cfg = config_from_args(Outer, args, updates={"batch": {"text": 16}})
    assert (cfg.steps, cfg.middle.name, cfg.middle.inner.lr, cfg.clip, cfg.batch) == (7, "file", 2e-4, 1.0, {"text": 16})
    args = parse_args(_parser(), ["run", "vqa", "middle.inner.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'middle.inner.lrr'; valid keys of middle.inner: \['betas', 'lr', 'mode'\]"):
        config_from_args(Outer, args)
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["plain", "a=1"])  # a command without config arguments refuses overrides
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_print_config_prints_the_resolved_yaml_and_exits_0(capsys):
    args = parse_args(_parser(), ["run", "t", "steps=3", "--print-config", "middle.inner.mode=linear"])
    with pytest.raises(SystemExit) as e:
        config_from_args(Outer, args)
    assert e.value.code == 0
    printed = from_dict(Outer, load_yaml(capsys.readouterr().out))
    assert printed == apply_overrides(Outer(), ["steps=3", "middle.inner.mode=linear"])


COMMANDS = {
    "pretrain": ["pretrain", "--config", "configs/pretrain_tiny.yaml"],
    "convert": ["convert", "official.pth", "out.safetensors", "--model", "beit3_tiny_patch8_32_retrieval"],
    "train-visual": ["tokenizer", "train-visual", "images", "--out", "tok.safetensors"],
    "tokenizer-train": ["tokenizer", "train", "--corpus", "corpus.txt", "--out", "spm"],
    "synth": ["data", "synth", "--out", "data"],
    "study": ["study", "meter", "--config", "configs/meter_study_tiny.yaml"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_print_their_config_and_refuse_unknown_keys(name, capsys):
    from multiway.cli import main

    with pytest.raises(SystemExit) as e:
        main([*COMMANDS[name], "--print-config"])
    assert e.value.code == 0
    assert isinstance(load_yaml(capsys.readouterr().out), dict)
    assert main([*COMMANDS[name], "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'no_such_key'" in err and "valid keys of" in err
