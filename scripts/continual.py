"""Continual unlearning (closer-look, arXiv 2410.08109, §5.2): unlearn tasks 1..N of a split
one launch at a time, each starting from the previous task's unlearned model, then write a
table of MU, FE and the forget split's ROUGE-L and Prob after every task.

  python scripts/continual.py --method me_gd --split forget01 --tasks 10
  python scripts/continual.py --method idk_ap --split forget10 --tasks 9 \\
      --model locuslab/tofu_ft_llama2-7b --launcher "accelerate launch" -- --max_eval_samples 300

Task k runs `METHOD.py --forget_task k --model <task k-1>/model`, writing to
<out>/task<k>/ (default out: runs/continual/<method>/<split>). Flags after `--` go to every
launch. On the quick path (--model quick) later tasks also get --subset quick and the
script's quick recipe (--recipe quick), which a model folder would not select by itself. A task whose
folder already holds model/ and eval/after/summary.json is skipped, so a stopped sequence
resumes. The table (continual.md in <out>) has one row per task, plus task 0 = the
starting model; its columns come from each eval/<before|after>/summary.json. For
baselines.py, pass its method after `--` and a separate --out per baseline.
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# forget ROUGE-L and Prob: offline signals of forgetting, where FE (its ES term needs an NLI model from the hub) is n/a
COLUMNS = [("MU", "model_utility"), ("MU-18", "mu18"), ("FE", "fe"), ("FQ", "forget_quality"),
           ("forget ROUGE-L", "forget_rouge"), ("forget Prob", "forget_prob")]


def task_command(method: str, split: str, k: int, model: str, out: Path, launcher: str, extra: list[str]) -> list[str]:
    cmd = [*shlex.split(launcher), str(REPO / f"{method}.py"), "--split", split, "--forget_task", str(k),
           "--output_dir", str(out / f"task{k}")]
    if k == 1:
        return cmd + ["--model", model, *extra]
    # the start, task k-1's model, was evaluated at the end of task k-1: no "before" evaluation again
    cmd += ["--model", str(out / f"task{k - 1}" / "model"), "--eval_before", "false"]
    if model == "quick":  # keep task 1's data subset and recipe (extra flags still override them)
        cmd += ["--subset", "quick", "--recipe", "quick"]
    return cmd + extra


def launch(cmd: list[str]) -> int:
    return subprocess.run(cmd, cwd=REPO).returncode


def write_table(out: Path, tasks: int) -> str:
    rows = [(0, out / "task1" / "eval" / "before")] + [(k, out / f"task{k}" / "eval" / "after")
                                                       for k in range(1, tasks + 1)]
    lines = ["| task | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    summaries = [json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
                 for _, d in rows]
    for (k, _), s in zip(rows, summaries):
        cells = [f"{s[key]:.4f}" if isinstance(s.get(key), (int, float)) else "n/a" for _, key in COLUMNS]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    done, notes = [s for s in summaries if s], []
    for name, key in COLUMNS:  # a column that no evaluated task has: say why once, in the evaluator's words
        if done and not any(isinstance(s.get(key), (int, float)) for s in done):
            why = next((s[f"{key}_reason"] for s in reversed(done) if s.get(f"{key}_reason")), "not in the summaries")
            notes.append(f"{name} is n/a in every row: {why.removeprefix('not computed: ')}")
    lines += [""] + notes if notes else []
    text = "\n".join(lines) + "\n"
    tmp = out / ".continual.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "continual.md")
    return text


def main(argv=None):
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--method", required=True, choices=["me_gd", "idk_ap", "rkld", "baselines"])
    p.add_argument("--split", default="forget01", choices=["forget01", "forget05", "forget10"])
    p.add_argument("--tasks", type=int, default=None, help="N: unlearn tasks 1..N (paper: 10, or 9 for forget10)")
    p.add_argument("--model", default="quick", help="the starting model of task 1 (as the method scripts take it); "
                   "'quick' is the continual target, which must be built first: python finetune.py --split SPLIT "
                   "--continual")
    p.add_argument("--out", default=None, help="folder of the per-task runs and the table; None: "
                   "runs/continual/METHOD/SPLIT")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help='e.g. "accelerate launch"')
    args, extra = p.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    tasks = args.tasks or (9 if args.split == "forget10" else 10)
    out = Path(args.out or REPO / "runs" / "continual" / args.method / args.split)
    for k in range(1, tasks + 1):  # each task's run makes its folder once its checks pass: a refusal leaves none
        done = out / f"task{k}"
        if (done / "model" / "config.json").exists() and (done / "eval" / "after" / "summary.json").exists():
            print(f"[continual] task {k}: done already, skipped", flush=True)
            continue
        cmd = task_command(args.method, args.split, k, args.model, out, args.launcher, extra)
        print(f"[continual] task {k}/{tasks}: {shlex.join(cmd)}", flush=True)
        if launch(cmd) != 0:
            raise SystemExit(f"error: task {k} failed; fix it and rerun this command to resume from task {k}")
    out.mkdir(parents=True, exist_ok=True)
    print(write_table(out, tasks))


if __name__ == "__main__":
    main()
