"""Recipes: validation errors name file, line, key and allowed values; finished stages are
skipped; a changed key re-runs that stage and the ones after it; every shipped recipe
validates and dry-runs."""

import json
from pathlib import Path

import pytest

from compress.cli import main
from compress.errors import UserError
from compress.recipe import RunConfig, load_recipe, plan, run

from conftest import TINY_SPEC

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


TINY = f"""
output_dir: OUT
seed: 0
stages:
  teacher:
    type: train
    model: "{TINY_SPEC}"
    max_examples: 200
    epochs: 1
    batch_size: 32
    lr: 0.002
    precision: fp32
    progress: false
  score:
    type: eval
    model: ${{teacher}}
    max_examples: 200
"""


def test_every_shipped_recipe_validates_and_dry_runs(capsys):
    assert RECIPES, "recipes/ must ship recipes"
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.stages, path
        run(RunConfig(recipe=str(path), dry_run=True))
        out = capsys.readouterr().out
        for stage in recipe.stages:
            assert stage.name in out


def test_unknown_key_names_line_and_allowed_keys(tmp_path):
    p = write(tmp_path, "stages:\n  t:\n    type: train\n    model: x\n    epocs: 3\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:5" in msg and "stages.t.epocs" in msg and "epochs" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    p = write(tmp_path, "stages:\n  t:\n    type: train\n    model: x\n    schedule: wavy\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert f"{p}:5" in str(e.value) and "linear, cosine, constant" in str(e.value)


def test_wrong_type_and_unknown_stage_type(tmp_path):
    p = write(tmp_path, "stages:\n  t:\n    type: train\n    model: x\n    epochs: many\n")
    with pytest.raises(UserError, match="epochs"):
        load_recipe(p)
    p = write(tmp_path, "stages:\n  t:\n    type: prune\n")
    with pytest.raises(UserError, match=r"r.yaml:3.*allowed types: train, distill"):
        load_recipe(p)


def test_reference_to_later_or_missing_stage(tmp_path):
    p = write(tmp_path, "stages:\n  e:\n    type: eval\n    model: ${t}\n  t:\n    type: train\n    model: x\n")
    with pytest.raises(UserError, match="later stage"):
        load_recipe(p)
    p = write(tmp_path, "stages:\n  e:\n    type: eval\n    model: ${nope}\n")
    with pytest.raises(UserError, match="no stage"):
        load_recipe(p)


def test_malformed_yaml_has_line_number(tmp_path):
    p = write(tmp_path, "stages:\n  t:\n    type: train\n   model: [x\n")
    with pytest.raises(UserError, match=r"r.yaml:\d+: the recipe is not valid YAML"):
        load_recipe(p)


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write(tmp_path, TINY.replace("OUT", str(tmp_path / "o")))
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: {t: {type: train, model: x, lr: -1}}\n")
    assert main(["validate", str(bad)]) == 2
    assert "stages.t.lr" in capsys.readouterr().err


def test_tiny_recipe_runs_skips_and_reruns_changed_stage(tmp_path, capsys):
    p = write(tmp_path, TINY.replace("OUT", str(tmp_path / "o")))
    run(RunConfig(recipe=str(p)))
    metrics = json.loads((tmp_path / "o" / "score.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 200
    manifest = json.loads((tmp_path / "o" / "teacher" / "manifest.json").read_text())
    assert manifest["recipe_hash"] == load_recipe(p).stages[0].hash

    # Unchanged: every stage is skipped.
    assert [a for _, a in plan(load_recipe(p))] == ["skip", "skip"]
    # A key of the last stage: only that stage re-runs.
    assert [a for _, a in plan(load_recipe(p, ["score.batch_size=16"]))] == ["skip", "run"]
    # A key of the first stage: it and everything after it re-run.
    assert [a for _, a in plan(load_recipe(p, ["teacher.lr=0.001"]))] == ["run", "run"]
    # --from forces a stage and the later ones.
    assert [a for _, a in plan(load_recipe(p), "score")] == ["skip", "run"]
    # Seed is passed down from the top level and is part of the hash.
    assert load_recipe(p).stages[0].config.seed == 0
    assert load_recipe(p, ["teacher.seed=1"]).stages[0].hash != load_recipe(p).stages[0].hash


def test_unquoted_reference_in_flow_list_gets_a_hint(tmp_path):
    p = write(tmp_path, "stages:\n  t:\n    type: train\n    model: x\n  b:\n    type: bench\n    artifacts: [a=${t}]\n")
    with pytest.raises(UserError, match=r"r.yaml:7: .*must be quoted"):
        load_recipe(p)


def test_set_accepts_numbers_for_text_fields():
    recipe = load_recipe(RECIPES[0].with_name("quickstart.yaml"), ["int8.max_drop=0.5"])
    assert [s for s in recipe.stages if s.name == "int8"][0].config.max_drop == "0.5"


def test_interrupted_training_stage_resumes_only_with_the_same_config(tmp_path):
    p = write(tmp_path, TINY.replace("OUT", str(tmp_path / "o")))
    recipe = load_recipe(p)
    teacher = recipe.stages[0]
    # What a run killed mid-training leaves: a checkpoint in <out>.work and the marker beside it.
    state = teacher.out.with_name("teacher.work") / "checkpoint" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    teacher.out.with_name(".teacher.work-hash").write_text(teacher.hash)
    assert [a for _, a in plan(recipe)] == ["resume", "run"]
    # A changed key must not continue the old run.
    assert [a for _, a in plan(load_recipe(p, ["teacher.lr=0.001"]))] == ["run", "run"]


def test_lm_recipes_chain_a_causal_lm_to_a_decode_benchmark():
    """The LM recipes: every stage reads austen (windows of 256), and the report times decode."""
    root = RECIPES[0].parent
    quick = load_recipe(root / "lm-quickstart.yaml")
    assert [s.type for s in quick.stages] == ["train", "distill", "export", "quantize", "quantize", "bench"]
    assert [s.config.method for s in quick.stages if s.type == "quantize"] == ["ort-dynamic-int8", "ort-int4"]
    assert quick.stages[0].config.task == "causal-lm" and quick.stages[0].config.model.startswith("gpt2:")
    for name in ("lm-quickstart.yaml", "lm-existing.yaml", "lm-gpu.yaml"):
        recipe = load_recipe(root / name)
        for stage in recipe.stages:
            assert stage.data is None or (stage.data["dataset"], stage.data["max_length"]) == ("austen", 256), stage.name
        (bench,) = [s for s in recipe.stages if s.type == "bench"]
        assert bench.config.prompt_lens[0] == 128 and bench.config.decode_batch_sizes[0] == 1, name
    assert load_recipe(root / "lm-gpu.yaml").stages[0].config.device == "cuda"
