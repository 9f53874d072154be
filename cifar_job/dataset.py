"""CIFAR-10 on disk: download (once per node, under a lock), verify, extract, and read the
python batches into uint8 tensors; and generated data of the same shape.

torchvision's `datasets.CIFAR10` is not used: it refuses any archive but the official one (so a
site mirror with its own md5 or a test archive cannot go through it). Nothing here reads
environment variables or ranks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cifar_job import CifarJobError
from cifar_job.config import CLASSES
from cifar_job.rundir import write_atomic

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
VERIFIED_MARKER = ".verified.json"


# ----------------------------------------------------------------------------- download


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, progress: bool = True) -> None:
    """Copy `url` (http, https or file) to `dest`, with a progress bar; no file on failure."""
    from tqdm import tqdm

    try:
        # 60 s: long enough for a slow mirror, short enough that an offline node fails fast-ish.
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=ARCHIVE_NAME,
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        dest.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise CifarJobError(
            f"could not download {url}: {reason}. With no internet here, run "
            "`cifar-job download` on a machine that has it (a login node) and copy the data "
            "directory, or pass --url with an internal mirror or a file:// path and --md5."
        ) from None


@contextlib.contextmanager
def download_lock(root: Path) -> Iterator[None]:
    """Hold the data directory's download lock: one writer at a time, on every node.

    A POSIX lock on a file in the directory, which NFS and Lustre (mounted with flock)
    share between nodes, and which the kernel drops when its holder dies. Where the
    filesystem has no locks, downloads still cannot corrupt each other (each stages its
    own copy and renames it into place); they only repeat the work.
    """
    with open(root / ".download.lock", "a") as f:
        try:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another download into {root} ...", file=sys.stderr)
                fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield


def extract(archive: Path, root: Path) -> None:
    """Unpack the archive into root, refusing members that would land outside it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                target = (root / member.name).resolve()
                if not target.is_relative_to(root.resolve()):
                    raise CifarJobError(f"{archive}: member {member.name!r} escapes the directory")
            tar.extractall(root, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CifarJobError(
            f"{archive} is truncated or not a tar.gz archive ({e}). Delete it and run "
            "`cifar-job download` again."
        ) from None


def download(
    data_dir: str | Path, url: str = CIFAR_URL, md5: str = CIFAR_MD5, progress: bool = True
) -> dict[str, Any]:
    """Fetch, verify and extract CIFAR-10 into data_dir; do nothing if it is already there.

    Safe to run from many nodes on one shared directory: one downloads, the others wait for
    it and then find the data verified. Nothing in place is replaced until its replacement
    is whole and checked: the archive is fetched under a temporary name and kept only if
    its md5 matches, and the batches are extracted and verified in a staging directory,
    then renamed into place with their verified marker inside.

    Returns the verification summary, with "already" true when nothing had to be done.
    """
    root = Path(data_dir)
    if (summary := read_verified(root)) is not None:
        return {**summary, "already": True}
    if root.exists() and not root.is_dir():
        raise CifarJobError(f"--data-dir {root} is a file; give a directory")
    root.mkdir(parents=True, exist_ok=True)
    with download_lock(root):
        if (summary := read_verified(root)) is not None:  # done by the one we waited for
            return {**summary, "already": True}
        archive = root / ARCHIVE_NAME
        if not (archive.exists() and md5sum(archive) == md5):
            part = root / f".{ARCHIVE_NAME}.{socket.gethostname()}.{os.getpid()}.part"
            fetch(url, part, progress)
            actual = md5sum(part)
            if actual != md5:
                part.unlink()
                raise CifarJobError(
                    f"md5 mismatch for {url}: expected {md5}, got {actual}. The download was "
                    "discarded and nothing in the data directory changed; check the URL and "
                    "the --md5 value, then run `cifar-job download` again."
                )
            os.replace(part, archive)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
        try:
            extract(archive, staging)
            summary = verify(staging)
            if (root / FOLDER).exists():  # damaged or unverified: out of the way, then gone
                os.rename(root / FOLDER, staging / "replaced")
            os.rename(staging / FOLDER, root / FOLDER)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {**summary, "already": False}


# ----------------------------------------------------------------------------- reading


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python batch file as (N x 3 x 32 x 32 uint8 images, N int64 labels)."""
    try:
        with open(path, "rb") as f:
            # The batches are pickles by CIFAR's own format; they come only from an archive
            # whose md5 was checked, or from a directory the user put there themselves.
            entry = pickle.load(f, encoding="bytes")
        # The official batches were pickled by Python 2 (keys load as bytes); a re-pickled
        # copy from Python 3 has str keys. Both are the same format.
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data, labels = entry["data"], entry["labels"]
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CifarJobError(
            f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})"
        ) from None
    # Wrapped where they lie (a writable, contiguous numpy array, as the official files
    # hold), else copied once; load_split's cat is then the only other copy.
    # (torch.as_tensor on a bytearray reads it one Python int at a time: 1.5 s per file.)
    try:
        view = memoryview(data).cast("B")
        if view.readonly:
            view = memoryview(bytearray(view))
    except TypeError as e:  # not a buffer, or not a contiguous one
        raise CifarJobError(f"{path}: image data is not a byte array ({e})") from None
    images = torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0)
    if images.numel() != len(labels) * 3072 or len(labels) == 0:
        raise CifarJobError(
            f"{path}: expected N x 3072 bytes of image data for {len(labels)} labels, "
            f"got {images.numel()} bytes. The data is damaged: run `cifar-job download` again."
        )
    targets = torch.as_tensor(list(labels), dtype=torch.int64)
    if targets.min() < 0 or targets.max() >= len(CLASSES):
        raise CifarJobError(
            f"{path}: labels must be 0..9, found {targets.min()}..{targets.max()}. "
            "The data is damaged: run `cifar-job download` again."
        )
    return images.view(-1, 3, 32, 32), targets


def load_split(data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The train or test split as one uint8 image tensor and one label tensor."""
    folder = Path(data_dir) / FOLDER
    if not folder.is_dir():
        raise CifarJobError(
            f"no CIFAR-10 data in {data_dir} (expected {folder}/). Run "
            f"`cifar-job download --data-dir {data_dir}` on a machine with internet, or use "
            "--download, or --dataset synthetic."
        )
    parts = [_read_batch(folder / name) for name in (TRAIN_BATCHES if train else TEST_BATCHES)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def verify(data_dir: str | Path) -> dict[str, Any]:
    """Check every extracted batch (shapes, labels, counts) and record that it passed."""
    root = Path(data_dir)
    try:
        train = load_split(root, train=True)[1]
        test = load_split(root, train=False)[1]
    except FileNotFoundError as e:
        raise CifarJobError(
            f"{e.filename} is missing: the data directory is incomplete. "
            f"Run `cifar-job download --data-dir {data_dir}` again."
        ) from None
    summary = {
        "train": len(train),
        "test": len(test),
        "classes": int(torch.cat([train, test]).unique().numel()),
    }
    # Atomically: a reader on another node sees no marker or a whole one. A read-only copy
    # (a site's shared data) takes none, and is verified again at each start.
    with contextlib.suppress(OSError):
        write_atomic(root / FOLDER / VERIFIED_MARKER, json.dumps(summary))
    return summary


def read_verified(data_dir: str | Path) -> dict[str, Any] | None:
    """The summary of an earlier successful verify, or None (also for a damaged marker)."""
    marker = Path(data_dir) / FOLDER / VERIFIED_MARKER
    try:
        summary = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "train" in summary else None


def make_synthetic(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 10-class dataset shaped like CIFAR-10, generated from the seed alone.

    Each class is a random smooth colour pattern (8x8 fields upsampled to 32x32, 60% of it
    shared by all classes); each image is its class pattern, randomly shifted by up to 4
    pixels, with per-image brightness and strong pixel noise. The class patterns depend on
    the seed alone and the samples on the split too, so train and test share classes but no
    images. A ResNet18 reaches about 98% in 3 epochs of 4,500 images; chance is 10%.
    """
    fields = torch.rand(len(CLASSES) + 1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    # 60% of every class pattern is shared, so the classes are close enough to need learning.
    coarse = 0.6 * fields[-1:] + 0.4 * fields[:-1]
    patterns = torch.nn.functional.interpolate(coarse, size=40, mode="bilinear") * 200 + 28
    g = torch.Generator().manual_seed(seed * 7919 + {"train": 1, "test": 2}[split])
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
    chans = torch.arange(3)[None, :, None, None]
    images = patterns[labels[:, None, None, None], chans, rows, cols]
    images = images * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
    images = images + 60 * torch.randn(images.shape, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


# ----------------------------------------------------------------------------- batches
