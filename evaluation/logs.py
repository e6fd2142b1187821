"""TOFU-format logs (§7): the Task table, writing and reading the per-sample logs, the checks that
a retain model's logs can stand for this model's, TOFU's aggregates, and the summary layer on top
(summarize, print_summary).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common
from harness import runlog
from evaluation.metrics import (UTILITY_TASKS, closer_look, closer_look_provenance, forget_quality, harmonic_mean,
                                probability, tr_forget, tr_utility, truth_ratio)

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
# Summary: aggregates plus the Closer-Look metrics and leakage, and its printed table
# ---------------------------------------------------------------------------
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


def cell(v):
    """A table cell: "n/c" (not computed) for a missing number."""
    return "n/c" if v is None else v


def closer_look_models(s: dict) -> str:
    """Short names of the CS and ES models behind a summary's MU-18 and FE, plus a warning when
    they are not the paper's (summaries written before closer_look_provenance included)."""
    def short(m):
        return "not computed" if str(m).startswith("not computed") else str(m).split(" (")[0].split("/")[-1]

    tag = "; not comparable to the paper" if closer_look_provenance(s.get("cs_model"), s.get(
        "nli_model"))["closer_look_comparable"] is False else ""
    return f"CS {short(s.get('cs_model'))}, ES {short(s.get('nli_model'))}{tag}"


def print_summary(s: dict, logs: dict | None = None, questions: dict | None = None):
    """Compact table of the aggregates, then the headline numbers and two forget generations, each
    under its question (questions: {row index: question}; the log's input, chat template and all, else)."""
    tasks = [t for t in TASKS if f"n_{t}" in s]
    rows = [(t, s[f"n_{t}"], *(cell(s.get(f"{t}_{k}")) for k in ("prob", "rouge", "truth_ratio", "te", "cs", "es")))
            for t in tasks]
    print(runlog.table(rows, ("task", "n", "Prob", "ROUGE-L", "TR", "TE", "CS", "ES")))
    fq = s.get("forget_quality")
    fq_text = (f"{fq:.4g} (KS {s['ks_statistic']:.4f}, n={s['n_forget_model']} vs {s['n_forget_retain']})"
               if fq is not None else s.get("forget_quality_reason"))
    lines = [("model utility", cell(s.get("model_utility")) if s.get("model_utility") is not None
              else s.get("model_utility_reason")), ("forget quality", fq_text)]
    if s.get("forget_quality_rows"):
        m, r = s["forget_quality_rows"]["model"], s["forget_quality_rows"]["retain_logs"]
        lines.append(("forget quality rows", f"model {m['split']} {m['rows']} (n={m['n']}) vs retain logs "
                                             f"{r['split']} {r['rows']} (n={r['n']}), "
                                             f"{s['forget_quality_rows']['shared']} shared"))
    if "mu18" in s:
        lines += [(name, f"{s[k]:.4f} ({closer_look_models(s)})" if s[k] is not None else s[f"{k}_reason"])
                  for name, k in (("MU-18", "mu18"), ("FE", "fe"))]
        lines += [("CS model", s["cs_model"]), ("NLI model", s["nli_model"])]
        if s.get("closer_look_note"):
            lines.append(("MU-18/FE note", s["closer_look_note"]))
    if s.get("forget_leak_top1") is not None:
        lines.append(("forget leakage top-1/top-5", f"{s['forget_leak_top1']:.4f} / {s['forget_leak_top5']:.4f}"))
    if s.get("privleak") is not None:  # evaluation/privacy.py
        lines += [("privleak (Min-K%)", f"{s['privleak']:.2f} (AUC {s['mia_auc/min_k']:.4f}, AUC_retain "
                                        f"{s['privleak_auc_retain']:.4f}: {s['privleak_auc_retain_source']})"),
                  ("extraction str. (ExtStr)", cell(s.get("extraction_strength"))),
                  ("exact memoriz. (ExactMem)", cell(s.get("exact_memorization"))),
                  ("MIA AUC (forget vs holdout)", ", ".join(f"{k[8:]} {v:.4f}" for k, v in s.items() if k.startswith(
                      "mia_auc/") and isinstance(v, float)) + f"; {s['privacy']['auc_convention']}"),
                  ("holdout", f"{s['privacy']['holdout']}, {s['privacy']['n_holdout']} rows")]
    truncated = {t: s[f"{t}_truncated"] for t in tasks if s.get(f"{t}_truncated")}
    if truncated:
        lines.append(("rows with truncated answers", truncated))
    if s.get("nan_flags"):
        lines.append(("NaN flags", "; ".join(s["nan_flags"])))
    lines += [(f"skipped {k}", v.removeprefix("not computed: ")) for k, v in (s.get("skipped") or {}).items()
              if k not in ("model_utility", "forget_quality", "mu18", "fe", "cs", "es")]  # those have a line
    for k, v in lines:
        print(f"{k:>26}: {v:.4f}" if isinstance(v, float) else f"{k:>26}: {v}")
    for i, ex in list((logs or {}).get("forget", {}).get("generated_text", {}).items())[:2]:
        print(f"\n  Q: {(questions or {}).get(str(i), ex[0])!r}\n  gold: {ex[2]!r}\n  generated: {ex[1]!r}")
