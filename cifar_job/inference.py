"""Using a trained checkpoint: load it safely, evaluate it on the test set, classify images."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from cifar_job import CifarJobError
from cifar_job.config import TrainConfig
from cifar_job.dataset import CLASSES
from cifar_job.loader import normalize
from cifar_job.model import build_network


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, TrainConfig]:
    """The network and config stored in a checkpoint, loaded with weights_only=True.

    A checkpoint from elsewhere is untrusted input: a full unpickle could run any code.
    """
    path = Path(path)
    if not path.is_file():
        raise CifarJobError(f"checkpoint {path} does not exist or is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file or a truncated one: the unpickler raises anything
        why = "not a PyTorch file, or cut short"
        if "Weights only load failed" in str(e):
            why = "it holds code or objects besides tensors, which are not loaded, for safety"
        raise CifarJobError(f"{path} is not a readable cifar-job checkpoint: {why}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CifarJobError(f"{path} is not a cifar-job checkpoint (no state_dict and config)")
    try:
        cfg = TrainConfig.from_dict(dict(ckpt["hyper_parameters"]))
    except (TypeError, ValueError) as e:
        raise CifarJobError(f"{path} was not written by cifar-job ({e})") from None
    net = build_network(cfg.arch, cfg.stem)
    weights = {
        k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")
    }
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise CifarJobError(
            f"{path}: its weights do not fit a {cfg.arch} with the {cfg.stem} stem "
            f"({str(e).splitlines()[0]})"
        ) from None
    return net.eval(), cfg


def load_image(path: str | Path) -> torch.Tensor:
    """Any image Pillow reads, as a 3 x 32 x 32 uint8 tensor (resized, RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow only warns between MAX_IMAGE_PIXELS (89 million) and twice that: an image
        # that large is not a photo to classify, and decoding it takes gigabytes.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise CifarJobError(f"image {path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CifarJobError(f"image {path} is too large to decode safely: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CifarJobError(f"cannot read image {path}: {e}") from None
    return data.view(32, 32, 3).permute(2, 0, 1).contiguous()


@torch.inference_mode()
def predict(
    net: torch.nn.Module, images: torch.Tensor, top_k: int = 3
) -> list[list[dict[str, Any]]]:
    """Top-k classes with probabilities for each uint8 image of an N x 3 x 32 x 32 batch."""
    probs = net(normalize(images)).softmax(dim=1)
    values, indices = probs.topk(min(top_k, len(CLASSES)), dim=1)
    return [
        [{"class": CLASSES[i], "index": int(i), "prob": float(p)} for p, i in zip(ps, ix)]
        for ps, ix in zip(values.tolist(), indices.tolist())
    ]


def evaluate(
    ckpt_path: str | Path,
    data_dir: str | None = None,
    accelerator: str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Test-set metrics of a checkpoint, on the data it was trained on (or on data_dir), with
    its own batch size and precision unless told otherwise."""
    from cifar_job.module import CifarClassifier
    from cifar_job.train import build_datamodule
    from cifar_job.trainer import build_eval_trainer

    net, cfg = load_checkpoint(ckpt_path)
    cfg.data_dir = data_dir or cfg.data_dir
    cfg.batch_size = batch_size or cfg.batch_size
    # No download of ImageNet weights that are replaced at once, and no minutes of compiling
    # for one pass over the test set: the compiled network computes the same function.
    cfg.pretrained = cfg.download = cfg.compile = False
    model = CifarClassifier(cfg.to_dict())
    # Into the module's own network: a replaced one would leave its forward (channels-last,
    # compiled) running the weights it was built with.
    model.net.load_state_dict(net.state_dict())
    trainer = build_eval_trainer(accelerator or cfg.accelerator, cfg.precision, progress)
    metrics = trainer.test(model, datamodule=build_datamodule(cfg), verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}
