"""Stage configs: one definition serves the CLI, recipes and the API."""

import argparse

import pytest

from compress.config import add_arguments, from_args, to_argv
from compress.errors import UserError
from compress.train import TrainConfig


def roundtrip(cfg):
    parser = argparse.ArgumentParser()
    add_arguments(parser, type(cfg))
    return from_args(type(cfg), parser.parse_args(to_argv(cfg)))


def test_flags_reproduce_the_config():
    cfg = TrainConfig(model="minilm-l6", out="o", epochs=2, lr=3e-5, precision="fp32", progress=False,
                      resume=True, text_pair_column="b")
    assert roundtrip(cfg) == cfg
    cfg = cfg.model_copy(update={"force": True})
    assert roundtrip(cfg).force is True


def test_errors_name_key_and_allowed_values():
    with pytest.raises(UserError, match=r"key 'schedule' = 'wavy'.*allowed values: linear, cosine, constant"):
        TrainConfig.parse({"model": "m", "out": "o", "schedule": "wavy"})
    with pytest.raises(UserError, match=r"unknown key 'epocs' \(allowed keys: .*epochs"):
        TrainConfig.parse({"model": "m", "out": "o", "epocs": 3})


@pytest.mark.parametrize("command", ["train", "distill", "eval", "export", "quantize", "bench", "report", "run",
                                     "validate"])
def test_every_command_prints_its_help(command, capsys):
    from compress.cli import COMMANDS, main

    assert command in COMMANDS
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: compress {command}") and "[default:" in out
