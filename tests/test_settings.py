"""Shared options declared once (the runtime group), renamed keys still accepted with a
warning, and each quantization method's own typed settings."""

import pytest

from compress.config import RuntimeConfig
from compress.errors import UserError


def stage_configs():
    from compress.bench import BenchConfig
    from compress.distill import DistillConfig
    from compress.eval import EvalConfig
    from compress.export import ExportConfig
    from compress.quantize import QuantizeConfig
    from compress.train import TrainConfig

    return [TrainConfig, DistillConfig, EvalConfig, ExportConfig, QuantizeConfig, BenchConfig]


def test_every_stage_composes_the_one_runtime_group():
    for cls in stage_configs():
        assert issubclass(cls, RuntimeConfig), cls.__name__
        for name, field in RuntimeConfig.model_fields.items():
            # Same type, default and description: declared in RuntimeConfig, not again in the stage.
            mine = cls.model_fields[name]
            assert (mine.annotation, mine.default, mine.description) == \
                (field.annotation, field.default, field.description), (cls.__name__, name)


def test_eval_and_quantize_batch_size_is_a_deprecated_name(capsys):
    from compress.cli import main
    from compress.eval import EvalConfig
    from compress.quantize import QuantizeConfig

    with pytest.warns(FutureWarning, match="'batch_size'.*deprecated.*'eval_batch_size'"):
        assert EvalConfig(model="m", batch_size=16).eval_batch_size == 16
    with pytest.warns(FutureWarning):
        assert QuantizeConfig(model="m", out="o", method="bf16", batch_size=8).eval_batch_size == 8
    with pytest.raises(ValueError, match="give only 'eval_batch_size'"):
        EvalConfig(model="m", batch_size=16, eval_batch_size=8)
    # The old flag still parses (a missing model then fails as bad input, not as an unknown flag).
    with pytest.warns(FutureWarning):
        assert main(["eval", "--model", "/nonexistent", "--batch-size", "16"]) == 2
    assert "unrecognized arguments" not in capsys.readouterr().err


def test_a_setting_the_method_does_not_take_names_the_method_and_what_it_takes():
    from compress.quantize import QuantizeConfig

    with pytest.raises(UserError, match=r"--method ort-dynamic-int8 does not take calib_method; it takes "
                                        r"block_size, quantize_embeddings, embedding_bits, per_channel, weight_type, "
                                        r"optimize"):
        QuantizeConfig.parse({"model": "m", "out": "o", "method": "ort-dynamic-int8", "calib_method": "entropy"})
    with pytest.raises(UserError, match="--method bf16 does not take per_channel; it takes no settings"):
        QuantizeConfig.parse({"model": "m", "out": "o", "method": "bf16", "per_channel": False})
    # auto takes a setting when one of the methods it tries does.
    QuantizeConfig.parse({"model": "m", "out": "o", "method": "auto", "calib_samples": 32})


def test_each_method_gets_its_own_typed_settings():
    from compress.quantize import METHODS, QuantizeConfig, method_settings

    cfg = QuantizeConfig(model="m", out="o", method="ort-static-int8", calib_method="entropy", per_channel=False)
    s = method_settings(cfg, METHODS["ort-static-int8"])
    assert (s.calib_method, s.calib_samples, s.per_channel, s.weight_type) == ("entropy", 128, False, "auto")
    assert method_settings(QuantizeConfig(model="m", out="o", method="bf16"), METHODS["bf16"]).model_dump() == {}
    # Under auto a setting reaches only the methods that take it.
    auto = QuantizeConfig(model="m", out="o", method="auto", calib_samples=32)
    assert method_settings(auto, METHODS["ort-static-int8"]).calib_samples == 32
    assert "calib_samples" not in method_settings(auto, METHODS["ort-dynamic-int8"]).model_dump()
    with pytest.raises(UserError, match="calib_samples"):
        QuantizeConfig.parse({"model": "m", "out": "o", "method": "ort-static-int8", "calib_samples": 0})


def test_auto_order_is_each_methods_own_attribute():
    from compress.quantize import auto_candidates

    assert [m.name for m in auto_candidates()] == ["ort-dynamic-int8", "ort-static-int8", "torch-dynamic-int8",
                                                   "bf16", "fp16"]
