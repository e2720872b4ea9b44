"""The loop's own logic (the whole loop runs for real in tests/test_demo.py): its report and early checks."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, LoopConfig, load_config
from pipeline.loop import _scores, before_after_rows, render_report, run_loop


def summary(passed: int, plus: int | None = None) -> dict:
    s = {"pass@1": passed / 4, "counts": {"passed": passed, "problems": 4}}
    if plus is not None:
        s["pass@1_plus"], s["counts"]["plus"] = plus / 4, {"passed": plus}
    return s


def manifest(evaluate: dict) -> dict:
    return {"generate": {"counts": {"input": 8, "snippets": 6, "candidates": 60, "selected": 5, "rejected": 3}},
            "train": {"steps": 2, "phases": ["generated", "original"], "loss": {"first": 1.0, "last": 0.5},
                      "throughput": {"tokens_per_s": 100.0}, "report": "r.md", "model": "m"},
            "evaluate": evaluate, "seconds": {"generate": 1.0}}


def test_before_after_table_has_an_evalplus_row_when_there_are_plus_scores():
    m = manifest({"humaneval": {"base": _scores(summary(1, 0), "b"), "tuned": _scores(summary(2, 1), "t")},
                  "mbpp": {"base": _scores(summary(0), "b"), "tuned": _scores(summary(3), "t")}})
    assert before_after_rows(m) == [("humaneval", "0.250 (1/4)", "0.500 (2/4)", "4"),
                                    ("humaneval+", "0.000 (0/4)", "0.250 (1/4)", "4"),
                                    ("mbpp", "0.000 (0/4)", "0.750 (3/4)", "4")]
    assert "| humaneval+ | 0.000 (0/4) | 0.250 (1/4) | 4 |" in render_report(m)
    assert "| benchmark | base model | tuned model | problems |" in render_report(m)


def test_the_model_generate_ran_is_evaluated_too_where_it_is_not_the_base_model():
    """The paper's setting: an instruction-tuned model (trained from the base on the original corpus) generates,
    and the base model is fine-tuned. The model to beat is that generator; the raw base model alone made the
    before/after table compare the tuned model with one that follows no instruction format."""
    from pipeline.loop import loop_models

    paper = load_config(overrides={"generate.model.path": "ise-uiuc/Magicoder-S-DS-6.7B",
                                   "train.model.path": "deepseek-ai/deepseek-coder-6.7b-base"}, schema=LoopConfig)
    assert loop_models(paper, "out/train/model") == {"base": "deepseek-ai/deepseek-coder-6.7b-base",
                                                     "generator": "ise-uiuc/Magicoder-S-DS-6.7B",
                                                     "tuned": "out/train/model"}
    assert loop_models(load_config(schema=LoopConfig), "m") == {"base": "embedded", "tuned": "m"}  # the demo's
    m = manifest({"humaneval": {"base": _scores(summary(0), "b"), "generator": _scores(summary(2), "g"),
                                "tuned": _scores(summary(3), "t")}})
    report = render_report(m)
    assert "| benchmark | base model | generate's model | tuned model | problems |\n|---|---|---|---|---|" in report
    assert "| humaneval | 0.000 (0/4) | 0.500 (2/4) | 0.750 (3/4) | 4 |" in report


def test_a_bad_evalplus_file_fails_before_generate(tmp_path):
    cfg = load_config(overrides={"output": str(tmp_path / "loop"),
                                 "evaluate.benchmark.plus_path": str(tmp_path / "HumanEvalPlus.jsonl")},
                      schema=LoopConfig)
    with pytest.raises(ConfigError, match="benchmark.plus_path: cannot read"):
        run_loop(cfg)
    assert not (tmp_path / "loop").exists()


def test_a_mistyped_corpus_path_fails_before_generate(tmp_path):
    """train's original corpus was first read after the whole generate step: a typo there cost that step."""
    for key in ("generate.input.path", "train.data.original.path"):
        cfg = load_config(overrides={"output": str(tmp_path / "loop"), key: str(tmp_path / "typo.jsonl")},
                          schema=LoopConfig)
        with pytest.raises(ConfigError, match=f"^{key}: {tmp_path}/typo.jsonl does not exist$"):
            run_loop(cfg)
        assert not (tmp_path / "loop").exists()


def test_an_evaluation_is_reused_only_for_its_config_and_the_tuned_model_only_if_newer_than_it():
    from pipeline.config import EvaluateConfig, to_dict
    from pipeline.loop import _still_valid

    cfg = EvaluateConfig(output="e")
    done = {"config": to_dict(cfg), "started_at": "2026-12-06T05:10:34.115310+00:00"}
    assert _still_valid(done, cfg, trained=None)  # the base model
    assert not _still_valid(None, cfg, trained=None)
    assert not _still_valid(done, EvaluateConfig(output="e", model={"path": "other"}), trained=None)
    assert _still_valid(done, cfg, {"finished_at": "2026-12-06T05:10:33+00:00"})
    assert not _still_valid(done, cfg, {"finished_at": "2026-12-06T05:11:00+00:00"})  # retrained since
    assert not _still_valid(done, cfg, {})  # a train manifest that does not say when its model was written


def test_train_reads_the_corpus_generate_read_unless_given_its_own(tiny_model, tmp_path, monkeypatch):
    """The paper fine-tunes on the generated pairs and the ORIGINAL corpus, the one whose responses were
    summarized: a loop on another corpus (with its own field names) trained on the bundled one."""
    import pipeline.generate
    import pipeline.train.trainer
    from pipeline.config import InputConfig

    seen = {}

    def fake_train(cfg, **_):
        seen["original"] = cfg.data.original_input()
        raise KeyboardInterrupt  # stop the loop there

    monkeypatch.setattr(pipeline.generate, "generate", lambda cfg, **_: {"counts": {}})
    monkeypatch.setattr(pipeline.train.trainer, "train", fake_train)
    (tmp_path / "oss.jsonl").write_text('{"problem": "Add two numbers.", "solution": "def add(a, b): return a + b"}\n')
    corpus = {"generate.input.path": str(tmp_path / "oss.jsonl"), "generate.input.instruction_field": "problem",
              "generate.input.response_fields": ["solution"], "generate.input.limit": 40,
              "train.model.path": str(tiny_model), "train.data.limit": 16, "output": str(tmp_path / "loop")}
    with pytest.raises(KeyboardInterrupt):
        run_loop(load_config(overrides=corpus, schema=LoopConfig))
    assert seen["original"] == InputConfig(path=str(tmp_path / "oss.jsonl"), instruction_field="problem",
                                           response_fields=["solution"], limit=16)
    with pytest.raises(KeyboardInterrupt):
        run_loop(load_config(overrides={**corpus, "train.data.original": "embedded"}, schema=LoopConfig))
    assert seen["original"] == InputConfig(path="embedded", limit=16)


def test_the_command_prints_a_column_per_evaluated_model(monkeypatch, capsys):
    """`inverse-instruct loop` prints the before/after table: with generate's model as a third column it
    unpacked each row into four values and ended in a ValueError after the whole loop had run."""
    import argparse

    import pipeline.loop
    from pipeline.cli import run_loop as run_loop_command

    m = manifest({"humaneval": {"base": _scores(summary(0), "b"), "generator": _scores(summary(2), "g"),
                                "tuned": _scores(summary(3), "t")}})
    monkeypatch.setattr(pipeline.loop, "run_loop", lambda cfg, **_: m)
    assert run_loop_command(LoopConfig(), argparse.Namespace(overwrite=False, verbose=False)) == 0
    out = capsys.readouterr().out
    assert "benchmark | base model pass@1 | generate's model pass@1 | tuned model pass@1" in out
    assert "humaneval | 0.000 (0/4)       | 0.500 (2/4)             | 0.750 (3/4)" in out


def test_each_model_is_evaluated_in_the_prompt_format_it_ran_or_was_trained_in(tiny_model, tmp_path, monkeypatch):
    """The paper's generate config asks its model in Magicoder's format (`generate.model.prompt_format`); with
    evaluate's `auto` that model was evaluated in its tokenizer's chat template, if it has one, and so was a
    model trained in another format than `auto` gives."""
    import pipeline.evaluate.run
    import pipeline.generate
    import pipeline.train.trainer

    formats, trusted, asked = {}, {}, []

    def fake_evaluate(cfg, **kwargs):
        asked.append((kwargs["overwrite"], kwargs["replace_stale"]))
        formats[cfg.output.rsplit("/", 1)[-1]] = cfg.model.prompt_format
        trusted[cfg.output.rsplit("/", 1)[-1]] = cfg.model.trust_remote_code
        return summary(1)

    trained = {"outputs": {"model": str(tmp_path / "tuned"), "report": "r.md"}, "steps": 1, "phases": ["generated"],
               "loss": {"first": 1.0, "last": 0.5}, "throughput": {"tokens_per_s": 1.0}}
    monkeypatch.setattr(pipeline.generate, "generate", lambda cfg, **_: {"counts": {}})
    monkeypatch.setattr(pipeline.train.trainer, "train", lambda cfg, **_: trained)
    monkeypatch.setattr(pipeline.evaluate.run, "evaluate", fake_evaluate)
    monkeypatch.setattr("pipeline.loop.render_report", lambda m: "")
    paper = {"generate.model.path": "ise-uiuc/Magicoder-S-DS-6.7B", "generate.model.prompt_format": "magicoder",
             "generate.model.trust_remote_code": True,
             "train.model.path": str(tiny_model), "train.model.prompt_format": "chat", "output": str(tmp_path)}
    loop = run_loop(load_config(overrides=paper, schema=LoopConfig))
    assert loop["train"]["original"] == "embedded"  # the corpus generate read, named in the loop's manifest
    assert formats == {"eval-base-humaneval": "chat", "eval-generator-humaneval": "magicoder",
                       "eval-tuned-humaneval": "chat"}
    assert trusted == {"eval-base-humaneval": False, "eval-generator-humaneval": True, "eval-tuned-humaneval": False}
    assert asked == [(False, True)] * 3  # no summary there: resume a stopped evaluation of this config, or replace it
    run_loop(load_config(overrides={**paper, "evaluate.model.prompt_format": "magicoder"}, schema=LoopConfig))
    assert set(formats.values()) == {"magicoder"}  # evaluate's own setting wins
