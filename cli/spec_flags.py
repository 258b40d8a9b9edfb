"""Command-line flags generated from JobSpec: one flag per field, so the CLI never lags the spec.

Used by `evosparse prune` and `evosparse submit`. Each JobSpec field becomes ``--field-name``
(underscores as dashes), the fields of a nested model (``search``) become flags of their own
in a group, and the flag's choices, type, default and help text come from the field's type,
default and ``Field(description=...)``. A field added to the spec later appears here without
an edit; a field type this module cannot turn into a flag is read as JSON.

Flags the user did not give are left out of the spec, so JobSpec's own defaults apply (the help
shows them). A field that may be None (e.g. ``search.time_budget_min``) takes ``none``; a
``dict[str, str]`` field (``labels``) takes ``KEY=VALUE`` words.

``--spec FILE`` reads a whole JobSpec from YAML or JSON (the body POST /v1/jobs takes); flags given
beside it override the file's fields, so one file serves `evosparse prune` and `evosparse submit`.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import PruningConfigError
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# Spellings that are not simply the field name: kept from before flags were generated (the README,
# scripts and people's shell history use them).
FLAG_NAMES: dict[tuple[str, ...], str] = {("search", "time_budget_min"): "--time-budget",
                                          ("quantize", "group_size"): "--quantize-group"}
# Nested models whose fields are flags without the model's name in front (--generations, not
# --search-generations). Any other nested model gets prefixed flags (--quantize-bits).
UNPREFIXED = frozenset({"search"})
POSITIONAL = ("model",)  # `evosparse prune MODEL ...`


@dataclass(frozen=True)
class SpecFlag:
    path: tuple[str, ...]  # ("search", "generations")
    flag: str  # "--generations", or the dest of a positional
    field: FieldInfo
    group: tuple[str, FieldInfo] | None  # the nested model's field name and FieldInfo

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, may be None) for ``X | None`` / ``Optional[X]``; other annotations unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def _model_of(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _split_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def spec_flags(model: type[BaseModel] = JobSpec) -> list[SpecFlag]:
    """Every flag of the spec, in field order; nested models' fields after the top-level ones."""
    top: list[SpecFlag] = []
    nested: list[SpecFlag] = []
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        if sub is None:
            top.append(_flag((name,), info, None))
            continue
        for sub_name, sub_info in sub.model_fields.items():
            if _model_of(sub_info.annotation) is not None:
                raise TypeError(f"JobSpec.{name}.{sub_name}: models nested two deep have no flag rule")
            nested.append(_flag((name, sub_name), sub_info, (name, info)))
    flags = top + nested
    seen: dict[str, str] = {}
    for f in flags:  # two fields must never share a flag (argparse would refuse, but say which)
        if f.flag in seen:
            raise TypeError(f"fields {seen[f.flag]} and {f.dest} would both be {f.flag}")
        seen[f.flag] = f.dest
    return flags


def _flag(path: tuple[str, ...], info: FieldInfo, group: tuple[str, FieldInfo] | None) -> SpecFlag:
    if path in FLAG_NAMES:
        flag = FLAG_NAMES[path]
    elif len(path) == 1 and path[0] in POSITIONAL:
        flag = path[0]
    else:
        words = path[1:] if path[0] in UNPREFIXED else path
        flag = "--" + "-".join(words).replace("_", "-")
    return SpecFlag(path, flag, info, group)


class _KeyValues(argparse.Action):
    """``--labels team=nlp stage=nightly``: words KEY=VALUE into one dict (repeated flags add up)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        found = dict(getattr(namespace, self.dest, None) or {})
        for word in values:
            key, eq, value = word.partition("=")
            if not eq or not key:
                parser.error(f"{option_string}: expected KEY=VALUE, got {word!r}")
            found[key] = value
        setattr(namespace, self.dest, found)


def _argparse_kwargs(f: SpecFlag) -> dict[str, Any]:
    annotation, nullable = _split_optional(f.field.annotation)
    kw: dict[str, Any] = {}
    extra = ""
    if get_origin(annotation) is dict and get_args(annotation) == (str, str):
        kw.update(action=_KeyValues, nargs="+", metavar="KEY=VALUE")
    elif get_origin(annotation) is Literal:
        values = get_args(annotation)
        kw["choices"] = values
        convert: Callable[[str], Any] = type(values[0])
    elif annotation is bool:
        kw["action"] = argparse.BooleanOptionalAction
        convert = bool
    elif annotation in (int, float, str):
        convert = annotation
    elif get_origin(annotation) is list and get_args(annotation) and get_args(annotation)[0] in (int, float, str):
        kw["nargs"] = "+"
        convert = get_args(annotation)[0]
    else:  # dicts, unions, ...: the same JSON the REST API takes
        convert, extra = json.loads, " (JSON)"
    if "action" not in kw:  # bool and KEY=VALUE flags turn their words into values themselves
        kw["type"] = _none_or(convert) if nullable else convert
        if "choices" not in kw:
            kw["metavar"] = f.flag.lstrip("-").replace("-", "_").upper()
    help_text = (f.field.description or "") + extra
    if f.field.is_required():
        # Not argparse-required: --spec may give it. A missing one is reported by build_spec.
        help_text += " (required, here or in --spec)"
    else:
        default = f.field.get_default(call_default_factory=True)
        if default is not PydanticUndefined and not isinstance(default, BaseModel) and default != {}:
            help_text += f" (default: {'none' if default is None else default}"
            help_text += "; 'none' unsets it)" if nullable else ")"
    kw["help"] = help_text.strip().replace("%", "%%")
    kw["default"] = argparse.SUPPRESS  # absent flags stay absent: JobSpec fills its own defaults
    kw["dest"] = f.dest
    return kw


def add_spec_arguments(parser: argparse.ArgumentParser, help_overrides: dict[str, str] | None = None) -> None:
    """Add one argument per JobSpec field to ``parser`` (nested models in their own groups)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in spec_flags():
        kw = _argparse_kwargs(f)
        if help_overrides and f.dest in help_overrides:
            kw["help"] = help_overrides[f.dest]
        target: argparse._ActionsContainer = parser
        if f.group is not None:
            name, info = f.group
            if name not in groups:
                groups[name] = parser.add_argument_group(info.description or name)
            target = groups[name]
        if f.flag.startswith("--"):
            target.add_argument(f.flag, **kw)
        else:  # the positional (model) may be left out: --spec or the spec's default gives it
            target.add_argument(f.flag, nargs="?", **{k: v for k, v in kw.items() if k in ("help", "type", "default")})
    parser.add_argument("--spec", metavar="FILE", dest="spec_file", help=(
        "read the job spec from this YAML or JSON file (the body POST /v1/jobs takes); flags override its fields"))


def _given(args: argparse.Namespace) -> Iterator[tuple[SpecFlag, Any]]:
    for f in spec_flags():
        if hasattr(args, f.dest):
            yield f, getattr(args, f.dest)


def spec_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSpec fields the user gave: the --spec file's, overridden by the flags, as the spec's JSON shape."""
    out: dict[str, Any] = read_spec_file(args.spec_file) if getattr(args, "spec_file", None) else {}
    for f, value in _given(args):
        node = out
        for part in f.path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[f.path[-1]] = value
    return out


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A JobSpec's fields from a YAML (or JSON, a subset of YAML) file; PruningConfigError if it is not a mapping."""
    text = Path(path).expanduser().read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # the base install has PyYAML; a trimmed one still reads JSON
        data = json.loads(text)
    except yaml.YAMLError as exc:
        raise PruningConfigError(f"--spec {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise PruningConfigError(f"--spec {path}: expected a mapping of job spec fields, got {type(data).__name__}")
    return data


def _flag_of(loc: tuple[Any, ...]) -> str:
    path = tuple(str(x) for x in loc)
    for f in spec_flags():
        if f.path == path:
            return f.flag if f.flag.startswith("--") else f.flag.upper()
    return ".".join(path) or "spec"


def build_spec(args: argparse.Namespace) -> JobSpec:
    """JobSpec from --spec and the flags; a validation error becomes one PruningConfigError line."""
    try:
        return JobSpec.model_validate(spec_dict(args))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _flag_of(tuple(err.get("loc", ())))
        if err.get("type") == "missing":
            raise PruningConfigError(f"missing {where}: give it as a flag or in --spec") from None
        msg = str(err.get("msg", exc)).removeprefix("Value error, ")
        raise PruningConfigError(f"invalid {where}: {msg}") from None


def _flag_value(value: Any) -> list[str]:
    import shlex

    if value is None:
        return ["none"]
    if isinstance(value, list):
        return [shlex.quote(str(v)) for v in value]
    if isinstance(value, dict):
        return [shlex.quote(json.dumps(value, separators=(",", ":")))]
    return [shlex.quote(str(value))]


def spec_command(spec: JobSpec, program: str = "evosparse prune") -> str:
    """The command line that rebuilds ``spec``: every field that differs from its default, as its flag.

    The inverse of ``build_spec``: ``build_spec(parse(spec_command(spec)))`` equals ``spec``.
    """
    import shlex

    data = spec.model_dump(mode="json")
    # The defaults of a plain sparsity job; the target itself (sparsity or a bits-per-weight budget
    # with its quantize settings) is always written out below.
    default = JobSpec.model_validate({"sparsity": 0.5}).model_dump(mode="json")
    target = {"sparsity", "bits_per_weight"}
    words = [program]
    for f in spec_flags():
        value, base = data, default
        for part in f.path:
            value = value.get(part) if isinstance(value, dict) else None
            base = base.get(part) if isinstance(base, dict) else None
        if not f.flag.startswith("--"):  # the positional model
            words.append(shlex.quote(str(value)))
            continue
        if f.path[0] in target:
            if value is None:  # the other kind of target
                continue
        elif value == base and not f.field.is_required():
            continue
        if isinstance(value, bool):
            words.append(f.flag if value else "--no-" + f.flag[2:])
        else:
            words += [f.flag, *_flag_value(value)]
    return " ".join(words)
