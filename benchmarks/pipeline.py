"""Data-pipeline speed: the naive per-image path against tuner's decode-once path.

On a folder of realistic JPEGs (700×460 dermoscopy-like photos, resized to 224):

  (a) naive: torchvision ImageFolder + PIL transforms + DataLoader(num_workers=2),
      every image decoded, resized and augmented per epoch, one at a time;
  (b) tuner: decoded and resized once into the cache, then per epoch an index,
      a float conversion and batched per-sample augmentation on the device.

Both apply a horizontal flip and a ±15° rotation, nearest-neighbour as
torchvision's RandomRotation does by default; (c) repeats (b) with the bilinear
rotation tuner's presets use. Then one real training epoch
of a model with tuner's loop is compared with the pure model steps on
ready-made tensors: the difference is the data overhead. All numbers come from
one run, so they are comparable to each other on a noisy machine.

    python benchmarks/pipeline.py                 # 256 images, resnet18
    python benchmarks/pipeline.py --n-images 512 --model small_cnn
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tuner.data import load_dataset
from tuner.data.augment import AugmentConfig, BatchAugment
from tuner.data.loader import TensorSplit, iterate_batches
from tuner.data.synthetic import CLASS_NAMES, make_synthetic
from tuner.train.build import build_classifier, model_normalization
from tuner.train.hparams import Hyperparameters
from tuner.train.loop import train_one_epoch
from tuner.train.losses import build_loss
from tuner.train.optim import build_optimizer, build_scheduler


def write_jpegs(root: Path, n: int) -> None:
    images, labels = make_synthetic(n, image_size=160, minority_fraction=0.2, seed=0)
    rng = np.random.default_rng(0)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        photo = Image.fromarray(img.transpose(1, 2, 0)).resize((700, 460), Image.Resampling.BICUBIC)
        noisy = np.asarray(photo, dtype=np.int16) + rng.integers(-6, 7, (460, 700, 3))
        folder = root / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=92)


def naive_loader(root: Path, size: int, batch_size: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(15),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    return DataLoader(datasets.ImageFolder(root, tf), batch_size=batch_size, shuffle=True, num_workers=2)


def naive_images_per_second(root: Path, size: int, batch_size: int, epochs: int) -> float:
    loader = naive_loader(root, size, batch_size)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).parent / "_data" / "jpegs", help="JPEG folder (made if absent)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    if not args.data.exists():
        print(f"writing {args.n_images} JPEGs (700x460) to {args.data} ...")
        write_jpegs(args.data, args.n_images)
    n = sum(1 for _ in args.data.rglob("*.jpg"))

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        ds = load_dataset(
            str(args.data), image_size=args.size, cache_dir=Path(cache), val_fraction=0.1, test_fraction=0.1
        )
        decode_once = time.perf_counter() - start
        # Time the decode-once path on every image, as the naive path does.
        images = np.concatenate([ds.train.images, ds.val.images])
        labels = np.concatenate([ds.train.labels, ds.val.labels])
    split = TensorSplit.from_numpy(images, labels, torch.device("cpu"))
    hp = Hyperparameters(model=args.model, batch_size=args.batch_size)
    model = build_classifier(hp, num_classes=2, channels=3, image_size=args.size)
    normalize = model_normalization(model, hp.model, 3)
    gen = torch.Generator().manual_seed(0)

    def batches(augment: BatchAugment):
        order = torch.randperm(len(split), generator=gen)
        return iterate_batches(split, order, args.batch_size, normalize=normalize, augment=augment, generator=gen)

    def images_per_second(augment: BatchAugment) -> float:
        seen, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for x, _ in batches(augment):
                seen += len(x)
        return seen / (time.perf_counter() - start)

    # torchvision's RandomRotation interpolates nearest by default; tuner's presets use bilinear.
    nearest = BatchAugment(AugmentConfig(hflip=0.5, rotation=15.0, interpolation="nearest"))
    augment = BatchAugment(AugmentConfig(hflip=0.5, rotation=15.0))
    # Interleaved, best of three each: this machine's noise hits both paths alike.
    naive = cached_nearest = cached = 0.0
    for _ in range(3):
        naive = max(naive, naive_images_per_second(args.data, args.size, args.batch_size, args.epochs))
        cached_nearest = max(cached_nearest, images_per_second(nearest))
        cached = max(cached, images_per_second(augment))

    # One real epoch through tuner's loop versus the same model steps on ready-made tensors.
    loss_fn = build_loss("ce", num_classes=2)
    optimizer = build_optimizer("adam", model.parameters(), lr=1e-3)
    schedule = build_scheduler("none", optimizer, max_epochs=1, steps_per_epoch=1)
    ready = list(batches(augment))
    train_one_epoch(model, ready[:2], loss_fn=loss_fn, optimizer=optimizer, schedule=schedule)  # warm-up
    start = time.perf_counter()
    train_one_epoch(model, ready, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule)
    model_only = time.perf_counter() - start
    start = time.perf_counter()
    train_one_epoch(model, batches(augment), loss_fn=loss_fn, optimizer=optimizer, schedule=schedule)
    full_epoch = time.perf_counter() - start

    # The naive path inside a real epoch: its two workers share the two cores with the model.
    start = time.perf_counter()
    train_one_epoch(
        model,
        naive_loader(args.data, args.size, args.batch_size),
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
    )
    naive_epoch = time.perf_counter() - start

    print(f"{n} JPEGs 700x460 -> {args.size}px, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"(a) naive ImageFolder + PIL + DataLoader(2 workers): {naive:8.1f} images/s")
    print(f"(b) tuner decode-once + batched augmentation, nearest as (a): {cached_nearest:8.1f} images/s")
    print(f"    speed-up (b)/(a):                                {cached_nearest / naive:8.1f}x")
    print(f"(c) the same with bilinear rotation (tuner's default): {cached:6.1f} images/s")
    print(f"    speed-up (c)/(a):                                {cached / naive:8.1f}x")
    print(f"    one-off decode into the cache:                   {decode_once:8.1f} s ({n / decode_once:.0f} images/s)")
    print(f"{args.model} epoch with tuner's pipeline {full_epoch:.2f} s vs model steps alone {model_only:.2f} s")
    print(f"    data overhead: {100 * (full_epoch - model_only) / full_epoch:.1f}% of the epoch")
    print(f"{args.model} epoch with the naive pipeline {naive_epoch:.2f} s ({naive_epoch / full_epoch:.2f}x tuner's)")


if __name__ == "__main__":
    main()
