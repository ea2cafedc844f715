"""Task name -> Task, and which task a model source or artifact belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from compress.artifacts import read_manifest
from compress.errors import UserError
from compress.models import SPEC_ARCHS, checkpoint_task
from compress.tasks.base import Task
from compress.tasks.causal_lm import CausalLMTask
from compress.tasks.classification import ClassificationTask

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "causal-lm": CausalLMTask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"Unknown task '{name}'. Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]()


def task_for_source(task: str | None, source) -> Task:
    """The task to train: the one asked for, else the one the model source implies.

    A gpt2/llama spec or a causal-LM checkpoint implies causal-lm; anything else classification.
    A mismatch between the two is caught when the model is built, with a message naming both.
    """
    if task:
        return get_task(task)
    if source.kind == "spec":
        return get_task(SPEC_ARCHS[source.arch])
    if source.kind == "dir":
        return get_task(_dir_task(source.value) or "classification")
    return get_task("classification")


def _dir_task(directory) -> str | None:
    """The task an artifact directory records (manifest), or its config's architectures name."""
    manifest = read_manifest(directory)
    manifest_task = manifest.get("task") or (manifest.get("config") or {}).get("task")
    if manifest_task:
        return manifest_task
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    return checkpoint_task(json.loads(cfg.read_text()).get("architectures"))


def task_for_artifact(directory, asked: str | None = None) -> Task:
    """The task of an artifact (its manifest, else its config's architectures); `asked` must agree."""
    found = _dir_task(directory)
    if asked and found and asked != found:
        raise UserError(f"'{directory}' is a {found} artifact, but --task {asked} was given. Drop --task (it is "
                        f"read from the artifact) or pass --task {found}.")
    return get_task(asked or found or "classification")
