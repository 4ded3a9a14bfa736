"""The one plotting module of sdrt's benchmarks: every figure a benchmark writes is made here, so
they all read alike (value axes from zero, min-max whiskers, device and versions in the caption).

Public functions (names and signatures are stable; benchmarks import them):

    figure(panels=1, width=6.0, height=4.2) -> (fig, [ax, ...])
        A figure with `panels` axes side by side, each `width` inches wide (or a list of widths,
        one per panel).
    stacked_bars(ax, groups, ylabel, title=None) -> None
        groups: [(group label, [Bar, ...]), ...]. Bars of one group stand side by side, groups
        apart, each bar stacked from its `segments` (bottom first), one colour per segment name
        across the whole axes, one legend entry per segment name; `low`/`high` draw a min-max
        whisker on the bar's total, `note` is written above the bar (e.g. "1.23x"). y from zero.
    lines(ax, series, xlabel, ylabel, title=None) -> None
        series: [Series, ...], one line each with markers and, where `low`/`high` are given,
        min-max whiskers. Both axes from zero (all values here are sizes, counts, times, rates).
    caption(device, versions, *more) -> str
        "measured on DEVICE; sdrt 0.1.0, onnxruntime 1.23.0, ..." plus `more` sentences: the
        line under every figure.
    save(fig, path, caption_text="") -> Path
        Writes the caption under the axes, saves the PNG atomically (a fixed size:
        width x height inches at DPI), closes the figure, returns path.

    Bar(label, segments, low=None, high=None, note="")
    Series(label, x, y, low=None, high=None)

Example (the serving load benchmark's latency against request rate, per batching policy):

    fig, (ax,) = figure()
    lines(ax, [Series("batch 4, wait 20 ms", rates, p50_ms, low=min_ms, high=max_ms)],
          "offered requests / s", "latency ms (median, min-max)")
    save(fig, out / "load.png", caption(device, versions, "127.0.0.1, 200 requests per rate"))
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

DPI = 110
# Fixed colours per name where a name is known (benchmark stages), so every figure agrees.
KNOWN_COLORS = {"tokenize": "#9e9e9e", "text encoder": "#4c72b0", "VAE encoder": "#8172b3",
                "denoise": "#dd8452", "VAE decoder": "#55a868", "other": "#cccccc"}
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
           "#ccb974", "#64b5cd"]


@dataclass
class Bar:
    """One stacked bar: `segments` {name: value} from the bottom up; whisker `low`..`high` on the
    total (e.g. min and max of the runs); `note` written above it."""
    label: str
    segments: dict
    low: float | None = None
    high: float | None = None
    note: str = ""

    @property
    def total(self) -> float:
        return float(sum(v for v in self.segments.values() if v is not None))


@dataclass
class Series:
    """One line: points (x, y), optional min-max whiskers `low`, `high` (same length as y)."""
    label: str
    x: list
    y: list
    low: list | None = None
    high: list | None = None


def _matplotlib():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(panels: int = 1, width=6.0, height: float = 4.2):
    """(fig, [ax, ...]): `panels` axes side by side, each `width` inches wide (a number, or a list
    of one width per panel)."""
    plt = _matplotlib()
    widths = list(width) if isinstance(width, (list, tuple)) else [float(width)] * panels
    if len(widths) != panels:
        raise ValueError(f"figure: {panels} panels but {len(widths)} widths")
    fig, axes = plt.subplots(1, panels, figsize=(sum(widths), height), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    return fig, list(axes[0])


def color_of(name: str, seen: dict) -> str:
    if name not in seen:
        seen[name] = KNOWN_COLORS.get(name) or PALETTE[len(seen) % len(PALETTE)]
    return seen[name]


def stacked_bars(ax, groups: list, ylabel: str, title: str | None = None) -> None:
    """Grouped stacked bars with min-max whiskers and notes; y axis from zero."""
    colors: dict = {}
    x, ticks, labels, centres = 0.0, [], [], []
    top = 0.0
    for group_label, bars in groups:
        first = x
        for bar in bars:
            bottom = 0.0
            for name, value in bar.segments.items():
                if not value:
                    continue
                ax.bar(x, value, 0.8, bottom=bottom, color=color_of(name, colors), edgecolor="white",
                       linewidth=0.5, label=name)
                bottom += value
            if bar.low is not None and bar.high is not None:
                ax.errorbar(x, bar.total, yerr=[[max(bar.total - bar.low, 0)], [max(bar.high - bar.total, 0)]],
                            fmt="none", ecolor="black", elinewidth=1, capsize=4)
            height = max(bar.total, bar.high or 0)
            if bar.note:
                ax.annotate(bar.note, (x, height), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=9, fontweight="bold")
            top = max(top, height)
            ticks.append(x)
            labels.append(bar.label)
            x += 1.0
        centres.append(((first + x - 1.0) / 2, group_label))
        x += 0.6                                   # the gap between groups
    ax.set_xticks(ticks, labels, fontsize=8)
    if len(groups) > 1 or groups and groups[0][0]:
        sec = ax.secondary_xaxis("bottom")
        sec.set_xticks([c for c, _ in centres], [g for _, g in centres], fontsize=9)
        sec.tick_params(length=0, pad=8 + 11 * max(lab.count("\n") + 1 for lab in labels))
        sec.spines["bottom"].set_visible(False)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _legend_once(ax)


def lines(ax, series: list, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """One line per series with markers and min-max whiskers; both axes from zero."""
    colors: dict = {}
    xmax = ymax = 0.0
    for s in series:
        c = color_of(s.label, colors)
        ax.plot(s.x, s.y, "o-", color=c, label=s.label)
        if s.low is not None and s.high is not None:
            ax.errorbar(s.x, s.y, yerr=[[max(y - lo, 0) for y, lo in zip(s.y, s.low)],
                                        [max(hi - y, 0) for y, hi in zip(s.y, s.high)]],
                        fmt="none", ecolor=c, elinewidth=1, capsize=3)
        xmax = max([xmax, *s.x])
        ymax = max([ymax, *s.y, *(s.high or [])])
    ax.set_xlim(0, xmax * 1.08 if xmax > 0 else 1)
    if all(float(v).is_integer() for s in series for v in s.x):     # batch sizes, step counts
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, ymax * 1.1 if ymax > 0 else 1)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)


def _legend_once(ax) -> None:
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    if unique:                                     # outside the bars, right of the axes
        ax.legend(list(unique.values()), list(unique.keys()), fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def caption(device: str, versions: dict, *more: str) -> str:
    """The line under a figure: where it was measured, with which versions, and `more`."""
    text = f"measured on {device}"
    if versions:
        text += "; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    return ". ".join([text, *more])


def save(fig, path, caption_text: str = "") -> Path:
    """Caption under the axes, PNG written atomically at a fixed size, figure closed."""
    from sdrt.fileio import atomic_path
    plt = _matplotlib()
    path = Path(path)
    try:
        wrapped = textwrap.fill(caption_text, width=int(fig.get_figwidth() * 15)) if caption_text else ""
        lines_below = wrapped.count("\n") + 1 if wrapped else 0
        fig.tight_layout(rect=(0, 0.045 * lines_below / fig.get_figheight() * 4.2, 1, 1))
        if wrapped:
            fig.text(0.01, 0.01, wrapped, fontsize=7, color="#444444", va="bottom", ha="left")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=DPI)
    finally:
        plt.close(fig)
    return path
