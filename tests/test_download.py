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

from cifar_job.data import FOLDER, load_split, make_synthetic


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
