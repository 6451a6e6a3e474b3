from __future__ import annotations

import contextlib
import csv
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.servers import postgres_bindir, postgres_server
from tuner.cli import app

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def unavailable(what: str, fix: str) -> NoReturn:
    """A test's server, package or file is missing: under CI (``CI`` set) the test fails with the fix, else it
    skips, so a CI run never passes by skipping what it was meant to run."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI: {fix}")
    pytest.skip(f"{what} is not available ({fix})")


def needed(module: str, fix: str = "pip install -e '.[test]' installs it") -> ModuleType:
    """``module`` imported, or the test reported :func:`unavailable`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(module, fix)


@pytest.fixture
def breastmnist() -> Path:
    path = SHARED_DATA / "breastmnist.npz"
    if not path.exists():
        unavailable("../shared/data/breastmnist.npz", "the shared data folder beside the clone holds it")
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
    if "metrics" in space["study"]:  # a multi-objective study names its objectives instead
        del space["study"]["metric"]
    return space


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def start_tuner(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m tuner ARGS`` in ``cwd``, in its own session (killable with its workers), output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def lesion_npz(tmp_path: Path) -> Path:
    return write_lesion_npz(tmp_path / "lesions.npz")


def write_lesion_npz(path: Path) -> Path:
    """The built-in synthetic lesions as a MedMNIST-style archive with its own train/val/test splits."""
    from tuner.data.synthetic import make_synthetic

    images, labels = make_synthetic(360, image_size=16, minority_fraction=0.25, seed=5)
    images = images.transpose(0, 2, 3, 1)  # N×H×W×C, as MedMNIST stores colour images
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


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server on loopback, started for this test session and stopped after it."""
    if postgres_bindir() is None:
        unavailable("PostgreSQL's server binaries", "apt-get install postgresql, as .ci/run does")
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def tiny_device_data(tmp_path_factory):
    """200 built-in synthetic lesions at 16 px, train and validation on the CPU, for loop-level tests."""
    import torch

    from tuner.data import load_dataset
    from tuner.data.device import DeviceData

    ds = load_dataset(
        "synthetic",
        image_size=16,
        cache_dir=tmp_path_factory.mktemp("cache"),
        synthetic_options={"n_images": 200, "minority_fraction": 0.25},
    )
    return DeviceData.from_dataset(ds, torch.device("cpu"))


SLURM_DAEMONS = ("munged", "slurmctld", "slurmd")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node Slurm cluster on loopback (Debian's munge, slurmctld and slurmd, run as root), started
    for this test session and stopped after it. Yields the environment sbatch and squeue need."""
    missing = [d for d in SLURM_DAEMONS if shutil.which(d) is None]
    if missing:
        unavailable(", ".join(missing), "apt-get install slurmctld slurmd slurm-client munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster runs its daemons as root")
    root = Path(tempfile.mkdtemp(prefix="tuner-slurm-"))
    (root / "munge").mkdir(mode=0o700)
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = root / "munge" / "munge.socket"
    subprocess.run(
        [
            shutil.which("munged"),
            f"--key-file={key}",
            f"--socket={socket_path}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'munge' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'seed'}",
            "--force",
        ],
        check=True,
    )
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=tuner
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(
            [shutil.which(name), "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        for name in ("slurmctld", "slurmd")
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            log = (root / "slurmctld.log").read_text() if (root / "slurmctld.log").exists() else ""
            pytest.fail(f"the Slurm node never became idle (sinfo: {state!r}); slurmctld log:\n{log[-2000:]}")
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        pid_file = root / "munge" / "munged.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
