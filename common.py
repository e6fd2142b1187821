"""Data plumbing shared by every script: TOFU splits and rows (the quick subset, continual tasks,
IDK templates), prompt formats, encoding and collation, the forget/retain dataset, and the
per-sequence answer log-prob statistics the evaluator scores with.

Plumbing only. No loss, no method registry, no models or launching: those live in harness/
(flags, scenarios, models, launch, runlog) and the evaluator in evaluation/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data" / "tofu"
RUNS_DIR = Path(os.environ.get("TOFU_UNLEARN_RUNS", REPO / "runs"))  # run folders and the eval cache
CACHE_DIR = Path(os.environ.get("TOFU_UNLEARN_CACHE", REPO / ".cache"))
HUB_DATASET = "locuslab/TOFU"
AUTHOR_ROWS = 20  # TOFU: 200 authors x 20 questions, in blocks


class TofuError(ValueError):
    """Bad input. Scripts print its message as one line instead of a traceback."""


def cli(main):
    """Run `main()`; a TofuError becomes `error: ...` on stderr and exit code 2."""
    try:
        return main()
    except TofuError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------
# TOFU data
# ---------------------------------------------------------------------------
QA = ("question", "answer")
PERTURBED = QA + ("paraphrased_answer", "perturbed_answer", "paraphrased_question")
OPTIONS = QA + ("perturbed_answer", "original_answer")
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# Continual unlearning (closer-look §5.2): the retain base is a fixed prefix of `full`.
CONTINUAL_BASE = {"forget01": 3600, "forget05": 2000, "forget10": 400}
SPLITS = {
    "full": QA, "retain90": QA, "retain95": QA, "retain99": QA,
    **{s: QA for s in FORGET_SPLITS},
    **{f"{s}_perturbed": PERTURBED for s in FORGET_SPLITS},
    "retain_perturbed": PERTURBED,
    "real_authors_perturbed": OPTIONS, "world_facts_perturbed": OPTIONS,
}
SPLIT_SIZES = {"full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960,
               "forget01": 40, "forget05": 200, "forget10": 400, "retain_perturbed": 400,
               "real_authors_perturbed": 100, "world_facts_perturbed": 117}


def _check_row(row, fields, where, optional=()):
    """One row of a data source: every field of `fields` present, and those and the `optional` ones
    that are present of the right type (perturbed_answer: a non-empty list of strings; others: str).
    A field that is null (what a table reader fills in for a row that lacks it) counts as missing."""
    if not isinstance(row, dict):
        raise TofuError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for f in (*fields, *optional):
        v = row.get(f)
        if v is None:
            if f in fields:
                raise TofuError(f"{where}: missing field '{f}'")
            continue
        ok = (isinstance(v, list) and v and all(isinstance(x, str) for x in v)) if f == "perturbed_answer" \
            else isinstance(v, str)
        if not ok:
            raise TofuError(f"{where}: field '{f}' has the wrong type ({type(v).__name__})")


TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _json_lines(path: Path) -> list[int] | None:
    """Line numbers of the non-blank lines of a JSON-lines file (row i is on line lines[i]), or None
    when the file is one JSON document (an array) rather than one object a line."""
    lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if lines and path.read_text(encoding="utf-8").lstrip().startswith("["):
        return None
    return lines


def _first_bad_json_line(path: Path) -> str | None:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{n}: malformed JSON ({e.msg})"
    return None


def read_rows(source, fields=QA, optional=(), name: str | None = None) -> list[dict]:
    """Rows of a data source, each checked at the edge (_check_row, naming the file and line).

    One `datasets.load_dataset` call reads them all: a local JSON-lines (or JSON array), CSV or
    Parquet file through the matching packaged builder, anything else as a hub dataset id (with
    config `name`, or `org/name:config`), split "train". Local files are cached under
    CACHE_DIR/datasets, keyed by datasets on the file's path and modification time. Null fields
    (a row lacking a column others have) are dropped from the row."""
    try:
        import datasets
    except ImportError:
        raise TofuError("reading data needs the `datasets` package: pip install -r requirements.txt") from None
    datasets.disable_progress_bars()
    path = Path(str(source)).expanduser()
    local = path.suffix.lower() in TABLE_BUILDERS or path.exists() or str(source).startswith((".", "/", "~"))
    if local:
        if not path.is_file():
            raise TofuError(f"data file {path} does not exist")
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TofuError(f"{path}: unknown data format '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
        if builder != "parquet" and not path.read_text(encoding="utf-8").strip():
            return []
        call, where = dict(path=builder, data_files=str(path), cache_dir=str(CACHE_DIR / "datasets")), str(path)
    else:
        repo, _, config = str(source).partition(":")
        call, where = dict(path=repo, name=name or config or None), f"{source}{'/' + name if name else ''}"
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error line would precede ours
    try:
        ds = datasets.load_dataset(**call, split="train")
    except Exception as e:  # malformed files and network errors come in many types
        bad = _first_bad_json_line(path) if local and path.suffix.lower() in (".json", ".jsonl") else None
        if bad:
            raise TofuError(bad) from None
        detail = str(e.__cause__ or e).splitlines()[0][:160] if str(e.__cause__ or e) else ""
        if local:
            raise TofuError(f"could not read {path} ({type(e).__name__}: {detail})") from None
        raise TofuError(f"could not load {where} from the hub ({type(e).__name__}); no network, or no such "
                        "dataset: pass a local file instead") from None
    finally:
        datasets.logging.set_verbosity(level)
    rows = [{k: v for k, v in r.items() if v is not None} for r in ds.to_list()]
    lines = _json_lines(path) if local and builder == "json" else None
    for i, r in enumerate(rows):
        at = (f"{where}:{lines[i]}" if lines is not None and i < len(lines)
              else f"{where}:{i + 2}" if local and builder == "csv" else f"{where} row {i}")
        _check_row(r, fields, at, optional)
    return rows


def _read_jsonl(path: Path, fields) -> list[dict]:
    if not path.exists():
        raise TofuError(f"data file {path} is missing; the repo ships it under data/tofu/")
    return read_rows(path, fields)


def _load_hub(name: str, fields) -> list[dict]:
    return read_rows(HUB_DATASET, fields, name=name)


def _author_lookup() -> dict[str, int]:
    full = _read_jsonl(DATA_DIR / "full.json", QA)
    return {r["question"]: i // AUTHOR_ROWS for i, r in enumerate(full)}


def load_split(name: str, source: str = "local", forget_task: int | None = None) -> list[dict]:
    """Rows of a TOFU split (HF config name), each with `index` and `author` (0..199) added.

    source="local" reads data/tofu (default, offline); "hub" reads locuslab/TOFU.
    forget_task=k (continual unlearning, closer-look §5.2) gives task k of a forget split;
    for a retain split it gives the fixed base plus every forget task after k.
    """
    if name not in SPLITS:
        raise TofuError(f"unknown split '{name}'; valid splits: {', '.join(SPLITS)}")
    fields = SPLITS[name]
    if forget_task is not None:
        return _continual(name, int(forget_task))
    rows = _read_jsonl(DATA_DIR / f"{name}.json", fields) if source == "local" else _load_hub(name, fields)
    # Every split is a contiguous block of whole authors: forget splits end `full`,
    # retain splits (and retain_perturbed) start it. RA/WF are real people: author -1.
    first = 0
    if name.startswith("forget"):
        first = SPLIT_SIZES["full"] - len(rows)
    for i, r in enumerate(rows):
        r["index"] = i
        r["author"] = -1 if name.endswith(("authors_perturbed", "facts_perturbed")) else (first + i) // AUTHOR_ROWS
    return rows


def _continual(name: str, k: int) -> list[dict]:
    base = name.replace("_perturbed", "")
    retain_of = {v: f for f, v in RETAIN_OF.items()}
    forget = retain_of.get(base, base)
    if forget not in FORGET_SPLITS:
        raise TofuError(f"--forget_task works with forget01/05/10 (and their retain splits), not '{name}'")
    suffix = "_tasks_perturbed" if name.endswith("_perturbed") else "_tasks"
    tasks = _read_jsonl(DATA_DIR / "continual" / f"{forget}{suffix}.json", SPLITS[name] + ("task_id",))
    n_tasks = max(int(r["task_id"]) for r in tasks)
    if not 1 <= k <= n_tasks:
        raise TofuError(f"--forget_task must be in 1..{n_tasks} for {forget}, got {k}")
    authors = _author_lookup()
    if base in FORGET_SPLITS:
        rows = [r for r in tasks if int(r["task_id"]) == k]
    else:  # retain: fixed prefix of `full` + forget tasks not yet unlearned
        full = load_split("full")[:CONTINUAL_BASE[forget]]
        rows = [{"question": r["question"], "answer": r["answer"]} for r in full]
        rows += [{f: r[f] for f in QA} for r in tasks if int(r["task_id"]) > k]
    for i, r in enumerate(rows):
        r["index"] = i
        r["author"] = authors[r["question"]]
    return rows


def load_idk() -> list[str]:
    """The 100 refusal templates of TOFU (data/tofu/idontknow.jsonl: plain text, one per line)."""
    path = DATA_DIR / "idontknow.jsonl"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise TofuError(f"{path} holds no refusal templates")
    return lines


QUICK_RETAIN_AUTHORS = 4  # retain authors on the quick path (the quick recipes were tuned with 4)
QUICK_EVAL_SAMPLES = 20  # rows of retain, real authors and world facts evaluated on the quick path (forget: all)


def quick_authors(split: str, n_retain: int = QUICK_RETAIN_AUTHORS, continual: bool = False) -> set[int]:
    """The CPU quick subset: every author of the forget split plus authors 0..n_retain-1.

    Authors 0..19 open `full`, `retain*` and `retain_perturbed`, so the retain authors kept
    are the ones whose retain_perturbed rows evaluation scores. forget01 is authors 198-199,
    forget05 190-199, forget10 180-199. continual=True adds every author of the split's continual
    tasks (closer-look §5.2), so each task unlearns authors the quick target learned and the
    retain set (authors 0..n_retain-1 + the tasks not yet unlearned) shrinks task by task.
    """
    if split not in FORGET_SPLITS:
        raise TofuError(f"unknown forget split '{split}'; valid: {', '.join(FORGET_SPLITS)}")
    n_forget = SPLIT_SIZES[split] // AUTHOR_ROWS
    authors = set(range(n_retain)) | set(range(200 - n_forget, 200))
    return authors | continual_authors(split) if continual else authors


def continual_authors(split: str) -> set[int]:
    """Every author of the forget split's continual task sequence (data/tofu/continual)."""
    lookup = _author_lookup()
    tasks = _read_jsonl(DATA_DIR / "continual" / f"{split}_tasks.json", SPLITS[split] + ("task_id",))
    return {lookup[r["question"]] for r in tasks}


HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}  # locuslab/TOFU configs


def quick_holdout_authors(split: str, n_retain: int = QUICK_RETAIN_AUTHORS, continual: bool = False) -> list[int]:
    """The quick path's holdout for membership inference: as many TOFU authors as the forget split has,
    the first ones that neither the quick target (quick_authors, continual tasks included when
    continual) nor the quick retain model (authors 0..n_retain-1) trained on: authors 4, 5, ... by default."""
    seen = quick_authors(split, n_retain, continual)
    unseen = [a for a in range(SPLIT_SIZES["full"] // AUTHOR_ROWS) if a not in seen]
    return unseen[:SPLIT_SIZES[split] // AUTHOR_ROWS]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub accepts a connection within `timeout` seconds and no HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE is set: asked before an optional hub read, whose client otherwise retries for
    about 40 seconds offline."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def holdout_rows(split: str, authors: set[int] | None, n_retain: int = QUICK_RETAIN_AUTHORS,
                 continual: bool = False) -> tuple[list[dict], str]:
    """(rows, where they come from) of the holdout set that membership inference compares the forget set
    with: rows of the same distribution that no model trained on. On the quick subset (`authors` given):
    the rows of quick_holdout_authors in full.json (offline); otherwise TOFU's holdout01/05/10 from the hub
    (locuslab/TOFU; raises TofuError at once when the hub is out of reach). Rows carry `index` (their row in full.json, or in the hub
    split) and `author`."""
    if split not in FORGET_SPLITS:
        raise TofuError(f"unknown forget split '{split}'; valid: {', '.join(FORGET_SPLITS)}")
    if authors is not None:
        held = quick_holdout_authors(split, n_retain, continual)
        rows = [dict(r) for r in load_split("full") if r["author"] in held]
        return rows, (f"TOFU authors {held[0]}-{held[-1]} (full.json rows {rows[0]['index']}-{rows[-1]['index']}), "
                      "which neither the quick target nor the quick retain model trained on")
    name = HOLDOUT_OF[split]
    if not hub_reachable():
        raise TofuError(f"TOFU's {name} holdout comes from the hub ({HUB_DATASET}), which is out of reach; give "
                        "--holdout_data FILE, or --privacy false")
    try:
        rows = read_rows(HUB_DATASET, QA, name=name)
    except TofuError as e:
        raise TofuError(f"TOFU's {name} holdout comes from the hub ({HUB_DATASET}) and could not be read ({e}); "
                        "give --holdout_data FILE, or --privacy false") from None
    for i, r in enumerate(rows):
        r["index"], r["author"] = i, None
    return rows, f"{HUB_DATASET} {name} (hub)"


def forget_retain_rows(split: str, authors: set[int] | None = None, forget_task: int | None = None):
    """(forget rows, retain rows) for unlearning a forget split, restricted to `authors`.
    With forget_task=k: task k of the continual sequence and its shrinking retain set."""
    if split not in FORGET_SPLITS:
        raise TofuError(f"unknown forget split '{split}'; valid: {', '.join(FORGET_SPLITS)}")
    forget = load_split(split, forget_task=forget_task)
    retain = select_authors(load_split(RETAIN_OF[split], forget_task=forget_task), authors)
    return forget, retain


def select_authors(rows: list[dict], authors: set[int] | None) -> list[dict]:
    """Rows whose author is in `authors` (None keeps all; real-world rows are always kept)."""
    if authors is None:
        return rows
    return [r for r in rows if r["author"] in authors or r["author"] < 0]


# ---------------------------------------------------------------------------
# Prompt formatting and tokenization
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt.

    kind="chat": the tokenizer's chat template with `system_prompt` (None: the template's
      default; "": an explicit empty system message, 16 fewer tokens on SmolLM2).
    kind="llama2": TOFU's tags "[INST] q [/INST]" + answer (locuslab/tofu config).
    kind="phi": TOFU's tags "Question: q\\n" + "Answer: " + answer (T:config/model_config.yaml
      l.9-16): "Answer: " is answer text, so it is scored (with the answer and EOS) and the
      model generates it. open-unlearning instead puts "Answer: " in the prompt (masked, and
      given to the generator).
    """
    kind: str
    system_prompt: str | None = ""

    def prompt(self, tokenizer, question: str) -> str:
        if self.kind == "llama2":
            return f"[INST] {question} [/INST]"
        if self.kind == "phi":
            return f"Question: {question}\n"
        msgs = [{"role": "user", "content": question}]
        if self.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def answer_text(self, answer: str) -> str:
        return "Answer: " + answer if self.kind == "phi" else answer

    @property
    def add_special_tokens(self) -> bool:
        return self.kind != "chat"  # a chat template writes its own special tokens


PROMPT_FORMATS = ("auto", "chat", "llama2", "phi")
FORMAT_FILE = "tofu_prompt_format.json"  # saved beside every model we write


SYSTEM_PROMPT_HELP = ("System message of a chat template. 'auto' (default): the one saved beside the model "
                      "(tofu_prompt_format.json, so every stage uses the one the model was trained with), else '' "
                      "(an empty system message: this project's default, which keeps templates such as SmolLM2's "
                      "from inserting their own system text). 'none': no system message, so the template decides; "
                      "Llama-3-Instruct then has no system turn, as in Closer-Look's Llama-3 format "
                      "(config/model_config.yaml). Any other text is the system message; an explicit value "
                      "replaces a saved one. Chat formats only: TOFU's llama2 and phi tags have no system turn.")


def encode_prompt(tokenizer, fmt: PromptFormat, question: str) -> list[int]:
    """Token ids of the prompt: what generation continues from, and what labels mask."""
    return tokenizer(fmt.prompt(tokenizer, question), add_special_tokens=fmt.add_special_tokens)["input_ids"]


def encode_qa(tokenizer, fmt: PromptFormat, question: str, answer: str, max_length: int = 512) -> dict:
    """input_ids and labels for one (question, answer). Labels are -100 on the prompt;
    the answer tokens and one EOS are scored. Longer sequences are cut to max_length
    (then no EOS is added, as in TOFU) and flagged `truncated`."""
    prompt_ids = encode_prompt(tokenizer, fmt, question)
    return qa_from_ids(prompt_ids, answer_ids(tokenizer, fmt, prompt_ids, question, answer),
                       tokenizer.eos_token_id, max_length)


def answer_ids(tokenizer, fmt: PromptFormat, prompt_ids: list[int], question: str, answer: str) -> list[int]:
    """The tokens that follow the prompt when prompt and answer are tokenized together (what a model
    sees), refused when the prompt's own tokens are not a prefix of that sequence."""
    text = fmt.prompt(tokenizer, question) + fmt.answer_text(answer)
    ids = tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TofuError(f"the prompt's tokens are not a prefix of the full sequence's tokens for "
                        f"question {question[:60]!r}; try another --prompt_format")
    return ids[len(prompt_ids):]


def qa_from_ids(prompt_ids: list[int], answer: list[int], eos_id: int, max_length: int = 512) -> dict:
    """encode_qa's item from token ids: prompt + answer + EOS, cut to max_length, labels -100 on the prompt."""
    ids = [*prompt_ids, *answer, eos_id]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = [-100] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def collate(features: list[dict], pad_id: int, padding_side: str = "right", pad_to: int = 0) -> dict:
    """Pad to the longest item, or to `pad_to` tokens when that is longer (the references pad every
    batch to 500). attention_mask comes from lengths (never from ids == pad, which would hide real
    EOS tokens when pad == eos); labels are padded with -100."""
    n = max(pad_to, *(len(f["input_ids"]) for f in features))
    out = {"input_ids": [], "attention_mask": []}
    has_labels = "labels" in features[0]
    if has_labels:
        out["labels"] = []
    for f in features:
        k = n - len(f["input_ids"])
        pad = lambda seq, v: ([v] * k + list(seq)) if padding_side == "left" else (list(seq) + [v] * k)  # noqa: E731
        out["input_ids"].append(pad(f["input_ids"], pad_id))
        out["attention_mask"].append(pad([1] * len(f["input_ids"]), 0))
        if has_labels:
            out["labels"].append(pad(f["labels"], -100))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


class QADataset(torch.utils.data.Dataset):
    """Tokenized (question, answer) rows, e.g. for fine-tuning. Reports truncation."""

    def __init__(self, rows, tokenizer, fmt, max_length=512, answer_key="answer"):
        self.items = [encode_qa(tokenizer, fmt, r["question"], r[answer_key], max_length) for r in rows]
        self.n_truncated = sum(it["truncated"] for it in self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def item_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A local generator seeded from (seed, epoch, index): per-item randomness that is
    reproducible and changes across epochs, without touching the global RNG."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


PAIR_PARTS = ("forget", "retain", "forget_idk", "retain_idk")


class ForgetRetainDataset(torch.utils.data.Dataset):
    """One item per forget row (an epoch is one pass over the forget set, as in every
    reference). Each item holds the tokenized forget example, a retain partner drawn by
    item_rng(seed, epoch, index), and, when `idk` templates are given, the forget and retain
    questions answered with one template drawn from the same generator.
    Keys: index and those of `parts` that apply (forget always; retain with retain rows; forget_idk
    and retain_idk with templates). A method names the parts its step reads (its batch_parts()).

    Every row is tokenized once, here: each forget and retain (question, answer), and, for the IDK
    parts, each question's prompt and each template's answer tokens, joined per draw. The template's
    tokens are the same after every prompt of a format (each prompt ends in the format's fixed tail,
    and encode_qa refuses a prompt whose tokens are not a prefix), which two different questions
    check here; a tokenizer where they differ falls back to encode_qa per draw. Items are the same
    token lists encode_qa gives (tests/test_datapath.py)."""

    def __init__(self, forget, retain, tokenizer, fmt, max_length=512, seed=0, idk=None, parts=PAIR_PARTS):
        unknown = set(parts) - set(PAIR_PARTS)
        if unknown or "forget" not in parts:
            raise ValueError(f"parts must include 'forget' and be among {PAIR_PARTS}, got {parts}")
        self.forget, self.retain, self.idk = forget, retain or [], idk
        self.tok, self.fmt, self.max_length, self.seed, self.epoch = tokenizer, fmt, max_length, seed, 0
        self.parts = tuple(p for p in PAIR_PARTS if p in parts and (self.retain or "retain" not in p)
                           and (idk or "idk" not in p))
        self.n_truncated, self.items = 0, {}
        for name, rows in (("forget", forget), ("retain", self.retain)):
            prompts = [encode_prompt(tokenizer, fmt, r["question"]) for r in rows]
            enc = [qa_from_ids(p, answer_ids(tokenizer, fmt, p, r["question"], r["answer"]), tokenizer.eos_token_id,
                               max_length) for p, r in zip(prompts, rows)]
            cut = sum(e["truncated"] for e in enc)
            if rows and cut == len(rows):  # training on them would train on cut-off answers only
                raise TofuError(f"every {name} row is longer than --max_length {max_length} tokens; raise "
                                "--max_length or give shorter rows")
            self.n_truncated += cut
            if name in self.parts:
                self.items[name] = enc
            if f"{name}_idk" in self.parts:
                self.items[f"{name}_prompt"] = prompts
        self.idk_ids = self._template_ids() if {"forget_idk", "retain_idk"} & set(self.parts) else None

    def _template_ids(self) -> list[list[int]] | None:
        """Each template's answer tokens after a prompt, or None when they depend on the question."""
        probes = [r["question"] for r in (self.forget[:1] + self.retain[:1] + self.forget[1:2])][:2]
        out = []
        for t in self.idk:
            seen = [answer_ids(self.tok, self.fmt, encode_prompt(self.tok, self.fmt, q), q, t) for q in probes]
            if any(s != seen[0] for s in seen):
                return None
            out.append(seen[0])
        return out

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def pick(self, index: int) -> tuple[int | None, int | None]:
        """(retain partner, IDK template) for forget item `index` in the current epoch."""
        g = item_rng(self.seed, self.epoch, index)
        r = int(torch.randint(len(self.retain), (1,), generator=g)) if self.retain else None
        t = int(torch.randint(len(self.idk), (1,), generator=g)) if self.idk else None
        return r, t

    def _idk(self, side: str, row: int, t: int) -> dict:
        if self.idk_ids is None:
            q = (self.forget if side == "forget" else self.retain)[row]["question"]
            return encode_qa(self.tok, self.fmt, q, self.idk[t], self.max_length)
        return qa_from_ids(self.items[f"{side}_prompt"][row], self.idk_ids[t], self.tok.eos_token_id, self.max_length)

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, i):
        r_idx, t_idx = self.pick(i)
        item = {"index": i, "forget": self.items["forget"][i]}
        if "retain" in self.parts:
            item["retain"] = self.items["retain"][r_idx]
        if "forget_idk" in self.parts:
            item["forget_idk"] = self._idk("forget", i, t_idx)
        if "retain_idk" in self.parts:
            item["retain_idk"] = self._idk("retain", r_idx, t_idx)
        return item


def collate_pairs(items: list[dict], pad_id: int, pad_to: int = 0, padded_parts=()) -> dict:
    """Collate each part (forget, retain, ...) of ForgetRetainDataset items separately, the parts
    named in `padded_parts` to at least `pad_to` tokens. `index` (the forget rows) stays a list of ints:
    accelerate moves tensors to the device, and a store read by row (RKLD's teacher) would then sync
    the device once per row to learn which rows to read."""
    return {k: collate([it[k] for it in items], pad_id, pad_to=pad_to if k in padded_parts else 0)
            if isinstance(items[0][k], dict) else [int(it[k]) for it in items] for k in items[0]}


# ---------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------
def answer_logprob_stats(logits: torch.Tensor, labels: torch.Tensor):
    """Per-sequence answer log-probability, in fp32.

    logits [B, T, V] at position t predict labels[:, t+1]; positions labelled -100 are
    skipped. Returns (sum [B], mean [B], count [B]): the summed log-prob log pi(y|x), the
    token-mean log-prob (sum / count) and the number of scored tokens.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1).clamp(min=0),
                          reduction="none").view(labels.shape)
    logp = -(nll * mask).sum(-1)
    count = mask.sum(-1)
    return logp, logp / count.clamp(min=1), count
