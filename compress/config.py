"""Typed stage configs, shared by the CLI, recipes and the Python API.

Each stage declares one pydantic model deriving from `StageConfig`. Unknown keys are
errors (`extra="forbid"`), so a typo in a recipe or a `--set` fails loudly. The CLI
arguments are generated from the same fields, so the parameter list exists once.
"""

from __future__ import annotations

import argparse
import types
import typing
import warnings
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import UserError


class StageConfig(BaseModel):
    """Base class of every stage config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Fields given on the command line without a flag (e.g. `compress bench ART ART`).
    positional: ClassVar[tuple[str, ...]] = ()
    # Old key -> the field that replaced it. The old key (and its --flag) is still accepted,
    # with a deprecation warning, and renamed before validation.
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _rename_deprecated(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not cls.renamed:
            return values
        values = dict(values)
        for old, new in cls.renamed.items():
            if old not in values:
                continue
            value = values.pop(old)
            if new in values:
                raise ValueError(f"'{old}' is the deprecated name of '{new}'; give only '{new}'")
            warnings.warn(f"{cls.__name__}: '{old}' (--{old.replace('_', '-')}) is deprecated and will be removed; "
                          f"use '{new}' (--{new.replace('_', '-')}). Taken as {new}={value!r}.", FutureWarning,
                          stacklevel=2)
            values[new] = value
        return values

    @classmethod
    def parse(cls, values: dict[str, Any], where: str = "") -> "StageConfig":
        """Validate `values`, turning pydantic's errors into one readable `UserError`."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise UserError(describe_validation_error(cls, err, where)) from None


Device = Literal["auto", "cpu", "cuda"]


class RuntimeConfig(StageConfig):
    """Where and how a stage runs: declared once here, composed by every stage config."""

    device: Device = Field("cpu", description="where to run: cpu, cuda, or auto (cuda when PyTorch sees a GPU, else cpu)")
    threads: int | None = Field(None, ge=1, description="CPU threads of PyTorch and ONNX Runtime (default: the libraries' choice, all cores)")
    force: bool = Field(False, description="replace an existing output")
    trust_remote_code: bool = Field(False, description="allow model code shipped with a checkpoint when loading it (only for sources you trust)")
    eval_batch_size: int = Field(64, ge=1, description="examples per batch when scoring (validation, test, calibration checks, benchmark accuracy)")


def describe_validation_error(cls: type[BaseModel], err: ValidationError, where: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        field = cls.model_fields.get(str(e["loc"][0])) if e["loc"] else None
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(cls.model_fields))
            lines.append(f"unknown key '{key}' (allowed keys: {allowed})")
            continue
        hint = ""
        if field is not None:
            choices = _literal_choices(field.annotation)
            if choices:
                hint = f" (allowed values: {', '.join(map(str, choices))})"
        value = e.get("input")
        lines.append(f"key '{key}' = {value!r}: {e['msg']}{hint}")
    prefix = f"{where}: " if where else ""
    return f"{prefix}invalid {cls.__name__}: " + "; ".join(lines) + "."


def _literal_choices(annotation: Any) -> tuple | None:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return None


def _scalar_type(annotation: Any) -> Any:
    """The non-None type inside Optional[...] / X | None."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, cls: type[StageConfig], skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per config field. Help text is the field's description."""
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        ann = _scalar_type(field.annotation)
        if name in cls.positional:
            many = get_origin(ann) in (list, tuple)
            parser.add_argument(name, nargs="+" if many else None, help=(field.description or "").replace("%", "%%"))
            continue
        default = extra.get("default_text", field.default if not field.is_required() else None)
        # argparse %-formats help strings: a literal % (as in "--max-drop 1%") must be doubled.
        help_ = ((field.description or "") + ("" if field.is_required() else f" [default: {default}]")).replace("%", "%%")
        choices = _literal_choices(field.annotation)
        if extra.get("repeat"):
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_)
        elif ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif choices:
            parser.add_argument(flag, dest=name, choices=[str(c) for c in choices], default=None, help=help_,
                                required=field.is_required())
        else:
            # Everything else arrives as a string and pydantic coerces it (ints, floats, lists
            # given as comma-separated strings are split below).
            parser.add_argument(flag, dest=name, default=None, help=help_, required=field.is_required())
    for old in cls.renamed:  # deprecated flags: still accepted, not listed
        parser.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)


def from_args(cls: type[StageConfig], args: argparse.Namespace) -> StageConfig:
    values: dict[str, Any] = {old: getattr(args, old) for old in cls.renamed if getattr(args, old, None) is not None}
    for name, field in cls.model_fields.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        ann = _scalar_type(field.annotation)
        if get_origin(ann) in (list, tuple) and isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        values[name] = v
    return cls.parse(values, where="command line")


def to_argv(cfg: StageConfig) -> list[str]:
    """The command-line flags that reproduce `cfg` (non-default fields only)."""
    argv: list[str] = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if name not in cfg.model_fields_set and not field.is_required():
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        if name in type(cfg).positional:
            argv[:0] = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
