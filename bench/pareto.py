"""The accuracy/latency Pareto plot of the bench: every measured vit_fmnist row (recipes, their variants,
ORT int8 and recipe + ORT int8), top-1 against b1 speed-up over the fp32 original (same-run ratios, so rows
measured on different days stay comparable). The frontier joins the rows that no other row beats on both."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODEL = "vit_fmnist"
SHOWN_DROP = 10.0  # rows losing more top-1 than this are listed under the plot, not drawn (they squash the axis)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (speed-up, top-1) not dominated by another, by increasing speed-up."""
    best, result = float("-inf"), []
    for speed, top1 in sorted(points, key=lambda p: (-p[0], -p[1])):
        if top1 > best:
            result.append((speed, top1))
            best = top1
    return sorted(result)


def plot(results: dict[str, dict], path: Path) -> Path | None:
    """Write the plot of ``results`` (``{recipe: results}``) to ``path``; None when no row has a top-1."""
    rows = [r for res in results.values() for r in res["rows"] if r["model"] == MODEL and r["top1"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 6.5))
    floor = rows[0]["top1_original"] - SHOWN_DROP
    shown, dropped = [r for r in rows if r["top1"] >= floor], [r for r in rows if r["top1"] < floor]
    for i, r in enumerate(sorted(shown, key=lambda r: r["latency"]["b1"]["speedup"])):
        speed, int8 = r["latency"]["b1"]["speedup"], r["variant"].endswith("+ ORT int8")
        ax.scatter(speed, r["top1"], marker="s" if int8 else "o", color="tab:orange" if int8 else "tab:blue")
        ax.annotate(r["variant"], (speed, r["top1"]), fontsize=7, rotation=30,
                    xytext=(3, 4 + 10 * (i % 3)), textcoords="offset points")
    if dropped:
        fig.text(0.01, 0.01, "not drawn (top-1 below the axis): " + "; ".join(
            f"{r['variant']} {r['top1']:.1f} % at {r['latency']['b1']['speedup']:.2f}×" for r in dropped), fontsize=7)
    edge = frontier([(r["latency"]["b1"]["speedup"], r["top1"]) for r in shown])
    ax.plot(*zip(*edge), color="gray", linestyle="--", linewidth=1, label="Pareto frontier")
    ax.axhline(rows[0]["top1_original"], color="black", linewidth=0.8, label="original top-1")
    ax.scatter([], [], marker="o", color="tab:blue", label="fp32 ONNX")
    ax.scatter([], [], marker="s", color="tab:orange", label="+ ORT dynamic int8")
    ax.set_xlabel("onnxruntime b1 speed-up over the fp32 original (same-run medians)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title(f"{MODEL}: accuracy vs latency, every bench row", pad=45)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
