"""RKLD: Reverse KL-Divergence-based Knowledge Distillation for unlearning personal information.

Paper: Wang et al. 2024, "RKLD: Reverse KL-Divergence-based Knowledge Distillation for
Unlearning Personal Information in Large Language Models", arXiv 2406.01983. No public code
exists; this is an implementation from the paper (method §3, settings App. A, FKL ablation §6).

  strengthened model  theta_str = theta_ori fine-tuned further on the forget set
  unlearning teacher  l_tea = l_ori - alpha * relu(l_str - l_ori)          (alpha = 8)
  objective           min_theta  mean over forget answer tokens of
                      RKL = sum_v p_theta(v) * (log p_theta(v) - log p_tea(v))   = KL(p_theta || p_tea)
                      [+ retain_weight * (RT: retain NLL  |  KL: KL(p_ori || p_theta) on retain)]
  retain KL positions: all B x T of the retain batch padded to --pad_to (500), padding
  included, as in the KL baselines' code; --loss_reduction tokens: non-padding positions only

  python rkld.py --split forget01                      # quick CPU path (embedded SmolLM2-135M)
  accelerate launch rkld.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Paper settings: the defaults for a real model (AdamW lr 1e-5, wd 0.01, effective batch 32,
one warmup epoch then linear decay, alpha 8, 5 continued epochs for the strengthened model).
Table 2 ablation: --divergence fkl.  Fig. 3 variants: --retain_loss rt / kl.
Epoch of peak forget quality (Fig. 3): --epochs 10 --eval_every_epoch.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import weakref
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F


# ====================================================================
# METHOD LOGIC (the part people copy): pure functions, no globals, no I/O
# ====================================================================
def teacher_logits(ori_logits: torch.Tensor, str_logits: torch.Tensor, alpha: float = 8.0) -> torch.Tensor:
    """Unlearning teacher (RKLD Eq. 2): l_tea = l_ori - alpha * relu(l_str - l_ori), in fp32.
    Only logits that the strengthened model raised are lowered; the rest are the original's."""
    ori, strong = ori_logits.float(), str_logits.float()
    return ori - alpha * torch.relu(strong - ori)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T-1] of the positions whose next token is a scored answer token
    (logits[:, :-1] predict labels[:, 1:]; -100 marks prompt and padding)."""
    return labels[:, 1:] != -100


def divergence_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor,
                    direction: str = "rkl") -> torch.Tensor:
    """Distillation loss, averaged over forget answer tokens (a token mean over the N answer
    positions of the micro-batch; 0, not NaN, when N = 0, as in nll_loss).

    student_logits [B, T, V]; teacher_logp [N, V] = log p_tea at the N answer positions of
    the batch, in row-major order (see answer_positions).
      rkl (RKLD): KL(p_theta || p_tea) = sum_v p_theta (log p_theta - log p_tea)   mode-seeking
      fkl (Table 2 ablation): KL(p_tea || p_theta) = sum_v p_tea (log p_tea - log p_theta)
    """
    logp_s = F.log_softmax(student_logits[:, :-1][answer_positions(labels)].float(), dim=-1)
    logp_t = teacher_logp.float()
    if direction == "rkl":
        per_token = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    elif direction == "fkl":
        per_token = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {direction!r}")
    return per_token.sum() / max(per_token.numel(), 1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence [B]: sum over scored tokens (labels[:, 1:] != -100) of the
    fp32 log-prob of the label, taken from log_softmax (cross_entropy) of logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                          ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL = -(sum of log p(label) over all scored tokens in the micro-batch) / (their count).

    A token mean over the micro-batch, not a mean of per-sequence means: the semantics of
    HF `outputs.loss`, used by every reference for GD (retain) and IDK (forget). Averages over
    answer tokens only (labels != -100). An empty batch gives 0, not NaN.
    """
    n_tokens = (labels[:, 1:] != -100).sum()
    return -sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


def kl_retain_loss(logits: torch.Tensor, ref_logits: torch.Tensor, attention_mask: torch.Tensor,
                   reduction: str = "reference") -> torch.Tensor:
    """Retain KL = mean over positions t of KL(p_ref,t || p_theta,t)
    = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)).

    Direction: the frozen reference model is the target distribution p, the trained model
    is q (forward KL from the reference, as in CL/TOFU/open-unlearning `kl_div(log p_theta,
    log p_ref, log_target=True)`). Logits are not shifted: both models are compared at the
    same positions. ref_logits are detached.
    Positions (project decisions 4 and 5):
      reduction "reference" (default): all B x T positions of the batch, question and padding
          included, divided by B * T (the references' `batchmean` on logits flattened to
          [B*T, V]; they pad every batch to T = 500 in CL and TOFU, see the --pad_to flag).
          attention_mask is not used.
      reduction "tokens": only positions whose input token is real (attention_mask == 1),
          question tokens included; a token mean over the micro-batch.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.detach().float(), dim=-1)
    per_position = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    if reduction == "reference":
        return per_position.mean()
    if reduction == "tokens":
        keep = attention_mask.bool()
        return per_position[keep].sum() / keep.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use 'reference' (B x T, padding included) or 'tokens'.")


# ====================================================================
# ARGUMENTS
# ====================================================================
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

import common  # noqa: E402
from common import TofuError  # noqa: E402
from evaluation import engine, method_eval  # noqa: E402
from harness import flags, forward_batch, launch, models, runlog, scenarios  # noqa: E402


@dataclasses.dataclass
class Args(flags.MethodArgs):
    alpha: float = flags.flag(8.0, "Teacher strength: l_tea = l_ori - alpha*relu(l_str - l_ori) (RKLD App. A: 8).")
    divergence: str = flags.flag("rkl", "rkl = KL(p_theta||p_tea) (RKLD); fkl = KL(p_tea||p_theta) (Table 2 ablation).")
    retain_loss: str = flags.flag("none", "none (RKLD), rt (retain NLL, RKLD+RT) or kl (KL(p_ori||p_theta) on retain, RKLD+KL).")
    retain_weight: float = flags.flag(1.0, "Weight of the retain term (RKLD App. A: 1).")
    loss_reduction: str = flags.flag("reference", "How the retain KL (--retain_loss kl) averages over positions; RKLD has no code, so this follows the KL baselines it compares with. reference = mean over all B x T positions of the padded retain batch, question and padding included (CL trainer/losses.py, TOFU dataloader.py and open-unlearning trainer/utils.py: kl_div batchmean on [B*T, V]); tokens = mean over non-padding positions only.")
    pad_to: int = flags.flag(None, "Pad the batch parts that --loss_reduction reference averages over (retain, for --retain_loss kl) to this many tokens (or to the longest, if longer), so padding positions count as in the references: closer-look and TOFU pad every sequence to max_length 500 (dataset/data_module.py). Default 500 for real models; 0 (pad to the longest in the micro-batch) for --model quick, to keep the CPU path fast. Ignored with --loss_reduction tokens.")
    strengthened_model: str = flags.flag(None, "Reuse a strengthened model (folder) instead of building one.")
    strengthen_epochs: int = flags.flag(5, "Epochs of continued training on the forget set. App. A says the strengthened model 'is trained for total 10 epochs'; we read that as the 5 fine-tuning epochs + 5 more here.")
    strengthen_lr: float = flags.flag(None, "LR of the continued training ('same optimizer settings', App. A): 1e-5 for real models, the fine-tuning lr (2e-4) for --model quick.")
    precompute_teacher: bool = flags.flag(None, "Compute the teacher's log-probs over the forget set once, each rank its own rows, into float32 files in the run folder, one per rank (4 x vocabulary bytes per answer token: 128 kB at a 32,000-token vocabulary; forget05 has 7,275 answer tokens with SmolLM2's tokenizer, 0.87 GiB at that vocabulary), free the frozen models, and keep the store on the device when it takes at most a quarter of its memory (else in pinned host memory, else read from the files): only the student runs while distilling. Default: on whenever the store fits the device or a quarter of the available host memory (the teacher is constant: one teacher pass per row instead of one per row and epoch; measured in docs/throughput.md); the run prints the store's size and the choice.")
    eval_teacher: bool = flags.flag(False, "Also evaluate the unlearning teacher itself (logit arithmetic at inference), as in RKLD Fig. 3.")

    def __post_init__(self):  # checked at parse time, before any model is loaded
        if self.divergence not in ("rkl", "fkl"):
            raise TofuError(f"--divergence must be rkl or fkl, not {self.divergence!r}")
        if self.retain_loss not in ("none", "rt", "kl"):
            raise TofuError(f"--retain_loss must be none, rt or kl, not {self.retain_loss!r}")
        if self.loss_reduction not in ("reference", "tokens"):
            raise TofuError(f"--loss_reduction must be reference (B x T, padding included) or tokens, "
                            f"not {self.loss_reduction!r}")
        if self.pad_to is not None and self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")
        if not self.alpha > 0:  # 0: the teacher is the original model; < 0: it raises what strengthening raised
            raise TofuError(f"--alpha must be positive (0 makes the teacher the original model, a negative alpha "
                            f"makes it amplify the forget answers), not {self.alpha}")
        flags.check_numbers(self, (("strengthen_lr", *flags.POSITIVE), ("strengthen_epochs", *flags.NON_NEGATIVE)))


METHOD = "rkld"
PAPER = {"lr": 1e-5, "epochs": 10, "peak_epoch": True, "batch_size": 32, "strengthen_lr": 1e-5,
         "pad_to": 500, "_source": "RKLD App. A"}
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "strengthen_lr": 2e-4,
         "pad_to": 0, "_source": "ours, sized for the embedded 135M model on a 2-core CPU"}


# ====================================================================
# METHOD SETUP AND STEP (RKLD-specific; the loop in main() calls these)
# ====================================================================
class Teacher(torch.nn.Module):
    """The unlearning teacher as a model: logits = teacher_logits(ori(x), str(x))."""

    def __init__(self, ori, strong, alpha):
        super().__init__()
        self.ori, self.strong, self.alpha = ori, strong, alpha
        self.config, self.device = launch.unwrapped(ori).config, ori.device  # ori may be a DeepSpeed engine

    def forward(self, input_ids, attention_mask=None, **_):
        out = self.ori(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = teacher_logits(out.logits, self.strong(input_ids=input_ids, attention_mask=attention_mask).logits,
                                    self.alpha)
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int, eos_token_id,
                 synced_gpus: bool = False, **_) -> torch.Tensor:
        """Greedy decoding of the teacher on a left-padded batch with both models' KV caches, returning
        prompt + new tokens (pad after EOS), as the evaluator calls `generate`; without the caches every
        new token would rerun both models over the whole sequence (--eval_teacher took hours on CPU).
        synced_gpus: keep stepping until every rank's rows have ended (FSDP2/ZeRO-3 forwards are collectives)."""
        eos = torch.tensor(sorted(eos_token_id) if isinstance(eos_token_id, (list, set, tuple)) else [eos_token_id],
                           device=input_ids.device)
        mask = attention_mask.clone()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
        seq, done = input_ids, torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        step, cache, new = dict(input_ids=input_ids, attention_mask=mask, position_ids=pos), {}, 0
        # the count is a collective when synced: a rank whose rows have ended (or whose budget is spent)
        # keeps running both models on a pad token until every rank's have
        while engine.synced_count(int((~done).sum()) if new < max_new_tokens else 0, input_ids.device, synced_gpus):
            outs = {}
            for name, m in (("ori", self.ori), ("strong", self.strong)):
                outs[name] = m(**step, past_key_values=cache.get(name), use_cache=True)
                cache[name] = outs[name].past_key_values
            nxt = torch.full_like(done, pad_token_id, dtype=seq.dtype)
            if new < max_new_tokens and not done.all():
                best = teacher_logits(outs["ori"].logits[:, -1], outs["strong"].logits[:, -1], self.alpha).argmax(-1)
                nxt = torch.where(done, nxt, best)
                seq, done, new = torch.cat([seq, nxt[:, None]], 1), done | torch.isin(nxt, eos), new + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            step = dict(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos)
        return seq


def strengthen(args, tok, fmt, accelerator, adapter_only: bool = False) -> str:
    """The strengthened model (RKLD §3): --model trained further on the forget set (answer NLL) for
    --strengthen_epochs at --strengthen_lr with the run's batch settings, saved in OUTPUT_DIR/strengthened.
    A later run reuses it only when it was built with the same settings (strengthened/strengthen.json);
    otherwise it is rebuilt. This stage trains its own model and releases it before unlearning starts.
    adapter_only (RKLD with --lora_r): save the trained LoRA adapter alone, so the teacher needs no
    second model (setup_frozen); task arithmetic needs the full strengthened weights."""
    if args.strengthened_model:
        return models.resolve_model_path(args.strengthened_model)
    out = Path(args.output_dir) / "strengthened"
    settings = json.loads(json.dumps({
        "model": str(Path(models.resolve_model_path(args.model)).resolve()), "split": args.split,
        **({"forget_data": scenarios.custom_fingerprint(args.forget_data)} if args.forget_data else {}),
        "forget_task": args.forget_task, "epochs": args.strengthen_epochs, "lr": args.strengthen_lr,
        "max_steps": args.max_steps, "prompt_format": dataclasses.asdict(fmt),
        **{k: getattr(args, k) for k in ("batch_size", "per_device_batch_size", "weight_decay", "warmup_epochs",
                                         "max_grad_norm", "max_length", "seed", "lora_r", "lora_alpha", "lora_dropout",
                                         "lora_target_modules")}}))
    found = launch.main_decides(accelerator, lambda: json.loads((out / "strengthen.json").read_text())
                                if (out / "strengthen.json").exists() else None)  # one decision for every rank
    if found is not None:
        if found == settings:
            if accelerator.is_main_process:
                print(f"[{METHOD}] reusing the strengthened model in {out} (built with the same settings)")
            return str(out)
        if accelerator.is_main_process:
            print(f"[{METHOD}] {out} was built with other settings (strengthen.json); rebuilding it")
    set_seed(args.seed)
    forget = scenarios.method_rows(args)[0]
    ds = common.QADataset(forget, tok, fmt, args.max_length)
    loader = launch.make_loader(ds, args.per_device_batch_size, args.seed, accelerator,
                                lambda b: common.collate(b, tok.pad_token_id))
    log = runlog.RunLogger(Path(args.output_dir) / ".strengthen_log", settings, {}, accelerator.is_main_process)
    if accelerator.is_main_process:  # its own stage: its own steps, under the same --max_steps cap
        steps = launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.strengthen_epochs,
                                   args.warmup_epochs, args.max_steps, args.schedule)["total_steps"]
        print(f"[{METHOD}] strengthening (before unlearning): {args.strengthen_epochs} epochs at lr "
              f"{args.strengthen_lr:g}, {steps} optimizer steps"
              f"{' (stopped there by --max_steps)' if args.max_steps and steps == args.max_steps else ''}", flush=True)
    model = fit(accelerator, models.load_trained(args, accelerator), loader,
                lambda m, b: {"loss": nll_loss(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                               b["labels"])},
                args, args.strengthen_epochs, args.strengthen_lr, "strengthen", log)
    launch.save_model(accelerator, model, tok, fmt, out, log.dir, adapter_only=adapter_only)
    if accelerator.is_main_process:  # written last: a folder without it is never reused
        runlog.atomic_write_json(out / "strengthen.json", settings)
    launch.release(accelerator, model)
    return str(out)


STRENGTHENED = "strengthened"  # the strengthening adapter's name in the one-base (LoRA) model


def _same_model(base: str | None, model: str) -> bool:
    """True when an adapter's base (None: not an adapter) is --model, so the adapter can share its base."""
    if base is None:
        return False
    a, b = models.resolve_model_path(base), models.resolve_model_path(model)
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """Strengthening (its own training stage, released when done), then the frozen models placed for
    the backend: the original model (teacher and KL retain term) and the strengthened model; with
    --precompute_teacher, the teacher's log-probs over the forget set instead, after which only what
    the retain term needs stays in memory.
    With --lora_r, one base model: the student (base + trained adapter) is built here and handed to
    main() as frozen['model']; the original model is its base with adapters off and the strengthened
    model its base with the strengthening adapter alone (models.AdapterView). A --strengthened_model
    that is a full model, or an adapter on another base, is loaded beside it (merged) as before."""
    if args.retain_loss != "none" and not ds.retain:
        raise TofuError(f"--retain_loss {args.retain_loss} needs retain rows, but {scenarios.retain_source(args)} has none")
    str_path = strengthen(args, tok, ds.fmt, accelerator, adapter_only=bool(args.lora_r))
    frozen = {"store": None}
    if args.lora_r:
        frozen["model"] = models.load_trained(args, accelerator)
        vocab = launch.unwrapped(frozen["model"]).config.vocab_size
    else:
        ori = models.load_model(args.model, frozen=True)[0]
        vocab = ori.config.vocab_size
    counts = answer_counts(ds)
    args.precompute_teacher = decide_precompute(args.precompute_teacher, counts, vocab, accelerator)
    if args.lora_r:
        if args.precompute_teacher or args.eval_teacher:  # the views run before fit() prepares the model
            launch.place_for_views(frozen["model"], accelerator, "--precompute_teacher or --eval_teacher")
        ori = models.AdapterView(frozen["model"])
    if args.lora_r and _same_model(models.adapter_base(str_path), args.model):
        frozen["model"].load_adapter(str_path, adapter_name=STRENGTHENED)  # frozen (is_trainable=False)
        strong = models.AdapterView(frozen["model"], STRENGTHENED)
    else:
        strong = models.load_model(str_path, frozen=True)[0]
    if strong.config.vocab_size != ori.config.vocab_size:
        raise TofuError(f"the strengthened model's vocabulary ({strong.config.vocab_size}) differs from the "
                        f"original's ({ori.config.vocab_size}); pass a model fine-tuned from --model")
    # bf16 weights under mixed precision, but logits from an fp32 output head: the teacher multiplies
    # a difference of two logit vectors by alpha, which would amplify bf16 rounding (0.5-1 nat at alpha 8).
    # With LoRA the head is the student's too, whose logits are then fp32 as well.
    for m in (ori, strong):
        launch.fp32_output_head(m.model if isinstance(m, models.AdapterView) else m)
    ori, strong = (m if isinstance(m, models.AdapterView) else launch.place_frozen(m, accelerator) for m in (ori, strong))
    frozen.update(ori=ori, teacher=Teacher(ori, strong, args.alpha))
    del strong
    if args.eval_teacher:
        frozen["eval/teacher"] = evaluator.run(frozen["teacher"], "teacher", compare_precision=False)
    if args.precompute_teacher:
        path = Path(args.output_dir) / "teacher_logp.f32"
        frozen.update(store=precompute_teacher(frozen["teacher"], ds, tok.pad_token_id, accelerator, path,
                                               args.per_device_batch_size), teacher=None)
        if args.retain_loss != "kl":
            frozen["ori"] = None
        if STRENGTHENED in getattr(frozen.get("model"), "peft_config", {}):
            frozen["model"].delete_adapter(STRENGTHENED)
        del ori
        gc.collect()
        where = frozen["store"].place(accelerator.device, *store_budgets(accelerator.device))
        if accelerator.is_main_process:
            print(f"[{METHOD}] teacher store: {frozen['store'].nbytes / 2**30:.2f} GiB, read from {where}", flush=True)
    return frozen


STORE_SHARE = 0.25  # the share of a device's memory, and of the host's available memory, the teacher store may take


def store_budgets(device: torch.device) -> tuple[int, int]:
    """(device, host) bytes the precomputed teacher may take: STORE_SHARE of the device's memory, capped
    by what is free on it now (the rest is the student's: weights, gradients, Adam moments, activations),
    and STORE_SHARE of the host memory available now, shared by the node's processes (each holds its own
    copy; LOCAL_WORLD_SIZE, which every launcher sets). On CPU the device is the host."""
    import psutil  # an accelerate dependency
    host = int(STORE_SHARE * psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type != "cuda":
        return host, host
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(min(STORE_SHARE * total, free)), host


def answer_counts(ds) -> list[int]:
    """Answer tokens of each forget row (labels[1:] != -100): the teacher store's rows."""
    return [sum(t != -100 for t in ds[i]["forget"]["labels"][1:]) for i in range(len(ds))]


def decide_precompute(asked: bool | None, counts: list[int], vocab: int, accelerator) -> bool:
    """--precompute_teacher as asked, or by default whenever the store fits the device or the host
    (store_budgets): the teacher is constant, so one teacher pass per row replaces one per row and
    epoch, and a step then runs only the student. Rank 0 decides for every rank (the precompute's
    passes keep the ranks in step). Prints the store's size."""
    nbytes = 4 * vocab * sum(counts)
    budgets = store_budgets(accelerator.device)
    fits = launch.main_decides(accelerator, lambda: nbytes <= max(budgets))
    precompute = fits if asked is None else bool(asked)
    if accelerator.is_main_process:
        why = "as --precompute_teacher says" if asked is not None else "it fits" if fits else "it fits neither"
        print(f"[{METHOD}] teacher store: {sum(counts):,} answer tokens x {vocab:,} x 4 bytes = "
              f"{nbytes / 2**30:.2f} GiB "
              f"(budget: device {budgets[0] / 2**30:.1f} GiB, host {budgets[1] / 2**30:.1f} GiB); "
              f"{'precomputed' if precompute else 'live teacher'} ({why})", flush=True)
    return precompute


class TeacherStore:
    """Teacher log-probs of every forget answer token in float32 files that the OS pages in as needed:
    4*V bytes per answer token (128 kB for a 32,000-token vocabulary), on disk rather than in each
    rank's memory. One file per writing rank, PATH.rank<r>-of-<world>.f32: row i of the dataset is
    written by rank i % world, into that rank's file alone, at lines offsets[i]:offsets[i+1] of it.
    Ranks on several nodes writing neighbouring rows of one shared file would share its pages at the
    rows' edges, and a network file system can lose one node's writes to a shared page (tokens then
    read back as zeros); separate files share no page. The files live in the run folder (shared by
    every rank; on several nodes it must be a shared file system); rank 0 deletes them when its store
    is collected. mode: 'w+' creates rank `rank`'s file, 'r+' writes into it, 'r' reads every file.
    place() then reads the files into memory once (on the device when they fit, see setup_frozen)."""

    def __init__(self, path: Path, counts: list[int], vocab: int, world: int = 1, mode: str = "r",
                 rank: int = 0, owner: bool = False):
        self.files = [Path(f"{path}.rank{r}-of-{world}.f32") for r in range(world)]
        self.where, self.offsets, sizes = [], [], [0] * world  # row -> file, and its first line in that file
        for i, n in enumerate(counts):
            self.where.append(i % world)
            self.offsets.append(sizes[i % world])
            sizes[i % world] += int(n)
        self.counts, self.vocab = [int(n) for n in counts], vocab
        self.tensors, self.copy_to = None, None  # place(): the rows in memory, and the device they go to
        rows = range(world) if mode == "r" else [rank]
        self.mm = {r: np.memmap(self.files[r], np.float32, mode, shape=(max(sizes[r], 1), vocab)) for r in rows}
        if owner:
            for f in self.files:
                weakref.finalize(self, lambda f=f: f.unlink(missing_ok=True))

    def _lines(self, i: int):
        return self.mm[self.where[i]], slice(self.offsets[i], self.offsets[i] + self.counts[i])

    @property
    def nbytes(self) -> int:
        return 4 * sum(self.counts) * self.vocab

    def place(self, device: torch.device, device_budget: int, host_budget: int) -> str:
        """Read every file into memory once, after verify(): onto `device` when the store takes at most
        device_budget bytes, so a step reads its rows by index where it computes; else, on CUDA, into
        page-locked host memory (within host_budget), each row then copied without blocking; else the
        rows stay in the memory-mapped files, read at each step. Returns where the rows are."""
        if self.nbytes <= device_budget:
            where, target = ("the device" if device.type == "cuda" else "memory"), device
        elif device.type == "cuda" and self.nbytes <= host_budget:
            where, target, self.copy_to = "pinned host memory", None, device
        else:
            return "memory-mapped files"
        self.tensors = {}
        for r, mm in self.mm.items():
            t = torch.empty(mm.shape, dtype=torch.float32, device=target, pin_memory=target is None)
            for a in range(0, mm.shape[0], 4096):  # in chunks: no second whole copy in host memory
                t[a:a + 4096].copy_(torch.from_numpy(np.array(mm[a:a + 4096])))
            self.tensors[r] = t
        return where

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.tensors is None:
            mm, lines = self._lines(i)
            return torch.from_numpy(np.array(mm[lines]))
        rows = self.tensors[self.where[i]][self.offsets[i]:self.offsets[i] + self.counts[i]]
        return rows if self.copy_to is None else rows.to(self.copy_to, non_blocking=True)

    def write(self, i: int, logp: torch.Tensor) -> float:
        """Store row i (this rank's file must hold it); returns its checksum (checksum())."""
        mm, lines = self._lines(i)
        mm[lines] = logp.float().cpu().numpy()
        return self.checksum(i)

    def checksum(self, i: int) -> float:
        mm, lines = self._lines(i)
        return float(np.asarray(mm[lines], dtype=np.float64).sum())

    def flush(self) -> None:
        """Write this rank's pages out to the file system (msync, then fsync for network file systems)."""
        for mm in self.mm.values():
            mm.flush()
            fd = os.open(mm.filename, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def verify(self, sums: dict[int, float]) -> None:
        """Read every row back and compare it with the checksum its writer computed: a row the file
        system lost (zeros) or that another writer overwrote is refused rather than trained on."""
        bad = [i for i, s in sums.items() if not math.isclose(self.checksum(i), s, rel_tol=1e-6, abs_tol=1e-3)]
        if bad:
            raise TofuError(f"the precomputed teacher read back differs from what was written in {len(bad)} of "
                            f"{len(sums)} rows (first: row {bad[0]} in {self.files[self.where[bad[0]]]}); the run folder's "
                            "file system lost writes: put --output_dir on a file system every rank sees consistently")


def precompute_teacher(teacher, ds, pad_id, accelerator, path: Path, batch_size: int) -> TeacherStore:
    """Teacher log-probs of every forget row, written once to a TeacherStore. Each rank computes only
    rows rank, rank + world, ..., into its own file; where a forward pass is a collective (FSDP2, ZeRO-3)
    every rank runs the same number of them. Then every rank reads every row back and checks it
    against its writer's checksum (TeacherStore.verify)."""
    from accelerate.utils import gather_object
    items, counts = [ds[i]["forget"] for i in range(len(ds))], answer_counts(ds)
    vocab, rank, world = teacher.config.vocab_size, accelerator.process_index, accelerator.num_processes
    path.parent.mkdir(parents=True, exist_ok=True)  # the run folder (strengthening made it, unless skipped)
    TeacherStore(path, counts, vocab, world, "w+", rank).flush()
    store = TeacherStore(path, counts, vocab, world, "r+", rank)
    mine = list(range(rank, len(items), world))
    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    calls = math.ceil(math.ceil(len(items) / world) / batch_size) if launch.shards_parameters(accelerator) else len(chunks)
    sums = {}
    for c in tqdm(range(calls), desc="precompute teacher", disable=not accelerator.is_main_process):
        rows = chunks[c] if c < len(chunks) else [0]  # a pass that keeps the ranks in step; not written
        f = common.collate([items[i] for i in rows], pad_id)
        logp = live_teacher_logp(teacher, {k: v.to(accelerator.device) for k, v in f.items()})
        if logp.shape[-1] != vocab:
            raise TofuError(f"the teacher's logits have {logp.shape[-1]} entries, its config says {vocab}")
        if c < len(chunks):
            for i, part in zip(rows, logp.split([counts[i] for i in rows])):
                sums[i] = store.write(i, part)
    store.flush()
    del store
    if world > 1:
        sums = {i: s for part in gather_object([sums]) for i, s in part.items()}
    accelerator.wait_for_everyone()
    store = TeacherStore(path, counts, vocab, world, "r", owner=accelerator.is_main_process)
    store.verify(sums)
    return store


@torch.no_grad()
def live_teacher_logp(teacher, f: dict) -> torch.Tensor:
    """log p_tea [N, V] at the answer positions of a forget batch."""
    logits = teacher(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    return F.log_softmax(logits[:, :-1][answer_positions(f["labels"])], -1)


def padded_parts(args) -> tuple[str, ...]:
    """Batch parts padded to --pad_to: those a reference-reduced loss averages over, padding included."""
    return ("retain",) if args.retain_loss == "kl" and args.loss_reduction == "reference" else ()


def batch_parts(args) -> tuple[str, ...]:
    """The batch parts step_losses reads (common.ForgetRetainDataset tokenizes only these)."""
    return ("forget", *(("retain",) if args.retain_loss != "none" else ()))


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': total, 'loss/forget': ..., 'loss/retain': ...} for one micro-batch."""
    f = batch["forget"]
    logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    if frozen["store"] is not None:
        t_logp = torch.cat([frozen["store"][i] for i in batch["index"]]).to(logits.device)
    else:
        t_logp = live_teacher_logp(frozen["teacher"], f)
    out = {"loss/forget": divergence_loss(logits, t_logp, f["labels"], args.divergence)}
    if args.retain_loss != "none":
        r = batch["retain"]
        r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        if args.retain_loss == "rt":
            out["loss/retain"] = nll_loss(r_logits, r["labels"])
        else:
            with torch.no_grad():
                ref = frozen["ori"](input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
            out["loss/retain"] = kl_retain_loss(r_logits, ref, r["attention_mask"], args.loss_reduction)
    out["loss"] = out["loss/forget"] + args.retain_weight * out.get("loss/retain", 0.0)
    return out


# ====================================================================
# MAIN (shared boilerplate: identical in every method script)
# ====================================================================
def fit(accelerator, model, loader, loss_fn, args, epochs: int, lr: float, desc: str, log, at_epoch=None):
    """The training loop of every stage (fine-tuning, strengthening, unlearning): AdamW and a linear
    schedule; model, optimizer and loader prepared together (what FSDP2 needs); gradient accumulation
    as the Accelerator was built, the last window of an epoch weighted by its own size; clipping;
    logged losses averaged over the step's micro-batches and every rank. at_epoch(e, model) runs
    before training (e = 0) and after every epoch but the last. Returns the prepared model; the
    caller ends the stage with launch.release()."""
    sizes = launch.step_counts(len(loader.dataset), loader.batch_size, accelerator, epochs, args.warmup_epochs,
                               args.max_steps, args.schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, sizes["warmup_steps"], sizes["total_steps"])
    micro, (model, optimizer, loader) = loader.batch_size, accelerator.prepare(model, optimizer, loader)
    ga, meter, step, total = accelerator.gradient_accumulation_steps, launch.LossMeter(), 0, sizes["total_steps"]
    per_forward = forward_batch.forward_size(accelerator, model, loader, loss_fn, args.forward_batch, micro, ga, desc)
    note = launch.warmup_note(total, sizes["warmup_steps"], lr)
    if note and accelerator.is_main_process:
        print(f"[{desc}] {note}", flush=True)
    if at_epoch:
        at_epoch(0, model)
    bar, shared = tqdm(total=total, desc=desc, disable=not accelerator.is_main_process), forward_batch.SharedForward(model)
    with forward_batch.forwards_per_step(accelerator, ga // per_forward):  # accelerate counts forwards, not micro-batches
        for epoch in range(epochs if total else 0):
            model.train()
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            for i, batches in forward_batch.forward_groups(loader, per_forward):  # i: the group's first micro-batch
                with accelerator.accumulate(model):
                    with forward_batch.ForwardGroup(batches, accelerator.sync_gradients) as group:
                        losses = group.losses(loss_fn, shared)  # one loss per micro-batch, forwards shared
                    accelerator.backward(forward_batch.group_loss(losses, i, len(loader), ga, per_forward, args.last_window))
                    for one in losses:
                        meter.add(one)
                    if accelerator.sync_gradients:
                        logged = meter.mean(accelerator)  # a collective: every rank stops here, or none does
                        if not math.isfinite(logged["loss"]):
                            raise TofuError(f"loss is {logged['loss']} at step {step + 1} (epoch {epoch}); "
                                            "stopped before saving anything")
                        if args.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    used = scheduler.get_last_lr()[0]  # the rate this step ran at, before the schedule moves on
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items()})
                    log.log(step, {"epoch": epoch, **logged, "lr": used})
                    if step == total:
                        break
            if step == total:
                break
            if at_epoch and epoch + 1 < epochs:
                at_epoch(epoch + 1, model)
    bar.close()
    return model


def main():
    args = flags.finalize_args(flags.parse(Args, QUICK, PAPER), METHOD, QUICK, PAPER)
    accelerator, ga = launch.make_accelerator(args.batch_size, args.per_device_batch_size, args.max_grad_norm,
                                              args.report_to, args.output_dir)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt)
    forget, retain = scenarios.method_rows(args)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk(),
                                    parts=batch_parts(args))
    loader = launch.make_loader(ds, args.per_device_batch_size, args.seed, accelerator,
                                lambda b: common.collate_pairs(b, tok.pad_token_id, args.pad_to, padded_parts(args)))
    derived = {"world_size": accelerator.num_processes, "grad_accum": ga,
               "effective_batch": args.per_device_batch_size * ga * accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type), "forget_rows": len(forget),
               "retain_rows": len(retain), "truncated": ds.n_truncated, "prompt_format": dataclasses.asdict(fmt),
               **launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.epochs, args.warmup_epochs,
                                    args.max_steps, args.schedule)}
    if accelerator.is_main_process:
        print(flags.recipe_line(METHOD, args, derived, (QUICK if args.recipe == "quick" else PAPER).get("_source")))
    log = runlog.RunLogger(out_dir, args, derived, accelerator.is_main_process, accelerator, defer=True)
    evaluator = method_eval.MethodEval(args, tok, fmt, accelerator, out_dir, log)
    frozen = setup_frozen(args, ds, tok, accelerator, evaluator)  # stages that train (strengthening) end here
    history = [(k.split("/")[1], v) for k, v in frozen.items() if k.startswith("eval/")]
    model = frozen.pop("model", None) or models.load_trained(args, accelerator)  # with --lora_r: base + adapter
    forward_batch.share_forwards(frozen)  # frozen models batch like the trained one under --forward_batch
    log.open()  # set up without a refusal: the run folder gets args.json and metrics.jsonl now

    def at_epoch(epoch, prepared):  # epoch 0: the starting model, evaluated as prepared for training
        if epoch == 0:
            history.insert(0, ("before", evaluator.run(prepared, "before", cache_key=args.model)))
        else:  # --eval_every_epoch: in full; --peak_epoch: forget quality, keeping the best epoch's weights
            history.extend(evaluator.epoch_end(prepared, epoch))

    model = fit(accelerator, model, loader, lambda m, b: step_losses(m, b, frozen, args), args, args.epochs,
                args.lr, METHOD, log, at_epoch)
    frozen.clear()  # the frozen models are no longer needed: free them before the last evaluation
    launch.save_model(accelerator, model, tok, fmt, out_dir / "model")
    if accelerator.is_main_process:
        print(f"[{METHOD}] saved the unlearned model to {out_dir / 'model'}")
    history.append(("after", evaluator.run(model, "after")))
    launch.release(accelerator, model)
    history.extend(evaluator.peak(history[-1][1], args.epochs))  # --peak_epoch: that epoch in full
    evaluator.attack(out_dir / "model", history)  # --relearn_attack, --quantize_attack (evaluation/attacks.py)
    evaluator.report(history)
    log.finish()


if __name__ == "__main__":
    common.cli(main)
