"""What the results grids are: the methods, learning rates, seeds and sequences that bench/reproduce.py runs,
the lr rule that picks each method's rate from the sweep, and the results file the runs are recorded in.
bench/reproduce.py (which runs the grids) and bench/results_report.py (which reads their records) both import
this module; the report imports nothing of reproduce.py.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "results.json"


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


NEWER_BASELINES = ("wga_gd", "satimp_gd", "ce_u", "pdu", "rmu")
METHODS = {  # name -> (script, flags); paper names: RKLD Table 4 and closer-look Table 4
    "rkld": ("rkld.py", []), "rkld_fkl": ("rkld.py", ["--divergence", "fkl"]),
    "me_gd": ("me_gd.py", []), "idk_ap": ("idk_ap.py", []),
    **{m: ("baselines.py", ["--method", m]) for m in ("ga_gd", "npo_gd", "idk_gd", "ga", "npo", "dpo", "kto", "idk")},
    # the newer baselines (issue 33), each in the form open-unlearning runs on TOFU; no results yet
    **{m: ("baselines.py", ["--method", m]) for m in NEWER_BASELINES if m != "rmu"}, "rmu": ("rmu.py", []),
}
NAMES = {"rkld": "RKLD", "rkld_fkl": "RKLD with FKL", "me_gd": "ME+GD", "idk_ap": "IDK+AP", "ga_gd": "GA+GD",
         "npo_gd": "NPO+GD", "idk_gd": "IDK+GD", "ga": "GA", "npo": "NPO", "dpo": "DPO", "kto": "KTO", "idk": "IDK",
         "wga_gd": "WGA+GD", "satimp_gd": "SatImp+GD", "ce_u": "CE-U", "pdu": "PDU", "rmu": "RMU"}
GRIDS = ("reference", "sweep", "seeds", "shared", "continual", "robust")  # "all"; the gpu grid runs only when named (--grid gpu)
METHOD_GRIDS = ("sweep", "seeds", "shared")  # runs of a method script from the quick target: they share its caches

SWEEP_LRS = (1e-4, 5e-5, 2e-5)
FIRST_SEED, MORE_SEEDS = 42, (1, 2)
CURVES, CURVE_SEED = ("rkld", "me_gd", "idk_ap", "ga_gd", "npo_gd"), MORE_SEEDS[0]
# Closer-Look Table 4 trains every method at one lr (1e-5, its §5.1 setup); the shared grid runs its two
# (ours, baseline) pairs at one lr here too, seeds 1 and 2 (seed 42 is the sweep's): the quick recipe's rate,
# which the continual grid also uses. Added after the seeds grid had left both claims inconclusive at each
# method's chosen lr; 1e-4 is the one swept rate at which the seed-42 sweep showed the baselines losing
# utility (GA+GD MU 0.109, IDK+GD 0.000), so read this check as chosen after seeing seed 42.
SHARED_LR, SHARED = 1e-4, (("me_gd", "ga_gd"), ("idk_ap", "idk_gd"))
CONTINUAL = ("me_gd", "ga_gd", "idk_ap", "npo_gd")  # in pairs (ours, its baseline): a sitting that runs two has one comparison
CONTINUAL_TASKS = 5  # of forget01's 10 (see bench/reproduce.py's docstring)
CONTINUAL_LR = 1e-4  # scripts/continual.py on the quick path (the grid passes no --lr): each method script's QUICK recipe
# The same sequences again at a lower lr, one shared by every method as in Closer-Look §5.2 (1e-5 there). Added
# after the sequences at the quick recipe's 1e-4 (10x the paper's) had every method decline, ME+GD included;
# 5e-5 is the middle swept rate, fixed before these runs. 2e-5 was left out for time, and because in the seed-42
# sweep GA+GD and ME+GD reach forget quality 0.0286 at most there in a run of one task: a sequence at 2e-5 could
# hardly tell keeping utility from not unlearning.
CONTINUAL_LOW_LR = 5e-5
# The robust grid: every method of the seeds grid at its chosen lr, seed 42, attacked after unlearning by relearning
# and by 4- and 8-bit quantization (evaluation/attacks.py; the quantization needs bitsandbytes, an optional install:
# requirements.txt), privacy on (the default); the retain and target yardsticks come from the attacks' own caches
ROBUST_BITS = ("4bit", "8bit")
ROBUST_FLAGS = ["--relearn_attack", "true", "--quantize_attack", ",".join(ROBUST_BITS)]
GPU_SPLITS, GPU_METHODS = ("forget05", "forget10"), ("rkld", "me_gd", "idk_ap", "ga_gd", "npo_gd", *NEWER_BASELINES)

MU_KEPT = 0.9
LR_RULE = ("among the swept rates at which the method unlearned anything (last-epoch forget quality above the "
           "target's), the highest forget quality (last epoch, seed 42) whose model utility keeps at "
           f"least {MU_KEPT:.0%} of the target's; if none does, the highest model utility; RKLD with FKL, RKLD "
           "Table 2's ablation of the divergence, takes RKLD's rate")
LR_RULE_HISTORY = (  # two sentences, printed under the rule
    "Closer-Look App. E.8 picks each method's best balance without a stated rule; this one is ours, fixed before the "
    "runs except two clauses added after the sweep.",
    "\"Unlearned anything\", because the rule as first written chose lr 2e-5 for RKLD, whose forget quality stayed at "
    "the target's 0.0143; FKL taking RKLD's rate, so that its seeds pair with RKLD's (as first written it chose 2e-5 "
    "for FKL and, with the first clause, 5e-5 for RKLD).")


def target_mu(records: list[dict]) -> float | None:
    return next((r["before"]["model_utility"] for r in records if r.get("before") and r["grid"] in ("sweep", "seeds")), None)


def unlearned_at(runs, records: list[dict]) -> list[dict]:
    """The runs whose last-epoch forget quality rose above the target's (float noise aside); a run that left it
    at the target's, or lowered it, unlearned nothing."""
    fq0 = next(r["before"]["forget_quality"] for r in records if r.get("before") and r["grid"] in ("sweep", "seeds"))
    return [r for r in runs if r["last"]["forget_quality"] > fq0 * (1 + 1e-9)]


def unlearned_nothing(method: str, records: list[dict]) -> bool:
    """True when the method's sweep is complete and no swept rate unlearned anything (LR_RULE's first clause)."""
    runs = [r for r in records if r["grid"] == "sweep" and r["method"] == method]
    return {r["lr"] for r in runs} == set(SWEEP_LRS) and not unlearned_at(runs, records)


def chosen_lr(method: str, records: list[dict]) -> float | None:
    """LR_RULE over the method's seed-42 sweep; None until every swept rate is recorded."""
    if method == "rkld_fkl":  # the divergence ablation runs at RKLD's settings (RKLD Table 2)
        return chosen_lr("rkld", records)
    runs = {r["lr"]: r for r in records if r["grid"] == "sweep" and r["method"] == method}
    if set(runs) != set(SWEEP_LRS) or target_mu(records) is None:
        return None
    moved = unlearned_at(runs.values(), records) or list(runs.values())
    kept = [r for r in moved if r["last"]["model_utility"] >= MU_KEPT * target_mu(records)]
    if kept:
        return max(kept, key=lambda r: (r["last"]["forget_quality"], r["last"]["model_utility"]))["lr"]
    return max(moved, key=lambda r: r["last"]["model_utility"])["lr"]
