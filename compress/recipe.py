"""`compress run RECIPE.yaml`: the whole chain from one file.

A recipe is the saved arguments of the stages. Each stage's keys are that stage's
config fields one-to-one (validated by the same class the CLI and API use), plus `type`.
`${name}` refers to the output of an earlier stage. Every stage output lives in
`<output_dir>/<name>`, stamped with a hash of its resolved config and the hashes of
its inputs, so a second run skips finished stages and a changed key re-runs only that
stage and the ones after it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from compress.artifacts import MANIFEST, atomic_write, check_dir, fingerprint, make_dir, work_dir
from compress.config import StageConfig, _literal_choices, describe_validation_error, to_argv
from compress.data import DataConfig
from compress.errors import UserError

STAGE_TYPES = ("train", "distill", "export", "quantize", "eval", "bench")
TOP_LEVEL = {"output_dir": "directory that holds every stage's output",
             "seed": "seed given to every stage that takes one",
             "device": "device given to every stage that takes one",
             "data": "the data every stage that reads data takes (dataset, text_column, label_column, max_length, "
                     "...: the DataConfig keys); a stage's own keys override it",
             "description": "what the recipe does (free text)",
             "expected": "the results the recipe is expected to reach (documentation)",
             "stages": "the stages, in order"}
REF = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")
NOT_HASHED = {"force", "resume", "progress", "out"}  # keys that do not change what a stage makes


class RunConfig(StageConfig):
    """Run a recipe."""

    positional = ("recipe",)
    recipe: str = Field(..., description="recipe YAML file")
    set: list[str] = Field(default_factory=list, description="override a key: stage.key=value (repeatable)",
                           json_schema_extra={"repeat": True})
    from_stage: str | None = Field(None, description="re-run this stage and every later one",
                                   json_schema_extra={"flag": "--from"})
    dry_run: bool = Field(False, description="print the plan without running anything")


class ValidateConfig(StageConfig):
    """Validate a recipe."""

    positional = ("recipe",)
    recipe: str = Field(..., description="recipe YAML file")
    set: list[str] = Field(default_factory=list, description="override a key: stage.key=value (repeatable)",
                           json_schema_extra={"repeat": True})


@dataclass
class Stage:
    name: str
    type: str
    config: StageConfig
    raw: dict[str, Any]
    refs: list[str]
    launcher: str = "python"
    nproc: int = 1
    hash: str = ""
    data: dict[str, Any] | None = None  # the DataConfig values the stage will read (None: it reads no data)
    data_from: str = ""  # where they come from: the stage, the data block, an input's manifest, the defaults
    data_warnings: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.config.out)


@dataclass
class Recipe:
    path: Path
    output_dir: Path
    stages: list[Stage] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


# The tags a recipe's values can have: plain YAML (a date resolves to timestamp by itself).
SAFE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map",
                                                        "timestamp"))
MERGE_TAG = "tag:yaml.org,2002:merge"  # the `<<` key that merges an anchored mapping


def _line_map(text: str, path: Path) -> dict[tuple, int]:
    """Key path -> 1-based line, from the YAML node tree (safe_load drops positions).

    Also the one check of the recipe's YAML itself: syntax errors and tags that safe_load
    cannot build become a UserError naming the file and line.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = ("A ${stage} reference inside a [ ] list must be quoted ('${stage}'), or write the list "
                "one item per line with '- '." if "${" in line and "[" in line else
                "Check the indentation and quoting around that line.")
        raise UserError(f"{where}: the recipe is not valid YAML: {getattr(err, 'problem', err)}. {hint}") from None
    lines: dict[tuple, int] = {}
    inside: set[int] = set()  # the nodes on the current path: an alias can make the tree a cycle

    def check(node) -> None:
        if node.tag not in SAFE_TAGS:  # safe_load would refuse it too, but with a constructor traceback
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise UserError(f"{path}:{node.start_mark.line + 1}: tag {tag} is not allowed in a recipe. A recipe "
                            "holds plain values (strings, numbers, booleans, lists and mappings); remove the tag.")
        if id(node) in inside:
            raise UserError(f"{path}:{node.start_mark.line + 1}: this alias refers to a node that contains it; a "
                            "recipe cannot be recursive.")

    def walk(node, prefix: tuple) -> None:
        lines[prefix] = node.start_mark.line + 1
        check(node)
        inside.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.tag != MERGE_TAG:
                    check(k)
                key = k.value if isinstance(k, yaml.ScalarNode) else None  # safe_load refuses the others
                lines[prefix + (key,)] = k.start_mark.line + 1
                walk(v, prefix + (key,))
                lines[prefix + (key,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, prefix + (i,))
        inside.discard(id(node))

    if root is not None:
        walk(root, ())
    return lines


def config_class(stage_type: str) -> type[StageConfig]:
    """The config class of a stage type: the same one the CLI uses (imported on demand)."""
    import importlib

    from compress.cli import COMMANDS

    module, cls, _, _ = COMMANDS[stage_type]
    return getattr(importlib.import_module(module), cls)


def stage_function(stage_type: str):
    """The function of a stage type: the same one the CLI calls (imported on demand)."""
    import importlib

    from compress.cli import COMMANDS

    module, _, fn, _ = COMMANDS[stage_type]
    return getattr(importlib.import_module(module), fn)


def _data_block(doc: dict, where) -> dict[str, Any]:
    """The top-level `data:` block, checked: a mapping of DataConfig keys."""
    block = doc.get("data")
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise UserError(f"{where('data')}: 'data' must be a mapping of data keys ({', '.join(DataConfig.model_fields)}).")
    for key in block:
        if key not in DataConfig.model_fields:
            raise UserError(f"{where('data', key)}: unknown key 'data.{key}' (allowed keys: "
                            f"{', '.join(DataConfig.model_fields)}).")
    try:
        DataConfig.model_validate(block)
    except ValidationError as err:
        raise UserError(f"{where('data')}: {describe_validation_error(DataConfig, err, 'data')}") from None
    return dict(block)


def _stage_data(stage: Stage, done: dict[str, Stage]) -> None:
    """Which data `stage` will read, and from where: its own keys or the data block, else
    (at run time) the data recorded by its input artifact (`compress.lineage`)."""
    from compress.lineage import differs, input_artifacts, recorded_data

    cfg, fields = stage.config, DataConfig.model_fields
    inputs = []  # (name, data) of the input artifacts: earlier stages by their plan, others by their manifest
    for path in input_artifacts(stage_function(stage.type), cfg):
        parent = next((s for s in done.values() if str(s.out) == path), None)
        data = parent.data if parent is not None else recorded_data(path)
        if data is not None:
            inputs.append((parent.name if parent is not None else path, data))
    if "dataset" in cfg.model_fields_set:
        stage.data = {k: getattr(cfg, k) for k in fields}
        stage.data_from = "stage" if "dataset" in stage.raw else "data block"
        stage.data_warnings = [f"its input {name} was made from another dataset: {_describe_data(data)}"
                               for name, data in inputs if differs(stage.data, data)]
    elif inputs:
        name, data = inputs[0]
        stage.data = {**data, **{k: getattr(cfg, k) for k in cfg.model_fields_set & set(fields)}}
        stage.data_from = f"recorded by {name}"
    else:
        stage.data = {k: getattr(cfg, k) for k in fields}
        stage.data_from = "default"


def _describe_data(data: dict[str, Any]) -> str:
    from compress.lineage import describe

    return describe(data)


def _apply_overrides(doc: dict, overrides: list[str], path: Path) -> None:
    for item in overrides:
        key, eq, value = item.partition("=")
        parts = key.split(".")
        if not eq or len(parts) != 2:
            raise UserError(f"--set '{item}': use stage.key=value, e.g. --set student.epochs=5, or data.key=value.")
        stage, k = parts
        stages = doc.get("stages") or {}
        if stage == "data" and "data" not in stages:  # the top-level data block
            _line_map(value, Path(f"--set '{item}'"))
            if not isinstance(doc.get("data"), dict):
                doc["data"] = {}
            doc["data"][k] = yaml.safe_load(value)
            continue
        if stage not in stages:
            raise UserError(f"--set '{item}': {path} has no stage '{stage}' (stages: {', '.join(stages)}).")
        _line_map(value, Path(f"--set '{item}'"))  # the recipe file's checks: valid YAML, no tags
        stages[stage][k] = yaml.safe_load(value)


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Parse, resolve and validate a recipe; errors name the file, line, key and allowed values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The recipe '{path}' does not exist. The shipped recipes are in recipes/.")
    text = path.read_text()
    lines = _line_map(text, path)
    try:
        doc = yaml.safe_load(text)
    except Exception as err:  # what _line_map's checks did not foresee, e.g. `!!timestamp nope`
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: the recipe cannot be read as plain YAML "
                        f"values ({getattr(err, 'problem', None) or err}). Check any value with an explicit !!tag.") from None

    def where(*key) -> str:
        for n in range(len(key), -1, -1):
            if tuple(key[:n]) in lines:
                return f"{path}:{lines[tuple(key[:n])]}"
        return str(path)

    if not isinstance(doc, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_LEVEL)}.")
    for key in doc:
        if key not in TOP_LEVEL:
            raise UserError(f"{where(key)}: unknown top-level key '{key}' (allowed: {', '.join(TOP_LEVEL)}).")
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, dict) or not stages_doc:
        raise UserError(f"{where('stages')}: 'stages' must be a mapping of stage names to stages, in order.")
    _apply_overrides(doc, list(overrides), path)
    data_block = _data_block(doc, where)
    output_dir = Path(doc.get("output_dir") or Path("runs") / path.stem)
    recipe = Recipe(path=path, output_dir=output_dir)
    done: dict[str, Stage] = {}
    for name, body in stages_doc.items():
        if not isinstance(body, dict):
            raise UserError(f"{where('stages', name)}: stage '{name}' must be a mapping with a 'type'.")
        body = dict(body)
        stype = body.pop("type", None)
        if stype not in STAGE_TYPES:
            raise UserError(f"{where('stages', name, 'type')}: stage '{name}' has type {stype!r}; allowed types: "
                            f"{', '.join(STAGE_TYPES)}.")
        launcher = body.pop("launcher", "python")
        nproc = body.pop("nproc", 1)
        if launcher not in ("python", "torchrun") or not isinstance(nproc, int) or nproc < 1:
            raise UserError(f"{where('stages', name)}: launcher must be python or torchrun and nproc a positive integer.")
        if launcher == "torchrun" and stype not in ("train", "distill"):
            raise UserError(f"{where('stages', name, 'launcher')}: only train and distill stages run under torchrun.")
        cls = config_class(stype)
        if "out" in body:
            raise UserError(f"{where('stages', name, 'out')}: a recipe stage writes to <output_dir>/{name}; remove 'out'.")
        refs: list[str] = []

        def resolve(value, key):
            if isinstance(value, str):
                def sub(m):
                    ref = m.group(1)
                    if ref not in done:
                        later = ref in stages_doc
                        raise UserError(
                            f"{where('stages', name, key)}: '${{{ref}}}' refers to "
                            + ("a later stage" if later else "no stage")
                            + f"; a stage can use the outputs of earlier stages: {', '.join(done) or 'none yet'}.")
                    refs.append(ref)
                    return str(done[ref].out)
                return REF.sub(sub, value)
            if isinstance(value, list):
                return [resolve(v, key) for v in value]
            return value

        values = {k: resolve(v, k) for k, v in body.items()}
        for top in ("seed", "device"):
            if top in doc and top in cls.model_fields and top not in values:
                values[top] = doc[top]
        takes_data = issubclass(cls, DataConfig)
        if takes_data:
            values.update({k: v for k, v in data_block.items() if k not in values})
        values["out"] = str(output_dir / name) + (".json" if stype == "eval" else "")
        try:
            cfg = cls.model_validate(values)
        except ValidationError as err:
            raise UserError(_describe(err, cls, name, where)) from None
        stage = Stage(name, stype, cfg, body, refs, launcher, nproc)
        if takes_data:
            _stage_data(stage, done)
        hashed = {k: v for k, v in cfg.model_dump().items() if k not in NOT_HASHED}
        stage.hash = fingerprint(stype, hashed, [done[r].hash for r in refs])
        done[name] = stage
        recipe.stages.append(stage)
    return recipe


def _describe(err: ValidationError, cls: type[BaseModel], stage: str, where) -> str:
    parts = []
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else ""
        loc = where("stages", stage, key)
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key 'stages.{stage}.{key}' for a {cls.__name__} (allowed keys: "
                         f"{', '.join(k for k in cls.model_fields if k != 'out')})")
            continue
        field_ = cls.model_fields.get(key)
        choices = _literal_choices(field_.annotation) if field_ else None
        allowed = f" (allowed values: {', '.join(map(str, choices))})" if choices else ""
        parts.append(f"{loc}: 'stages.{stage}.{key}' = {e.get('input')!r}: {e['msg']}{allowed}")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- running


def _stamped_hash(out: Path) -> str | None:
    target = out / MANIFEST if out.is_dir() else out
    try:
        return json.loads(target.read_text()).get("recipe_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _stamp(out: Path, value: str) -> None:
    target = out / MANIFEST if out.is_dir() else out
    doc = json.loads(target.read_text()) if target.is_file() else {}
    doc["recipe_hash"] = value
    atomic_write(target, json.dumps(doc, indent=2, default=str) + "\n")


def _work_marker(stage: Stage) -> Path:
    """Which config an unfinished training run in `<out>.work` belongs to (its stage hash)."""
    return stage.out.with_name(f".{stage.out.name}.work-hash")


def plan(recipe: Recipe, from_stage: str | None = None) -> list[tuple[Stage, str]]:
    """(stage, 'skip' | 'run' | 'resume') for each stage, in order."""
    names = [s.name for s in recipe.stages]
    if from_stage and from_stage not in names:
        raise UserError(f"--from {from_stage}: {recipe.path} has no such stage (stages: {', '.join(names)}).")
    rerun, out = False, []
    for s in recipe.stages:
        rerun = rerun or s.name == from_stage
        finished = s.out.exists() and _stamped_hash(s.out) == s.hash
        work = work_dir(s.out)
        if finished and not rerun:
            out.append((s, "skip"))
        else:
            rerun = True  # everything after a re-run stage runs again: its inputs changed
            marker = _work_marker(s)
            started = (work / "checkpoint" / "state.json").is_file() and marker.is_file() \
                and marker.read_text() == s.hash
            out.append((s, "resume" if started else "run"))
    return out


def _run_stage(stage: Stage, action: str) -> None:
    import importlib

    from compress.cli import COMMANDS

    cfg = stage.config
    if "force" in type(cfg).model_fields:
        cfg = cfg.model_copy(update={"force": True})  # the recipe owns its output directory
    if action == "resume":
        cfg = cfg.model_copy(update={"resume": True})
    if stage.type in ("train", "distill"):
        # Beside the work directory, not in it: a fresh run clears its work directory.
        _work_marker(stage).parent.mkdir(parents=True, exist_ok=True)
        _work_marker(stage).write_text(stage.hash)
    if stage.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.nproc}",
               "-m", "compress", stage.type, *to_argv(cfg)]
        print("  $ " + shlex.join(cmd))
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"Stage '{stage.name}' failed under torchrun (see its output above).")
        return
    module, _, fn, _ = COMMANDS[stage.type]
    getattr(importlib.import_module(module), fn)(cfg)


def _print_data(stage: Stage) -> None:
    if stage.data is not None:
        print(f"  {'':<12} data {_describe_data(stage.data)} ({stage.data_from})")
    for warning in stage.data_warnings:
        print(f"  {'':<12} warning: {stage.name} reads {_describe_data(stage.data)}, but {warning}")


def run(cfg: RunConfig) -> Recipe:
    """Run every stage of the recipe that is not already finished with the same inputs."""
    recipe = load_recipe(cfg.recipe, cfg.set)
    check_dir(recipe.output_dir)  # before the plan: a file in the way fails now
    steps = plan(recipe, cfg.from_stage)
    print(f"recipe {recipe.path} -> {recipe.output_dir}")
    for stage, action in steps:
        print(f"  {stage.name:<12} {stage.type:<9} {action:<7} -> {stage.out}")
        _print_data(stage)
    if cfg.dry_run:
        return recipe
    make_dir(recipe.output_dir)
    for stage, action in steps:
        if action == "skip":
            continue
        print(f"\n== {stage.name} ({stage.type}) ==")
        t0 = time.perf_counter()
        _run_stage(stage, action)
        _stamp(stage.out, stage.hash)
        _work_marker(stage).unlink(missing_ok=True)
        print(f"== {stage.name} done in {time.perf_counter() - t0:.0f} s -> {stage.out}")
    last = recipe.stages[-1]
    report = last.out / "report.html"
    print(f"\nfinished: {report if report.is_file() else last.out}")
    return recipe


def validate(cfg: ValidateConfig) -> Recipe:
    """Parse and validate a recipe; print its stages."""
    recipe = load_recipe(cfg.recipe, cfg.set)
    for s in recipe.stages:
        print(f"  {s.name:<12} {s.type:<9} -> {s.out}")
        _print_data(s)
    print(f"{recipe.path}: valid ({len(recipe.stages)} stages)")
    return recipe
