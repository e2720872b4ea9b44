"""The Ray instance a command runs on: engine actors its own instance can never hold are refused."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from pipeline import ray_setup
from pipeline.config import ConfigError, EvaluateConfig, LoopConfig, ModelConfig, TrainConfig, load_config
from pipeline.evaluate.run import evaluate
from pipeline.generate import generate
from pipeline.loop import run_loop
from pipeline.ray_setup import placements
from tests.test_generate import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def test_engine_actors_this_machine_cannot_hold_are_refused_not_waited_for(ray_local, tiny_model, tmp_path,
                                                                           monkeypatch):
    """On the job's own Ray instance (no cluster to grow) engine actors asking for more GPUs or CPUs than the
    machine has beside one CPU for Ray Data's read/write tasks were waited for forever (until 2026-12-06 generate
    and evaluate hung there: a GPU on a CPU machine; on 2 cores, 2 CPUs for one actor or min_actors=2)."""
    monkeypatch.setattr(ray_setup, "_own_instance", True)  # as if start_ray had started `ray_local`
    keys = r"compute.min_actors / num_gpus_per_actor / num_cpus_per_actor: "
    room = r" and one CPU for Ray Data's tasks do not fit this machine's Ray instance \(\{'CPU': 2.0"
    for more, actors in (({"compute.num_gpus_per_actor": 64}, r"1 x \{'CPU': 1.0, 'GPU': 64.0\}"),
                         ({"compute.num_cpus_per_actor": 2}, r"1 x \{'CPU': 2.0\}"),
                         ({"compute.min_actors": 2, "compute.max_actors": 2}, r"2 x \{'CPU': 1.0\}")):
        with pytest.raises(ConfigError, match=keys + r"engine actors \(" + actors + r"\)" + room):
            generate(load_config(overrides={**tiny_overrides(tiny_model, "embedded", tmp_path / "g"), **more}))
        with pytest.raises(ConfigError, match=keys + r"engine actors \(" + actors + r"\)" + room):
            evaluate(load_config(overrides={"model.path": tiny_model, "model.engine": "transformers", **more,
                                            "output": str(tmp_path / "e")}, schema=EvaluateConfig))
    # Counted per node: a bundle does not straddle nodes; fractions of a GPU add up.
    assert placements({"CPU": 1, "GPU": 0.25}, [{"CPU": 8.0, "GPU": 1.0}]) == 4
    assert placements({"CPU": 2, "GPU": 1}, [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 2.0}]) == 2
    assert placements({"CPU": 0.5, "multi_gpu": 0.125}, [{"CPU": 96.0}]) == 0
    assert placements({"CPU": 1}, [{"CPU": -1.0}]) == 0  # a node with no CPU left for an actor
    assert placements({"CPU": 0}, []) == sys.maxsize


def test_a_machine_without_vllm_is_told_so_in_one_line(ray_local, tiny_model, tmp_path, monkeypatch):
    """Until 2026-12-07 a pip install without the [cpu]/[gpu] extra ended `generate` in 300 lines of Ray
    tracebacks and a crashed actor (exit 1), after preprocess. Now: on the command's own instance a config
    error before any work; on a cluster the engine actor raises it where it starts (one line, exit 2)."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: `import vllm` fails, find_spec is None
    monkeypatch.setattr(ray_setup, "_own_instance", True)  # as if start_ray had started `ray_local`
    missing = r"model.engine: vllm is not installed on this machine \(pip install 'inverse-instruct\[gpu\]'"
    overrides = {**tiny_overrides(tiny_model, "embedded", tmp_path / "g"), "model.engine": "vllm"}
    with pytest.raises(ConfigError, match=missing):
        generate(load_config(overrides=overrides))
    assert not list((tmp_path / "g").glob("_stages/*"))  # no stage started
    with pytest.raises(ConfigError, match=missing):
        evaluate(load_config(overrides={"model.path": tiny_model, "output": str(tmp_path / "e")}, schema=EvaluateConfig))
    from pipeline.engines.vllm_engine import VLLMEngine

    with pytest.raises(ConfigError, match=missing):
        VLLMEngine(ModelConfig(), tiny_model)
    loop = {"train.model.path": tiny_model, "generate.model.path": tiny_model, "evaluate.model.engine": "transformers",
            "output": str(tmp_path / "l")}
    with pytest.raises(ConfigError, match="^generate." + missing):  # (generate's own check: after the folder)
        run_loop(load_config(overrides=loop, schema=LoopConfig))
    assert not (tmp_path / "l").exists()
    monkeypatch.setattr(ray_setup, "_own_instance", False)  # a cluster: its nodes may have vLLM where this has not
    ray_setup.check_engine_actors(load_config(overrides=overrides))


def test_a_model_path_missing_on_the_commands_own_instance_is_told_in_one_line(ray_local, tiny_model, tmp_path,
                                                                                  monkeypatch):
    """Until 2026-12-07 a mistyped local `--model` was left for the engine actors to find (it may exist on a
    cluster's nodes only): `evaluate` printed 238 lines of actor tracebacks before its error, and `generate`
    read and preprocessed the corpus first (exit 0 when no snippet reached the engine). On the command's own
    instance this machine is the only node: refused before any work."""
    monkeypatch.setattr(ray_setup, "_own_instance", True)  # as if start_ray had started `ray_local`
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=rf"model.path: {missing} does not exist on "):
        generate(load_config(overrides={**tiny_overrides(tiny_model, "embedded", tmp_path / "g"),
                                        "model.path": missing}))
    assert not list((tmp_path / "g").glob("_stages/*"))  # no stage started
    with pytest.raises(ConfigError, match=rf"model.path: {missing} does not exist on "):
        evaluate(load_config(overrides={"model.path": missing, "output": str(tmp_path / "e")}, schema=EvaluateConfig))
    with pytest.raises(ConfigError, match=rf"train.model.path: {missing} does not exist on "):
        run_loop(load_config(overrides={"train.model.path": missing, "output": str(tmp_path / "l")}, schema=LoopConfig))
    assert not (tmp_path / "l").exists()
    monkeypatch.setattr(ray_setup, "_own_instance", False)  # a cluster: the path may be on its nodes
    ray_setup.check_engine_actors(load_config(overrides={"model.path": missing, "model.engine": "transformers"}))


def test_training_with_lora_where_peft_is_missing_is_refused_before_any_work(ray_local, tiny_model, tmp_path,
                                                                             monkeypatch):
    """Until 2026-12-07 `train` without the [train] extra read and packed its data, started its workers and
    failed there (exit 1, a worker's traceback); `demo` did so after 7 minutes of generate."""
    from pipeline.train.trainer import train

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    monkeypatch.setattr(ray_setup, "_own_instance", True)  # as if start_ray had started `ray_local`
    missing = r"lora.enabled: peft is not installed on this machine \(pip install 'inverse-instruct\[train\]'"
    cfg = load_config(REPO / "configs" / "train_cpu.yaml", {"model.path": tiny_model, "output": str(tmp_path / "t")},
                      schema=TrainConfig)
    with pytest.raises(ConfigError, match="^" + missing):
        train(cfg)
    assert not list((tmp_path / "t").glob("*/*"))  # no data prepared, no checkpoint
    with pytest.raises(ConfigError, match="^train." + missing):  # demo.yaml trains with LoRA
        run_loop(load_config(REPO / "configs" / "demo.yaml", {"output": str(tmp_path / "loop")}, schema=LoopConfig))
    assert not (tmp_path / "loop" / "generate").exists()


def test_ray_data_warnings_that_say_nothing_to_the_user_are_shown_only_with_verbose(ray_local, monkeypatch):
    """Until 2026-12-07 a rerun printed five "[SaveMode=SaveMode.OVERWRITE] Replacing contents" warnings, and
    most 2-core runs "The Ray cluster currently does not have any available CPUs. The Dataset job will hang"
    (a free CPU looked for at one instant, while the last stage's tasks gave theirs back)."""
    def shown(logger: str, message: str) -> bool:
        record = logging.LogRecord(logger, logging.WARNING, __file__, 0, message, None, None)
        return bool(logging.getLogger(logger).filter(record))

    replacing = ("ray.data.datasource.file_datasink", "[SaveMode=SaveMode.OVERWRITE] Replacing contents /out/selected")
    no_cpus = ("ray.data.dataset", "Warning: The Ray cluster currently does not have any available CPUs. The "
                                   "Dataset job will hang unless more CPUs are freed up.")
    monkeypatch.setattr(ray_setup, "_own_instance", True)  # as if start_ray had started `ray_local`
    ray_setup.start_ray(None)
    assert not shown(*replacing) and not shown(*no_cpus)
    assert shown("ray.data.datasource.file_datasink", "Skipped writing empty block to /out/selected")
    ray_setup.start_ray(None, verbose=True)
    assert shown(*replacing) and shown(*no_cpus)
    monkeypatch.setattr(ray_setup, "_own_instance", False)  # a cluster: it may run out of CPUs for good
    ray_setup.start_ray(None)
    assert not shown(*replacing) and shown(*no_cpus)
