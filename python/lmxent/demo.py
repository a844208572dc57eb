"""python -m lmxent demo: train a small byte-level language model end to end.

The text is on every machine: the source of Python's standard library (the *.py
files directly in the directory of the `os` module, in sorted order, concatenated
up to --max-bytes), or your own file with --data PATH. The last 10% of the bytes
are held out: the model never trains on them, and every model below is scored on
exactly those bytes (each byte predicted from the bytes before it, which near the
split point come from the end of the training text).

The model is Bengio et al.'s (2003) neural language model over bytes: the
previous --context bytes, each embedded in 32 dimensions, concatenated, a tanh
hidden layer of 512 units, and the LM head lx.linear_cross_entropy (a 256-way
softmax; loss and all three gradients in one call). Backpropagation is written
out by hand; Adam with warm-up and cosine decay; batches of random windows.
Everything is seeded: the same seed gives the same run on the same machine.

Baselines: additive-smoothing n-gram models (the classic ancestor), unigram,
bigram and trigram, P(b | context) = (count(context, b) + alpha) / (count(context)
+ 256 alpha) with counts from the training bytes. Each is given its best alpha in
{1, 0.1, 0.01, 0.001} on the held-out bytes, in its favour. An n-gram model is a
table of logits log(count + alpha), so every model is scored the same way:
lx.token_stats on its logits gives log p of each held-out byte; bits per byte and
perplexity come from lx.bits_per_byte and lx.perplexity of the summed negative
log-likelihood.

    python -m lmxent demo                          # a few minutes on 2 CPU cores
    python -m lmxent demo --steps 300 --out demo/  # shorter; JSON summary and loss curve
    python -m lmxent demo --data my.txt --device cuda
"""
import argparse
import math
import os
import time

import numpy as np

import lmxent as lx

from ._cli import Progress, array_module, machine_info, positive_int, to_host, write_json

V = 256                       # bytes
EMBED, HIDDEN = 32, 512
HELD_OUT = 0.1                # the last 10% of the bytes
ALPHAS = (1.0, 0.1, 0.01, 0.001)
MIN_BYTES = 2000


# ------------------------------------------------------------------------ data

def stdlib_text(max_bytes):
    """(bytes, description): the standard library's top-level *.py files, sorted by
    name, concatenated up to max_bytes."""
    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    parts, size = [], 0
    for n in names:
        if size >= max_bytes:
            break
        with open(os.path.join(root, n), "rb") as f:
            parts.append(f.read())
        size += len(parts[-1])
    return b"".join(parts)[:max_bytes], f"{len(parts)} .py files of Python's standard " \
        f"library ({root}, {names[0]} to {names[len(parts) - 1]})"


def load_text(path, max_bytes):
    """(uint8 array, description) of --data or the standard library."""
    if path is None:
        raw, what = stdlib_text(max_bytes)
    else:
        with open(path, "rb") as f:
            raw = f.read(max_bytes)
        what = path
    if len(raw) < MIN_BYTES:
        raise ValueError(f"--data: {what} has {len(raw)} bytes; the demo needs at least "
                         f"{MIN_BYTES} (the last 10% are held out)")
    return np.frombuffer(raw, np.uint8), what


def contexts(xp, data, positions, k):
    """(contexts (n, k), targets (n,)) on the device of `data` (xp): the k bytes
    before each of the (host) positions, and the byte there."""
    idx = xp.asarray(positions[:, None] + np.arange(-k, 0))
    return data[idx], data[xp.asarray(positions)].astype(np.int64)


# ------------------------------------------------------------------ baselines

def ngram_counts(train, order):
    """Counts of each byte after each context of order - 1 bytes in the training
    text: (V ** (order - 1), V), row index the context read as a base-V number."""
    n = len(train) - order + 1
    ctx = np.zeros(n, np.int64)
    for j in range(order - 1):
        ctx = ctx * V + train[j:j + n]
    return np.bincount(ctx * V + train[order - 1:], minlength=V ** order).reshape(-1, V)


def score(xp, logits_of, data, positions, chunk=8192):
    """(sum of -log p, top-1 accuracy) over the bytes at `positions`, by lx.token_stats
    of the logits logits_of(positions) gives for a chunk of them (on device xp)."""
    nll, correct = 0.0, 0
    for i in range(0, len(positions), chunk):
        pos = positions[i:i + chunk]
        stats = lx.token_stats(logits_of(pos), xp.asarray(data[pos].astype(np.int64)))
        nll -= float(stats.logprob.sum(dtype=np.float64))
        correct += int(stats.correct.sum())
    return nll, correct / len(positions)


def baselines(data, split):
    """Held-out scores of the unigram, bigram and trigram models, best alpha each."""
    train, held = data[:split], np.arange(split, len(data))
    out = {}
    for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        counts, best = ngram_counts(train, order).astype(np.float32), None

        def context_rows(pos, order=order):
            ctx = np.zeros(len(pos), np.int64)
            for j in range(order - 1, 0, -1):
                ctx = ctx * V + data[pos - j]
            return ctx
        for alpha in ALPHAS:
            # the model as logits: softmax(log(count + alpha)) is the smoothed estimate
            table = np.log(counts + np.float32(alpha))
            nll, acc = score(np, lambda pos, table=table: table[context_rows(pos)], data, held)
            if best is None or nll < best["nll_sum"]:
                best = dict(alpha=alpha, nll_sum=nll, accuracy=acc)
        out[name] = best
    return out


# ----------------------------------------------------------------------- model

class MLP:
    """Embeddings of the k previous bytes, concatenated -> tanh -> LM head, with
    its backward pass written out and Adam. Parameters live on the device (xp)."""

    def __init__(self, xp, k, seed):
        rng = np.random.default_rng(seed)
        d = k * EMBED
        init = {"C": rng.normal(0, 1, (V, EMBED)),
                "W1": rng.normal(0, 1 / math.sqrt(d), (d, HIDDEN)), "b1": np.zeros(HIDDEN),
                "W2": rng.normal(0, 1 / math.sqrt(HIDDEN), (V, HIDDEN)), "b2": np.zeros(V)}
        self.xp, self.k = xp, k
        self.p = {n: xp.asarray(v, dtype=np.float32) for n, v in init.items()}
        self.m = {n: xp.zeros_like(v) for n, v in self.p.items()}
        self.v = {n: xp.zeros_like(v) for n, v in self.p.items()}
        self.t = 0

    @property
    def size(self):
        return sum(int(v.size) for v in self.p.values())

    def hidden(self, X):
        """(embedded contexts, hidden states) of contexts X (n, k)."""
        e = self.p["C"][X].reshape(len(X), -1)
        return e, self.xp.tanh(e @ self.p["W1"] + self.p["b1"])

    def logits(self, X):
        return self.hidden(X)[1] @ self.p["W2"].T + self.p["b2"]

    def loss_and_grads(self, X, T):
        """Mean cross-entropy (nats) of targets T given contexts X, and the gradients."""
        xp, p = self.xp, self.p
        e, h = self.hidden(X)
        loss, (dh, dW2, db2) = lx.linear_cross_entropy(h, p["W2"], T, bias=p["b2"])
        da = dh * (1 - h * h)                                    # tanh'
        de = (da @ p["W1"].T).reshape(-1, EMBED)                 # one row per byte read
        onehot = xp.zeros((de.shape[0], V), np.float32)
        onehot[xp.arange(de.shape[0]), X.reshape(-1)] = 1.0      # dC = scatter-add of de
        grads = {"C": onehot.T @ de, "W1": e.T @ da, "b1": da.sum(0), "W2": dW2, "b2": db2}
        return float(loss), grads

    def adam(self, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for n, g in grads.items():
            m, v = self.m[n], self.v[n]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            self.p[n] -= (lr / c1) * m / (self.xp.sqrt(v / c2) + eps)


def learning_rate(step, steps, peak, warmup=100):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    x = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * x)))


def sample(model, data, rng, n=240, temperature=0.7):
    """(prompt, continuation): n bytes sampled from the model at `temperature`, after
    the first k bytes of the first held-out line that starts with 'def '."""
    split = int(len(data) * (1 - HELD_OUT))
    at = bytes(data[split:]).find(b"\ndef ")
    start = min(split + (at + 1 if at >= 0 else 0) + model.k, len(data))
    out = list(data[start - model.k:start])
    prompt = bytes(out)
    for _ in range(n):
        X = model.xp.asarray(np.array(out[-model.k:], np.uint8)[None])
        probs = to_host(lx.softmax(model.logits(X), temperature=temperature))[0]
        probs = probs.astype(np.float64)
        out.append(int(rng.choice(V, p=probs / probs.sum())))
    return prompt.decode("utf-8", "replace"), bytes(out[model.k:]).decode("utf-8", "replace")


# ------------------------------------------------------------------------ run

def add_arguments(ap):
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: NumPy (default); cuda: CuPy arrays on the GPU")
    ap.add_argument("--steps", type=positive_int, default=3000,
                    help="training steps (default 3000)")
    ap.add_argument("--batch", type=positive_int, default=256, help="bytes per step (default 256)")
    ap.add_argument("--context", type=positive_int, default=8,
                    help="bytes of context the model reads (default 8)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (3e-3)")
    ap.add_argument("--data", metavar="PATH",
                    help="a text file to train on (default: Python's standard library source)")
    ap.add_argument("--max-bytes", type=positive_int, default=2_000_000,
                    help="use at most this many bytes of text (default 2000000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    ap.add_argument("--out", metavar="DIR",
                    help="write demo.json (the summary) and demo.png (the loss curve) here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lmxent demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv), ap)


def train(model, xp, data, split, args):
    """Train on random windows of data[:split] (on the device); per-step losses in
    nats, a line every tenth of the run, the progress bar on stderr."""
    rng = np.random.default_rng(args.seed)
    losses, every = [], max(1, args.steps // 10)
    progress = Progress(args.steps, enabled=not args.no_progress)
    t0 = time.perf_counter()
    try:
        for step in range(args.steps):
            X, T = contexts(xp, data, rng.integers(args.context, split, args.batch),
                            args.context)
            loss, grads = model.loss_and_grads(X, T)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss} at step {step + 1} "
                                         "(try a smaller --lr)")
            model.adam(grads, learning_rate(step, args.steps, args.lr))
            losses.append(loss)
            recent = float(np.mean(losses[-every:])) / math.log(2)
            progress.update(1, f"loss {recent:.3f} bits/byte")
            if (step + 1) % every == 0 or step + 1 == args.steps:
                progress.write(f"  step {step + 1:>6}/{args.steps}  loss {recent:.3f} bits/byte "
                               f"(mean of the last {min(every, step + 1)} steps)  "
                               f"{time.perf_counter() - t0:6.1f} s")
    finally:
        progress.close()
    return losses, time.perf_counter() - t0


def run(args, parser):
    t_start = time.perf_counter()
    try:
        xp = array_module(args.device)
        data, what = load_text(args.data, args.max_bytes)
    except OSError as e:
        parser.error(f"--data: cannot read {args.data}: {e.strerror or e}")
    except ValueError as e:
        parser.error(str(e))
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    split = int(len(data) * (1 - HELD_OUT))
    if args.context >= split:
        parser.error(f"--context {args.context} is not shorter than the training text")
    held = np.arange(split, len(data))
    print(f"data: {what}\n  {len(data):,} bytes: train on the first {split:,}, "
          f"hold out the last {len(held):,}")
    freq = np.bincount(data[:split], minlength=V) / split
    unigram_entropy = float(-(freq[freq > 0] * np.log2(freq[freq > 0])).sum())

    model = MLP(xp, args.context, args.seed)
    print(f"model: {args.context} bytes x {EMBED}-d embeddings -> tanh {HIDDEN} -> "
          f"lx.linear_cross_entropy over {V} bytes; {model.size:,} parameters; "
          f"{args.steps} steps of {args.batch} bytes, Adam, seed {args.seed}, {args.device}")
    data_dev = xp.asarray(data)
    losses, train_seconds = train(model, xp, data_dev, split, args)

    nll, acc = score(xp, lambda pos: model.logits(contexts(xp, data_dev, pos, args.context)[0]),
                     data, held)
    results = dict(mlp=dict(nll_sum=nll, accuracy=acc), **baselines(data, split))
    for r in results.values():
        r["bits_per_byte"] = lx.bits_per_byte(r["nll_sum"], len(held))
        r["perplexity"] = lx.perplexity(r["nll_sum"], len(held))
    k = max(1, min(100, args.steps // 10))
    first, last = (float(np.mean(losses[:k])) / math.log(2),
                   float(np.mean(losses[-k:])) / math.log(2))
    print(f"\ntraining loss: {first:.3f} -> {last:.3f} bits/byte (means of the first and last "
          f"{k} steps); the unigram entropy of the training bytes is {unigram_entropy:.3f}")
    print(f"held-out: {len(held):,} bytes\n  {'model':<34}{'bits/byte':>10}{'perplexity':>12}"
          f"{'top-1':>8}")
    for name, r in results.items():
        label = (f"MLP, {args.context}-byte context (lmxent)" if name == "mlp"
                 else f"{name}, alpha = {r['alpha']:g}")
        print(f"  {label:<34}{r['bits_per_byte']:>10.3f}{r['perplexity']:>12.2f}"
              f"{r['accuracy'] * 100:>7.1f}%")
    mlp = results["mlp"]["bits_per_byte"]
    beats = mlp < results["bigram"]["bits_per_byte"]
    print(f"the MLP {'beats' if beats else 'does NOT beat'} the bigram baseline"
          + ("" if beats else " (train longer: --steps)") + "; bits/byte saved: "
          + ", ".join(f"{results[n]['bits_per_byte'] - mlp:+.3f} vs {n}"
                      for n in ("unigram", "bigram", "trigram")))
    prompt, text = sample(model, data, np.random.default_rng(args.seed))
    print(f"\nsample (temperature 0.7) after {prompt!r}:\n{text}")
    total = time.perf_counter() - t_start
    print(f"\n{train_seconds:.1f} s training, {total:.1f} s in all")

    if args.out:
        summary = dict(
            data=dict(source=what, bytes=len(data), train_bytes=split, held_out_bytes=len(held),
                      held_out="the last 10% of the bytes"),
            model=dict(context=args.context, embed=EMBED, hidden=HIDDEN, vocabulary=V,
                       parameters=model.size),
            training=dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                          device=args.device, seconds=train_seconds, loss_nats=losses,
                          first_bits_per_byte=first, last_bits_per_byte=last),
            unigram_entropy_bits=unigram_entropy, held_out=results, beats_bigram=beats,
            sample=dict(prompt=prompt, text=text), seconds=total, machine=machine_info())
        write_outputs(summary, args.out)
    return 0


def write_outputs(summary, out):
    """demo.json and (with matplotlib) demo.png in the directory `out`."""
    print(f"wrote {write_json(summary, out, 'demo.json')}")
    png = os.path.join(out, "demo.png")
    if plot(summary["training"]["loss_nats"], summary["held_out"],
            summary["unigram_entropy_bits"], png):
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install 'lmxent[plot]')")


def plot(losses, results, unigram_entropy, path):
    """The training loss per step (bits per byte) and the held-out scores of every
    model as horizontal lines. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    bits = np.asarray(losses) / math.log(2)
    steps = np.arange(1, len(bits) + 1)
    ax.plot(steps, bits, color="C0", alpha=0.3, lw=0.8, label="training loss (per step)")
    w = max(1, len(bits) // 50)
    if len(bits) > w:
        smooth = np.convolve(bits, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="C0", label=f"training loss ({w}-step mean)")
    ax.axhline(unigram_entropy, color="gray", ls=":", label="unigram entropy (training bytes)")
    for (name, r), c in zip(results.items(), ["C3", "C1", "C2", "C4"]):
        ax.axhline(r["bits_per_byte"], color=c, ls="--",
                   label=f"held-out: {'MLP' if name == 'mlp' else name} "
                         f"{r['bits_per_byte']:.2f}")
    ax.set(xlabel="step", ylabel="bits per byte", ylim=(0, max(8.5, float(bits[:1].max()))),
           title="lmxent demo: byte-level MLP language model")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True
