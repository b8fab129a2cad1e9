"""Reports of an evaluation: predictions.jsonl, summary.json, summary.md and the accuracy bar chart."""

from __future__ import annotations

import json
import os


def markdown(summary: dict) -> str:
    """summary.md: the run's settings, a metrics table and the accuracy per domain."""
    lines = [
        f"# Evaluation: {summary['method']} on {summary['data']}/{summary['split']}",
        "",
        f"checkpoint `{summary['ckpt']}`; n_latent={summary['n_latent']}, k={summary['k']}, "
        f"latent_text={summary['latent_text']}, position_mode={summary['position_mode']}, "
        f"max_new_tokens={summary['max_new_tokens']}, batch_size={summary['batch_size']}, "
        f"device {summary['device']}, mesh {summary['mesh']} {summary['mesh_axes']}, "
        f"parameters {summary['param_peak_bytes_per_device'] / 2**30:.3f} GiB per device "
        f"({summary['param_bytes_total'] / 2**30:.3f} GiB in all)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| examples | {summary['examples']} |",
        f"| accuracy | {100 * summary['accuracy']:.2f} % |",
        f"| no answer found | {summary['no_answer']} |",
        f"| mean generated tokens | {summary['mean_generated_tokens']:.2f} |",
        f"| mean AR steps (latent + generated) | {summary['mean_ar_steps']:.2f} |",
        f"| seconds / sample | {summary['seconds_per_sample']:.4f} |",
        f"| samples / s | {summary['samples_per_s']:.2f} |",
        f"| seconds / sample incl. compilation | {summary['seconds_per_sample_with_compile']:.4f} |",
        "",
        "| domain | examples | correct | accuracy |",
        "|---|---|---|---|",
    ]
    for name, d in summary["by_domain"].items():
        lines.append(f"| {name} | {d['examples']} | {d['correct']} | {100 * d['accuracy']:.2f} % |")
    skipped = {**summary["skipped_load"], **summary["skipped_eval"]}
    lines += ["", "skipped rows: " + (", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"), ""]
    if summary.get("ablations"):
        lines += audit_markdown(summary)
    return "\n".join(lines)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def audit_markdown(summary: dict) -> list[str]:
    """The causal audit's tables: one row per ablation (paired with the intact run) and the mediation per step."""
    lines = ["## Causal audit (paired with the intact run)", "",
             "| run | accuracy (%) | delta (pp) | 95% CI (pp) | McNemar p | answers changed (%) |",
             "|---|---|---|---|---|---|",
             f"| intact | {_pct(summary['accuracy'])} | | | | |"]
    for name, a in summary["ablations"].items():
        lo, hi = a["ci95"]
        lines.append(f"| {name} | {_pct(a['accuracy'])} | {100 * a['delta']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                     f"| {a['p_value']:.4g} | {_pct(a['changed'])} |")
    med = summary.get("mediation") or []
    if med:
        names = sorted({n for m in med for n in m["overlap_with_intact"]})
        lines += ["", "| latent step | cos(h_t intact, h_t image-blank) | "
                  + " | ".join(f"overlap {n}: same step / other steps" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for m in med:
            cos = "n/a" if m["cosine_image_blank"] is None else f"{m['cosine_image_blank']:.4f}"
            cells = [f"{m['overlap_with_intact'][n]:.3f} / {m['overlap_other_steps'][n]:.3f}" for n in names]
            lines.append(f"| {m['step']} | {cos} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def ablation_chart(path: str, title: str, intact: float, ablations: dict) -> str:
    """Accuracy per ablation with its paired 95% interval (shifted to accuracy), the intact run as a line
    (matplotlib, an install requirement). Returns what drew it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ablations)
    acc = [ablations[n]["accuracy"] for n in names]
    lo = [intact + ablations[n]["ci95"][0] for n in names]
    hi = [intact + ablations[n]["ci95"][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1), 3.8))
    err = [[100 * max(a - low, 0) for a, low in zip(acc, lo)], [100 * max(h - a, 0) for a, h in zip(acc, hi)]]
    bars = ax.bar(names, [100 * a for a in acc], yerr=err, capsize=4, color="#dd8452")
    ax.bar_label(bars, fmt="%.1f", padding=6)
    ax.axhline(100 * intact, color="#4c72b0", linestyle="--", label=f"intact {100 * intact:.1f}%")
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


def bar_chart(path: str, title: str, names: list[str], values: list[float]) -> str:
    """Accuracy bars as PNG: matplotlib when installed, else a plain PIL drawing. Returns what drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1), 3.5))
        bars = ax.bar(names, [100 * v for v in values], color="#4c72b0")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    bar_w, gap, h, top, bottom = 80, 30, 300, 40, 40
    w = gap + len(names) * (bar_w + gap)
    img = Image.new("RGB", (max(w, 320), h + top + bottom), "white")
    d = ImageDraw.Draw(img)
    d.text((gap, 10), title, fill="black")
    d.line([(gap // 2, top + h), (img.width - gap // 2, top + h)], fill="black")
    for i, (name, v) in enumerate(zip(names, values)):
        x0 = gap + i * (bar_w + gap)
        y0 = top + h - int(round(h * v))
        d.rectangle([x0, y0, x0 + bar_w, top + h], fill=(76, 114, 176))
        d.text((x0, max(top, y0 - 14)), f"{100 * v:.1f}%", fill="black")
        d.text((x0, top + h + 6), name[:14], fill="black")
    img.save(path)
    return "PIL (matplotlib not installed)"


def write_predictions(out_dir: str, records: list[dict]) -> str:
    """predictions.jsonl: one JSON object per evaluated row, in split order."""
    path = os.path.join(out_dir, "predictions.jsonl")
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def write_summary(out_dir: str, summary: dict) -> None:
    """summary.json and summary.md; with any domain, accuracy_by_domain.png too (summary["chart"] names what drew
    it; that key is added after summary.json is written)."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown(summary))
    if summary["by_domain"]:
        drawn = bar_chart(os.path.join(out_dir, "accuracy_by_domain.png"),
                          f"{summary['method']} on {summary['data']}/{summary['split']}: accuracy by domain",
                          list(summary["by_domain"]), [d["accuracy"] for d in summary["by_domain"].values()])
        summary["chart"] = drawn
    if summary.get("ablations"):
        ablation_chart(os.path.join(out_dir, "ablations.png"),
                       f"{summary['method']} on {summary['data']}/{summary['split']}: causal audit",
                       summary["accuracy"], summary["ablations"])


def summary_line(summary: dict, out_dir: str) -> str:
    """The one line the CLI prints at the end of a run."""
    return (f"{summary['method']} on {summary['data']}/{summary['split']}: accuracy {100 * summary['accuracy']:.2f}% "
            f"over {summary['examples']} examples, {summary['mean_ar_steps']:.1f} AR steps, "
            f"{summary['seconds_per_sample']:.3f} s/sample; wrote {out_dir}")
