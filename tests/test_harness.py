"""The test harness's own scripts, from a new machine's empty state: the pyxis importer
(tests/cluster/import-cache.sh) with stand-ins for `docker` and `enroot` on PATH, so that
its bookkeeping runs in seconds without an image or a cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

IMPORTER = REPO / "tests/cluster/import-cache.sh"


@pytest.fixture
def importer(tmp_path: Path):
    """Run the importer against an empty cache, with a `docker` that reports the image ID in
    tmp_path/image-id and an `enroot` that writes a file (or fails) and logs each import."""
    bin_dir, cache = tmp_path / "bin", tmp_path / "cache"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\ncat "$STUB/image-id"\n')
    (bin_dir / "enroot").write_text(
        "#!/bin/sh\n"  # enroot import --output FILE URI
        'echo "$4" >> "$STUB/imports"\n'
        '[ -e "$STUB/fail" ] && { echo partial > "$3"; exit 1; }\n'
        'echo squashfs > "$3"\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB": str(tmp_path),
        "IMPORT_CACHE_DIR": str(cache),
    }

    def get(uri: str, image_id: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "image-id").write_text(image_id + "\n")
        return subprocess.run(
            ["bash", str(IMPORTER), "get", uri], env=env, capture_output=True, text=True
        )

    get.cache = cache  # type: ignore[attr-defined]
    get.imports = lambda: (tmp_path / "imports").read_text().split()  # type: ignore[attr-defined]
    get.fail = lambda: (tmp_path / "fail").touch()  # type: ignore[attr-defined]
    return get


def test_importer_imports_into_an_empty_cache_and_prints_the_file(importer):
    got = importer("dockerd://cifar-job:test", "sha256:aaa")
    assert got.returncode == 0, got.stderr
    path = Path(got.stdout.strip())
    assert path.read_text() == "squashfs\n" and path.parent == importer.cache
    assert sorted(p.name for p in importer.cache.iterdir()) == [
        ".lock",
        "sha256-aaa.sqsh",
        "sha256-aaa.sqsh.uri",
    ]


def test_importer_imports_an_image_once(importer):
    first = importer("dockerd://cifar-job:test", "sha256:aaa")
    again = importer("dockerd://cifar-job:test", "sha256:aaa")
    assert again.returncode == 0 and again.stdout == first.stdout
    assert importer.imports() == ["dockerd://cifar-job:test"]


def test_a_rebuilt_tag_replaces_the_file_of_its_old_image_only(importer):
    old = Path(importer("dockerd://cifar-job:test", "sha256:aaa").stdout.strip())
    other = Path(importer("dockerd://other:1", "sha256:bbb").stdout.strip())
    new = importer("dockerd://cifar-job:test", "sha256:ccc")
    assert new.returncode == 0, new.stderr
    assert Path(new.stdout.strip()).exists() and other.exists()
    assert not old.exists() and not Path(f"{old}.uri").exists()


def test_a_failed_import_fails_the_step_and_leaves_no_partial_file(importer):
    importer.fail()
    got = importer("dockerd://cifar-job:test", "sha256:aaa")
    assert got.returncode != 0 and got.stdout == ""
    assert [p.name for p in importer.cache.iterdir()] == [".lock"]


@pytest.mark.slurm
def test_the_cluster_starts_empty_over_the_state_of_a_controller_that_was_killed(
    cluster, tmp_path: Path
):
    """A machine image taken while jobs ran (as CI machines are made) keeps slurmctld's saved
    jobs: recovered RUNNING with no process behind them, they held both nodes for ever and
    start.sh failed with "nodes did not come up". A start after a hard stop must come up
    empty, with both nodes free."""
    job = subprocess.run(
        ["sbatch", "--parsable", "-N2", "--output=/dev/null", "--wrap", "sleep 300"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        ["sh", "-c", f"until squeue -h -j {job} -t R | grep -q .; do sleep 0.2; done"],
        timeout=60,
        check=True,
    )
    subprocess.run(["pkill", "-9", "-x", "slurmctld"], check=True)
    subprocess.run(["pkill", "-9", "-x", "slurmd"], check=True)
    started = subprocess.run(
        [str(REPO / "tests/cluster/start.sh")], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == ""
    states = subprocess.run(
        ["sinfo", "-h", "-N", "-p", "debug", "-o", "%T"], capture_output=True, text=True
    ).stdout.split()
    assert states == ["idle", "idle"]


@pytest.mark.slurm
def test_the_cluster_binds_each_task_to_cpus_of_its_own(cluster, tmp_path: Path):
    """As sites bind tasks (task/affinity): a node's two one-CPU tasks run on one CPU each,
    not both on every core; and a 2-node job's tasks on different cores of this machine, as
    on two machines (n2 numbers the cores the other way round)."""

    def masks(*layout: str) -> dict[str, str]:
        code = "import os, socket; print(socket.gethostname(), sorted(os.sched_getaffinity(0)))"
        out = subprocess.run(
            ["srun", *layout, "--cpus-per-task=1", "-l", "python3", "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return dict(sorted(line.split(": ", 1) for line in out.stdout.splitlines()))

    one_node = masks("-N1", "--ntasks-per-node=2")
    cpus = {m.split(" ", 1)[1] for m in one_node.values()}
    assert len(cpus) == 2 and all(c.count(",") == 0 for c in cpus), one_node
    two_nodes = masks("-N2", "--ntasks-per-node=1")
    assert [m.split()[0] for m in two_nodes.values()] == ["n1", "n2"], two_nodes
    assert len({m.split(" ", 1)[1] for m in two_nodes.values()}) == 2, two_nodes
