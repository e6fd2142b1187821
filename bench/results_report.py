"""Write RESULTS.md and its plots (results/*.png) from results/results.json, the file that
bench/reproduce.py fills run by run. Every number and verdict below comes from that file; rerun
`python bench/reproduce.py --report_only` after editing this script.

Verdict rule (written down before the runs): a comparison of two methods is *separated* when
their means over seeds differ by more than the sum of their standard deviations (forget quality
compared as log10); with fewer than two seeds on either side it is at best *inconclusive*, and
the direction seen is reported. Model utility counts as comparable within 0.05.
"""
from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reproduce  # noqa: E402

OUT = REPO / "RESULTS.md"
PLOTS = REPO / "results"
NAMES = {"rkld": "RKLD", "rkld_fkl": "RKLD with FKL", "me_gd": "ME+GD", "idk_ap": "IDK+AP", "ga_gd": "GA+GD",
         "npo_gd": "NPO+GD", "idk_gd": "IDK+GD", "ga": "GA", "npo": "NPO", "dpo": "DPO", "kto": "KTO", "idk": "IDK"}
COLS = [("FQ", "forget_quality"), ("MU", "model_utility"), ("FE w/o ES", "fe_wo_es"),
        ("forget ROUGE-L", "forget_rouge"), ("forget Prob", "forget_prob"), ("retain ROUGE-L", "retain_rouge"),
        ("retain Prob", "retain_prob"), ("top-5 leak", "forget_leak_top5")]
PAPER_COLS = [("FE", "fe"), ("MU-18", "mu18")]  # shown when a run had Closer-Look's NLI model (hub access)
FE = "fe_wo_es"
MU_TOL = 0.05


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
    return [r for r in records if r["method"] == method and r["lr"] == lr and r["grid"] in reproduce.METHOD_GRIDS]


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
    return {m: reproduce.chosen_lr(m, records) for m in reproduce.METHODS}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def sweep_table(records, lrs):
    lines = ["| method | " + " | ".join(f"lr {lr:g}: FQ / MU" for lr in reproduce.SWEEP_LRS) + " | chosen lr |",
             "|---" * (len(reproduce.SWEEP_LRS) + 2) + "|"]
    for m in reproduce.METHODS:
        cells = []
        for lr in reproduce.SWEEP_LRS:
            r = next((r for r in records if r["grid"] == "sweep" and r["method"] == m and r["lr"] == lr), None)
            cells.append(f"{r['last']['forget_quality']:.3g} / {r['last']['model_utility']:.3f}" if r else "not run")
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {lrs[m]:g} |" if lrs[m] else
                     f"| {NAMES[m]} | " + " | ".join(cells) + " | sweep incomplete |")
    return "\n".join(lines)


def main_table(records, lrs, where):
    cols = COLS + [c for c in PAPER_COLS if any(isinstance((r.get(where) or {}).get(c[1]), float) for r in records)]
    head = "| model | lr | seeds | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|---" * (len(cols) + 3) + "|"]
    before = [r["before"] for r in records if r.get("before")][:1]
    retain = next((r["last"] for r in records if r["name"] == "retain-model" and r.get("last")), None)
    teacher = next((r["teacher"] for r in records if r.get("teacher")), None)
    for name, s in (("target (before unlearning)", before[0] if before else None), ("retain model", retain),
                    ("RKLD's unlearning teacher alone", teacher)):
        if s:
            lines.append(f"| {name} | | | " + " | ".join(cell([s[k]] if isinstance(s.get(k), (int, float)) else [],
                                                              "g" if k == "forget_quality" else 3)
                                                         for _, k in cols) + " |")
    for m in reproduce.METHODS:
        lr = lrs[m] or reproduce.SWEEP_LRS[0]
        runs = runs_at(records, m, lr)
        if not runs:
            continue
        tag = "" if lrs[m] else " (sweep incomplete: quick-recipe lr)"
        if not any(r.get(where) for r in runs):  # a run recorded before its peak row was evaluated
            lines.append(f"| {NAMES[m]}{tag} | {lr:g} | 0 | " + " | ".join("not evaluated" for _ in cols) + " |")
            continue
        runs = [r for r in runs if r.get(where)]
        lines.append(f"| {NAMES[m]}{tag} | {lr:g} | {len(runs)} | " + " | ".join(
            cell(values(runs, k, where), "g" if k == "forget_quality" else 3) for _, k in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------
def verdict_pairs(results, supports, contradicts):
    """reproduced when every comparison supports the claim with separated seeds, not reproduced when
    any separated comparison contradicts it, inconclusive otherwise."""
    if any(contradicts(r) for r in results):
        return "not reproduced"
    if results and all(supports(r) for r in results):
        return "reproduced"
    return "inconclusive"


def claim_rkld_vs_baselines(records, lrs):
    rk = runs_at(records, "rkld", lrs["rkld"] or reproduce.SWEEP_LRS[0])
    rows, res = [], []
    for b in ("ga", "npo", "dpo", "kto", "idk"):
        br = runs_at(records, b, lrs[b] or reproduce.SWEEP_LRS[0])
        if not br or not rk:
            res.append(("missing", 0.0))
            rows.append(f"{NAMES[b]}: not run yet")
            continue
        fq = compare([log_fq(v) for v in values(rk, "forget_quality", "peak")],
                     [log_fq(v) for v in values(br, "forget_quality", "peak")])
        mu_gap = (mean_sd(values(rk, "model_utility", "peak"))[0] or 0) - (mean_sd(values(br, "model_utility", "peak"))[0] or 0)
        res.append((fq, mu_gap))
        rows.append(f"{NAMES[b]}: FQ {cell(values(br, 'forget_quality', 'peak'), 'g')}, MU "
                    f"{cell(values(br, 'model_utility', 'peak'))} (RKLD's FQ {fq}, MU gap {mu_gap:+.3f})")
    v = verdict_pairs(res, lambda r: r[0] == "higher" and r[1] >= -MU_TOL, lambda r: r[0] == "lower")
    head = f"RKLD: FQ {cell(values(rk, 'forget_quality', 'peak'), 'g')}, MU {cell(values(rk, 'model_utility', 'peak'))}"
    return v, [head, *rows]


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
    lr = reproduce.chosen_lr("rkld", records) or reproduce.SWEEP_LRS[0]
    rk = [p for p in pairs if p[0] == lr]
    fq = compare([log_fq(p[2]) for p in rk], [log_fq(p[3]) for p in rk])
    v = {"higher": "reproduced", "lower": "not reproduced"}.get(fq, "inconclusive")
    rows = [f"lr {p[0]:g}, seed {p[1]}: RKL FQ {p[2]:.3g} (MU {p[4]:.3f}) vs FKL FQ {p[3]:.3g} (MU {p[5]:.3f})"
            for p in sorted(pairs)]
    return v, [f"at the chosen lr {lr:g} ({len(rk)} seed{'s' * (len(rk) != 1)}): RKL FQ "
               f"{cell([p[2] for p in rk], 'g')} vs FKL FQ {cell([p[3] for p in rk], 'g')}: RKL's FQ {fq}",
               f"every paired run (same teacher, lr and seed): RKL higher in {wins} of {len(pairs)}, lower in {losses}",
               *rows,
               f"verdict rule: the other claims' (seeds at the chosen lr), since 2026-12-03; as first written it "
               f"needed RKL higher in every paired run at every swept lr, which reads {first} here"]


def claim_teacher(records, lrs):
    t = next((r for r in records if r.get("teacher")), None)
    rk = runs_at(records, "rkld", lrs["rkld"] or reproduce.SWEEP_LRS[0])
    if not t or not rk:
        return "inconclusive", ["not run yet"]
    s, fq, mu = t["teacher"], mean_sd(values(rk, "forget_quality", "peak"))[0], mean_sd(values(rk, "model_utility", "peak"))[0]
    poor = s["model_utility"] < mu - MU_TOL or log_fq(s["forget_quality"]) < log_fq(fq) - 1
    good = s["model_utility"] >= mu and s["forget_quality"] >= fq
    v = "reproduced" if poor else "not reproduced" if good else "inconclusive"
    return v, [f"teacher alone: FQ {s['forget_quality']:.3g}, MU {s['model_utility']:.3f}, forget ROUGE-L "
               f"{s['forget_rouge']:.3f}, retain ROUGE-L {s['retain_rouge']:.3f}",
               f"RKLD student at its first-peak epoch: FQ {fq:.3g}, MU {mu:.3f} (one teacher: seed 42)"]


def keeps_utility(g, b):
    """(verdict, MU comparison, FE comparison) of good's runs against bad's: reproduced when good's MU is
    higher (seeds separated) and its FE w/o ES not lower by more than MU_TOL (a utility win bought with
    forgetting less is not the claim), not reproduced when its MU is lower, inconclusive otherwise."""
    mu, fe = compare(values(g, "model_utility"), values(b, "model_utility")), compare(values(g, FE), values(b, FE))
    fe_gap = (mean_sd(values(g, FE))[0] or 0) - (mean_sd(values(b, FE))[0] or 0)
    v = ("reproduced" if mu == "higher" and fe_gap >= -MU_TOL else "not reproduced" if mu == "lower" else "inconclusive")
    return v, mu, fe


def claim_keeps_utility(records, lrs, good, bad):
    """The declared verdict, at each method's chosen lr, then the same verdict at reproduce.SHARED_LR (Closer-Look
    Table 4's protocol: one lr for every method) once both methods have two seeds or more there."""
    g = runs_at(records, good, lrs[good] or reproduce.SWEEP_LRS[0])
    b = runs_at(records, bad, lrs[bad] or reproduce.SWEEP_LRS[0])
    v, mu, fe = keeps_utility(g, b)
    target = next((r["before"]["model_utility"] for r in records if r.get("before")), float("nan"))
    seeds = lambda r: f"{len(r)} seed{'s' if len(r) != 1 else ''}"
    desc = lambda x, r, lr: (f"{NAMES[x]}: not run yet" if not r else
                             f"{NAMES[x]} (lr {lr:g}, {seeds(r)}, last epoch): MU {cell(values(r, 'model_utility'))} "
                             f"({(mean_sd(values(r, 'model_utility'))[0] or 0) / target:.0%} of the target's "
                             f"{target:.3f}), FE w/o ES {cell(values(r, FE))}")
    lines = [desc(x, r, lrs[x] or reproduce.SWEEP_LRS[0]) for x, r in ((good, g), (bad, b))]
    lines += [f"{NAMES[good]} vs {NAMES[bad]}: MU {mu}, FE w/o ES {fe}"]
    lr = reproduce.SHARED_LR
    gs, bs = runs_at(records, good, lr), runs_at(records, bad, lr)
    if len(gs) >= 2 and len(bs) >= 2:
        vs, mus, fes = keeps_utility(gs, bs)
        v = f"{v} at each method's chosen lr; {vs} at one shared lr, {lr:g} (Table 4's protocol)"
        lines += [f"at one shared lr {lr:g}, the verdict's second half (`--grid shared`, chosen after the seed-42 "
                  f"sweep: see SHARED in bench/reproduce.py): " + "; ".join(desc(x, r, lr) for x, r in ((good, gs), (bad, bs)))
                  + f"; MU {mus}, FE w/o ES {fes}"]
    else:
        lines += [f"at one shared lr {lr:g} (Table 4's protocol): seeds 1 and 2 not all run yet (`--grid shared`)"]
    return v, lines + shared_lr_lines(records, good, bad)


def shared_lr_lines(records, good, bad) -> list[str]:
    """The two methods at each swept lr (seed 42, last epoch): Closer-Look Table 4 trains every method at one
    lr (1e-5), where the verdict above takes each method's own chosen lr."""
    out = []
    for lr in sorted(reproduce.SWEEP_LRS, reverse=True):
        pair = [next((r["last"] for r in records if r["grid"] == "sweep" and r["method"] == m and r["lr"] == lr
                      and r.get("last")), None) for m in (good, bad)]
        if all(pair):
            out.append(f"lr {lr:g}: " + " vs ".join(
                f"{NAMES[m]} MU {x['model_utility']:.3f}, FE w/o ES {metric(x, FE):.3f}"
                for m, x in zip((good, bad), pair)))
    head = "at one shared lr (Closer-Look Table 4 trains every method at one lr, 1e-5; seed 42, last epoch):"
    return [head + " " + "; ".join(out)] if out else []


DECLINE = 0.8  # a continual run declines when its lowest MU is below this share of the start's
CONTINUAL_LR = 1e-4  # scripts/continual.py on the quick path: each method script's QUICK recipe


def continual_rows(records, lr=None):
    """method -> its sequence's evaluations by task, at the quick recipe's lr (None) or at `lr`."""
    return {r["method"]: r["tasks"] for r in records
            if r["grid"] == "continual" and r.get("tasks") and r.get("lr") == lr}


def claim_continual(records):
    """Closer-Look Fig. 6 on our sequences: a method "declines" when its lowest MU over tasks 1..N falls below
    80% of the starting model's (the paper: the baselines' MU "nearly zero on a certain subtask", at any task,
    not only the last), and "keeps" it otherwise. Reproduced: ME+GD and IDK+AP keep and GA+GD and NPO+GD
    decline; not reproduced: ME+GD or IDK+AP declines, or neither baseline does; else inconclusive. The same
    rule again, as the verdict's second half, on the sequences at reproduce.CONTINUAL_LOW_LR once any ran."""
    v, lines = continual_verdict(continual_rows(records))
    lines.append(f"one sequence per method (seed 42), tasks 1-{reproduce.CONTINUAL_TASKS} of forget01's 10, lr "
                 f"{CONTINUAL_LR:g} for every method (the quick recipe: Closer-Look §5.2 also trains every method at "
                 "one lr, 1e-5), ME+GD with alpha 1.0 (Closer-Look §5.2)")
    lr = reproduce.CONTINUAL_LOW_LR
    low = continual_rows(records, lr)
    if not low:
        return v, lines + [f"at one lower lr, {lr:g}, for every method: not run yet (`--grid continual`)"]
    v_low, low_lines = continual_verdict(low)
    return (f"{v} at lr {CONTINUAL_LR:g}; {v_low} at lr {lr:g}",
            lines + [f"at one lower lr, {lr:g}, for every method (`--grid continual`, added after the runs at "
                     f"{CONTINUAL_LR:g}: see CONTINUAL_LOW_LR in bench/reproduce.py), the verdict's second half: "
                     + "; ".join(low_lines)])


def continual_verdict(c):
    """(verdict, lines) of claim_continual's rule on one set of sequences (method -> evaluations by task)."""
    ran = [m for m in reproduce.CONTINUAL if m in c]
    missing = [NAMES[m] for m in reproduce.CONTINUAL if m not in c]
    if not ran:
        return "inconclusive", [f"not run yet: {', '.join(missing)}"]
    tasks = [str(k) for k in range(1, reproduce.CONTINUAL_TASKS + 1)]
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
        "of them at 0 sets it to 0): " + "; ".join(
            f"{NAMES[m]} retain {metric(c[m].get(last), 'retain_rouge'):.3f}, real authors "
            f"{metric(c[m].get(last), 'real_authors_rouge'):.3f}, world facts {metric(c[m].get(last), 'world_facts_rouge'):.3f}, "
            f"forget {metric(c[m].get(last), 'forget_rouge'):.3f}" for m in ran)] + (
        [f"not run yet: {', '.join(missing)}"] if missing else [])


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
    for i, m in enumerate(reproduce.METHODS):
        runs = [r for r in records if r["method"] == m and r["grid"] in reproduce.METHOD_GRIDS and r.get("peak")]
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
    for m in reproduce.CURVES:
        lr = lrs[m] or reproduce.SWEEP_LRS[0]
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
    sets = [(lr, continual_rows(records, lr)) for lr in (None, reproduce.CONTINUAL_LOW_LR)]
    if sets[0][1]:  # solid: the quick recipe's lr; dashed, same colour: the lower lr
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for lr, c in sets:
            for m, tasks in c.items():
                ks = sorted((int(k) for k, s in tasks.items() if s), key=int)
                style = dict(marker="o", color=plt.cm.tab10(reproduce.CONTINUAL.index(m)), linestyle="-" if lr is None
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


def paper_lines() -> dict[str, str]:
    """The papers' own numbers for each claim (forget01, Llama-2-7B), from results/paper_numbers.json, which
    quotes each table with its line in ../shared/papers/. Keys are the claims' short names."""
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
    quote = lambda q: f"\"{q['quote']}\" (line {q['line']})"
    return {
        "rkld": f"paper, forget01 FQ / MU (RKLD Table 4, Llama-2-7B): {rk}",
        "fkl": f"paper, FQ at the first-peak epoch (RKLD Table 2): {fkl}",
        "teacher": "paper: no numbers; " + quote(p["rkld_teacher"]["quotes"][0]),
        "me_gd": f"paper, forget01 MU / FE (Closer-Look Table 4): {mufe('ME+GD(Ours)')}, {mufe('GA+GD')}",
        "idk_ap": f"paper, forget01 MU / FE (Closer-Look Table 4): {mufe('IDK+AP(Ours)')}, {mufe('IDK+GD')}",
        "continual": "paper: no per-task numbers (Fig. 6 only); " + quote(p["closer_look_continual"]["quotes"][0]),
    }


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
                "seed 42; on one H200, 2026-12-04: 3.6 min for forget05's models, RKLD 5.2 min, ME+GD 2.3 min)."]
    lines = []
    for split in reproduce.GPU_SPLITS:
        runs = [r for r in gpu if r.get("split") == split and r.get("last")]
        if not runs:
            lines += [f"**{split}**: not run yet (it needs a GPU loan: `python bench/reproduce.py --grid gpu` runs what is "
                      "missing; `--list` estimates its GPU time).", ""]
            continue
        devices = sorted({(r.get("info") or {}).get("cuda") or "no GPU recorded" for r in runs})
        days = sorted({r["finished"][:10] for r in runs if r.get("finished")})
        missing = [NAMES[m] for m in reproduce.GPU_METHODS if not any(r["method"] == m for r in runs)]
        lines += [f"**{split}** ({len(runs)} of {len(reproduce.GPU_METHODS)} methods"
                  + (f", not run yet: {', '.join(missing)}" if missing else "")
                  + f"; {', '.join(devices)}; {', '.join(days)}; seed 42, lr as chosen on the CPU sweep):", "",
                  "| model | epoch | lr | " + " | ".join(c for c, _ in COLS) + " |", "|---" * (len(COLS) + 3) + "|"]
        num = lambda s, k: cell([s[k]] if isinstance(s.get(k), (int, float)) else [], "g" if k == "forget_quality" else 3)
        lines.append("| target (before unlearning) | | | " + " | ".join(num(runs[0]["before"] or {}, k) for _, k in COLS) + " |")
        for m in reproduce.GPU_METHODS:
            for r in (r for r in runs if r["method"] == m):
                for label, where in ((f"first peak ({r.get('peak_epoch')})", "peak"), ("last", "last")):
                    if r.get(where):
                        lines.append(f"| {NAMES[m]} | {label} | {r['lr']:g} | " +
                                     " | ".join(num(r[where], k) for _, k in COLS) + " |")
        lines += ["", *gpu_reading(runs), ""]
    soft = sorted({", ".join(f"{k} {i[k]}" for k in ("torch", "transformers", "accelerate") if i.get(k))
                   for i in ((r.get("info") or {}) for r in gpu) if i})
    times = [f"{NAMES.get(r['method'], 'models' if r['method'] == 'finetune' else r['name'])} {r['split']} "
             f"{r['wall_s'] / 60:.1f} min" + (f" ({r['jobs']} runs at a time)" if (r.get("jobs") or 1) > 1 else "")
             for r in gpu if r.get("wall_s")]
    lines += [f"Software: {'; '.join(soft) or 'not recorded'}. Wall time a run: {', '.join(times) or 'not recorded'}.", ""]
    notes = {}  # how a run was made, where the record cannot say; runs of one sitting share a note: say it once
    for r in gpu:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(r["name"])
    lines += [f"- {', '.join(names)}: {note}" for note, names in notes.items()]
    return lines + ([""] if notes else [])


def main(argv=None):
    everything = derive(reproduce.load_results())
    gpu = [r for r in everything if r["grid"] == "gpu"]
    records = [r for r in everything if r["grid"] != "gpu"]  # the CPU quick path: the claims, tables, plots
    PLOTS.mkdir(exist_ok=True)
    lrs = chosen(records)
    made = plots(records, lrs)
    paper = paper_lines()
    claims = [
        ("rkld", "RKLD reaches higher forget quality than GA, NPO, DPO, KTO and IDK at comparable model utility "
         "(RKLD Table 4 / Fig. 3; first-peak epoch)", claim_rkld_vs_baselines(records, lrs)),
        ("fkl", "RKL beats FKL in forget quality with the same teacher (RKLD Table 2; first-peak epoch)",
         claim_rkl_vs_fkl(records)),
        ("teacher", "The unlearning teacher alone is a poor unlearned model (RKLD §3.2)", claim_teacher(records, lrs)),
        ("me_gd", "ME+GD keeps model utility where GA+GD collapses (Closer-Look Table 4; last epoch)",
         claim_keeps_utility(records, lrs, "me_gd", "ga_gd")),
        ("idk_ap", "IDK+AP keeps utility where IDK+GD does not (Closer-Look Table 4; last epoch)",
         claim_keeps_utility(records, lrs, "idk_ap", "idk_gd")),
        ("continual", "Continual: ME+GD and IDK+AP keep MU over tasks where GA+GD and NPO+GD decline "
         "(Closer-Look Fig. 6)", claim_continual(records)),
    ]
    claims = [(title, (v, lines + ([paper[key]] if key in paper else []))) for key, title, (v, lines) in claims]
    text = render(records, lrs, made, claims, gpu)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"[report] wrote {OUT} and {len(made)} plots from {len(records)} CPU runs"
          + (f" and {len(gpu)} GPU runs" if gpu else ""), flush=True)
    for title, (v, _) in claims:
        print(f"[report] {v:>14}: {title}")


def throughput_verdict(t: dict) -> str:
    """Whether ours is at least the Trainer's speed, judged on each round's paired CPU-time ratio (the two
    sides of a round ran back to back, under the same load), and what the machine was doing."""
    c, ms = t["config"], t["methods"]
    spread = [max(v) / min(v) - 1 for r in ms.values() for v in (r["ours_rounds_tok_s"], r["trainer_rounds_tok_s"])]
    where = (f"cores {', '.join(map(str, c['cores_allowed']))} of {c.get('cpu_count')}, load average "
             f"{c['load_before'][0]:.1f} before and {c['load_after'][0]:.1f} after" if "cores_allowed" in c
             else "the cores it ran on were not recorded")
    noise = (f"The measurement ran on {where}; the same side of the same method varied by {min(spread):.0%} to "
             f"{max(spread):.0%} between rounds (wall time, max/min - 1).")
    if not all("ratio_cpu_rounds" in r for r in ms.values()):
        low = [NAMES.get(n, n) for n, r in ms.items() if r.get("ratio_cpu", r["ratio"]) < 1.0]
        return (f"Below 1.0 (median, CPU time): {', '.join(low) or 'none'}; this file predates per-round ratios, "
                f"so the ratios are not separated from the noise. {noise}")
    above = [NAMES.get(n, n) for n, r in ms.items() if min(r["ratio_cpu_rounds"]) >= 1.0]
    below = [NAMES.get(n, n) for n, r in ms.items() if max(r["ratio_cpu_rounds"]) < 1.0]
    mixed = [NAMES.get(n, n) for n, r in ms.items() if NAMES.get(n, n) not in above + below]
    parts = [f"at least 1.0 in every round: {', '.join(above)}" if above else "",
             f"below 1.0 in every round: {', '.join(below)}" if below else "",
             f"on both sides of 1.0 across rounds, so not separated from 1.0: {', '.join(mixed)}" if mixed else ""]
    pooled = [x for r in ms.values() for x in r["ratio_cpu_rounds"]]
    return ("Ours / Trainer per round (CPU time): " + "; ".join(p for p in parts if p) + f". Over every method's "
            f"rounds the median paired ratio is {statistics.median(pooled):.3f} ({sum(x >= 1.0 for x in pooled)} of "
            f"{len(pooled)} at least 1.0). Both sides run the same step function on the same batches. " + noise)


THROUGHPUT_FINDINGS = (
    "What the measurements found (2026-12-03, nothing else running): the first measurement that day had our loop "
    "below the Trainer's in every round for RKLD (CPU-time ratios 0.913-0.982). One difference between the "
    "sides was found and removed: `transformers.Trainer` turns `config.use_cache` off for training and our scripts "
    "did not, so every training forward built a KV cache it never read (`common.no_kv_cache`, commit 892e2d0; "
    "caught by tests/test_common.py "
    "`test_training_and_scoring_forwards_build_no_kv_cache_while_decoding_and_saving_keep_it`). It did not "
    "measurably close the gap (RKLD 0.929-0.974 after it; the KV cache of this model, 3 key-value heads, is "
    "small), and the per-step losses of the two sides were identical before it too, so no recorded run "
    "changes. The table above was measured after it. cProfile of both sides on RKLD (2 rounds, identical batches; "
    "the profiling script is not in the repository) puts what remains inside the same kernels: backward +0.9 s, "
    "linear +0.6 s, fused AdamW +0.3 s over the two rounds. The loop's own Python code is under 0.2 s on either "
    "side, and AdamW's first-step state allocation (`zeros_like`) took 0.18 s against 0.08 s. Per step, the two loops run the same calls: `transformers.Trainer` (5.23) also goes through "
    "`accelerator.backward`, `accelerator.clip_grad_norm_`, `optimizer.step()` and `zero_grad` (set to None), and "
    "scales the loss by 1 / accumulation steps as ours weights it by its window.")


ORDER_EFFECT = (  # what the in-process 8-round file showed (2026-12-03)
    "So within one process the order of the two sides moves the paired ratio by about as much as the gap itself, "
    "and alternating the order over rounds is what keeps it out of the median. GA+GD's median stays below 1.0 even "
    "so, and its tiny-model loop-cost ratio (below) is under 1.0 too, while ME+GD, "
    "which runs the same two forwards a step through the same `fit()`, is not.")
ISOLATED = (  # what the fresh-process file showed (2026-12-03)
    "With each side in its own process the order effect is gone (the side that ran second was the faster in half "
    "the rounds), and what is left still has ours below the Trainer in most rounds, by a few percent, well within "
    "the spread of one side between rounds. Both loops make the same calls on the same batches (above), and the "
    "cause of the remaining gap is not found. Between rounds one side's speed moves by more than the gap, so a "
    "round-level bench of 8 rounds cannot tell a few percent from noise: the step-paired bench at the top of "
    "this section was built for that.")


def order_effect_lines(path: Path, conclusion: str) -> list[str]:
    """A longer bench of the methods the table shows below 1.0 (results/throughput_8rounds.json, and with
    --isolate results/throughput_isolated.json), its rounds split by which side went first: odd rounds
    (1, 3, ...) run ours first, even rounds the Trainer first."""
    if not path.exists():
        return []
    t = json.loads(path.read_text())
    c, ms = t["config"], t["methods"]
    parts = []
    for n, r in ms.items():
        rc, o, tr = r["ratio_cpu_rounds"], r["ours_rounds_tok_cpu_s"], r["trainer_rounds_tok_cpu_s"]
        second = sum(tr[i] > o[i] if i % 2 == 0 else o[i] > tr[i] for i in range(len(rc)))
        spread = max(max(v) / min(v) - 1 for v in (o, tr))
        parts.append(f"{NAMES.get(n, n)}: median paired ratio {statistics.median(rc):.3f}, {sum(x >= 1.0 for x in rc)} "
                     f"of {len(rc)} rounds at least 1.0; {statistics.median(rc[0::2]):.3f} in the rounds ours ran first "
                     f"and {statistics.median(rc[1::2]):.3f} in those the Trainer ran first; the side that ran second "
                     f"was the faster in {second} of {len(rc)} rounds; one side varied by up to {spread:.0%} between rounds "
                     "(CPU time, max/min - 1)")
    iso = c.get("isolate", False)
    cmd = (f"`python bench/throughput.py --batch {c['batch']} --rounds {c['rounds']} --methods {c['methods']} "
           f"{'--isolate ' if iso else ''}--json results/{path.name}`")
    how = "each side of each round in a fresh Python process" if iso else "both sides in one process"
    return ["", f"The same bench with {c['rounds']} rounds for {', '.join(NAMES.get(n, n) for n in ms)}, {how} ({cmd}, "
                f"commit {str(c.get('git_commit'))[:10]}, load average {c['load_before'][0]:.1f} before): "
                + "; ".join(parts) + "." + (f" {conclusion}" if conclusion else "")]


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval for the median of xs: the order statistics x(k), x(n+1-k) with
    k the largest for which P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None when n is too small for one."""
    n, xs = len(xs), sorted(xs)
    k = 0
    while sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n <= (1 - level) / 2:
        k += 1
    return (xs[k - 1], xs[n - k]) if k else None


INTERLEAVED = ("throughput_interleaved.json", "throughput_interleaved_others.json")  # bench/throughput.py --interleave
TINY_INTERLEAVED = "throughput_tiny_interleaved.json"  # the same with --model tiny
TINY_MALLOC = "throughput_tiny_interleaved_malloc.json"  # and again under MALLOC_* tunables that keep memory mapped


def step_pairs(r: dict, steps: int) -> dict:
    """One method of an --interleave file. Step k of ours and of the Trainer trained on the same batch seconds
    apart: each pair's ratio is the Trainer's CPU time over ours (ours / Trainer in speed). The side that takes
    a pair's first turn can be the slower one (ME+GD on 2026-12-04: median ratio 0.939 when ours took it, 1.029
    when the Trainer did), and rounds alternate it. Rounds 2j+1 (ours first) and 2j+2 (the Trainer first) rerun
    the same batches from the same weights, so they give one order-balanced sample per step k: the geometric
    mean of its two ratios (an AB/BA crossover; an odd last round is left out). The verdict on "at least 1.0"
    reads the 95% interval of their median: above 1.0, below it, or holding it."""
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
    """The step-paired bench (--interleave) of every method measured, one row each, and the verdict on the
    issue's target (ours at least the Trainer's speed) that the rows give."""
    if not files:
        return []
    c = files[0][1]["config"]
    lines = [f"Our `fit()` against a `transformers.Trainer` loop computing the same `step_losses` on the identical "
             f"pre-collated batches in the identical order, from the same fresh weights (per-step losses compared: "
             f"they must agree to {c['rtol']:g}), quick target, batch {c['batch']}, {c['threads']} "
             f"thread{'s' * (c['threads'] != 1)}, {c.get('platform')}. The two sides take turns one optimizer step at "
             "a time in one process, each in a thread of its own (`--interleave`), so step k of ours and step k of "
             "the Trainer train on the same batch a few seconds apart, under the same load; the side that takes the "
             "first turn alternates between rounds. The table's samples are order-balanced: for each step, the "
             "geometric mean of its CPU-time ratio in a round where ours took the first turn and in the next round, "
             "where the Trainer did (same batch, same weights), with their median and its distribution-free 95% "
             "interval.", "",
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
    return lines + ["", "The issue's target is ours at least the Trainer's speed. Judged on these step pairs: "
                    + "; ".join(said) + ". The two loops make the same calls a step (below). The loops' own cost, timed on "
                    "a tiny model where it is most of a step, is below."]


def interleaved_lines(path: Path, t: dict) -> list[str]:
    """The command behind one --interleave file, and its pairs split by which side took the first turn."""
    c = t["config"]
    cmd = (f"`python bench/throughput.py --batch {c['batch']} --steps {c['steps']} --rounds {c['rounds']} "
           f"--methods {c['methods']} --interleave --json results/{path.name}`")
    parts = []
    for n, r in t["methods"].items():
        sp = step_pairs(r, c["steps"])
        parts.append(f"{NAMES.get(n, n)} {sp['first']:.3f} when ours took the first turn, {sp['later']:.3f} when the "
                     f"Trainer did, page faults a step {r['ours_faults_step']:.0f} vs {r['trainer_faults_step']:.0f}")
    return ["", f"{', '.join(NAMES.get(n, n) for n in t['methods'])}: {cmd}, {c['rounds']} rounds of {c['steps']} "
                f"timed steps after {c['warmup']}, commit {str(c.get('git_commit'))[:10]}, load average "
                f"{c['load_before'][0]:.1f} before. Median step ratio by who took the first turn, and minor page "
                f"faults (fresh memory pages) a step, ours vs the Trainer: " + "; ".join(parts) + "."]


def loop_cost_lines(path: Path) -> list[str]:
    """The same bench on a tiny random model (--model tiny), where the loops' own cost is most of a step."""
    if not path.exists():
        return ["The loops' own cost is not measured yet: `python bench/throughput.py --model tiny --batch 1 "
                "--steps 150 --rounds 4 --json results/throughput_tiny.json`."]
    t = json.loads(path.read_text())
    c, ms = t["config"], t["methods"]
    per = ", ".join(f"{NAMES.get(n, n)} {1000 * r['ours_s_step']:.0f} vs {1000 * r['trainer_s_step']:.0f} ms "
                    f"({min(r['ratio_cpu_rounds']):.2f}-{max(r['ratio_cpu_rounds']):.2f})" for n, r in ms.items())
    pooled = [x for r in ms.values() for x in r["ratio_cpu_rounds"]]
    return ["", f"The loops themselves, timed with `--model tiny` (a random 2-layer model of hidden size 32 with the "
                f"same tokenizer, batch {c['batch']}, {c['steps']} steps per side and round, {c['rounds']} rounds, so "
                f"the loop around the step is a large part of it): a step takes ours vs the Trainer's (ours / "
                f"Trainer per round, CPU time) {per}; median paired ratio {statistics.median(pooled):.3f} "
                f"({sum(x >= 1.0 for x in pooled)} of {len(pooled)} rounds at least 1.0)."]


FORWARDS = ("No method runs a forward pass its objective does not need (the bench counts them): NPO's one frozen "
            "forward is its reference model's log-probs on the forget batch, which the paper's method needs "
            "(they are constant over training, so computing them once per row, as RKLD's teacher is, would "
            "save that forward; the reference code computes them every step, and so do we); "
            "RKLD's teacher is precomputed once before training (2 frozen forwards a step with `--rkld_teacher live`).")


TINY_MALLOC_FIRST = (  # the first run of the TINY_MALLOC command (2026-12-04), not kept: it predates malloc_env
    "A first run of the same command the same day, not kept (it predates the bench recording its environment), "
    "had GA+GD 0.988 (0.979-0.994) and NPO+GD 0.993 (0.989-0.997) slower and ME+GD level: two runs of one "
    "command differ by more than these intervals, which take the steps of a round as independent while they share "
    "its process state. Differences of 1-2% on the tiny model are not settled by one run.")


def tiny_interleaved_lines(path: Path, malloc: Path | None = None) -> list[str]:
    """The step-paired bench (--interleave) on the tiny model: the loops' own cost, step by step; with malloc
    (the same bench run under glibc MALLOC_* tunables that keep freed memory mapped), what is left of each
    method's gap once neither side takes fresh pages from the kernel."""
    if not path.exists():
        return []
    t = json.loads(path.read_text())
    c = t["config"]
    # which side was slower in a round (CPU time), and which took more fresh memory pages (minor faults) a step
    same = [(o < tr) == (fo > ft) for r in t["methods"].values() if "ours_rounds_faults_step" in r
            for o, tr, fo, ft in zip(r["ours_rounds_tok_cpu_s"], r["trainer_rounds_tok_cpu_s"],
                                    r["ours_rounds_faults_step"], r["trainer_rounds_faults_step"])]
    faults = (f" In {sum(same)} of {len(same)} rounds the side that was slower was also the one with more minor page "
              "faults a step (fresh memory pages from the kernel)." if same else "")
    lines = ["", f"The same on the tiny model, step-paired (`{tiny_command(path, c)}`, commit "
                 f"{str(c.get('git_commit'))[:10]}): ours / Trainer, median order-balanced step (95% interval): "
                 + tiny_parts(t) + "." + faults]
    if not (malloc and malloc.exists()):
        return lines
    m = json.loads(malloc.read_text())
    pf = {k: statistics.median(r[f"{k}_faults_step"] for r in m["methods"].values()) for k in ("ours", "trainer")}
    before = {n: step_pairs(r, c["steps"])["verdict"] for n, r in t["methods"].items()}
    after = {n: step_pairs(r, m["config"]["steps"])["verdict"] for n, r in m["methods"].items()}
    gone = [NAMES.get(n, n) for n, v in after.items() if before.get(n) == "slower" and v != "slower"]
    left = [NAMES.get(n, n) for n, v in after.items() if v == "slower"]
    return lines + ["", f"Run again with glibc's trimming and mmap off for the whole process (`{tiny_command(malloc, m['config'])}`, "
                    f"commit {str(m['config'].get('git_commit'))[:10]}), page faults a step fell to {pf['ours']:.1f} "
                    f"(ours) and {pf['trainer']:.1f} (the Trainer), median over methods: " + tiny_parts(m) + "."
                    + (f" The gap of {', '.join(gone)} went with the page faults." if gone else "")
                    + (f" {', '.join(left)} stayed slower with next to no page faults on either side: a cost of ours "
                       "that is not page faults, and not found." if left else "") + " " + TINY_MALLOC_FIRST]


def tiny_command(path: Path, c: dict) -> str:
    env = "".join(f"{k}={v} " for k, v in sorted(c.get("malloc_env", {}).items()))
    return (f"{env}python bench/throughput.py --model tiny --batch {c['batch']} --steps {c['steps']} --rounds "
            f"{c['rounds']} --methods {c['methods']} --interleave --json results/{path.name}")


def tiny_parts(t: dict) -> str:
    parts = []
    for n, r in t["methods"].items():
        sp = step_pairs(r, t["config"]["steps"])
        ms = {k: 1000 * statistics.median(r["step_cpu_s"][k]) for k in ("ours", "trainer")}
        parts.append(f"{NAMES.get(n, n)} {sp['median']:.3f} ({sp['ci_text']}; {ms['ours']:.0f} vs {ms['trainer']:.0f} "
                     f"CPU-ms a step, ours is {sp['is']})")
    return "; ".join(parts)


def round_level_lines() -> list[str]:
    """results/throughput.json (bench/throughput.py --json): ours/Trainer per method, rounds of a few steps."""
    path = PLOTS / "throughput.json"
    if not path.exists():
        return ["Not measured yet: `python bench/throughput.py --batch 8 --json results/throughput.json`."]
    t = json.loads(path.read_text())
    c = t["config"]
    lines = [f"Our `fit()` against a `transformers.Trainer` loop computing the same `step_losses` on the identical "
             f"pre-collated batches in the identical order, from the same fresh weights (per-step losses compared: "
             f"they must agree to {c['rtol']:g}). Quick target, batch {c['batch']}, {c['steps']} timed steps after "
             f"{c['warmup']} per side and round, median of {c['rounds']} rounds alternating which side goes first, "
             f"{c['threads']} thread{'s' * (c['threads'] != 1)}, {c.get('platform')}, commit {str(c.get('git_commit'))[:10]}.",
             "", "| method | forwards a step (trained + frozen) | tokens a step | ours tok/s | Trainer tok/s | "
             "ours / Trainer (wall) | ours / Trainer (CPU time) | same, each round | largest loss difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in t["methods"].items():
        f = r["forwards_per_step"]
        cpu = f"{r['ratio_cpu']:.3f}" if "ratio_cpu" in r else "not measured"
        per = ", ".join(f"{x:.3f}" for x in r["ratio_cpu_rounds"]) if "ratio_cpu_rounds" in r else "not recorded"
        lines.append(f"| {NAMES.get(n, n)} | {f['trained']} + {f['frozen']} | {statistics.fmean(r['tokens_per_step']):.0f} "
                     f"| {r['ours_tok_s']:.1f} | {r['trainer_tok_s']:.1f} | {r['ratio']:.3f} | {cpu} | {per} | "
                     f"{r['max_rel_loss_diff']:.1e} |")
    return lines + ["", throughput_verdict(t), "", THROUGHPUT_FINDINGS,
                    *order_effect_lines(PLOTS / "throughput_8rounds.json", ORDER_EFFECT),
                    *order_effect_lines(PLOTS / "throughput_isolated.json", ISOLATED)]


def throughput_section() -> list[str]:
    """The step-paired bench first (the verdict), then the loops' own cost, then the round-level benches that
    came before it. Without a step-paired file, the round-level table leads as it did."""
    files = interleaved_files()
    if not files:
        return [*round_level_lines(), *loop_cost_lines(PLOTS / "throughput_tiny.json"), "", FORWARDS]
    return [*interleaved_table(files), *[x for p, t in files for x in interleaved_lines(p, t)],
            *loop_cost_lines(PLOTS / "throughput_tiny.json"),
            *tiny_interleaved_lines(PLOTS / TINY_INTERLEAVED, PLOTS / TINY_MALLOC),
            "", FORWARDS, "",
            "### Before the step-paired bench: rounds of a few steps", "",
            "These benches ran each side for a few steps at a time. One side's speed moved by more between rounds "
            "than the gap between the sides, which is why the step-paired bench above was built.", "",
            *round_level_lines()]


START_TOL = 1e-3  # what separates two starting models' evaluations; float noise (thread counts) is ~1e-5


def starts_line(records) -> str:
    """Whether every sweep, seeds and shared run started from the same quick target, read off their "before"
    evaluations: run folders do not outlive a machine, so a later sitting rebuilds the target, and a rebuild
    that differed would mix runs of two targets in one table. Evaluations within START_TOL on each of the
    keys count as one start (the sweep's own records differ by ~6e-6 in MU between one and two threads)."""
    runs = [r for r in records if r["grid"] in reproduce.METHOD_GRIDS and r.get("before")]
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
    """A recorded command as one would type it in the repository root (python, paths relative)."""
    cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
    cmd = ["python", *cmd] if cmd[0].endswith(".py") else cmd  # recorded without the interpreter
    out = ["python" if i == 0 and Path(c).name.startswith("python") else c for i, c in enumerate(cmd)]
    return " ".join(x.replace(str(REPO) + "/", "") for x in out)


def render(records, lrs, made, claims, gpu=()) -> str:
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
    grids = {g: sum(r["grid"] == g for r in [*records, *gpu]) for g in (*reproduce.GRIDS, "gpu")}
    parts = [
        "# Results: the papers' claims on our own runs",
        "",
        "Generated by `python bench/reproduce.py` (runs what is missing, then writes this file and its plots) "
        "from `results/results.json`; `python bench/reproduce.py --report_only` rewrites it from that file "
        "alone. Do not edit by hand.",
        "",
        "**Setting: far from the papers'.** Every run behind the claims is the CPU quick path (the GPU table "
        "near the end is the full benchmark of the same model): SmolLM2-135M-Instruct "
        "fine-tuned on 6 TOFU authors (the quick target), unlearning forget01 (2 authors, 40 questions) "
        "with lr 1e-4-scale recipes, batch 8, 5 epochs; evaluation on the whole forget split and the first "
        "20 rows of retain, real authors and world facts. The papers use Llama-2-7B fine-tuned on all "
        "200 authors, lr 1e-5, batch 32, and evaluate up to 300 rows per split. A 135M model that memorised "
        "6 authors in 60 steps forgets and degrades differently, forget quality over 40 rows moves in "
        "coarse steps (a KS test of 40 against 40 values), and model utility over 20 rows per split is "
        "noisy. Read the verdicts as *does the direction hold at small scale*, not as a replication.",
        "",
        f"Runs recorded: {len(records) + len(gpu)} ({', '.join(f'{g} {n}' for g, n in grids.items())}); "
        f"compute: {hours:.1f} h of run wall time on the CPU, about {machine:.1f} h of that machine (runs two at a "
        "time count half), for the runs timed there"
        + (f"; {gpu_min:.1f} min of GPU run wall time, about {gpu_own:.1f} min of the GPU (runs that shared it "
           "count their share)" if gpu_min else "") + ".",
        "",
        starts_line(records),
        "",
        "## The papers' claims",
        "",
        "Verdict rule: a comparison is *separated* when the means over seeds differ by more than the sum of "
        "their standard deviations (forget quality as log10); one seed on either side is at best "
        "*inconclusive* and the direction seen is given. Model utility counts as comparable within "
        f"{MU_TOL}. RKLD's claims use each run's first-peak epoch (the RKLD paper's protocol), "
        "Closer-Look's the last epoch (as that paper reports).",
        "",
    ]
    for title, (v, lines) in claims:
        parts += [f"- **{title}: {v}.**", *[f"  - {x}" for x in lines]]
    parts += [
        "",
        "What would settle an inconclusive claim: " + (
            "every method has three seeds at its chosen lr (the `seeds` grid), so more seeds at those rates "
            "would only narrow the spread; " if all(len(runs_at(records, m, lrs[m])) >= 3 for m in reproduce.METHODS
                                                   if lrs[m]) and all(lrs.values()) else
            "three seeds per method at its chosen lr (the `seeds` grid); ") + "the Closer-Look pairs are also compared "
        "at one shared lr, as Table 4 trains them (the `shared` grid); for the size of the effect, the papers' "
        "setting (a 7B target on all 200 authors, forget05/10, 300 evaluation rows), which needs GPUs (README, "
        "*On GPUs*), and the continual sequences at " + (
            f"the paper's lr and more seeds (one seed each here, at {CONTINUAL_LR:g} and "
            f"{reproduce.CONTINUAL_LOW_LR:g}: {CONTINUAL_LR / 1e-5:.0f}x and {reproduce.CONTINUAL_LOW_LR / 1e-5:.0f}x "
            "the paper's lr)." if continual_rows(records, reproduce.CONTINUAL_LOW_LR) else
            f"a lower lr and more seeds (one seed each here, at {CONTINUAL_LR / 1e-5:.0f}x the paper's lr)."),
        "",
        "## Learning-rate sweep (seed 42, last epoch: forget quality / model utility)",
        "",
        f"Chosen lr per method: {reproduce.LR_RULE}.",
        "",
        sweep_table(records, lrs),
        "",
        "## Main table at the first-peak epoch (RKLD protocol)",
        "",
        "Mean ± standard deviation over seeds at each method's chosen lr; FQ = forget quality, MU = model "
        "utility (TOFU), FE w/o ES = Closer-Look's forget efficacy without its entailment term (its NLI model "
        "is on the hub, out of reach offline, so FE and MU-18 themselves are not computed; its CS model is "
        "replaced offline by all-MiniLM-L6-v2, so even this part is not the paper's number), top-5 leak = "
        "share of forget-answer tokens ranked in the model's top 5 (teacher-forced).",
        "",
        main_table(records, lrs, "peak"),
        "",
        "## Main table at the last epoch",
        "",
        main_table(records, lrs, "last"),
        "",
        "## On a GPU: the full benchmark of the embedded model",
        "",
        *gpu_section(list(gpu)),
        "",
        "## Training throughput (`bench/throughput.py`)",
        "",
        *throughput_section(),
        "",
        "## Plots",
        "",
        *(f"![{m}](results/{m})" for m in made),
        *([] if made else ["(matplotlib is not installed: `pip install matplotlib`, then rerun with --report_only)"]),
        "",
        "## Hardware, versions, commits",
        "",
        *(f"- {h}" for h in hw), *(f"- {v}" for v in ver),
        f"- git commits of the runs: {', '.join(commits) or 'none yet'}",
        "",
        "## Commands",
        "",
        "Each run's exact command (also in `results/results.json`, `command`); the grids are defined in "
        "`bench/reproduce.py`, which runs them from the repository root.",
        "",
        "<details><summary>" + f"{len(records) + len(gpu)} commands" + "</summary>",
        "",
        *(f"- `{r['name']}`: `{command_line(r['command'])}`" for r in [*records, *gpu] if r.get("command")),
        "",
        "</details>",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
