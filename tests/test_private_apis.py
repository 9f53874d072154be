"""The private Lightning and submitit APIs that cifar-job relies on, checked one by one, so
that a release that changes one fails here, loudly and by name, rather than in a job (the
version ranges in pyproject.toml stop at the releases checked)."""

from __future__ import annotations

import inspect

import lightning as L
import submitit
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from cifar_job.checkpoints import _SignalsOwnedByCifarJob


def test_lightnings_signal_connector_is_what_checkpoints_py_replaces():
    """checkpoints.py swaps trainer._signal_connector for a subclass without the SIGTERM
    handler (which calls a collective inside the handler, then exits 0, unsaved)."""
    assert "register_signal_handlers" in vars(_SignalConnector)
    assert issubclass(_SignalsOwnedByCifarJob, _SignalConnector)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer._signal_connector, _SignalConnector)
    connector = _SignalsOwnedByCifarJob(trainer)
    connector.register_signal_handlers()
    assert connector.received_sigterm is False and connector._original_handlers == {}


def test_submitits_script_writer_is_what_submit_dry_run_calls():
    """launch.sbatch_text writes the script without submitting it."""
    writer = submitit.SlurmExecutor._make_submission_file_text
    assert list(inspect.signature(writer).parameters) == ["self", "command", "uid"]
    assert isinstance(submitit.SlurmExecutor.__dict__.get("_submitit_command_str"), property)


def test_what_the_watchdog_saves_a_hang_with(tmp_path):
    """watchdog.py saves the last completed step from its thread with the Trainer's own
    checkpoint writer (trainer._checkpoint_connector.dump_checkpoint), patches in the loop's
    progress counters as LastStep noted them, read from the epoch loop's attributes (plain()
    must give what their state_dict() gives), and copies buffers with torch._foreach_copy_."""
    import torch

    from cifar_job.watchdog import LastStep, plain

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert callable(trainer._checkpoint_connector.dump_checkpoint)
    assert (
        "weights_only"
        in inspect.signature(trainer._checkpoint_connector.dump_checkpoint).parameters
    )
    loop = trainer.fit_loop.epoch_loop
    last = LastStep(trainer, forwards=0, updates=0)
    state = trainer.fit_loop.state_dict()
    for key, value in last.loops.items():
        assert state[key] == value, key  # the same keys and values as Lightning's own
    assert plain(loop.batch_progress) == loop.batch_progress.state_dict()
    live, shadow = [torch.ones(3), torch.ones(2)], [torch.zeros(3), torch.zeros(2)]
    torch._foreach_copy_(shadow, live)
    assert all(torch.equal(a, b) for a, b in zip(live, shadow))


def test_the_lr_schedulers_state_keys_that_module_py_keeps_on_resume():
    """CifarClassifier.on_load_checkpoint keeps a schedule's position from a checkpoint by
    these keys of torch's LRScheduler.state_dict() (two of them private), and drops the rest;
    a torch that renames one would resume the schedule from its start."""
    import torch

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    lambdas = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt.step()
    lambdas.step()
    state = lambdas.state_dict()
    assert {"last_epoch", "_step_count", "_last_lr", "base_lrs", "lr_lambdas"} <= set(state)
    assert state["last_epoch"] == 1 and state["_step_count"] == 2
    onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert "total_steps" in onecycle.state_dict()
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    assert "step_size" in step.state_dict()
