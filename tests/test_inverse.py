"""The fused actor on the transformers engine and the tiny model: shapes, rejections, error containment."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, GenerateConfig, ModelConfig, SummarizeConfig
from pipeline.engines import EngineDead
from pipeline.engines.hf_engine import HFEngine
from pipeline.inverse import SCORED_SCHEMA, InverseInstruct
from pipeline.prompts import PREFIXES

MAX_LEN = 512


@pytest.fixture(scope="module")
def cfg(tiny_model) -> GenerateConfig:
    return GenerateConfig(model=ModelConfig(path=tiny_model, engine="transformers", dtype="float32",
                                            max_model_len=MAX_LEN),
                          summarize=SummarizeConfig(num_candidates=3, max_new_tokens=6))


@pytest.fixture(scope="module")
def engine(cfg):
    return HFEngine(cfg.model, cfg.model.path)


def batch(codes: list[str]) -> pa.Table:
    n = len(codes)
    return pa.table({"id": [f"s{i}" for i in range(n)], "source": ["t"] * n, "source_index": list(range(n)),
                     "code": codes, "lang": ["python"] * n})


def test_k_scored_candidates_per_snippet(cfg, engine):
    out = InverseInstruct(cfg, engine=engine)(batch(["def add(a, b):\n    return a + b", "print('hi')"]))
    assert out.schema == SCORED_SCHEMA
    for row in out.to_pylist():
        assert row["reason"] is None and len(row["instructions"]) == len(row["scores"]) == 3
        assert all(text.startswith(PREFIXES) for text in row["instructions"])
        assert all(0.0 <= s <= 1.0 for s in row["scores"])


def test_same_snippet_same_candidates_whatever_the_batch(cfg, engine):
    actor = InverseInstruct(cfg, engine=engine)
    alone = actor(batch(["x = [i * i for i in range(10)]"])).to_pylist()[0]
    together = actor(batch(["x = [i * i for i in range(10)]", "y = 2"])).to_pylist()[0]
    assert alone["instructions"] == together["instructions"]
    assert alone["scores"] == pytest.approx(together["scores"], abs=1e-5)


def test_over_long_code_is_rejected_and_the_rest_proceeds(cfg, engine):
    out = InverseInstruct(cfg, engine=engine)(batch(["y = 2", "z = 3\n" * 400])).to_pylist()
    assert out[0]["reason"] is None
    assert out[1]["reason"] == "prompt too long" and f"model.max_model_len={MAX_LEN}" in out[1]["detail"]
    assert out[1]["instructions"] == [] and out[1]["scores"] == []


class FailsOnOneCode(HFEngine):
    """The real engine, except that prompts containing a marker raise (a bad row) or kill it (a dead engine)."""

    def __init__(self, base: HFEngine, marker: str, error: type[Exception]) -> None:
        self.__dict__.update(base.__dict__)
        self.marker_ids = base.tokenizer(marker, add_special_tokens=False)["input_ids"]
        self.error = error

    def sample(self, prompts, spec, seeds):
        for p in prompts:
            if any(p[i:i + len(self.marker_ids)] == self.marker_ids for i in range(len(p))):
                raise self.error("cannot handle this prompt")
        return super().sample(prompts, spec, seeds)


def test_an_engine_error_rejects_only_its_row(cfg, engine):
    actor = InverseInstruct(cfg, engine=FailsOnOneCode(engine, "QQQZZZ", ValueError))
    out = actor(batch(["a = 1", "b = 'QQQZZZ'", "c = 3"])).to_pylist()
    assert [r["reason"] for r in out] == [None, "engine error", None]
    assert "ValueError: cannot handle this prompt" in out[1]["detail"]
    assert all(not math.isnan(s) for s in out[0]["scores"] + out[2]["scores"])


def test_a_dead_engine_fails_the_batch_instead_of_rejecting_rows(cfg, engine):
    actor = InverseInstruct(cfg, engine=FailsOnOneCode(engine, "QQQZZZ", EngineDead))
    with pytest.raises(EngineDead):
        actor(batch(["a = 1", "b = 'QQQZZZ'"]))


def test_judge_words_must_be_single_tokens(cfg, engine):
    bad = GenerateConfig(model=cfg.model, judge={"yes_words": ["Absolutely certainly"], "no_words": ["No"]})
    with pytest.raises(ConfigError, match="judge.yes_words"):
        InverseInstruct(bad, engine=engine)


def test_an_actor_on_a_node_that_does_not_see_the_output_stops_before_loading_its_model(cfg, tmp_path):
    """What each engine actor of a run checks first: the stage's marker file (with the run's token) is visible
    on its node. A GPU node that joined the cluster without the driver's local output folder would otherwise
    score its batches and write them where no one reads them."""
    marker = tmp_path / "inverse.started.json"
    marker.write_text('{"token": "run-1"}')
    with pytest.raises(ConfigError, match="is not visible from node .*it holds another run's files"):
        InverseInstruct(cfg, output_marker=(str(marker), "run-2"))  # engine=None: it would load one


def test_each_snippet_counts_as_summarized_before_its_batch_is_done(cfg, engine, ray_local):
    """The progress lines moved only when a whole batch was done: a demo on a laptop said `0 of 18 snippets`
    for 6 minutes. Each snippet is now told to the ledger once its candidates are written."""
    import ray

    from pipeline.crash_isolation import CrashLedger

    class Recording(CrashLedger):
        def __init__(self) -> None:
            CrashLedger.__init__(self)
            self.told: list[tuple[list[str], tuple[int, int, int]]] = []

        def summarized_now(self, ids: list[str]) -> None:
            CrashLedger.summarized_now(self, ids)
            self.told.append((ids, self.progress()))

        def log(self) -> list[tuple[list[str], tuple[int, int, int]]]:
            return self.told

    ledger = ray.remote(Recording).remote()
    scorer = InverseInstruct(cfg, engine=engine, crash_ledger=ledger)
    scorer(batch(["def add(a, b):\n    return a + b", "print('hi')", "x = [i * i for i in range(9)]"]))
    # (rows done, engines up, summarized) as each was told: the batch was not done, its snippets were counted
    assert ray.get(ledger.log.remote()) == [(["s0"], (0, 1, 1)), (["s1"], (0, 1, 2)), (["s2"], (0, 1, 3))]
    assert ray.get(ledger.progress.remote()) == (3, 1, 0)  # done: counted once, as done
    ray.kill(ledger)
