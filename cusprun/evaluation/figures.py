"""Pictures of an expert and of the scores behind it (PNG, needs matplotlib); ``python -m cusprun.plot`` draws them.

* ``kept.png`` — kept fraction of each projection's parameters, per layer (heatmap);
* ``overlap.png`` — how the dimensions' irrelevant sets overlap at the expert's σ: neurons per exact
  combination of dimensions, and per layer the share irrelevant to each dimension and to all;
* ``distributions.png`` — per-document score distributions of one layer's projections, by corpus.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from ..core.errors import CusprunError
from ..core.files import atomic_write
from ..core.neurons import PROJECTIONS, SIDES, Geometry, tensor_name
from ..experts.build import load_score_sets
from ..scores.scoreset import ScoreSet, intersect
from ..selection.plan import kept_counts

SHORT = {p: p.split(".")[1].removesuffix("_proj") for p in PROJECTIONS}


def label(score_set: ScoreSet) -> str:
    """A short name for a dimension: its corpus file's stem (the CLI records corpus paths)."""
    return " & ".join(Path(c).stem if c.endswith((".jsonl", ".txt")) else c for c in score_set.corpora)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CusprunError("plots need matplotlib: pip install matplotlib (or cusprun[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))


def kept_fractions(kept: dict, geo: Geometry) -> torch.Tensor:
    """[layers, projections] kept fraction of each projection's weight parameters."""
    return torch.tensor([[kept[str(layer)][p][0] * kept[str(layer)][p][1] / (geo.shape[p][0] * geo.shape[p][1])
                          for p in PROJECTIONS] for layer in range(geo.layers)])


def plot_kept(plt, fractions: torch.Tensor, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, max(3.0, 0.18 * fractions.shape[0] + 1)))
    image = ax.imshow(fractions.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(PROJECTIONS)), [SHORT[p] for p in PROJECTIONS])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="kept fraction of parameters")
    _save(fig, path)
    plt.close(fig)


def irrelevant_sets(sets: list[ScoreSet], sigma: float) -> list[dict[str, torch.Tensor]]:
    """Per dimension, per tensor: bool [features], R(n) < σ (before dead-neuron propagation)."""
    return [{name: r < sigma for name, r in s.relevance().items()} for s in sets]


def own_irrelevant_sets(sets: list[ScoreSet], ratio: float, **settings) -> list[dict[str, torch.Tensor]]:
    """Per dimension, per tensor: bool [features], removed by that dimension's own selection at ``ratio`` (the
    irrelevant sets where no single σ exists: under layer shares, see cusprun.selection.units)."""
    return [{name: ~keep for name, keep in s.select(ratio, **settings).plan.items()} for s in sets]


def plot_overlap(plt, sets: list[ScoreSet], irrelevant: list[dict[str, torch.Tensor]], caption: str, geo: Geometry,
                 path: Path, channels_only: bool) -> None:
    """The dimensions' irrelevant sets (``caption`` says which): of MLP channels when the plan chooses only
    those, else of every neuron."""
    names = [label(s) for s in sets]
    chosen = ["mlp.down_proj.cols"] if channels_only else None
    masks = [{n: m for n, m in mask.items() if chosen is None or any(n.endswith(c) for c in chosen)}
             for mask in irrelevant]
    flat = torch.stack([torch.cat(list(m.values())) for m in masks])  # [dims, candidate neurons]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    labels, counts = [], []
    for size in range(1, len(sets) + 1):
        for combo in itertools.combinations(range(len(sets)), size):
            inside = flat[list(combo)].all(dim=0)
            outside = flat[[i for i in range(len(sets)) if i not in combo]].any(dim=0) if size < len(sets) else None
            exact = inside & ~outside if outside is not None else inside
            labels.append(" & ".join(names[i] for i in combo) + ("" if size == len(sets) else " only"))
            counts.append(int(exact.sum()))
    bars = left.barh(labels[::-1], counts[::-1], color="tab:blue")
    left.bar_label(bars, fmt="{:,.0f}", fontsize=7)
    left.set_xlabel(f"{'MLP channels' if channels_only else 'neurons'} irrelevant {caption}")
    left.set_title("exact overlap of the irrelevant sets", fontsize=9)
    layers = range(geo.layers)
    for name, mask in zip(names, masks):
        right.plot(layers, [_share(mask, geo, layer) for layer in layers], label=name)
    both = {n: torch.stack([m[n] for m in masks]).all(dim=0) for n in masks[0]}
    right.plot(layers, [_share(both, geo, layer) for layer in layers], "k--", label="all (intersection)")
    right.set_xlabel("layer")
    right.set_ylabel(f"share of the layer's {'MLP channels' if channels_only else 'neurons'}")
    right.set_title("irrelevant share per layer", fontsize=9)
    right.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def _share(mask: dict[str, torch.Tensor], geo: Geometry, layer: int) -> float:
    tensors = [mask[tensor_name(layer, p, s)] for p in PROJECTIONS for s in SIDES if tensor_name(layer, p, s) in mask]
    return float(sum(int(t.sum()) for t in tensors) / sum(t.numel() for t in tensors))


def plot_distributions(plt, sets: list[ScoreSet], layer: int, path: Path) -> None:
    panels = [(p, s) for p in PROJECTIONS for s in SIDES]
    fig, axes = plt.subplots(2, 7, figsize=(16, 5.5), sharey=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (proj, side) in zip(axes.T.flatten(), panels):
        data, tint = [], []
        for i, s in enumerate(sets):
            scores = s.scores[tensor_name(layer, proj, side)]
            data += [torch.log10(row.clamp_min(1e-12)).numpy() for row in scores]
            tint += [colors[i % len(colors)]] * scores.shape[0]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True, widths=0.7)
        for box, color in zip(parts["boxes"], tint):
            box.set_facecolor(color)
        ax.set_xticks([])
        ax.set_title(f"{SHORT[proj]} {side}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("log10 score")
    axes[1, 0].set_ylabel("log10 score")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(sets))]
    fig.legend(handles, [label(s) for s in sets], loc="upper left", fontsize=8, ncols=len(sets))
    fig.suptitle(f"per-document score distributions, layer {layer} (one box per document)", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def load_sets(paths: list[str]) -> list[ScoreSet]:
    """The score files of one expert's dimensions, checked to go together and to record their architecture."""
    sets = load_score_sets(paths)
    try:
        combined = intersect(*sets)
    except ValueError as exc:
        raise CusprunError(f"score files do not go together: {exc}") from None
    if "architecture" not in combined.metadata:
        raise CusprunError("these score files record no architecture (written before cusprun 0.1): score again")
    return sets


def expert_report(expert: Path, scores: ScoreSet) -> dict:
    """An expert folder's pruning.json, checked to be readable and to come from the model ``scores`` were
    made on (else the plot would draw one model's plan over another's scores)."""
    path = expert / "pruning.json"
    if not path.is_file():
        raise CusprunError(f"--expert {expert}: no pruning.json (not a cusprun expert folder)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CusprunError(f"{path}: not valid JSON (a damaged expert folder?)") from None
    missing = [k for k in ("kept", "sigma", "ratio_achieved_projection", "config_hash")
               if not isinstance(report, dict) or k not in report]
    if missing:
        raise CusprunError(f"{path}: lacks {', '.join(missing)} (not a cusprun expert's pruning.json)")
    if report["config_hash"] != scores.metadata.get("config_hash"):
        raise CusprunError(f"--expert {expert} was pruned from another model than the score files were made on "
                           f"({report.get('model')}, config hash differs)")
    return report


def write_plots(sets: list[ScoreSet], out: Path, ratio: float = 0.25, expert: Path | None = None,
                layer: int | None = None) -> list[Path]:
    """The three PNGs for ``sets`` (and ``expert``'s plan if given) into ``out``; returns their paths."""
    plt = _pyplot()
    combined = intersect(*sets)
    geo = combined.geometry()
    if out.exists() and not out.is_dir():
        raise CusprunError(f"--out {out} is a file, not a folder")
    if expert is not None:
        report = expert_report(Path(expert), combined)
        # the plan's share (``plan`` where the format keeps some removed neurons as zeros): the kept counts drawn
        kept, sigma, ratio = report["kept"], report["sigma"], report.get("plan", report)["ratio_achieved_projection"]
        settings = (report.get("neurons"), report.get("granularity"))
        budget, drop_layers, align = report.get("budget", "rank"), report.get("drop_layers", 0), report.get("align", 1)
        title = f"{Path(expert).name}: {ratio:.1%} of projection parameters removed"
    else:
        try:
            selection = combined.select(ratio)
        except ValueError as exc:  # a ratio the default units cannot reach
            raise CusprunError(str(exc)) from None
        kept, sigma = kept_counts(selection.plan, geo), selection.sigma
        settings = combined.selection_settings()
        budget, drop_layers, align = "rank", 0, None  # select's defaults
        title = f"{label(combined)}: {selection.removed_fraction:.1%} of projection parameters removed"
    layer = geo.layers // 2 if layer is None else layer
    if not 0 <= layer < geo.layers:
        raise CusprunError(f"--layer {layer}: the model has layers 0..{geo.layers - 1}")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "kept.png", out / "overlap.png", out / "distributions.png"]
    plot_kept(plt, kept_fractions(kept, geo), title, paths[0])
    if sigma is None:  # layer shares, no single threshold: each dimension's own selection at the ratio
        irrelevant = own_irrelevant_sets(sets, ratio, neurons=settings[0], granularity=settings[1], budget=budget,
                                         drop_layers=drop_layers, align=align)
        caption = f"(each dimension's own selection at {ratio:.1%})"
    else:
        irrelevant, caption = irrelevant_sets(sets, sigma), f"at σ = {sigma:.3f}"
    plot_overlap(plt, sets, irrelevant, caption, geo, paths[1], channels_only=settings == ("mlp", "unit"))
    plot_distributions(plt, sets, layer, paths[2])
    return paths
