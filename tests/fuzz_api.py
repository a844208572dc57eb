#!/usr/bin/env python3
"""Fuzz the public API for N minutes: python tests/fuzz_api.py --minutes N

Runs the property tests of tests/test_properties.py (random shapes, dtypes, layouts,
options and bad input, each checked against lmxent.reference) with fresh random
seeds until the time is up, each op family in its own subprocess, so that a crash
(a segfault, an abort, a sanitizer report) is caught and reported with the command
that reproduces it. Property failures are reported with hypothesis's falsifying
example. The tests marked xfail (known contracts of open issues) are left out
unless --include-known is given.

    python tests/fuzz_api.py --minutes 10             # all families, 2 at a time
    python tests/fuzz_api.py --minutes 5 --family kl  # one family
    python tests/fuzz_api.py --replay test_token_stats_matches_reference 12345
                                                      # rerun one seed, print each example

Under the sanitizer build, run it with the environment .ci/sanitize sets up (see
docs/testing.md). Exit status 1 if anything failed or crashed.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_PER_RUN = 50  # examples per (test, seed): the "fuzz" profile of _hypothesis_profiles

FAMILIES = {
    "softmax": ["test_softmax_family_matches_reference", "test_softmax_out_and_in_place",
                "test_isa_and_threads_do_not_change_results",
                "test_softmax_temperature_limits"],
    "cross_entropy": ["test_cross_entropy_family_matches_reference",
                      "test_cross_entropy_inplace_gradient",
                      "test_out_of_range_ids_name_targets_and_position",
                      "test_wrong_target_shape_names_targets",
                      "test_bad_float_options_name_the_option",
                      "test_cross_entropy_option_limits",
                      "test_out_overlapping_an_input_is_refused_or_correct",
                      "test_backward_with_low_lse_is_the_same_on_every_isa"],
    "lm_head": ["test_linear_cross_entropy_matches_reference"],
    "token_stats": ["test_token_stats_matches_reference"],
    "kl": ["test_kl_divergence_matches_reference", "test_kl_wrong_shapes_name_the_argument",
           "test_kl_divergence_teacher_offset"],
    "evaluation": ["test_sequence_scores_matches_reference", "test_answer_mask_matches_reference",
                   "test_perplexity_bits_per_byte_match_reference",
                   "test_perplexity_bits_per_byte_accept_lists",
                   "test_calibration_matches_reference", "test_answer_mask_negative_lengths",
                   "test_calibration_bad_confidence", "test_perplexity_bad_counts"],
    "settings": ["test_output_cache_limit_round_trip", "test_output_cache_negative_limit",
                 "test_unknown_isa_is_refused", "test_bad_logits_dtype_names_the_argument",
                 "test_settings_refuse_bad_values_by_name",
                 "test_options_refuse_strings_and_bools",
                 "test_numpy_scalars_and_0d_arrays_are_accepted_as_options"],
}


def load_properties(profile="fuzz"):
    """test_properties (under the given hypothesis profile), its hypothesis tests by
    name, and the names marked xfail."""
    os.environ["HYPOTHESIS_PROFILE"] = profile
    sys.path.insert(0, HERE)
    import test_properties as tp
    tests = {n: f for n, f in vars(tp).items()
             if n.startswith("test_") and hasattr(f, "hypothesis")}
    known = {n for n, f in tests.items()
             if any(m.name == "xfail" for m in getattr(f, "pytestmark", []))}
    listed = {n for names in FAMILIES.values() for n in names}
    missing = set(tests) - listed
    if missing:  # every property gets fuzzed: a new one must join a family
        raise SystemExit(f"fuzz_api.py: add {sorted(missing)} to a family in FAMILIES")
    return tests, known


def run_seeded(test, seed):
    """Run a hypothesis test's examples drawn from `seed` (the profile sets how many)."""
    from hypothesis import seed as with_seed
    with_seed(seed)(test)()


def child(family, seconds, base_seed, include_known):
    """Run the family's properties round-robin with successive seeds until the time
    is up. Prints "RUN name seed" before each run (the parent's reproducer if this
    process dies) and "FAIL name seed" after a property failure."""
    import traceback
    tests, known = load_properties()
    names = [n for n in FAMILIES[family] if include_known or n not in known]
    deadline = time.monotonic() + seconds
    runs = failures = 0
    seed = base_seed
    while time.monotonic() < deadline and names:
        for name in names:
            print(f"RUN {name} {seed}", flush=True)
            try:
                run_seeded(tests[name], seed)
            except BaseException as e:  # a property failed (not a crash: we are alive)
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures += 1
                traceback.print_exc()
                print(f"FAIL {name} {seed}", flush=True)
            runs += 1
            seed += 1
            if time.monotonic() >= deadline:
                break
    print(f"DONE {runs} {failures}", flush=True)
    return 1 if failures else 0


def replay(name, seed):
    tests, _ = load_properties("fuzz_replay")  # prints each example before it runs
    run_seeded(tests[name], seed)
    print(f"{name} seed {seed}: {EXAMPLES_PER_RUN} examples passed")
    return 0


def parent(families, minutes, jobs, base_seed, include_known):
    """Run the families in subprocesses, `jobs` at a time, sharing the time equally."""
    total = minutes * 60.0
    per_family = total * min(jobs, len(families)) / len(families)
    print(f"fuzz_api: {len(families)} families, {per_family:.0f} s each, {jobs} at a time, "
          f"seed {base_seed}", flush=True)
    pending, running, bad = list(families), [], 0
    logs = {}
    while pending or running:
        while pending and len(running) < jobs:
            fam = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", fam,
                   "--seconds", str(per_family), "--seed",
                   str(base_seed + 1_000_000 * list(FAMILIES).index(fam))]
            if include_known:
                cmd.append("--include-known")
            log = open(_log_path(fam), "w+")
            logs[fam] = log
            running.append((fam, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(0.5)
        for fam, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((fam, proc))
            bad += report(fam, proc.returncode, logs[fam])
    print("fuzz_api: " + ("FAILED" if bad else "no failure, no crash"), flush=True)
    return 1 if bad else 0


def _log_path(family):
    d = os.environ.get("FUZZ_LOG_DIR") or os.path.join(os.getcwd(), "fuzz-logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{family}.log")


def report(family, rc, log):
    log.seek(0)
    lines = log.read().splitlines()
    runs = [ln.split() for ln in lines if ln.startswith("RUN ")]
    fails = [ln.split()[1:] for ln in lines if ln.startswith("FAIL ")]
    done = [ln.split() for ln in lines if ln.startswith("DONE ")]
    me = os.path.relpath(os.path.abspath(__file__))
    if not done:  # died: the last RUN line names the test and seed it was running
        print(f"[{family}] CRASH (exit status {rc}) after {max(len(runs) - 1, 0)} runs; "
              f"log: {log.name}")
        last = max((i for i, ln in enumerate(lines) if ln.startswith("RUN ")), default=-1)
        print("\n".join("    " + ln for ln in lines[last + 1:last + 41]))
        if runs:
            _, name, seed = runs[-1]
            print(f"  reproduce (in the same environment): python {me} --replay {name} {seed}")
        return 1
    n, nfail = int(done[-1][1]), int(done[-1][2])
    print(f"[{family}] {n} runs x {EXAMPLES_PER_RUN} examples, {nfail} failed; log: {log.name}")
    for name, seed in fails:
        print(f"  FAIL {name}: python {me} --replay {name} {seed}")
    return 1 if nfail or rc else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="total wall time (default 1)")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES),
                    help="fuzz only this family (repeatable; default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="families at a time (default 2)")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--include-known", action="store_true",
                    help="also run the properties marked xfail (known open issues)")
    ap.add_argument("--replay", nargs=2, metavar=("TEST", "SEED"),
                    help="rerun one test's examples from one seed, printing each")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.jobs < 1:
        ap.error("--minutes must be > 0 and --jobs >= 1")
    if a.replay:
        return replay(a.replay[0], int(a.replay[1]))
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(3), "little")
    if a.child:
        return child(a.child, a.seconds, seed, a.include_known)
    return parent(a.family or list(FAMILIES), a.minutes, a.jobs, seed, a.include_known)


if __name__ == "__main__":
    sys.exit(main())
