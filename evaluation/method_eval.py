"""What the method scripts call: MethodEval (before/after/per-epoch evaluation, the first peak of
forget quality, the end-of-run table), on top of evaluation.engine and evaluate_general.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import common
from harness import launch, models, runlog, scenarios
import evaluate_general
from evaluation import attacks
from evaluation.engine import evaluate, task_rows
from evaluation.logs import TASKS, cell, closer_look_models, skipped
from evaluation.logs import eval_cache_dir as _cache_dir  # shared with evaluation/attacks.py
from evaluation.metrics import real_world_scores

# ---------------------------------------------------------------------------
# What the method scripts call: before/after/per-epoch evaluation and the summary table
# ---------------------------------------------------------------------------
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


REAL_WORLD_NO_TOFU_MU = ("not computed: TOFU's model utility needs TOFU's retain, real authors and world facts, "
                         "which the real-world scenario does not have; its MU is real_world_mu")


# Below this forget Prob (mean p(answer | question)^(1/len)) the starting model hardly knows the forget set:
# a TOFU target gets about 0.9 (the quick target 0.93), a model that never saw the rows far less.
KNOWN_PROB = 0.2


def barely_known(s: dict) -> str | None:
    """One sentence when the starting model's forget Prob is below KNOWN_PROB, else None."""
    prob = s.get("forget_prob")
    if prob is None or prob >= KNOWN_PROB:
        return None
    rouge = f", ROUGE-L {s['forget_rouge']:.3f}" if s.get("forget_rouge") is not None else ""
    return (f"the starting model barely knows the forget set (forget Prob {prob:.3f}{rouge}; a fine-tuned "
            f"target has about 0.9), so there is little to unlearn; fine-tune it on the set first "
            f"(finetune.py --forget_data FILE --retain_data FILE builds a target and a retain model)")


def nc_reason(s: dict, key: str) -> str:
    """Why a summary's number is missing, in the evaluator's words; an ES or CS input that is missing
    names the model it needed."""
    why = s.get(f"{key}_reason") or (s.get("skipped") or {}).get(key)
    if key.endswith("_leak_top1") and not why:
        why = "not computed: no scored answer tokens"
    why = (why or "not in this evaluation's summary").removeprefix("not computed: ")
    for part, model in (("_es", "nli_model"), ("_cs", "cs_model")):
        if part in why and str(s.get(model, "")).startswith("not computed"):
            why += f" ({'ES' if part == '_es' else 'CS'}: {str(s[model]).removeprefix('not computed: ')})"
    return why


def nc_notes(rows: list[tuple[str, dict]], cols: list[tuple[str, str]]) -> list[str]:
    """One line under a table for each column with an n/c cell: the rows it is in and why."""
    notes = []
    for name, key in cols:
        reasons = {}
        for n, s in rows:
            if s.get(key) is None:
                reasons.setdefault(nc_reason(s, key), []).append(n)
        notes += [f"n/c {name} ({', '.join(ns)}): {why}" for why, ns in reasons.items()]
    return notes


PRIVACY_COLUMNS = (("privleak", "privleak"), ("ExtStr", "extraction_strength"), ("ExactMem", "exact_memorization"))


def privacy_table(rows: list[tuple[str, dict]]) -> str:
    """privleak, extraction strength and exact memorization, one line each with a column per model, then
    where the holdout and AUC_retain came from (the last model's) and why any number is missing."""
    lines = [runlog.table([(name, *(cell(s.get(k)) for _, s in rows)) for name, k in PRIVACY_COLUMNS],
                          ("forget set", *(n for n, _ in rows)))]
    s = rows[-1][1]
    if s.get("privacy"):
        lines.append(f"privacy: holdout {s['privacy']['holdout']} ({s['privacy']['n_forget']} forget vs "
                     f"{s['privacy']['n_holdout']} holdout rows); privleak's AUC_retain {s['privleak_auc_retain']:.4f}: "
                     f"{s['privleak_auc_retain_source']}; MIA AUCs in summary.json (mia_auc/...), "
                     f"{s['privacy']['auc_convention']}")
    reasons = {}
    for n, s in rows:
        why = s.get("privacy_reason") or ("not in this evaluation's summary (--privacy false)" if "privleak" not in s
                                          else None)
        if why:
            reasons.setdefault(why.removeprefix("not computed: "), []).append(n)
    lines += [f"n/c privacy ({', '.join(ns)}): {why}" for why, ns in reasons.items()]
    return "\n".join(lines)


class MethodEval:
    """Evaluation for a method script's run: `run(model, name)` evaluates into
    OUTPUT_DIR/eval/<name>/ (a model saved on disk, like the starting one, is evaluated once and
    reused from runs/eval_cache); forget quality uses --retain_logs, or the retain model's
    forget-split logs (computed once and cached); `report(rows)` prints the comparison. Each
    evaluation's numbers also go to the run's trackers through `log` (common.RunLogger.log_eval)."""

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
        self.kw["privacy"] = scenarios.privacy_spec(
            getattr(args, "privacy", False) and args.eval, args.split, self.kw["authors"], getattr(args, "holdout_data", None),
            args.quick_retain_authors, args.forget_task is not None, getattr(args, "privacy_gradnorm", False),
            getattr(args, "extraction_form", "definition"))
        if self.kw["privacy"] and accelerator.is_main_process:
            print(f"[eval] privacy: {self.kw['privacy'].get('reason') or 'holdout ' + self.kw['privacy']['holdout_name']}",
                  flush=True)
        self.bench = evaluate_general.benchmark_tasks(getattr(args, "benchmarks", None))
        evaluate_general.check_available(getattr(args, "benchmarks", None))
        self.retain_logs = args.retain_logs
        self.attack_plan = attacks.Attacks(tokenizer, fmt, args.split, self.kw, self.out, accelerator, args.recipe, args.seed,
                                            **{k: getattr(args, k, None) for k in attacks.ATTACK_FLAGS},
                                            max_length=args.max_length)
        if self.attack_plan.active and not args.eval:
            raise common.TofuError("--relearn_attack and --quantize_attack evaluate the attacked models, which needs "
                                   "--eval true")
        self.run_dir, self.epochs, self.selection_s = Path(out_dir), [], 0.0  # the peak-epoch protocol's record
        self.full = {}  # epoch -> its full evaluation (--eval_every_epoch), which the peak row then reuses
        if args.peak_epoch and not (args.retain_logs or args.retain_model):
            raise common.TofuError("--peak_epoch chooses the epoch by forget quality, which needs --retain_model or "
                                   "--retain_logs")
        if args.eval and accelerator.is_main_process and args.subset == "quick" and not args.peak_epoch:
            print("[eval] quick path: evaluated once, after training; the RKLD paper's protocol "
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
                                                                       "data", "privacy")}
        cache = _cache_dir(self.args.retain_model, {"split": self.args.split, "tasks": "forget", **settings,
                                                    "fmt": dataclasses.asdict(self.fmt)})
        # rank 0 decides for every rank (a cache another job writes meanwhile must not split them); the
        # logs are written to a temp folder and renamed into place, so a cache is never half-written
        if not launch.main_decides(self.acc, lambda: (cache / "summary.json").exists()):
            main = self.acc.is_main_process
            if main:
                print(f"[eval] retain model {self.args.retain_model}: forget-split truth ratios", flush=True)
                cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.")) if main else cache
            model = launch.load_frozen(self.args.retain_model, self.acc)  # the trained model's precision
            evaluate(model, self.tok, self.fmt, self.args.split, tmp, tasks=("forget",), generation=False,
                     verbose=False, **{k: v for k, v in self.kw.items() if k not in ("nli_model", "cs_model")})
            del model
            gc.collect()
            if main:
                runlog.replace_dir(tmp, cache)
            self.acc.wait_for_everyone()
        self.retain_logs = str(cache)
        return self.retain_logs

    def run(self, model, name: str, cache_key: str | None = None, compare_precision: bool = True) -> dict | None:
        if name == "before" and not getattr(self.args, "eval_before", True):
            return None
        summary = self._run(model, name, cache_key, compare_precision)
        note = barely_known(summary) if name == "before" and summary and not self.real_world else None
        if note and self.acc.is_main_process:
            print(f"[eval] before: {note}", flush=True)
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
        # rank 0 reads the cache and sends what it found to every rank: one decision, one summary
        cached = launch.main_decides(self.acc, lambda: json.loads((cache / "summary.json").read_text())
                                     if cache is not None and (cache / "summary.json").exists() else None)
        if cached is not None:
            if self.acc.is_main_process:
                shutil.copytree(cache, out, dirs_exist_ok=True)
                print(f"[eval] {name}: reusing the evaluation of {cache_key} ({cache})", flush=True)
            return cached
        if self.acc.is_main_process:
            print(f"[eval] {name}", flush=True)
        summary = evaluate(model, self.tok, self.fmt, self.args.split, out, retain_logs=self._retain(), verbose=False,
                           progress=True, compare_precision=compare_precision, **self.kw)
        if self.real_world:  # MU over the held-out neighbours, FE over the forget people
            summary.update(real_world_scores(summary))
            summary["model_utility_reason"] = REAL_WORLD_NO_TOFU_MU
            summary["skipped"] = skipped(summary)
        if self.bench:  # general capability, on the same model in memory (evaluate_general.py)
            summary["benchmarks"] = evaluate_general.run_benchmarks(
                model, self.tok, self.bench, self.acc, self.args.benchmark_batch_size, self.args.benchmark_limit,
                self.args.benchmark_include_path, verbose=self.acc.is_main_process,
                metrics=evaluate_general.score_metrics(self.args.benchmarks))
        if (self.bench or self.real_world) and self.acc.is_main_process:
            runlog.atomic_write_json(out / "summary.json", summary)
        if cache is not None and self.acc.is_main_process:
            runlog.copy_dir_atomic(out, cache)
        return summary

    def epoch_end(self, model, epoch: int) -> list[tuple[str, dict | None]]:
        """After an epoch (not the last): a full evaluation with --eval_every_epoch; with --peak_epoch,
        at least forget quality (the forget split scored, no generation: what choosing the epoch needs),
        and the model's weights kept for OUTPUT_DIR/peak_model when it is the best epoch so far (launch.save_peak)."""
        if not self.args.eval or not (self.args.eval_every_epoch or self.args.peak_epoch):
            return []
        name, t0 = f"epoch{epoch}", time.time()
        if self.args.eval_every_epoch:
            summary = self.full[epoch] = self.run(model, name)
        else:
            if self.acc.is_main_process:
                print(f"[eval] {name}: forget quality", flush=True)
            summary = evaluate(model, self.tok, self.fmt, self.args.split, self.out / name, tasks=("forget",),
                               generation=False, retain_logs=self._retain(), verbose=False, progress=True,
                               **{k: v for k, v in self.kw.items() if k not in ("nli_model", "cs_model", "privacy")})
            if self.log is not None:
                self.log.log_eval(name, summary)
        if self.args.peak_epoch:
            self.epochs.append({"epoch": epoch, "forget_quality": summary["forget_quality"]})
            if first_peak(self.epochs) is self.epochs[-1]:  # a tie keeps the earlier epoch (the first peak)
                launch.save_peak(self.acc, model, self.tok, self.fmt, self.run_dir / "peak_model")  # sharded: no gather
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
        if any(e.get("saved") for e in self.epochs):  # FSDP2/ZeRO-3 kept it sharded: the HF folder written once
            launch.write_peak(self.acc, lambda: models.load_trained(self.args, self.acc), self.tok, self.fmt,
                              self.run_dir / "peak_model")
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

    def attack(self, model_dir, rows: list[tuple[str, dict | None]]) -> None:
        """--relearn_attack / --quantize_attack on the saved unlearned model (evaluation/attacks.py): their
        numbers join the evaluation after unlearning (its summary.json, under relearn_attack/... and
        quantize_attack/...), so report() prints them."""
        after = dict(rows).get("after")
        if not self.attack_plan.active or after is None:
            return
        res = self.attack_plan.run(str(model_dir), self.args.model, self.args.retain_model)
        after.update(res)
        if self.acc.is_main_process:
            runlog.atomic_write_json(self.out / "after" / "summary.json", after)
        if self.log is not None:
            self.log.log_eval("attacks", res)

    def report(self, rows: list[tuple[str, dict | None]]):
        """The end-of-run table (one line per evaluated model) and forget answers before/after."""
        rows = [(n, s) for n, s in rows if s]
        if not self.acc.is_main_process or not rows:
            return
        cols = [("FQ", "forget_quality"), ("MU", "model_utility"), ("f.ROUGE", "forget_rouge"),
                ("f.Prob", "forget_prob"), ("f.TR", "forget_truth_ratio"), ("f.leak@1", "forget_leak_top1"),
                ("r.ROUGE", "retain_rouge"), ("r.Prob", "retain_prob")]
        table = [(n, *(cell(s.get(k)) for _, k in cols)) for n, s in rows]
        print("\n" + runlog.table(table, ("model", *(c for c, _ in cols))))
        print("\n".join(nc_notes(rows, cols)))
        log = getattr(self, "log", None)  # None also for an instance made for report() alone
        if log is not None and not log.moved_steps and any(n == "after" for n, _ in rows):
            print("after: the weights did not change (no optimizer step ran at a rate above 0: see the warmup note "
                  "at the start), so its numbers are the starting model's")
        if any("privleak" in s or "privacy_reason" in s for _, s in rows):  # evaluation/privacy.py, one line each
            print("\n" + privacy_table(rows))
        if any("mu18" in s for _, s in rows):  # Closer-Look aggregates, each with the models it comes from
            print("\n" + runlog.table([(n, cell(s.get("mu18")), cell(s.get("fe")), closer_look_models(s))
                                       for n, s in rows], ("model", "MU-18", "FE", "computed with")))
            print("\n".join(nc_notes(rows, [("MU-18", "mu18"), ("FE", "fe")])))
        if getattr(self, "real_world", False):
            print("\nreal-world scenario (MU: held-out neighbours; FE: forget people)\n" + runlog.table(
                [(n, cell(s.get("real_world_mu")), cell(s.get("real_world_fe"))) for n, s in rows],
                ("model", "MU", "FE")))
            print("\n".join(nc_notes(rows, [("MU", "real_world_mu"), ("FE", "real_world_fe")])))
        attack_table = attacks.table(dict(rows).get("after") or {})
        if attack_table:
            print("\n" + attack_table)
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
            if log.exists():  # a forget-quality-only epoch (--peak_epoch without --eval_before) has no generations
                gens[n] = json.loads(log.read_text()).get("generated_text") or {}
        asked = self.kw["data"]["forget"] if "data" in getattr(self, "kw", {}) else \
            task_rows("forget", self.args.split, forget_task=self.args.forget_task)
        questions = {str(r["index"]): r["question"] for r in asked}
        for i in list(gens.get(last, {}))[:3]:  # rows by index: --row_order may not start at row 0
            _, g_last, gold = gens[last][i]
            print(f"\nQ: {questions[i]}\n  gold:   {gold!r}")
            if i in gens.get(first, {}):
                print(f"  {first + ':':7} {gens[first][i][1]!r}")
            print(f"  {last + ':':7} {g_last!r}")
