"""The data path: batch augmentation, normalization, sharding and the split."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest import batch_bytes

from cifar_job import OptionError
from cifar_job.config import TrainConfig
from cifar_job.dataset import FOLDER, TEST_BATCHES, TRAIN_BATCHES, load_split, make_synthetic
from cifar_job.loader import (
    MEAN,
    PAD,
    PAD_LABEL,
    STD,
    CIFAR10DataModule,
    ShardSampler,
    TensorLoader,
    augment,
    normalize,
)


def test_crop_offsets_stay_within_the_padding():
    # Channel 0 holds each pixel's row + 1, channel 1 its column + 1; padding is 0. So the
    # centre pixel of a crop tells its offset, and a flip shows as a falling column ramp.
    n = 2000
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = torch.arange(1, 33, dtype=torch.uint8)[:, None]
    images[:, 1] = torch.arange(1, 33, dtype=torch.uint8)[None, :]
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    offsets = set()
    for img in out:
        cols = img[1, 16]
        flipped = bool(cols[17] < cols[16])
        if flipped:
            img = img.flip(2)
        assert (img[1, 16, 1:].int() - img[1, 16, :-1].int()).clamp(min=0).max() == 1
        dy, dx = int(img[0, 16, 16]) - 17, int(img[1, 16, 16]) - 17
        offsets.add((dy, dx))
    assert all(-4 <= dy <= 4 and -4 <= dx <= 4 for dy, dx in offsets)
    assert len(offsets) > 75  # nearly all 81 offsets occur in 2000 draws


def test_flip_rate_is_near_one_half():
    n = 4000
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[..., :, :16] = 255  # left half white
    out = augment(images, torch.Generator().manual_seed(1), pad=0)
    flipped = (out[:, 0, 16, 31] == 255).float().mean().item()
    assert 0.46 < flipped < 0.54


def test_normalization_matches_cifar_statistics():
    images = (torch.tensor(MEAN) * 255).round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert normalize(images).abs().max() < 0.01
    white = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-5)


def test_training_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    shards = [list(ShardSampler(103, rank, 2, shuffle=True, seed=3)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0]) & set(shards[1])
    sampler = ShardSampler(103, 0, 2, shuffle=True, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]


def test_eval_shards_cover_every_image_once():
    shards = [list(ShardSampler(11, rank, 3, shuffle=False, seed=0)) for rank in range(3)]
    assert sorted(i for i in sum(shards, []) if i != PAD) == list(range(11))


@pytest.mark.parametrize(
    ("world", "batch", "n"),
    [(32, 256, 10_000), (2, 100, 101), (3, 3, 11), (4, 8, 3), (8, 64, 5_000), (7, 7, 1)]
    + [(w, b * w, n) for w in (2, 5, 16) for b in (1, 3, 8) for n in (1, 17, 99, 1000)],
)
def test_every_rank_runs_as_many_eval_batches_and_each_image_counts_once(world, batch, n):
    """Uneven shards were uneven batch counts, and a collective per batch then deadlocked."""
    labels = torch.arange(n)  # an image's label is its index here
    images = torch.zeros(n, 1, dtype=torch.uint8)
    counts, seen = set(), []
    for rank in range(world):
        sampler = ShardSampler(n, rank, world, shuffle=False, seed=0)
        loader = TensorLoader(images, labels, sampler, batch // world, drop_last=False)
        batches = list(loader)
        counts.add(len(batches))
        assert len(batches) == len(loader)
        for x, y in batches:
            assert len(x) == len(y)
            seen += y[y != PAD_LABEL].tolist()
    assert len(counts) == 1  # the same number of batches on every rank
    assert sorted(seen) == list(range(n))  # every image once; padding counts nowhere


def test_resumed_sampler_continues_with_the_unseen_indices():
    full = list(ShardSampler(100, 0, 1, shuffle=True, seed=5))
    resumed = ShardSampler(100, 0, 1, shuffle=True, seed=5)
    resumed.skip = 30
    assert list(resumed) == full[30:]
    assert len(resumed) == 100  # Lightning counts the skipped batches as done


def test_split_is_deterministic_by_seed_and_disjoint():
    def split(seed):
        dm = CIFAR10DataModule(
            TrainConfig(dataset="synthetic", synthetic_size=500, val_size=50, seed=seed)
        )
        dm.setup("fit")
        return dm.splits

    a, b, c = split(1), split(1), split(2)
    assert torch.equal(a["val"].images, b["val"].images)
    assert not torch.equal(a["val"].images, c["val"].images)
    assert len(a["train"]) == 450 and len(a["val"]) == 50


def test_synthetic_classes_differ_and_train_and_test_share_them():
    train_x, train_y = make_synthetic(2000, seed=0, split="train")
    test_x, test_y = make_synthetic(500, seed=0, split="test")
    assert train_x.dtype == torch.uint8 and train_x.shape == (2000, 3, 32, 32)
    assert set(train_y.tolist()) == set(range(10))
    # A nearest-class-mean classifier on the raw pixels already beats chance by far.
    means = torch.stack([train_x[train_y == k].float().mean(0) for k in range(10)])
    dists = ((test_x.float()[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dists.argmin(1) == test_y).float().mean() > 0.5
    assert not torch.equal(train_x[:500], test_x)


def test_tensor_path_and_dataloader_path_give_identical_batches():
    def batches(loader):
        dm = CIFAR10DataModule(
            TrainConfig(
                dataset="synthetic",
                synthetic_size=300,
                val_size=40,
                batch_size=32,
                num_workers=0,
                data_loader=loader,
            )
        )
        dm.setup("fit")
        return list(dm.train_dataloader()), list(dm.val_dataloader())

    (fast_train, fast_val), (torch_train, torch_val) = batches("tensor"), batches("torch")
    assert len(fast_train) == len(torch_train) == 260 // 32
    for (a, y1), (b, y2) in zip(fast_train + fast_val, torch_train + torch_val):
        assert a.dtype == b.dtype == torch.uint8
        assert torch.equal(a, b) and torch.equal(y1, y2)
    # Both then go through the same on-device augment and normalize.


def test_cutout_blanks_one_square_of_the_mean_colour():
    images = torch.zeros(500, 3, 32, 32, dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(2), pad=0, cutout=8)
    mean = (torch.tensor(MEAN) * 255).round().to(torch.uint8)
    blank = (out == mean.view(1, 3, 1, 1)).all(1)  # pixels set to the mean colour
    sizes = blank.flatten(1).sum(1)
    assert sizes.max() == 64 and (sizes > 0).all()  # a whole 8x8 square, or its clipped part
    assert (sizes == 64).float().mean() > 0.5


def test_tensor_loader_resumes_mid_epoch_with_the_unseen_batches():
    dm = CIFAR10DataModule(
        TrainConfig(dataset="synthetic", synthetic_size=300, val_size=40, batch_size=20)
    )
    dm.setup("fit")
    full = list(dm.train_dataloader())
    dm.load_state_dict({"epoch": 0, "samples_done": 80})  # as restored from a checkpoint
    resumed = list(dm.train_dataloader())
    assert len(resumed) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[4:]))


def test_batch_files_load_pixel_for_pixel_from_arrays_and_from_bytes(tmp_path):
    """The official files hold numpy arrays (wrapped as they lie); a re-pickled copy may hold
    bytes (read-only, copied). Both must give back exactly the images and labels written."""
    images, labels = make_synthetic(60, seed=3)
    folder = tmp_path / FOLDER
    folder.mkdir()
    parts = [slice(i * 12, (i + 1) * 12) for i in range(5)]
    for name, part in zip(TRAIN_BATCHES, parts, strict=True):
        data = batch_bytes(images[part], labels[part].tolist(), name)
        if name == "data_batch_2":
            entry = pickle.loads(data)
            entry[b"data"] = entry[b"data"].tobytes()
            data = pickle.dumps(entry)
        (folder / name).write_bytes(data)
    (folder / TEST_BATCHES[0]).write_bytes(batch_bytes(images[:7], labels[:7].tolist(), "t"))
    got_images, got_labels = load_split(tmp_path, train=True)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    test_images, test_labels = load_split(tmp_path, train=False)
    assert torch.equal(test_images, images[:7]) and torch.equal(test_labels, labels[:7])


@pytest.mark.parametrize("option, value", [("data_loader", "device"), ("dataset", "cifar100")])
def test_unknown_loader_or_dataset_is_refused(option, value):
    with pytest.raises(OptionError, match=f"^--{option.replace('_', '-')} must be one of"):
        TrainConfig(**{option: value}).validate()


def test_a_resume_on_another_number_of_ranks_sees_exactly_the_unseen_samples():
    """Two ranks stop after 3 of their batches; the run resumes on one rank, then on four.
    Together they see every sample of the epoch once (less the remainder dropped)."""

    class Ranks:  # what the DataModule asks its Trainer
        def __init__(self, rank: int, world: int, done: int = 0) -> None:
            self.global_rank, self.world_size, self.current_epoch = rank, world, 0
            self.strategy = SimpleNamespace(root_device=torch.device("cpu"))
            self.fit_loop = SimpleNamespace(
                epoch_loop=SimpleNamespace(
                    batch_progress=SimpleNamespace(current=SimpleNamespace(processed=done))
                )
            )

    cfg = TrainConfig(dataset="synthetic", synthetic_size=340, val_size=20, batch_size=16)

    def labels_seen(trainer: Ranks, state: dict | None, batches: int | None = None) -> list:
        dm = CIFAR10DataModule(cfg)
        dm.trainer = trainer  # type: ignore[assignment]
        dm.setup("fit")
        dm.splits["train"].labels = torch.arange(len(dm.splits["train"]))  # sample ids
        dm.load_state_dict(state or {})
        loader = dm.train_dataloader()
        out = [y.tolist() for _, y in list(loader)[:batches]]
        return [i for batch in out for i in batch], dm

    first = [labels_seen(Ranks(r, 2), None, batches=3)[0] for r in range(2)]
    _, dm = labels_seen(Ranks(0, 2, done=3), None, batches=0)
    state = dm.state_dict()
    assert state == {"epoch": 0, "samples_done": 48}
    on_one, _ = labels_seen(Ranks(0, 1), state)
    seen = first[0] + first[1] + on_one
    assert len(seen) == len(set(seen)) == 320  # 320 training images, 20 whole batches
    on_four = [labels_seen(Ranks(r, 4), state)[0] for r in range(4)]
    assert sorted(first[0] + first[1] + sum(on_four, [])) == sorted(seen)
