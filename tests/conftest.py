from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tuner.cli import app

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def breastmnist() -> Path:
    path = SHARED_DATA / "breastmnist.npz"
    if not path.exists():
        pytest.skip("../shared/data/breastmnist.npz is not available")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder, so studies/ and its cache land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _lesion(rng: np.random.Generator, malignant: bool, size: int = 20) -> np.ndarray:
    """A disc (benign) or a ragged, two-coloured blob (malignant) on a noisy background."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    angle = np.arctan2(yy, xx)
    radius = 0.3 + (0.08 * np.cos(5 * angle + rng.uniform(0, 6)) if malignant else 0)
    inside = np.hypot(yy, xx) < radius
    img = rng.integers(170, 230, (size, size, 3)).astype(np.uint8)
    img[inside] = (90, 50, 30) if not malignant else (40, 30, 80)
    return img


def make_image_folder(root: Path, counts: dict[str, int], *, seed: int = 0, grey: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.fromarray(_lesion(rng, cls == "malignant"))
            (img.convert("L") if grey else img).save(root / cls / f"{cls}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A few dozen small PNGs, deliberately imbalanced (8 malignant : 32 benign)."""
    return make_image_folder(tmp_path / "images", {"benign": 32, "malignant": 8})


@pytest.fixture
def csv_manifest(tmp_path: Path) -> Path:
    """60 PNGs from 20 patients (3 images each), with a group column."""
    root = make_image_folder(tmp_path / "csvimages", {"benign": 45, "malignant": 15}, seed=1)
    rows = []
    for cls in ("benign", "malignant"):
        for i, file in enumerate(sorted((root / cls).iterdir())):
            rows.append({"path": f"csvimages/{cls}/{file.name}", "label": cls, "patient": f"{cls}-p{i // 3}"})
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_space(**sections) -> dict:
    """A space that trains in about a second per trial on the built-in data at 16 px."""
    space = {
        "study": {"name": "tiny", "metric": "val_auroc", "n_trials": 3, "sampler": {"seed": 0, "n_startup_trials": 2}},
        "data": {"source": "synthetic", "image_size": 16, "synthetic": {"n_images": 240, "minority_fraction": 0.2}},
        "train": {"max_epochs": 2, "patience": None, "device": "cpu"},
        "params": {
            "model": "small_cnn",
            "width": 4,
            "depth": 2,
            "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": 32,
        },
    }
    for key, value in sections.items():
        space[key] = {**space[key], **value}
    return space


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def lesion_npz(tmp_path: Path) -> Path:
    """The built-in synthetic lesions as a MedMNIST-style archive with its own train/val/test splits."""
    from tuner.data.synthetic import make_synthetic

    images, labels = make_synthetic(360, image_size=16, minority_fraction=0.25, seed=5)
    images = images.transpose(0, 2, 3, 1)  # N×H×W×C, as MedMNIST stores colour images
    path = tmp_path / "lesions.npz"
    np.savez(
        path,
        train_images=images[:220],
        train_labels=labels[:220, None],
        val_images=images[220:290],
        val_labels=labels[220:290, None],
        test_images=images[290:],
        test_labels=labels[290:, None],
    )
    return path


def _postgres_bindir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server on loopback, started for this test session and stopped after it."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql)")
    # Not under pytest's tmp folders: those are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
    data = root / "data"
    # initdb and postgres refuse to run as root: run them as the postgres user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
        root.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tuner", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start")
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(f"postgresql://tuner@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as con:
            con.execute(sa.text("CREATE DATABASE tuner"))
        engine.dispose()
        yield f"postgresql://tuner@127.0.0.1:{port}/tuner"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_device_data(tmp_path_factory):
    """200 built-in synthetic lesions at 16 px, train and validation on the CPU, for loop-level tests."""
    import torch

    from tuner.data import load_dataset
    from tuner.training import DeviceData

    ds = load_dataset(
        "synthetic",
        image_size=16,
        cache_dir=tmp_path_factory.mktemp("cache"),
        synthetic_options={"n_images": 200, "minority_fraction": 0.25},
    )
    return DeviceData.from_dataset(ds, torch.device("cpu"))
