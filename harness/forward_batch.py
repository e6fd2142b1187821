"""--forward_batch: one forward (and one backward) over several micro-batches, each loss still computed on
its own micro-batch's rows (ForwardGroup, SharedForward for frozen models), the groups a loader's
micro-batches make (forward_groups, group_loss), and the choice of how many (forward_size, with the
probe that `auto` runs on a GPU). fit() in every script calls these; harness/launch.py builds the rest
of the launch."""
from __future__ import annotations

import dataclasses
import gc

import torch
import torch.nn.functional as F

from common import TofuError
from harness import launch


FORWARD_BATCH_HELP = (
    "Rows that go through the model in one forward (and one backward), independent of --per_device_batch_size, "
    "which stays the loss's micro-batch: each micro-batch's loss is computed, as defined, on its own rows of one "
    "forward over several micro-batches (right padding leaves a causal LM's logits at real positions unchanged), "
    "and frozen models (teacher, reference) run the same way. N: a multiple of --per_device_batch_size whose "
    "micro-batches divide one process's accumulation window. auto (default): on a GPU the largest that fits, "
    "probed once at start on the longest rows and printed, up to the window (one micro-batch under FSDP2/ZeRO-3 "
    "on several processes, where a probe that runs out of memory on one rank would hang the others); on CPU one "
    "micro-batch a forward: there bench/bench_forward_batch.py measured one forward of 32 rows at 0.80-1.04 of the "
    "time of 8 of 4 (within noise for most methods: its wider padding costs about what the fewer calls save; "
    "docs/throughput.md), so CPU runs (tests, the quick path, the results grids) keep the path they were made with.")


def check_forward_batch(value: str, per_device_batch_size: int) -> None:
    """--forward_batch at parse time: auto, or a positive multiple of the micro-batch."""
    if value == "auto":
        return
    if not (str(value).isdigit() and int(value) >= 1):
        raise TofuError(f"--forward_batch must be auto or a number of rows, not {value!r}")
    if int(value) % per_device_batch_size:
        raise TofuError(f"--forward_batch {value} must be a multiple of --per_device_batch_size {per_device_batch_size} "
                        "(each forward holds whole micro-batches)")


def micro_batches_per_forward(value: str, per_device_batch_size: int, grad_accum: int) -> int | None:
    """Micro-batches in one forward for --forward_batch `value` (None: auto, to be probed). A forward
    never straddles two optimizer steps, so its micro-batches must divide the accumulation window."""
    check_forward_batch(value, per_device_batch_size)
    if value == "auto":
        return None
    k = int(value) // per_device_batch_size
    if grad_accum % k:
        fits = [d * per_device_batch_size for d in range(1, grad_accum + 1) if grad_accum % d == 0]
        raise TofuError(f"--forward_batch {value} is {k} micro-batches of {per_device_batch_size}, which does not divide "
                        f"this process's accumulation window of {grad_accum}; choose one of {fits} (or auto)")
    return k


def micro_batch_parts(batch: dict):
    """(name, part) for every tokenised part of a collated batch: the batch itself when it holds
    input_ids (QADataset), else each of its dicts that does (forget, retain, forget_idk, ...)."""
    if "input_ids" in batch:
        yield None, batch
    for key, value in batch.items():
        if isinstance(value, dict) and "input_ids" in value:
            yield key, value


class ForwardGroup:
    """Micro-batches that run through each model in one forward. While the group is active (`with`),
    a SharedForward model called with a micro-batch part's own input_ids and attention_mask tensors
    (the objects the loader gave) runs the model once over that part of every micro-batch (right-padded
    to the longest and concatenated; computed on the first call, kept for the others) and returns the
    micro-batch's rows and its own length of the outputs (logits, hidden states, and the model's own
    loss when labels are passed), so each loss sees the tensors the micro-batch path gives it. Any other
    call (other tensors, a group of one) runs the model as called. ends_step: fit() says whether the
    group ends an optimizer step (ends_step() below); None in a probe, which updates no state."""
    active = None

    def __init__(self, batches: list, ends_step: bool | None):
        self.batches, self.ends_step, self.outputs, self.merged, self.current = batches, ends_step, {}, {}, 0
        self.where = {id(part["input_ids"]): (key, g) for g, b in enumerate(batches) for key, part in micro_batch_parts(b)}

    def __enter__(self):
        ForwardGroup.active = self
        return self

    def __exit__(self, *exc):
        ForwardGroup.active, self.outputs, self.merged = None, {}, {}

    def losses(self, loss_fn, model) -> list[dict]:
        """loss_fn(model, micro-batch) for each micro-batch of the group, `model` shared (SharedForward)."""
        out = []
        for g, batch in enumerate(self.batches):
            self.current = g
            out.append(loss_fn(model, batch))
        return out

    def find(self, args, kwargs):
        """(part name, micro-batch index) of a model call on one micro-batch's own tensors, else None."""
        if len(self.batches) == 1 or args or "input_ids" not in kwargs or kwargs.get("attention_mask") is None:
            return None
        hit = self.where.get(id(kwargs["input_ids"]))
        if hit is None:
            return None
        part = self.part(*hit)
        for k, v in kwargs.items():  # every tensor must be the micro-batch's own (labels, mask), none other
            if isinstance(v, torch.Tensor) and (k not in part or part[k] is not v):
                return None
        return hit

    def part(self, key, g) -> dict:
        b = self.batches[g]
        return b if key is None else b[key]

    def merge(self, key) -> dict:
        """The part `key` of every micro-batch, right-padded to the longest and concatenated."""
        if key not in self.merged:
            parts = [self.part(key, g) for g in range(len(self.batches))]
            width = max(p["input_ids"].shape[1] for p in parts)
            pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
            self.merged[key] = {k: torch.cat([pad(p[k], -100 if k == "labels" else 0) for p in parts])
                                for k in ("input_ids", "attention_mask")}
        return self.merged[key]

    def output(self, model, key, g, kwargs):
        """Micro-batch g's share of `model`'s one forward over part `key` of the group. The outputs are
        split by rows once (one split: the backward puts the micro-batches' gradients together in one
        concatenation, where a slice each would write k full-size gradients) and cut to g's own length."""
        extra = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")))
        cache = (id(model), key, torch.is_grad_enabled(), extra)
        if cache not in self.outputs:
            m = self.merge(key)
            out = model(input_ids=m["input_ids"], attention_mask=m["attention_mask"], **dict(extra))
            rows = [self.part(key, j)["input_ids"].shape[0] for j in range(len(self.batches))]
            hidden = getattr(out, "hidden_states", None)
            self.outputs[cache] = (out.logits.split(rows), None if hidden is None else [h.split(rows) for h in hidden])
        logits, hidden = self.outputs[cache]
        width = self.part(key, g)["input_ids"].shape[1]
        cut = lambda t: t if t.shape[1] == width else t[:, :width]  # noqa: E731
        mine = SharedOutput(logits=cut(logits[g]), hidden_states=None if hidden is None else tuple(cut(h[g]) for h in hidden))
        if "labels" in kwargs:  # the model's own loss, as its forward computes it from labels
            inner = launch.unwrapped(model)
            mine.loss = inner.loss_function(logits=mine.logits.contiguous(), labels=kwargs["labels"],
                                            vocab_size=inner.config.vocab_size)
        return mine


@dataclasses.dataclass
class SharedOutput:
    """What a SharedForward model returns for one micro-batch of a group: its rows of the outputs."""
    logits: torch.Tensor
    hidden_states: tuple | None = None
    loss: torch.Tensor | None = None


class SharedForward:
    """A model (trained, reference, teacher) whose calls on a micro-batch of the active ForwardGroup
    share one forward over the whole group; every other call and attribute goes to the model."""

    def __init__(self, model):
        self.__dict__["model"] = model

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args, **kwargs):
        group = ForwardGroup.active
        hit = group.find(args, kwargs) if group is not None else None
        if hit is None:
            return self.model(*args, **kwargs)
        return group.output(self.model, *hit, kwargs)


def share_forwards(frozen: dict) -> dict:
    """Wrap the frozen models of `frozen` (every callable value: reference, teacher, original) in
    SharedForward, in place, so they batch like the trained model under --forward_batch."""
    for k, v in frozen.items():
        if callable(v) and not isinstance(v, SharedForward):
            frozen[k] = SharedForward(v)
    return frozen


def ends_step() -> bool | None:
    """Inside a loss: True on the last micro-batch of an optimizer step (PDU's dual update), None in a
    --forward_batch auto probe (count nothing). Reads the group fit() runs; outside fit, accelerate's flag."""
    from accelerate.state import GradientState
    group = ForwardGroup.active
    if group is None:
        return GradientState().sync_gradients
    if group.ends_step is None:
        return None
    return group.ends_step and group.current == len(group.batches) - 1


def forward_groups(loader, k: int):
    """(index of the first micro-batch, the next k micro-batches) over a loader; the epoch's last group
    may be shorter. k divides the accumulation window, so no group straddles two optimizer steps."""
    group, first = [], 0
    for i, batch in enumerate(loader):
        group.append(batch)
        if len(group) == k:
            yield first, group
            group, first = [], i + 1
    if group:
        yield first, group


def group_loss(losses: list[dict], first: int, n_batches: int, grad_accum: int, k: int, rule: str = "mean"):
    """The loss one backward of a group gets: each micro-batch's loss x its window_weight, summed and
    divided by k, the micro-batches a forward holds. accelerate divides by the forwards of a window
    (grad_accum / k, as forwards_per_step sets it), so every micro-batch counts loss x weight / grad_accum,
    as one micro-batch a forward gives; a short last group is divided by k too."""
    total = None
    for g, losses_g in enumerate(losses):
        term = losses_g["loss"] * launch.window_weight(first + g, n_batches, grad_accum, rule)
        total = term if total is None else total + term
    return total if k == 1 else total / k


class forwards_per_step:
    """Within `with`: accelerate counts `n` forwards (not micro-batches) to an optimizer step, and
    divides each backward's loss by n; the Accelerator's setting comes back after."""

    def __init__(self, accelerator, n: int):
        self.accelerator, self.n = accelerator, n

    def __enter__(self):
        self.saved = self.accelerator.gradient_accumulation_steps
        self.accelerator.gradient_accumulation_steps = self.n

    def __exit__(self, *exc):
        self.accelerator.gradient_accumulation_steps = self.saved


def forward_size(accelerator, model, loader, loss_fn, value: str, per_device_batch_size: int, grad_accum: int,
                 desc: str) -> int:
    """Micro-batches per forward for --forward_batch `value` (printed): N as given; auto probed on a GPU
    (probe_forward_size), one micro-batch on CPU, under DeepSpeed and on several sharded processes."""
    from accelerate.utils import DistributedType
    k = micro_batches_per_forward(value, per_device_batch_size, grad_accum)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if k is not None and k > 1 and deepspeed:
        raise TofuError("--forward_batch above --per_device_batch_size is not supported under DeepSpeed, whose engine "
                        "counts accumulation per backward itself; leave --forward_batch at auto")
    how = "as set"
    if k is None:
        k, how = 1, ("auto: one micro-batch on CPU" if not torch.cuda.is_available() else
                     "auto: one micro-batch under DeepSpeed" if deepspeed else
                     "auto: one micro-batch on several sharded processes" if launch.shards_parameters(accelerator) else None)
        if how is None:
            k = probe_forward_size(accelerator, model, loader, loss_fn, per_device_batch_size, grad_accum)
            how = f"auto: the largest that fit the longest rows, of up to {grad_accum}"
    if accelerator.is_main_process:
        print(f"[{desc}] forward batch: {k * per_device_batch_size} rows ({k} micro-batch{'es' * (k > 1)} of "
              f"{per_device_batch_size}) a forward ({how})", flush=True)
    return k


def probe_forward_size(accelerator, model, loader, loss_fn, per_device_batch_size: int, grad_accum: int) -> int:
    """The most micro-batches (a divisor of grad_accum) whose forward and backward fit in GPU memory, tried
    from grad_accum down on the dataset's longest rows, through loss_fn (frozen forwards included) with the
    random state kept and the gradients dropped; several processes take the ranks' smallest, in step."""
    from accelerate.utils import send_to_device
    ds, collate = loader.dataset, loader.collate_fn
    size = {i: sum(len(p["input_ids"]) for _, p in micro_batch_parts(ds[i])) for i in range(len(ds))}
    longest = sorted(size, key=lambda i: -size[i])
    model.train()
    for k in [d for d in range(grad_accum, 0, -1) if grad_accum % d == 0]:
        rows = [longest[j % len(longest)] for j in range(k * per_device_batch_size)]
        fits = True
        try:
            batches = [send_to_device(collate([ds[j] for j in rows[g * per_device_batch_size:(g + 1) * per_device_batch_size]]),
                                      accelerator.device) for g in range(k)]
            cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), accelerator.no_sync(model):
                with ForwardGroup(batches, None) as group:
                    losses = group.losses(loss_fn, SharedForward(model))
                accelerator.backward(group_loss(losses, 0, k, k, k))
        except torch.cuda.OutOfMemoryError:
            fits = False
        finally:
            model.zero_grad(set_to_none=True)
            losses = batches = group = None
            gc.collect()
            torch.cuda.empty_cache()
        if accelerator.num_processes > 1:  # every rank tries the same sizes, so the forwards stay in step
            flag = torch.tensor([int(fits)], device=accelerator.device)
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN)
            fits = bool(flag.item())
        if fits:
            return k
    return 1
