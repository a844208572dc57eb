"""The benchmark's report: the table printed per point, the plot, the files."""
import os

from .._cli import write_json
from .run import op_families


def row_lines(res):
    """The table of one point (a problem's results), as printed."""
    N, V = res["shape"]
    lines = [f"\n{N} x {V} {res['dtype']}: memory copy {res['copy_seconds'] * 1e3:.2f} ms "
             f"= {res['copy_gbs']:.1f} GB/s"
             + (f"   (LM head: D = {res['hidden']})" if any(
                 r["op"] == "linear_cross_entropy" for r in res["results"]) else ""),
             f"  {'op':<25}{'impl':<16}{'ms':>10}{'throughput':>16}{'of copy':>9}"
             f"{'lmxent speedup':>16}"]
    last_op = None
    for r in res["results"]:
        op = r["op"] if r["op"] != last_op else ""
        last_op = r["op"]
        if r["status"] == "WRONG":
            lines.append(f"  {op:<25}{r['impl']:<16}  WRONG: max error {r['max_error']:.2e} = "
                         f"{r['error_over_tolerance']:.3g}x the tolerance (in "
                         f"{r['worst_output']}); "
                         "not timed")
            continue
        if r["status"] != "ok":
            lines.append(f"  {op:<25}{r['impl']:<16}  {r['status']}: {r['detail']}")
            continue
        rate = (f"{r['gbs']:.1f} GB/s" if "gbs" in r else f"{r['gflops']:.0f} GFLOP/s")
        frac = f"{r['copy_fraction'] * 100:.0f}%" if "copy_fraction" in r else ""
        speed = f"{r['lmxent_speedup']:.1f}x" if "lmxent_speedup" in r else ""
        lines.append(f"  {op:<25}{r['impl']:<16}{r['seconds'] * 1e3:10.2f}{rate:>16}{frac:>9}"
                     f"{speed:>16}" + (f"  ({', '.join(r['unchecked'])}: too large to check)"
                                       if "unchecked" in r else ""))
    return lines


def plot(report, path):
    """Throughput against vocabulary size, a panel per op, a line per implementation
    and dtype, and the memory copy's bandwidth dashed. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ops = [op.name for op in op_families() if any(r["op"] == op.name for res in report["results"]
                                        for r in res["results"])]
    dtypes = sorted({res["dtype"] for res in report["results"]})
    styles = dict(zip(dtypes, ["-", "--", ":", "-."]))
    impls = list(dict.fromkeys(r["impl"] for res in report["results"] for r in res["results"]))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    cols = min(3, len(ops))
    rows = -(-len(ops) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, op in zip(axes, ops):
        head = op == "linear_cross_entropy"
        for dt in dtypes:
            points = sorted(((res["shape"][1], r) for res in report["results"]
                             if res["dtype"] == dt for r in res["results"]
                             if r["op"] == op and r["status"] == "ok"), key=lambda vr: vr[0])
            for impl in impls:
                xy = [(v, r["gflops"] if head else r["gbs"]) for v, r in points
                      if r["impl"] == impl]
                if xy:
                    ax.plot(*zip(*xy), styles[dt], marker="o", ms=3, color=colors[impl],
                            label=impl + (f" {dt}" if len(dtypes) > 1 else ""))
            copy = sorted((res["shape"][1], res["copy_gbs"]) for res in report["results"]
                          if res["dtype"] == dt)
            if not head and copy:
                ax.plot(*zip(*copy), styles[dt], color="gray", alpha=0.6, lw=2,
                        label="memory copy" + (f" {dt}" if len(dtypes) > 1 else ""))
        ax.set(xscale="log", yscale="log", title=op, xlabel="vocabulary size V",
               ylabel="GFLOP/s" if head else "GB/s (higher is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    m = report["machine"]
    fig.suptitle(f"lmxent {m['versions']['lmxent']} on {report['device']}: {m['cpu']}, "
                 f"{m['cores']} cores ({m['lmxent_cpu']['isa']})"
                 + (f", {m['gpu']}" if report["device"] == "cuda" else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def write_report(report, out, name="bench"):
    """name.json and (with matplotlib) name.png in the directory `out`."""
    print(f"\nwrote {write_json(report, out, name + '.json')}")
    if not report["results"]:
        return
    png = os.path.join(out, name + ".png")
    if plot(report, png):
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install 'lmxent[plot]')")
