"""`quickstart.py` wires its stages in order: every folder a stage or its config file names was made by an
earlier stage, and the report evaluates every model the stages trained. (CI runs the Fashion-MNIST study end to
end, which drives the same stage runner and scripts; this test keeps the quickstart's own wiring checked.)"""

from __future__ import annotations

import dataclasses
import re

import quickstart

FOLDER = re.compile(rf"{quickstart.OUT.as_posix()}/(\w+)")


def named_folders(stage) -> set[str]:
    """The `runs/quickstart/<folder>` names in a stage's arguments and in the config its script runs with."""
    text = " ".join(stage.args) + " " + str(dataclasses.asdict(stage.resolved(1.0)))
    return set(FOLDER.findall(text))


def test_every_stage_reads_only_folders_that_earlier_stages_made():
    stages = quickstart.stages()
    names = [stage.name for stage in stages]
    assert len(set(names)) == len(names) and names[-1] == "report"
    made: set[str] = set()
    for stage in stages:
        read = named_folders(stage) - {stage.name, "token_cache", "eval_cache"}  # caches, not stages
        assert read <= made, f"{stage.name} reads {sorted(read - made)} before any stage makes them"
        made.add(stage.name)


def test_the_report_evaluates_every_trained_tokenizer_and_prior():
    stages = quickstart.stages()
    evaluated = named_folders(stages[-1])
    trained = {stage.name for stage in stages[:-1] if stage.resumable}  # the training stages
    assert trained <= evaluated, f"not evaluated: {sorted(trained - evaluated)}"
