"""Side-by-side reports of run results: a terminal/Markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["human_bytes", "human_report", "load_results", "markdown_table", "plan_summary", "plot",
           "server_learns", "write_reports"]

PHASES = ("keygen", "encrypt", "evaluate", "decrypt")


def server_learns(output: str, reveals: str | None) -> str:
    """What the server learns, in words, from a model's ``output`` and ``reveals``."""
    if reveals:
        return reveals
    if output == "clear":
        return "everything (no encryption)"
    return "nothing (encrypted output)"


def human_bytes(n: int | None) -> str:
    """``1234`` as ``"1.23 kB"``, ``3_400_000`` as ``"3.4 MB"``; ``"-"`` for none."""
    if n is None or n == 0:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


def _bits(values: Sequence[Any]) -> str:
    return "+".join(map(str, values)) + f" = {sum(values)} bits"


def _ring(plan: dict[str, Any]) -> str | None:
    if not plan.get("poly_modulus_degree"):
        return None
    slots = plan.get("slots")
    return f"N = {plan['poly_modulus_degree']}" + (f" ({slots} slots)" if slots else "")


def _group(plan: dict[str, Any]) -> str | None:
    if not plan.get("curve"):
        return None
    return " ".join(str(plan[k]) for k in ("curve", "group") if plan.get(k))


def _chain(plan: dict[str, Any]) -> str | None:
    parts = []
    coeff = plan.get("coeff_mod_bits") or plan.get("coeff_modulus_bits")
    if coeff:
        parts.append("ciphertext modulus " + _bits(coeff)
                     + (f" (at most {plan['max_bits_128']} at 128-bit)"
                        if plan.get("max_bits_128") else ""))
    if plan.get("plain_modulus_bits"):
        parts.append("plaintext moduli " + _bits(plan["plain_modulus_bits"]))
    return "; ".join(parts) or None


def _scale(plan: dict[str, Any]) -> str | None:
    if plan.get("scale_bits"):
        return f"2^{plan['scale_bits']}"
    if plan.get("bits"):
        return f"{plan['bits']}-bit integers"
    return "float64" if "bits" in plan else None


def _packing(plan: dict[str, Any]) -> str | None:
    if not plan.get("packing"):
        return None
    n = plan.get("batch_size")
    return plan["packing"] + (f", {n} input(s) per message" if n else "")


def _depth(plan: dict[str, Any]) -> str | None:
    if plan.get("depth_available") is not None:
        return f"{plan.get('depth_needed', '?')} used of {plan['depth_available']} levels"
    if plan.get("noise_budget_left_bits") is not None:
        return f"noise budget left after the network: {plan['noise_budget_left_bits']} bits"
    return None


def _keys(plan: dict[str, Any]) -> str | None:
    parts = []
    if plan.get("galois_keys"):
        parts.append(f"{plan['galois_keys']} Galois (rotation) keys")
    if plan.get("relin_keys"):
        parts.append("relinearization keys")
    if isinstance(plan.get("functional_keys"), int):
        parts.append(f"{plan['functional_keys']} functional keys")
    return ", ".join(parts) or None


_PLAN_ROWS = (("ring", _ring), ("group", _group), ("chain", _chain), ("scale", _scale), ("packing", _packing),
              ("depth", _depth), ("keys", _keys))


def plan_summary(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """A plan's main parameters as ``(label, text)`` rows, for human output.

    Rows (each only when the plan has its keys): ``ring`` (``poly_modulus_degree`` and
    ``slots``), ``group`` (``curve`` and ``group``), ``chain`` (``coeff_mod_bits`` or
    ``coeff_modulus_bits``, ``max_bits_128``, ``plain_modulus_bits``), ``scale``
    (``scale_bits`` or quantization ``bits``), ``packing`` (``packing``, ``batch_size``),
    ``depth`` (``depth_needed`` of ``depth_available``, or ``noise_budget_left_bits``) and
    ``keys`` (``galois_keys``, ``relin_keys``, ``functional_keys``). The full plan is in
    the JSON report.
    """
    rows = []
    for label, fn in _PLAN_ROWS:
        text = fn(plan)
        if text:
            rows.append((label, text))
    return rows


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.3g}" if v < 10 else f"{v * 1e3:.0f}"


def human_report(r: dict[str, Any]) -> str:
    """A ``run`` report dict (``secureinfer.runner.REPORT_FIELDS``) as terminal lines:
    the plan summarized (the full plan is in ``--json``), byte counts in kB/MB."""
    sec = "none (reference)" if r["security_bits"] is None else f"{r['security_bits']}-bit" + (
        "  ** INSECURE (allow_insecure) **" if r["insecure"] else "")
    lines = [f"scheme      {r['config']}  ({r['backend']} {r['backend_version'] or ''})",
             f"security    {sec}"]
    if r.get("security_source"):
        lines.append(f"            from: {r['security_source']}")
    plan = plan_summary(r.get("plan") or {})
    lines += [f"{'plan' if i == 0 else '':<12}{label:<9}{text}"
              for i, (label, text) in enumerate(plan)]
    lines.append(f"{'' if plan else 'plan':<12}(full plan: --json)")
    lines.append(f"secure      {'; '.join(r['secure_layers'])}")
    if r["clear_layers"]:
        lines.append(f"clear       {'; '.join(r['clear_layers'])}")
    lines += [
        f"output      {r['output']}; server learns: {server_learns(r['output'], r['reveals'])}",
        *([f"            client learns: the result; {(r.get('plan') or {})['output_privacy']}"]
          if (r.get("plan") or {}).get("output_privacy") else []),
        f"dataset     {r['dataset']}, model {r['model']}, {r['samples']} samples",
        f"accuracy    {r['accuracy']:.4f} (float model {r['clear_accuracy']:.4f}), "
        f"agreement {r['agreement']:.4f}, max |error| {r['max_abs_error']:.3g}",
        "latency     " + ", ".join(f"{p} {v * 1e3:.3f} ms" for p, v in r["latency_s"].items()
                                   if v is not None) + "  (keygen once, others per image)",
        f"throughput  {r['throughput_per_s']:.4g} images/s",
        "bytes       " + ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}"
                                   for k, v in r["bytes"].items() if v)
        + "  (input and output per image)",
        f"peak RSS    {r['peak_rss_mb']} MB",
    ]
    return "\n".join(lines)


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
        if r["security_bits"] is None and output != "clear":  # reports before "clear" output
            output, learns = "clear", "everything (reference, no encryption)"
        rows.append("| " + " | ".join([
            f"`{r['config']}`", sec, output, learns,
            f"{r['accuracy']:.4f}", f"{r['clear_accuracy']:.4f}", f"{r['agreement']:.4f}",
            f"{r['max_abs_error']:.2e}", *(_ms(lat.get(p)) for p in PHASES),
            f"{r['throughput_per_s']:.4g}", human_bytes(b.get("input")), human_bytes(b.get("public_keys")),
            human_bytes(b.get("functional_keys")), f"{r['peak_rss_mb']:.0f}"]) + " |")
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
        if (r.get("plan") or {}).get("output_privacy"):
            notes.append(f"- `{r['config']}` outputs: {r['plan']['output_privacy']}.")
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
