"""The image on the Slurm cluster, through NVIDIA's pyxis plugin and enroot, both built from
source and enabled on the test cluster by tests/cluster/pyxis.sh: the pyxis template and
`cifar-job submit --container-image` train inside the container, are preempted, and resume
there; the image's PATH, working directory and user behave as the README says.

The jobs run as an ordinary user, as on a site, with the image as a squashfs file: the
Docker one (conftest's `image`), imported once by root into pyxis's import cache, since a
site's users may not talk to a Docker engine (the importer's dockerd:// is root's here)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IMAGE, REPO, SMOKE, cifar_job, sh
from slurmjobs import (
    ONE_NODE_TWO_TASKS,
    STEPS_PER_EPOCH,
    SUBMIT_TWO_NODES,
    TRAIN,
    USER,
    assert_no_rank_left,
    assert_owned_by_user,
    ckpt_step,
    manifest_starts,
    preempt,
    readable_by_user,
    resumed_steps,
    run_as_user,
    saved_steps,
    sbatch,
    wait_done,
    wait_for_step,
)

# 30 min: the first test's set-up builds the image (or imports it into enroot) from nothing,
# which took 10 min on 2026-12-01 and ran past 10 on a machine 2.4x slower (2026-12-07).
pytestmark = [pytest.mark.container, pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]

URI = f"dockerd://{IMAGE}"
VENV_PYTHON = "/opt/venv/bin/python"
# The CIFAR-format archive's 1,500 training images less 500 for validation: 25 steps an epoch,
# as in the other cluster tests; read from a data directory outside the submit directory.
RUN = [
    *("--dataset", "cifar10", "--val-size", "500", "--max-epochs", "2"),
    *TRAIN[TRAIN.index("--arch") :],
]
TOTAL = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def pyxis(cluster, image) -> str:
    """enroot and pyxis on the cluster, and the image in the import cache. Returns the path
    of its squashfs file, which every user may read."""
    t0 = time.monotonic()
    setup = sh(str(REPO / "tests/cluster/pyxis.sh"))
    if setup.returncode == 3:
        pytest.skip(setup.stderr.strip())
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]
    figures = {"setup_s": round(time.monotonic() - t0, 1)}
    for step in ("first_step_s", "later_step_s"):  # the first one imports the image
        t0 = time.monotonic()
        ran = sh("srun", "-N2", f"--container-image={URI}", "true", cwd="/tmp")
        figures[step] = round(time.monotonic() - t0, 1)
        assert ran.returncode == 0, ran.stderr
    print(f"\npyxis figures: {json.dumps(figures)}")
    state = Path(os.environ.get("ENROOT_TEST_STATE", "/var/lib/cifar-job-enroot"))
    cached = sh(str(state / "import-cache"), "get", URI)  # the file of the steps above
    assert cached.returncode == 0, cached.stderr
    return cached.stdout.strip()


def assert_trained_in_the_container_to_the_end(run_dir: Path, log: str) -> None:
    """One preemption: saved, resumed at that very step inside the image, finished."""
    saved = saved_steps(log)
    assert len(saved) == 1 and resumed_steps(run_dir) == [None, *saved], log[-3000:]
    assert ckpt_step(run_dir) == TOTAL
    starts = manifest_starts(run_dir)
    assert all(s["python"].startswith(VENV_PYTHON) for s in starts)
    assert all(s["image"] == {"version": "test", "revision": "abc123"} for s in starts)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == TOTAL and 0 <= results["test/acc"] <= 1
    assert log.count("waiting for Slurm to end it") == 1 and "after the run saved" in log
    assert "Bus error" not in log  # the image stayed mounted while the ranks saved
    assert_no_rank_left(run_dir)


def test_pyxis_template_is_preempted_and_resumes_inside_the_container(pyxis, data_dir, tmp_path):
    """sbatch slurm/ddp_4gpu_pyxis.sh, CPU, 1 node x 2 tasks, in the preemptible partition."""
    run_dir = tmp_path / "run"
    template = str(REPO / "slurm/ddp_4gpu_pyxis.sh")
    env = {"IMAGE": pyxis, "RUN_DIR": str(run_dir), "DATA_DIR": str(readable_by_user(data_dir))}
    job = sbatch(
        *("-p", "low", *ONE_NODE_TWO_TASKS, template, *RUN),
        cwd=tmp_path,
        as_ordinary_user=True,
        **env,
    )
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_step(log.name, tmp_path, TOTAL // 3, after="start 1 on")
    preempt(tmp_path)
    assert wait_done(job, timeout=400) == "COMPLETED", log.read_text()[-3000:]
    assert_trained_in_the_container_to_the_end(run_dir, log.read_text())
    assert log.read_text().count("1 CPU thread(s) each") == 2  # the one CPU each task got
    assert_owned_by_user(run_dir)


def test_submit_with_a_container_image_on_two_nodes_resumes_inside_it(pyxis, data_dir, tmp_path):
    """cifar-job submit --container-image ... --nodes 2, from the host's venv (a login node)."""
    run_dir = tmp_path / "run"
    submitted = run_as_user(
        *("cifar-job", *SUBMIT_TWO_NODES),
        *("--partition", "low", "--container-image", pyxis, "--accelerator", "cpu"),
        *RUN,
        *("--data-dir", str(readable_by_user(data_dir)), "--run-dir", str(run_dir)),
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted job ")[1].split()[0]
    log = f"submitit/{job}_0_log.out"
    wait_for_step(log, run_dir, TOTAL // 3, after="start 1 on")
    preempt(tmp_path)
    assert wait_done(job, timeout=400) == "COMPLETED"
    text = (run_dir / log).read_text()
    assert_trained_in_the_container_to_the_end(run_dir, text)
    assert text.count("2 process(es) on 2 node(s)") == 2  # both starts, on both nodes
    info = json.loads(cifar_job("status", str(run_dir), "--json").stdout)
    assert info["state"] == "finished" and info["restarts"] == 1
    assert_owned_by_user(run_dir)


def test_a_container_that_cannot_start_fails_the_job_without_training_on_the_host(pyxis, tmp_path):
    """pyxis is loaded as `required`, as on sites: the step fails with pyxis's message, and
    nothing runs outside the image (with `optional`, srun ran the job on the host)."""
    run_dir = tmp_path / "run"
    template = str(REPO / "slurm/ddp_4gpu_pyxis.sh")
    missing = str(Path(pyxis).with_name("no-such-image.sqsh"))
    env = {"IMAGE": missing, "RUN_DIR": str(run_dir), "DATA_DIR": str(tmp_path)}
    job = sbatch(*ONE_NODE_TWO_TASKS, template, *SMOKE, cwd=tmp_path, as_ordinary_user=True, **env)
    assert wait_done(job, timeout=120) == "FAILED"
    log = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert "pyxis" in log and "container" in log, log[-3000:]
    assert "Requeue" not in log and "requeueing" not in log
    assert not (run_dir / "manifest.json").exists() and not list(run_dir.glob("*.ckpt"))


def test_image_path_workdir_and_user_under_enroot(pyxis, tmp_path):
    """enroot keeps the image's ENV (PATH with the venv, HOME) and WORKDIR, ignores its USER
    (1000) and runs as the job's user, an ordinary one; files in a mounted run directory are
    that user's, within the user's umask."""

    def in_container(*args: str) -> subprocess.CompletedProcess[str]:
        mount = f"--container-mounts={tmp_path}:{tmp_path}"
        return run_as_user("srun", "-N1", f"--container-image={pyxis}", mount, *args, cwd=tmp_path)

    shell = in_container("bash", "-c", 'echo "$(id -u) $PWD $HOME $(command -v cifar-job)"')
    assert shell.returncode == 0, shell.stderr
    uid, workdir, home, command = shell.stdout.split()
    assert (workdir, home, command) == ("/runs", "/home/cifar", "/opt/venv/bin/cifar-job")
    assert uid == str(pwd.getpwnam(USER).pw_uid)
    assert uid not in ("0", "1000")  # the job's user: neither root nor the image's

    moved = in_container(f"--container-workdir={tmp_path}", "pwd")
    assert moved.stdout.strip() == str(tmp_path)

    smoke = tmp_path / "smoke"
    train = in_container("cifar-job", "train", *SMOKE, "--run-dir", str(smoke))
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert_owned_by_user(smoke)
