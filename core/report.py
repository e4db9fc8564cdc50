"""Side-by-side reports of run results: a terminal/Markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["load_results", "markdown_table", "plot", "write_reports"]

PHASES = ("keygen", "encrypt", "evaluate", "decrypt")


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.3g}" if v < 10 else f"{v * 1e3:.0f}"


def _size(n: int | None) -> str:
    if n is None or n == 0:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per scheme: accuracy, agreement, latency per phase, sizes, memory."""
    head = ("| scheme | security | output | server learns | accuracy | clear acc. | agreement "
            "| max abs err | keygen ms | encrypt ms/img | evaluate ms/img | decrypt ms/img "
            "| img/s | input/img | public keys | functional keys | peak RSS MB |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lat = r.get("latency_s", {})
        sec = "none (reference)" if r["security_bits"] is None else \
            f"{r['security_bits']}-bit" + (" INSECURE" if r.get("insecure") else "")
        b = r.get("bytes", {})
        output, learns = r["output"], r.get("reveals") or "nothing"
        if r["security_bits"] is None:  # a scheme that encrypts nothing (the reference)
            output, learns = "clear", "everything (reference, no encryption)"
        rows.append("| " + " | ".join([
            f"`{r['config']}`", sec, output, learns,
            f"{r['accuracy']:.4f}", f"{r['clear_accuracy']:.4f}", f"{r['agreement']:.4f}",
            f"{r['max_abs_error']:.2e}", *(_ms(lat.get(p)) for p in PHASES),
            f"{r['throughput_per_s']:.4g}", _size(b.get("input")), _size(b.get("public_keys")),
            _size(b.get("functional_keys")), f"{r['peak_rss_mb']:.0f}"]) + " |")
    return "\n".join(rows) + "\n"


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Latency per phase (log scale, stacked per scheme) beside accuracy per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names) + 4), 4.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    colors = {"keygen": "#9e9e9e", "encrypt": "#1f77b4", "evaluate": "#d62728",
              "decrypt": "#2ca02c"}
    width = 0.8 / 3
    xs = range(len(names))
    for k, phase in enumerate(PHASES[1:]):
        vals = [max((r["latency_s"].get(phase) or 0.0) * 1e3, 1e-4) for r in results]
        ax1.bar([x + (k - 1) * width for x in xs], vals, width, label=phase,
                color=colors[phase])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per image (log scale)")
    ax1.set_title("latency per phase")
    ax1.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax1.legend(fontsize=8)
    acc = [r["accuracy"] for r in results]
    clear = [r["clear_accuracy"] for r in results]
    ax2.bar([x - 0.2 for x in xs], acc, 0.4, label="secure", color="#d62728")
    ax2.bar([x + 0.2 for x in xs], clear, 0.4, label="float model", color="#9e9e9e")
    for x, a in zip(xs, acc):
        ax2.text(x - 0.2, a + 0.005, f"{a:.3f}", ha="center", fontsize=7)
    lo = min(acc + clear)
    ax2.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax2.set_title("accuracy")
    ax2.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax2.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: Sequence[dict[str, Any]], out_dir: str | Path,
                  name: str = "bench", title: str = "") -> list[Path]:
    """Write ``name.json``, ``name.md`` and ``name.png`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(list(results), indent=2, default=str) + "\n")
    notes = []
    for r in results:
        if r.get("security_source"):
            notes.append(f"- `{r['config']}`: {r['security_bits']}-bit figure from "
                         f"{r['security_source']}.")
        if r.get("insecure"):
            notes.append(f"- **{r['config']} runs below 128-bit security** "
                         f"({r['security_bits']} bits, allow_insecure).")
        if r.get("reveals"):
            notes.append(f"- `{r['config']}`: the server learns {r['reveals']}.")
    meta = results[0] if results else {}
    paths[1].write_text(
        f"# {title or 'secureinfer benchmark'}\n\n"
        f"dataset `{meta.get('dataset', '?')}`, model `{meta.get('model', '?')}`, "
        f"{meta.get('samples', 0)} test samples; latencies are per image (median), keygen once.\n\n"
        + markdown_table(results) + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    plot(results, paths[2], title)
    return paths


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Concatenate the result lists (or single results) stored in JSON files."""
    results: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        results.extend(data if isinstance(data, list) else [data])
    return results
