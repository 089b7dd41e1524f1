"""Issue 26 (hardening 2), the driver's share: output folders owned by their run (item 9), one-line errors where
tracebacks were (item 14), messages that name the file and line or the argument (item 16).

Runs in-process except where a second, live or SIGKILLed process is the point.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from bs_unlearn import cli, outputs
from bs_unlearn.commands.base import EXIT_BAD_INPUT
from bs_unlearn.models import load_model_and_tokenizer
from driver_fixtures import tiny_model, tiny_setup, tiny_tokenizer  # noqa: F401  (pytest fixtures)

ROOT = pathlib.Path(outputs.__file__).resolve().parents[2]  # the checkout whose bs_unlearn is under test


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse usage errors
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


def start_holder(code: str, tmp_path: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """A second Python process that runs ``code`` (which prints one line when it holds its folder, then sleeps);
    returns it and the line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]), TMPDIR=str(tmp_path))
    script = "import sys, time\nfrom bs_unlearn import outputs\n" + textwrap.dedent(code)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline().strip()
    assert line, "the holder process failed to start"
    return process, line


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()


# --------------------------------------------------------------------------------------------------------------
# Item 9: a live run's staging folder is never removed; a dead run's is; dead runs' scratch folders are cleaned
# --------------------------------------------------------------------------------------------------------------


def test_a_live_runs_staging_folder_is_never_removed(tmp_path):
    output = tmp_path / "out"
    holder, staging = start_holder(
        f"""
        with outputs.atomic_output_dir({str(output)!r}, overwrite=False) as staging:
            (staging / "model.safetensors").write_text("run A's weights")
            print(staging, flush=True)
            time.sleep(120)
        """,
        tmp_path,
    )
    try:
        assert pathlib.Path(staging) == outputs.partial_dir_for(output)
        with pytest.raises(ValueError, match=rf"being written by another run \(pid {holder.pid} on "):
            outputs.check_output_dir(output, overwrite=False)
        with (
            pytest.raises(ValueError, match="being written by another run"),
            outputs.atomic_output_dir(output, overwrite=True),
        ):
            pytest.fail("run B must not start")
        assert (pathlib.Path(staging) / "model.safetensors").read_text() == "run A's weights"
    finally:
        kill(holder)
    # Its owner is dead now (SIGKILL: no cleanup ran), so the leftover goes and run B saves.
    with outputs.atomic_output_dir(output, overwrite=False) as staging_b:
        assert not (staging_b / "model.safetensors").exists()
        (staging_b / "run.json").write_text("{}")
    assert sorted(p.name for p in output.iterdir()) == [".bs-unlearn-output", "run.json"]  # no owner file left
    assert not outputs.partial_dir_for(output).exists()


def test_unlearn_cli_refuses_an_output_a_live_run_is_writing(tiny_setup, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "out"
    holder, staging = start_holder(
        f"""
        with outputs.atomic_output_dir({str(output)!r}, overwrite=False) as staging:
            print(staging, flush=True)
            time.sleep(120)
        """,
        tmp_path,
    )
    try:
        argv = ["unlearn", "--method", "ga", "--forget", str(tiny_setup["forget"]), "--model", str(tiny_setup["model"])]
        status, lines = run_cli(capsys, [*argv, "--output", str(output), "--max-steps", "1", "--no-progress"])
        assert status == EXIT_BAD_INPUT and len(lines) == 1 and "being written by another run" in lines[0], lines
        assert pathlib.Path(staging).is_dir() and not output.exists()
    finally:
        kill(holder)


def test_dead_runs_scratch_folders_are_removed_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code = """
        with outputs.scratch_dir() as folder:
            print(folder, flush=True)
            time.sleep(120)
        """
    live, live_folder = start_holder(code, tmp_path)
    dead, dead_folder = start_holder(code, tmp_path)  # its start leaves the live one alone
    kill(dead)
    old_style = tmp_path / "bs-unlearn-olderversion"  # no owner file: cannot tell, so kept
    old_style.mkdir()
    try:
        assert pathlib.Path(dead_folder).is_dir() and (pathlib.Path(dead_folder) / outputs.OWNER_FILE).is_file()
        with outputs.scratch_dir() as mine:
            assert mine.parent == tmp_path and (mine / outputs.OWNER_FILE).is_file()
            assert not pathlib.Path(dead_folder).exists()
            assert pathlib.Path(live_folder).is_dir() and old_style.is_dir()
            assert outputs.remove_dead_scratch_dirs() == []  # this process's own folder is live too
        assert not mine.exists()
    finally:
        kill(live)
    assert outputs.remove_dead_scratch_dirs(tmp_path) == [pathlib.Path(live_folder)]
    assert old_style.is_dir()


# --------------------------------------------------------------------------------------------------------------
# Item 14: output paths that cannot be created are refused before any work, in one line
# --------------------------------------------------------------------------------------------------------------


def test_output_name_near_the_file_name_limit(tmp_path):
    """A 250-byte name is a valid folder name, but ".NAME.partial" is not: the staging name is shortened (one per
    output, still recognised as a leftover); a name over 255 bytes is refused clearly."""
    output = tmp_path / ("n" * 250)
    staging = outputs.partial_dir_for(output)
    assert len(staging.name) <= 255 and staging.name.startswith(".nnn") and staging.name.endswith(".partial")
    assert outputs.partial_dir_for(tmp_path / ("n" * 249 + "m")) != staging
    with outputs.atomic_output_dir(output, overwrite=False) as folder:
        assert folder == staging
        (folder / "run.json").write_text("{}")
    assert (output / "run.json").is_file()
    with outputs.atomic_output_dir(output, overwrite=True) as folder:  # the replace path uses ".NAME.previous" too
        (folder / "run.json").write_text("[]")
    assert (output / "run.json").read_text() == "[]"
    outputs.write_json_atomic({"a": 1}, tmp_path / ("j" * 250 + ".json"))
    with pytest.raises(ValueError, match="256 bytes long; file systems allow at most 255"):
        outputs.check_output_dir(tmp_path / ("n" * 256), overwrite=False)
    with pytest.raises(ValueError, match="file systems allow at most 255"):
        outputs.check_output_file(tmp_path / ("n" * 256), overwrite=False)


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path in (tmp_path / "notes.txt" / "out", tmp_path / "notes.txt" / "a" / "b"):
        with pytest.raises(ValueError, match=r"cannot create output .*notes.txt is a file, not a folder"):
            outputs.check_output_dir(path, overwrite=False)
        with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder"):
            outputs.check_output_file(path, overwrite=False)


def test_eval_refuses_an_output_under_a_file_before_computing(tiny_setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr("bs_unlearn.models.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    argv = ["eval", "--model", str(tiny_setup["model"]), "--forget", str(tiny_setup["forget"])]
    status, lines = run_cli(capsys, [*argv, "--output", str(tmp_path / "notes.txt" / "metrics.json")])
    assert status == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert "notes.txt is a file, not a folder" in lines[0]


# --------------------------------------------------------------------------------------------------------------
# Item 14: a damaged model folder is one line naming the file, not a traceback or a multi-line report
# --------------------------------------------------------------------------------------------------------------


def damaged_model(tiny_setup, tmp_path, damage: str) -> pathlib.Path:  # noqa: F811
    model = tmp_path / f"model-{damage}"
    shutil.copytree(tiny_setup["model"], model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if damage == "half":  # header intact, tensors cut
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":  # cut inside the header
        weights.write_bytes(data[:20])
    elif damage == "vocab":
        config = json.loads((model / "config.json").read_text())
        config["vocab_size"] += 7
        (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    "damage, message",
    [
        ("half", r"model.safetensors is truncated \(\d+ bytes, its header describes \d+\)"),
        ("header", r"model.safetensors is truncated \(20 bytes\)"),
        (
            "vocab",
            r"config.json has vocab_size=\d+ but model.safetensors holds (lm_head|model.embed_tokens).weight "
            r"with \d+ rows",
        ),
    ],
)
def test_damaged_model_is_one_line(tiny_setup, tmp_path, capsys, damage, message):  # noqa: F811
    model = damaged_model(tiny_setup, tmp_path, damage)
    argv = ["eval", "--model", str(model), "--forget", str(tiny_setup["forget"]), "--output", str(tmp_path / "m.json")]
    status, lines = run_cli(capsys, argv)
    assert status == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert re.search(message, lines[0]), lines
    with pytest.raises(ValueError, match=message):  # the library's loader says the same
        load_model_and_tokenizer(str(model))


# --------------------------------------------------------------------------------------------------------------
# Item 17: tests find TOFU and the open-unlearning checkout through environment variables, and say which
# --------------------------------------------------------------------------------------------------------------


def test_data_locations_come_from_environment_variables(tmp_path):
    tests = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, BS_TOFU_DIR=str(tmp_path / "tofu"), BS_OPEN_UNLEARNING_DIR=str(tmp_path / "ou"))
    code = (
        "import conftest, sys; sys.path.insert(0, 'driver'); import open_unlearning_checkout as o; "
        "print(conftest.TOFU_DIR, o.TOFU_DIR, o.CHECKOUT)"
    )
    shown = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [str(tmp_path / "tofu"), str(tmp_path / "tofu"), str(tmp_path / "ou")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_open_unlearning_checkout.py"],
        cwd=tests / "driver", env=env, capture_output=True, text=True,
    )  # fmt: skip
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("set BS_OPEN_UNLEARNING_DIR" in line for line in skipped), run.stdout


# --------------------------------------------------------------------------------------------------------------
# Item 14: the open-unlearning launcher's errors are one line naming the cause
# --------------------------------------------------------------------------------------------------------------


def fake_checkout(root: pathlib.Path, *, trainer: bool = True, grad_diff_import: str = "") -> pathlib.Path:
    """A folder shaped like open-unlearning: src/train.py prints its arguments; src/trainer has a registry and a
    GradDiff (importing ``grad_diff_import`` first, to stand for a dependency that is not installed)."""
    src = root / "src"
    src.mkdir(parents=True)
    (src / "train.py").write_text(
        "import sys\nimport trainer\nprint('TRAIN', sorted(trainer.TRAINER_REGISTRY), sys.argv[1:])\n"
    )
    if trainer:
        (src / "trainer" / "unlearn").mkdir(parents=True)
        (src / "trainer" / "__init__.py").write_text("TRAINER_REGISTRY = {}\n")
        (src / "trainer" / "unlearn" / "__init__.py").write_text("")
        (src / "trainer" / "unlearn" / "grad_diff.py").write_text(
            (f"import {grad_diff_import}\n" if grad_diff_import else "")
            + "import transformers\n\n\nclass GradDiff(transformers.Trainer):\n"
            "    def __init__(self, *args, gamma=1.0, alpha=1.0, retain_loss_type='NLL', **kwargs):\n"
            "        super().__init__(*args, **kwargs)\n"
        )
    return root


def launch(*argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    command = [sys.executable, "-m", "bs_unlearn.integrations.open_unlearning_train", *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_launcher_errors_are_one_line(tmp_path):
    no_trainer = fake_checkout(tmp_path / "no-trainer", trainer=False)
    broken = fake_checkout(tmp_path / "broken", grad_diff_import="a_dependency_that_is_not_installed")
    cases = [
        (
            ["--checkout", str(no_trainer), "experiment=x"],
            f"{no_trainer} is not an open-unlearning checkout (no src/trainer",
        ),
        (["experiment=x", "--checkout", str(no_trainer)], f"{no_trainer} is not an open-unlearning checkout"),
        (
            ["--checkout", str(broken)],
            "cannot import open-unlearning's trainer package from "
            f"{broken / 'src'}: No module named 'a_dependency_that_is_not_installed'",
        ),
        (["experiment=x", "--checkout"], "--checkout needs the open-unlearning checkout directory"),
    ]
    for argv, message in cases:
        run = launch(*argv, cwd=tmp_path)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, (argv, run.stderr)
        assert lines[0].startswith("open_unlearning_train: error: ") and message in lines[0], (argv, lines)


def test_launcher_takes_checkout_anywhere(tmp_path):
    checkout = fake_checkout(tmp_path / "ou")
    run = launch("--config-name=unlearn.yaml", "--checkout", str(checkout), "trainer=BST", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = [line for line in run.stdout.splitlines() if line.startswith("TRAIN")]
    assert out == [f"TRAIN ['BSS', 'BST'] ['--config-name=unlearn.yaml', 'trainer=BST', 'hydra.searchpath=[file://"
                   f"{ROOT / 'python' / 'bs_unlearn' / 'integrations' / 'configs'}]']"]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Item 16: messages that name the file and line, or what the argument may be
# --------------------------------------------------------------------------------------------------------------


def test_lone_surrogate_names_file_line_and_field(tmp_path, capsys, tiny_setup):  # noqa: F811
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q?", "answer": "a"})
    data.write_text(good + "\n" + '{"question": "q?", "answer": "a", "perturbed_answer": ["ok", "x\\ud800y"]}\n')
    from bs_unlearn.data import read_qa_records

    message = r"bad.jsonl line 2: field 'perturbed_answer' holds a lone surrogate \(\\ud800 at character 1\)"
    with pytest.raises(ValueError, match=message):
        read_qa_records(data)
    argv = ["eval", "--model", str(tiny_setup["model"]), "--forget", str(data), "--output", str(tmp_path / "m.json")]
    status, lines = run_cli(capsys, argv)
    assert status == EXIT_BAD_INPUT and len(lines) == 1 and re.search(message, lines[0]), lines


def test_set_with_an_unknown_role_says_what_the_suffix_may_be(tmp_path, capsys, tiny_setup):  # noqa: F811
    (tmp_path / "d").mkdir()
    shutil.copy(tiny_setup["retain"], tmp_path / "d" / "r.jsonl")
    for spec in (f"x={tmp_path}/d/r.jsonl:weird", "x=d/nothing.jsonl:weird"):
        argv = ["eval", "--model", str(tiny_setup["model"]), "--set", spec, "--output", str(tmp_path / "m.json")]
        status, lines = run_cli(capsys, argv)
        assert status == EXIT_BAD_INPUT and len(lines) == 1, lines
        assert "the part after ':' (the role) may be forget, retain or options, not 'weird'" in lines[0], lines


def test_demo_default_output_is_ignored_by_git():
    """Item 18: the demo's default output folder (bs-unlearn-demo/, in the current directory) is never committed."""
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout")
    run = subprocess.run(["git", "check-ignore", "-q", "bs-unlearn-demo/table.md"], cwd=ROOT)
    assert run.returncode == 0, "bs-unlearn-demo/ is not in .gitignore"


# --------------------------------------------------------------------------------------------------------------
# Item 1, as the driver meets it: the reference model of NPO / KL is a deep copy of a model a fused run patched
# --------------------------------------------------------------------------------------------------------------


def test_reference_copy_of_a_fused_model_keeps_its_own_weights(tiny_model, tiny_tokenizer):  # noqa: F811
    import copy

    import torch
    from bs_unlearn.objectives import answer_token_logprobs

    input_ids = torch.tensor([[5, 9, 12, 7, 3, 11], [6, 8, 4, 10, 13, 2]])
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)}
    before = answer_token_logprobs(tiny_model, batch).detach()  # patches tiny_model (the fused path)
    reference = copy.deepcopy(tiny_model)  # what trainer.py does for NPO's / KL's reference
    with torch.no_grad():
        for parameter in tiny_model.parameters():  # training moves the policy
            parameter.add_(0.5)
    moved = answer_token_logprobs(tiny_model, batch).detach()
    assert (moved - before).abs().max() > 1e-3
    torch.testing.assert_close(answer_token_logprobs(reference, batch).detach(), before, atol=0, rtol=0)
