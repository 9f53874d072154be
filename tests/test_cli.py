"""The command line as a user meets it: help, start-up time, config files, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import FAST, cifar_job

from cifar_job.cli import main

COMMANDS = sorted(main.commands)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    text = main.commands[command[0]].help if command else main.help
    assert text and len(text.strip()) > 20, f"{command} needs a real docstring"


def test_every_command_is_documented_in_the_manual():
    from conftest import REPO

    manual = "\n".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    for command in COMMANDS:
        assert f"cifar-job {command}" in manual, f"the manual lacks `cifar-job {command}`"


def heavy_imports(*args: str) -> list[str]:
    """Run `cifar-job ARGS` in a fresh interpreter; the heavy modules it imported."""
    code = (
        "import sys; from cifar_job.cli import main\n"
        f"try:\n    main({list(args)!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print([m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_help_does_not_import_torch():
    assert heavy_imports("--help") == []


def test_plot_does_not_import_torch(tmp_path):
    """Plotting reads CSV and JSON; importing torch and Lightning took it from 1 s to 10 s."""
    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "epoch,step,train/loss_epoch,train/acc_epoch,val/loss,val/acc\n"
        "0,9,2.0,0.3,1.9,0.35\n1,19,1.5,0.5,1.4,0.55\n"
    )
    confusion = [[5 if i == j else 0 for j in range(10)] for i in range(10)]
    (tmp_path / "results.json").write_text(json.dumps({"test/confusion": confusion}))
    (tmp_path / "config.json").write_text("{}")  # every run has one from its first start
    assert heavy_imports("plot", str(tmp_path)) == []
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_train_options_show_their_defaults():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert "[default: 128]" in result.output  # --batch-size
    assert "[default: resnet34]" in result.output


def test_config_file_supplies_options_and_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch-size: 32\noptimizer: adamw\nmax_epochs: 7\n")
    result = CliRunner().invoke(
        main, ["train", "--config", str(config), "--batch-size", "16", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["batch_size"] == 16  # command line wins
    assert resolved["optimizer"] == "adamw" and resolved["max_epochs"] == 7  # from the file
    assert resolved["arch"] == "resnet34"  # untouched default


def test_a_config_file_beats_the_environment_and_the_command_line_beats_both(tmp_path, monkeypatch):
    """The image sets CIFAR_JOB_RUN_DIR and CIFAR_JOB_DATA_DIR: a config file's values for
    them were silently ignored inside the container."""
    monkeypatch.setenv("CIFAR_JOB_RUN_DIR", "/runs/x")
    monkeypatch.setenv("CIFAR_JOB_DATA_DIR", "/data")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"run_dir": "runs/from-file"}))

    def resolved(*args: str) -> dict:
        result = CliRunner().invoke(main, ["train", *args, "--print-config"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert resolved()["run_dir"] == "/runs/x"  # the environment beats the defaults
    from_file = resolved("--config", str(config))
    assert from_file["run_dir"] == "runs/from-file" and from_file["data_dir"] == "/data"
    assert resolved("--config", str(config), "--run-dir", "cli")["run_dir"] == "cli"
    monkeypatch.delenv("CIFAR_JOB_RUN_DIR")
    assert resolved()["run_dir"] == "runs/cifar10"


def test_config_file_with_unknown_key_is_a_usage_error(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"batch_size": 8, "learning_rate": 0.1}))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--print-config"])
    assert result.exit_code == 2
    assert "unknown keys: learning_rate" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be 1 or more"),
        (["--batch-size", "-4"], "--batch-size must be 1 or more"),
        (["--max-epochs", "-1"], "--max-epochs must be 1 or more"),
        (["--optimizer", "lion"], "'lion' is not one of"),
        (["--precision", "8"], "is not one of"),
        (["--devices", "two"], "--devices must be a count"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path, args, message):
    result = cifar_job("train", "--dataset", "synthetic", "--run-dir", str(tmp_path / "r"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_directory_says_what_to_run(tmp_path):
    result = cifar_job(
        "train", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r"), *FAST
    )
    assert result.returncode == 1
    assert "no CIFAR-10 data in" in result.stderr and "cifar-job download" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    result = cifar_job("train", "--dataset", "synthetic", "--run-dir", str(tmp_path / "taken"))
    assert result.returncode == 1
    assert "is a file" in result.stderr and "Traceback" not in result.stderr


def test_run_dir_that_cannot_be_written_is_refused(tmp_path):
    # Root ignores permission bits, so make the directory impossible instead: below a file.
    (tmp_path / "file").write_text("")
    result = cifar_job("train", "--dataset", "synthetic", "--run-dir", str(tmp_path / "file" / "r"))
    assert result.returncode == 1
    assert "cannot be written" in result.stderr and "Traceback" not in result.stderr


def test_pretrained_without_internet_is_a_clear_error(tmp_path):
    result = cifar_job(
        "train",
        "--dataset",
        "synthetic",
        "--pretrained",
        "--run-dir",
        str(tmp_path / "r"),
        *FAST,
        env={"TORCH_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 1
    assert "--pretrained needs internet" in result.stderr and "Traceback" not in result.stderr


def test_unavailable_accelerator_is_a_usage_error(tmp_path):
    result = cifar_job(
        "train",
        "--dataset",
        "synthetic",
        "--accelerator",
        "gpu",
        "--run-dir",
        str(tmp_path / "r"),
        *FAST,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2
    assert "gpu" in result.stderr.lower() and "Traceback" not in result.stderr
    assert "Traceback" not in result.stderr
