"""Reports of a strategy: a table per site, and a picture of profiled attention maps next to the chosen masks."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from tabulate import tabulate

from sparsify.errors import SparsifyError
from sparsify.strategy import Strategy
from sparsify.tables import blocks_for

PROFILE_FORMAT_VERSION = 1


def strategy_table(strategy: Strategy) -> str:
    """Per site: heads, chosen patterns, density at the recorded lengths, measured error, estimated speedup.

    Example:
        >>> from sparsify import AttentionSite, patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=1024, k_len=1024)
        >>> print(strategy_table(Strategy.uniform([site], patterns.sliding_window(128))))  # doctest: +ELLIPSIS
        site    heads (q/kv)    kind ...
    """
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    site_errors = strategy.metadata.get("site_errors", {})
    rows = []
    for name, site_strategy in strategy.sites.items():
        entry = fingerprints.get(name, {})
        counts: dict[str, int] = {}
        for pattern in site_strategy.heads:
            counts[str(pattern)] = counts.get(str(pattern), 0) + 1
        density = "-"
        if "q_len" in entry and "k_len" in entry:
            q_blocks = blocks_for(entry["q_len"], strategy.block_size)
            k_blocks = blocks_for(entry["k_len"], strategy.block_size)
            values = [0.0 if getattr(p, "is_skip", False) else
                      p.density(q_blocks, k_blocks, block_size=strategy.block_size, causal=entry.get("causal", False),
                                q_len=entry["q_len"], k_len=entry["k_len"]) for p in site_strategy.heads]
            density = f"{sum(values) / len(values):.3f}"
        metrics = site_strategy.head_metrics or []
        worst = max((m.get("error", 0.0) for m in metrics), default=None)
        speedup = "-"
        if metrics and all("estimated_seconds" in m and "dense_seconds" in m for m in metrics):
            sparse = sum(m["estimated_seconds"] for m in metrics)
            speedup = f"{sum(m['dense_seconds'] for m in metrics) / max(sparse, 1e-30):.2f}x"
        rows.append([
            name, f"{site_strategy.num_heads}/{entry.get('num_kv_heads', '?')}",
            "causal" if entry.get("causal") else entry.get("kind", "?"),
            "; ".join(f"{n}× {p}" for p, n in counts.items()), density,
            "-" if worst is None else f"{worst:.4f}",
            f"{site_errors[name]:.4f}" if name in site_errors else "-", speedup,
        ])
    table = tabulate(rows, headers=["site", "heads (q/kv)", "kind", "patterns", "density", "worst head error",
                                    "site error", "est. speedup"], tablefmt="simple")
    summary = strategy.summary()
    footer = [f"mean density {summary['mean_density']:.3f}" if summary["mean_density"] is not None else None,
              f"estimated attention speedup {summary['estimated_speedup']:.2f}x" if summary.get("estimated_speedup") else None,
              f"end-to-end output error {summary['end_to_end_error']:.2e}" if summary.get("end_to_end_error") is not None else None]
    footer = [part for part in footer if part]
    return table + ("\n" + "; ".join(footer) if footer else "")


def save_profile_maps(maps: dict[str, torch.Tensor], path: str | os.PathLike, *, resolution: int = 32) -> None:
    """Write per-site, per-head block attention maps (downsampled to ``resolution``) as JSON."""
    document: dict[str, Any] = {"format_version": PROFILE_FORMAT_VERSION, "sites": {}}
    for name, mass in maps.items():
        heads, q_blocks, k_blocks = mass.shape
        small = torch.nn.functional.adaptive_avg_pool2d(mass.float().unsqueeze(0), (min(q_blocks, resolution),
                                                                                    min(k_blocks, resolution)))[0]
        small = small / small.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        document["sites"][name] = {"q_blocks": q_blocks, "k_blocks": k_blocks,
                                   "heads": [[[float(f"{x:.4g}") for x in row] for row in head.tolist()] for head in small]}
    with open(path, "w") as file:
        json.dump(document, file)


def load_profile_maps(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read what `save_profile_maps` wrote: site name → ``[heads, rows, cols]`` maps."""
    try:
        with open(path) as file:
            document = json.load(file)
        if document.get("format_version") != PROFILE_FORMAT_VERSION:
            raise SparsifyError(f"{os.fspath(path)}: profile format_version {document.get('format_version')!r} is not "
                                f"understood; understood: {PROFILE_FORMAT_VERSION}")
        return {name: torch.tensor(entry["heads"]) for name, entry in document["sites"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SparsifyError(f"cannot read profile maps {os.fspath(path)!r}: {error}") from None


def render_png(strategy: Strategy, path: str | os.PathLike, profile_maps: dict[str, torch.Tensor] | None = None,
               *, max_sites: int = 8) -> None:
    """Draw, per site and head, the profiled attention map (when known) above the chosen block mask."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SparsifyError("the picture needs matplotlib: pip install 'sparsify-attention[report]'") from None
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    names = list(strategy.sites)[:max_sites]
    heads = max(strategy.sites[n].num_heads for n in names)
    rows_per_site = 2 if profile_maps else 1
    # A Figure with its own Agg canvas: no pyplot, so the process's matplotlib backend is untouched.
    figure = Figure(figsize=(1.6 * heads, 1.7 * len(names) * rows_per_site))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(names) * rows_per_site, heads, squeeze=False)
    for site_index, name in enumerate(names):
        site_strategy = strategy.sites[name]
        entry = fingerprints.get(name, {})
        q_len, k_len = entry.get("q_len", 16 * strategy.block_size), entry.get("k_len", 16 * strategy.block_size)
        q_blocks, k_blocks = blocks_for(q_len, strategy.block_size), blocks_for(k_len, strategy.block_size)
        for head in range(heads):
            row = site_index * rows_per_site
            mask_axis = axes[row + rows_per_site - 1][head]
            for axis in axes[row:row + rows_per_site, head] if rows_per_site > 1 else [mask_axis]:
                axis.set_xticks([])
                axis.set_yticks([])
            if head >= site_strategy.num_heads:
                continue
            pattern = site_strategy.heads[head]
            mask = pattern.block_mask(q_blocks, k_blocks, block_size=strategy.block_size,
                                      causal=entry.get("causal", False), q_len=q_len, k_len=k_len)
            mask_axis.imshow(mask.float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            mask_axis.set_title(_short(str(pattern)), fontsize=6)
            if profile_maps and name in profile_maps and head < profile_maps[name].shape[0]:
                attention = profile_maps[name][head].clamp_min(1e-6).log10()
                axes[row][head].imshow(attention.numpy(), cmap="viridis", interpolation="nearest")
                axes[row][head].set_title(f"{name} h{head}" if head == 0 else f"h{head}", fontsize=6)
    figure.suptitle("profiled attention (log mass, top) and chosen block masks (bottom)" if profile_maps
                    else "chosen block masks", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
