"""Training curves from a run's log.jsonl: loss, action-token accuracy and L1 (normalized action space), train and
held-out, against the optimizer step."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = (("loss", "loss (cross-entropy)"), ("accuracy", "action-token accuracy"), ("l1", "L1, normalized actions"))


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(log_path: str | Path, out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training hosts
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (key, label) in zip(axes, PANELS):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[f"{split}/{key}"]) for r in records if f"{split}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label="held-out" if split == "val" else split, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title or f"vla-bench finetune: {Path(log_path).parent.name}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
