"""Config: one place, typed, errors that name the key, flags over YAML."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pipeline.cli import build_parser, config_from_args
from pipeline.config import (ConfigError, EvaluateConfig, LoopConfig, TrainConfig, config_changes, fingerprint,
                             load_config, stage_configs)

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_papers():
    cfg = load_config()
    s = cfg.summarize
    assert (s.num_candidates, s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens, s.stop) == (
        10, 0.8, 1.0, 1.1, 2048, ["```"])
    assert cfg.select.min_score is None and cfg.extract.dedup


def test_yes_and_no_are_words_not_booleans(tmp_path):
    """YAML 1.1 (PyYAML's default) reads Yes/No/on/off as booleans: `yes_words: [Yes]` was [True], an error
    about a boolean the user never wrote. Boolean keys still take yes/no."""
    path = tmp_path / "c.yaml"
    path.write_text('judge:\n  yes_words: [Yes, " Yes", YES]\n  no_words: [No, " No"]\nextract:\n  dedup: no\n'
                    "model:\n  trust_remote_code: yes\n")
    cfg = load_config(path)
    assert (cfg.judge.yes_words, cfg.judge.no_words) == (["Yes", " Yes", "YES"], ["No", " No"])
    assert cfg.extract.dedup is False and cfg.model.trust_remote_code is True
    args = build_parser().parse_args(["generate", "--set", "judge.no_words=[No, NO]", "--set", "extract.dedup=off"])
    cfg = config_from_args(args)
    assert cfg.judge.no_words == ["No", "NO"] and cfg.extract.dedup is False


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("summarize:\n  num_candidats: 4\n")
    with pytest.raises(ConfigError, match=r"summarize\.num_candidats: unknown config key \(did you mean `num_candidates`"):
        load_config(path)


def test_a_loop_config_given_to_one_step_says_where_it_belongs():
    demo = REPO / "configs" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"`evaluate`, `generate`, `train` are sections of a whole-loop config"):
        load_config(demo)  # generate's schema
    with pytest.raises(ConfigError, match=r"`evaluate`, `generate`, `train` are sections of a whole-loop config"):
        load_config(demo, schema=EvaluateConfig)
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"sumarize.num_candidates": 3})
    assert "whole-loop" not in str(err.value)


def test_unknown_section_and_ill_typed_values_name_the_key():
    with pytest.raises(ConfigError, match=r"sumarize: unknown config key"):
        load_config(overrides={"sumarize.num_candidates": 3})
    with pytest.raises(ConfigError, match=r"summarize\.num_candidates: .*integer"):
        load_config(overrides={"summarize.num_candidates": "ten"})
    with pytest.raises(ConfigError, match=r"model\.engine"):
        load_config(overrides={"model.engine": "tgi"})
    with pytest.raises(ConfigError, match=r"summarize\.temperature"):
        load_config(overrides={"summarize.temperature": -1})
    with pytest.raises(ConfigError, match=r"judge\.no_words: List should have at least 1 item"):  # not after a model load
        load_config(overrides={"judge.no_words": []})
    with pytest.raises(ConfigError, match=r"input\.response_fields: List should have at least 1 item"):
        load_config(overrides={"input.response_fields": []})


def test_cross_field_checks():
    # Another run on data/ would read data/run1's Parquet outputs as corpus rows.
    for inp, out in (("data", "data/run1"), ("./data/", "data"), ("s3://b/corpus", "s3://b/corpus/run1/")):
        with pytest.raises(ConfigError, match=r"output \(.*\) is inside input.path"):
            load_config(overrides={"input.path": inp, "output": out})
    for inp, out in (("data/corpus.jsonl", "data/run1"), ("data", "data-runs/run1"), ("s3://b/corpus", "s3://b/runs")):
        load_config(overrides={"input.path": inp, "output": out})
    with pytest.raises(ConfigError, match=r"output \(data/train\) is inside data.original \(data\)"):
        load_config(overrides={"data.original": "data", "output": "data/train"}, schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"output \(data/loop\) is inside generate.input.path \(data\)"):
        load_config(overrides={"generate.input.path": "data", "output": "data/loop"}, schema=LoopConfig)
    with pytest.raises(ConfigError, match="max_actors"):
        load_config(overrides={"compute.min_actors": 3, "compute.max_actors": 2})
    with pytest.raises(ConfigError, match=r"num_gpus_per_actor \(1\) must equal model.tensor_parallel_size \(2\)"):
        load_config(overrides={"model.tensor_parallel_size": 2, "compute.num_gpus_per_actor": 1})
    # TP=1 may share a GPU between actors; the transformers engine has no TP; CPU actors ask no GPU.
    for ok in ({"compute.num_gpus_per_actor": 0.5}, {"model.tensor_parallel_size": 4, "compute.num_gpus_per_actor": 4},
               {"model.engine": "transformers", "compute.num_gpus_per_actor": 1}):
        load_config(overrides=ok)


def test_engines_sharing_a_gpu_each_get_their_share_of_its_memory():
    # vLLM reserves gpu_memory_utilization of the WHOLE GPU: two engines at 0.9 would not both start.
    assert load_config().model.gpu_memory_utilization == 0.9
    assert load_config(overrides={"compute.num_gpus_per_actor": 0.5}).model.gpu_memory_utilization == 0.45
    assert load_config(overrides={"compute.num_gpus_per_actor": 0.25}).model.gpu_memory_utilization == 0.225
    assert load_config(overrides={"compute.num_gpus_per_actor": 2, "model.tensor_parallel_size": 2}
                       ).model.gpu_memory_utilization == 0.9
    explicit = {"compute.num_gpus_per_actor": 0.5, "model.gpu_memory_utilization": 0.4}
    assert load_config(overrides=explicit).model.gpu_memory_utilization == 0.4
    with pytest.raises(ConfigError, match=r"model.gpu_memory_utilization \(0.6\) is more than this actor's share"):
        load_config(overrides={**explicit, "model.gpu_memory_utilization": 0.6})
    with pytest.raises(ConfigError, match=r"model.gpu_memory_utilization \(0.6\) is more than"):
        load_config(overrides={**explicit, "model.gpu_memory_utilization": 0.6}, schema=EvaluateConfig)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("summarize:\n  num_candidates: 4\n  max_new_tokens: 64\ninput:\n  limit: 5\n")
    args = build_parser().parse_args(
        ["generate", "--config", str(path), "--num-candidates", "3", "--engine", "transformers",
         "--set", "compute.batch_size=16", "--output", "x"])
    cfg = config_from_args(args)
    assert cfg.summarize.num_candidates == 3  # flag wins
    assert cfg.summarize.max_new_tokens == 64  # YAML kept
    assert cfg.input.limit == 5 and cfg.model.engine == "transformers"
    assert cfg.compute.batch_size == 16 and cfg.output == "x"


@pytest.mark.parametrize("vllm_installed", [True, False])
def test_the_demo_runs_with_the_transformers_engine_where_vllm_is_not_installed(vllm_installed, monkeypatch, caplog):
    # macOS: vLLM has no CPU build there, and scripts/setup.sh installs none; the README's first command must work.
    import importlib.util

    from pipeline.cli import demo_engine_here

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (find_spec(name, *a) if vllm_installed else None) if name == "vllm"
                        else find_spec(name, *a))

    def engines(*argv: str) -> tuple[str, str]:
        args = build_parser().parse_args(["demo", *argv])
        demo_engine_here(args)
        cfg = config_from_args(args, args.schema, args.flags)
        return cfg.generate.model.engine, cfg.evaluate.model.engine

    expected = ("vllm", "vllm") if vllm_installed else ("transformers", "transformers")
    assert engines() == expected
    assert ("the demo runs with the transformers engine" in caplog.text) == (not vllm_installed)
    # Asked for, an engine is kept whether or not vLLM is here (without it, the run then says vLLM is missing).
    assert engines("--engine", "vllm") == ("vllm", "vllm")
    assert engines("--engine", "transformers") == ("transformers", "transformers")
    assert engines("--set", "evaluate.model.engine=vllm") == ("vllm", "vllm")  # one set: both as configured


def test_a_config_file_that_cannot_be_read_is_a_one_line_error(tmp_path):
    """A mistyped --config printed Python's `[Errno 2] No such file or directory: '...'`; a file in another
    encoding (a Windows editor's Latin-1) ended the command with a UnicodeDecodeError traceback."""
    (tmp_path / "latin1.yaml").write_bytes("summarize:\n  # caf\xe9\n  num_candidates: 4\n".encode("latin-1"))
    for name, message in (("missing.yaml", "No such file or directory"), (".", "Is a directory"),
                          ("latin1.yaml", "not UTF-8 text (invalid continuation byte at byte 18)")):
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert str(err.value) == f"config file {tmp_path / name}: {message}"


def test_a_set_that_is_not_key_equals_yaml_is_a_one_line_error():
    """`--set 'judge.yes_words=[Yes'` ended the command with PyYAML's parser traceback (exit 1), and `--set =3`
    was reported as an unknown key named ``."""
    cases = {"summarize.num_candidates": "--set summarize.num_candidates: expected KEY=VALUE",
             "=3": "--set =3: expected KEY=VALUE",
             "judge.yes_words=[Yes": "--set judge.yes_words=[Yes: the value is not valid YAML (expected ',' or ']', "
                                     "but got '<stream end>'); quote a string",
             "output=@run": "--set output=@run: the value is not valid YAML (found character '@' that cannot "
                            "start any token); quote a string that starts with [, {, @ or `: --set 'output=\"...\"'"}
    for item, message in cases.items():
        with pytest.raises(ConfigError) as err:
            config_from_args(build_parser().parse_args(["generate", "--set", item]))
        assert str(err.value).startswith(message), str(err.value)
    args = build_parser().parse_args(["generate", "--set", 'output="@run"', "--set", "input.path=data/[2024]/x.jsonl"])
    cfg = config_from_args(args)
    assert (cfg.output, cfg.input.path) == ("@run", "data/[2024]/x.jsonl")


def test_bundled_configs_validate():
    from pipeline.config import WORKFLOWS

    for path in sorted((REPO / "configs").glob("*.yaml")):
        # configs/<workflow>[_variant].yaml; demo.yaml is the loop's
        workflow = "loop" if path.stem == "demo" else path.stem.split("_")[0]
        load_config(path, schema=WORKFLOWS[workflow])


def test_fingerprint_ignores_compute_but_not_the_model():
    base = fingerprint(load_config())
    assert fingerprint(load_config(overrides={"compute.batch_size": 99})) == base
    # two engines per GPU and another batch limit: same outputs, so a resumed run goes on
    assert fingerprint(load_config(overrides={"compute.num_gpus_per_actor": 0.5, "model.max_num_seqs": 512})) == base
    assert fingerprint(load_config(overrides={"model.dtype": "float16"}))["inverse"] != base["inverse"]
    changed = fingerprint(load_config(overrides={"model.path": "other"}))
    assert changed["preprocess"] == base["preprocess"] and changed["inverse"] != base["inverse"]
    only_select = fingerprint(load_config(overrides={"select.min_score": 0.5}))
    assert only_select["inverse"] == base["inverse"] and only_select["select"] != base["select"]


def test_config_changes_name_each_changed_key_for_a_refused_resume():
    old, new = stage_configs(load_config())["inverse"], stage_configs(load_config(overrides={
        "input.limit": 80, "model.path": "other", "compute.batch_size": 99}))["inverse"]
    assert config_changes(old, new) == ['input.limit: null -> 80', 'model.path: "embedded" -> "other"']
    assert config_changes(old, old) == []
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": [2]}}) == ["a.c: (no such key) -> [2]"]
    many = config_changes({f"k{i}": i for i in range(9)}, {f"k{i}": -i - 1 for i in range(9)})
    assert len(many) == 7 and many[0] == "k0: 0 -> -1" and many[-1] == "3 more"


def test_cli_reports_config_errors_before_any_work(capsys):
    from pipeline.cli import main

    assert main(["generate", "--set", "judge.yes_word=[Yes]"]) == 2
    assert "judge.yes_word: unknown config key" in capsys.readouterr().err


def test_every_config_key_is_in_the_readme_reference():
    import dataclasses

    from pipeline.config import WORKFLOWS, sections

    reference = (REPO / "README.md").read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    keys = []
    for schema in WORKFLOWS.values():
        parts = sections(schema)
        keys += [f"{s}.{f.name}" for s, cls in parts.items() for f in dataclasses.fields(cls)]
        keys += [f.name for f in dataclasses.fields(schema) if f.name not in parts]
    for key in keys:
        section, _, name = key.rpartition(".")
        # a row names `section.key`, or lists it after another key of its section: `section.a` / `b`
        assert f"`{key}`" in reference or (section and f"`{section}." in reference and f"`{name}`" in reference), key


def test_train_reads_the_original_corpus_with_generates_input_options(tmp_path):
    """`data.original` takes what `generate`'s input takes (an OSS-Instruct corpus spells its pair `problem` /
    `solution`); a bare path stands for {path: ...}, and `--original` (data.original.path) keeps the fields."""
    from pipeline.config import InputConfig, TrainConfig

    (tmp_path / "t.yaml").write_text("data:\n  original:\n    path: a.jsonl\n    instruction_field: problem\n"
                                     "    response_fields: [solution]\n")
    cfg = load_config(tmp_path / "t.yaml", {"data.original.path": "b.jsonl", "data.limit": 5}, schema=TrainConfig)
    assert cfg.data.original_input() == InputConfig(path="b.jsonl", instruction_field="problem",
                                                    response_fields=["solution"], limit=5)
    (tmp_path / "bare.yaml").write_text("data:\n  original: a.jsonl\n")
    cfg = load_config(tmp_path / "bare.yaml", {"data.original.split": "test"}, schema=TrainConfig)
    assert cfg.data.original_input() == InputConfig(path="a.jsonl", split="test")
    keys_then_path = {"data.original.instruction_field": "problem", "data.original": "c.jsonl"}
    assert load_config(overrides=keys_then_path, schema=TrainConfig).data.original == InputConfig(
        path="c.jsonl", instruction_field="problem")
    assert load_config(schema=TrainConfig).data.original_input() == InputConfig()  # the bundled corpus
    with pytest.raises(ConfigError, match=r"original.limit is not used: .* is data.limit"):
        load_config(overrides={"data.original.limit": 3}, schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"data.original.instruction_fild: unknown config key \(did you mean"):
        load_config(overrides={"data.original.instruction_fild": "x"}, schema=TrainConfig)


def test_an_output_inside_a_ray_jobs_working_dir_copy_is_refused(tmp_path, monkeypatch):
    """A Ray job submitted with a working_dir runs in Ray's temporary copy of it: a relative output (the default)
    would be written there and lost. Outside a job, and for absolute or s3:// outputs, nothing changes."""
    monkeypatch.chdir(tmp_path)
    for schema in (None, TrainConfig, EvaluateConfig, LoopConfig):
        load_config(schema=schema) if schema else load_config()  # not a job: relative outputs are fine
    job = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}'
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    for schema, default in ((TrainConfig, "outputs/train"), (EvaluateConfig, "outputs/evaluate"),
                            (LoopConfig, "outputs/loop")):
        with pytest.raises(ConfigError, match=rf"output: {default} is inside this Ray job's copy of its working_dir "
                                              rf"\({tmp_path}\), which Ray deletes"):
            load_config(schema=schema)
    with pytest.raises(ConfigError, match="output: . is inside"):
        load_config(overrides={"output": "."})
    for output in (str(tmp_path.parent / "runs" / "g"), "s3://bucket/runs/g"):
        assert load_config(overrides={"output": output}).output == output
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # a job without a working_dir
    assert load_config().output == "outputs/generate"


def test_version_names_the_package_and_the_libraries_it_runs_on(capsys):
    from importlib import metadata

    from pipeline.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    line = capsys.readouterr().out.strip()
    assert exited.value.code == 0 and "\n" not in line
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # tests run in a clone
    assert re.match(rf"inverse-instruct {re.escape(metadata.version('inverse-instruct'))} at {commit}(-dirty)? "
                    rf"\(python 3\.", line), line
    for name in ("ray", "torch", "transformers", "pyarrow"):
        assert f"{name} {metadata.version(name)}" in line


def test_ctrl_c_ends_a_command_with_the_shells_code_not_a_traceback(monkeypatch, capsys, tmp_path):
    """Before, Ctrl-C printed a KeyboardInterrupt traceback from wherever Ray Data was waiting, and exit 1."""
    import pipeline.generate
    from pipeline.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.generate, "generate", interrupted)
    assert main(["generate", "--output", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
