"""The CLI against a careless or hostile user (issue 15): --overwrite never deletes an input or a folder bs-unlearn did
not write, bad options and files give one line before any work, SIGTERM cleans up like Ctrl-C, a bad path is
refused before the heavy imports.

Every case runs the CLI in-process except the import check, which needs a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
from bs_unlearn import cli
from bs_unlearn.commands.base import EXIT_BAD_INPUT, run_handler
from bs_unlearn.outputs import check_output_dir, partial_dir_for
from driver_fixtures import tiny_setup  # noqa: F401  (pytest fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse usage errors
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


def unlearn_argv(model, forget, output, *extra: str) -> list[str]:
    argv = ["unlearn", "--method", "ga", "--forget", str(forget), "--model", str(model), "--output", str(output)]
    return argv + ["--max-steps", "1", "--no-progress", *extra]


def tree(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """A folder holding the tiny model and the data, made the current directory (as in the issue's repro)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_setup["model"], work / "model")
    shutil.copy(tiny_setup["forget"], work / "forget.jsonl")
    monkeypatch.chdir(work)
    return work


# --------------------------------------------------------------------------------------------------------------
# Defect 3: --overwrite and the inputs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, message",
    [
        (".", "output . is the current directory"),
        ("WORK", "is the current directory"),  # "$PWD"
        ("..", "contains the current directory"),
        ("model", "output model is the input model"),
    ],
)
def test_overwrite_never_deletes_the_inputs(workdir, capsys, output, message):
    output = str(workdir) if output == "WORK" else output
    before = tree(workdir.parent)
    status, lines = run_cli(capsys, unlearn_argv("model", "forget.jsonl", output, "--overwrite"))
    assert status == EXIT_BAD_INPUT
    assert len(lines) == 1 and message in lines[0], lines
    assert tree(workdir.parent) == before  # nothing deleted, nothing half-written (no "..partial" either)


def test_output_containing_an_input_is_refused_for_every_command(workdir, capsys):
    """The model's folder inside the output, a TOFU folder as the output, an eval input as the output file."""
    (workdir / "runs").mkdir()
    shutil.move(workdir / "model", workdir / "runs" / "target")
    tofu = workdir / "tofu"
    tofu.mkdir()
    shutil.copy(workdir / "forget.jsonl", tofu / "forget01.jsonl")
    before = tree(workdir)
    cases = [
        (unlearn_argv("runs/target", "forget.jsonl", "runs", "--overwrite"), "output runs contains the input"),
        (["tofu", "--tofu-dir", "tofu", "--model", "runs/target", "--output", "tofu", "--overwrite"], "is the input"),
        (
            ["eval", "--model", "runs/target", "--forget", "forget.jsonl", "--output", "forget.jsonl", "--overwrite"],
            "output forget.jsonl is the input",
        ),
    ]
    for argv, message in cases:
        status, lines = run_cli(capsys, argv)
        assert status == EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], (argv, lines)
    assert tree(workdir) == before


def test_overwrite_replaces_only_a_folder_bs_unlearn_wrote(workdir, capsys):
    foreign = workdir / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = tree(workdir)
    for argv in (
        unlearn_argv("model", "forget.jsonl", "notes", "--overwrite"),
        ["demo", "--quick", "--output", "notes", "--overwrite"],  # the demo used to rmtree its output
    ):
        status, lines = run_cli(capsys, argv)
        assert status == EXIT_BAD_INPUT and len(lines) == 1 and "was not written by bs-unlearn" in lines[0], lines
    assert tree(workdir) == before

    # An empty folder may be replaced. (Every run marks its output, so a later --overwrite may replace it:
    # test_train.py checks both.)
    (workdir / "out").mkdir()
    assert check_output_dir("out", overwrite=True) == workdir / "out"


def test_staging_folder_is_a_real_sibling_and_foreign_leftovers_are_kept(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # "." and "x/" name their folder: the staging folder never becomes "./..partial".
    assert partial_dir_for(".") == tmp_path / ".work.partial"
    assert partial_dir_for("runs/x/") == work / "runs" / ".x.partial"
    # A "partial" folder that bs-unlearn did not write is not deleted to make room.
    stray = work / ".out.partial"
    stray.mkdir()
    (stray / "keep").write_text("x")
    with pytest.raises(ValueError, match="not written by bs-unlearn"):
        check_output_dir("out", overwrite=False)
    from bs_unlearn.outputs import OUTPUT_MARKER, mark_output_dir

    mark_output_dir(stray)
    assert check_output_dir("out", overwrite=False) == work / "out"
    assert (stray / OUTPUT_MARKER).is_file()


# --------------------------------------------------------------------------------------------------------------
# Defect 7: rough edges
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_max_steps_must_be_at_least_one(workdir, capsys, steps):
    argv = unlearn_argv("model", "forget.jsonl", "out")
    argv[argv.index("--max-steps") + 1] = steps
    status, lines = run_cli(capsys, argv)
    assert status == EXIT_BAD_INPUT and len(lines) == 1 and "max_steps must be >= 1" in lines[0], lines
    status, lines = run_cli(capsys, ["demo", "--quick", "--max-steps", steps, "--output", "demo"])
    assert status == EXIT_BAD_INPUT and len(lines) == 1 and "must be an integer >= 1" in lines[0], lines
    assert sorted(p.name for p in workdir.iterdir()) == ["forget.jsonl", "model"]


def _no_tokenizer(model: pathlib.Path) -> None:
    for path in model.glob("tokenizer*"):
        path.unlink()


def _broken_tokenizer_json(model: pathlib.Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')


def _tokenizer_error(model: pathlib.Path) -> str:
    from transformers import AutoTokenizer

    with pytest.raises(Exception) as error:  # noqa: B017  (whatever transformers raises: its text is what counts)
        AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    return str(error.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("triton on a CPU", "impl 'triton' cannot run here"),
        ("malformed config.json", "config.json is not valid JSON"),
        ("no tokenizer files", "cannot load the tokenizer of model model"),
        ("broken tokenizer.json", "cannot load the tokenizer of model model"),
    ],
)
def test_one_line_instead_of_a_traceback(workdir, capsys, monkeypatch, case, message):
    model = workdir / "model"
    extra = []
    if case == "triton on a CPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("triton runs on this machine's GPU")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        extra = ["--impl", "triton"]
    elif case == "malformed config.json":
        (model / "config.json").write_text('{"model_type": "llama", ')
    elif case == "no tokenizer files":
        _no_tokenizer(model)
    else:
        _broken_tokenizer_json(model)
    status, lines = run_cli(capsys, unlearn_argv("model", "forget.jsonl", "out", *extra))
    assert status == EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], lines
    if case == "no tokenizer files":  # transformers' message has several lines: all of them are kept
        for part in filter(None, (line.strip() for line in _tokenizer_error(model).splitlines())):
            assert part in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == ["forget.jsonl", "model"]


def test_missing_optional_package_is_one_line(tmp_path, capsys, monkeypatch):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"label": "GA", "records": [{"step": 0, "target_lp": -1.0}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    status, lines = run_cli(capsys, ["compare", str(probe), "--output", str(tmp_path / "c.png")])
    assert status == EXIT_BAD_INPUT and len(lines) == 1 and "needs matplotlib, not installed" in lines[0], lines

    # One found only while running (any command) is named the same way.
    def needs_scipy(args):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    assert run_handler(needs_scipy, None) == EXIT_BAD_INPUT
    assert "the scipy package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}


def test_bad_path_is_refused_before_the_heavy_imports(tmp_path):
    """A fresh interpreter (this one has torch loaded): parsing and the path checks import no torch/transformers."""
    script = (
        "import sys; from bs_unlearn import cli; "
        f"status = cli.main(['unlearn', '--method', 'ga', '--forget', {str(tmp_path / 'absent.jsonl')!r}, "
        f"'--output', {str(tmp_path / 'out')!r}]); "
        "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]); sys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_env(tmp_path)
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert result.stderr.strip() == f"bs-unlearn: error: forget file not found: {tmp_path / 'absent.jsonl'}"
    assert result.stdout.strip() == "[]"


def test_sigterm_cleans_up_like_ctrl_c(workdir, tmp_path, capsys, monkeypatch):
    """SIGTERM mid-step: one line, exit status 143, no staging folder, no output, no scratch folder left.

    In-process (a subprocess would spend most of a minute importing): the signal is raised from inside a training
    step, as ``kill PID`` would deliver it. Without the CLI's own handler the test's handler fails the test instead
    of letting SIGTERM end pytest."""
    import tempfile

    from bs_unlearn import trainer

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the Trainer's scratch folder goes
    compute_loss = trainer.UnlearnTrainer.compute_loss

    def terminated_mid_step(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(trainer.UnlearnTrainer, "compute_loss", terminated_mid_step)

    class Unhandled(BaseException):
        pass

    def unhandled(signum, frame):
        raise Unhandled("SIGTERM reached the test's handler: the CLI installed none")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        status, lines = run_cli(capsys, unlearn_argv("model", "forget.jsonl", "out"))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the CLI put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 128 + signal.SIGTERM
    assert lines[-1] == "bs-unlearn: terminated (SIGTERM); nothing was saved"  # after transformers' loading bar
    assert sorted(p.name for p in workdir.iterdir()) == ["forget.jsonl", "model"]  # no out, no .out.partial
    assert list(scratch.iterdir()) == []
