"""The bs-unlearn CLI: bad input gives one stderr line and a non-zero exit with nothing written; runs save outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bs_unlearn import cli
from driver_fixtures import qa_rows, tiny_setup, write_jsonl  # noqa: F401  (tiny_setup is a fixture)


def run_cli(capsys, argv):
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse usage errors
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.err.strip().splitlines()


def _unlearn_args(setup, output, **overrides):
    args = {
        "--method": "graddiff",
        "--forget": str(setup["forget"]),
        "--retain": str(setup["retain"]),
        "--model": str(setup["model"]),
        "--output": str(output),
        "--max-steps": "2",
        "--no-progress": None,
    }
    args.update(overrides)
    argv = ["unlearn"]
    for key, value in args.items():
        if value is not False:
            argv += [key] if value is None else [key, value]
    return argv


def _bad_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing forget", "forget file not found"),
        ("missing retain", "retain file not found"),
        ("forget is a directory", "forget path is not a file"),
        ("line without answer", "line 2: missing string field 'answer'"),
        ("undecodable file", "cannot read data file"),
        ("empty forget set", "has no examples"),
        ("unknown method", "invalid choice: 'sgd'"),
        ("missing model", "model path does not exist"),
        ("model dir without config", "has no config.json"),
        ("output exists", "already exists (pass --overwrite"),
        ("bad hyperparameter", "lam must be"),
        ("ga without retain for kl", "give a retain file"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tiny_setup, tmp_path, capsys, case, message):  # noqa: F811
    output = tmp_path / "out"
    overrides = {  # built for every case: each bad file has its own name
        "missing forget": {"--forget": str(tmp_path / "absent.jsonl")},
        "missing retain": {"--retain": str(tmp_path / "absent.jsonl")},
        "forget is a directory": {"--forget": str(tmp_path)},
        "line without answer": {
            "--forget": _bad_file(tmp_path, "no-answer.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q"}\n')
        },
        "empty forget set": {"--forget": _bad_file(tmp_path, "empty.jsonl", "\n")},
        "unknown method": {"--method": "sgd"},
        "missing model": {"--model": str(tmp_path / "no-model")},
        "model dir without config": {"--model": str(tmp_path)},
        "bad hyperparameter": {"--method": "bs-t", "--lam": "1.5"},
        "ga without retain for kl": {"--method": "ga", "--retain": False, "--retain-loss": "kl"},
    }.get(case, {})
    if case == "undecodable file":
        bad = tmp_path / "binary.jsonl"
        bad.write_bytes(b"\xff\xfe garbage\n")
        overrides = {"--forget": str(bad)}
    if case == "output exists":
        output.mkdir()
        (output / "keep").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    status, lines = run_cli(capsys, _unlearn_args(tiny_setup, output, **overrides))
    assert status != 0
    assert len(lines) == 1 and lines[0].startswith("bs-unlearn") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    if case == "output exists":
        assert (output / "keep").read_text() == "x"


def test_finetune_bad_input(tmp_path, capsys):
    status, lines = run_cli(capsys, ["finetune", "--data", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o")])
    assert status == 2 and len(lines) == 1 and "data file not found" in lines[0]


def test_unlearn_run_saves_model_and_settings(tiny_setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    from bs_unlearn import config, data

    calls = {"paths": 0, "reads": 0}
    check_run_paths, read_qa_records = config.check_run_paths, data.read_qa_records

    def counted_paths(*args, **kwargs):
        calls["paths"] += 1
        return check_run_paths(*args, **kwargs)

    def counted_reads(*args, **kwargs):
        calls["reads"] += 1
        return read_qa_records(*args, **kwargs)

    monkeypatch.setattr(config, "check_run_paths", counted_paths)
    monkeypatch.setattr(data, "read_qa_records", counted_reads)
    import bs_unlearn.trainer

    monkeypatch.setattr(bs_unlearn.trainer, "read_qa_records", counted_reads)
    output = tmp_path / "out"
    status = cli.main(_unlearn_args(tiny_setup, output, **{"--method": "bs-t", "--lam": "0.5"}))
    assert status == 0
    # Each check once: the paths by config.validate() (the CLI's call; the run's finds the same configuration
    # checked), each data file (forget, retain) read once.
    assert calls == {"paths": 1, "reads": 2}
    assert "unlearn: 2 steps" in capsys.readouterr().out
    record = json.loads((output / "run.json").read_text())
    objective = record["config"]["objective"]
    assert objective["method"] == "bs-t" and objective["lam"] == 0.5
    assert len([e for e in record["log_history"] if "loss" in e]) == 2
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_console_script_exit_status(tmp_path):
    forget = write_jsonl(tmp_path / "f.jsonl", qa_rows(range(2)))
    result = subprocess.run(
        [sys.executable, "-m", "bs_unlearn.cli", "unlearn", "--method", "ga", "--forget", str(forget)]
        + ["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"bs-unlearn: error: model path does not exist: {tmp_path / 'missing'}"


def test_unlearn_options_are_generated_from_the_configs():
    """Every field of the unlearning configs is an option of `bs-unlearn unlearn`, parsed back into the same
    nested config (no third copy of the fields in the CLI)."""
    import dataclasses

    from bs_unlearn.commands.config_args import config_from_args
    from bs_unlearn.config import BeliefConfig, ObjectiveConfig, UnlearnConfig

    parser = cli.build_parser()
    unlearn_parser = parser._subparsers._group_actions[0].choices["unlearn"]
    options = {action.dest: action for action in unlearn_parser._actions}
    for config_class in (UnlearnConfig, ObjectiveConfig, BeliefConfig):
        for field in dataclasses.fields(config_class):
            if field.name not in ("objective", "beliefs", "logging_steps"):
                assert field.name in options, f"{config_class.__name__}.{field.name} has no option"
    args = parser.parse_args(
        [
            "unlearn",
            "--method",
            "bs-s",
            "--forget",
            "f.jsonl",
            "--output",
            "o",
            "--bs-s-base",
            "bs-t",
            "--lam",
            "0.7",
            "--retain-loss",
            "none",
            "--num-beliefs",
            "5",
            "--no-progress",
            "--on-policy",
        ]
    )
    config = config_from_args(UnlearnConfig, args)
    assert config.objective == ObjectiveConfig(method="bs-s", bs_s_base="bs_t", lam=0.7, retain_loss=None)
    assert config.beliefs == BeliefConfig(num_beliefs=5, on_policy=True)
    assert (config.forget, config.output, config.progress, config.lr) == ("f.jsonl", "o", False, UnlearnConfig.lr)
