"""Typed configuration for every workflow, validated in one place.

A config is YAML (see configs/*.yaml) plus command-line overrides. Everything is checked here, before
any work starts: an unknown key, a value of the wrong type or out of range is a `ConfigError` whose
message names the dotted key (e.g. `summarize.num_candidates`).

The sections live in generate.py (the data factory's, and the pieces other workflows reuse: model,
compute) and jobs.py (train, evaluate, loop, submit); this module loads, validates and fingerprints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

# The sections, importable from pipeline.config as well.
from pipeline.config.generate import (ENGINE_SPEED_KEYS, ComputeConfig, DecontaminateConfig, EMBEDDED_CORPUS,
                                      EMBEDDED_MODEL, ExtractConfig, GenerateConfig, InputConfig, JudgeConfig,
                                      ModelConfig, SelectConfig, SummarizeConfig, inside)
from pipeline.config.jobs import (BenchmarkConfig, EvalGenerationConfig, EvaluateConfig, LoopConfig, LoraConfig,
                                  OptimConfig, RuntimeEnvConfig, SandboxConfig, SubmitConfig, TrainCheckpointConfig,
                                  TrainComputeConfig, TrainConfig, TrainDataConfig, TrainModelConfig)

__all__ = [  # re-exported: callers import every section from pipeline.config
    "BenchmarkConfig", "ComputeConfig", "DecontaminateConfig", "EMBEDDED_CORPUS", "EMBEDDED_MODEL",
    "EvalGenerationConfig", "EvaluateConfig", "ExtractConfig", "GenerateConfig", "InputConfig", "JudgeConfig",
    "LoopConfig", "LoraConfig", "ModelConfig", "OptimConfig", "RuntimeEnvConfig", "SandboxConfig", "SelectConfig",
    "SubmitConfig", "SummarizeConfig", "TrainCheckpointConfig", "TrainComputeConfig", "TrainConfig",
    "TrainDataConfig", "TrainModelConfig", "ConfigError", "load_config", "validate", "to_dict", "fingerprint",
    "sections", "WORKFLOWS", "parse_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem, with a message that names the key."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (true/false only). YAML 1.1 also reads yes/no/on/off as
    booleans, so `judge.yes_words: [Yes, " Yes"]` was [True, " Yes"]; boolean keys still take `yes`, as
    the validation reads "yes"/"no"/"on"/"off" as booleans."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    """A config file or a `--set` value (YAML 1.2 booleans, see `_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                schema: type[T] = GenerateConfig) -> T:  # type: ignore[assignment]
    """YAML file (optional) + dotted overrides (`{"summarize.num_candidates": 4}`) -> validated config.

    `schema` is the workflow's top-level config class (GenerateConfig, or another workflow's)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:  # missing, a folder, no permission: one line, not Python's errno wording
            raise ConfigError(f"config file {path}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        try:
            raw = parse_yaml(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return validate(raw, schema)


def validate(raw: dict[str, Any], schema: type[T] = GenerateConfig) -> T:  # type: ignore[assignment]
    try:
        cfg = TypeAdapter(schema).validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, schema) + _loop_config_hint(raw, schema)) from None
    output = getattr(cfg, "output", None)
    if isinstance(output, str) and (working_dir := _ray_job_working_dir()) and inside(output, working_dir):
        raise ConfigError(
            f"invalid config:\n  output: {output} is inside this Ray job's copy of its working_dir ({working_dir}), "
            "which Ray deletes once no job uses it: the results would be lost; write them to s3://... or to "
            "an absolute path on storage every node of the cluster shares (on a one-machine cluster: a folder "
            "such as the one you submitted from, e.g. --output /home/me/runs/NAME)")
    return cfg


def _ray_job_working_dir() -> str | None:
    """The folder this process runs in when it is a Ray job's driver submitted with a `working_dir` (Ray
    unpacks the upload under its session's runtime_resources/ and starts the entrypoint there), else None.
    A relative output path, such as every config's default, would resolve into that temporary copy."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return None
    runtime_env = job.get("runtime_env") if isinstance(job, dict) else None
    return os.getcwd() if isinstance(runtime_env, dict) and runtime_env.get("working_dir") else None


def _loop_config_hint(raw: dict[str, Any], schema: type) -> str:
    """A loop config (configs/demo.yaml) given to one of its steps fails on every section name: say so."""
    own = {f.name for f in dataclasses.fields(schema)}
    found = sorted(set(sections(LoopConfig)) & set(raw) - own)
    if schema is LoopConfig or not found:
        return ""
    return (f"\n  (`{'`, `'.join(found)}` are sections of a whole-loop config: run it with `inverse-instruct loop` or "
            "`demo --config`, or give this command only what is under its own section)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def deciding_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """A model config (as a dict) without the engine's speed knobs (ENGINE_SPEED_KEYS): what decides the text
    it writes, compared before work made with it is resumed."""
    return {k: v for k, v in model.items() if k not in ENGINE_SPEED_KEYS}


def stage_configs(cfg: GenerateConfig) -> dict[str, dict[str, Any]]:
    """The config sections that decide each stage's output, for safe resume.

    `compute`, `output` and the model's engine speed knobs are left out: changing the cluster shape must
    not invalidate finished work.
    """
    d = to_dict(cfg)
    d["model"] = deciding_model_config(d["model"])
    stages = {
        "preprocess": ["input", "extract"],
        "inverse": ["input", "extract", "model", "summarize", "judge"],
        "select": ["input", "extract", "model", "summarize", "judge", "select", "decontaminate"],
    }
    return {stage: {k: d[k] for k in keys} for stage, keys in stages.items()}


def fingerprint(cfg: GenerateConfig) -> dict[str, str]:
    """A hash of each stage's `stage_configs`."""
    return {stage: _hash(sections) for stage, sections in stage_configs(cfg).items()}


def config_changes(old: dict[str, Any], new: dict[str, Any], most: int = 6) -> list[str]:
    """`key: old -> new` (dotted keys) for each value that differs, for a message refusing to resume."""
    changes: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}" if key else k)
        elif a != b:
            changes.append(f"{key}: {_shown(a)} -> {_shown(b)}")

    walk(old, new, "")
    return changes if len(changes) <= most else [*changes[:most], f"{len(changes) - most} more"]


_ABSENT = object()


def _shown(value: Any) -> str:
    return "(no such key)" if value is _ABSENT else json.dumps(value)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in the raw config. A section that can be given as a bare path (`data.original`) is one
    wherever it is given so: its keys and its path are merged, in whichever order the file and flags set them."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        elif isinstance(node[key], str):  # a section given as a bare path (`data.original: corpus.jsonl`)
            node[key] = {"path": node[key]}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: `{key}` is a value, not a section")
    if isinstance(node.get(leaf), dict) and isinstance(value, str):
        node[leaf]["path"] = value  # a bare path for a section already given keys: keep them
    else:
        node[leaf] = value


def _explain(err: ValidationError, schema: type) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" or e["type"] == "unexpected_keyword_argument":
            known = _known_keys(schema, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            suffix = f" (did you mean `{hint[0]}`?)" if hint else f" (known: {', '.join(sorted(known))})"
            lines.append(f"{key}: unknown config key{suffix}")
        elif e["type"] == "value_error":  # a cross-field check of a section (key) or of the whole config
            message = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{key}: {message}" if key else message)
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _known_keys(schema: type, loc: tuple) -> list[str]:
    """Keys allowed where an unknown key was found: walk the dataclass fields along `loc`."""
    node = schema
    for key in loc:
        fields = {f.name: f.type for f in dataclasses.fields(node)}
        hint = _section_class(fields.get(str(key)))
        if hint is None:
            break
        node = hint
    return [f.name for f in dataclasses.fields(node)]


def _section_class(annotation: Any) -> type | None:
    """The dataclass a field annotation (possibly a string, under `from __future__ import annotations`;
    possibly `X | None`) names."""
    if isinstance(annotation, str):
        annotation = globals().get(annotation.removesuffix(" | None"))
    return annotation if dataclasses.is_dataclass(annotation) else None


def sections(schema: type) -> dict[str, type]:
    """Top-level sections of a workflow config: name -> dataclass (for docs and tests)."""
    return {f.name: cls for f in dataclasses.fields(schema) if (cls := _section_class(f.type)) is not None}


WORKFLOWS: dict[str, type] = {
    "loop": LoopConfig,
    "generate": GenerateConfig,
    "train": TrainConfig,
    "submit": SubmitConfig,
    "evaluate": EvaluateConfig,
}
"""Every workflow's top-level config class; each key of each one is documented in README's reference."""
