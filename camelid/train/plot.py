"""`camelid plot RUN_DIR`: PNG charts of a run's metrics.jsonl (loss and val loss, learning rate, throughput).

matplotlib's object API with the Agg canvas: no pyplot, so no global figure state and no display needed.
"""

from __future__ import annotations

from pathlib import Path

from camelid.train.metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/{loss,lr,throughput}.png; returns their paths."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("camelid plot needs matplotlib: pip install matplotlib") from None
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r and "event" not in r]
    evals = [r for r in rows if "val_loss" in r]
    events = [r for r in rows if r.get("event") in ("skip", "rollback")]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)

    def chart(name: str, ylabel: str, draw) -> Path:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        return path

    def loss(ax) -> None:
        good = [r for r in steps if r["loss"] is not None]
        ax.plot([r["step"] for r in good], [r["loss"] for r in good], lw=1, label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        for r in events:  # skipped updates and rollbacks, where a person looks for them
            ax.axvline(r["step"], color="red" if r["event"] == "rollback" else "orange", lw=0.8, alpha=0.6)

    def lr(ax) -> None:
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    def throughput(ax) -> None:
        ax.plot([r["step"] for r in steps], [r["tokens_per_s"] for r in steps], lw=1, label="tokens/s")
        mfu = [r for r in steps if r.get("mfu") is not None]
        if mfu:
            twin = ax.twinx()
            twin.plot([r["step"] for r in mfu], [100 * r["mfu"] for r in mfu], color="gray", lw=1)
            twin.set_ylabel("MFU %")

    return [chart("loss", "loss", loss), chart("lr", "learning rate", lr), chart("throughput", "tokens/s", throughput)]
