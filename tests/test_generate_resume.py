"""`generate` run again on the same --output: after a kill, with a larger input or another model.

What a user relies on: a rerun redoes nothing that is still good, never mixes two configs' or two models'
scores in one folder, and writes what one uninterrupted run of the final config would have written.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.generate import generate
from tests.process_tools import kill_session
from tests.test_generate import _cli, _cli_env, read, tiny_overrides

pytestmark = pytest.mark.slow


def test_resume_after_the_driver_is_killed(tiny_model, corpus_folder, tmp_path):
    env = _cli_env()

    # Reference: an uninterrupted run.
    full = tmp_path / "full"
    subprocess.run(_cli(tiny_model, corpus_folder, full), env=env, check=True, capture_output=True, timeout=600)

    # Kill the driver (and its whole process group, Ray with it) once some snippets are written.
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(tiny_model, corpus_folder, cut), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    scored = cut / "_work" / "scored"
    while time.time() < deadline and len(list(scored.glob("*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    kill_session(proc)  # the driver, the local Ray instance it started, Ray's workers
    assert not (cut / "_stages" / "inverse.json").exists()

    done = subprocess.run(_cli(tiny_model, corpus_folder, cut), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["resume"]["inverse_snippets_resumed"] >= 1
    assert manifest["resume"]["inverse_snippets_scored_now"] >= 1
    # Its progress lines count the snippets scored before the kill.
    resumed = manifest["resume"]["inverse_snippets_resumed"]
    assert re.search(rf"inverse: \d+ of {manifest['counts']['snippets']} snippets \(\d+\.\d%\) after \d+s "
                     rf"\({resumed} from an earlier run\); \d engines? up", done.stderr), done.stderr[-3000:]
    for folder, keys in (("candidates", ["id", "k"]), ("selected", ["id"]), ("rejected", ["id"])):
        assert read(cut / folder, keys) == read(full / folder, keys), folder


def test_a_large_input_writes_its_first_batches_at_once(tiny_model, corpus, tmp_path):
    """Each finished batch is a file at once: that is what a stopped run keeps. With ~7,000 snippets in
    batches of one, the input was cut into batches by one streamed task that held a CPU until it was done,
    and the 1-CPU writes waited for it (this machine has 2: the engine actor holds the other): minutes
    with snippets done and nothing written, all of it lost to a stop."""
    folder = tmp_path / "input"
    folder.mkdir()
    with open(folder / "large.jsonl", "w") as f:
        for variant in range(6):  # the bundled corpus six times, each copy's code made distinct
            for row in corpus:
                output = re.sub(r"(```[^\n]*\n)", rf"\g<1># variant {variant}\n", row["output"], count=1)
                f.write(json.dumps({"instruction": row["instruction"], "output": output}) + "\n")
    env = _cli_env()
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(_cli(tiny_model, folder, out), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        done = 0
        deadline = time.monotonic() + 400
        while done < 16 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            found = re.findall(r"inverse: ([\d,]+) of ([\d,]+) snippets", log.read_text())
            done = int(found[-1][0].replace(",", "")) if found else 0
        assert done >= 16, log.read_text()[-3000:]
        assert int(found[-1][1].replace(",", "")) > 6000  # the cut is long: many batches
        wait = time.monotonic() + 20  # a file is written a moment after its batch is done
        while not list((out / "_work" / "scored").glob("*.parquet")) and time.monotonic() < wait:
            time.sleep(0.5)
        assert list((out / "_work" / "scored").glob("*.parquet")), f"{done} snippets done, none written"
        assert len(read(out / "_work" / "scored", ["id"])) >= 1
    finally:
        kill_session(proc)


def test_another_model_at_the_same_path_is_not_mixed_into_a_run(ray_local, tiny_model, corpus_folder, tmp_path):
    """A model trained again into the folder a run used: the same command does not hand back (or resume
    with) the old model's scores; --overwrite redoes them. Before, the finished run was returned as is."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = load_config(overrides=tiny_overrides(str(model), corpus_folder, tmp_path / "run", **{"input.limit": 6}))
    first = generate(cfg)
    assert generate(cfg)["stages"] == first["stages"]  # same model: nothing redone
    weights = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in weights.parameters():
            p.mul_(1.5)
    weights.save_pretrained(model)
    with pytest.raises(ConfigError, match=r"`inverse` stage made with another model"):
        generate(cfg)
    again = generate(cfg, overwrite=True)
    assert again["stages"]["preprocess"] == first["stages"]["preprocess"]
    assert again["stages"]["inverse"]["finished_at"] != first["stages"]["inverse"]["finished_at"]
    assert again["all_rows_accounted_for"]


def test_a_larger_input_keeps_the_scores_of_the_snippets_it_had(ray_local, tiny_model, corpus_folder, tmp_path):
    """A run on a few rows first, then more rows in the same --output: only the new snippets are scored, and
    the folder ends as one run of the larger input would leave it. Another version of the input (a row's
    code edited) rescores that snippet alone. Until 2026-12-07 both were refused (use a new --output, or
    --overwrite and score every snippet again: GPU hours on a cluster)."""
    def config(output: Path, limit: int, folder: Path = corpus_folder):
        return load_config(overrides=tiny_overrides(tiny_model, folder, output, **{
            "input.limit": limit, "compute.batch_size": 1}))

    out = tmp_path / "run"
    small = generate(config(out, 8))
    # As a run killed while it rewrote _work/scored leaves it: some rows twice (see _keep_unchanged_scores).
    first = sorted((out / "_work" / "scored").glob("*.parquet"))[0]
    (first.parent / f"again-{first.name}").write_bytes(first.read_bytes())

    grown = generate(config(out, 16))
    assert grown["resume"] == {"inverse_snippets_resumed": small["counts"]["snippets"],
                               "inverse_snippets_scored_now": grown["counts"]["snippets"] - small["counts"]["snippets"],
                               "inverse_scores_dropped": 0}
    assert grown["resume"]["inverse_snippets_scored_now"] > 0
    assert grown["counts"]["scored_more_than_once"] == 0 and grown["all_rows_accounted_for"]
    reference = tmp_path / "reference"
    generate(config(reference, 16))
    for folder, keys in (("candidates", ["id", "k"]), ("selected", ["id"]), ("rejected", ["id"])):
        assert read(out / folder, keys) == read(reference / folder, keys), folder

    # The same files elsewhere, one snippet's code edited: that snippet is scored again, the others kept.
    edited = tmp_path / "edited"
    edited.mkdir()
    rows = [json.loads(line) for line in (corpus_folder / "real.jsonl").read_text().splitlines()]
    at = next(i for i, row in enumerate(rows[:16]) if "```python\n" in row["output"])
    rows[at]["output"] = rows[at]["output"].replace("```python\n", "```python\n# edited\n", 1)
    (edited / "real.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (edited / "zz_bad.jsonl").write_bytes((corpus_folder / "zz_bad.jsonl").read_bytes())
    again = generate(config(out, 16, edited))
    assert again["resume"] == {"inverse_snippets_resumed": grown["counts"]["snippets"] - 1,
                               "inverse_snippets_scored_now": 1, "inverse_scores_dropped": 1}
    scored = {row["id"]: row["code"] for row in read(out / "_work" / "scored", ["id"])}
    assert sorted(scored) == sorted(row["id"] for row in read(out / "snippets", ["id"]))
    assert sum(code.startswith("# edited\n") for code in scored.values()) == 1

    # Scoring with another config is still refused, naming only what decides the scores.
    with pytest.raises(ConfigError, match=r"`inverse` stage made with a different config "
                                          r"\(summarize\.temperature: 0\.8 -> 0\.5\); use a new --output"):
        generate(load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out, **{
            "input.limit": 20, "compute.batch_size": 1, "summarize.temperature": 0.5})))


def test_input_files_changed_since_a_run_are_read_by_the_same_command(ray_local, tiny_model, corpus, tmp_path,
                                                                        caplog):
    """A file added to the input folder (or one replaced) after a run: the same command reads it and scores
    only its new snippets. Until 2026-12-07 the finished preprocess stage was skipped and the new rows were
    silently never read."""
    folder, out = tmp_path / "input", tmp_path / "run"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus[:8]))
    cfg = load_config(overrides=tiny_overrides(tiny_model, folder, out))
    first = generate(cfg)
    assert generate(cfg)["stages"] == first["stages"]  # nothing changed: nothing redone

    (folder / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus[8:14]))
    with caplog.at_level("INFO", logger="pipeline.generate"):
        grown = generate(cfg)
    assert "input: its files changed since the last run" in caplog.text
    assert grown["counts"]["input"] == 14 and grown["all_rows_accounted_for"]
    assert grown["resume"]["inverse_snippets_resumed"] == first["counts"]["snippets"]
    assert grown["resume"]["inverse_snippets_scored_now"] == grown["counts"]["snippets"] - first["counts"]["snippets"] > 0

    # b.jsonl replaced by a version with one snippet's code edited: that snippet alone is scored again.
    rows = corpus[8:14]
    at = next(i for i, row in enumerate(rows) if "```python\n" in row["output"])
    rows = [*rows[:at], {**rows[at], "output": rows[at]["output"].replace("```python\n", "```python\n# v2\n", 1)},
            *rows[at + 1:]]
    (folder / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    replaced = generate(cfg)
    assert replaced["resume"] == {"inverse_snippets_resumed": grown["counts"]["snippets"] - 1,
                                  "inverse_snippets_scored_now": 1, "inverse_scores_dropped": 1}
