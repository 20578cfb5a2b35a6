"""Reports of a strategy: a table per site, and labelled pictures of profiled attention maps next to the chosen masks."""

from __future__ import annotations

import io
import json
import os
import pathlib
import textwrap
from typing import Any, Sequence

import torch
from tabulate import tabulate

from sparsify.errors import SparsifyError
from sparsify.io import write_bytes_atomically, write_text_atomically
from sparsify.patterns import Pattern
from sparsify.strategy import Strategy
from sparsify.block_mask import blocks_for

__all__ = [
    "BLOCK_MASS_PROFILE_FORMAT_VERSION",
    "head_densities",
    "load_profile_maps",
    "measured_series",
    "page_paths",
    "quality_points",
    "render_png",
    "render_quality_png",
    "report_figures",
    "save_profile_maps",
    "strategy_table",
]

BLOCK_MASS_PROFILE_FORMAT_VERSION = 1
# Profile maps are stored downsampled; a file asking for more rows or columns is not ours.
MAX_PROFILE_RESOLUTION = 256


def strategy_table(strategy: Strategy) -> str:
    """Per site: heads, chosen patterns, density at the recorded lengths, measured error, estimated speedup.

    The footer gives the mean density, the estimated attention speedup, the end-to-end error
    and — when the search had a global target — whether it was reached and which sites exceed
    ``max_error``.

    Example:
        >>> from sparsify import AttentionSite, patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=1024, k_len=1024)
        >>> print(strategy_table(Strategy.uniform([site], patterns.sliding_window(128))))  # doctest: +ELLIPSIS
        site    heads (q/kv)    kind ...
    """
    fingerprints = {entry["name"]: entry for entry in strategy.fingerprint}
    site_errors = strategy.metadata.get("site_errors") or {}
    budget = strategy.metadata.get("output_budget") if isinstance(strategy.metadata.get("output_budget"), dict) else {}
    sensitivities = budget.get("sensitivities") or {}
    rows = []
    for name, site_strategy in strategy.sites.items():
        entry = fingerprints.get(name, {})
        counts: dict[str, int] = {}
        for pattern in site_strategy.heads:
            counts[str(pattern)] = counts.get(str(pattern), 0) + 1
        densities = head_densities(strategy, name)
        density = "-" if densities is None else f"{sum(densities) / len(densities):.3f}"
        metrics = site_strategy.head_metrics or []
        errors = [m["error"] for m in metrics if "error" in m]
        worst = max(errors, default=None)
        rows.append([
            name, f"{site_strategy.num_heads}/{entry.get('num_kv_heads', '?')}",
            "causal" if entry.get("causal") else entry.get("kind", "?"),
            "; ".join(f"{n}× {p}" for p, n in counts.items()), density,
            "-" if worst is None else f"{worst:.4f}",
            f"{site_errors[name]:.4f}" if name in site_errors else "-",
            *([f"{sensitivities[name]:.3g}" if name in sensitivities else "-"] if sensitivities else []),
            _site_speedup(metrics),
        ])
    headers = ["site", "heads (q/kv)", "kind", "patterns", "density", "worst head error", "site error",
               *(["sensitivity"] if sensitivities else []), "est. speedup"]
    table = tabulate(rows, headers=headers, tablefmt="simple")
    summary = strategy.summary()
    footer = [f"mean density {summary['mean_density']:.3f}" if summary["mean_density"] is not None else None,
              f"estimated attention speedup {summary['estimated_speedup']:.2f}x" if summary.get("estimated_speedup") else None,
              f"end-to-end output error {summary['end_to_end_error']:.2e}" if summary.get("end_to_end_error") is not None else None]
    lines = ["; ".join(part for part in footer if part)] if any(footer) else []
    lines += _target_lines(strategy.metadata)
    lines += _output_budget_lines(budget)
    return table + "".join("\n" + line for line in lines)


def head_densities(strategy: Strategy, site_name: str) -> list[float] | None:
    """Per head of ``site_name``, kept blocks over dense blocks at the recorded lengths (``None`` without them).

    Example:
        >>> from sparsify import AttentionSite, patterns
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=256, k_len=256)
        >>> head_densities(Strategy.uniform([site], patterns.attention_sinks(64)), "attn")
        [0.25, 0.25]
    """
    entry = next(e for e in strategy.fingerprint if e["name"] == site_name)
    if "q_len" not in entry or "k_len" not in entry:
        return None
    q_len, k_len, causal = entry["q_len"], entry["k_len"], entry.get("causal", False)
    computed: dict[Pattern, float] = {}  # heads share patterns: each distinct one is counted once
    values = []
    for pattern in strategy.sites[site_name].heads:
        if pattern not in computed:
            if pattern.is_skip or pattern.is_adaptive:  # no static runtime mask: the pattern's own definition
                computed[pattern] = pattern.density(blocks_for(q_len, strategy.block_size),
                                                    blocks_for(k_len, strategy.block_size),
                                                    block_size=strategy.block_size, causal=causal, q_len=q_len,
                                                    k_len=k_len)
            else:  # the blocks its runtime mask keeps (what the kernels run and the cost model prices)
                computed[pattern] = pattern.runtime_mask(q_len, k_len, block_size=strategy.block_size,
                                                         causal=causal).density()
        values.append(computed[pattern])
    return values


def _site_speedup(metrics: Sequence[dict[str, Any]]) -> str:
    if not metrics or not all("estimated_seconds" in m and "dense_seconds" in m for m in metrics):
        return "-"
    sparse = sum(m["estimated_seconds"] for m in metrics)
    dense = sum(m["dense_seconds"] for m in metrics)
    if sparse <= 0:
        return "all skipped"  # nothing is computed: no finite speedup to state
    return f"{dense / sparse:.2f}x"


def _output_budget_lines(record: dict[str, Any]) -> list[str]:
    """The model-level budget: promised vs measured on held-out batches, and how the verification went."""
    if not record or "measured" not in record:
        return []
    verdict = "within" if record.get("within_budget", True) else "OVER"
    lines = [f"model-level {record.get('metric')}: budget {record.get('budget'):g}, promised {record['promised']:.3e}, "
             f"measured {record['measured']:.3e} on held-out batches ({verdict} budget)"]
    if "noise_floor" in record:
        lines.append(f"the model computes in 16-bit floats: any change at a site moves its output by a rounding-noise "
                     f"floor besides what the change causes; taken out (largest of this allocation's sites "
                     f"{record['noise_floor']:.3e}; measured with it {record['measured_with_noise']:.3e})")
    trail = record.get("verifications") or []
    if len(trail) > 1:
        steps = ", ".join(f"scale {entry['scale']:.3g} → {entry['measured']:.2e}" for entry in trail)
        lines.append(f"verified {len(trail)} allocations: {steps}")
    lines.append("sensitivity: model-level error (squared relative L2, or KL) per squared site error, measured by "
                 "injecting each site's error alone")
    return lines


def _target_lines(metadata: dict[str, Any]) -> list[str]:
    target = metadata.get("target")
    if not isinstance(target, dict):
        return []
    kind, value, achieved = target.get("kind", "density"), target.get("value"), target.get("achieved")
    budget = (metadata.get("search") or {}).get("max_error")
    lines = []
    if target.get("reached", True):
        lines.append(f"target {kind} {value:g} reached ({kind} {achieved:.3f})")
    elif target.get("overrides_max_error"):
        lines.append(f"target {kind} {value:g} NOT reached even past max_error={budget}: the closest strategy has "
                     f"{kind} {achieved:.3f} (no site drops all of its heads)")
    else:
        lines.append(f"target {kind} {value:g} NOT reached within max_error={budget}: the closest strategy has "
                     f"{kind} {achieved:.3f} (raise max_error, or allow target_overrides_max_error)")
    over = target.get("sites_over_budget") or []
    if over:
        errors = metadata.get("site_errors") or {}
        listed = ", ".join(f"{name} ({errors[name]:.3f})" if name in errors else name for name in over)
        lines.append(f"target overrides max_error={budget}: {len(over)} site(s) over budget: {listed}")
    return lines


# -- profile maps ----------------------------------------------------------------------------------

def save_profile_maps(maps: dict[str, torch.Tensor], path: str | os.PathLike, *, resolution: int = 32) -> None:
    """Write per-site, per-head block attention maps (downsampled to ``resolution``) as JSON, atomically.

    Example:
        >>> save_profile_maps({"attn": torch.rand(2, 8, 8)}, "strategy.profile.json")   # doctest: +SKIP
    """
    document: dict[str, Any] = {"format_version": BLOCK_MASS_PROFILE_FORMAT_VERSION, "sites": {}}
    for name, mass in maps.items():
        heads, q_blocks, k_blocks = mass.shape
        small = torch.nn.functional.adaptive_avg_pool2d(mass.float().unsqueeze(0), (min(q_blocks, resolution),
                                                                                    min(k_blocks, resolution)))[0]
        small = small / small.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        document["sites"][name] = {"q_blocks": q_blocks, "k_blocks": k_blocks,
                                   "heads": [[[float(f"{x:.4g}") for x in row] for row in head.tolist()] for head in small]}
    write_text_atomically(path, json.dumps(document))


def load_profile_maps(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read what `save_profile_maps` wrote: site name → ``[heads, rows, cols]`` maps (checked).

    Example:
        >>> maps = load_profile_maps("strategy.profile.json")     # doctest: +SKIP
    """
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise SparsifyError(f"cannot read profile maps {source!r}: {error}") from None
    if not isinstance(document, dict) or document.get("format_version") != BLOCK_MASS_PROFILE_FORMAT_VERSION:
        version = document.get("format_version") if isinstance(document, dict) else None
        raise SparsifyError(f"{source}: profile format_version {version!r} is not understood; understood: "
                            f"{BLOCK_MASS_PROFILE_FORMAT_VERSION}")
    sites = document.get("sites")
    if not isinstance(sites, dict):
        raise SparsifyError(f"{source}: 'sites' must be a JSON object of site name -> maps")
    maps = {}
    for name, entry in sites.items():
        heads = entry.get("heads") if isinstance(entry, dict) else None
        try:
            tensor = torch.tensor(heads, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise SparsifyError(f"{source}: sites[{name!r}].heads must be a list of equally sized 2-D lists of "
                                f"numbers") from None
        if tensor.dim() != 3 or 0 in tensor.shape or max(tensor.shape[1:]) > MAX_PROFILE_RESOLUTION:
            raise SparsifyError(f"{source}: sites[{name!r}].heads has shape {tuple(tensor.shape)}; expected "
                                f"[heads, rows, columns] with at most {MAX_PROFILE_RESOLUTION} rows and columns")
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise SparsifyError(f"{source}: sites[{name!r}].heads holds negative or non-finite attention mass")
        maps[name] = tensor
    return maps


# -- pictures --------------------------------------------------------------------------------------

_PANEL_INCHES = 2.0  # one head's map: readable at 100 dpi (200 px)
_FONT = 8


def page_paths(path: str | os.PathLike, pages: int) -> list[pathlib.Path]:
    """The files `render_png` writes: ``path`` for page 1, then ``<stem>-2<suffix>``, ...

    Example:
        >>> [p.name for p in page_paths("report.png", 3)]
        ['report.png', 'report-2.png', 'report-3.png']
    """
    path = pathlib.Path(path)
    return [path if page == 1 else path.with_name(f"{path.stem}-{page}{path.suffix}") for page in range(1, pages + 1)]


def render_png(strategy: Strategy, path: str | os.PathLike, profile_maps: dict[str, torch.Tensor] | None = None,
               *, sites_per_page: int = 6, dpi: int = 100) -> list[pathlib.Path]:
    """Draw every site: per head the profiled attention map (when known) above the chosen block mask.

    Each site is one labelled group (name, heads, lengths, site error); each head shows its
    pattern, its density and its measured error; axes are in blocks (query blocks down, key
    blocks right), the attention maps share a colour bar (log10 of the attention mass per
    block) and a legend says which mask blocks are kept. Sites are spread over pages of
    ``sites_per_page`` (`page_paths` names the files); each file is written atomically.
    Returns the files written.

    Example:
        >>> render_png(strategy, "report.png", load_profile_maps("strategy.profile.json"))   # doctest: +SKIP
        [PosixPath('report.png')]
    """
    figures = report_figures(strategy, profile_maps, sites_per_page=sites_per_page)
    paths = page_paths(path, len(figures))
    for figure, page_path in zip(figures, paths):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        write_bytes_atomically(page_path, buffer.getvalue())
    return paths


def report_figures(strategy: Strategy, profile_maps: dict[str, torch.Tensor] | None = None, *,
                   sites_per_page: int = 6) -> list[Any]:
    """The pages `render_png` draws, as matplotlib ``Figure`` objects (no pyplot; each has an Agg canvas).

    Example:
        >>> figures = report_figures(strategy)                        # doctest: +SKIP
        >>> figures[0].savefig("page.svg")                            # doctest: +SKIP
    """
    if not isinstance(sites_per_page, int) or isinstance(sites_per_page, bool) or sites_per_page < 1:
        raise SparsifyError(f"sites_per_page must be a positive int, got {sites_per_page!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SparsifyError("the picture needs matplotlib: pip install 'sparsify-attention[report]'") from None
    names = list(strategy.sites)
    pages = [names[start:start + sites_per_page] for start in range(0, len(names), sites_per_page)]
    figures = []
    for number, page_names in enumerate(pages, start=1):
        # A Figure with its own Agg canvas: no pyplot, so the process's matplotlib backend is untouched.
        figure = _draw_page(Figure, strategy, page_names, profile_maps, number, len(pages), len(names))
        FigureCanvasAgg(figure)
        figures.append(figure)
    return figures


def quality_points(strategy: Strategy) -> list[tuple[float, float]]:
    """(mean density, measured model-level error) of every allocation the search verified, by density.

    The model-level budget's search verifies a few whole-model allocations on held-out batches
    (``output_budget.verifications`` in the metadata): together they trace the model's quality
    against its density. Empty when the strategy records none (a per-site budget, an old file).

    Example:
        >>> from sparsify import AttentionSite
        >>> site = AttentionSite("attn", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=256, k_len=256)
        >>> quality_points(Strategy.dense([site]))
        []
    """
    record = strategy.metadata.get("output_budget")
    if not isinstance(record, dict):
        return []
    points = {(float(entry["density"]), float(entry["measured"])) for entry in record.get("verifications") or []
              if isinstance(entry, dict) and "density" in entry and "measured" in entry}
    return sorted(points)


def measured_series(document: dict[str, Any], value: str = "ppl_ratio") -> dict[str, list[tuple[float, float]]]:
    """Per method, the ``(density, value)`` points of a benchmark's rows document (``{"meta": ..., "rows": [...]}``,
    as `benchmarks/bench_rows.py` writes it; e.g. ``benchmarks/quality_pareto.py``'s perplexity ratios).

    Example:
        >>> measured_series({"rows": [{"method": "ours", "density": 0.3, "ppl_ratio": 1.02}]})
        {'ours': [(0.3, 1.02)]}
    """
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list):
        raise SparsifyError("not a rows document: expected {\"meta\": ..., \"rows\": [...]} as the benchmarks write")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if isinstance(row, dict) and {"method", "density", value} <= set(row):
            series.setdefault(str(row["method"]), []).append((float(row["density"]), float(row[value])))
    return {method: sorted(points) for method, points in series.items()}


def render_quality_png(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                       ylabel: str = "model-level error", title: str = "quality against density",
                       reference: float | None = None, dpi: int = 100) -> pathlib.Path:
    """One line per series of ``(density, value)`` points — e.g. the perplexity ratio of several methods, or a
    search's verified allocations (`quality_points`) — drawn to ``path`` (atomically).

    ``reference`` draws a dashed horizontal line (the budget, or a ratio of 1).

    Example:
        >>> render_quality_png({"ours": [(0.3, 1.01), (0.5, 1.004)]}, "pareto.png", ylabel="ppl ratio")  # doctest: +SKIP
        PosixPath('pareto.png')
    """
    if not series or not any(series.values()):
        raise SparsifyError("nothing to draw: no (density, value) points (the quality plot needs a strategy searched "
                            "under a model-level budget, or measured rows)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SparsifyError("the picture needs matplotlib: pip install 'sparsify-attention[report]'") from None
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    markers = "os^vDP*X"
    for index, (name, points) in enumerate(series.items()):
        ordered = sorted(points)
        if ordered:
            axis.plot([p[0] for p in ordered], [p[1] for p in ordered], marker=markers[index % len(markers)],
                      label=name)
    if reference is not None:
        axis.axhline(reference, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("mean density (kept work / causal-visible work)", fontsize=_FONT + 1)
    axis.set_ylabel(ylabel, fontsize=_FONT + 1)
    axis.set_title(title, fontsize=_FONT + 2)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=_FONT)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path = pathlib.Path(path)
    write_bytes_atomically(path, buffer.getvalue())
    return path


def _draw_page(figure_class, strategy: Strategy, names: list[str], profile_maps, page: int, pages: int, total: int):
    from matplotlib.patches import Patch

    heads = max(strategy.sites[name].num_heads for name in names)
    with_maps = bool(profile_maps) and any(name in profile_maps for name in names)
    rows_per_site = 2 if with_maps else 1
    site_height = rows_per_site * (_PANEL_INCHES + 0.45) + 0.9
    width = heads * _PANEL_INCHES + 1.6
    figure = figure_class(figsize=(width, site_height * len(names) + 1.0), layout="constrained")
    shown = f"sites {_site_number(strategy, names[0]) + 1}-{_site_number(strategy, names[-1]) + 1} of {total}"
    title = ("profiled attention (log10 mass per block, top) and chosen block masks (bottom)" if with_maps
             else "chosen block masks (no profile maps: run `sparsify-cli search` to record them)")
    figure.suptitle(f"{title} — {shown}" + (f", page {page} of {pages}" if pages > 1 else ""),
                    fontsize=_FONT + 2)
    figure.legend(handles=[Patch(facecolor="black", edgecolor="grey", label="kept block"),
                           Patch(facecolor="white", edgecolor="grey", label="skipped block"),
                           Patch(facecolor="#d9d9d9", edgecolor="grey", hatch="//", label="head skipped (zeros)")],
                  loc="outside lower center", ncols=3, fontsize=_FONT, frameon=False)
    site_figures = figure.subfigures(len(names), 1, squeeze=False)[:, 0]
    for site_figure, name in zip(site_figures, names):
        _draw_site(site_figure, strategy, name, heads, profile_maps.get(name) if with_maps else None, rows_per_site)
    return figure


def _site_number(strategy: Strategy, name: str) -> int:
    return list(strategy.sites).index(name)


def _draw_site(site_figure, strategy: Strategy, name: str, heads: int, maps: torch.Tensor | None,
               rows_per_site: int) -> None:
    site_strategy = strategy.sites[name]
    entry = next(e for e in strategy.fingerprint if e["name"] == name)
    block = strategy.block_size
    q_len, k_len = entry.get("q_len"), entry.get("k_len")
    recorded = q_len is not None and k_len is not None
    q_len, k_len = (q_len, k_len) if recorded else (16 * block, 16 * block)
    q_blocks, k_blocks = blocks_for(q_len, block), blocks_for(k_len, block)
    site_error = (strategy.metadata.get("site_errors") or {}).get(name)
    lengths = (f"q {q_len} × k {k_len} tokens = {q_blocks} × {k_blocks} blocks of {block}" if recorded
               else f"lengths not recorded: drawn at {q_blocks} × {k_blocks} blocks of {block}")
    details = [f"{site_strategy.num_heads} heads ({entry['num_kv_heads']} kv)",
               "causal" if entry.get("causal") else entry.get("kind", "self"), lengths]
    if site_error is not None:
        details.append(f"site error {site_error:.4f}")
    site_figure.suptitle(f"{name}   ·   " + ", ".join(details), fontsize=_FONT + 1, fontweight="bold", x=0.01,
                         ha="left")
    axes = site_figure.subplots(rows_per_site, heads, squeeze=False)
    densities = head_densities(strategy, name) or [None] * site_strategy.num_heads
    metrics = site_strategy.head_metrics or [{}] * site_strategy.num_heads
    image = None
    if maps is not None:
        logs = maps.clamp_min(1e-6).log10()
        low, high = float(logs.min()), float(logs.max())
    for head in range(heads):
        column = axes[:, head]
        if head >= site_strategy.num_heads:
            for axis in column:
                axis.set_axis_off()
            continue
        pattern = site_strategy.heads[head]
        if maps is not None:
            axis = column[0]
            if head < maps.shape[0]:
                image = axis.imshow(logs[head].numpy(), cmap="viridis", vmin=low, vmax=high, interpolation="nearest",
                                    extent=(0, k_blocks, q_blocks, 0), aspect="auto")
            else:
                axis.text(0.5, 0.5, "not profiled", ha="center", va="center", fontsize=_FONT, transform=axis.transAxes)
            axis.set_title(f"head {head}", fontsize=_FONT + 1)
            _label_axes(axis, q_blocks, k_blocks, left=head == 0, bottom=False)
        mask_axis = column[-1]
        if pattern.is_skip:
            mask_axis.imshow([[0.15]], cmap="Greys", vmin=0, vmax=1, extent=(0, k_blocks, q_blocks, 0), aspect="auto")
            mask_axis.add_patch(_hatched(k_blocks, q_blocks))
        else:
            mask = pattern.block_mask(q_blocks, k_blocks, block_size=block, causal=entry.get("causal", False),
                                      q_len=q_len, k_len=k_len)
            mask_axis.imshow(mask.float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                             extent=(0, k_blocks, q_blocks, 0), aspect="auto")
        error = metrics[head].get("error") if head < len(metrics) else None
        facts = [f"density {densities[head]:.3f}" if densities[head] is not None else None,
                 f"error {error:.4f}" if error is not None else None]
        label = ("" if maps is not None else f"head {head}\n") + _wrap(str(pattern))
        facts_line = " · ".join(fact for fact in facts if fact)
        mask_axis.set_title(label + ("\n" + facts_line if facts_line else ""), fontsize=_FONT)
        _label_axes(mask_axis, q_blocks, k_blocks, left=head == 0, bottom=True)
    if image is not None:
        colorbar = site_figure.colorbar(image, ax=list(axes[0]), shrink=0.9, pad=0.01)
        colorbar.set_label("log10 attention mass\nper block", fontsize=_FONT)
        colorbar.ax.tick_params(labelsize=_FONT - 1)


def _hatched(k_blocks: int, q_blocks: int):
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), k_blocks, q_blocks, fill=False, hatch="//", edgecolor="grey", linewidth=0)


def _label_axes(axis, q_blocks: int, k_blocks: int, *, left: bool, bottom: bool) -> None:
    axis.set_xticks([0, k_blocks])
    axis.set_yticks([0, q_blocks])
    axis.tick_params(labelsize=_FONT - 1, length=2, pad=1)
    if not bottom:
        axis.set_xticklabels([])
    if not left:
        axis.set_yticklabels([])
    if left:
        axis.set_ylabel("query block ↓", fontsize=_FONT)
    if bottom:
        axis.set_xlabel("key block →", fontsize=_FONT)


def _wrap(text: str, lines: int = 4) -> str:
    """The pattern's full text in lines that fit one panel (long ones end in '…' after ``lines`` lines)."""
    width = max(24, int(_PANEL_INCHES * 72 / (_FONT * 0.6)))
    wrapped = textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)
