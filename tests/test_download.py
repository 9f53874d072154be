"""`cifar-job download`: the real fetch path against a server on 127.0.0.1 and file:// URLs."""

from __future__ import annotations

import functools
import http.server
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import N_TEST, batch_bytes, cifar_job, make_archive

from cifar_job.dataset import FOLDER, load_split, make_synthetic


@pytest.fixture()
def mirror(archive: tuple[Path, str]) -> Iterator[str]:
    """An HTTP server on loopback serving the archive's folder; yields its base URL."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(archive[0].parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_http_mirror_verifies_and_extracts(tmp_path, mirror, archive):
    url = f"{mirror}/{archive[0].name}"
    result = cifar_job("download", "--data-dir", str(tmp_path), "--url", url, "--md5", archive[1])
    assert result.returncode == 0, result.stderr
    assert "downloaded and verified: 1500 training and 200 test images, 10 classes" in result.stdout
    images, labels = load_split(tmp_path, train=True)
    assert images.shape == (1500, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9


def test_rerun_on_complete_directory_does_nothing(tmp_path, mirror, archive):
    url = f"{mirror}/{archive[0].name}"
    first = cifar_job("download", "--data-dir", str(tmp_path), "--url", url, "--md5", archive[1])
    assert first.returncode == 0, first.stderr
    (tmp_path / archive[0].name).unlink()  # a second fetch would now have to download again
    again = cifar_job("download", "--data-dir", str(tmp_path), "--url", url, "--md5", archive[1])
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert not (tmp_path / archive[0].name).exists()


def test_download_from_file_url(tmp_path, archive):
    result = cifar_job(
        "download", "--data-dir", str(tmp_path), "--url", archive[0].as_uri(), "--md5", archive[1]
    )
    assert result.returncode == 0, result.stderr
    images, labels = load_split(tmp_path, train=False)  # the archive's own test images
    expected_images, expected_labels = make_synthetic(N_TEST, seed=7, split="test")
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_offline_download_says_what_to_do(tmp_path):
    # Port 9 on loopback has no server: the same refusal an offline node gets.
    result = cifar_job(
        "download",
        "--data-dir",
        str(tmp_path),
        "--url",
        "http://127.0.0.1:9/cifar-10-python.tar.gz",
        "--md5",
        "0" * 32,
    )
    assert result.returncode == 1
    assert "could not download" in result.stderr and "--url" in result.stderr
    assert "Traceback" not in result.stderr


def test_md5_mismatch_is_refused_and_file_removed(tmp_path, archive):
    result = cifar_job(
        "download", "--data-dir", str(tmp_path), "--url", archive[0].as_uri(), "--md5", "f" * 32
    )
    assert result.returncode == 1
    assert "md5 mismatch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / archive[0].name).exists()
    assert not (tmp_path / FOLDER).exists()


def test_truncated_archive_is_reported(tmp_path, archive):
    cut = tmp_path / "mirror" / archive[0].name
    cut.parent.mkdir()
    cut.write_bytes(archive[0].read_bytes()[:5000])
    import hashlib

    md5 = hashlib.md5(cut.read_bytes()).hexdigest()  # right md5, broken archive
    result = cifar_job(
        "download", "--data-dir", str(tmp_path / "d"), "--url", cut.as_uri(), "--md5", md5
    )
    assert result.returncode == 1
    assert "truncated or not a tar.gz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_shape", "expected N x 3072 bytes"),
        ("bad_labels", "labels must be 0..9"),
        ("not_a_batch", "is not a CIFAR-10 batch file"),
        ("not_bytes", "image data is not a byte array"),
        ("missing_batch", "is missing"),
    ],
)
def test_damaged_batches_are_reported(tmp_path, case, expected):
    good = batch_bytes(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), [1] * 10, "ok")
    batches = {f"data_batch_{i}": good for i in range(1, 6)} | {"test_batch": good}
    if case == "wrong_shape":
        batches["data_batch_2"] = pickle.dumps({b"data": bytes(100), b"labels": [1] * 10})
    elif case == "bad_labels":
        batches["test_batch"] = batch_bytes(
            torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [3, 12], "x"
        )
    elif case == "not_bytes":
        batches["data_batch_1"] = pickle.dumps({b"data": [0] * 3072, b"labels": [1]})
    elif case == "not_a_batch":
        batches["data_batch_5"] = b"this is not a pickle"
    else:
        del batches["data_batch_3"]
    path = tmp_path / "cifar-10-python.tar.gz"
    md5 = make_archive(path, batches)
    result = cifar_job(
        "download", "--data-dir", str(tmp_path / "d"), "--url", path.as_uri(), "--md5", md5
    )
    assert result.returncode == 1, result.stdout
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_custom_url_needs_its_md5(tmp_path, archive):
    result = cifar_job("download", "--data-dir", str(tmp_path), "--url", archive[0].as_uri())
    assert result.returncode == 2
    assert "--url needs --md5" in result.stderr


def test_many_nodes_downloading_into_one_shared_directory_fetch_once(tmp_path, archive):
    """Four processes start `download` on one directory at once, as the first rank of every
    node of a job with --download does: one fetches, the others wait and find it done."""
    import subprocess
    import sys

    requests: list[str] = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Counting, directory=str(archive[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{archive[0].name}"
    shared = tmp_path / "shared"
    args = ["download", "--data-dir", str(shared), "--url", url, "--md5", archive[1]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cifar_job", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    server.shutdown()
    server.server_close()
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert len(requests) == 1, requests
    assert sum("downloaded and verified" in out for out, _ in outputs) == 1
    assert sum("already complete" in out for out, _ in outputs) == 3
    images, _ = load_split(shared, train=True)
    assert images.shape == (1500, 3, 32, 32)
    leftovers = [p.name for p in shared.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # no staging directory left behind


@pytest.fixture()
def read_only_copy(tmp_path, archive) -> Iterator[tuple[Path, Path]]:
    """(a verified data directory, the same directory bind-mounted read-only), as a site
    shares its copy of the data."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    source, view = tmp_path / "site-data", tmp_path / "read-only"
    view.mkdir()
    result = cifar_job(
        "download", "--data-dir", str(source), "--url", archive[0].as_uri(), "--md5", archive[1]
    )
    assert result.returncode == 0, result.stderr
    mount = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot bind-mount here: {mount.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield source, view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_a_read_only_data_directory_trains_and_verifies(read_only_copy, tmp_path):
    source, view = read_only_copy
    with pytest.raises(OSError):
        (view / "probe").write_text("")  # the mount really is read-only
    # Verified already: train reads it; then unverified (the marker gone from the source):
    # doctor and train verify it again, in memory, each time.
    for verified in (True, False):
        if not verified:
            (source / FOLDER / ".verified.json").unlink()
        run = cifar_job(
            "train",
            "--data-dir",
            str(view),
            "--run-dir",
            str(tmp_path / f"run-{verified}"),
            "--fast-dev-run",
            "--val-size",
            "100",
            "--arch",
            "resnet18",
            "--stem",
            "imagenet",
        )
        assert run.returncode == 0, run.stderr
        doctor = cifar_job("doctor", "--data-dir", str(view))
        assert "ok  data:" in doctor.stdout and "1500 training and 200 test" in doctor.stdout
    assert not (source / FOLDER / ".verified.json").exists()
