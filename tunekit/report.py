"""The evaluation report every task kind writes: a table of each model's main metrics (Markdown and
CSV), a bar chart per metric, and the first predictions of each model."""

from __future__ import annotations

import json
from pathlib import Path


def main_metrics(results: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for metrics in results.values():
        keys += [k for k, v in metrics.items() if isinstance(v, float) and k not in keys and k != "perplexity"]
        keys += [f"code.{k}" for k in metrics.get("code", {}) if k.startswith("pass_at_") and f"code.{k}" not in keys]
    return keys


def _value(metrics: dict, key: str) -> float | None:
    for part in key.split("."):
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics if isinstance(metrics, (int, float)) else None


def table_rows(results: dict[str, dict]) -> tuple[list[str], list[dict]]:
    keys = main_metrics(results) + ["perplexity", "examples"]
    return ["model", *keys], [{"model": name, **{k: _value(m, k) for k in keys}} for name, m in results.items()]


def markdown_table(results: dict[str, dict]) -> list[str]:
    columns, table = table_rows(results)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in table:
        cells = [row["model"]] + ["-" if row[k] is None else f"{row[k]:.4g}" for k in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prediction_lines(rows: dict[str, list[dict]], shown: int = 5, heading: str = "##", about: str = "") -> list[str]:
    lines = []
    for name, examples in rows.items():
        lines += [f"{heading} {name}{about}: first {shown} predictions", ""]
        for row in examples[:shown]:
            # JSON-quoted so multi-line or fenced model output cannot break the Markdown.
            lines += [f"- reference: {json.dumps(row['reference'], ensure_ascii=False)}",
                      f"  prediction: {json.dumps(row['prediction'], ensure_ascii=False)}"]
        lines.append("")
    return lines


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _shares(shares: dict[str, float], shown: int = 5) -> str:
    items = list(shares.items())
    text = ", ".join(f"{_cell(label)} {share:.0%}" for label, share in items[:shown])
    return text + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def collapse_banner(results: dict[str, dict], about: str = "") -> list[str]:
    """A warning line per trained model (not the untrained `base`) that the task kind found collapsed."""
    return [f"> **Warning: the {name} model{about} collapsed**: it {_cell(m.get('collapse', {}).get('reason'))}. "
            "Its scores are those of a constant predictor (see the collapse check below)." for name, m in results.items()
            if name != "base" and m.get("collapsed")]


def collapse_lines(results: dict[str, dict], heading: str = "##", about: str = "") -> list[str]:
    """The collapse check of every model scored (task.collapse): collapsed or not, the most predicted label,
    its share of predictions and of references, the predicted label distribution and the reason."""
    checked = {name: m for name, m in results.items() if "collapsed" in m}
    if not checked:
        return []
    lines = [f"{heading} Collapse check{about}", "",
             "| model | collapsed | most predicted | its share of predictions | its share of references | predicted | why |",
             "|---|---|---|---|---|---|---|"]
    for name, m in checked.items():
        c = m.get("collapse", {})
        if "predicted" in c:
            predicted = _shares(c["predicted"])
        else:  # regression: the spread of the predictions against the targets'
            predicted = "; ".join(f"{_cell(k)}: std {v['prediction_std']:.3g} (targets {v['reference_std']:.3g})"
                                  for k, v in c.get("spread", {}).items())
        share = f"{c['prediction_share']:.1%}" if "prediction_share" in c else "-"
        ref = f"{c['reference_share']:.1%}" if "reference_share" in c else "-"
        lines.append(f"| {name} | {'**yes**' if m['collapsed'] else 'no'} | {_cell(c.get('label') or '-')} | {share} | "
                     f"{ref} | {predicted} | {_cell(c.get('reason') or '-')} |")
    return lines + [""]


def per_class_lines(results: dict[str, dict], heading: str = "##", about: str = "") -> list[str]:
    """Per-label (classification) or per-entity-type (NER) precision / recall / F1 / support of each model."""
    scored = {name: m["per_class"] for name, m in results.items() if m.get("per_class")}
    if not scored:
        return []
    lines = [f"{heading} Per-class scores{about}", ""]
    for name, per_class in scored.items():
        lines += [f"{name}:", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(label)} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
                  for label, row in per_class.items()]
        lines.append("")
    return lines


def markdown_report(results: dict[str, dict], rows: dict[str, list[dict]], checkpoints: dict[str, str],
                    shown: int = 5, title: str = "# Evaluation on the test split", note: str = "") -> str:
    banner = collapse_banner(results)
    lines = [title, "", *([*banner, ""] if banner else []), *markdown_table(results)]
    lines += ["", note, "",
              "checkpoints: " + ", ".join(f"{name} = `{path}`" for name, path in checkpoints.items()), "",
              "![main metrics per model](metrics.png)", ""]
    lines += collapse_lines(results)
    lines += per_class_lines(results)
    lines += prediction_lines(rows, shown)
    return "\n".join(lines)


def metrics_png(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = main_metrics(results)
    names = list(results)
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [_value(results[n], key) for n in names]
        ax.bar(range(len(names)), [v or 0.0 for v in values], color=[colors[i % len(colors)] for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def flat_task_results(results: dict[str, dict]) -> dict[str, dict]:
    """{model: {task: metrics}} -> {model: {"task.metric": value}}: one row per model for the plot and MLflow table."""
    return {label: {f"{name}.{key}": value for name, metrics in per_task.items() for key, value in metrics.items()}
            for label, per_task in results.items()}
