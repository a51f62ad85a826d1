"""Every command and code block of README.md and docs/*.md (not the generated docs/study_*/ reports) is exercised.

- Shell commands (```bash / ```sh / ```console blocks, and `$ ` lines of ```text transcripts): the script or
  module exists, every `--flag` is one its argparse lists (`--help`, the launcher's too), and every
  `section.key=value` names a real config key of the command's `--config` file (loaded, nothing trained).
- Each command is matched in COVERAGE to the test that runs it for real, or to the reason it cannot run here;
  a renamed test fails.
- Transcripts (`$ command` then its output) are run here and must print exactly what the page shows.
- ```python blocks run in a subprocess against tiny models saved where the block loads them.
- The install and test commands of the README are the ones `.ci/run` runs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # docs/study_*/ are generated: not here
SHELL_BLOCKS = ("bash", "sh", "console")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*=", re.IGNORECASE)
LAUNCHERS = ("torchrun", "deepspeed")

# Command prefix (after leading VAR=value assignments) -> the test that runs it for real, or why it only gets
# the syntax check here. The longest matching prefix wins; every command must match one.
COVERAGE = {
    "python train_tokenizer.py": "tests/test_training.py::test_resume_equals_uninterrupted_run",
    "python train_tokenizer.py --config configs/1d_tiny.yaml train.trackers=[jsonl,tensorboard]":
        "tests/test_tracking.py::test_tokenizer_run_writes_tensorboard_events",
    "python train_tokenizer.py --config configs/1d_256.yaml --plan":
        "tests/test_docs_commands.py::test_transcripts_print_what_the_page_shows",
    "torchrun --nproc_per_node 2 train_tokenizer.py":
        "tests/test_distributed_training.py::test_two_rank_run_killed_with_sigkill_resumes_exactly",
    "torchrun --nnodes": "several nodes",
    "deepspeed train_tokenizer.py --config configs/1d_256.yaml": "the ImageNet 256 recipe: a node of GPUs",
    "deepspeed train_prior.py --config configs/1d_256.yaml": "the ImageNet 256 recipe: a node of GPUs",
    "deepspeed --hostfile": "several nodes",
    "python train_prior.py": "tests/test_prior_train.py::test_one_process_deepspeed_run_learns",
    "python train_prior.py --config configs/1d_256.yaml --plan":
        "tests/test_docs_commands.py::test_transcripts_print_what_the_page_shows",
    "deepspeed --num_gpus 2 train_prior.py":
        "tests/test_mini_recipe.py::test_miniature_recipe_runs_from_the_docs_on_two_ranks",
    "python export_parquet.py": "tests/test_mini_recipe.py::test_miniature_recipe_runs_from_the_docs_on_two_ranks",
    "python evaluate.py": "tests/test_evaluate.py::test_report_files_schema_and_error_rows",
    "python evaluate.py --config configs/eval_tiny.yaml eval.fid_classifier=runs/fid_backbone":
        "tests/test_evaluate.py::test_a_saved_classifier_is_the_backbone_of_every_rerun",
    "python train_classifier.py":
        "tests/test_train_classifier.py::test_a_saved_classifier_is_a_teacher_and_its_seed_makes_another_network",
    "python train_bpe.py --tokenizer":
        "tests/test_bpe_io.py::test_cli_trains_on_a_tokenizers_codes_of_a_configs_images",
    "python train_bpe.py --codes": "tests/test_bpe_io.py::test_cli_trains_saves_and_prints_stats",
    "python image_codec.py": "tests/test_codec.py::test_round_trip_across_processes",
    "python quickstart.py": "8.5 to 22.5 minutes; its stages: tests/test_quickstart.py",
    "python study.py": "1 to 2 hours; the reduced form runs in .ci/run (test_the_reduced_study_is_the_one_ci_runs)",
    "python benchmarks/": "timing runs of minutes, run alone",
    "bash benchmarks/gpu_smoke.sh": "needs CUDA, or minutes on CPU ranks",
    "apt-get install": ".ci/run installs it (test_the_readme_installs_and_tests_as_ci_does)",
    "pip install": ".ci/run installs it (test_the_readme_installs_and_tests_as_ci_does)",
    "python -m pytest": "the suite itself, as .ci/run runs it (test_the_readme_installs_and_tests_as_ci_does)",
    "tensorboard --logdir": "a server for a browser",
}


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # one logical line, continuations joined, comment dropped
    output: str | None = None  # a transcript's expected output

    @property
    def argv(self) -> list[str]:
        words = shlex.split(self.text)
        while words and ENV.match(words[0]):
            words.pop(0)
        return words

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block of a page."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((opening.group(1), i + 2, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


def logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    """Lines of a shell block with `\\` continuations joined and comments dropped, numbered as on the page."""
    out, pending, start = [], "", first
    for number, line in enumerate(body.splitlines(), first):
        if not pending:
            start = number
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending, comments=True)  # drops a trailing `# ...`
        if words:
            out.append((start, shlex.join(words)))
        pending = ""
    return out


def page_commands() -> list[Command]:
    commands = []
    for path in PAGES:
        page = str(path.relative_to(REPO))
        for language, first, body in fenced_blocks(path):
            if language in SHELL_BLOCKS:
                commands += [Command(page, line, text) for line, text in logical_lines(body, first)]
            elif language == "text" and body.startswith("$ "):
                for chunk in re.split(r"\n(?=\$ )", body):
                    head, _, output = chunk.partition("\n")
                    commands.append(Command(page, first + body[: body.index(chunk)].count("\n"), head[2:],
                                            output.rstrip("\n") + "\n"))
    return commands


def python_blocks() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(REPO)}:{first}", body) for path in PAGES
            for language, first, body in fenced_blocks(path) if language == "python"]


COMMANDS = page_commands()


def test_the_pages_have_commands_to_check():
    readme = [c for c in COMMANDS if c.page == "README.md"]
    assert len(readme) >= 8 and len({c.page for c in COMMANDS}) >= 5, [str(c) for c in COMMANDS]
    assert python_blocks(), "no ```python block found in README.md or docs/"


# --- coverage -------------------------------------------------------------------------------------------------

def matching_prefixes(command: Command) -> list[str]:
    text = " ".join(command.argv)
    return [prefix for prefix in COVERAGE if text == prefix or text.startswith(prefix + " ")
            or (prefix.endswith("/") and text.startswith(prefix))]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_is_covered(command):
    assert matching_prefixes(command), f"{command}: add it to COVERAGE (the test that runs it, or why not here)"


def test_every_coverage_entry_names_an_existing_test_or_a_reason_and_is_used():
    used = {max(prefixes, key=len) for prefixes in map(matching_prefixes, COMMANDS) if prefixes}
    assert set(COVERAGE) == used, f"entries no command uses: {sorted(set(COVERAGE) - used)}"
    for node in (how for how in COVERAGE.values() if how.startswith("tests/")):
        file, _, name = node.partition("::")
        path = REPO / file
        assert path.is_file() and re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE), f"no test {node}"


# --- syntax: scripts, flags, config keys ------------------------------------------------------------------------

def captured_run(target: str, argv: list[str], module: bool = False) -> str:
    """stdout of `python target argv` (or `python -m target`) run in this process, which must exit 0."""
    out = io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *argv]
    if not module:
        sys.path[:0] = [str((REPO / target).parent), str(REPO)]  # as `python script.py` sets sys.path[0]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            runpy.run_module(target, run_name="__main__") if module else runpy.run_path(str(REPO / target),
                                                                                       run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    assert exit_.value.code in (0, None), f"python {target} {' '.join(argv)} exited {exit_.value.code}"
    return out.getvalue()


@functools.cache
def help_text(target: str, subcommand: str = "", module: bool = False) -> str:
    return captured_run(target, [*([subcommand] if subcommand else []), "--help"], module)


@functools.cache
def launcher_help(launcher: str) -> str:
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser().format_help()
    from deepspeed.launcher.runner import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return out.getvalue()


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def assert_flags_listed(command: Command, words: list[str], help_: str) -> None:
    listed = set(re.findall(r"--[\w-]+", help_))
    unknown = [flag for flag in flags(words) if flag not in listed]
    assert not unknown, f"{command}: {unknown} not accepted (its --help lists {sorted(listed)})"


def assert_overrides_load(command: Command, words: list[str]) -> None:
    """The `key=value` words load onto the command's --config file (a study: its experiment file)."""
    from base.config import load_config, read_with_bases
    from evaluation.schema import ExperimentConfig

    overrides = [w for w in words if OVERRIDE.match(w) and not w.startswith("-")]
    config = words[words.index("--config") + 1] if "--config" in words else None
    if config is not None:
        config_path = REPO / config
        assert config_path.is_file(), f"{command}: no config {config}"
        study = read_with_bases(config_path)
        if "experiment" in study:  # a study file: its stages and overrides use its experiment file
            config_path = config_path.parent / study["experiment"]
    if overrides or config is not None:
        load_config(config_path if config else None, overrides, cls=ExperimentConfig)


def check_python(command: Command, words: list[str]) -> None:
    module = words[0] == "-m"
    target, args = (words[1], words[2:]) if module else (words[0], words[1:])
    if module:
        import importlib.util

        assert importlib.util.find_spec(target) is not None, f"{command}: no module {target}"
    else:
        assert (REPO / target).is_file(), f"{command}: no script {target}"
    top = help_text(target, module=module)
    choices = re.search(r"\{([\w,-]+)\}", top)
    subcommand = args[0] if args and choices and args[0] in choices.group(1).split(",") else ""
    assert_flags_listed(command, args, help_text(target, subcommand, module) if subcommand else top)
    assert_overrides_load(command, args)


def check_syntax(command: Command) -> None:
    argv = command.argv
    program, words = argv[0], argv[1:]
    if program in LAUNCHERS:
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        assert_flags_listed(command, words[:script], launcher_help(program))
        check_python(command, words[script:])
    elif program == "python" and words[:2] == ["-m", "pytest"]:
        pass  # the README's test command: compared with .ci/run's below
    elif program == "python":
        check_python(command, words)
    elif program == "bash":
        script = REPO / words[0]
        assert script.is_file(), f"{command}: no script {words[0]}"
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0, f"{command}: bash syntax error"
    elif program == "tensorboard":
        import importlib.util

        assert importlib.util.find_spec("tensorboard") is not None, f"{command}: tensorboard is not installed"
        assert flags(words) == ["--logdir"], command
    else:
        assert program in ("pip", "apt-get"), f"{command}: unknown program {program!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_names_real_scripts_flags_and_config_keys(command, monkeypatch):
    monkeypatch.chdir(REPO)
    check_syntax(command)


# --- real runs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [c for c in COMMANDS if c.output is not None], ids=str)
def test_transcripts_print_what_the_page_shows(command, monkeypatch):
    monkeypatch.chdir(REPO)
    words = command.argv
    assert words[0] == "python", f"{command}: transcripts run python scripts"
    assert captured_run(words[1], words[2:]) == command.output, f"{command}: the page shows other output"


def tiny_tokenizer(folder: Path):
    """A 1D tokenizer at 32 px with 1,000 FSQ codes (as the quickstart's), untrained."""
    import torch

    from base.schema import SamplingConfig
    from flextok import FlexTok
    from flextok.schema import FlexTokConfig
    from grid.schema import QuantizerConfig

    model = FlexTok.from_config(FlexTokConfig(
        input="pixels", patch_size=8, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32, decoder_depth=1,
        decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[8, 5, 5, 5]), sampling=SamplingConfig(steps=2)), 32)
    model.to_target(torch.rand(8, 3, 32, 32) * 2 - 1)  # what training does first: fix the target scale
    model.eval().save_pretrained(folder)
    return model


def tiny_prior(folder: Path, tokenizer_folder: Path, tokenizer) -> None:
    from base.fingerprint import fingerprint_model
    from priors import DiscretePrior, PriorConfig

    config = PriorConfig(tokenizer=str(tokenizer_folder), dim=32, depth=1, heads=2, num_classes=10)
    DiscretePrior(config, tokenizer.vocab_size, 8, tokenizer_hash=fingerprint_model(tokenizer)).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> Path:
    """A working folder holding tiny models where the pages' snippets load the quickstart's."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("snippets")
    tokenizer_folder = root / "runs/quickstart/1d_tiny/final"
    tokenizer = tiny_tokenizer(tokenizer_folder)
    tiny_prior(root / "runs/quickstart/prior_1d/final", tokenizer_folder, tokenizer)
    return root


@pytest.mark.parametrize("where,code", python_blocks(), ids=[where for where, _ in python_blocks()])
def test_python_blocks_run(where, code, model_folders):
    for path in re.findall(r"[\"'](runs/[^\"']+)[\"']", code):
        assert (model_folders / path).exists(), f"{where}: no tiny model stands in for {path}: add one here"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=model_folders, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_to_existing_files_and_headings(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


# --- install and test commands against CI --------------------------------------------------------------------

def ci_lines() -> list[str]:
    """.ci/run's lines, `\\` continuations joined."""
    return [line.strip() for line in (REPO / ".ci/run").read_text().replace("\\\n", " ").splitlines()]


def test_the_readme_installs_and_tests_as_ci_does():
    """.ci/run installs exactly as the README says and runs the README's test command."""
    readme = [c for c in COMMANDS if c.page == "README.md"]
    quiet = {"-y", "-qq", "--quiet", ">", "/dev/null"}
    ci = [[w for w in shlex.split(line) if w not in quiet] for line in ci_lines() if line and not line.startswith("#")]
    ci = [["pip", *words[3:]] if words[:3] == ["python", "-m", "pip"] else words for words in ci]
    for command in readme:
        if command.argv[0] in ("apt-get", "pip"):
            assert command.argv in ci, f"{command}: .ci/run does not run it"
    tests = [c for c in readme if c.argv[:3] == ["python", "-m", "pytest"]]
    assert len(tests) == 1, "the README has one test command"
    exported = next(line for line in ci_lines() if line.startswith("export HF_HUB_OFFLINE"))
    assert shlex.split(tests[0].text)[:2] == shlex.split(exported)[1:], "the test command's environment"
    assert tests[0].argv in ci, f"{tests[0]}: .ci/run runs another test command"


def test_the_reduced_study_is_the_one_ci_runs():
    runs = [shlex.split(line) for line in ci_lines() if line.startswith("python study.py")]
    reduced = [c.argv for c in COMMANDS if c.argv[:2] == ["python", "study.py"] and "--scale" in c.argv]
    assert len(runs) == 2  # the Fashion-MNIST study and the shaping ablation
    for ci in runs:
        assert ci in reduced, f"no page shows .ci/run's reduced study: {shlex.join(ci)}"
