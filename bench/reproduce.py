"""Regenerate RESULTS.md: run a named grid of (method, learning rate, seed) on the embedded quick
path, collect every run into results/results.json, then write RESULTS.md and its plots.

  python bench/reproduce.py                       # every grid, in order, then the report
  python bench/reproduce.py --grid sweep --jobs 2 # one grid, two runs at a time (one thread each)
  python bench/reproduce.py --list                # what each grid holds and what is done
  python bench/reproduce.py --jobs 2 --hours 2.5  # start no run after 2.5 h (those under way finish)
  python bench/reproduce.py --report_only         # RESULTS.md and plots from results/results.json

Grids (forget01, quick subset, `--peak_epoch true` everywhere but robust, so each run has its first-peak epoch):
  reference  the quick retain model evaluated like every run (the target's row is each run's "before")
  sweep      every method at lr 1e-4 (the quick recipe), 5e-5 and 2e-5, seed 42
  seeds      seeds 1 and 2 for every method at its chosen lr (LR_RULE); waits for the sweep. The
             seed-1 runs of RKLD, ME+GD, IDK+AP, GA+GD and NPO+GD evaluate in full after every epoch
             (--eval_every_epoch): the per-epoch curves, without training those runs a second time
  shared     Closer-Look Table 4's pairs (ME+GD / GA+GD, IDK+AP / IDK+GD) at one shared lr, 1e-4, seeds 1
             and 2, as that paper trains every method at one lr (see SHARED); 6 runs (ME+GD's 2 are the seeds
             grid's); its own verdict beside the one at each method's chosen lr
  gpu        (named only, on a machine with a GPU) the full benchmark of the embedded model: every author,
             forget05 and forget10, RKLD, ME+GD, IDK+AP, GA+GD and NPO+GD at seed 42 (see gpu_items)
  continual  the continual quick target (finetune.py --continual true: every author of forget01's 10
             tasks), then ME+GD, IDK+AP, NPO+GD and GA+GD over the first 5 tasks (scripts/continual.py),
             MU and FE after every task; then the same four again at one lower lr, 5e-5 (see
             CONTINUAL_LOW_LR). 5, not 10: a task should cost about 17 minutes of one core
             here (a sweep run's 25, measured, less its 8 of per-epoch forget-quality evaluations), so
             the 4 sequences of 10 would take 11 core-hours; forget01's decline (Closer-Look §5.2: the
             baselines' MU "nearly zero on a certain subtask") shows within the first tasks
  robust     every method of the seeds grid at its chosen lr, seed 42, with --relearn_attack true
             --quantize_attack 4bit,8bit (evaluation/attacks.py; needs bitsandbytes, an optional install:
             requirements.txt) and privacy on (the default); waits for the sweep. The retain and target
             yardsticks come from the attacks' caches, so the first run goes alone until it has finished.
             With --peak_epoch false: its numbers are the last epoch's (the saved model the attacks load)

The grids' methods, rates, seeds and the lr rule that picks each method's rate (LR_RULE) are defined in
bench/grids.py, which bench/results_report.py reads too.

Resuming: a run recorded in results/results.json is never run again (run folders do not outlive a
machine; the results file is committed), and a run whose folder already holds
eval/after/summary.json is collected without training. Each run's log is runs/grid/<name>.log.
On a new machine the quick target and retain models are built first (finetune.py), and so is a recorded
model that runs still to do start from (the continual target, the gpu grid's models); a grid whose
first run fails before any has succeeded stops with that run's error.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import subprocess
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import grids  # noqa: E402
from grids import (CONTINUAL, CONTINUAL_LOW_LR, CONTINUAL_TASKS, CURVE_SEED, CURVES, FIRST_SEED, GPU_METHODS,  # noqa: E402
                   GPU_SPLITS, GRIDS, METHOD_GRIDS, METHODS, MORE_SEEDS, ROBUST_BITS, ROBUST_FLAGS, SHARED, SHARED_LR,
                   SWEEP_LRS, chosen_lr, load_results)

GRID_DIR = REPO / "runs" / "grid"
BASE = ["--split", "forget01", "--peak_epoch", "true"]
GPU_FINETUNE = ["--subset", "all", "--batch_size", "32", "--per_device_batch_size", "32"]  # README, On GPUs


def run_name(method: str, lr: float, seed: int, tag: str = "") -> str:
    return f"{method}-lr{lr:g}-seed{seed}{'-' + tag if tag else ''}"


def save_results(records: list[dict]) -> None:
    """Write the records merged into what the file holds now (a record of the same name is replaced), so
    two sittings of different grids running at once do not drop each other's runs."""
    path = grids.RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {r["name"]: r for r in grids.load_results()} | {r["name"]: r for r in records}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(merged.values(), key=lambda r: r["name"]), indent=1) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# The grids: each item is a dict with name, grid, method, lr, seed, command, and what it needs
# ----------------------------------------------------------------------------------------------
def method_item(grid: str, method: str, lr: float, seed: int, extra=(), tag: str = "") -> dict:
    script, flags = METHODS[method]
    name = run_name(method, lr, seed, tag)
    # the robust grid reads the last epoch (the saved model its attacks load): no per-epoch forget quality (false,
    # not left out: rkld.py's default turns it on)
    base = ["--split", "forget01", "--peak_epoch", "false"] if grid == "robust" else BASE
    cmd = [sys.executable, script, *base, *flags, "--lr", f"{lr:g}", "--seed", str(seed),
           "--output_dir", str(GRID_DIR / name), *extra]
    return {"name": name, "grid": grid, "method": method, "lr": lr, "seed": seed, "command": cmd}


def share_teacher(items: list[dict]) -> list[dict]:
    """Every RKLD-family run of a seed reuses the strengthened model (the teacher's second half) of
    that seed's first RKLD run when its folder is still here: strengthening does not depend on the
    student's lr or divergence, and on CPU it is deterministic, so this only saves its 3 minutes."""
    first = {}
    for it in items:
        if it["method"].startswith("rkld"):
            first.setdefault(it["seed"], it["name"])
            if first[it["seed"]] != it["name"]:
                it["teacher_from"] = first[it["seed"]]
    return items


def grid_items(grid: str, records: list[dict]) -> tuple[list[dict], list[str]]:
    """(items, reasons some items cannot be listed yet)."""
    waiting = []
    if grid == "reference":
        from harness import models
        retain = models.finetuned_dir("smollm2-135m", "forget01", "quick", "retain99")
        return [{"name": "retain-model", "grid": grid, "method": "retain", "lr": None, "seed": None,
                 "command": [sys.executable, "evaluate_tofu.py", "--model", str(retain), "--split", "forget01",
                             "--quick", "true", "--retain_model", str(retain), "--max_eval_samples", "20",
                             "--output_dir", str(GRID_DIR / "retain-model" / "eval" / "after")]}], waiting
    if grid == "sweep":
        items = [method_item("sweep", m, lr, FIRST_SEED, ["--eval_teacher", "true"] if (m, lr) == ("rkld", 1e-4) else ())
                 for lr in SWEEP_LRS for m in METHODS]
        return share_teacher(items), waiting
    if grid == "seeds":
        items = []
        for m in METHODS:
            lr = chosen_lr(m, records)
            if lr is None:
                waiting.append(f"{m}: its sweep is not complete")
                continue
            items += [method_item("seeds", m, lr, s, ["--eval_every_epoch", "true"] if (m in CURVES and s == CURVE_SEED)
                                  else ()) for s in MORE_SEEDS]
        return share_teacher(items), waiting
    if grid == "robust":  # tagged: seed 42 at the chosen lr is also a sweep run's name
        items = []
        for m in METHODS:
            if (lr := chosen_lr(m, records)) is None:
                waiting.append(f"{m}: its sweep is not complete")
                continue
            items.append(method_item("robust", m, lr, FIRST_SEED, ROBUST_FLAGS, tag="robust"))
        return share_teacher(items), waiting
    if grid == "shared":  # ME+GD's seeds at 1e-4 are the seeds grid's (its chosen lr): same names, done there
        # seed by seed, so that a sitting that runs two runs gives both methods of a pair a second seed
        return [method_item("shared", m, SHARED_LR, s) for s in MORE_SEEDS for pair in SHARED for m in pair], waiting
    if grid == "continual":
        items = [{"name": "continual-target", "grid": grid, "method": "finetune", "lr": None, "seed": None,
                  "command": [sys.executable, "finetune.py", "--split", "forget01", "--continual", "true"],
                  "collect": "target"}]
        # the quick recipe's lr (None: each script's QUICK), then the lower lr; in pairs (ours, its baseline)
        for lr, prefix in ((None, "continual-"), (CONTINUAL_LOW_LR, "continual-low-")):
            for m in CONTINUAL:
                script = m if m in ("me_gd", "idk_ap") else "baselines"
                extra = (["--method", m] if script == "baselines" else []) + (["--lr", f"{lr:g}"] if lr else [])
                cmd = [sys.executable, "scripts/continual.py", "--method", script, "--split", "forget01",
                       "--tasks", str(CONTINUAL_TASKS), "--out", str(GRID_DIR / f"{prefix}{m}")]
                items.append({"name": f"{prefix}{m}", "grid": grid, "method": m, "lr": lr, "seed": FIRST_SEED,
                              "command": cmd + (["--", *extra] if extra else []), "needs": "continual-target",
                              "collect": "continual"})
        return items, waiting
    if grid == "gpu":
        return gpu_items(records), waiting
    raise SystemExit(f"error: unknown grid {grid!r}; choose from {', '.join(GRIDS)}, all or gpu")


def gpu_items(records: list[dict]) -> list[dict]:
    """The full benchmark of the embedded model (every author, forget05 and forget10, up to 300 evaluation
    rows as the papers) for the main methods, seed 42: the paper defaults (batch 32, their epochs) but each
    method's lr chosen on the CPU sweep (the papers' 1e-5 is for a 7B model) and RKLD's strengthening at the
    embedded model's fine-tuning lr, 2e-4. Each split's item builds the target (all 200 authors, one folder for
    both splits: finetune.py skips it when it exists) and its retain model, on the machine that runs the
    split's methods: a machine that only runs forget10 builds no retain95 (1 min of a 15-min GPU loan)."""
    import common
    from harness import models
    full = models.finetuned_dir("smollm2-135m", "forget05", "all", "full")
    items = []
    for split in GPU_SPLITS:
        retain = models.finetuned_dir("smollm2-135m", split, "all", common.RETAIN_OF[split])
        build = f"gpu-models-{split}"
        items.append({"name": build, "grid": "gpu", "method": "finetune", "lr": None, "seed": None, "split": split,
                      "command": [sys.executable, "finetune.py", "--split", split, *GPU_FINETUNE],
                      "needs": None, "collect": "models",
                      "models": [str(full), str(retain)]})
        for m in GPU_METHODS:
            script, flags = METHODS[m]
            lr = chosen_lr(m, records) or SWEEP_LRS[0]
            name = f"gpu-{m}-{split}"
            items.append({"name": name, "grid": "gpu", "method": m, "lr": lr, "seed": FIRST_SEED, "split": split,
                          "command": [sys.executable, script, "--split", split, *flags, "--model", str(full),
                                      "--retain_model", str(retain), "--lr", f"{lr:g}", "--seed", str(FIRST_SEED),
                                      "--peak_epoch", "true", "--max_eval_samples", "300",
                                      *(["--strengthen_lr", "2e-4"] if m == "rkld" else []),
                                      "--output_dir", str(GRID_DIR / name)],
                          "needs": build})
    return items


# ----------------------------------------------------------------------------------------------
# Collecting a finished run folder into one record
# ----------------------------------------------------------------------------------------------
def scalars(path: Path) -> dict | None:
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    out = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["settings"] = {k: s.get("settings", {}).get(k) for k in ("precision", "max_eval_samples", "world_size")}
    return out


def collect(item: dict, wall_s: float | None, jobs: int) -> dict:
    rec = {k: v for k, v in item.items() if k not in ("command", "teacher_from", "needs", "collect", "models")}
    rec["command"] = shlex.join([Path(c).name if c == sys.executable else c for c in item["command"]])
    rec.update(wall_s=None if wall_s is None else round(wall_s, 1), jobs=jobs,
               finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = GRID_DIR / item["name"]
    kind = item.get("collect", "method")
    if kind == "target":
        from harness import models
        rec["model"] = str(models.finetuned_dir("smollm2-135m", "forget01", "quick", "full", continual=True))
        rec["info"] = info_of(Path(rec["model"]) / "args.json")
        return rec
    if kind == "models":
        rec["models"] = item["models"]
        rec["info"] = info_of(Path(item["models"][-1]) / "args.json")
        return rec
    if kind == "continual":
        tasks = [("0", out / "task1" / "eval" / "before")] + [
            (str(k), out / f"task{k}" / "eval" / "after") for k in range(1, CONTINUAL_TASKS + 1)]
        rec["tasks"] = {k: scalars(d / "summary.json") for k, d in tasks}
        rec["info"] = info_of(out / "task1" / "args.json")
        return rec
    rec["info"] = info_of(out / "args.json")
    rec["before"] = scalars(out / "eval" / "before" / "summary.json")
    rec["last"] = scalars(out / "eval" / "after" / "summary.json")
    rec["teacher"] = scalars(out / "eval" / "teacher" / "summary.json")
    peak = json.loads((out / "peak_epoch.json").read_text()) if (out / "peak_epoch.json").exists() else None
    if peak:
        rec["peak_epoch"] = peak["peak_epoch"]
        rec["peak"] = scalars(out / "eval" / "peak" / "summary.json") or rec["last"]
        rec["selection"] = peak["selection"]
    rec["epochs"] = [{"epoch": 0, **{k: v for k, v in rec["before"].items() if k != "settings"}}] if rec["before"] else []
    last_epoch = json.loads((out / "args.json").read_text())["args"]["epochs"] if (out / "args.json").exists() else 0
    for e in range(1, last_epoch + 1):
        s = scalars(out / "eval" / (f"epoch{e}" if e < last_epoch else "after") / "summary.json")
        if s:
            rec["epochs"].append({"epoch": e, **{k: v for k, v in s.items() if k != "settings"}})
    return rec


def info_of(args_json: Path) -> dict:
    """Git commit, versions and hardware as the run recorded them in args.json (for a run that
    writes none, the evaluator's: this process's, on the same machine)."""
    from harness import runlog
    info = json.loads(args_json.read_text())["run"] if args_json.exists() else runlog.run_info()
    return {k: info.get(k) for k in ("git_commit", "git_dirty", "python", "torch", "transformers", "accelerate", "platform",
                                     "cpu_count", "cuda")}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def launch(item: dict, threads: int) -> subprocess.Popen:
    cmd = list(item["command"])
    src = GRID_DIR / item.get("teacher_from", "") / "strengthened"
    if item.get("teacher_from") and (src / "config.json").exists():
        cmd += ["--strengthened_model", str(src)]
    if item["grid"] in (*METHOD_GRIDS, "robust", "gpu") and item.get("collect") is None and (GRID_DIR / item["name"] / "args.json").exists():
        cmd += ["--overwrite", "true"]  # the grid's own folder of a run that did not finish: redo it
    GRID_DIR.mkdir(parents=True, exist_ok=True)
    log = open(GRID_DIR / f"{item['name']}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def peak_on(command) -> bool:
    """Whether a run's command (a list, or the record's string) asks for --peak_epoch true."""
    cmd = shlex.split(command) if isinstance(command, str) else list(command or [])
    return "--peak_epoch" in cmd[:-1] and cmd[cmd.index("--peak_epoch") + 1] == "true"


def done_names(records: list[dict]) -> set[str]:
    """Runs recorded in full: a --peak_epoch run recorded without its peak row (collected from a folder of
    an earlier version that stopped before the peak evaluation) is run again, and its record replaced."""
    return {r["name"] for r in records if not peak_on(r.get("command")) or r.get("peak")}


def finished(item: dict) -> bool:
    out = GRID_DIR / item["name"]
    if item.get("collect") == "target":
        from harness import models
        return (models.finetuned_dir("smollm2-135m", "forget01", "quick", "full", continual=True) / "config.json").exists()
    if item.get("collect") == "continual":
        return (out / f"task{CONTINUAL_TASKS}" / "eval" / "after" / "summary.json").exists()
    if item.get("collect") == "models":
        return all((Path(m) / "config.json").exists() for m in item["models"])
    if item["grid"] == "reference":
        return (out / "eval" / "after" / "summary.json").exists()
    # with --peak_epoch the run ends after the peak epoch's evaluation (peak_epoch.json), not the last epoch's
    done = all((out / f).exists() for f in ("model", "eval/after/summary.json")) and \
        (not peak_on(item["command"]) or (out / "peak_epoch.json").exists())
    if done and item["grid"] == "robust":  # then the attacks, whose numbers join eval/after/summary.json last
        after = json.loads((out / "eval" / "after" / "summary.json").read_text())
        return all(k in after for k in ("relearn_attack/seconds", *(f"quantize_attack/{b}/seconds" for b in ROBUST_BITS)))
    return done


def builds(item: dict) -> bool:
    return item.get("collect") in ("models", "target")


def caches_filled(running: dict) -> bool:
    """Whether a running method run (METHOD_GRIDS, or the gpu grid's) has written its starting evaluation
    (eval/before/summary.json), which comes after the retain logs: from then on the runs beside it find both in
    runs/eval_cache. A continual sequence: its first task's starting evaluation (of the continual target)."""
    def before(it):
        if it.get("collect") == "continual":
            return GRID_DIR / it["name"] / "task1" / "eval" / "before" / "summary.json"
        return GRID_DIR / it["name"] / "eval" / "before" / "summary.json" if it.get("collect") is None else None
    return any(it["grid"] in (*METHOD_GRIDS, "gpu", "continual") and (b := before(it)) is not None and b.exists()
               for it, _, _ in running.values())


def run_grid(items: list[dict], jobs: int, max_runs: int | None, start_by: float | None = None) -> int:
    records = load_results()
    done = done_names(records)
    todo = []
    for it in items:
        if it["name"] in done:
            continue
        if finished(it):  # a folder from an interrupted sitting: collect it without training
            records.append(collect(it, None, jobs))
            save_results(records)
            done.add(it["name"])
            print(f"[reproduce] {it['name']}: collected from its folder", flush=True)
        else:
            todo.append(it)
    # a model the runs still to do start from (the continual target, the gpu grid's models) is recorded but lives
    # in runs/, which does not outlive a machine: build it again here first (its record is replaced)
    rebuild, grew = [], True
    while grew:  # what the rebuilt ones need in turn (forget10's retain model needs the gpu target)
        needed = {t.get("needs") for t in todo + rebuild}
        more = [it for it in items if it["name"] in needed and it["name"] in done and it not in rebuild
                and not finished(it)]
        rebuild, grew = more + rebuild, bool(more)
    for it in rebuild:
        done.discard(it["name"])
        print(f"[reproduce] {it['name']}: recorded, but its model is not on this machine: building it again", flush=True)
    todo = rebuild + todo
    n_todo = len(todo)
    todo = todo[:max_runs] if max_runs is not None else todo
    later = f", {n_todo - len(todo)} left for a later sitting (--max_runs)" if n_todo > len(todo) else ""
    print(f"[reproduce] {len(items)} runs in the grid, {len(items) - n_todo} done, {len(todo)} to run "
          f"({jobs} at a time){later}", flush=True)
    running, failed, t_start, n_done, took = {}, 0, time.time(), 0, []
    n_done_before = len(done)
    threads = max(1, (os.cpu_count() or 2) // jobs)
    while todo or running:
        if todo and start_by is not None and time.time() >= start_by:  # --hours: the runs under way finish
            print(f"[reproduce] --hours reached: no new runs; {len(todo)} left for a later sitting", flush=True)
            todo = []
            continue
        ready = [it for it in todo if it.get("needs") in (None, *done)]
        # a grid's first run goes alone until it has filled the shared caches (retain logs, then the starting
        # model's evaluation): the others would compute them again, side by side
        slots = jobs if n_done or caches_filled(running) else 1
        while ready and len(running) < slots:
            it = ready.pop(0)
            if builds(it) and any(builds(r) for r, _, _ in running.values()):
                continue  # two model builds never run side by side: both may train the target into one folder
            todo.remove(it)
            # cores/jobs each, the first too; a run that nothing else can join (the continual target, which the
            # sequences wait for) gets every core, or the other slots would idle through it
            alone = not running and not ready and all(t.get("needs") == it["name"] for t in todo)
            n = (os.cpu_count() or 2) if alone else threads
            print(f"[reproduce] start {it['name']} ({n} thread{'s' * (n > 1)}): {shlex.join(it['command'][1:])}",
                  flush=True)
            running[it["name"]] = (it, launch(it, n), time.time())
        if not running:
            raise SystemExit(f"error: {len(todo)} runs wait for runs that failed: {[t['name'] for t in todo]}")
        time.sleep(5)
        for name, (it, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            n_done += 1
            if proc.returncode == 0 and finished(it):
                records = load_results()
                records.append(collect(it, time.time() - t0, jobs))
                save_results(records)
                done.add(name)
                status = "done"
            else:
                failed += 1
                status = f"FAILED (exit {proc.returncode}; see {GRID_DIR / (name + '.log')})"
                if len(done) == n_done_before:  # nothing has succeeded yet: the rest would fail the same way
                    for _, other, _ in running.values():
                        other.terminate()
                    raise SystemExit(f"error: {name}, the grid's first run this sitting, failed (exit "
                                     f"{proc.returncode}: {last_line(GRID_DIR / (name + '.log'))}); the grid stopped")
            elapsed, left = time.time() - t_start, len(todo) + len(running)
            took.append(time.time() - t0)
            eta = statistics.fmean(took) * left / jobs  # the mean run so far, jobs at a time
            print(f"[reproduce] {name}: {status} in {(time.time() - t0) / 60:.1f} min; {n_done} finished, "
                  f"{left} left; elapsed {elapsed / 60:.1f} min, about {eta / 60:.0f} min to go", flush=True)
    print(f"[reproduce] grid finished: {n_done} runs in {(time.time() - t_start) / 60:.1f} min wall time, "
          f"{failed} failed", flush=True)
    return failed


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


QUICK_MODELS = ("target", "retain")


def robust_missing() -> str | None:
    """What the robust grid lacks to run (its quantization needs bitsandbytes, optional in requirements.txt), in
    one sentence, or None: said before any run, not every run failing."""
    import common
    from evaluation import attacks
    try:
        attacks.quantization_library()
    except common.TofuError as e:
        return str(e)
    return None


def ensure_quick_models(split: str = "forget01") -> None:
    """The sweep, seeds and reference grids start from the quick target and score against the quick
    retain model, which live in runs/models and so do not outlive a machine: build them when missing
    (`finetune.py --split forget01`, about 13 minutes here), so that a sitting on a new machine does
    not see every run fail at once."""
    import common
    from harness import models
    missing = []
    for role in QUICK_MODELS:
        try:
            models.quick_model(split, role)
        except common.TofuError:
            missing.append(role)
    if not missing:
        return
    GRID_DIR.mkdir(parents=True, exist_ok=True)
    log = GRID_DIR / "quick-models.log"
    cmd = [sys.executable, "finetune.py", "--split", split]
    print(f"[reproduce] the quick {' and '.join(missing)} model{'s' * (len(missing) > 1)} for {split} "
          f"{'are' if len(missing) > 1 else 'is'} not on this machine: building them first ({shlex.join(cmd[1:])}, "
          f"about 13 min on 2 cores; log {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"error: building the quick models failed (exit {rc}: {last_line(log)})")
    print(f"[reproduce] quick models built in {(time.time() - t0) / 60:.1f} min", flush=True)


def cost(grid: str, items: list[dict], done: set) -> str:
    """What the grid's remaining runs should cost, from the machine time (wall time / jobs) of its recorded
    runs: the estimate --list gives before a sitting is planned. A run's steps grow with its forget split
    (forget10 has twice forget05's rows), so the time is taken per percent of TOFU forgotten and scaled to each
    run left; the gpu grid's runs are a GPU's time, not this machine's. The robust grid, until one of its runs is
    recorded, from the seeds grid's: the same runs less the attacks, which that estimate leaves out."""
    pct = lambda r: int(str(r.get("split") or "forget01")[-2:])
    per_of = lambda g: [r["wall_s"] / max(1, r.get("jobs") or 1) / pct(r) for r in load_results()
                        if r["grid"] == g and r.get("wall_s") and r["method"] != "finetune"]
    per, basis = per_of(grid), ""
    if not per and grid == "robust":
        per, basis = per_of("seeds"), (" (the seeds grid's runs: no robust run is recorded yet, so the attacks' own "
                                       "time is not in it)")
    todo = [i for i in items if i["name"] not in done and i["method"] != "finetune"]
    if not todo or not per:
        return ""
    m = statistics.median(per)
    where = "GPU time (the machine that ran them)" if grid == "gpu" else "this machine"
    runs = ", ".join(f"{n} {s}" for s, n in sorted(collections.Counter(i.get("split") or "forget01" for i in todo).items()))
    t = sum(m * pct(i) for i in todo)
    return (f"; the {len(todo)} runs left ({runs}): about {f'{t / 3600:.1f} h' if t >= 3600 else f'{t / 60:.0f} min'} "
            f"of {where}, from the recorded runs' median of {m / 60:.1f} min a run per percent of TOFU forgotten{basis}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="all", help=f"one of {', '.join(GRIDS)}, a comma list, or all (in that order); gpu (a machine with a GPU: the "
                   "full benchmark of the embedded model) runs only when named")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores/jobs threads (default 1)")
    p.add_argument("--max_runs", type=int, default=None, help="stop after starting this many runs (default: all)")
    p.add_argument("--hours", type=float, default=None,
                   help="start no run after this many hours from now; the runs under way finish and are recorded (for "
                        "a sitting of fixed length: a run stopped halfway is lost with its machine; default: no limit)")
    p.add_argument("--list", action="store_true", help="print each grid's runs and whether they are done, and exit")
    p.add_argument("--report_only", action="store_true", help="write RESULTS.md and plots from the results file")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("error: --jobs must be at least 1")
    grids = GRIDS if args.grid == "all" else tuple(args.grid.split(","))
    if bad := [g for g in grids if g not in (*GRIDS, "gpu")]:
        raise SystemExit(f"error: unknown grid {bad[0]!r}; choose from {', '.join(GRIDS)}, all or gpu")
    t0 = time.time()
    if args.hours is not None and args.hours <= 0:
        raise SystemExit("error: --hours must be positive")
    start_by = None if args.hours is None else t0 + 3600 * args.hours
    if not args.report_only:
        for g in grids:
            items, waiting = grid_items(g, load_results())
            done = done_names(load_results())
            if args.list:
                print(f"{g}: {sum(i['name'] in done for i in items)}/{len(items)} done{cost(g, items, done)}")
                for it in items:
                    print(f"  {'done' if it['name'] in done else 'todo'}  {it['name']}")
                for w in waiting:
                    print(f"  waiting: {w}")
                continue
            print(f"[reproduce] grid {g}" + (f" (waiting: {'; '.join(waiting)})" if waiting else ""), flush=True)
            if g == "robust" and any(i["name"] not in done for i in items) and (why := robust_missing()):
                if args.grid != "all":  # named: an error; in all, the other grids' sitting still ends with the report
                    raise SystemExit(f"error: --grid robust: {why}")
                print(f"[reproduce] grid robust skipped: {why}", flush=True)
                continue
            if g not in ("continual", "gpu") and any(i["name"] not in done for i in items):
                ensure_quick_models()
            run_grid(items, args.jobs, args.max_runs, start_by)
        if args.list:
            return
    import results_report
    results_report.main([])
    if not args.report_only:
        print(f"[reproduce] total wall time {(time.time() - t0) / 60:.1f} min on {platform.node()}", flush=True)


if __name__ == "__main__":
    main()
