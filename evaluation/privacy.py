"""Did it really forget? Membership inference (six attacks and their AUCs), privacy leakage
(privleak), extraction strength and exact memorization, as open-unlearning defines them
(src/evals/metrics/mia/, privacy.py, memorization.py; specs decision 10, docs/specs.md "Privacy").

Every attack score is loss-like: higher means the sample looks less like a member.
AUC convention (open-unlearning's, used for every number here): the holdout rows are labelled 1
and the forget rows 0, and the score ranks them, so AUC = P(holdout score > forget score) (ties
count 1/2). AUC 1: the forget rows look far more likely than unseen rows (remembered); 0.5: the
attack cannot tell them apart (a model that never saw either); below 0.5: the forget rows look
*less* likely than unseen ones (over-unlearned). MUSE's code labels the other way (its AUC is
1 - ours).

privleak = ((1 - AUC_model) - (1 - AUC_retain)) / (1 - AUC_retain) x 100 on Min-K% (k = 0.4), with
AUC_retain from the retain model on the same rows (0 is ideal; -100: the forget set is as exposed as
to a model that trained on it; far above 0: over-unlearned, itself detectable).

The block below is pure (torch, zlib and math only); the forward pass over the rows comes after it.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

MIN_K = 0.4  # open-unlearning's TOFU configs (mia_min_k.yaml, mia_min_k_plus_plus.yaml, privleak.yaml)
VAR_FLOOR = 1e-6  # open-unlearning min_k_plus_plus.py clamps the variance of log p at 1e-6 before the sqrt
PRIVLEAK_EPS = 1e-10  # open-unlearning privacy.py adds it to privleak's denominator
FALLBACK_AUC_RETAIN = 0.5  # open-unlearning privleak.yaml ref_value: AUC_retain when no retain model's logs exist
ATTACKS = ("loss", "zlib", "min_k", "min_k++", "gradnorm", "reference")
ES_FORMS = ("definition", "open_unlearning")


# ---------------------------------------------------------------------------
# Scores from logits and labels (pure: torch only)
# ---------------------------------------------------------------------------
def answer_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per sequence, over its answer tokens in order (labels != -100; logits at t predict labels[t+1],
    as in the loss), computed in fp32 on those positions only:
      logp: log p(gold token); mu, var: mean and variance of log p under the model's own next-token
      distribution, sum_v p_v log p_v and sum_v p_v (log p_v)^2 - mu^2 (Min-K%++); pred: the greedy
      (argmax) token; gold: the label."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    lp = F.log_softmax(logits[mask].float(), -1)  # [tokens, V]: answer positions only
    gold = labels[mask]
    p = lp.exp()
    mu = (p * lp).sum(-1)
    stats = {"logp": lp.gather(-1, gold[:, None])[:, 0], "mu": mu, "var": (p * lp.square()).sum(-1) - mu.square(),
             "pred": lp.argmax(-1), "gold": gold}
    counts = mask.sum(-1).tolist()
    return [dict(zip(stats, parts)) for parts in zip(*(s.split(counts) for s in stats.values()))]


def drop_last(x: torch.Tensor) -> torch.Tensor:
    """The answer tokens open-unlearning's token-wise attacks use (Min-K%, Min-K%++, GradNorm, extraction
    strength, exact memorization): all but the last scored one, which is the EOS we append (its
    tokenwise_logprobs drops it: `[:-1]  # -1 to ignore eos prediction`). LOSS, ZLib and Reference keep it
    (its evaluate_probability averages every scored token)."""
    return x[:-1]


def loss_score(logp: torch.Tensor) -> float:
    """LOSS (Yeom et al. 2018): the mean token NLL over every answer token, EOS included."""
    return float(-logp.mean())


def zlib_score(loss: float, text: str) -> float:
    """ZLib (Carlini et al. 2021): LOSS over the zlib-compressed length in bytes of the answer's UTF-8 text
    (open-unlearning: the labelled tokens decoded with skip_special_tokens, default compression level)."""
    return loss / len(zlib.compress(text.encode("utf-8")))


def min_k_score(values: torch.Tensor, k: float = MIN_K) -> float:
    """Min-K% (Shi et al. 2024): minus the mean of the lowest max(1, floor(k n)) of n token log-probs
    (open-unlearning takes at least one token; an empty answer scores 0, as there)."""
    if values.numel() == 0:
        return 0.0
    n_k = max(1, int(values.numel() * k))
    return float(-values.float().sort().values[:n_k].mean())


def min_k_plus_plus_score(logp: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, k: float = MIN_K) -> float:
    """Min-K%++ (Zhang et al. 2025): Min-K% over the standardised log-probs (log p(gold) - mu) / sigma, mu and
    sigma^2 the mean and variance of log p under the model's next-token distribution; sigma^2 is clamped at
    VAR_FLOOR first (open-unlearning)."""
    return min_k_score((logp - mu) / var.clamp(min=VAR_FLOOR).sqrt(), k)


def reference_score(loss: float, ref_loss: float) -> float:
    """Reference (Carlini et al. 2022): the model's LOSS minus a reference model's (here the retain model's)."""
    return loss - ref_loss


def grad_norm_score(grads, p: float = 2) -> float:
    """GradNorm (Maini et al. 2024, open-unlearning gradnorm.py): the mean over parameter tensors of each
    tensor's p-norm of the gradient of the sample's loss (a mean of per-tensor norms, not one global norm)."""
    norms = [g.detach().float().norm(p) for g in grads if g is not None]
    return float(torch.stack(norms).mean())


def extraction_strength(pred: torch.Tensor, gold: torch.Tensor, form: str = "definition") -> float:
    """Teacher-forced extraction strength (Carlini et al. 2021; Wang et al. 2025): 1 - k/n, k the smallest
    position from which the greedy prediction matches every remaining answer token. 'definition': k runs
    0..n, so a last token that misses gives 0. 'open_unlearning': its loop tries k in 0..n-1 only, so it
    stops at n-1 and such a sample gets 1/n (memorization.py). An empty answer: 0."""
    n = gold.numel()
    if n == 0:
        return 0.0
    miss = (pred != gold).nonzero()
    k = int(miss[-1]) + 1 if miss.numel() else 0  # the first position after the last miss
    if form == "open_unlearning":
        k = min(k, n - 1)
    return 1 - k / n


def exact_memorization(pred: torch.Tensor, gold: torch.Tensor) -> float | None:
    """Exact memorization (Tirumala et al. 2022): the share of answer tokens whose greedy prediction under
    teacher forcing is the gold token. None for an empty answer (open-unlearning drops such samples)."""
    return float((pred == gold).float().mean()) if gold.numel() else None


def auc(forget: list[float], holdout: list[float]) -> float:
    """ROC AUC with holdout labelled 1 and forget 0 over loss-like scores (open-unlearning mia/utils.py,
    sklearn's roc_auc_score(labels, scores)): the share of (forget, holdout) pairs where the holdout score
    is higher, ties counting 1/2. MUSE's convention is 1 - this."""
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))


def privleak(auc_model: float, auc_retain: float) -> float:
    """((1 - AUC_model) - (1 - AUC_retain)) / (1 - AUC_retain) x 100, with open-unlearning's 1e-10 in the
    denominator (privacy.py privleak: it turns our AUCs into MUSE's, 1 - AUC, first)."""
    score, ref = 1 - auc_model, 1 - auc_retain
    return (score - ref) / (ref + PRIVLEAK_EPS) * 100


# ---------------------------------------------------------------------------
# Model-facing: one forward pass over the forget and holdout rows, GradNorm, the summary
# ---------------------------------------------------------------------------
PRIVACY_FILE = "eval_privacy.json"  # per-sample scores beside the TOFU logs; a retain model's gives AUC_retain
AUC_CONVENTION = ("holdout labelled 1, forget 0, loss-like scores: AUC 1 = forget rows look remembered, 0.5 = "
                  "indistinguishable from unseen rows (open-unlearning; MUSE reports 1 - AUC)")


def forward_scores(model, tokenizer, seqs, texts, device, batch_size, bar, es_form) -> list[dict]:
    """LOSS, ZLib, Min-K%, Min-K%++, extraction strength and exact memorization of each tokenized row:
    batched forward passes, longest first, answer tokens only."""
    import common
    from tqdm.auto import tqdm
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]["input_ids"]))
    out = [None] * len(seqs)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="  privacy", disable=not bar, leave=False):
        b = {k: v.to(device) for k, v in common.collate([seqs[i] for i in chunk], tokenizer.pad_token_id).items()}
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i, st in zip(chunk, answer_token_stats(logits, b["labels"])):
            st = {k: v.cpu() for k, v in st.items()}
            loss = loss_score(st["logp"]) if st["logp"].numel() else float("nan")
            kept = {k: drop_last(v) for k, v in st.items()}
            out[i] = {"loss": loss, "zlib": zlib_score(loss, texts[i]), "min_k": min_k_score(kept["logp"]),
                      "min_k++": min_k_plus_plus_score(kept["logp"], kept["mu"], kept["var"]),
                      "es": extraction_strength(kept["pred"], kept["gold"], es_form),
                      "em": exact_memorization(kept["pred"], kept["gold"])}
    return out


def gradnorm_scores(model, tokenizer, seqs, device, bar) -> list[float]:
    """GradNorm of each row, one row per backward (open-unlearning: batch_size 1, p = 2). The loss is the mean
    NLL of the answer tokens but the EOS (drop_last). Gradients of every floating-point parameter (frozen ones
    made to require grad for the call) through torch.autograd.grad, so no .grad buffer is touched; the model
    stays in eval mode (open-unlearning switches to train mode: the same for models without dropout)."""
    import common
    from tqdm.auto import tqdm
    params = [p for p in model.parameters() if p.is_floating_point()]
    was = [p.requires_grad for p in params]
    out = []
    try:
        for p in params:
            p.requires_grad_(True)
        for seq in tqdm(seqs, desc="  gradnorm", disable=not bar, leave=False):
            b = {k: v.to(device) for k, v in common.collate([seq], tokenizer.pad_token_id).items()}
            with torch.enable_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
                tokens = drop_last(lp[b["labels"][:, 1:] != -100])
                if tokens.numel() == 0:
                    out.append(0.0)
                    continue
                grads = torch.autograd.grad(-tokens.mean(), params, allow_unused=True)
            out.append(grad_norm_score(grads))
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return out


def _retain_scores(retain_dir, forget_idx, holdout_idx, holdout_name) -> tuple[dict | None, str]:
    """(the retain model's eval_privacy.json, or None; why not) for the same forget and holdout rows."""
    import json
    from pathlib import Path
    if not retain_dir:
        return None, "no retain model (--retain_model or --retain_logs)"
    path = Path(retain_dir) / PRIVACY_FILE
    if not path.exists():
        return None, f"the retain logs {retain_dir} have no {PRIVACY_FILE} (the retain model was evaluated without --privacy)"
    rec = json.loads(path.read_text())
    rows = rec.get("rows", {})
    if rows.get("forget") != forget_idx or rows.get("holdout") != holdout_idx or rec.get("holdout") != holdout_name:
        return None, f"the retain model's {PRIVACY_FILE} in {retain_dir} scored other forget or holdout rows"
    return rec, ""


def evaluate_privacy(model, tokenizer, fmt, forget: list[dict], spec: dict, device, batch_size: int, bar: bool,
                     out_dir=None, retain_dir=None, synced: bool = False) -> dict:
    """The privacy and memorization numbers of a model in memory, for evaluate()'s summary.

    spec: {"holdout": rows, "holdout_name": where they come from, "gradnorm": run GradNorm, "es_form": ...}, or
    {"reason": why there is no holdout}. Every process scores every row (no sharding: the same forward
    passes on each rank keep sharded models in step); the main process (out_dir given) writes
    eval_privacy.json with each row's scores. retain_dir: the retain model's logs folder, whose
    eval_privacy.json gives AUC_retain for privleak and the per-row NLL for the Reference attack."""
    import common
    if spec.get("reason"):
        return {"privacy_reason": spec["reason"]}
    holdout = spec["holdout"]
    rows = {"forget": forget, "holdout": holdout}
    seqs = {t: [common.encode_qa(tokenizer, fmt, r["question"], r["answer"]) for r in rs] for t, rs in rows.items()}
    all_seqs = seqs["forget"] + seqs["holdout"]
    texts = [tokenizer.decode([t for t in s["labels"] if t != -100], skip_special_tokens=True) for s in all_seqs]
    recs = forward_scores(model, tokenizer, all_seqs, texts, device, batch_size, bar, spec.get("es_form", "definition"))
    gn_reason = ("not computed: --privacy_gradnorm false (the default: a backward per row)" if not spec.get("gradnorm")
                 else
                 "not computed: the parameters are sharded (FSDP2/ZeRO-3)" if synced else
                 "not computed: the model has no parameters" if not callable(getattr(model, "parameters", None))
                 or not any(True for _ in model.parameters()) else None)
    if gn_reason is None:
        for r, g in zip(recs, gradnorm_scores(model, tokenizer, all_seqs, device, bar)):
            r["gradnorm"] = g
    n = len(forget)
    per = {"forget": {str(r["index"]): s for r, s in zip(forget, recs[:n])},
           "holdout": {str(r["index"]): s for r, s in zip(holdout, recs[n:])}}
    rec = {"holdout": spec["holdout_name"], "es_form": spec.get("es_form", "definition"), "gradnorm_reason": gn_reason,
           "scores": per}
    s = privacy_summary(rec, retain_dir)
    if out_dir is not None:
        from harness import runlog
        from pathlib import Path
        runlog.atomic_write_json(Path(out_dir) / PRIVACY_FILE, {
            **rec, "rows": {t: list(per[t]) for t in per}, "auc_convention": AUC_CONVENTION,
            "auc": {a: s[f"mia_auc/{a}"] for a in ATTACKS}})
    return s


def privacy_summary(rec: dict, retain_dir=None) -> dict:
    """The summary's privacy numbers from per-row scores: rec holds "scores" ({"forget"|"holdout": {index: scores}}),
    "holdout" (where the holdout rows came from), "es_form" and "gradnorm_reason" (None when GradNorm was run), as
    eval_privacy.json does, so `evaluate_tofu.py --aggregate_only` gives the numbers the evaluation gave. The
    Reference scores are computed here, from retain_dir's eval_privacy.json (replacing any recorded); rec's scores
    become these, so a file written from rec afterwards holds them."""
    per = {t: {i: {k: v for k, v in sc.items() if k != "reference"} for i, sc in rec["scores"][t].items()}
           for t in ("forget", "holdout")}
    idx = {t: list(per[t]) for t in per}
    n = len(idx["forget"])
    retain, why = _retain_scores(retain_dir, idx["forget"], idx["holdout"], rec["holdout"])
    if retain is not None:
        for t in per:
            for i, sc in per[t].items():
                sc["reference"] = reference_score(sc["loss"], retain["scores"][t][i]["loss"])
    rec["scores"] = per
    gn_reason = rec.get("gradnorm_reason", "not computed in the recorded evaluation")
    s = {}
    for a in ATTACKS:
        if a in per["forget"][idx["forget"][0]]:
            s[f"mia_auc/{a}"] = auc([v[a] for v in per["forget"].values()], [v[a] for v in per["holdout"].values()])
        else:
            s[f"mia_auc/{a}"] = None
            s[f"mia_auc/{a}_reason"] = gn_reason if a == "gradnorm" else f"not computed: {why}"
    auc_retain = (retain or {}).get("auc", {}).get("min_k")
    s["privleak_auc_retain"] = auc_retain if auc_retain is not None else FALLBACK_AUC_RETAIN
    s["privleak_auc_retain_source"] = (f"the retain model's Min-K% AUC on the same rows ({retain_dir})" if auc_retain
                                       is not None else f"fallback {FALLBACK_AUC_RETAIN} (open-unlearning's ref_value): {why}")
    s["privleak"] = privleak(s["mia_auc/min_k"], s["privleak_auc_retain"])
    ems = [v["em"] for v in per["forget"].values() if v["em"] is not None]
    s["extraction_strength"] = sum(v["es"] for v in per["forget"].values()) / n
    s["exact_memorization"] = sum(ems) / len(ems) if ems else None
    s["privacy"] = {"holdout": rec["holdout"], "n_forget": n, "n_holdout": len(idx["holdout"]), "min_k": MIN_K,
                    "auc_convention": AUC_CONVENTION, "extraction_strength_form": rec.get("es_form", "definition")}
    return s
