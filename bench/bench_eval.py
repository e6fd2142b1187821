"""Speed of evaluation.engine.evaluate vs a straightforward reference-style loop, same run, same model, same rows.

The reference loop does what the TOFU code does (spec tofu_eval.md §1, §3, §8): every sequence padded to
200 tokens; answers in batches of 30; paraphrased and perturbed answers in batches of 7 with one forward
per perturbed-answer slot; greedy generation of every prompt batch to a total length of 200, without
stopping at EOS. Both use the same tokenization (common.encode_qa), so their per-sample losses must agree;
the script asserts |difference| < 1e-4 and prints the speed ratio. Ours runs before and after the
reference and the two times are averaged, which cancels a steady drift in the load of a shared machine.
With --old_path (default on) the evaluator also runs once with its fast paths off (one padded row per
sequence and the model's generate: engine.score_padded, no greedy_cached), and the table gives the
per-row agreement of the two (losses, generations, ROUGE) and the ratio between them.
The primary ratio uses process CPU time, which neither another process's load nor a paused process
inflates; run with OMP_NUM_THREADS=1 so that OpenMP spin-waiting does not count as work. Wall time is
reported beside it.
Where ours wins: each question's prompt computed once, its answers packed behind it and logits only
where a label is scored (engine.score_packed); generation that continues from the prompt keys and
values scoring computed and drops each row from the batch at its EOS (engine.greedy_cached); one
length-sorted pool for all tasks. A model that never stops (the untuned embedded SmolLM2 often rambles
to the cap) leaves generation to dominate both loops, so the ratio is lower there.

  OMP_NUM_THREADS=1 python bench/bench_eval.py --model runs/models/smollm2-135m_quick4-forget01_full --n 10
  python bench/bench_eval.py --model PATH --split forget05 --n 30 --output_json bench.json
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from harness import models, runlog  # noqa: E402
from evaluation import engine  # noqa: E402
from evaluation import logs as tofu_logs  # noqa: E402


@dataclass
class Args:
    model: str = field(default="smollm2-135m", metadata={"help": "Model: preset, folder or HF id."})
    split: str = field(default="forget01", metadata={"help": "Forget split."})
    n: int = field(default=8, metadata={"help": "Rows per task (the first n of each split)."})
    max_length: int = field(default=200, metadata={"help": "Reference padding and total generation length "
                                                           "(TOFU eval: 200)."})
    tol: float = field(default=1e-4, metadata={"help": "Largest allowed per-sample loss difference (nats/token)."})
    output_json: str = field(default="", metadata={"help": "Optional JSON file for the numbers."})
    old_path: bool = field(default=True, metadata={"help": "Also run the evaluator with its fast paths off (one "
                                                           "padded row per sequence, the model's generate) and "
                                                           "compare per row (default: on)."})


@torch.no_grad()
def reference_task(model, tok, fmt, task, rows, max_length, device) -> tuple[list[dict], list[str]]:
    """Per-row average NLLs and generations, computed the slow, TOFU-code way."""
    t = tofu_logs.TASKS[task]
    pad = tok.pad_token_id

    def avg_nll(pairs):  # one forward over (question, answer) pairs padded to max_length
        enc = [common.encode_qa(tok, fmt, q, a, max_length) for q, a in pairs]
        feats = [{"input_ids": e["input_ids"] + [pad] * (max_length - len(e["input_ids"])),
                  "labels": e["labels"] + [-100] * (max_length - len(e["labels"])),
                  "attention_mask": [1] * len(e["input_ids"]) + [0] * (max_length - len(e["input_ids"]))}
                 for e in enc]
        b = {k: torch.tensor([f[k] for f in feats], device=device) for k in feats[0]}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return (-common.answer_logprob_stats(logits, b["labels"])[1]).tolist()

    gt = [x for i in range(0, len(rows), 30) for x in avg_nll([(r["question"], r["answer"]) for r in rows[i:i + 30]])]
    para, pert = [], []
    for i in range(0, len(rows), 7):
        chunk = rows[i:i + 7]
        para += avg_nll([(r["question"], r[t.base_key]) for r in chunk])
        slots = [avg_nll([(r["question"], r["perturbed_answer"][j]) for r in chunk])
                 for j in range(len(chunk[0]["perturbed_answer"]))]
        pert += [list(x) for x in zip(*slots)]
    gens = []
    for i in range(0, len(rows), 30):
        prompts = [{"input_ids": common.encode_prompt(tok, fmt, r["question"])} for r in rows[i:i + 30]]
        b = {k: v.to(device) for k, v in common.collate(prompts, pad, "left").items()}
        out = model.generate(**b, max_length=max_length, do_sample=False, pad_token_id=pad, eos_token_id=None)
        for seq in out[:, b["input_ids"].shape[1]:].tolist():
            cut = next((k for k, x in enumerate(seq) if x == tok.eos_token_id), len(seq))
            gens.append(tok.decode(seq[:cut], skip_special_tokens=True))
    return [{"avg_gt_loss": g, "avg_paraphrased_loss": p, "average_perturb_loss": q}
            for g, p, q in zip(gt, para, pert)], gens


def old_path_agreement(new: dict, old: dict, cpu_old: float, cpu_new: float) -> dict:
    """Per-row agreement of the evaluator's logs with its fast paths on (`new`) and off (`old`): the
    largest loss difference (nats/token) and probability difference over every row and answer, and
    the fractions of rows with the same generation and the same ROUGE-L recall."""
    worst_loss = worst_prob = 0.0
    same_gen = same_rouge = n = 0
    for task, log in old.items():
        for i in log["avg_gt_loss"]:
            a = [log["avg_gt_loss"][i], *([log["avg_paraphrased_loss"][i], *log["average_perturb_loss"][i]]
                                         if "avg_paraphrased_loss" in log else [])]
            b = [new[task]["avg_gt_loss"][i], *([new[task]["avg_paraphrased_loss"][i],
                                                 *new[task]["average_perturb_loss"][i]]
                                                if "avg_paraphrased_loss" in log else [])]
            worst_loss = max(worst_loss, *(abs(x - y) for x, y in zip(a, b)))
            worst_prob = max(worst_prob, *(abs(math.exp(-x) - math.exp(-y)) for x, y in zip(a, b)))
            same_gen += new[task]["generated_text"][i] == log["generated_text"][i]
            same_rouge += new[task]["rougeL_recall"][i] == log["rougeL_recall"][i]
            n += 1
    return {"cpu_seconds_old_path": round(cpu_old, 1), "speedup_cpu_vs_old_path": round(cpu_old / cpu_new, 2),
            "max_abs_loss_diff_vs_old_path": f"{worst_loss:.2e}", "max_abs_prob_diff_vs_old_path": f"{worst_prob:.2e}",
            "same_generation_vs_old_path": f"{same_gen}/{n}", "same_rougeL_vs_old_path": f"{same_rouge}/{n}"}


def main():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model, tok = models.load_model(args.model, frozen=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    fmt = models.prompt_format(tok, args.model)
    with torch.no_grad():  # warm-up, so neither side pays for first-call allocation
        model(input_ids=torch.tensor([common.encode_prompt(tok, fmt, "Warm up?")], device=device))

    def timed(fn):  # (CPU seconds, wall seconds, result)
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        return time.process_time() - c0, time.perf_counter() - w0, out

    def ours():  # the evaluator as the scripts run it: every task in one call (pooled batches)
        with tempfile.TemporaryDirectory() as tmp:
            engine.evaluate(model, tok, fmt, args.split, tmp, max_eval_samples=args.n, cs_model="none",
                            nli_model="none", verbose=False)
            return tofu_logs.read_logs(tmp)

    def today():  # the evaluator with packed scoring and pruned decoding off
        with mock.patch.object(engine, "packs_prompts", lambda *a, **k: False), \
                mock.patch.object(engine, "prunes_finished", lambda *a, **k: False):
            return ours()

    def reference():
        rows = {t: engine.task_rows(t, args.split, max_eval_samples=args.n) for t in tofu_logs.TASKS}
        return {t: (r, *reference_task(model, tok, fmt, t, r, args.max_length, device)) for t, r in rows.items()}

    # ours, reference, ours again: averaging the two runs of ours cancels a steady drift in machine load.
    load = [os.getloadavg()[0]]
    runs = []
    plan = [("ours", ours), ("reference", reference), *([("old path", today)] if args.old_path else []), ("ours", ours)]
    for name, fn in plan:
        runs.append(timed(fn))
        load.append(os.getloadavg()[0])
        print(f"[bench] {name}: {runs[-1][0]:.1f} CPU s, {runs[-1][1]:.1f} wall s", flush=True)
    logs, ref = runs[0][2], runs[1][2]
    cpu_ours, wall_ours = (runs[0][0] + runs[-1][0]) / 2, (runs[0][1] + runs[-1][1]) / 2

    worst, same_gen, n_rows, skipped = 0.0, 0, 0, 0
    for task, (rows, recs, gens) in ref.items():
        log = logs[task]
        for r, rec, gen in zip(rows, recs, gens):
            i = str(r["index"])
            long = max(len(common.encode_qa(tok, fmt, r["question"], a)["input_ids"])
                       for a in [r["answer"], r[tofu_logs.TASKS[task].base_key], *r["perturbed_answer"]])
            if long > args.max_length:  # the reference truncates these; losses are not comparable
                skipped += 1
                continue
            mine = [log["avg_gt_loss"][i], log["avg_paraphrased_loss"][i], *log["average_perturb_loss"][i]]
            theirs = [rec["avg_gt_loss"], rec["avg_paraphrased_loss"], *rec["average_perturb_loss"]]
            worst = max(worst, max(abs(a - b) for a, b in zip(mine, theirs)))
            same_gen += log["generated_text"][i][1] == gen
            n_rows += 1

    numbers = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
               "load_average_1min": " ".join(f"{x:.2f}" for x in load), "rows_per_task": args.n,
               "rows_compared": n_rows, "rows_skipped_truncated": skipped, "cpu_seconds_ours": f"{runs[0][0]:.1f} / {runs[-1][0]:.1f}",
               "cpu_seconds_reference": round(runs[1][0], 1), "speedup_cpu": round(runs[1][0] / cpu_ours, 2),
               "wall_seconds_ours": f"{runs[0][1]:.1f} / {runs[-1][1]:.1f}", "wall_seconds_reference": round(runs[1][1], 1),
               "speedup_wall": round(runs[1][1] / wall_ours, 2),
               "max_abs_loss_diff": f"{worst:.2e}", "same_generation_fraction": same_gen / max(n_rows, 1)}
    if args.old_path:
        numbers.update(old_path_agreement(logs, runs[2][2], runs[2][0], cpu_ours))
    print(runlog.table([(k, v) for k, v in numbers.items()], ("quantity", "value")))
    if args.output_json:
        runlog.atomic_write_json(args.output_json, numbers)
    if worst >= args.tol:
        raise common.TofuError(f"per-sample losses differ by {worst:.2e} >= {args.tol:g} between the two loops")


if __name__ == "__main__":
    common.cli(main)
