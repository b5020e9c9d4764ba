"""Hand-written SVG charts for report.html: no plotting dependency, no external assets.

Two kinds: bars with confidence-interval whiskers (one panel per metric, one bar per arm)
and a latency strip plot (every request as a dot, with p50/p95 marks). Colours are fixed
per arm position so every panel reads the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"


def bar_panel(
    title: str,
    arms: Sequence[str],
    estimates: Sequence[dict | None],
    *,
    upper: float | None = 1.0,
    width: int = 240,
    height: int = 190,
) -> str:
    """One metric: a bar per arm (mean) with its interval as a whisker; missing arms blank."""
    left, right, top, bottom = 34, 8, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    highs = [e["high"] for e in estimates if e and e.get("high") is not None]
    scale_max = upper if upper is not None else (max(highs) * 1.1 if highs else 1.0) or 1.0
    slot = plot_w / max(len(arms), 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - min(max(value / scale_max, 0.0), 1.0))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2}" y="14" text-anchor="middle" {FONT} font-weight="600">'
        f"{escape(title)}</text>",
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = scale_max * fraction
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end" {FONT}>'
            f"{_fmt(value)}</text>"
        )
    for i, (arm, estimate) in enumerate(zip(arms, estimates, strict=True)):
        x = left + slot * i + slot * 0.15
        bar_w = slot * 0.7
        centre = x + bar_w / 2
        parts.append(
            f'<text x="{centre:.1f}" y="{height - bottom + 14}" text-anchor="middle" {FONT}>'
            f"{escape(arm)}</text>"
        )
        if not estimate or estimate.get("mean") is None:
            parts.append(
                f'<text x="{centre:.1f}" y="{top + plot_h - 4}" text-anchor="middle" '
                f'{FONT} fill="#999">n/a</text>'
            )
            continue
        mean = estimate["mean"]
        colour = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<rect x="{x:.1f}" y="{y(mean):.1f}" width="{bar_w:.1f}" '
            f'height="{y(0) - y(mean):.1f}" fill="{colour}">'
            f"<title>{escape(arm)}: {mean:.3f} [{estimate['low']:.3f}, "
            f"{estimate['high']:.3f}] n={estimate['n']}</title></rect>"
        )
        low, high = y(estimate["low"]), y(estimate["high"])
        parts.append(
            f'<path d="M{centre:.1f} {low:.1f}V{high:.1f}M{centre - 5:.1f} {low:.1f}'
            f'h10M{centre - 5:.1f} {high:.1f}h10" stroke="#222" fill="none"/>'
        )
        parts.append(
            f'<text x="{centre:.1f}" y="{height - bottom + 26}" text-anchor="middle" '
            f'{FONT} fill="#555">{mean:.2f}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def latency_strip(
    arms: Sequence[str],
    latencies: Sequence[Sequence[float]],
    p50: Sequence[float | None],
    p95: Sequence[float | None],
    *,
    width: int = 720,
    row_h: int = 34,
) -> str:
    """Every request's latency as a dot on one row per arm; ticks mark p50 (solid) and p95
    (dashed). Vertical jitter is a fixed function of the index, so the SVG is reproducible."""
    left, right, top, bottom = 64, 16, 10, 30
    height = top + bottom + row_h * len(arms)
    longest = max((max(values) for values in latencies if values), default=1.0) or 1.0
    plot_w = width - left - right

    def x(value: float) -> float:
        return left + plot_w * value / (longest * 1.05)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="latency per request">'
    ]
    for tick in range(6):
        value = longest * 1.05 * tick / 5
        parts.append(
            f'<line x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{top}" '
            f'y2="{height - bottom}" stroke="#eee"/>'
            f'<text x="{x(value):.1f}" y="{height - bottom + 14}" text-anchor="middle" '
            f"{FONT}>{value:.1f}s</text>"
        )
    for i, arm in enumerate(arms):
        centre = top + row_h * i + row_h / 2
        colour = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<text x="{left - 6}" y="{centre + 4:.1f}" text-anchor="end" {FONT}>'
            f"{escape(arm)}</text>"
        )
        for j, value in enumerate(latencies[i]):
            jitter = ((j * 7919) % 17 - 8) / 8 * row_h * 0.3
            parts.append(
                f'<circle cx="{x(value):.1f}" cy="{centre + jitter:.1f}" r="2.2" '
                f'fill="{colour}" fill-opacity="0.55"/>'
            )
        for value, dash in ((p50[i], ""), (p95[i], ' stroke-dasharray="3 2"')):
            if value is not None:
                x_value, reach = x(value), row_h * 0.45
                parts.append(
                    f'<line x1="{x_value:.1f}" x2="{x_value:.1f}" y1="{centre - reach:.1f}" '
                    f'y2="{centre + reach:.1f}" stroke="#222" stroke-width="1.5"{dash}/>'
                )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle" {FONT}>'
        "seconds per request (solid: p50, dashed: p95)</text></svg>"
    )
    return "".join(parts)
