"""Tokens per CPU second of each method's training step: our fit() loop against a transformers.Trainer loop
computing the same loss, on identical pre-collated batches in identical order, paired step by step.

For each method the bench builds what the script's main() builds: its Args parsed and finalized with
common.finalize_args, the ForgetRetainDataset and its shuffled, collated loader, and setup_frozen. It then
collates warmup + steps + 1 batches once into a list, in the order main()'s loader yields them (dynamic
padding makes step time depend on batch composition, so both sides must see the very same tensors).

  ours     the script's own fit() (AdamW, linear schedule, accelerate accumulate / backward / clip /
           step) over a loader that yields that list in order, loss_fn = step_losses(m, b, frozen, args)
  Trainer  a transformers.Trainer whose compute_loss calls the same step_losses with the same frozen
           models, whose train dataloader yields the same list in order; same AdamW (lr, weight decay
           on every weight, fused), same linear schedule, same clipping, batch, accumulation 1

Both sides start from the model loaded fresh from disk and run in two threads of one process, taking turns
one optimizer step at a time (Baton): step k of ours and step k of the Trainer train on the same batch
seconds apart, under the same load and heap. The side that takes the first turn alternates between rounds
(an even --rounds gives each side the first turn equally often); every timed step's wall and CPU time is kept
(step_s, step_cpu_s), and bench/results_report.py pairs them (step_pairs). Warmup is 0 (the lr decays linearly
from --lr over the batches), so every step moves the weights and the per-step losses of the two sides (which
must agree to --rtol) show they compute the same thing. Tokens: non-padding tokens (attention-mask sum) of
every forward pass through the trained model, counted by a forward hook; frozen-model forwards are counted and
compared with what the method's objective needs per step. rkld runs with --strengthened_model = --model (no
strengthening stage: the teacher's cost does not depend on its weights). Not measured, by design: the cost of
making the batches (main()'s loader collates token ids tokenized at start; bench/bench_datapath.py times it).
What it found: docs/throughput.md.

  python bench/throughput.py --batch 8 --steps 6 --rounds 8 --methods rkld,ga_gd --json results/throughput_interleaved.json
  python bench/throughput.py --model PATH --methods me_gd,npo_gd --steps 2 --rounds 2
"""
import argparse
import importlib
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from harness import flags, launch, models, runlog, scenarios  # noqa: E402

# name -> (script, extra flags, forward passes per step the objective needs: (trained model, frozen models))
METHODS = {
    "rkld": ("rkld", [], (1, 0)),  # forget pass; teacher = original + strengthened (2 frozen) when live
    "me_gd": ("me_gd", [], (2, 0)),  # forget (ME), retain (NLL)
    "idk_ap": ("idk_ap", [], (3, 0)),  # forget question + IDK, retain answer, retain question + IDK
    "ga_gd": ("baselines", ["--method", "ga_gd"], (2, 0)),  # forget, retain
    "npo_gd": ("baselines", ["--method", "npo_gd"], (2, 1)),  # + reference log pi_ref(y_f|x_f)
}
NOTES = {"npo_gd": "the reference forward gives log pi_ref(y_f|x_f), constant over training: it could be "
                   "computed once per forget row (as rkld --precompute_teacher does) instead of every step"}


class Baton:
    """The two sides run in two threads of one process and take turns one optimizer step at a time. A side passes the turn at the start of each loss computation after its first and waits for it to
    come back, so only one side computes at any moment and the other's thread sits blocked (no CPU time)."""

    def __init__(self, first: str, timeout: float = 3600.0):
        self.cond, self.turn, self.done, self.failed, self.timeout = threading.Condition(), first, set(), None, timeout

    @staticmethod
    def other(side: str) -> str:
        return "trainer" if side == "ours" else "ours"

    def wait(self, side: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn == side or self.failed, self.timeout):
                raise common.TofuError(f"the {self.other(side)} side kept the turn for over {self.timeout:.0f} s")
            if self.failed:
                raise common.TofuError(f"the {self.failed} side failed (its error is above)")

    def pass_turn(self, side: str) -> None:
        with self.cond:
            if self.other(side) not in self.done:
                self.turn = self.other(side)
            self.cond.notify_all()

    def finish(self, side: str, failed: bool = False) -> None:
        with self.cond:
            self.done.add(side)
            self.turn, self.failed = self.other(side), side if failed else self.failed
            self.cond.notify_all()


class Probe:
    """Wraps a loss_fn: the wall and CPU time at the start of every step, its loss, and the forward passes it
    makes through the trained model (calls, attention-mask tokens) and the frozen models (calls), counted by
    pre-hooks. A step runs from taking the turn (Baton) to passing it on at the next step's start."""

    def __init__(self, loss_fn, model, frozen_models, baton, side):
        self.loss_fn, self.baton, self.side, self.active = loss_fn, baton, side, False
        self.starts, self.cpu, self.ends, self.cpu_ends = [], [], [], []
        self.losses, self.tokens, self.trained, self.frozen = [], [], [], []
        self.hooks = [model.register_forward_pre_hook(self._count_trained, with_kwargs=True)]
        self.hooks += [m.register_forward_pre_hook(self._count_frozen, with_kwargs=True) for m in frozen_models]

    def _count_trained(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.tokens[-1] += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()
        self.trained[-1] += 1

    def _count_frozen(self, module, args, kwargs):
        if self.active:  # both sides' probes hook the shared frozen models: count only our own turn
            self.frozen[-1] += 1

    def __call__(self, model, batch):
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())  # process CPU time: what the step cost this process
        self.active = False
        if self.starts:
            self.baton.pass_turn(self.side)
        self.baton.wait(self.side)
        self.active = True
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        for counts in (self.tokens, self.trained, self.frozen):
            counts.append(0)
        out = self.loss_fn(model, batch)
        self.losses.append(out["loss"].item())
        return out

    def result(self, warmup: int, steps: int) -> dict:
        for h in self.hooks:
            h.remove()
        timed = range(warmup, warmup + steps)  # step k: from its start to the next step's (before any wait)
        step_s = [self.ends[k + 1] - self.starts[k] for k in timed]
        step_cpu = [self.cpu_ends[k + 1] - self.cpu[k] for k in timed]
        tokens = sum(self.tokens[k] for k in timed)
        return {"tok_s": tokens / sum(step_s), "tok_cpu_s": tokens / sum(step_cpu), "step_s": step_s,
                "step_cpu_s": step_cpu, "spans": [(self.starts[k], self.ends[k + 1]) for k in timed],
                "losses": self.losses, "tokens": self.tokens, "trained": self.trained, "frozen": self.frozen}


class NoLog:
    def log(self, step, metrics):  # the Trainer side logs nothing either
        pass


def in_order(batches):
    """A loader over the pre-collated batches, in list order (batch_size 1 unwraps the one-item list)."""
    return torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])


def setup(name: str, a, out: Path) -> dict:
    """What the script's main() builds before fit(), and the list of pre-collated batches."""
    from accelerate.utils import set_seed
    from transformers import HfArgumentParser
    script, extra, _ = METHODS[name]
    mod = importlib.import_module(script)
    argv = ["--model", a.model, "--split", a.split, "--subset", "quick", "--eval", "false", "--retain_model", "none",
            "--batch_size", str(a.batch), "--per_device_batch_size", str(a.batch), "--warmup_epochs", "0",
            "--output_dir", str(out / name), *extra]
    if script == "rkld":  # the teacher costs the same whatever the strengthened weights: skip strengthening
        argv += ["--strengthened_model", a.model, "--precompute_teacher", str(a.rkld_teacher == "precomputed")]
    args = flags.finalize_args(HfArgumentParser(mod.Args).parse_args_into_dataclasses(argv)[0], mod.METHOD,
                               mod.QUICK, mod.QUICK if a.recipe == "quick" else mod.PAPER)
    accelerator, _ = launch.make_accelerator(args.batch_size, args.per_device_batch_size, args.max_grad_norm)
    Path(args.output_dir).mkdir(parents=True)  # main()'s RunLogger makes it; rkld's teacher file goes there
    set_seed(args.seed)
    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt)
    forget, retain = scenarios.method_rows(args)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk())
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.per_device_batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda b: common.collate_pairs(b, tok.pad_token_id, args.pad_to, mod.padded_parts(args)))
    frozen = mod.setup_frozen(args, ds, tok, accelerator, None)
    if "model" in frozen:
        raise common.TofuError(f"{name}: the bench does not cover LoRA or task arithmetic (setup_frozen built the model)")

    def epochs():  # fit()'s order: set_epoch(e) (retain partners, IDK templates), then the shuffled loader
        for e in itertools.count():
            ds.set_epoch(e)
            yield from loader
    batches = list(itertools.islice(epochs(), a.warmup + a.steps + 1))
    frozen_models = {id(m): m for v in frozen.values() if isinstance(v, torch.nn.Module) for m in v.modules()
                     if hasattr(m, "get_output_embeddings") and m.get_output_embeddings() is not None}
    return {"mod": mod, "args": args, "accelerator": accelerator, "batches": batches, "frozen": frozen,
            "frozen_models": list(frozen_models.values()), "loss_fn": lambda m, b: mod.step_losses(m, b, frozen, args)}


def run_ours(s, a, baton) -> dict:
    args, accelerator = s["args"], s["accelerator"]
    baton.wait("ours")  # the model is loaded and fit() sets up in our own turn
    model = models.load_trained(args, accelerator)
    probe = Probe(s["loss_fn"], model, s["frozen_models"], baton, "ours")
    model = s["mod"].fit(accelerator, model, in_order(s["batches"]), probe, args, 1, args.lr, "ours", NoLog())
    launch.release(accelerator, model)
    return probe.result(a.warmup, a.steps)


def run_trainer(s, a, out: Path, baton) -> dict:
    from transformers import Trainer, TrainingArguments
    args, batches = s["args"], s["batches"]
    baton.wait("trainer")
    model = models.load_trained(args, s["accelerator"])
    probe = Probe(s["loss_fn"], model, s["frozen_models"], baton, "trainer")
    class SameBatchesTrainer(Trainer):
        def get_train_dataloader(self):  # what Trainer does with its own loader: accelerator.prepare
            return self.accelerator.prepare(in_order(batches))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return probe(model, inputs)["loss"]

        def log(self, logs, start_time=None):  # logging is off; this only silences the end-of-train summary
            pass

    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=1, max_steps=len(batches), learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=args.max_grad_norm, seed=args.seed,
        use_cpu=s["accelerator"].device.type == "cpu", bf16=s["accelerator"].mixed_precision == "bf16",  # as fit()'s
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", remove_unused_columns=False)
    # fit()'s optimizer: weight decay on every weight (Trainer's default would exempt biases and norms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    trainer = SameBatchesTrainer(model=model, args=targs, train_dataset=batches, optimizers=(optimizer, None))
    trainer.train()
    launch.release(trainer.accelerator, trainer.model, trainer.optimizer)
    del trainer, model, optimizer
    return probe.result(a.warmup, a.steps)


def interleaved(s, a, out: Path, first: str) -> tuple[dict, dict]:
    """One round: ours and the Trainer in two threads, taking turns step by step (Baton), so that each pair
    of steps on the same batch ran a few seconds apart, on the same heap and machine state."""
    baton, res, failed = Baton(first), {}, []

    def side(name, run):
        try:
            res[name] = run()
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the main thread)
            failed.append(e)
            baton.finish(name, failed=True)
            return
        baton.finish(name)  # after its teardown: nothing of this side runs in the other's turns
    # both sides in threads of their own: the main thread's malloc arena and OpenMP team favour neither
    threads = [threading.Thread(target=side, args=("ours", lambda: run_ours(s, a, baton)), daemon=True),
               threading.Thread(target=side, args=("trainer", lambda: run_trainer(s, a, out, baton)), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return res["ours"], res["trainer"]


def teardown(s) -> None:
    s["frozen"].clear()
    launch.release(s["accelerator"])


def bench(name: str, a, out: Path) -> dict:
    s = setup(name, a, out)
    rounds = {"ours": [], "trainer": []}
    for r in range(a.rounds):  # alternate who takes the first turn: the side that goes first can be the slower
        first = "ours" if r % 2 == 0 else "trainer"
        both = dict(zip(("ours", "trainer"), interleaved(s, a, out, first)))
        for side in (first, Baton.other(first)):
            rounds[side].append(both[side])
            last = rounds[side][-1]
            print(f"[throughput] {name} round {r + 1} {side}: {last['tok_s']:.1f} tokens/s, "
                  f"{last['tok_cpu_s']:.1f} tokens/CPU-s", flush=True)
    teardown(s)
    ours, trainer = rounds["ours"][-1], rounds["trainer"][-1]
    rel = max(abs(x - y) / max(abs(y), 1e-8) for o, t in zip(rounds["ours"], rounds["trainer"])
              for x, y in zip(o["losses"], t["losses"]))
    need_trained, need_frozen = METHODS[name][2]
    need_frozen = 2 if name == "rkld" and a.rkld_teacher == "live" else need_frozen
    trained, frozen = max(ours["trained"]), max(ours["frozen"])
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in rounds.items()}
    cpu = {k: statistics.median(r["tok_cpu_s"] for r in v) for k, v in rounds.items()}
    return {"ours_tok_s": med["ours"], "trainer_tok_s": med["trainer"], "ratio": med["ours"] / med["trainer"],
            "ours_tok_cpu_s": cpu["ours"], "trainer_tok_cpu_s": cpu["trainer"], "ratio_cpu": cpu["ours"] / cpu["trainer"],
            "ours_rounds_tok_cpu_s": [r["tok_cpu_s"] for r in rounds["ours"]],
            "trainer_rounds_tok_cpu_s": [r["tok_cpu_s"] for r in rounds["trainer"]],
            "ratio_cpu_rounds": [o["tok_cpu_s"] / t["tok_cpu_s"] for o, t in zip(rounds["ours"], rounds["trainer"])],
            # per step, round after round: step k of both sides trained on the same batch (same tokens), so the
            # Trainer's time over ours is their paired ratio (bench/results_report.py step_pairs)
            "step_s": {k: [c for r in v for c in r["step_s"]] for k, v in rounds.items()},
            "step_cpu_s": {k: [c for r in v for c in r["step_cpu_s"]] for k, v in rounds.items()},
            "spans": {k: [sp for r in v for sp in r["spans"]] for k, v in rounds.items()},  # perf_counter seconds
            "losses_ours": ours["losses"], "losses_trainer": trainer["losses"], "max_rel_loss_diff": rel,
            "losses_agree": rel <= a.rtol, "same_tokens": ours["tokens"] == trainer["tokens"],
            "tokens_per_step": ours["tokens"], "forwards_per_step": {"trained": trained, "frozen": frozen},
            "forwards_needed": {"trained": need_trained, "frozen": need_frozen},
            "extra_forwards": max(0, trained - need_trained) + max(0, frozen - need_frozen),
            "note": NOTES.get(name, "") if name != "rkld" else f"teacher {a.rkld_teacher}"}


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(chat: bool):
    """A byte-level BPE of 400 tokens trained on a slice of the shipped TOFU data, so questions and answers
    tokenize into many small pieces like a real one would: chat=True with a ChatML template (like SmolLM2),
    chat=False without one, adding a BOS token (like the Llama-2 tokenizer TOFU used)."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    rows = common.load_split("full")[::10] + common.load_split("forget01_perturbed")
    texts = [r["question"] + " " + r["answer"] for r in rows]
    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not chat:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                  unk_token="<|endoftext|>")
    if chat:
        tok.chat_template = CHATML
    return tok


def tiny_llama(tok, folder: Path) -> Path:
    """A random 2-layer Llama of hidden size 32 over tok's vocabulary, saved with tok: the tests' model
    (tests/conftest.py), on which the bench runs in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    class Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    p.add_argument("--model", default=models.QUICK, help="model folder; quick = the quick target of --split")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--split", default="forget01", help="forget split (quick subset of its authors)")
    p.add_argument("--recipe", choices=["quick", "paper"], default="quick",
                   help="the script's recipe for unset flags (pad_to, clipping); paper pads to 500 on some methods")
    p.add_argument("--batch", type=int, default=4, help="per-device batch = effective batch (accumulation 1)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per side and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=4, help="rounds per method, alternating which side takes the first "
                   "turn (even: each side goes first as often; the report pairs round 2j+1 with round 2j+2)")
    p.add_argument("--rkld_teacher", choices=["precomputed", "live"], default="precomputed",
                   help="rkld's teacher: log-probs computed once before training, or 2 frozen forwards a step")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative per-step loss difference allowed")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    names = a.methods.split(",")
    if unknown := [n for n in names if n not in METHODS]:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if a.model == models.QUICK:
        a.model = models.quick_model(a.split, "target")
    # what the measurement shared the machine with: the cores this process may run on, the load before it
    machine = {"cores_allowed": sorted(os.sched_getaffinity(0)), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        res = {n: bench(n, a, Path(tmp)) for n in names}
    print(f"\nours (fit) vs transformers.Trainer, same step_losses and batches: {a.model}, {a.split}, batch "
          f"{a.batch}, {a.steps} timed steps after {a.warmup}, median of {a.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s), the sides taking turns step by step")
    print(runlog.table([(n, f"{r['forwards_per_step']['trained']}+{r['forwards_per_step']['frozen']}",
                         f"{statistics.mean(r['tokens_per_step']):.0f}", f"{r['ours_tok_s']:.1f}",
                         f"{r['trainer_tok_s']:.1f}", f"{r['ratio']:.3f}", f"{r['ratio_cpu']:.3f}",
                         f"{min(r['ratio_cpu_rounds']):.3f}-{max(r['ratio_cpu_rounds']):.3f}",
                         f"{r['max_rel_loss_diff']:.1e}") for n, r in res.items()],
                       ("method", "fwd trained+frozen", "tokens/step", "ours tok/s", "Trainer tok/s", "ours/Trainer",
                        "same, CPU time", "CPU time, per round", "loss rel diff")))
    for n, r in res.items():
        if r["extra_forwards"]:
            print(f"{n}: {r['extra_forwards']} forward pass(es) a step beyond what the objective needs "
                  f"({r['forwards_needed']['trained']}+{r['forwards_needed']['frozen']})")
        if r["note"]:
            print(f"{n}: {r['note']}")
        if not (r["losses_agree"] and r["same_tokens"]):
            print(f"{n}: MISMATCH: per-step losses differ by {r['max_rel_loss_diff']:.1e} (rtol {a.rtol}) or the "
                  "token counts differ: the two sides did not compute the same steps")
    out = {"config": {**vars(a), "threads": torch.get_num_threads(), **machine, "load_after": os.getloadavg(),
                      **runlog.run_info()}, "methods": res}
    if a.json:
        runlog.atomic_write_json(a.json, out)
    if not all(r["losses_agree"] and r["same_tokens"] for r in res.values()):
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    common.cli(main)
