"""A train output folder resumes only its own run (`pipeline/train/trainer.py`'s `claim_output`): Ray Train
restores the latest checkpoint by run name, so another config, base model or data in that folder is refused
(or, with --overwrite, started afresh)."""

from __future__ import annotations

import json

import pytest

from tests.test_train_trainer import CPU_CONFIG


def test_an_output_folder_resumes_only_its_own_config(tmp_path):
    """Ray Train restores the latest checkpoint by run name: a different config in the same folder would
    get the old run (or its finished model) back, so it is refused; --overwrite starts afresh. A run that
    never reached training leaves nothing to protect."""
    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.output import OutputDir
    from pipeline.train.trainer import RUN_NAME, claim_output

    out = OutputDir(str(tmp_path))
    typo = load_config(CPU_CONFIG, {"data.original": "/no/such/corpus.jsonl"}, schema=TrainConfig)
    claim_output(out, typo, overwrite=False)  # a run that failed before any training (its data unreadable)
    cfg = load_config(CPU_CONFIG, schema=TrainConfig)
    claim_output(out, cfg, overwrite=False)  # so the corrected command takes the folder
    (tmp_path / RUN_NAME / "step_000005").mkdir(parents=True)
    claim_output(out, load_config(CPU_CONFIG, {"compute.num_workers": 1},
                                  schema=TrainConfig), overwrite=False)  # cluster shape: same run, resumable
    claim_output(out, load_config(CPU_CONFIG, {"data.original": "embedded"},
                                  schema=TrainConfig), overwrite=False)  # the default corpus, named: the same run
    assert (tmp_path / RUN_NAME / "step_000005").exists()
    changed = load_config(CPU_CONFIG, {"optim.lr": 1e-3}, schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"run of another config \(optim\.lr: 0\.0002 -> 0\.001\); use a new"):
        claim_output(out, changed, overwrite=False)
    claim_output(out, changed, overwrite=True)
    assert not (tmp_path / RUN_NAME).exists()
    claim_output(out, changed, overwrite=False)  # now it is this config's folder


def test_a_base_model_trained_again_into_its_folder_is_another_run(tiny_model, tmp_path):
    """Same config and model.path, other weights there: the finished run is not handed back."""
    import shutil

    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.output import OutputDir
    from pipeline.train.trainer import RUN_NAME, claim_output

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    out = OutputDir(str(tmp_path / "train"))
    cfg = load_config(CPU_CONFIG, {"model.path": str(base)}, schema=TrainConfig)
    claim_output(out, cfg, overwrite=False)
    (tmp_path / "train" / RUN_NAME).mkdir()
    claim_output(out, cfg, overwrite=False)  # same weights: resumable
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[:-4096] + bytes(4096))  # other values, same size
    with pytest.raises(ConfigError, match="another model at model.path"):
        claim_output(out, cfg, overwrite=False)


def test_an_original_corpus_whose_files_changed_is_another_run(corpus, tmp_path):
    """Same config and data.original path, other rows in its files: the finished run is not handed back
    (until 2026-12-07 the same command returned the model trained on the old rows). The same for pairs in
    data.generated that no generate run wrote (a folder of files)."""
    from dataclasses import replace

    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.output import OutputDir
    from pipeline.train.trainer import RUN_NAME, claim_output

    original = tmp_path / "original.jsonl"
    original.write_text("".join(json.dumps(row) + "\n" for row in corpus[:10]))
    out = OutputDir(str(tmp_path / "train"))
    cfg = load_config(CPU_CONFIG, {"data.original": str(original)}, schema=TrainConfig)
    claim_output(out, cfg, overwrite=False)
    (tmp_path / "train" / RUN_NAME).mkdir()
    claim_output(out, cfg, overwrite=False)  # the same files: resumable
    original.write_text("".join(json.dumps(row) + "\n" for row in corpus[:20]))
    with pytest.raises(ConfigError, match=r"holds a training run of another original corpus \(the files of "
                                          r"data.original changed since\); use a new --output"):
        claim_output(out, cfg, overwrite=False)
    claim_output(out, cfg, overwrite=True)
    assert not (tmp_path / "train" / RUN_NAME).exists()
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "a.jsonl").write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    cfg = load_config(CPU_CONFIG, {"data.original": str(original), "data.generated": str(pairs)}, schema=TrainConfig)
    claim_output(out, cfg, overwrite=True)
    (tmp_path / "train" / RUN_NAME).mkdir()
    claim_output(out, cfg, overwrite=False)  # the same files: resumable
    (pairs / "b.jsonl").write_text(json.dumps({"instruction": "c", "response": "d"}) + "\n")
    with pytest.raises(ConfigError, match=r"a training run of other generated pairs \(the files of data.generated"):
        claim_output(out, cfg, overwrite=False)
    with pytest.raises(ConfigError, match=r"output \(.*/pairs/train\) is inside data.generated"):  # it would stamp itself
        claim_output(OutputDir(str(pairs / "train")), replace(cfg, output=str(pairs / "train")), overwrite=False)


def test_a_run_on_generated_pairs_resumes_only_while_their_generate_run_has_not_selected_again(tmp_path):
    """The same config and data.generated path, but the generate run there selected its pairs again (a loop
    rerun after a select config change): the finished training is of other pairs, so it is refused."""
    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.output import OutputDir
    from pipeline.train.trainer import RUN_NAME, claim_output

    marker = tmp_path / "generate" / "_stages" / "select.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"finished_at": "2026-12-06T05:00:00+00:00"}))
    out = OutputDir(str(tmp_path / "train"))
    cfg = load_config(CPU_CONFIG, {"data.generated": str(tmp_path / "generate" / "selected")}, schema=TrainConfig)
    claim_output(out, cfg, overwrite=False)
    (tmp_path / "train" / RUN_NAME).mkdir()
    claim_output(out, cfg, overwrite=False)  # same pairs: resumable
    marker.write_text(json.dumps({"finished_at": "2026-12-06T06:00:00+00:00"}))
    with pytest.raises(ConfigError, match="other generated pairs"):
        claim_output(out, cfg, overwrite=False)
    claim_output(out, cfg, overwrite=True)
    assert not (tmp_path / "train" / RUN_NAME).exists()
