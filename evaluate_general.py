"""General-capability benchmarks through lm-eval (EleutherAI's lm-evaluation-harness), on a model in
memory: the unlearned model is handed to lm-eval as it is, never saved and reloaded.

Presets (--benchmarks):
  rkld         the RKLD paper's Table 1 (Wang et al. 2024): PIQA, HellaSwag, ARC-Easy, ARC-Challenge,
               COPA, WinoGrande, MathQA; accuracy
  closer_look  Closer-Look §5.3 (Yuan et al. 2024, real-world scenario): MMLU, ARC-Challenge, GSM8K,
               TriviaQA, TruthfulQA-MC1, with lm-evaluation-harness (its App. D)
or a comma-separated list of lm-eval task names (presets may be mixed in), or none.

Each task reports one score (SCORE_METRICS: accuracy for multiple choice, exact match for GSM8K
and TriviaQA) beside every number lm-eval returns. A task that cannot be fetched (no network, no
such task) is reported in one sentence and left out; the others still run. lm-eval is optional:
pip install lm_eval==0.4.13.

Launch (standalone):
  python evaluate_general.py --model PATH --benchmarks rkld --output_json scores.json
Method scripts: --benchmarks rkld (scores in summary.json and the end-of-run table, before and after).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

import common
from harness import flags, launch, models, runlog

BENCHMARKS = {
    "rkld": ("piqa", "hellaswag", "arc_easy", "arc_challenge", "copa", "winogrande", "mathqa"),
    "closer_look": ("mmlu", "arc_challenge", "gsm8k", "triviaqa", "truthfulqa_mc1"),
}
# The score of each task, in order of preference: the first of these lm-eval returns ...
SCORE_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,remove_whitespace", "exact_match,none")
# ... unless a preset's paper read another one. Closer-Look's real_world_eval.py (summary_results)
# reads ARC-C acc_norm, TriviaQA exact_match remove_whitespace, GSM8K exact_match flexible-extract.
PRESET_METRICS = {"closer_look": {"arc_challenge": "acc_norm,none", "triviaqa": "exact_match,remove_whitespace",
                                  "gsm8k": "exact_match,flexible-extract"}}
INSTALL = "pip install lm_eval==0.4.13"


def benchmark_tasks(spec: str | None) -> list[str]:
    """Task names for --benchmarks: 'none' (or empty) -> [], a preset -> its tasks, else a comma list
    of task names and presets, each task once, in order."""
    if not spec or spec == "none":
        return []
    out = []
    for part in (p.strip() for p in spec.split(",")):
        for task in BENCHMARKS.get(part, (part,) if part else ()):
            if task not in out:
                out.append(task)
    return out


def score_metrics(spec: str | None) -> dict[str, str]:
    """{task: metric} that a preset named in --benchmarks reads (PRESET_METRICS); the first preset
    named wins for a task in two."""
    out = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        for task, metric in PRESET_METRICS.get(part, {}).items():
            out.setdefault(task, metric)
    return out


def check_available(spec: str | None) -> None:
    """Refuse --benchmarks without lm-eval, before any model is loaded."""
    if benchmark_tasks(spec):
        import importlib.util
        if importlib.util.find_spec("lm_eval") is None:
            raise common.TofuError(f"--benchmarks needs the optional package lm-eval: {INSTALL}")


def task_score(results: dict, prefer: str | None = None) -> tuple[str, float] | None:
    """(metric, value) of one task's lm-eval results: `prefer` if it is there, else the first of
    SCORE_METRICS, else the first metric."""
    for m in ((prefer,) if prefer else ()) + SCORE_METRICS:
        if isinstance(results.get(m), (int, float)):
            return m, float(results[m])
    nums = [(k, float(v)) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and "," in k and "stderr" not in k]  # metric,filter keys; not sample_len
    return nums[0] if nums else None


@torch.no_grad()
def run_benchmarks(model, tokenizer, tasks: list[str], accelerator=None, batch_size: int = 8,
                   limit: int | None = None, include_path: str | None = None, num_fewshot: int | None = None,
                   verbose: bool = True, metrics: dict[str, str] | None = None) -> dict:
    """Score an in-memory model on lm-eval tasks, one task at a time so that one that cannot be
    fetched does not stop the others. Returns {"scores": {task: value}, "metrics": {task: {metric:
    value}}, "score_metric": {task: metric}, "skipped": {task: reason}, "seconds": s}; `metrics` picks
    a task's score metric (score_metrics), else task_score's order. Runs on the main
    process (the others wait): lm-eval gets the whole model, so models sharded across processes
    (FSDP2, ZeRO-3) are skipped with a reason."""
    out = {"scores": {}, "metrics": {}, "score_metric": {}, "skipped": {}, "limit": limit, "seconds": 0.0}
    if not tasks:
        return out
    is_main = accelerator is None or accelerator.is_main_process
    if launch.shards_parameters(accelerator):
        out["skipped"] = {t: "not run: lm-eval needs the whole model, which is sharded across processes"
                          for t in tasks}
        return out
    if is_main:
        out = _run_main(model, tokenizer, tasks, out, batch_size, limit, include_path, num_fewshot, verbose,
                        accelerator, metrics or {})
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        box = [out]
        broadcast_object_list(box, from_process=0)
        out = box[0]
    return out


def _run_main(model, tokenizer, tasks, out, batch_size, limit, include_path, num_fewshot, verbose, accelerator,
              metrics):
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise common.TofuError(f"--benchmarks needs the optional package lm-eval: {INSTALL}") from None
    if accelerator is not None and isinstance(model, torch.nn.Module):
        model = accelerator.unwrap_model(model)
    was_training = getattr(model, "training", False)
    model.eval()
    t0 = time.time()
    # Only the task folder when one is given and every task is found there: indexing lm-eval's
    # own thousands of tasks takes seconds.
    manager = TaskManager(include_path=include_path, include_defaults=not include_path)
    if include_path and not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    # BOS as the tokenizer adds it on its own (Llama-3, Llama-2: yes), which lm-eval leaves out unless
    # told; Closer-Look ran lm-eval with add_bos_token=True on Llama-3.
    bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
    for task in tasks:
        try:
            res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
        except Exception as e:  # unknown names and unreachable datasets come in many types
            why = str(e).splitlines()[0][:160] if str(e) else ""
            out["skipped"][task] = f"could not be fetched or run ({type(e).__name__}: {why})"
            if verbose:
                print(f"[benchmarks] {task} could not be fetched or run ({type(e).__name__}); the other tasks "
                      "go on without it", flush=True)
            continue
        res = res or {}
        r = res.get("groups", {}).get(task) or res.get("results", {}).get(task) or {}  # a group (mmlu): its mean
        picked = task_score(r, metrics.get(task))
        if picked:
            out["scores"][task], out["score_metric"][task] = picked[1], picked[0]
            out["metrics"][task] = {k: float(v) for k, v in r.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if task not in out["scores"] and task not in out["skipped"]:
            out["skipped"][task] = "lm-eval returned no score for it"
        elif verbose and task in out["scores"]:
            print(f"[benchmarks] {task}: {out['score_metric'][task]} = {out['scores'][task]:.4f}", flush=True)
    if was_training:
        model.train()
    out["seconds"] = round(time.time() - t0, 1)
    return out


def table(rows: list[tuple[str, dict | None]]) -> str | None:
    """The end-of-run benchmark table: one line per task, one column per evaluated model."""
    rows = [(n, s["benchmarks"]) for n, s in rows if s and s.get("benchmarks")]
    tasks = list(dict.fromkeys(t for _, b in rows for t in (*b["scores"], *b["skipped"])))
    if not tasks:
        return None
    body = [(t, *(b["scores"].get(t, "n/c") for _, b in rows)) for t in tasks]
    return runlog.table(body, ("benchmark", *(n for n, _ in rows)))


# ---------------------------------------------------------------------------
# Main (standalone)
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    model: str = flags.flag("", "Model to score: a folder, HF id or the preset smollm2-135m.")
    benchmarks: str = flags.flag("rkld", "rkld, closer_look, a comma list of lm-eval task names (presets may be mixed in), or none.")
    output_json: str = flags.flag("", "Where the scores go (JSON).")
    benchmark_limit: int = flags.flag(None, "Rows per task (lm-eval's limit), for smoke runs. Default: every row.")
    benchmark_batch_size: int = flags.flag(8, "Sequences per lm-eval forward.")
    benchmark_include_path: str = flags.flag(None, "A folder of lm-eval task YAMLs (your own tasks).")
    num_fewshot: int = flags.flag(None, "Few-shot examples; default: each task's own (lm-eval).")


def main():
    from accelerate import Accelerator
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    if not args.model or not args.output_json:
        raise common.TofuError("give --model PATH and --output_json FILE")
    check_available(args.benchmarks)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, tok = models.load_model(args.model, frozen=True)
    model = launch.place_frozen(model, accelerator)
    res = run_benchmarks(model, tok, benchmark_tasks(args.benchmarks), accelerator, args.benchmark_batch_size,
                         args.benchmark_limit, args.benchmark_include_path, args.num_fewshot,
                         metrics=score_metrics(args.benchmarks))
    if accelerator.is_main_process:
        runlog.atomic_write_json(Path(args.output_json), res)
        print(table([("model", {"benchmarks": res})]))


if __name__ == "__main__":
    common.cli(main)
