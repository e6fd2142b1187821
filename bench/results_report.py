"""Write RESULTS.md, its plots (results/*.png) and results/commands.md (how each run was made) from
results/results.json, the file that bench/reproduce.py fills run by run. Every number and verdict comes from
that file (and, for the throughput table, results/throughput_interleaved*.json); rerun
`python bench/reproduce.py --report_only` after editing this script.

Verdict rule (written down before the runs): a comparison of two methods is *separated* when
their means over seeds differ by more than the sum of their standard deviations (forget quality
compared as log10); with fewer than two seeds on either side it is at best *inconclusive*, and
the direction seen is reported. Model utility counts as comparable within 0.05.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import grids  # noqa: E402
from grids import (CONTINUAL, CONTINUAL_LOW_LR, CONTINUAL_LR, CONTINUAL_TASKS, CURVES, GPU_METHODS,  # noqa: E402
                   GPU_SPLITS, GRIDS, METHOD_GRIDS, METHODS, NAMES, NEWER_BASELINES, ROBUST_BITS, SHARED_LR,
                   SWEEP_LRS)

OUT = REPO / "RESULTS.md"
PLOTS = REPO / "results"  # the plots, results/commands.md and the throughput files
COMMANDS = "commands.md"
COLS = [("FQ", "forget_quality"), ("MU", "model_utility"), ("FE w/o ES", "fe_wo_es"),
        ("forget ROUGE-L", "forget_rouge"), ("forget Prob", "forget_prob"), ("retain ROUGE-L", "retain_rouge"),
        ("retain Prob", "retain_prob"), ("top-5 leak", "forget_leak_top5")]
PAPER_COLS = [("FE", "fe"), ("MU-18", "mu18")]  # shown when a run had Closer-Look's NLI model (hub access)
# evaluation/privacy.py (--privacy): shown when any run has them; a run evaluated without them reads "not run"
PRIVACY_COLS = [("privleak", "privleak"), ("ExtStr", "extraction_strength"), ("ExactMem", "exact_memorization")]
FE = "fe_wo_es"
MU_TOL = 0.05
# The robust grid's rules, fixed before any of its runs: a method *keeps* its forgetting under an attack when the
# attacked model's forget Prob is at most ATTACK_TOL above the retain model's under the same attack (relearned, or
# quantized alike), and *does not keep* it otherwise; it *over-unlearns* when privleak is above PRIVLEAK_FAR (the
# forget set looks less likely to it than to the retain model by more than a fifth of the retain model's margin).
# One seed each: an observation per method, not a separated comparison.
ATTACK_TOL = 0.1
PRIVLEAK_FAR = 20.0


def metric(s: dict | None, key: str) -> float:
    """A metric of one evaluation, nan when absent (0.0 stays 0.0: MU reaches exactly 0 in collapsed runs)."""
    v = (s or {}).get(key)
    return v if isinstance(v, (int, float)) else float("nan")


def fe_wo_es(s: dict) -> float | None:
    """Closer-Look's forget efficacy without its ES term: 1 - mean(forget ROUGE-L, Prob, 1 - min(TR, 1/TR),
    CS) (evaluation.metrics.closer_look drops only ES). ES needs the NLI model sileod/deberta-v3-base-tasksource-nli
    from the hub, which the offline runs cannot load, so FE itself is not computed there."""
    keys = ("forget_rouge", "forget_prob", "forget_truth_ratio", "forget_cs")
    if any(not isinstance(s.get(k), (int, float)) for k in keys):
        return None
    return 1.0 - statistics.fmean([1.0 - s[k] if k == "forget_truth_ratio" else s[k] for k in keys])


def derive(records: list[dict]) -> list[dict]:
    """Add fe_wo_es to every evaluation of every record (before, last, peak, teacher, epochs, tasks)."""
    for r in records:
        evals = [r.get(k) for k in ("before", "last", "peak", "teacher")] + list(r.get("epochs") or [])
        evals += list((r.get("tasks") or {}).values())
        for s in evals:
            if isinstance(s, dict) and FE not in s:
                s[FE] = fe_wo_es(s)
    return records


def runs_at(records, method, lr):
    """The trained runs of a method at one lr, one per seed."""
    return [r for r in records if r["method"] == method and r["lr"] == lr and r["grid"] in METHOD_GRIDS]


def values(runs, key, where="last"):
    return [r[where][key] for r in runs if r.get(where) and isinstance(r[where].get(key), (int, float))]


def log_fq(v):
    return math.log10(max(v, 1e-300))


def mean_sd(vals):
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def cell(vals, digits=3):
    m, s = mean_sd(vals)
    if m is None:
        return "n/a"
    fmt = (lambda x: f"{x:.3g}") if digits == "g" else (lambda x: f"{x:.{digits}f}")
    return fmt(m) + (f" ± {fmt(s)}" if len(vals) > 1 else "")


def compare(a, b):
    """'higher' / 'lower' (a vs b, separated), 'overlap', or 'one seed: higher/lower' (not enough seeds)."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    if ma is None or mb is None:
        return "missing"
    sign = "higher" if ma > mb else "lower" if ma < mb else "equal"
    if len(a) < 2 or len(b) < 2:
        return f"one seed: {sign}"
    return sign if abs(ma - mb) > sa + sb else "overlap"


def chosen(records):
    return {m: grids.chosen_lr(m, records) for m in METHODS}



# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def sweep_table(records, lrs):
    lines = ["| method | " + " | ".join(f"lr {lr:g}: FQ / MU" for lr in SWEEP_LRS) + " | chosen lr |",
             "|---" * (len(SWEEP_LRS) + 2) + "|"]
    for m in METHODS:
        cells = []
        for lr in SWEEP_LRS:
            r = next((r for r in records if r["grid"] == "sweep" and r["method"] == m and r["lr"] == lr), None)
            cells.append(f"{r['last']['forget_quality']:.3g} / {r['last']['model_utility']:.3f}" if r else "not run")
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {lrs[m]:g} |" if lrs[m] else
                     f"| {NAMES[m]} | " + " | ".join(cells) + " | sweep incomplete |")
    return "\n".join(lines)


def privacy_cell(text: str, key: str) -> str:
    """A privacy column's cell reads "not run" where the runs were evaluated without --privacy."""
    return "not run" if text == "n/a" and key in dict((k, c) for c, k in PRIVACY_COLS) else text


def main_table(records, lrs, where):
    cols = COLS + [c for c in PAPER_COLS + PRIVACY_COLS
                   if any(isinstance((r.get(where) or {}).get(c[1]), float) for r in records)]
    head = "| model | lr | seeds | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|---" * (len(cols) + 3) + "|"]
    before = [r["before"] for r in records if r.get("before")][:1]
    retain = next((r["last"] for r in records if r["name"] == "retain-model" and r.get("last")), None)
    teacher = next((r["teacher"] for r in records if r.get("teacher")), None)
    for name, s in (("target (before unlearning)", before[0] if before else None), ("retain model", retain),
                    ("RKLD's unlearning teacher alone", teacher)):
        if s:
            lines.append(f"| {name} | | | " + " | ".join(privacy_cell(cell([s[k]] if isinstance(s.get(k), (int, float))
                                                                           else [], "g" if k == "forget_quality" else 3), k)
                                                         for _, k in cols) + " |")
    for m in METHODS:
        lr = lrs[m] or SWEEP_LRS[0]
        runs = runs_at(records, m, lr)
        if not runs:
            continue
        tag = "" if lrs[m] else " (sweep incomplete: quick-recipe lr)"
        if not any(r.get(where) for r in runs):  # a run recorded before its peak row was evaluated
            lines.append(f"| {NAMES[m]}{tag} | {lr:g} | 0 | " + " | ".join("not evaluated" for _ in cols) + " |")
            continue
        runs = [r for r in runs if r.get(where)]
        lines.append(f"| {NAMES[m]}{tag} | {lr:g} | {len(runs)} | " + " | ".join(
            privacy_cell(cell(values(runs, k, where), "g" if k == "forget_quality" else 3), k) for _, k in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Claims: each returns (verdict, lines, key numbers); a list inside lines holds the bullets under the line before it
# ----------------------------------------------------------------------------------------------
def verdict_pairs(results, supports, contradicts):
    """reproduced when every comparison supports the claim with separated seeds, not reproduced when
    any separated comparison contradicts it, inconclusive otherwise."""
    if any(contradicts(r) for r in results):
        return "not reproduced"
    if results and all(supports(r) for r in results):
        return "reproduced"
    return "inconclusive"


def claim_rkld_vs_baselines(records, lrs, baselines=("ga", "npo", "dpo", "kto", "idk")):
    """RKLD against each baseline at its chosen lr, first-peak epoch: FQ separated higher at MU within MU_TOL.
    A baseline whose sweep is incomplete (no chosen lr) or that has no runs counts as missing: inconclusive."""
    rk = runs_at(records, "rkld", lrs["rkld"] or SWEEP_LRS[0])
    rows, res, means = [], [], []
    for b in baselines:
        br = runs_at(records, b, lrs[b]) if lrs[b] else []
        if not br or not rk:
            res.append(("missing", 0.0))
            rows.append(f"{NAMES[b]}: " + ("not run yet" if lrs[b] or not rk else "sweep incomplete (no chosen lr yet)"))
            continue
        fq = compare([log_fq(v) for v in values(rk, "forget_quality", "peak")],
                     [log_fq(v) for v in values(br, "forget_quality", "peak")])
        mu_gap = (mean_sd(values(rk, "model_utility", "peak"))[0] or 0) - (mean_sd(values(br, "model_utility", "peak"))[0] or 0)
        res.append((fq, mu_gap))
        means.append((mean_sd(values(br, "forget_quality", "peak"))[0], mean_sd(values(br, "model_utility", "peak"))[0]))
        rows.append(f"{NAMES[b]}: FQ {cell(values(br, 'forget_quality', 'peak'), 'g')}, MU "
                    f"{cell(values(br, 'model_utility', 'peak'))} (RKLD's FQ {fq}, MU gap {mu_gap:+.3f})"
                    + ("; it unlearned nothing at any swept lr (last-epoch FQ never above the target's), so the "
                       "comparison says little" if grids.unlearned_nothing(b, records) else ""))
    v = verdict_pairs(res, lambda r: r[0] == "higher" and r[1] >= -MU_TOL, lambda r: r[0] == "lower")
    ours = f"FQ {cell(values(rk, 'forget_quality', 'peak'), 'g')}, MU {cell(values(rk, 'model_utility', 'peak'))}"
    key = f"RKLD {ours}" + (f"; the baselines FQ {min(f for f, _ in means):.3g}-{max(f for f, _ in means):.3g}, MU "
                            f"{min(m for _, m in means):.3f}-{max(m for _, m in means):.3f}" if means else "")
    return v, [f"RKLD: {ours}", *rows], key


def claim_rkld_vs_newer(records, lrs):
    """Not a paper's claim: RKLD Table 4's test (above) against the baselines that postdate the paper (issue 33).
    Worded holds / does not hold, since there is nothing to reproduce."""
    v, lines, key = claim_rkld_vs_baselines(records, lrs, NEWER_BASELINES)
    v = {"reproduced": "holds", "not reproduced": "does not hold"}.get(v, v)
    if waiting := [NAMES[m] for m in NEWER_BASELINES if not lrs[m]]:
        v += f" (sweep incomplete for {', '.join(waiting)})"
    if idle := [NAMES[m] for m in NEWER_BASELINES if grids.unlearned_nothing(m, records)]:
        key += f"; {' and '.join(idle)} unlearned nothing at any swept lr"
    return v, lines, key


def claim_rkl_vs_fkl(records):
    pairs = []
    for r in records:
        if r["method"] == "rkld" and r["grid"] in ("sweep", "seeds"):
            f = next((x for x in records if x["method"] == "rkld_fkl" and x["lr"] == r["lr"]
                      and x["seed"] == r["seed"] and x["grid"] in ("sweep", "seeds")), None)
            if f:
                pairs.append((r["lr"], r["seed"], r["peak"]["forget_quality"], f["peak"]["forget_quality"],
                              r["peak"]["model_utility"], f["peak"]["model_utility"]))
    wins = sum(p[2] > p[3] for p in pairs)
    losses = sum(p[2] < p[3] for p in pairs)
    first = ("reproduced" if len(pairs) >= 3 and wins == len(pairs) else
             "not reproduced" if len(pairs) >= 3 and losses == len(pairs) else "inconclusive")
    # the verdict rule of every other claim: at the chosen lr (FKL takes RKLD's), the seeds' means separated
    lr = grids.chosen_lr("rkld", records) or SWEEP_LRS[0]
    rk = [p for p in pairs if p[0] == lr]
    fq = compare([log_fq(p[2]) for p in rk], [log_fq(p[3]) for p in rk])
    v = {"higher": "reproduced", "lower": "not reproduced"}.get(fq, "inconclusive")
    both = f"RKL FQ {cell([p[2] for p in rk], 'g')} vs FKL FQ {cell([p[3] for p in rk], 'g')}"
    every = f"RKL higher in {wins} of {len(pairs)}, lower in {losses}"
    rows = [f"lr {p[0]:g}, seed {p[1]}: RKL FQ {p[2]:.3g} (MU {p[4]:.3f}) vs FKL FQ {p[3]:.3g} (MU {p[5]:.3f})"
            for p in sorted(pairs)]
    return v, [f"at the chosen lr {lr:g} ({len(rk)} seed{'s' * (len(rk) != 1)}): {both}: RKL's FQ {fq}",
               f"every paired run (same teacher, lr and seed): {every}", rows,
               f"verdict rule: the other claims' (seeds at the chosen lr); as first written it needed RKL higher in "
               f"every paired run at every swept lr, which reads {first} here"], f"lr {lr:g}: {both}; paired runs: {every}"


def claim_teacher(records, lrs):
    t = next((r for r in records if r.get("teacher")), None)
    rk = runs_at(records, "rkld", lrs["rkld"] or SWEEP_LRS[0])
    if not t or not rk:
        return "inconclusive", ["not run yet"], "not run yet"
    s, fq, mu = t["teacher"], mean_sd(values(rk, "forget_quality", "peak"))[0], mean_sd(values(rk, "model_utility", "peak"))[0]
    poor = s["model_utility"] < mu - MU_TOL or log_fq(s["forget_quality"]) < log_fq(fq) - 1
    good = s["model_utility"] >= mu and s["forget_quality"] >= fq
    v = "reproduced" if poor else "not reproduced" if good else "inconclusive"
    return v, [f"teacher alone: FQ {s['forget_quality']:.3g}, MU {s['model_utility']:.3f}, forget ROUGE-L "
               f"{s['forget_rouge']:.3f}, retain ROUGE-L {s['retain_rouge']:.3f}",
               f"RKLD student at its first-peak epoch: FQ {fq:.3g}, MU {mu:.3f} (one teacher: seed 42)"], \
        f"teacher alone FQ {s['forget_quality']:.3g}, MU {s['model_utility']:.3f}; RKLD student FQ {fq:.3g}, MU {mu:.3f}"


def keeps_utility(g, b):
    """(verdict, MU comparison, FE comparison) of good's runs against bad's: reproduced when good's MU is
    higher (seeds separated) and its FE w/o ES not lower by more than MU_TOL (a utility win bought with
    forgetting less is not the claim), not reproduced when its MU is lower, inconclusive otherwise."""
    mu, fe = compare(values(g, "model_utility"), values(b, "model_utility")), compare(values(g, FE), values(b, FE))
    fe_gap = (mean_sd(values(g, FE))[0] or 0) - (mean_sd(values(b, FE))[0] or 0)
    v = ("reproduced" if mu == "higher" and fe_gap >= -MU_TOL else "not reproduced" if mu == "lower" else "inconclusive")
    return v, mu, fe


def claim_keeps_utility(records, lrs, good, bad):
    """The declared verdict, at each method's chosen lr, then the same verdict at SHARED_LR (Closer-Look
    Table 4's protocol: one lr for every method) once both methods have two seeds or more there."""
    g = runs_at(records, good, lrs[good] or SWEEP_LRS[0])
    b = runs_at(records, bad, lrs[bad] or SWEEP_LRS[0])
    v, mu, fe = keeps_utility(g, b)
    target = next((r["before"]["model_utility"] for r in records if r.get("before")), float("nan"))
    seeds = lambda r: f"{len(r)} seed{'s' if len(r) != 1 else ''}"
    desc = lambda x, r, lr: (f"{NAMES[x]}: not run yet" if not r else
                             f"{NAMES[x]} (lr {lr:g}, {seeds(r)}, last epoch): MU {cell(values(r, 'model_utility'))} "
                             f"({(mean_sd(values(r, 'model_utility'))[0] or 0) / target:.0%} of the target's "
                             f"{target:.3f}), FE w/o ES {cell(values(r, FE))}")
    lines = [desc(x, r, lrs[x] or SWEEP_LRS[0]) for x, r in ((good, g), (bad, b))]
    lines += [f"{NAMES[good]} vs {NAMES[bad]}: MU {mu}, FE w/o ES {fe}"]
    key = f"MU {cell(values(g, 'model_utility'))} vs {cell(values(b, 'model_utility'))} at the chosen lrs"
    lr = SHARED_LR
    gs, bs = runs_at(records, good, lr), runs_at(records, bad, lr)
    if len(gs) >= 2 and len(bs) >= 2:
        vs, mus, fes = keeps_utility(gs, bs)
        v = f"{v} at each method's chosen lr; {vs} at one shared lr, {lr:g} (Table 4's protocol)"
        lines += [f"at one shared lr {lr:g}, the verdict's second half (`--grid shared`, chosen after the seed-42 "
                  f"sweep: see SHARED in bench/grids.py):",
                  [desc(x, r, lr) for x, r in ((good, gs), (bad, bs))] + [f"MU {mus}, FE w/o ES {fes}"]]
        key += f"; {cell(values(gs, 'model_utility'))} vs {cell(values(bs, 'model_utility'))} at lr {lr:g}"
    else:
        lines += [f"at one shared lr {lr:g} (Table 4's protocol): seeds 1 and 2 not all run yet (`--grid shared`)"]
    return v, lines + shared_lr_lines(records, good, bad), key


def shared_lr_lines(records, good, bad) -> list:
    """The two methods at each swept lr (seed 42, last epoch): Closer-Look Table 4 trains every method at one
    lr (1e-5), where the verdict above takes each method's own chosen lr."""
    out = []
    for lr in sorted(SWEEP_LRS, reverse=True):
        pair = [next((r["last"] for r in records if r["grid"] == "sweep" and r["method"] == m and r["lr"] == lr
                      and r.get("last")), None) for m in (good, bad)]
        if all(pair):
            out.append(f"lr {lr:g}: " + " vs ".join(
                f"{NAMES[m]} MU {x['model_utility']:.3f}, FE w/o ES {metric(x, FE):.3f}"
                for m, x in zip((good, bad), pair)))
    head = "at one shared lr (Closer-Look Table 4 trains every method at one lr, 1e-5; seed 42, last epoch):"
    return [head, out] if out else []


DECLINE = 0.8  # a continual run declines when its lowest MU is below this share of the start's


def continual_rows(records, lr=None):
    """method -> its sequence's evaluations by task, at the quick recipe's lr (None) or at `lr`."""
    return {r["method"]: r["tasks"] for r in records
            if r["grid"] == "continual" and r.get("tasks") and r.get("lr") == lr}


def claim_continual(records):
    """Closer-Look Fig. 6 on our sequences: a method "declines" when its lowest MU over tasks 1..N falls below
    80% of the starting model's (the paper: the baselines' MU "nearly zero on a certain subtask", at any task,
    not only the last), and "keeps" it otherwise. Reproduced: ME+GD and IDK+AP keep and GA+GD and NPO+GD
    decline; not reproduced: ME+GD or IDK+AP declines, or neither baseline does; else inconclusive. The same
    rule again, as the verdict's second half, on the sequences at CONTINUAL_LOW_LR once any ran."""
    v, lines, low = continual_verdict(continual_rows(records))
    lines.append(f"one sequence per method (seed 42), tasks 1-{CONTINUAL_TASKS} of forget01's 10, lr "
                 f"{CONTINUAL_LR:g} for every method (the quick recipe: Closer-Look §5.2 also trains every method at "
                 "one lr, 1e-5), ME+GD with alpha 1.0 (Closer-Look §5.2)")
    lowest = lambda lows: ", ".join(f"{NAMES[m]} {x:.3f}" for m, (x, _) in lows.items())
    start = next((c["0"]["model_utility"] for c in continual_rows(records).values()), float("nan"))
    key = f"MU at the start {start:.3f}; lowest over the tasks at lr {CONTINUAL_LR:g}: {lowest(low)}"
    lr = CONTINUAL_LOW_LR
    rows_low = continual_rows(records, lr)
    if not rows_low:
        return v, lines + [f"at one lower lr, {lr:g}, for every method: not run yet (`--grid continual`)"], key
    v_low, low_lines, low_low = continual_verdict(rows_low)
    return (f"{v} at lr {CONTINUAL_LR:g}; {v_low} at lr {lr:g}",
            lines + [f"at one lower lr, {lr:g}, for every method (`--grid continual`, added after the runs at "
                     f"{CONTINUAL_LR:g}: see CONTINUAL_LOW_LR in bench/grids.py), the verdict's second half:", low_lines],
            f"{key}; at lr {lr:g}: {lowest(low_low)}")


def continual_verdict(c):
    """(verdict, lines, method -> (lowest MU, its task)) of claim_continual's rule on one set of sequences
    (method -> evaluations by task)."""
    ran = [m for m in CONTINUAL if m in c]
    missing = [NAMES[m] for m in CONTINUAL if m not in c]
    if not ran:
        return "inconclusive", [f"not run yet: {', '.join(missing)}"], {}
    tasks = [str(k) for k in range(1, CONTINUAL_TASKS + 1)]
    low, start = {}, {}
    for m in ran:
        start[m] = c[m]["0"]["model_utility"]
        mus = [(c[m][k]["model_utility"], k) for k in tasks if (c[m].get(k) or {}).get("model_utility") is not None]
        low[m] = min(mus) if mus else (float("nan"), "none")
    declines = {m: not low[m][0] >= DECLINE * start[m] for m in ran}  # nan (no task) declines
    ours, base = [declines[m] for m in ("me_gd", "idk_ap") if m in ran], [declines[m] for m in ("ga_gd", "npo_gd") if m in ran]
    if any(ours):  # one of ours declining settles it whatever the sequences still to run show
        v = "not reproduced"
    elif missing:
        v = "inconclusive"
    else:
        v = "reproduced" if all(base) else "not reproduced" if not any(base) else "inconclusive"
    last = tasks[-1]
    return v, [f"{NAMES[m]}: MU {start[m]:.3f} at the start, lowest {low[m][0]:.3f} (task {low[m][1]}), "
               f"{metric(c[m].get(last), 'model_utility'):.3f} after task {last}; FE w/o ES "
               f"{metric(c[m].get(last), FE):.3f} after task {last}: "
               f"{'declines' if declines[m] else 'keeps'} (lowest {'below' if declines[m] else 'at least'} "
               f"{DECLINE:.0%} of the start)" for m in ran] + [
        "ROUGE-L after task " + last + " (MU is the harmonic mean of 9 values, 3 splits of 20 rows, so any one "
        "of them at 0 sets it to 0):", [
            f"{NAMES[m]} retain {metric(c[m].get(last), 'retain_rouge'):.3f}, real authors "
            f"{metric(c[m].get(last), 'real_authors_rouge'):.3f}, world facts {metric(c[m].get(last), 'world_facts_rouge'):.3f}, "
            f"forget {metric(c[m].get(last), 'forget_rouge'):.3f}" for m in ran]] + (
        [f"not run yet: {', '.join(missing)}"] if missing else []), low


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is optional: without it the report says the plots were not drawn)
# ----------------------------------------------------------------------------------------------
def plots(records, lrs) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, m in enumerate(METHODS):
        runs = [r for r in records if r["method"] == m and r["grid"] in METHOD_GRIDS and r.get("peak")]
        if runs:
            xs, ys = values(runs, "model_utility", "peak"), values(runs, "forget_quality", "peak")
            ax.scatter(xs, ys, s=40 if m.startswith("rkld") else 20, marker="*" if m == "rkld" else "o",
                       label=NAMES[m], color=plt.cm.tab20(i))
    before = next((r["before"] for r in records if r.get("before")), None)
    retain = next((r["last"] for r in records if r["name"] == "retain-model"), None)
    teacher = next((r["teacher"] for r in records if r.get("teacher")), None)
    for name, s, mk in (("target", before, "s"), ("retain model", retain, "D"), ("RKLD teacher alone", teacher, "x")):
        if s:
            ax.scatter([s["model_utility"]], [s["forget_quality"]], marker=mk, color="black", s=50, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (log scale)")
    ax.set_title("forget01, SmolLM2-135M quick path: every run at its first-peak epoch")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOTS / "fq_vs_mu.png", dpi=110)
    plt.close(fig)
    made.append("fq_vs_mu.png")
    # forget quality after every epoch comes with every run (--peak_epoch); model utility after every
    # epoch only in the seeds grid's curve runs (--eval_every_epoch; otherwise epoch 0 and the last)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for m in CURVES:
        lr = lrs[m] or SWEEP_LRS[0]
        full = next((r for r in runs_at(records, m, lr) if "--eval_every_epoch" in r.get("command", [])), None)
        base = next((r for r in records if r["grid"] == "sweep" and r["method"] == m and r["lr"] == lr), None)
        r = full or base
        if not r or not r.get("epochs"):
            continue
        drawn = True
        ep = [e for e in r["epochs"] if e.get("forget_quality") is not None]
        a1.plot([e["epoch"] for e in ep], [e["forget_quality"] for e in ep], marker="o",
                label=f"{NAMES[m]} (lr {lr:g}, seed {r['seed']})")
        mu = [e for e in r["epochs"] if e.get("model_utility") is not None]
        a2.plot([e["epoch"] for e in mu], [e["model_utility"] for e in mu], marker="o",
                linestyle="-" if full else ":",
                label=f"{NAMES[m]} (seed {r['seed']})" + ("" if full else ", epochs 0 and last only"))
    if drawn:
        a1.set_yscale("log")
        a1.set_title("forget quality after each epoch")
        a2.set_title("model utility after each epoch")
        for a in (a1, a2):
            a.set_xlabel("epoch")
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(PLOTS / "epoch_curves.png", dpi=110)
        made.append("epoch_curves.png")
    plt.close(fig)
    sets = [(lr, continual_rows(records, lr)) for lr in (None, CONTINUAL_LOW_LR)]
    if sets[0][1]:  # solid: the quick recipe's lr; dashed, same colour: the lower lr
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for lr, c in sets:
            for m, tasks in c.items():
                ks = sorted((int(k) for k, s in tasks.items() if s), key=int)
                style = dict(marker="o", color=plt.cm.tab10(CONTINUAL.index(m)), linestyle="-" if lr is None
                             else "--", label=f"{NAMES[m]}, lr {lr or CONTINUAL_LR:g}")
                a1.plot(ks, [tasks[str(k)]["model_utility"] for k in ks], **style)
                a2.plot(ks, [tasks[str(k)].get(FE) for k in ks], **style)
        a1.set_title("model utility after each task")
        a2.set_title("forget efficacy without ES after each task")
        for a in (a1, a2):
            a.set_xlabel("task")
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(PLOTS / "continual.png", dpi=110)
        plt.close(fig)
        made.append("continual.png")
    return made


def paper_lines() -> dict[str, tuple[str, str | None]]:
    """The papers' own numbers for each claim (forget01, Llama-2-7B), from results/paper_numbers.json, which
    quotes each table with its line in ../shared/papers/: claim -> (the claims table's cell, a quote for the
    details where the paper gives no numbers). Keys are the claims' short names."""
    path = PLOTS / "paper_numbers.json"
    if not path.exists():
        return {}
    p = json.loads(path.read_text())
    t4 = p["rkld_table4"]["rows"]["forget01"]
    rk = ", ".join(f"{m} {t4[m]['F-Qual']:.3g} / {t4[m]['M-Util']:.3f}" for m in ("RKLD", "GA", "NPO", "DPO", "KTO", "IDK")
                   if m in t4)
    t2 = p["rkld_table2"]["rows"]
    fkl = "; ".join(f"{sp}: RKL {t2['RKL'][sp]['F-Quality']:.3g} vs FKL {t2['FKL'][sp]['F-Quality']:.3g}"
                    for sp in ("forget01", "forget05", "forget10"))
    cl = p["closer_look_table4"]["rows"]
    mufe = lambda m: f"{m.replace('(Ours)', '')} {cl[m]['forget01']['MU']:.3f} / {cl[m]['forget01']['FE']:.3f}"
    quote = lambda q: f"paper: \"{q['quote']}\" (line {q['line']})"
    return {
        "rkld": (f"forget01 FQ / MU: {rk}", None),
        "rkld_newer": ("not in the paper: these baselines postdate it", None),
        "fkl": (f"FQ at the first-peak epoch: {fkl}", None),
        "teacher": ("no numbers", quote(p["rkld_teacher"]["quotes"][0])),
        "me_gd": (f"forget01 MU / FE: {mufe('ME+GD(Ours)')}, {mufe('GA+GD')}", None),
        "idk_ap": (f"forget01 MU / FE: {mufe('IDK+AP(Ours)')}, {mufe('IDK+GD')}", None),
        "continual": ("no per-task numbers (Fig. 6 only)", quote(p["closer_look_continual"]["quotes"][0])),
        # not in ../shared/papers: the attack papers' abstracts, in our words
        "relearn": ("WMDP, TOFU, Harry Potter: relearning on part of the data restores the rest; no numbers quoted here "
                    "(arXiv 2406.13356)", None),
        "quant4": ("MUSE, methods with a utility constraint: 21% of the forgotten knowledge kept in full precision, "
                   "83% after 4-bit quantization (arXiv 2410.16454, abstract)", None),
    }


CLAIMS = (  # short name, the claims table's label, the title over its details
    ("rkld", "RKLD beats GA, NPO, DPO, KTO and IDK in FQ at comparable MU (RKLD Table 4, first-peak epoch)",
     "RKLD reaches higher forget quality than GA, NPO, DPO, KTO and IDK at comparable model utility (RKLD Table 4 / "
     "Fig. 3; first-peak epoch)"),
    ("rkld_newer", "Beyond the paper: RKLD beats WGA+GD, SatImp+GD, CE-U, PDU and RMU in FQ at comparable MU (the "
     "same test, first-peak epoch)",
     "Beyond the paper: RKLD reaches higher forget quality than the newer baselines (WGA+GD, SatImp+GD, CE-U, PDU, RMU) "
     "at comparable model utility (RKLD Table 4's test, first-peak epoch)"),
    ("fkl", "RKL beats FKL in FQ, same teacher (RKLD Table 2, first-peak epoch)",
     "RKL beats FKL in forget quality with the same teacher (RKLD Table 2; first-peak epoch)"),
    ("teacher", "The unlearning teacher alone is a poor unlearned model (RKLD §3.2)",
     "The unlearning teacher alone is a poor unlearned model (RKLD §3.2)"),
    ("me_gd", "ME+GD keeps MU where GA+GD collapses (Closer-Look Table 4, last epoch)",
     "ME+GD keeps model utility where GA+GD collapses (Closer-Look Table 4; last epoch)"),
    ("idk_ap", "IDK+AP keeps MU where IDK+GD does not (Closer-Look Table 4, last epoch)",
     "IDK+AP keeps utility where IDK+GD does not (Closer-Look Table 4; last epoch)"),
    ("continual", "Continual: ME+GD and IDK+AP keep MU over tasks, GA+GD and NPO+GD decline (Closer-Look Fig. 6)",
     "Continual: ME+GD and IDK+AP keep MU over tasks where GA+GD and NPO+GD decline (Closer-Look Fig. 6)"),
    ("relearn", "A few relearning steps on part of the forget set bring the rest back (Hu et al., ICLR 2025; one seed)",
     "Relearning on half of the forget questions brings the other half back (Hu et al., ICLR 2025; `--grid robust`, "
     "last epoch, one seed)"),
    ("quant4", "4-bit quantization brings the forgotten answers back (Zhang et al., ICLR 2025; one seed)",
     "Quantizing the unlearned model to 4 bits brings the forgotten answers back (Zhang et al., ICLR 2025; "
     "`--grid robust`, last epoch, one seed)"),
)


def claims_of(records, lrs) -> list[tuple[str, str, str, str, list, str]]:
    """(label, title, paper's cell, verdict, detail lines, key numbers) of every claim, in CLAIMS' order."""
    got = {"rkld": claim_rkld_vs_baselines(records, lrs), "rkld_newer": claim_rkld_vs_newer(records, lrs),
           "fkl": claim_rkl_vs_fkl(records),
           "teacher": claim_teacher(records, lrs), "me_gd": claim_keeps_utility(records, lrs, "me_gd", "ga_gd"),
           "idk_ap": claim_keeps_utility(records, lrs, "idk_ap", "idk_gd"), "continual": claim_continual(records),
           "relearn": claim_attack(records, lrs, "relearn_attack/", "relearning"),
           "quant4": claim_attack(records, lrs, "quantize_attack/4bit/", "4-bit quantization")}
    paper = paper_lines()
    out = []
    for key, label, title in CLAIMS:
        v, lines, nums = got[key]
        cell_, quote = paper.get(key, ("not quoted", None))
        out.append((label, title, cell_, v, lines + ([quote] if quote else []), nums))
    return out


def bullets(lines: list, depth: int = 0) -> list[str]:
    """Markdown bullets of claim lines: a list inside lines holds the bullets under the line before it."""
    out = []
    for x in lines:
        out += bullets(x, depth + 1) if isinstance(x, list) else [f"{'  ' * depth}- {x}"]
    return out


# ----------------------------------------------------------------------------------------------
# Robustness (`--grid robust`): the attacks of evaluation/attacks.py and privleak, one run per method
# ----------------------------------------------------------------------------------------------
# (name, summary key prefix, the three models of its cells): each attack's numbers in the run's eval/after/summary.json
ATTACKS = [("relearning", "relearn_attack/", ("unlearned", "attacked", "retain")),
           *((f"{b[:-3]}-bit quantization", f"quantize_attack/{b}/", ("attacked", "target", "retain")) for b in ROBUST_BITS)]


def robust_run(records, method, lr) -> dict | None:
    """The robust grid's run of a method at its chosen lr: its last epoch's summary (the saved model the attacks load)."""
    return next((r["last"] for r in records if r["grid"] == "robust" and r["method"] == method and r["lr"] == lr
                 and r.get("last")), None)


def before_attack(s: dict | None, prefix: str) -> float:
    """The unlearned model's forget Prob on the rows the attack is judged on: relearning, the held-out half; the
    quantizations, the whole forget split in full precision."""
    return metric(s, prefix + "unlearned/forget_prob" if prefix.startswith("relearn") else "forget_prob")


def keeps_forgetting(s: dict | None, prefix: str) -> str:
    """ATTACK_TOL's rule on one run under one attack: 'keeps', 'does not keep', 'had not forgotten', or 'not run
    yet'. 'had not forgotten': the unlearned model, before the attack (relearning: on the same held-out half; the
    quantizations: in full precision, the whole forget split), is already above the same bar, so the attack had
    nothing to bring back (added after the first runs, when IDK+AP at its chosen lr kept forget Prob 0.88: it
    splits what the rule called 'does not keep', and moves no method to or from 'keeps')."""
    a, r = metric(s, prefix + "attacked/forget_prob"), metric(s, prefix + "retain/forget_prob")
    if math.isnan(a) or math.isnan(r):
        return "not run yet"
    if a <= r + ATTACK_TOL:
        return "keeps"
    return "had not forgotten" if before_attack(s, prefix) > r + ATTACK_TOL else "does not keep"


def over_unlearns(s: dict | None) -> str:
    """PRIVLEAK_FAR's rule on one run: 'over-unlearns', 'does not', or 'not run yet'."""
    v = metric(s, "privleak")
    return "not run yet" if math.isnan(v) else "over-unlearns" if v > PRIVLEAK_FAR else "does not"


def robust_verdicts(records, lrs) -> list[tuple[str, str, str, str]]:
    """(question, rule, verdict, key numbers) of each robustness question over the methods' robust runs; the
    verdict names the methods each way, and reads "not run yet" until a run has the numbers; the key numbers are
    the range of what the rule reads (the table above has each method's)."""
    runs = {m: robust_run(records, m, lrs[m]) for m in METHODS if lrs[m]}
    qs = [(f"keeps its forgetting under {name}", f"attacked forget Prob ≤ retain's attacked + {ATTACK_TOL}",
           lambda s, p=prefix: keeps_forgetting(s, p), ("keeps", "does not keep", "had not forgotten"),
           "attacked − retain's attacked forget Prob",
           lambda s, p=prefix: metric(s, p + "attacked/forget_prob") - metric(s, p + "retain/forget_prob"))
          for name, prefix, _ in ATTACKS]
    qs.append(("over-unlearns (privleak far above 0)", f"privleak > {PRIVLEAK_FAR:g}", over_unlearns,
               ("over-unlearns", "does not"), "privleak", lambda s: metric(s, "privleak")))
    out = []
    for question, rule, judge, answers, what, read in qs:
        by = {m: judge(s) for m, s in runs.items()}
        ran = [m for m in runs if by[m] != "not run yet"]
        missing = len(METHODS) - len(ran)
        verdict = "; ".join(f"{a}: {', '.join(NAMES[m] for m in ran if by[m] == a) or 'none'}" for a in answers) \
            if ran else "not run yet"
        verdict += f" ({missing} method{'s' * (missing != 1)} not run yet)" if ran and missing else ""
        lo, hi = (min(ran, key=lambda m: read(runs[m])), max(ran, key=lambda m: read(runs[m]))) if ran else (None, None)
        out.append((question, rule, verdict, f"{what} from {read(runs[lo]):+.3g} ({NAMES[lo]}) to {read(runs[hi]):+.3g} "
                    f"({NAMES[hi]})" if ran else "not run yet"))
    return out


def claim_attack(records, lrs, prefix: str, what: str):
    """An attack paper's claim (the knowledge comes back) on the robust grid, by ATTACK_TOL's per-method rule:
    reproduced when more of the methods run do not keep their forgetting than keep it (a method that had not
    forgotten before the attack is left out of the count), not reproduced when more
    keep it, inconclusive on a tie; "not run yet" with no run. Fixed before any robust run, like ATTACK_TOL."""
    runs = {m: robust_run(records, m, lrs[m]) for m in METHODS if lrs[m]}
    by = {m: keeps_forgetting(s, prefix) for m, s in runs.items()}
    keep = [NAMES[m] for m in by if by[m] == "keeps"]
    lose = [NAMES[m] for m in by if by[m] == "does not keep"]
    never = [NAMES[m] for m in by if by[m] == "had not forgotten"]
    n = len(keep) + len(lose)
    v = ("reproduced" if len(lose) > len(keep) else "not reproduced" if len(keep) > len(lose) else "inconclusive") \
        if n else "not run yet"
    lines = [f"rule: a method keeps its forgetting under {what} when its attacked forget Prob is at most {ATTACK_TOL} "
             f"above the retain model's under the same attack; the claim holds when most methods run do not",
             f"keep: {', '.join(keep) or 'none'}; do not keep: {', '.join(lose) or 'none'}; left out, already above "
             f"the bar before the attack (nothing to bring back): {', '.join(never) or 'none'}; "
             f"{len(METHODS) - n - len(never)} methods not run yet (`--grid robust`)"]
    # what the attack brought back, every method run: attacked − unlearned forget Prob (the same rows)
    up = {m: metric(x, prefix + "attacked/forget_prob") - before_attack(x, prefix) for m, x in runs.items() if x is not None}
    up = {m: d for m, d in up.items() if not math.isnan(d)}
    moved = (f"; attacked − unlearned forget Prob from {min(up.values()):+.3f} ({NAMES[min(up, key=up.get)]}) to "
             f"{max(up.values()):+.3f} ({NAMES[max(up, key=up.get)]})") if up else ""
    return v, lines, (f"{len(lose)} of {n} methods do not keep their forgetting{moved}" if n else "not run yet")


def robust_section(records, lrs) -> list[str]:
    """RESULTS.md's robustness section: per method, privleak, ExtStr and each attack's forget ROUGE-L and Prob
    beside its yardsticks, then the verdicts (ATTACK_TOL, PRIVLEAK_FAR)."""
    f = lambda x: "n/a" if math.isnan(x) else f"{x:.3f}"
    head = ["method", "lr", "privleak", "ExtStr"] + [f"{name.split(' ')[0]}: forget {c}" for name, _, _ in ATTACKS
                                                      for c in ("ROUGE-L", "Prob")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in METHODS:
        s = robust_run(records, m, lrs[m]) if lrs[m] else None
        if s is None:
            lines.append(f"| {NAMES[m]} | {lrs[m] or 'sweep incomplete'} | " + " | ".join(["not run yet"] * (len(head) - 2)) + " |")
            continue
        cells = [f"{metric(s, 'privleak'):.1f}" if not math.isnan(metric(s, "privleak")) else "not run yet",
                 f(metric(s, "extraction_strength")) if not math.isnan(metric(s, "extraction_strength")) else "not run yet"]
        for _, prefix, models in ATTACKS:
            for k in ("forget_rouge", "forget_prob"):
                v = [metric(s, f"{prefix}{x}/{k}") for x in models]
                cells.append("not run yet" if all(math.isnan(x) for x in v) else " / ".join(map(f, v)))
        lines.append(f"| {NAMES[m]} | {lrs[m]:g} | " + " | ".join(cells) + " |")
    return [
        "One run per method (`--grid robust`): seed 42 at its chosen lr, last epoch (the saved model the attacks load); "
        "docs/evaluation.md, *Attacks that undo unlearning*.",
        "",
        "- relearning cells: the unlearned model / relearned / the retain model relearned alike, on the held-out half "
        "of the forget questions.",
        "- quantization cells: the unlearned model quantized / the target quantized / the retain model quantized "
        "alike, on the whole forget split.",
        "- privleak: 0 = like the retain model, far below 0 = the forget set still looks remembered, far above 0 = "
        "over-unlearned; ExtStr = extraction strength.",
        "",
        *lines,
        "",
        f"Rules, fixed before any robust run: a method *keeps* its forgetting under an attack when its attacked forget "
        f"Prob is at most {ATTACK_TOL} above the retain model's under the same attack; it *over-unlearns* when privleak "
        f"is above {PRIVLEAK_FAR:g}. One seed each: an observation per method, not a separated comparison.",
        "",
        "Added after the first runs: a method that does not keep it *had not forgotten* when its unlearned model was "
        "already above that bar before the attack (nothing to bring back); the top table's attack claims leave such "
        "methods out.",
        "",
        "| question | rule | our verdict | key numbers |",
        "|---|---|---|---|",
        *(f"| {q} | {rule} | **{v}** | {nums} |" for q, rule, v, nums in robust_verdicts(records, lrs)),
        "",
    ]


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
def gpu_reading(runs: list[dict]) -> list[str]:
    """One line under a split's GPU table: the methods in order of first-peak forget quality, with model
    utility beside it (RKLD Fig. 3's two axes). One seed: read beside the CPU verdicts, not as one."""
    at = [(r["peak"] or r["last"], NAMES[r["method"]]) for r in runs if (r.get("peak") or r.get("last"))
          and isinstance((r.get("peak") or r["last"]).get("forget_quality"), (int, float))]
    if len(at) < 2:
        return []
    at.sort(key=lambda x: -x[0]["forget_quality"])
    order = "; ".join(f"{n} FQ {s['forget_quality']:.3g}, MU {s.get('model_utility', float('nan')):.3f}" for s, n in at)
    return [f"First-peak epoch, highest forget quality first: {order}. One seed of one model: an observation next "
            "to the CPU verdicts above, not a verdict."]


def gpu_section(gpu: list[dict]) -> list[str]:
    """The full benchmark of the embedded model on a GPU (`--grid gpu`): one table per split, each method
    at its first-peak and last epoch, marked with the GPU and the date it ran on."""
    if not any(r.get("last") for r in gpu):
        return ["Not run yet: it needs a GPU (`python bench/reproduce.py --grid gpu` on a machine with one: every "
                "author, forget05 and forget10, up to 300 evaluation rows, RKLD, ME+GD, IDK+AP, GA+GD and NPO+GD at "
                "seed 42; `--list` estimates its GPU time)."]
    lines = []
    for split in GPU_SPLITS:
        runs = [r for r in gpu if r.get("split") == split and r.get("last")]
        if not runs:
            lines += [f"**{split}**: not run yet (it needs a GPU loan: `python bench/reproduce.py --grid gpu` runs what is "
                      "missing; `--list` estimates its GPU time).", ""]
            continue
        devices = sorted({(r.get("info") or {}).get("cuda") or "no GPU recorded" for r in runs})
        days = sorted({r["finished"][:10] for r in runs if r.get("finished")})
        missing = [NAMES[m] for m in GPU_METHODS if not any(r["method"] == m for r in runs)]
        lines += [f"**{split}** ({len(runs)} of {len(GPU_METHODS)} methods"
                  + (f", not run yet: {', '.join(missing)}" if missing else "")
                  + f"; {', '.join(devices)}; {', '.join(days)}; seed 42, lr as chosen on the CPU sweep):", "",
                  "| model | epoch | lr | " + " | ".join(c for c, _ in COLS) + " |", "|---" * (len(COLS) + 3) + "|"]
        num = lambda s, k: cell([s[k]] if isinstance(s.get(k), (int, float)) else [], "g" if k == "forget_quality" else 3)
        lines.append("| target (before unlearning) | | | " + " | ".join(num(runs[0]["before"] or {}, k) for _, k in COLS) + " |")
        for m in GPU_METHODS:
            for r in (r for r in runs if r["method"] == m):
                for label, where in ((f"first peak ({r.get('peak_epoch')})", "peak"), ("last", "last")):
                    if r.get(where):
                        lines.append(f"| {NAMES[m]} | {label} | {r['lr']:g} | " +
                                     " | ".join(num(r[where], k) for _, k in COLS) + " |")
        lines += ["", *gpu_reading(runs), ""]
    return lines


def gpu_provenance(gpu: list[dict]) -> list[str]:
    """What the GPU runs ran with, how long each took, and how a run was made where the record cannot say."""
    soft = sorted({", ".join(f"{k} {i[k]}" for k in ("torch", "transformers", "accelerate") if i.get(k))
                   for i in ((r.get("info") or {}) for r in gpu) if i})
    times = [f"{NAMES.get(r['method'], 'models' if r['method'] == 'finetune' else r['name'])} {r['split']} "
             f"{r['wall_s'] / 60:.1f} min" + (f" ({r['jobs']} runs at a time)" if (r.get("jobs") or 1) > 1 else "")
             for r in gpu if r.get("wall_s")]
    lines = [f"Software: {'; '.join(soft) or 'not recorded'}. Wall time a run: {', '.join(times) or 'not recorded'}.", ""]
    notes = {}  # runs of one sitting share a note: say it once
    for r in gpu:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(r["name"])
    return lines + [f"- {', '.join(names)}: {note}" for note, names in notes.items()]


# ----------------------------------------------------------------------------------------------
# Training throughput: the step-paired bench (bench/throughput.py; docs/throughput.md)
# ----------------------------------------------------------------------------------------------
INTERLEAVED = ("throughput_interleaved.json", "throughput_interleaved_others.json")


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval for the median of xs: the order statistics x(k), x(n+1-k) with
    k the largest for which P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None when n is too small for one."""
    n, xs = len(xs), sorted(xs)
    k = 0
    while sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n <= (1 - level) / 2:
        k += 1
    return (xs[k - 1], xs[n - k]) if k else None


def step_pairs(r: dict, steps: int) -> dict:
    """One method of a throughput file. Step k of ours and of the Trainer trained on the same batch seconds apart:
    each pair's ratio is the Trainer's CPU time over ours (ours / Trainer in speed). The side that takes a pair's
    first turn can be the slower one, and rounds alternate it: rounds 2j+1 (ours first) and 2j+2 (the Trainer
    first) rerun the same batches from the same weights, so they give one order-balanced sample per step k, the
    geometric mean of its two ratios (an AB/BA crossover; an odd last round is left out). The verdict on "at
    least 1.0" reads the 95% interval of their median: above 1.0, below it, or holding it."""
    xs = [t / o for o, t in zip(r["step_cpu_s"]["ours"], r["step_cpu_s"]["trainer"])]
    rounds = [xs[i:i + steps] for i in range(0, len(xs) - steps + 1, steps)]
    bal = [math.sqrt(a * b) for j in range(len(rounds) // 2) for a, b in zip(rounds[2 * j], rounds[2 * j + 1])]
    ci = median_ci(bal)
    return {"n": len(bal), "median": statistics.median(bal), "ci": ci, "at_least": sum(x >= 1.0 for x in bal),
            "total": sum(r["step_cpu_s"]["trainer"]) / sum(r["step_cpu_s"]["ours"]),
            "first": statistics.median([x for rd in rounds[0::2] for x in rd]),  # ours took the first turn
            "later": statistics.median([x for rd in rounds[1::2] for x in rd]),
            "ci_text": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "too few steps",
            "verdict": (verdict := "level" if not ci or ci[0] < 1.0 <= ci[1] else "faster" if ci[0] >= 1.0 else "slower"),
            "is": "level with it" if verdict == "level" else verdict}


def interleaved_files() -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in (PLOTS / n for n in INTERLEAVED) if p.exists()]


def interleaved_table(files) -> list[str]:
    """The step-paired bench of every method measured, one row each, and the verdict on the target (ours at
    least the Trainer's speed) that the rows give."""
    if not files:
        return ["Not measured yet: `python bench/throughput.py --batch 8 --steps 6 --rounds 8 --json "
                f"results/{INTERLEAVED[0]}`."]
    c = files[0][1]["config"]
    lines = ["Our `fit()` against a `transformers.Trainer` loop computing the same `step_losses` on the identical "
             "pre-collated batches in the identical order, from the same fresh weights (per-step losses compared: "
             f"they must agree to {c['rtol']:g}), quick target, batch {c['batch']}, {c['threads']} "
             f"thread{'s' * (c['threads'] != 1)}.",
             "The two sides take turns one optimizer step at a time in one process, so step k of ours and step k of "
             "the Trainer train on the same batch a few seconds apart, under the same load; the side that takes the "
             "first turn alternates between rounds.",
             "Each sample is order-balanced: for one step, the geometric mean of its CPU-time ratio in a round where "
             "ours took the first turn and in the next round, where the Trainer did (same batch, same weights); the "
             "table gives their median with its distribution-free 95% interval. Background: docs/throughput.md.", "",
             "| method | forwards a step (trained + frozen) | tokens a step | ours tok/CPU-s | Trainer tok/CPU-s | "
             "ours / Trainer, median balanced step (95% interval) | steps at least 1.0 | ours / Trainer, total CPU time | "
             "largest loss difference | ours is |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for _, t in files:
        for n, r in t["methods"].items():
            sp, f, name = step_pairs(r, t["config"]["steps"]), r["forwards_per_step"], NAMES.get(n, n)
            verdicts.setdefault(sp["verdict"], []).append((name, sp))
            lines.append(f"| {name} | {f['trained']} + {f['frozen']} | {statistics.fmean(r['tokens_per_step']):.0f} | "
                         f"{r['ours_tok_cpu_s']:.1f} | {r['trainer_tok_cpu_s']:.1f} | {sp['median']:.3f} "
                         f"({sp['ci_text']}) | {sp['at_least']} of {sp['n']} | {sp['total']:.3f} | "
                         f"{r['max_rel_loss_diff']:.1e} | {sp['is']} |")
    said = []
    if "faster" in verdicts:
        said.append(f"ours faster for {', '.join(n for n, _ in verdicts['faster'])}")
    if "level" in verdicts:
        los = [sp["ci"][0] for _, sp in verdicts["level"] if sp["ci"]]
        his = [sp["ci"][1] for _, sp in verdicts["level"] if sp["ci"]]
        said.append(f"ours level with the Trainer, neither shown faster nor slower, for "
                    f"{', '.join(n for n, _ in verdicts['level'])}"
                    + (f": the 95% interval of each median step ratio holds 1.0, all of them within "
                       f"{min(los):.3f}-{max(his):.3f}" if los else ""))
    if "slower" in verdicts:
        said.append(f"ours slower for {', '.join(n for n, _ in verdicts['slower'])}, whose whole interval is below 1.0")
    return lines + ["", "The target is ours at least the Trainer's speed. Judged on these step pairs: " + "; ".join(said) + "."]


def interleaved_lines(path: Path, t: dict) -> list[str]:
    """The command behind one throughput file, where it ran, and its pairs split by which side took the first turn."""
    c = t["config"]
    cmd = (f"`python bench/throughput.py --batch {c['batch']} --steps {c['steps']} --rounds {c['rounds']} "
           f"--methods {c['methods']} --json results/{path.name}`")
    parts = [f"{NAMES.get(n, n)} {sp['first']:.3f} when ours took the first turn, {sp['later']:.3f} when the Trainer did"
             for n, r in t["methods"].items() for sp in [step_pairs(r, c["steps"])]]
    return [f"- {', '.join(NAMES.get(n, n) for n in t['methods'])}: {cmd}, {c['rounds']} rounds of {c['steps']} "
            f"timed steps after {c['warmup']}, commit {str(c.get('git_commit'))[:10]}, {c.get('platform')}, load "
            f"average {c['load_before'][0]:.1f} before. Median step ratio by who took the first turn: "
            + "; ".join(parts) + "."]


# ----------------------------------------------------------------------------------------------
# Provenance (results/commands.md)
# ----------------------------------------------------------------------------------------------
START_TOL = 1e-3  # what separates two starting models' evaluations; float noise (thread counts) is ~1e-5


def starts_line(records) -> str:
    """Whether every sweep, seeds and shared run started from the same quick target, read off their "before"
    evaluations: run folders do not outlive a machine, so a later sitting rebuilds the target, and a rebuild
    that differed would mix runs of two targets in one table. Evaluations within START_TOL on each of the
    keys count as one start (the sweep's own records differ by ~6e-6 in MU between one and two threads)."""
    runs = [r for r in records if r["grid"] in METHOD_GRIDS and r.get("before")]
    keys = ("forget_quality", "model_utility", "forget_rouge", "retain_rouge")
    groups: list[tuple[dict, list[str]]] = []
    worst = 0.0
    for r in runs:
        b = r["before"]
        for first, names in groups:
            gap = max(abs(b.get(k, 0) - first.get(k, 0)) for k in keys)
            if gap <= START_TOL:
                names.append(r["name"])
                worst = max(worst, gap)
                break
        else:
            groups.append((b, [r["name"]]))
    if len(groups) <= 1:
        b = groups[0][0] if groups else {}
        return (f"Every sweep, seeds and shared run ({len(runs)}) started from the same quick target: its evaluation before "
                f"unlearning agrees in all of them (FQ {b.get('forget_quality', float('nan')):.4g}, MU "
                f"{b.get('model_utility', float('nan')):.4g}; largest difference {worst:.1g}, float-level noise"
                f"); a sitting on a new machine rebuilds the target, which `finetune.py` does deterministically "
                f"on CPU.")
    parts = "; ".join(f"FQ {b['forget_quality']:.4g}, MU {b['model_utility']:.4g}: {len(v)} runs "
                      f"({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for b, v in groups)
    return f"**Warning: the runs started from {len(groups)} different quick targets** ({parts}); compare within a group."


def command_line(cmd: list[str]) -> str:
    """A recorded command as one would type it in the repository root (python, paths relative to the checkout
    the run was made in, whichever that was)."""
    cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
    cmd = ["python", *cmd] if cmd[0].endswith(".py") else cmd  # recorded without the interpreter
    out = ["python" if i == 0 and Path(c).name.startswith("python") else c for i, c in enumerate(cmd)]
    return " ".join(re.sub(r"^/\S*?/(?=runs/)", "", x.replace(str(REPO) + "/", "")) for x in out)


def render_commands(records, gpu, files) -> str:
    trained = [r for r in records if r.get("wall_s")]  # the CPU machine's runs; the GPU's are counted apart
    hours = sum(r["wall_s"] for r in trained) / 3600
    machine = sum(r["wall_s"] / max(1, r.get("jobs") or 1) for r in trained) / 3600
    gpu_min = sum(r["wall_s"] for r in gpu if r.get("wall_s")) / 60
    gpu_own = sum(r["wall_s"] / max(1, r.get("jobs") or 1) for r in gpu if r.get("wall_s")) / 60  # shared: a share
    infos = [r["info"] for r in [*records, *gpu] if r.get("info")]
    commits = sorted({(i.get("git_commit") or "unknown")[:10]  # a run from a tree with changes says which files
                      + (f" with uncommitted changes to {', '.join(i['git_dirty'])}" if i.get("git_dirty") else "")
                      for i in infos})
    hw = sorted({f"{i.get('platform')}, {i.get('cpu_count')} CPUs" + (f", {i['cuda']}" if i.get("cuda") else "")
                 for i in infos})
    ver = sorted({f"torch {i.get('torch')}, transformers {i.get('transformers')}, accelerate {i.get('accelerate')}, "
                  f"Python {i.get('python')}" for i in infos})
    counts = {g: sum(r["grid"] == g for r in [*records, *gpu]) for g in (*GRIDS, "gpu")}
    return "\n".join([
        "# How the results in RESULTS.md were made",
        "",
        "Generated with RESULTS.md by `python bench/reproduce.py --report_only` from `results/results.json`. Do not "
        "edit by hand.",
        "",
        "## Runs and compute",
        "",
        f"Runs recorded: {len(records) + len(gpu)} ({', '.join(f'{g} {n}' for g, n in counts.items())}); "
        f"compute: {hours:.1f} h of run wall time on the CPU, about {machine:.1f} h of that machine (runs two at a "
        "time count half), for the runs timed there"
        + (f"; {gpu_min:.1f} min of GPU run wall time, about {gpu_own:.1f} min of the GPU (runs that shared it "
           "count their share)" if gpu_min else "") + ".",
        "",
        starts_line(records),
        "",
        "## Hardware, versions, commits",
        "",
        *(f"- {h}" for h in hw), *(f"- {v}" for v in ver),
        f"- git commits of the runs: {', '.join(commits) or 'none yet'}",
        "",
        "## GPU runs",
        "",
        *(gpu_provenance(gpu) if gpu else ["None yet."]),
        "",
        "## Training throughput",
        "",
        *([x for p, t in files for x in interleaved_lines(p, t)] or ["Not measured yet."]),
        "",
        "## Commands",
        "",
        "Each run's exact command (also in `results/results.json`, `command`); the grids are defined in "
        "`bench/grids.py` and run by `bench/reproduce.py`, from the repository root.",
        "",
        *(f"- `{r['name']}`: `{command_line(r['command'])}`" for r in [*records, *gpu] if r.get("command")),
        "",
    ])


# ----------------------------------------------------------------------------------------------
# RESULTS.md
# ----------------------------------------------------------------------------------------------
def render(records, lrs, made, claims, gpu=(), files=()) -> str:
    start = starts_line(records)
    settle = (
        "What would settle an inconclusive claim: " + (
            "every method has three seeds at its chosen lr (the `seeds` grid), so more seeds at those rates "
            "would only narrow the spread; " if all(len(runs_at(records, m, lrs[m])) >= 3 for m in METHODS
                                                   if lrs[m]) and all(lrs.values()) else
            "three seeds per method at its chosen lr (the `seeds` grid); ") + "the Closer-Look pairs are also compared "
        "at one shared lr, as Table 4 trains them (the `shared` grid).",
        "For the size of the effect: the papers' setting (a 7B target on all 200 authors, forget05/10, 300 evaluation "
        "rows), which needs GPUs (README, *On GPUs*), and the continual sequences at " + (
            f"the paper's lr and more seeds (one seed each here, at {CONTINUAL_LR:g} and "
            f"{CONTINUAL_LOW_LR:g}: {CONTINUAL_LR / 1e-5:.0f}x and {CONTINUAL_LOW_LR / 1e-5:.0f}x "
            "the paper's lr)." if continual_rows(records, CONTINUAL_LOW_LR) else
            f"a lower lr and more seeds (one seed each here, at {CONTINUAL_LR / 1e-5:.0f}x the paper's lr)."))
    parts = [
        "# Results: the papers' claims on our own runs",
        "",
        "Generated from `results/results.json` by `python bench/reproduce.py --report_only` (`python "
        "bench/reproduce.py` first runs what is missing). Do not edit by hand. How each run was made (commands, "
        f"commits, hardware, compute): [results/{COMMANDS}](results/{COMMANDS}).",
        "",
        *([start, ""] if start.startswith("**Warning") else []),
        "- **Ours:** SmolLM2-135M-Instruct fine-tuned on 6 TOFU authors (the quick target), unlearning forget01 "
        "(2 authors, 40 questions) on CPU with lr 1e-4-scale recipes, batch 8, 5 epochs; evaluated on the whole "
        "forget split and the first 20 rows of retain, real authors and world facts (a GPU table near the end runs "
        "the same model on all 200 authors).",
        "- **The papers:** Llama-2-7B fine-tuned on all 200 authors, lr 1e-5, batch 32, up to 300 evaluation rows "
        "per split.",
        "- **So:** read each verdict as *does the direction hold at small scale*, not as a replication: forget "
        "quality over 40 rows moves in coarse steps (a KS test of 40 against 40 values), and model utility over 20 "
        "rows per split is noisy.",
        "",
        "## The papers' claims",
        "",
        "Verdict rule: a comparison is *separated* when the means over seeds differ by more than the sum of "
        "their standard deviations (forget quality as log10); one seed on either side is at best "
        f"*inconclusive* and the direction seen is given. Model utility counts as comparable within {MU_TOL}.",
        "RKLD's claims use each run's first-peak epoch (the RKLD paper's protocol), Closer-Look's the last epoch "
        "(as that paper reports). FQ = forget quality, MU = model utility, FE = forget efficacy.",
        "",
        "| claim | paper's numbers (Llama-2-7B) | our verdict | key numbers |",
        "|---|---|---|---|",
        *(f"| {label} | {paper} | **{v}** | {nums} |" for label, _, paper, v, _, nums in claims),
        "",
        "## Plots",
        "",
        *(f"![{m}](results/{m})" for m in made),
        *([] if made else ["(matplotlib is not installed: `pip install matplotlib`, then rerun with --report_only)"]),
        "",
        "## The claims in detail",
        "",
    ]
    for _, title, _, v, lines, _ in claims:
        parts += [f"**{title}: {v}.**", "", *bullets(lines), ""]
    parts += [
        *settle,
        "",
        "## Learning-rate sweep (seed 42, last epoch: forget quality / model utility)",
        "",
        f"Chosen lr per method: {grids.LR_RULE}.",
        *grids.LR_RULE_HISTORY,
        "",
        sweep_table(records, lrs),
        "",
        "## Main table at the first-peak epoch (RKLD protocol)",
        "",
        "Mean ± standard deviation over seeds at each method's chosen lr.",
        "",
        "- FQ = forget quality, MU = model utility (TOFU).",
        "- FE w/o ES = Closer-Look's forget efficacy without its entailment term: its NLI model is on the hub, out of "
        "reach offline, so FE and MU-18 themselves are not computed; its CS model is replaced offline by "
        "all-MiniLM-L6-v2, so even this part is not the paper's number.",
        "- top-5 leak = share of forget-answer tokens ranked in the model's top 5 (teacher-forced).",
        *(["- privleak, ExtStr (extraction strength), ExactMem (exact memorization): evaluation/privacy.py "
           "(docs/evaluation.md); 'not run' for runs evaluated without --privacy."]
          if any(isinstance((r.get(w) or {}).get("privleak"), float) for r in records for w in ("peak", "last")) else []),
        "",
        main_table(records, lrs, "peak"),
        "",
        "## Main table at the last epoch",
        "",
        main_table(records, lrs, "last"),
        "",
        "## Robustness: relearning, quantization and privacy (`--grid robust`)",
        "",
        *robust_section(records, lrs),
        "## On a GPU: the full benchmark of the embedded model",
        "",
        *gpu_section(list(gpu)),
        "## Training throughput (`bench/throughput.py`)",
        "",
        *interleaved_table(files),
        "",
    ]
    return "\n".join(parts)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None):
    everything = derive(grids.load_results())
    gpu = [r for r in everything if r["grid"] == "gpu"]
    records = [r for r in everything if r["grid"] != "gpu"]  # the CPU quick path: the claims, tables, plots
    PLOTS.mkdir(exist_ok=True)
    lrs = chosen(records)
    made = plots(records, lrs)
    claims = claims_of(records, lrs)
    files = interleaved_files()
    write(OUT, render(records, lrs, made, claims, gpu, files))
    write(PLOTS / COMMANDS, render_commands(records, gpu, files))
    print(f"[report] wrote {OUT}, {PLOTS / COMMANDS} and {len(made)} plots from {len(records)} CPU runs"
          + (f" and {len(gpu)} GPU runs" if gpu else ""), flush=True)
    for _, title, _, v, _, _ in claims:
        print(f"[report] {v:>14}: {title}")


if __name__ == "__main__":
    main(sys.argv[1:])
