"""Charts drawn on the server as SVG: no script, no library, readable without one, and allowed by the
console's Content-Security-Policy. Each bar has a `<title>` (a tooltip, and what a screen reader says)."""

from collections.abc import Callable, Sequence
from datetime import date
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 220
LEFT, BOTTOM, TOP = 56, 28, 10
# Distinguishable colours, in order, for the models (Okabe-Ito, readable by colour-blind people too).
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#999999")


def stacked_bars(
    title: str, days: Sequence[date], series: dict[str, list[float]], label: Callable[[float], str]
) -> Markup:
    """A bar per day, stacked by series (models), with a legend; `label` writes a value."""
    peak = max((sum(values[i] for values in series.values()) for i in range(len(days))), default=0) or 1
    plot_width, plot_height = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    step = plot_width / max(len(days), 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - 8}" y2="{TOP + plot_height}" class="axis"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 8}" class="tick" text-anchor="end">{escape(label(peak))}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_height}" class="tick" text-anchor="end">0</text>',
    ]
    for i, day in enumerate(days):
        x, base = LEFT + i * step, float(TOP + plot_height)
        for colour, (name, values) in zip(COLOURS * 4, series.items(), strict=False):
            if not values[i]:
                continue
            height = values[i] / peak * plot_height
            base -= height
            tip = f"{day:%b %d}, {name}: {label(values[i])}"
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{base:.1f}" width="{max(step - 2, 1):.1f}" height="{height:.1f}" '
                f'fill="{colour}"><title>{escape(tip)}</title></rect>'
            )
        if (len(days) - 1 - i) % 7 == 0:  # the last day, and every week back from it
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{HEIGHT - 8}" class="tick" text-anchor="middle">{day:%b %d}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" data-colour="{i % len(COLOURS)}"></span>{escape(name)}</li>'
        for i, name in enumerate(series)
    )
    return Markup("".join(parts) + f'<ul class="legend">{legend}</ul>')
