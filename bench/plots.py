"""The bench results as plots, a PNG beside each JSON: speed ratios and loss curves are read faster
from a picture than from a table.

usage: python bench/plots.py bench/results/NAME.json [...]    # writes bench/results/NAME.png

bench/cpu_speed.py, gpu_speed.py, checkpointing.py, gguf_quality.py and plan_memory.py draw theirs after a
run; this command draws them again from saved results (the kind is told from the JSON's shape).
"""
import json
import sys
from pathlib import Path

BASE, OURS, PLAN = "tab:gray", "tab:blue", "tab:orange"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    print(f"wrote {path}")


def _bars(ax, values, labels, notes, color, xlabel: str) -> None:
    """Horizontal bars, first at the top, each with a note at its end (a ratio)."""
    ax.barh(range(len(values)), values, color=color)
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    for i, (v, note) in enumerate(zip(values, notes)):
        ax.text(v, i, note, va="center")
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_xlabel(xlabel)


def speed_plot(result: dict, path: Path) -> None:
    """bench/cpu_speed.py: per model, each case's warm tokens/s with its ratio to the baseline, and the
    loss curves of the cases that train the baseline's loss (those whose first loss is the baseline's:
    the same objective on the same rows from the same weights)."""
    plt = _pyplot()
    summary, baseline = result["summary"], result["baseline"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 0.5 + 2.8 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]}, dpi=100)
    for (bars, curves), model in zip(axes, models):
        rows = [r for r in summary if r["model"] == model]
        _bars(bars, [r["warm_tokens_per_second"] for r in rows], [r["case"] for r in rows],
              [f" {r['warm_ratio']:.2f}x" for r in rows], [BASE if r["case"] == baseline else OURS for r in rows],
              f"warm tokens/s, best of {result['reps']}")
        bars.set_title(f"{model}: against the {baseline} case")
        first = next(r["losses"][0] for r in rows if r["case"] == baseline)
        for r in rows:
            if abs(r["losses"][0] - first) <= 1e-3 * abs(first):
                style = dict(color=BASE, linewidth=3, alpha=0.6) if r["case"] == baseline else dict(linewidth=1)
                curves.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["case"], **style)
        curves.set_xlabel("step")
        curves.set_ylabel("loss")
        curves.set_title(f"{model}: loss curves, the same loss")
        curves.legend(fontsize=8)
        curves.grid(alpha=0.3)
    _save(fig, path)


def gpu_plot(rows: list, path: Path) -> None:
    """bench/gpu_speed.py: per case, tokens/s and peak memory of each plain-stack side and of qlora,
    with qlora's ratios to the case's first plain side."""
    plt = _pyplot()
    measured = [r for r in rows if "tok_s" in r]
    cases = list(dict.fromkeys(r["case"] for r in measured))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.8 + 0.9 * len(measured)), dpi=100)
    labels, colors, speed, memory, notes = [], [], [], [], []
    for case in cases:
        mine = [r for r in measured if r["case"] == case]
        base = next((r for r in mine if r["side"] != "qlora"), None)  # none: qlora alone, one lever on
        for r in mine:
            ours = r["side"] == "qlora"
            labels.append(f"{case}: {r['side']}")
            colors.append(OURS if ours else BASE)
            speed.append(r["tok_s"])
            memory.append(r["peak_gib"])
            notes.append((f" {r['tok_s'] / base['tok_s']:.2f}x", f" {r['peak_gib'] / base['peak_gib']:.2f}x")
                         if ours and base else ("", ""))
    _bars(axes[0], speed, labels, [n[0] for n in notes], colors, "tokens/s")
    _bars(axes[1], memory, [""] * len(labels), [n[1] for n in notes], colors, "peak GiB")
    device = next((r.get("device") or r.get("gpu") for r in measured if r.get("device") or r.get("gpu")), "GPU")
    axes[0].set_title(f"{device}: speed (qlora against the case's first plain side)")
    axes[1].set_title("peak CUDA memory")
    _save(fig, path)


def _memory_bars(ax, rows, title: str) -> None:
    """Each case's highest measured peak beside the planner's estimate, with the estimate's error."""
    y = list(range(len(rows)))
    ax.barh([i - 0.2 for i in y], [r["peak_gib"] for r in rows], height=0.4, color=OURS, label="measured peak RSS")
    ax.barh([i + 0.2 for i in y], [r["planned_gib"] for r in rows], height=0.4, color=PLAN, label="qlora plan")
    for i, r in enumerate(rows):
        ax.text(max(r["peak_gib"], r["planned_gib"]), i, f" {r['plan_error']:+.0%}", va="center")
    ax.set_yticks(y, [r["case"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(r["peak_gib"], r["planned_gib"]) for r in rows) * 1.2)
    ax.set_xlabel("GiB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # clear of the bars


def checkpointing_plot(result: dict, path: Path) -> None:
    """bench/checkpointing.py: each lever's measured peak beside the planner's estimate, and its speed."""
    plt = _pyplot()
    rows = result["summary"]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 0.8 + 0.6 * len(rows)), dpi=100)
    _memory_bars(mem, rows, f"checkpointing, {result['batch']} x {result['length']} tokens: memory")
    _bars(speed, [r["warm_tokens_per_second"] for r in rows], [""] * len(rows),
          [f" {r['speedup']:.2f}x" for r in rows], OURS,
          f"warm tokens/s, best of {result['reps']} (x: against every layer)")
    speed.set_title("speed")
    _save(fig, path)


def plan_plot(result: dict, path: Path) -> None:
    """bench/plan_memory.py: each case's highest peak RSS beside `qlora plan`'s estimate."""
    plt = _pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.55 * len(rows)), dpi=100)
    _memory_bars(ax, rows, f"qlora plan against the highest of {result['runs']} runs' peak RSS")
    _save(fig, path)


def gguf_quality_plot(result: dict, path: Path) -> None:
    """bench/gguf_quality.py: each GGUF type's file size against its KL from the model, and its top-1."""
    plt = _pyplot()
    rows = result["rows"]
    fig, (kl, top1) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for r in rows:
        kl.scatter(r["file_mb"], max(r["kl"], 1e-7), color=OURS)
        kl.annotate(f" {r['type']}", (r["file_mb"], max(r["kl"], 1e-7)), fontsize=8)
    kl.set_yscale("log")
    kl.set_xlabel("file MB")
    kl.set_ylabel("KL(model || GGUF), mean over positions")
    kl.set_title(f"{result['model']} in llama.cpp: size and divergence")
    _bars(top1, [100 * r["top1"] for r in rows], [r["type"] for r in rows],
          [f" {100 * r['top1']:.1f}%" for r in rows], OURS, "top-1 agreement with the fp32 model, %")
    top1.set_xlim(0, 115)
    top1.set_title("next-token agreement")
    _save(fig, path)


def plot(path: Path) -> Path:
    """Draws the PNG for one results file; returns its path."""
    result = json.loads(path.read_text())
    target = path.with_suffix(".png")
    if isinstance(result, list):
        gpu_plot(result, target)
    elif "baseline" in result:
        speed_plot(result, target)
    elif result.get("summary") and "planned_gib" in result["summary"][0]:
        checkpointing_plot(result, target)
    elif "rows" in result and "kl" in result["rows"][0]:
        gguf_quality_plot(result, target)
    elif "rows" in result and "planned_gib" in result["rows"][0]:
        plan_plot(result, target)
    else:
        raise SystemExit(f"{path}: not a result of cpu_speed.py, gpu_speed.py, checkpointing.py, gguf_quality.py "
                         "or plan_memory.py")
    return target


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for name in sys.argv[1:]:
        plot(Path(name))
