"""The weights search spaces need: where each would come from and whether it is here (``anoseg weights
list``), and fetching them into the torch / Hugging Face caches (``anoseg weights fetch``) on a machine with
network, so that a cluster can mount those caches on workers without it.

Both read :func:`anoseg.backbones.weights_source` (the one place that knows the offline packages, timm's
Hugging Face repos and torchvision's URLs); fetching goes through :func:`anoseg.backbones.fetch_weights`,
i.e. the loading code a trial runs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from anoseg.errors import ConfigError, WeightsError

__all__ = ["Target", "targets", "list_table", "fetch", "cache_locations"]


@dataclass(frozen=True)
class Target:
    """A backbone with the weights value one space (or the command line) gives it."""

    backbone: str
    weights: str
    origin: str  # the space file, or "command line"


def targets(items: Sequence[str]) -> list[Target]:
    """The (backbone, weights) pairs of space files and bare backbone names (``weights: hub``), each once."""
    from anoseg.backbones import list_backbones

    from search.space_schema import load_space

    known = {b.name for b in list_backbones()}
    out: dict[tuple[str, str], Target] = {}
    for item in items:
        path = Path(item)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            space = load_space(path)
            for name, entry in space.backbones.items():
                out.setdefault((name, str(entry["weights"])), Target(name, str(entry["weights"]), str(path)))
        elif item in known:
            out.setdefault((item, "hub"), Target(item, "hub", "command line"))
        else:
            import difflib

            close = difflib.get_close_matches(item, sorted(known), n=1)
            raise ConfigError(f"{item!r} is neither a space file nor a backbone"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; backbones: {', '.join(sorted(known))}")
    return list(out.values())


def cache_locations() -> str:
    from anoseg.backbones.weights import hub_cache_dirs

    torch_hub, hf_cache = hub_cache_dirs()
    return f"torch hub cache {torch_hub / 'checkpoints'}; Hugging Face cache {hf_cache}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header) - 1)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]  # noqa: E731
    return [fmt(header), *(fmt(r) for r in rows)]


def list_table(chosen: Sequence[Target]) -> str:
    """Per backbone: its weights value, where they come from, whether they are here, and the file / the gap."""
    from anoseg.backbones import weights_source
    from anoseg.backbones.weights import format_size

    rows = []
    present = 0
    for target in chosen:
        source = weights_source(target.backbone, target.weights)
        present += source.present
        detail = source.detail + (f" ({format_size(source.size)})" if source.present and source.size is not None else "")
        rows.append((target.backbone, target.weights, source.where, "yes" if source.present else "no", detail))
    lines = _table(("backbone", "weights", "from", "here", "detail"), rows)
    lines.append(f"{present} of {len(chosen)} present on this machine ({cache_locations()})")
    if present < len(chosen):
        lines.append("fetch hub weights with `anoseg weights fetch SPACE` on a machine with network (README: Running "
                     "on a cluster)")
    return "\n".join(lines)


def fetch(chosen: Sequence[Target], echo: Callable[[str], None] = print) -> list[tuple[Target, str]]:
    """Make every target's weights present here (downloading hub weights through the trials' loading code),
    echoing one line each and a total; returns the failures ``[(target, message)]``."""
    from anoseg.backbones import fetch_weights, weights_source
    from anoseg.backbones.weights import format_size

    failures: list[tuple[Target, str]] = []
    fetched = already = 0
    total = 0
    width = max((len(t.backbone) for t in chosen), default=8)
    for target in chosen:
        head = f"{target.backbone:<{width}}  {target.weights}"
        if target.weights == "none":
            echo(f"{head}: random init, nothing to fetch")
            continue
        started = time.perf_counter()
        try:
            source, downloaded = fetch_weights(target.backbone, target.weights)
        except WeightsError as exc:
            failures.append((target, str(exc)))
            echo(f"{head}: FAILED: {exc}")
            continue
        size = format_size(source.size)
        total += source.size or 0
        if downloaded:
            fetched += 1
            echo(f"{head}: fetched {source.where} -> {source.detail} ({size}, {time.perf_counter() - started:.1f} s)")
        else:
            already += 1
            echo(f"{head}: already present: {source.where} -> {source.detail} ({size})")
    echo(f"{fetched} fetched, {already} already present, {len(failures)} failed; {format_size(total)} of weights "
         f"here ({cache_locations()})")
    return failures


@contextlib.contextmanager
def maybe_cache(root: str | None) -> Iterator[None]:
    """The torch / Hugging Face caches moved under ``root`` (:func:`anoseg.backbones.weights.hub_caches`), or
    left as they are."""
    if root is None:
        yield
        return
    from anoseg.backbones.weights import hub_caches

    with hub_caches(root):
        yield


def check_sources(chosen: Sequence[Target]) -> None:
    """Fail early on bad weights values (a typo in a space would be a ConfigError anyway)."""
    from anoseg.backbones import parse_weights

    for target in chosen:
        parse_weights(target.weights)


def fetch_command(items: Sequence[str], cache: str | None, echo: Callable[[str], None] = print) -> None:
    """``anoseg weights fetch``: WeightsError naming the failures (after every other target was tried)."""
    chosen = targets(items)
    check_sources(chosen)
    with maybe_cache(cache):
        failures = fetch(chosen, echo)
    if cache:
        root = Path(cache).expanduser().resolve()
        echo(f"on machines without network, point the caches at it: TORCH_HOME={root / 'torch'} "
             f"HF_HOME={root / 'huggingface'} (or XDG_CACHE_HOME={root}), or mount {root} as ~/.cache")
    if failures:
        raise WeightsError(f"{len(failures)} of {len(chosen)} weights could not be fetched: "
                           + ", ".join(f"{t.backbone} ({t.weights})" for t, _ in failures))


def list_command(items: Sequence[str], cache: str | None, echo: Callable[[str], None] = print) -> None:
    """``anoseg weights list``."""
    chosen = targets(items)
    check_sources(chosen)
    with maybe_cache(cache):
        echo(list_table(chosen))
