"""The benchmark's command line: its arguments, argument types the bench scripts
share, and the run over every point (python -m lmxent bench)."""
import argparse

import numpy as np

import lmxent as lx

from .._cli import EPS, Progress, machine_info, positive_int
from .peers import PEERS, load_peers
from .problem import Device, Problem, Skip, dtype_name
from .report import row_lines, write_report
from .run import implementations, op_families, run_point, select_ops

# the default sweep: real vocabularies (Llama 2, GPT-2, Llama 3, Gemma), N*V ~ constant
SWEEP_V = (8192, 32000, 50257, 128256, 256000)
SWEEP_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}
QUICK_SHAPES = ((1024, 8192), (256, 32000))
DEFAULT_HIDDEN = {"cpu": 256, "cuda": 4096}
QUICK_HIDDEN = 128


def choices(valid, what):
    """argparse type: a comma-separated list of names from `valid` (what: the kind of
    name, for the message)."""
    def parse(text):
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {(bad or [text])[0]!r} "
                                             f"(choose from {', '.join(valid)})")
        return names
    return parse


def sizes(form, what):
    """argparse type: positive integers in the form `form`: "NxV[,NxV...]" a list of
    tuples, "V[,V...]" a list of integers, "NxDxV" one tuple (what: their meaning)."""
    many = form.endswith("...]")
    dims = form.split("[")[0].count("x") + 1

    def parse(text):
        try:
            items = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
            if (many or len(items) == 1) and all(len(s) == dims and min(s) > 0 for s in items):
                items = [s[0] for s in items] if dims == 1 else items
                return items if many else items[0]
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {form} positive integers ({what}), "
                                         f"got {text!r}")
    return parse


def dtypes_from_names(names):
    """(dtypes, {name: why skipped}) of dtype names: bfloat16 is skipped without
    ml_dtypes."""
    dtypes, skipped = [], {}
    for name in names:
        dt = lx.bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
        if dt is None:
            skipped[name] = "ml_dtypes is not installed"
        else:
            dtypes.append(dt)
    return dtypes, skipped


def add_arguments(ap):
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: NumPy arrays (default); cuda: CuPy arrays on the GPU")
    ap.add_argument("--shapes", type=sizes("NxV[,NxV...]", "rows x vocabulary"), metavar="NxV,...",
                    help="rows x vocabulary (default: V in 8192, 32000, 50257, 128256, 256000 "
                         "with N*V = 2^24 on the CPU, 2^27 on the GPU)")
    ap.add_argument("--dtypes", type=choices(list(EPS), "dtype"), metavar="DT,...",
                    help="float32, bfloat16, float16, float64 (default: float32,bfloat16; "
                         "--quick: float32)")
    names = [op.name for op in op_families()]
    ap.add_argument("--ops", type=choices(names, "op"), metavar="OP,...",
                    help="op families to run: " + ", ".join(names)
                         + " (default: all this build has)")
    ap.add_argument("--peers", type=choices(list(PEERS), "peer"), metavar="PEER,...",
                    help="peers to compare with: " + ", ".join(PEERS)
                         + " (default: every one installed)")
    ap.add_argument("--hidden", type=positive_int, metavar="D",
                    help="the LM head's hidden size (default 256 on the CPU, 4096 on the GPU)")
    ap.add_argument("--repeats", type=positive_int, default=5,
                    help="timed runs per implementation, best taken (default 5; --quick 3)")
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {', '.join(f'{n}x{v}' for n, v in QUICK_SHAPES)}, float32, "
                         f"D = {QUICK_HIDDEN}, fewer runs: under a minute on 2 cores")
    ap.add_argument("--compile", action="store_true",
                    help="include torch.compile on the CPU (always included on the GPU)")
    ap.add_argument("--out", default="lmxent-bench", metavar="DIR",
                    help="where the report goes, as JSON and PNG (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args, parser, extra_impls=None, report_name="bench"):
    """The benchmark of parsed `args` (add_arguments); writes report_name.json and
    .png into args.out. Returns 1 if lmxent itself is wrong or fails, else 0."""
    extra_impls = extra_impls or {}
    try:
        dev = Device(args.device)
    except ValueError as e:
        parser.error(str(e))
    ops, missing = select_ops(dev, args.ops)
    for name in args.ops or ():
        if name in missing:
            parser.error(f"--ops: {name} is {missing[name]}")
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else [
        (max(1, round(SWEEP_ELEMENTS[dev.name] / v)), v) for v in SWEEP_V])
    dtypes, dtype_skips = dtypes_from_names(
        args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]))
    # (repeats, min seconds, max seconds) of each timing
    timing = (min(args.repeats, 3), 0.05, 1.0) if args.quick else (args.repeats, 0.3, 4.0)
    hidden = args.hidden or (QUICK_HIDDEN if args.quick else DEFAULT_HIDDEN[dev.name])
    peers, skipped = load_peers(dev, args, args.peers)
    shown = {n: dev.numpy_peer if n == "numpy" else n for n in PEERS}

    machine = machine_info()
    print(f"lmxent {lx.__version__} bench on {dev.name}: {machine['cpu']}, {machine['cores']} "
          f"cores, CPU kernels {machine['lmxent_cpu']['isa']} with "
          f"{machine['lmxent_cpu']['threads']} threads"
          + (f"; GPU {machine['gpu']}" if dev.name == "cuda" else ""))
    print("peers: " + ", ".join(shown[n] for n in peers)
          + "".join(f"\n  skipped {shown[n]}: {why}" for n, why in skipped.items()))
    if missing:
        print("ops skipped: " + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    for name, why in dtype_skips.items():
        print(f"{name} skipped: {why}")

    per_point = sum(1 for op in ops
                    for _ in implementations(op, peers, extra_impls.get(op.name, {})))
    progress = Progress(per_point * len(shapes) * len(dtypes), enabled=not args.no_progress)
    results = []
    try:
        for dt in dtypes:
            for N, V in shapes:
                try:
                    p = Problem(dev, N, V, dt, hidden)
                except Skip as e:  # CuPy has no bfloat16
                    dtype_skips[dtype_name(dt)] = str(e)
                    progress.update(per_point)
                    progress.write(f"{N}x{V} {dtype_name(dt)} skipped: {e}")
                    continue
                results.append(run_point(p, ops, peers, timing, progress, extra_impls))
                del p
                for line in row_lines(results[-1]):
                    progress.write(line)
    finally:
        progress.close()

    report = dict(device=dev.name, machine=machine, quick=args.quick, timing=timing,
                  peers=dict({shown[n]: "ok" for n in peers},
                             **{shown[n]: f"skipped: {why}" for n, why in skipped.items()}),
                  ops_missing=missing, dtypes_skipped=dtype_skips, results=results)
    write_report(report, args.out, report_name)
    bad = [f"{res['shape'][0]}x{res['shape'][1]} {res['dtype']} {r['op']} {r['impl']}: "
           f"{r['status']}" for res in results for r in res["results"]
           if r["impl"].startswith("lmxent") and r["status"] != "ok"]
    for b in bad:
        print("lmxent FAILED: " + b)
    return 1 if bad else 0
