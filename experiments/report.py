"""The run's report: report.md (what was asked, what was found, the evidence) and pareto.png.

pareto.png shows every trial's LUT latency against its validation accuracy, the feasible Pareto front, the target,
the space's torchvision reference archs and the shipped winners.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_space.files import atomic_write
from searchers.base import SearchResult


@dataclass(frozen=True)
class Marker:
    """A named point to draw on the plot (a reference arch or a winner)."""

    label: str
    latency_ms: float
    accuracy: float | None  # None: drawn on the latency axis only (not evaluated)


def plot_pareto(result: SearchResult, path: str | Path, references: Sequence[Marker] = (),
                winners: Sequence[Marker] = (), title: str = "",
                targets: Sequence[tuple[str, float]] = ()) -> None:
    """Draw every trial, the feasible Pareto front, a line per budget (`targets`: label and milliseconds; default
    the search's target), references and winners; PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    done = [t for t in result.trials if t.evaluated]
    skipped = [t for t in result.trials if not t.evaluated and not math.isnan(t.predicted_ms)]
    feasible = [t for t in done if t.feasible]
    over = [t for t in done if not t.feasible]
    ax.scatter([t.predicted_ms for t in feasible], [t.accuracy for t in feasible], s=18, c="tab:blue", alpha=0.6,
               label=f"feasible trials ({len(feasible)})")
    if over:
        ax.scatter([t.predicted_ms for t in over], [t.accuracy for t in over], s=18, c="tab:gray", alpha=0.5,
                   label=f"over the target ({len(over)})")
    front = result.pareto
    if front:
        ax.step([t.predicted_ms for t in front], [t.accuracy for t in front], where="post", c="tab:blue", lw=1.5,
                label="feasible Pareto front")
    y_floor = min((t.accuracy for t in done), default=0.0)
    if skipped:
        ax.scatter([t.predicted_ms for t in skipped], [y_floor] * len(skipped), marker="|", s=60, c="tab:gray",
                   label=f"infeasible, not evaluated ({len(skipped)})")
    styles = ("--", ":", "-.", (0, (5, 1)))
    for i, (label, ms) in enumerate(targets or [(f"{result.target_ms:g} ms", result.target_ms)]):
        ax.axvline(ms, c="tab:red", ls=styles[i % len(styles)], lw=1.2, label=f"budget {label} ({ms:.3g} ms)")
    for m in references:
        ax.scatter([m.latency_ms], [m.accuracy if m.accuracy is not None else y_floor], marker="s", s=60,
                   facecolors="none", edgecolors="tab:green", lw=1.5)
        ax.annotate(m.label, (m.latency_ms, m.accuracy if m.accuracy is not None else y_floor), fontsize=8,
                    xytext=(4, 4), textcoords="offset points", color="tab:green")
    for m in winners:
        if m.accuracy is None:
            continue
        ax.scatter([m.latency_ms], [m.accuracy], marker="*", s=220, c="tab:orange", edgecolors="black", zorder=5)
        ax.annotate(m.label, (m.latency_ms, m.accuracy), fontsize=8, xytext=(6, -10), textcoords="offset points")
    ax.set_xlabel("predicted latency (ms, latency table)")
    ax.set_ylabel("validation accuracy (supernet, BN recalibrated)")
    ax.set_title(title or "search trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), mode="wb")
    plt.close(fig)


_SHIPPED = {"onnxruntime": "model.onnx in ONNX Runtime", "eager": "model.pt2, the torch.export program"}


def _ms(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def write_report(path: str | Path, *, command: str, device: str, runtime: str, statistic: str,
                 fingerprint: dict[str, Any], result: SearchResult, families: Sequence[dict[str, Any]],
                 steps: dict[str, float], notes: Sequence[str] = (), references: Sequence[dict[str, Any]] = ()
                 ) -> None:
    """report.md: the budgets, the device and runtime, per budget the winners with their measured latency and
    accuracy and the candidates the measurement rejected, the reference archs measured, step times.

    `families`: one mapping per budget with `label`, `target_ms`, `winners` and `rejected`.
    """
    done = [t for t in result.trials if t.state == "COMPLETE"]
    budgets = ", ".join(f"**{f['label']}** ({f['target_ms']:.3f} ms)" for f in families)
    lines = [
        "# shufflenas run report",
        "",
        f"Command: `{command}`",
        "",
        f"- Budget{'s' if len(families) > 1 else ''}: {budgets} per batch, {statistic} over every call, on `{device}` "
        f"({fingerprint.get('device_name', '?')}) in **{runtime}**, batch {fingerprint.get('batch_size', '?')}, "
        f"{fingerprint.get('threads', '?')} thread(s), {fingerprint.get('dtype', '?')}",
        f"- Trials: {len(done)} completed, {sum(not t.feasible for t in done)} predicted over the "
        f"{'largest ' if len(families) > 1 else ''}budget (not evaluated), {len(result.pareto)} on the feasible "
        f"Pareto front",
        "",
        f"Latency is the {statistic} over every call of the shipped file ({_SHIPPED.get(runtime, runtime)}), "
        "measured on the device in a fresh process after export; accuracy is the retrained network's. Validation "
        "accuracy comes from images held out of the training split; test accuracy from the official test split, used "
        "only here.",
    ]
    for f in families:
        lines += _family(f, statistic, len(families) > 1)
    if references:
        lines += _references(references, statistic, runtime)
    compared = [r for r in references if "retrained" in r]
    if compared:
        lines += _against_references(compared, families, statistic)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in steps.items()]
    lines += ["", "Files: `trials.csv` (every trial), `pareto.png`, `winners/" + ("<budget>/" if len(families) > 1
              else "") + "<rank>-<arch>/` (arch.yaml, model.pt, model.pt2, model.onnx, model_card.json)."]
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"))


def _references(references: Sequence[dict[str, Any]], statistic: str, runtime: str) -> list[str]:
    """The reference archs: latency measured like the winners', accuracy with the supernet's weights and, for those
    retrained (`--compare-references`), after retraining."""
    lines = ["", "## Reference archs of the space", "",
             f"Measured like the winners ({statistic}, {runtime}, random weights); search accuracy with the "
             "supernet's weights; val and test accuracy only for the references retrained with the winners' recipe "
             "(`--compare-references`).", "",
             "| name | arch | predicted ms | measured ms | search accuracy | val acc | test acc |",
             "|---|---|---|---|---|---|---|"]
    for r in references:
        trained = r.get("retrained", {})
        lines.append(f"| {r['name']} | `{r['arch']}` | {_ms(r['predicted_ms'])} | {_ms(r.get('measured_ms'))} | "
                     f"{_pct(r.get('accuracy'))} | {_pct(trained.get('val_accuracy'))} | "
                     f"{_pct(trained.get('test_accuracy'))} |")
    return lines


def _against_references(compared: Sequence[dict[str, Any]], families: Sequence[dict[str, Any]],
                        statistic: str) -> list[str]:
    """Each winner next to each retrained reference: measured latency, test accuracy, and the differences."""
    lines = ["", "## Winners against the references", "",
             f"Both retrained with the same recipe and seed; latency is the {statistic} of the shipped file (the "
             "winners) and of the same file of the reference, measured alike.", "",
             "| network | measured ms | test acc | latency / reference | test acc - reference |",
             "|---|---|---|---|---|"]
    for ref in compared:
        ref_acc = ref["retrained"]["test_accuracy"]
        lines.append(f"| {ref['name']} (reference) | {_ms(ref['measured_ms'])} | {_pct(ref_acc)} | 1.00x | - |")
        for f in families:
            for w in f["winners"]:
                name = f"#{w['rank']}" + (f" of {f['label']}" if len(families) > 1 else "") + f" `{w['arch']}`"
                ratio = w["measured_ms"] / ref["measured_ms"] if ref["measured_ms"] else float("nan")
                gain = 100 * (w["test_accuracy"] - ref_acc)
                lines.append(f"| {name} | {_ms(w['measured_ms'])} | {_pct(w['test_accuracy'])} | {ratio:.2f}x | "
                             f"{gain:+.2f} points |")
    return lines


def _family(f: dict[str, Any], statistic: str, several: bool) -> list[str]:
    """The winners and the rejected candidates of one budget."""
    title = f"Winners: budget {f['label']} ({f['target_ms']:.3f} ms)" if several else "Winners"
    lines = ["", f"## {title}", "",
             f"| rank | arch | params | MFLOPs | predicted ms | measured ms ({statistic}) | p50 / p90 / p99 | calls | "
             "val acc | test acc | folder |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in f["winners"]:
        m = w["measured"]
        lines.append(
            f"| {w['rank']} | `{w['arch']}` | {w['params']:,} | {w['mflops']:.1f} | {_ms(w['predicted_ms'])} | "
            f"**{_ms(m['ms'])}** | {_ms(m['p50_ms'])} / {_ms(m['p90_ms'])} / {_ms(m['p99_ms'])} | {m['calls']} | "
            f"{_pct(w.get('val_accuracy'))} | {_pct(w.get('test_accuracy'))} | `{w['folder']}` |"
        )
    if not f["winners"]:
        lines.append("| - | no arch measured within the budget | | | | | | | | | |")
    lines += ["", "### The latency promise", ""]
    if f["rejected"]:
        lines += ["Candidates whose shipped file measured over the budget were not shipped:", "",
                  "| arch | predicted ms | measured ms | when | search accuracy |", "|---|---|---|---|---|"]
        for r in f["rejected"]:
            lines.append(f"| `{r['arch']}` | {_ms(r['predicted_ms'])} | {_ms(r['measured_ms'])} | "
                         f"{r.get('when', '')} | {_pct(r.get('accuracy'))} |")
    else:
        lines.append("Every candidate measured within the budget.")
    return lines
