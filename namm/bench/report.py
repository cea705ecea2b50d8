"""How ``namm bench`` shows a run: rich tables, a JSON document and a PNG of time and memory against
prompt length."""

from __future__ import annotations

from pathlib import Path

from namm.bench.run import PLAIN, BenchResult
from namm.bench.targets import FULL
from namm.profiling import SECTIONS

__all__ = ["print_report", "plot", "to_json"]

_STATUS = {"pass": "[green]pass[/green]", "miss": "[red]miss[/red]", "n/a": "[yellow]n/a[/yellow]", "info": "[dim]info[/dim]"}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(result: BenchResult, row) -> dict:
    """A row's prefill against the full cache and plain transformers, and its decoding speed against the full cache."""
    full, plain = result.row(FULL, row.length), result.row(PLAIN, row.length)
    return {"prefill_x_full": _ratio(row.prefill_s, full and full.prefill_s),
            "prefill_x_plain": _ratio(row.prefill_s, plain and plain.prefill_s),
            "decode_x_full": _ratio(row.decode_tokens_per_s, full and full.decode_tokens_per_s)}


def to_json(result: BenchResult) -> dict:
    """The run as plain data: config, every measurement with its ratios, the dtype check, the targets."""
    data = result.to_dict()
    for row, out in zip(result.rows, data["rows"]):
        if row.skipped is None:
            out.update(ratios(result, row))
    return data


def _header(result: BenchResult) -> list[str]:
    c, s = result.config, result.schedule
    lines = [f"model {c.model} ({result.dtype}, {result.device}); prompts: passkey, raw; "
             f"schedule: chunk {s['chunk_size']}, delay {s['delay']}; baselines and namm at keep {c.keep_ratio:.0%}",
             f"NAMM: {result.namm}"]
    for d in result.lengths:
        if d["skipped"]:
            lines.append(f"[yellow]{d['length']} tokens skipped: {d['skipped']}[/yellow]")
    return lines


def _lengths(result: BenchResult) -> list[dict]:
    return [d for d in result.lengths if not d["skipped"]]


def _table(title: str, first: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for col in columns:
        table.add_column(col, justify="right")
    return table


def _cells(result: BenchResult, method: str, cell) -> list[str]:
    out = []
    for d in _lengths(result):
        row = next((r for r in result.rows if r.method == method and r.length == d["length"]), None)
        out.append("-" if row is None else f"[yellow]skipped[/yellow]" if row.skipped else cell(row))
    return out


def _prefill_cell(result: BenchResult, row) -> str:
    r = ratios(result, row)
    parts = [f"{r['prefill_x_full']:.2f}x full" if r["prefill_x_full"] else "",
             f"{r['prefill_x_plain']:.2f}x plain" if r["prefill_x_plain"] else ""]
    return f"{row.prefill_s:.2f} s\n" + ", ".join(p for p in parts if p)


def print_report(result: BenchResult, console=None) -> None:
    """Print the run as rich tables (prefill, memory, NAMM time split, decoding, dtype, targets)."""
    from rich.console import Console

    console = console or Console()
    for line in _header(result):
        console.print(line)
    columns = [f"{d['length']} ({d['tokens']} tok)" for d in _lengths(result)]
    methods = result.methods()
    table = _table("prefill wall time", "method", columns)
    for m in methods:
        table.add_row(m, *_cells(result, m, lambda r: _prefill_cell(result, r)))
    console.print(table)
    table = _table("memory during the prefill (peak KV bytes; peak RSS, its growth)", "method", columns)
    for m in methods:
        table.add_row(m, *_cells(result, m, lambda r: f"KV {_mib(r.peak_kv_bytes)}\n"
                                                        f"RSS {_mib(r.peak_rss_bytes)}\n+{_mib(r.rss_growth_bytes)}"))
    console.print(table)
    _print_split(result, console)
    _print_decode(result, console)
    _print_dtype(result, console)
    table = _table("targets", "target", ["rule", "measured", "status"])
    for t in result.targets:
        table.add_row(t.name, t.rule, t.measured, _STATUS[t.status])
    console.print(table)


def _print_split(result: BenchResult, console) -> None:
    table = _table("NAMM prefill time split (exclusive wall time; other = the model and the rest)", "run",
                   ["total", *SECTIONS, "other", "full cache"])
    table.columns[0].no_wrap = True
    for row in result.rows:
        if not row.method.startswith("namm") or row.skipped:
            continue
        other = row.prefill_s - sum(row.sections.values())
        full = result.row(FULL, row.length)
        cells = [f"{row.sections.get(s, 0.0):.2f} s\n{row.sections.get(s, 0.0) / row.prefill_s:.0%}"
                 for s in SECTIONS]
        table.add_row(f"{row.method}\n{row.length} tokens", f"{row.prefill_s:.2f} s", *cells,
                      f"{other:.2f} s\n{other / row.prefill_s:.0%}", f"{full.prefill_s:.2f} s" if full else "-")
    console.print(table)


def _print_decode(result: BenchResult, console) -> None:
    lengths = [d for d in _lengths(result) if d["length"] in result.config.decode_lengths]
    if not lengths or not result.config.decode_tokens:
        return
    table = _table(f"decoding: tokens/s over {result.config.decode_tokens} greedy tokens after the prompt, "
                   "one eviction step per delay tokens included", "method",
                   [f"{d['length']} ({d['tokens']} tok)" for d in lengths])
    for m in result.methods():
        cells = []
        for d in lengths:
            row = result.row(m, d["length"])
            x = row and ratios(result, row)["decode_x_full"]
            cells.append("-" if row is None or not row.decode_tokens_per_s else
                         f"{row.decode_tokens_per_s:.1f} tok/s" + (f"\n{x:.2f}x full" if x else ""))
        table.add_row(m, *cells)
    console.print(table)


def _print_dtype(result: BenchResult, console) -> None:
    check = result.dtype_check
    if not check:
        return
    console.print(f"[bold]dtype {check['dtype']}[/bold], keep-all error on a {check['tokens']}-token prompt "
                  "(max |logit difference| against plain transformers at this dtype; top-1 agreement with float32):")
    for name, err in check.items():
        if isinstance(err, dict) and "max_abs_logit_diff" in err:
            console.print(f"  {name:<16} max |dlogit| {err['max_abs_logit_diff']:.3g}, top-1 {err['top1_vs_fp32']:.1%}")
    speed = check.get("speed")
    if speed:
        console.print(f"  prefill at {speed['length']} tokens against float32: " + ", ".join(
            f"{name} {v['ratio']:.2f}x ({v['seconds']:.2f} s vs {v['fp32_seconds']:.2f} s)"
            for name, v in speed.items() if isinstance(v, dict)))


def plot(result: BenchResult, path: str | Path) -> Path:
    """Prefill time, peak KV bytes and peak RSS growth against prompt tokens, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("prefill wall time (s)", lambda r: r.prefill_s), ("peak KV during the prefill (MiB)",
              lambda r: r.peak_kv_bytes and r.peak_kv_bytes / 2**20),
              ("peak RSS growth during the prefill (MiB)", lambda r: r.rss_growth_bytes and r.rss_growth_bytes / 2**20)]
    for ax, (label, value) in zip(axes, panels):
        for m in result.methods():
            points = [(r.tokens, value(r)) for r in result.rows if r.method == m and not r.skipped
                      and value(r) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=m, linestyle="--" if m == PLAIN else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"namm bench: {result.config.model} ({result.dtype}, {result.device})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
