"""Step time of --forward_batch (several micro-batches in one forward and one backward) against one
micro-batch a forward, per method, in the same run.

For each method the bench builds what the script's main() builds (Args finalized with the quick or paper
recipe, the dataset, setup_frozen with its frozen models wrapped by forward_batch.share_forwards) and the rows of
warmup + steps optimizer steps of --batch rows in micro-batches of --micro, in main()'s shuffled order, encoded
once. Two sides then run the script's own fit() from the model loaded fresh, over loaders that collate the
same rows in the same order, one with --forward_batch --micro (one micro-batch a forward, the path before
the flag: "before") and one with --forward_batch --forward ("after"). They run in two threads of one process
and take turns one optimizer step at a time (a step ends at fit()'s log call), so step k of both sides
trains on the same rows seconds apart under the same load; the side that goes first alternates between
rounds. A step's time runs from getting the turn to its log call (wall and the thread's CPU time); the
ratio per method is the median over steps and rounds of after / before on the same step. The per-step
losses of the two sides must agree (--rtol): they compute the same numbers. finetune is fit() with the
model's own loss on the forget rows (finetune.py's loss_fn). Results and commands: docs/throughput.md.

  python bench/bench_forward_batch.py --model tiny --methods rkld,me_gd,ga_gd,npo_kl,idk_ap,rmu,finetune
  python bench/bench_forward_batch.py --model PATH --methods me_gd --steps 2 --rounds 2
"""
import argparse
import copy
import importlib
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from harness import flags, forward_batch, launch, models, runlog, scenarios  # noqa: E402

METHODS = {  # name -> (script, extra flags)
    "rkld": ("rkld", []), "me_gd": ("me_gd", []), "idk_ap": ("idk_ap", []),
    "ga_gd": ("baselines", ["--method", "ga_gd"]), "npo_kl": ("baselines", ["--method", "npo_kl"]),
    "rmu": ("rmu", ["--layer", "0"]), "finetune": ("baselines", ["--method", "ga"]),
}
SIDES = ("before", "after")


class Turns:
    """Two threads that take turns: wait(side) blocks until it is `side`'s turn; done(side) hands the
    turn over for good. A side that fails stops the other."""

    def __init__(self, first: str, timeout: float = 3600.0):
        self.cond, self.turn, self.finished, self.failed, self.timeout = threading.Condition(), first, set(), None, timeout

    def other(self, side):
        return SIDES[1 - SIDES.index(side)]

    def wait(self, side):
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn == side or self.failed, self.timeout):
                raise common.TofuError(f"the {self.other(side)} side kept the turn for over {self.timeout:.0f} s")
            if self.failed:
                raise common.TofuError(f"the {self.failed} side failed (its error is above)")

    def pass_turn(self, side):
        with self.cond:
            if self.other(side) not in self.finished:
                self.turn = self.other(side)
            self.cond.notify_all()

    def done(self, side, failed=False):
        with self.cond:
            self.finished.add(side)
            self.turn, self.failed = self.other(side), side if failed else self.failed
            self.cond.notify_all()


class StepLog:
    """fit()'s `log`: at each optimizer step's log call, the step's wall and thread CPU time since this side
    got the turn, and its losses; then the turn goes to the other side. The two sides share one process's
    accelerate state, so a side that gets the turn (always at a step boundary) puts back its own
    accumulation: the micro-batches of a window before its fit() starts, its forwards a window after.
    Steps end by count alone (every window is full): accelerate's end-of-loader flag follows the loader
    that began last, which may be the other side's."""

    def __init__(self, turns, side, accelerator, micro_batches: int, forwards: int):
        self.turns, self.side, self.step_s, self.cpu_s, self.losses = turns, side, [], [], []
        self.accelerator, self.forwards = accelerator, forwards
        self.turns.wait(self.side)
        accelerator.gradient_accumulation_steps, accelerator.step = micro_batches, 0
        accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
        self.t0, self.c0 = time.perf_counter(), time.thread_time()

    def start(self):
        self.turns.wait(self.side)
        self.accelerator.gradient_accumulation_steps, self.accelerator.step = self.forwards, 0
        self.t0, self.c0 = time.perf_counter(), time.thread_time()

    def log(self, step, metrics):
        self.step_s.append(time.perf_counter() - self.t0)
        self.cpu_s.append(time.thread_time() - self.c0)
        self.losses.append(metrics["loss"])
        self.turns.pass_turn(self.side)
        self.start()


def setup(name: str, a, out: Path) -> dict:
    """main()'s objects before fit(), and the encoded rows of every step in main()'s order."""
    from accelerate.utils import set_seed
    from transformers import HfArgumentParser
    script, extra = METHODS[name]
    mod = importlib.import_module(script)
    argv = ["--model", a.model, "--split", a.split, "--subset", "quick", "--eval", "false", "--retain_model", "none",
            "--batch_size", str(a.batch), "--per_device_batch_size", str(a.micro), "--warmup_epochs", "0",
            "--output_dir", str(out / name), *extra]
    if script == "rkld":  # the teacher costs the same whatever the strengthened weights: skip strengthening
        argv += ["--strengthened_model", a.model]
    args = flags.finalize_args(HfArgumentParser(mod.Args).parse_args_into_dataclasses(argv)[0], mod.METHOD,
                               mod.QUICK, mod.QUICK if a.recipe == "quick" else mod.PAPER)
    accelerator, _ = launch.make_accelerator(args.batch_size, args.per_device_batch_size, args.max_grad_norm)
    Path(args.output_dir).mkdir(parents=True)
    set_seed(args.seed)
    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt)
    forget, retain = scenarios.method_rows(args)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk())
    frozen = mod.setup_frozen(args, ds, tok, accelerator, None)
    new_model = lambda: models.load_trained(args, accelerator)  # noqa: E731
    if "model" in frozen and script == "rmu":  # rmu's setup builds the trained model (its chosen layers trainable)
        frozen.pop("model")
        new_model = lambda: mod.setup_frozen(args, ds, tok, accelerator, None)["model"]  # noqa: E731
    elif "model" in frozen:
        raise common.TofuError(f"{name}: the bench does not cover LoRA or task arithmetic (setup_frozen built the model)")
    forward_batch.share_forwards(frozen)
    order = torch.Generator().manual_seed(args.seed)
    rows = []
    for e in itertools.count():  # main()'s order: set_epoch(e), then a shuffled pass
        ds.set_epoch(e)
        rows += [ds[int(i)] for i in torch.randperm(len(ds), generator=order)]
        if len(rows) >= (a.warmup + a.steps) * a.batch:
            break
    rows = rows[:(a.warmup + a.steps) * a.batch]
    if name == "finetune":  # finetune.py: QADataset rows, the model's own loss
        rows = [r["forget"] for r in rows]
        collate, loss_fn = (lambda b: common.collate(b, tok.pad_token_id)), (lambda m, b: {"loss": m(**b).loss})
    else:
        collate = lambda b: common.collate_pairs(b, tok.pad_token_id, args.pad_to, mod.padded_parts(args))  # noqa: E731
        loss_fn = lambda m, b: mod.step_losses(m, b, frozen, args)  # noqa: E731
    return {"mod": mod, "args": args, "accelerator": accelerator, "rows": rows, "collate": collate,
            "loss_fn": loss_fn, "frozen": frozen, "new_model": new_model}


def run_side(s, a, side: str, turns) -> StepLog:
    ga = a.batch // a.micro
    log = StepLog(turns, side, s["accelerator"], ga, ga if side == "before" else ga // (a.forward // a.micro))
    args = copy.copy(s["args"])  # the model loads and fit() sets up in this side's first turn
    args.forward_batch = str(a.micro if side == "before" else a.forward)
    model = s["new_model"]()
    loader = torch.utils.data.DataLoader(s["rows"], batch_size=a.micro, shuffle=False, collate_fn=s["collate"])
    model = s["mod"].fit(s["accelerator"], model, loader, s["loss_fn"], args, 1, args.lr, side, log)
    launch.release(s["accelerator"], model)
    return log


def one_round(s, a, first: str) -> dict:
    turns, res, failed = Turns(first), {}, []

    def go(side):
        try:
            res[side] = run_side(s, a, side, turns)
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the main thread)
            failed.append(e)
            turns.done(side, failed=True)
            return
        turns.done(side)
    threads = [threading.Thread(target=go, args=(side,), daemon=True) for side in SIDES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return res


def bench(name: str, a, out: Path) -> dict:
    s = setup(name, a, out)
    steps = {side: [] for side in SIDES}
    cpu = {side: [] for side in SIDES}
    rel, agree = 0.0, True
    for r in range(a.rounds):
        res = one_round(s, a, SIDES[r % 2])
        for side in SIDES:
            steps[side].append(res[side].step_s[a.warmup:])
            cpu[side].append(res[side].cpu_s[a.warmup:])
        pairs = list(zip(res["before"].losses, res["after"].losses))
        rel = max([rel] + [abs(x - y) / max(abs(x), 1e-8) for x, y in pairs])
        agree = agree and all(abs(x - y) <= a.rtol * abs(x) + a.atol for x, y in pairs)
        print(f"[bench_forward_batch] {name} round {r + 1}: before {statistics.median(steps['before'][-1]):.3f} s, "
              f"after {statistics.median(steps['after'][-1]):.3f} s a step", flush=True)
    s["frozen"].clear()
    launch.release(s["accelerator"])
    pairs = [y / x for b, f in zip(steps["before"], steps["after"]) for x, y in zip(b, f)]
    cpu_pairs = [y / x for b, f in zip(cpu["before"], cpu["after"]) for x, y in zip(b, f)]
    flat = {side: [x for r in v for x in r] for side, v in steps.items()}
    return {"before_s": statistics.median(flat["before"]), "after_s": statistics.median(flat["after"]),
            "ratio": statistics.median(pairs), "ratio_min": min(pairs), "ratio_max": max(pairs),
            "ratio_cpu": statistics.median(cpu_pairs), "step_s": steps, "step_cpu_s": cpu,
            "max_rel_loss_diff": rel, "losses_agree": agree}


def tiny_model(folder: Path) -> str:
    """The tests' tiny model (tests/conftest.py): a 2-layer Llama of width 32 over a 400-token BPE."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput
    return str(throughput.tiny_llama(throughput.tiny_tokenizer(chat=True), folder))


def main(argv=None) -> dict:
    class Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    p.add_argument("--model", default="tiny", help="model folder; tiny = the tests' tiny model; quick = the quick "
                   "target of --split")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--split", default="forget01", help="forget split (quick subset of its authors)")
    p.add_argument("--recipe", choices=["quick", "paper"], default="quick", help="the script's recipe for unset flags")
    p.add_argument("--batch", type=int, default=32, help="effective batch (the papers': 32)")
    p.add_argument("--micro", type=int, default=4, help="--per_device_batch_size, the loss's micro-batch (papers': 4)")
    p.add_argument("--forward", type=int, default=32, help="--forward_batch of the 'after' side")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per side and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=4, help="rounds per method, alternating the side that goes first")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative per-step loss difference allowed")
    p.add_argument("--atol", type=float, default=1e-7, help="and absolute (rkld's KL is ~1e-8 when the teacher is "
                   "the model itself, as here without strengthening)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    names = a.methods.split(",")
    if unknown := [n for n in names if n not in METHODS]:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="forward_batch_") as tmp:
        if a.model == "tiny":
            a.model = tiny_model(Path(tmp) / "tiny")
        elif a.model == models.QUICK:
            a.model = models.quick_model(a.split, "target")
        res = {n: bench(n, a, Path(tmp)) for n in names}
    print(f"\n--forward_batch {a.forward} against {a.micro} (one micro-batch a forward), batch {a.batch}: {a.model}, "
          f"{a.split}, {a.steps} timed steps after {a.warmup}, {a.rounds} rounds, {torch.get_num_threads()} thread(s), "
          "the sides taking turns step by step")
    print(runlog.table([(n, f"{r['before_s']:.3f}", f"{r['after_s']:.3f}", f"{r['ratio']:.3f}",
                         f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}", f"{r['ratio_cpu']:.3f}",
                         f"{r['max_rel_loss_diff']:.1e}") for n, r in res.items()],
                       ("method", "before s/step", "after s/step", "after/before (median pair)", "pairs min-max",
                        "same, CPU time", "loss rel diff")))
    out = {"config": {**vars(a), "threads": torch.get_num_threads(), **runlog.run_info()}, "methods": res}
    if a.json:
        runlog.atomic_write_json(a.json, out)
    if bad := [n for n, r in res.items() if not r["losses_agree"]]:
        print(f"MISMATCH: the per-step losses of {', '.join(bad)} differ by more than --rtol {a.rtol} + --atol {a.atol}")
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    common.cli(main)
