"""Recipes name their data once: a top-level `data:` block reaches every stage that reads
data; a stage given no data reads what its input artifact's manifest recorded; a stage whose
data differs from its input's is warned about; `--dry-run` shows each stage's data."""

import json
from pathlib import Path

import pytest
import yaml

from compress.recipe import RunConfig, ValidateConfig, load_recipe, run, validate

from conftest import TINY_SPEC

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

# The quickstart shrunk to tiny models and a few seconds per stage (keys only, stages unchanged).
TINY_QUICKSTART = [
    f"teacher.model={TINY_SPEC}", "teacher.epochs=1", "teacher.lr=0.002", "teacher.progress=false",
    "teacher.threads=1",
    "student.student=layers=1", "student.prune_heads=2", "student.prune_ffn=64", "student.augment=0",
    "student.epochs=1", "student.lr=0.002", "student.progress=false", "student.threads=1",
    "student.min_token_count=1",
    "onnx.parity_examples=8", "onnx.threads=1",
    "int8.max_drop=100", "int8.threads=1", "int8.sensitivity_samples=16",
    "report.batch_sizes=[1]", "report.seq_lens=[16]", "report.budget_s=0.05", "report.min_iters=3",
    "report.warmup=0", "report.isolate=false", "report.peak_probe=false", "report.interleave=false",
    "report.threads=1", "report.progress=false",
]


def _csv_dir(root: Path, labels: str) -> Path:
    """A user dataset as `train.csv` and `test.csv` (no validation file), columns review/sentiment,
    taken from the real data; `labels` is "strings" (neg/pos) or "ints" (7/9: not rt-snippets' ids)."""
    from compress.data import DataConfig, load_data

    data = load_data(DataConfig(max_examples=150))
    d = root / f"user-{labels}"
    d.mkdir()
    for split, name in (("train", "train"), ("test", "test")):
        df = data[split].to_pandas()
        mapping = {0: "neg", 1: "pos"} if labels == "strings" else {0: 7, 1: 9}
        df["sentiment"] = df["label"].map(mapping)
        df[["text", "sentiment"]].rename(columns={"text": "review"}).to_csv(d / f"{name}.csv", index=False)
    return d


def _quickstart_with_data(tmp_path: Path, data: dict) -> Path:
    """recipes/quickstart.yaml whose only changes are its data block and its output directory."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["data"] = data
    doc["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "quickstart-user.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def user_strings(tmp_path_factory) -> Path:
    return _csv_dir(tmp_path_factory.mktemp("data"), "strings")


def test_quickstart_with_a_user_csv_validates_and_plans_it_in_every_stage(user_strings, tmp_path, capsys):
    path = _quickstart_with_data(tmp_path, {"dataset": str(user_strings), "text_column": "review",
                                            "label_column": "sentiment"})
    recipe = validate(ValidateConfig(recipe=str(path)))
    assert [s.name for s in recipe.stages] == ["teacher", "student", "onnx", "int8", "report"]
    for stage in recipe.stages:
        assert stage.config.dataset == str(user_strings), stage.name
        assert (stage.config.text_column, stage.config.label_column) == ("review", "sentiment")
        assert stage.data_from == "data block" and not stage.data_warnings
    capsys.readouterr()
    run(RunConfig(recipe=str(path), dry_run=True))
    plan = capsys.readouterr().out
    assert plan.count(f"data '{user_strings}'") == 5 and "warning" not in plan


def test_quickstart_with_a_user_csv_runs_end_to_end_on_it(user_strings, tmp_path):
    path = _quickstart_with_data(tmp_path, {"dataset": str(user_strings), "text_column": "review",
                                            "label_column": "sentiment"})
    run(RunConfig(recipe=str(path), set=TINY_QUICKSTART))
    runs = tmp_path / "runs"
    for stage in ("teacher", "student", "onnx", "int8"):
        manifest = json.loads((runs / stage / "manifest.json").read_text())
        assert manifest["config"]["dataset"] == str(user_strings), stage
    teacher = json.loads((runs / "teacher" / "config.json").read_text())
    assert sorted(teacher["label2id"]) == ["neg", "pos"]  # string labels, mapped once and kept
    results = json.loads((runs / "report" / "results.json").read_text())
    assert results["dataset"]["source"] == str(user_strings)
    assert {a["name"] for a in results["artifacts"]} == {"teacher", "student", "student-int8"}


def test_a_stage_without_data_runs_on_its_inputs_manifest_data(tmp_path, capsys):
    """Integer labels (7/9) and no data block: the teacher names the data, the stages after it
    name none and must read the teacher's data, not the built-in default."""
    data_dir = _csv_dir(tmp_path, "ints")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'runs'}
seed: 0
device: cpu
stages:
  teacher:
    type: train
    model: "{TINY_SPEC}"
    dataset: {data_dir}
    text_column: review
    label_column: sentiment
    epochs: 1
    lr: 0.002
    precision: fp32
    progress: false
    threads: 1
  student:
    type: distill
    teacher: ${{teacher}}
    student: layers=1
    epochs: 1
    baseline: false
    precision: fp32
    progress: false
    threads: 1
  score:
    type: eval
    model: ${{student}}
""")
    plan = load_recipe(recipe)
    assert [s.data_from for s in plan.stages] == ["stage", "recorded by teacher", "recorded by student"]
    assert all(s.data["dataset"] == str(data_dir) for s in plan.stages)
    assert "dataset" not in plan.stages[1].config.model_fields_set  # read at run time, from the manifest
    run(RunConfig(recipe=str(recipe)))
    err = capsys.readouterr().err
    assert f"no dataset given: reading '{data_dir}'" in err
    runs = tmp_path / "runs"
    teacher = json.loads((runs / "teacher" / "manifest.json").read_text())
    student = json.loads((runs / "student" / "manifest.json").read_text())
    assert student["config"]["dataset"] == str(data_dir)
    assert (student["config"]["text_column"], student["config"]["label_column"]) == ("review", "sentiment")
    assert student["data"]["fingerprint"] == teacher["data"]["fingerprint"]
    score = json.loads((runs / "score.json").read_text())
    assert score["dataset"] == str(data_dir) and score["n"] == teacher["data"]["counts"]["test"]


def test_data_that_differs_from_the_inputs_is_warned_about(tmp_path, capsys):
    from compress.artifacts import write_manifest
    from compress.lineage import resolve
    from compress.eval import EvalConfig

    art = tmp_path / "teacher"
    art.mkdir()
    write_manifest(art, stage="train", config={"dataset": "mine.csv", "text_column": "review", "label_column": "y",
                                               "max_length": 64, "max_examples": 50})
    # Given nothing: the manifest's data, and what was given stays.
    cfg = resolve(EvalConfig(model=str(art), max_length=32), [str(art)], "eval")
    assert (cfg.dataset, cfg.text_column, cfg.label_column, cfg.max_examples, cfg.max_length) == \
        ("mine.csv", "review", "y", 50, 32)
    # Given other data: it is used, with a warning naming both.
    cfg = resolve(EvalConfig(model=str(art), dataset="rt-snippets"), [str(art)], "eval")
    assert cfg.dataset == "rt-snippets"
    err = capsys.readouterr().err
    assert "warning" in err and "'rt-snippets'" in err and "'mine.csv'" in err and str(art) in err

    # In a recipe the plan says it before anything runs.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  score:\n    type: eval\n    model: {art}\n    dataset: rt-snippets\n")
    run(RunConfig(recipe=str(recipe), dry_run=True))
    out = capsys.readouterr().out
    assert "warning: score reads 'rt-snippets'" in out and "'mine.csv'" in out


def test_data_block_keys_are_checked_and_settable(tmp_path):
    from compress.errors import UserError

    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: rt-snippets\n  text_colum: x\nstages:\n  t:\n    type: train\n    model: m\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: unknown key 'data.text_colum'.*text_column"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  dataset: rt-snippets\nstages:\n  t:\n    type: train\n    model: m\n"
                    "  e:\n    type: eval\n    model: ${t}\n    max_length: 64\n")
    recipe = load_recipe(good, ["data.max_length=32"])
    assert [s.config.max_length for s in recipe.stages] == [32, 64]  # the stage's own key wins
