"""The launch: the Accelerator, frozen models placed under the backend (DDP, FSDP2, ZeRO-3),
the starting model, saving, step counts, window weights and the logged losses."""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import TofuError
from harness import models, runlog


def save_prompt_format(fmt: common.PromptFormat, model_dir) -> None:
    runlog.atomic_write_json(Path(model_dir) / common.FORMAT_FILE, dataclasses.asdict(fmt))


def starting_model(args, accelerator, frozen: dict):
    """The frozen starting model (a reference or KL target). Full fine-tuning: a copy loaded and placed
    (load_frozen, at --ref_precision). LoRA: no copy: the trained model is built here (load_trained),
    handed to main() as frozen['model'], and the starting model is its base with the adapter off
    (AdapterView), the same weights and precision as the trained model's, so log-ratios are 0 at the
    first step whatever --ref_precision says."""
    if not getattr(args, "lora_r", 0):
        return load_frozen(args.model, accelerator, args.ref_precision == "match")
    frozen["model"] = frozen.get("model") or models.load_trained(args, accelerator)
    return models.AdapterView(frozen["model"])


def make_accelerator(batch_size: int, per_device_batch_size: int, max_grad_norm: float | None = None,
                     report_to: str = "none", project_dir=None):
    """(Accelerator, grad_accum) for an effective batch of `batch_size` examples per optimizer step.

    Gradient accumulation goes to the Accelerator constructor (DeepSpeed reads it from there
    when it builds its engine), so it must be known before the Accelerator exists: it comes
    from WORLD_SIZE, which every launcher (accelerate, torchrun, deepspeed) sets. A batch that
    per-device micro-batches x processes cannot make exactly is refused rather than rounded.
    On CPU, cpu=True makes a multi-process launch DDP over gloo (a plain Accelerator() would
    run independent single-process copies there). Under DeepSpeed, which clips inside its engine,
    the config's gradient_clipping becomes `max_grad_norm` (0: none), as the scripts' flag says.
    On CUDA the prepared loaders copy batches to the device without blocking (from pinned memory,
    make_loader), so a copy overlaps the work queued before it.
    report_to (--report_to) picks accelerate's experiment trackers; TensorBoard writes under
    project_dir/tensorboard. RunLogger starts them and logs to them (main process only)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if per_device_batch_size < 1 or batch_size < 1:
        raise TofuError("--batch_size and --per_device_batch_size must be at least 1")
    if batch_size % (per_device_batch_size * world):
        raise TofuError(f"an effective batch of {batch_size} cannot be made from micro-batches of {per_device_batch_size} "
                        f"on {world} process(es); choose --per_device_batch_size so that per_device x {world} divides "
                        f"{batch_size}")
    ga = batch_size // (per_device_batch_size * world)
    log_with = runlog.trackers(report_to)
    from accelerate.utils import DataLoaderConfiguration
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_plugin=accumulation_plugin(ga),
                              dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
                              mixed_precision=models.mixed_precision(), log_with=log_with or None,
                              project_dir=str(Path(project_dir) / "tensorboard") if log_with and project_dir else None)
    if accelerator.num_processes != world:
        raise TofuError(f"WORLD_SIZE says {world} processes but accelerate sees {accelerator.num_processes}; "
                        "launch with accelerate launch or torchrun")
    if accelerator.gradient_accumulation_steps != ga:
        raise TofuError(f"the launch config sets gradient accumulation to {accelerator.gradient_accumulation_steps}, "
                        f"but --batch_size {batch_size} needs {ga} on {world} process(es) of {per_device_batch_size}; "
                        "remove gradient_accumulation_steps from the accelerate config (configs/accelerate/ has none)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("gradient_accumulation_steps", "auto") not in ("auto", ga):
            raise TofuError(f"the DeepSpeed config sets gradient_accumulation_steps {ds['gradient_accumulation_steps']}, "
                            f"but --batch_size {batch_size} needs {ga}; set it to auto")
        ds["gradient_accumulation_steps"] = ga
        if max_grad_norm is not None:
            ds["gradient_clipping"] = max_grad_norm
        if ds.get("zero_optimization", {}).get("stage") == 3:  # saving gathers 16-bit weights (get_state_dict)
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise TofuError("FSDP version 1 is not supported; use fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if accelerator.is_fsdp2 and accelerator.mixed_precision in ("bf16", "fp16"):  # read when a model is prepared
        accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp2_policy(accelerator.mixed_precision)
    return accelerator, ga


LOADER_WORKERS = 0  # collating token ids takes well under a millisecond a batch; workers cost more (docs/throughput.md)


def make_loader(ds, batch_size: int, seed: int, accelerator, collate_fn) -> torch.utils.data.DataLoader:
    """The training loader of every stage: shuffled by a generator seeded with `seed`, batches collated
    by `collate_fn` in the main process, pinned in page-locked memory on CUDA so that accelerate's
    prepared loader copies them without blocking (make_accelerator). The prepared loader reads one
    batch ahead, so the next batch is collated while the device runs the queued work of this one."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(seed), num_workers=LOADER_WORKERS,
                                       pin_memory=accelerator.device.type == "cuda")


def fsdp2_policy(mixed_precision: str):
    """FSDP2's mixed precision for a bf16 (or fp16) launch: parameters gathered and computed in that
    dtype, as the autocast of the one-process path computes, but gradients reduced across ranks in fp32
    (as DDP and one process sum them) and no cast of any module's output (output_dtype None), so logits
    keep the dtype their head computes: fp32 from common's fp32_output_head (RKLD's teacher, whose
    alpha x difference of two logit vectors bf16 rounding would shift by 0.5-1.7 nat), and the reference
    log-ratios of NPO/DPO/KTO keep the one-process precision. accelerate's own FSDP2 policy for bf16
    casts gradients and every output to bf16 (MixedPrecisionPolicy(bf16, bf16, output_dtype=bf16))."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None)


def accumulation_plugin(ga: int, env=None):
    """accelerate's GradientAccumulationPlugin for `ga` micro-batches a step. Under FSDP2 and DeepSpeed
    (as `accelerate launch` announces them in the environment) sync_each_batch=True: gradients are
    reduce-scattered into their shards after every micro-batch. Without it accelerate skips the
    synchronisation between micro-batches, and FSDP2 keeps every rank's full unsharded gradients until
    the step: 13.5 GB in bf16 for a 7B model, which puts RKLD's 2x80 GB setting at about 85 GB. DDP
    keeps skipping it (its gradients are whole on every rank anyway); ZeRO-3's engine partitions each
    micro-batch's gradients itself, so there the setting only says so."""
    from accelerate.utils import GradientAccumulationPlugin
    env = os.environ if env is None else env
    sharded = any(env.get(k, "false").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    return GradientAccumulationPlugin(num_steps=ga, sync_each_batch=sharded)


def shards_parameters(accelerator) -> bool:
    """True when a forward pass is a collective (FSDP2, DeepSpeed ZeRO-3): every rank must then
    run the same number of forward calls, or the ranks that run more wait forever."""
    from accelerate.utils import DistributedType
    if accelerator is None or accelerator.num_processes == 1:
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def main_decides(accelerator, decide):
    """decide() run on rank 0 alone and its answer (any picklable value) sent to every rank. For every
    choice read from shared files (a cache hit, a reusable strengthened model): each rank checking for
    itself can disagree when another job writes between their checks (or a network file system shows
    the ranks different views), and then some ranks skip collectives that others run, and the launch hangs."""
    value = decide() if accelerator is None or accelerator.is_main_process else None
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        value = broadcast_object_list([value], from_process=0)[0]
    return value


def load_frozen(name_or_path: str, accelerator, match: bool = True):
    """A frozen model loaded and placed (place_frozen). match=True: in the trained model's precision,
    fp32 weights under the same bf16 autocast, so a reference model's log-probs equal the trained
    model's exactly at theta = theta_ref and a retain model is evaluated like the models it is
    compared with (4 bytes a parameter); match=False: bf16 weights under mixed precision (2 bytes)."""
    model = models.load_model(name_or_path, dtype=torch.float32 if match else None, frozen=True)[0]
    return place_frozen(model, accelerator)


def fp32_output_head(model):
    """Compute the model's output projection (lm_head) in fp32, outside autocast: logits then carry
    no bf16 rounding (about 0.03-0.125 at logits of 8-32), which RKLD's teacher would multiply by
    alpha. Patches the module's forward, so it holds under FSDP2 and ZeRO-3, which gather the weight
    before the forward runs."""
    head = model.get_output_embeddings()

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)
    head.forward = forward
    return model


def place_frozen(model, accelerator):
    """A frozen (reference, teacher, retain) model placed for inference under the launch's backend,
    without an optimizer and without registering it with the accelerator (so dropping the last
    reference frees it). Under mixed precision its forward runs under the accelerator's autocast,
    as the trained model's does once prepared:
      no distribution / DDP   on the device; bf16 weights on GPU (load_model(frozen=True));
      FSDP2                   sharded like the trained model (accelerate's fsdp2_prepare_model);
      DeepSpeed ZeRO-3        a DeepSpeed inference engine, stage 3, no optimizer (the pattern
                              DeepSpeed documents for models used only in forward passes).
    Under ZeRO-2 or DDP nothing is sharded and the model is simply moved to the device."""
    from accelerate.utils import DistributedType
    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        zero = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("offload_optimizer")}
        config = {"zero_optimization": {**zero, "stage": 3}, "train_micro_batch_size_per_gpu": 1,
                  "bf16": {"enabled": accelerator.mixed_precision == "bf16"}}
        for k in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reduce_bucket_size"):
            if config["zero_optimization"].get(k) == "auto":  # "auto" is only filled in for the trained model
                del config["zero_optimization"][k]
        engine = deepspeed.initialize(model=model, config=config)[0]
        engine.eval()
        return engine
    if accelerator.mixed_precision != "no":  # what accelerator.prepare does to the trained model's forward
        model._original_forward = model.forward
        model.forward = accelerator.autocast()(model.forward)
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        return fsdp2_prepare_model(accelerator, model)
    return model.to(accelerator.device)


def unwrapped(model):
    """The model module under a wrapper whose attributes are not the model's: a DeepSpeed engine (which
    place_frozen returns under ZeRO-3, and whose `.config` is the DeepSpeed config dict) or a DDP wrapper.
    Read model attributes (config, vocabulary) from this, never from the placed object."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def place_for_views(model, accelerator, why: str) -> None:
    """Put a LoRA-trained model whose adapter views (models.AdapterView) run before training (`why`:
    RKLD's precomputed or evaluated teacher) where accelerator.prepare will put it: on the device, in
    place, so the views run on the device and, once fit() prepares the model (DDP wraps this same
    module), their base is the prepared module. Under ZeRO-3 (parameters partitioned at load) and
    under FSDP2 on several processes (parameters sharded, or loaded on rank 0 alone, until the model is
    prepared together with its optimizer) the views cannot run before training: refused in one sentence."""
    from accelerate.utils import DistributedType
    zero3 = (accelerator.distributed_type == DistributedType.DEEPSPEED
             and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if zero3 or (accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1):
        raise TofuError(f"{why} with --lora_r needs the teacher before training, but under "
                        f"{'ZeRO-3' if zero3 else 'FSDP2'} the LoRA base is only usable once training has prepared it; "
                        "set those flags to false there (the live teacher then runs on the prepared model), or "
                        "launch on one GPU or with DDP, where the LoRA base fits")
    model.to(accelerator.device)


def release(accelerator, *objects) -> None:
    """End a training stage: drop what the accelerator prepared (models, optimizers, loaders, the
    DeepSpeed engine that backward() is bound to) and collect it, so the next stage's trained model
    is the only one in memory. Callers drop their own references to `objects` too."""
    accelerator.free_memory(*objects)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_model(accelerator, model, tokenizer, fmt: common.PromptFormat, out: Path, log_dir: Path | None = None,
               adapter_only: bool | None = None) -> None:
    """Save a prepared model to `out` atomically: every rank gathers the state dict (a collective under
    FSDP2 and ZeRO-3, where ZeRO-3 gathers 16-bit weights), rank 0 writes a temp folder beside `out`
    with normal permissions and renames it over `out`. The files of `log_dir` (a training stage's
    args.json and metrics.jsonl) move in with the model. A LoRA model is saved as a plain model with
    its trained adapter merged (merged_state_dict), which every tool loads; adapter_only=True (default:
    the model's --save_adapter_only) writes the trained adapter alone, which load_model merges into
    the base named in its adapter_config.json."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        unwrapped = accelerator.unwrap_model(model)
        plain = unwrapped.get_base_model() if models.is_peft(unwrapped) else unwrapped
        adapter_only = getattr(unwrapped, "save_adapter_only", False) if adapter_only is None else adapter_only
        if models.is_peft(unwrapped) and adapter_only:
            unwrapped.save_pretrained(tmp, state_dict=state, selected_adapters=[models.TRAINED], save_embedding_layers=False)
            models.portable_base(tmp, out)
        else:
            if models.is_peft(unwrapped):
                state = models.merged_state_dict(unwrapped, state)
            if getattr(plain.config, "tie_word_embeddings", False):  # FSDP2 gathers the tied head as a copy
                head = plain.get_output_embeddings()
                state.pop(next(f"{n}.weight" for n, m in plain.named_modules() if m is head), None)
            loaded, trained = getattr(plain, "_use_cache_as_loaded", None), plain.config.use_cache
            plain.config.use_cache = trained if loaded is None else loaded  # the config as loaded (no_kv_cache)
            plain.save_pretrained(tmp, state_dict=state)
            plain.config.use_cache = trained
        tokenizer.save_pretrained(tmp)
        save_prompt_format(fmt, tmp)
        if log_dir is not None and Path(log_dir).exists():
            for f in Path(log_dir).iterdir():
                shutil.move(str(f), tmp / f.name)
            Path(log_dir).rmdir()
        runlog.make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    del state
    accelerator.wait_for_everyone()


def step_counts(n_rows: int, per_device_batch_size: int, accelerator, epochs: int, warmup_epochs: float,
                max_steps: int = 0, rule: str = "epochs") -> dict:
    """Optimizer steps of a run. Each rank sees ceil(n_rows / (per_device x world)) micro-batches an
    epoch (accelerate evens the ranks out by repeating rows from the start), grouped in windows of
    grad_accum; the last window of an epoch may be short (see window_weight), so an epoch takes
    steps_per_epoch = ceil(windows) steps. rule "epochs" runs every epoch in full with
    warmup_epochs x steps_per_epoch warmup steps; rule "reference" runs what closer-look's forget.py
    asks the HF Trainer for: floor(epochs x N / batch) steps (so training can stop inside an epoch)
    and floor(warmup_epochs x N / batch) warmup steps when that is more than 1, else none."""
    batches = math.ceil(n_rows / (per_device_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches / accelerator.gradient_accumulation_steps)
    batch = per_device_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
    if rule == "reference":
        total, warmup = int(epochs * n_rows) // batch, int(warmup_epochs * n_rows // batch)
        warmup = warmup if warmup > 1 else 0
    else:
        total, warmup = steps_per_epoch * epochs, int(round(warmup_epochs * steps_per_epoch))
    return {"steps_per_epoch": steps_per_epoch, "total_steps": min(total, max_steps) if max_steps else total,
            "warmup_steps": warmup}


def warmup_note(total_steps: int, warmup_steps: int, lr: float) -> str | None:
    """One sentence before training when the linear warmup (step t at lr x t / warmup, from t = 0) covers
    the whole run, so the weights barely move or do not move at all; None when the run leaves warmup."""
    if total_steps == 0:
        return "this run has no optimizer steps: the weights will not change"
    if warmup_steps < total_steps:
        return None
    last = lr * (total_steps - 1) / warmup_steps
    fix = "lower --warmup_epochs (0: no warmup) or raise --max_steps/--epochs"
    if total_steps == 1:
        return (f"the run's one optimizer step is the first of {warmup_steps} warmup steps, which runs at lr 0: "
                f"the weights will not change; {fix}")
    return (f"all {total_steps} optimizer steps fall inside the {warmup_steps} warmup steps, so the rate climbs from 0 "
            f"to only {last:.3g} (peak {lr:g}); {fix}")


def window_weight(i: int, n_batches: int, grad_accum: int, rule: str = "mean") -> float:
    """Loss multiplier for micro-batch i of an epoch of n_batches. accelerate divides every loss by
    grad_accum and steps at the end of the epoch, so a last window of k < grad_accum micro-batches
    would be under-weighted by k/grad_accum; scaling it by grad_accum/k makes every optimizer step
    the mean over its own micro-batches (rule "mean"). rule "reference" keeps the under-weighting,
    as the HF Trainer of the reference codebases does."""
    if rule == "reference":
        return 1.0
    start = (i // grad_accum) * grad_accum
    return grad_accum / min(grad_accum, n_batches - start)


class LossMeter:
    """The losses of one optimizer step: `add` each micro-batch's dict of scalar losses, `mean`
    returns their mean over the step's micro-batches and over every rank (a collective: every rank
    calls it at the same step)."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.n += 1

    def mean(self, accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] / self.n for k in keys]).to(accelerator.device)
        t = accelerator.reduce(t, "mean") if accelerator.num_processes > 1 else t
        self.sums, self.n = {}, 0
        return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------------------
# Peak-epoch weights (--peak_epoch): kept without a full gather where the weights are sharded
# ---------------------------------------------------------------------------
def peak_checkpoint(distributed_type: str, processes: int, zero_stage: int = 0) -> str:
    """How --peak_epoch keeps an improving epoch's weights, from the launch's backend (accelerate's
    DistributedType name), its processes and DeepSpeed's ZeRO stage:
      "full"   one process, DDP, ZeRO-1/2: the weights are whole on every rank, so save_model writes
               the HF folder with no gather (the one-process path, unchanged);
      "dcp"    FSDP2 on several processes: each rank writes its own shards (torch distributed
               checkpoint), no gather;
      "zero3"  DeepSpeed ZeRO-3 on several processes: each rank writes its own 16-bit partitions.
    With "dcp" and "zero3" the HF folder is written once, after training (write_peak)."""
    if processes > 1 and distributed_type == "FSDP":
        return "dcp"
    if processes > 1 and distributed_type == "DEEPSPEED" and zero_stage == 3:
        return "zero3"
    return "full"


def launch_peak_checkpoint(accelerator) -> str:
    """peak_checkpoint for this launch."""
    from accelerate.utils import DistributedType
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return peak_checkpoint(accelerator.distributed_type.value, accelerator.num_processes,
                           accelerator.state.deepspeed_plugin.zero_stage if deepspeed else 0)


def peak_shards_dir(out) -> Path:
    """Where save_peak keeps the sharded peak weights of the HF folder `out` until write_peak."""
    return Path(out).with_name(f"{Path(out).name}.shards")


def save_peak(accelerator, model, tokenizer, fmt: common.PromptFormat, out) -> None:
    """Keep the prepared model's weights as the peak epoch's (--peak_epoch, every improving epoch).
    "full" (peak_checkpoint): the HF folder `out` through save_model. "dcp" (FSDP2): every rank writes
    its own shards of the sharded state dict into peak_shards_dir(out) with torch.distributed.checkpoint
    (`__<rank>_0.distcp` and rank 0's `.metadata`): no rank gathers the model. "zero3": every rank
    writes its own 16-bit partitions (rank<r>-of-<world>.pt). A temp folder renamed into place, so a
    crash leaves the last complete peak. write_peak turns the shards into the HF folder once."""
    kind = launch_peak_checkpoint(accelerator)
    if kind == "full":
        return save_model(accelerator, model, tokenizer, fmt, out)
    shards = peak_shards_dir(out)
    tmp = shards.with_name(f".{shards.name}.tmp")  # one path every rank knows
    if accelerator.is_main_process:
        shards.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        dcp.save(get_model_state_dict(model), checkpoint_id=tmp)  # DTensors: each rank its own shards
    else:
        torch.save(zero3_parts(model), tmp / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runlog.replace_dir(tmp, shards)
    accelerator.wait_for_everyone()


def restore_peak(accelerator, model, shards) -> None:
    """Load the peak weights that save_peak sharded into `model`, placed (place_frozen) like the
    trained one: torch distributed checkpoint under FSDP2 (each rank reads the pieces of its own
    shards, whatever the layout they were written with), each rank's 16-bit partitions under ZeRO-3
    (the same world size and model give the same partitions)."""
    shards = Path(shards)
    if (shards / ".metadata").exists():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        state = get_model_state_dict(model)
        dcp.load(state, checkpoint_id=shards)
        set_model_state_dict(model, state)
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    parts = torch.load(shards / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.pt")
    with torch.no_grad():
        for n, p in unwrapped(model).named_parameters():
            p.ds_tensor.copy_(parts[n])
            if p.ds_status == ZeroParamStatus.AVAILABLE:  # persistent: DeepSpeed keeps it whole and does not re-gather
                if f"{n}#whole" not in parts:
                    raise TofuError(f"the peak checkpoint has only a partition of {n}, which this model keeps whole; "
                                    "give both ZeRO-3 engines the same stage3_param_persistence_threshold")
                p.data.copy_(parts[f"{n}#whole"])


def zero3_parts(model) -> dict:
    """A ZeRO-3 model's parameters as this rank holds them: its 16-bit partition of each (`ds_tensor`),
    and the whole tensor of each that DeepSpeed keeps whole on every rank (persistent small parameters,
    `<name>#whole`), which a gather would not refresh from the partitions."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    parts = {}
    for n, p in unwrapped(model).named_parameters():
        parts[n] = p.ds_tensor.detach().cpu()
        if p.ds_status == ZeroParamStatus.AVAILABLE:
            parts[f"{n}#whole"] = p.data.detach().cpu()
    return parts


def write_peak(accelerator, build, tokenizer, fmt: common.PromptFormat, out) -> None:
    """After training, when save_peak kept the peak sharded: `build()` (the trained model as the run
    loads it, for its structure) placed like a frozen model, the peak shards restored into it, the HF
    folder `out` written through save_model (the one gather of the run's peak weights) and the shards
    removed. The folder then holds what save_model would have written at that epoch. Nothing to do
    on the "full" path (save_peak wrote `out` itself), nor without shards."""
    shards = peak_shards_dir(out)
    if launch_peak_checkpoint(accelerator) == "full" or not main_decides(accelerator, shards.exists):
        return
    model = place_frozen(build(), accelerator)
    restore_peak(accelerator, model, shards)
    save_model(accelerator, model, tokenizer, fmt, out)
    del model
    gc.collect()
    if accelerator.is_main_process:
        shutil.rmtree(shards)
    accelerator.wait_for_everyone()
