"""Where a method run's rows come from besides the TOFU splits: the quick subset's authors, the
user's own forget and retain sets (--forget_data, --retain_data), and Closer-Look's real-world
scenario (--scenario real_world)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import common
from common import TofuError
from harness import models

CUSTOM = "custom"  # args.split of a run on --forget_data / --retain_data
TR_FIELDS = ("paraphrased_answer", "perturbed_answer")  # what a custom set needs for the truth ratio


def load_custom(source, flag: str = "--forget_data") -> list[dict]:
    """Rows of a user's own forget or retain set: `question` and `answer`, optionally
    `paraphrased_answer` and `perturbed_answer` (the truth ratio; on every row or on none) and `name`
    (rows about one person share it; `author` numbers the names in order of appearance, None
    without one). `index` is the row's position in the source. Any source read_rows reads."""
    rows = common.read_rows(source, common.QA, optional=(*TR_FIELDS, "name"))
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
REAL_WORLD_EVAL = common.QA + ("golden_answer", "paraphrased_answer", "perturbed_answer", "name")


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
        rows = common.read_rows(files[key], REAL_WORLD_EVAL)
        if not rows:
            raise TofuError(f"{files[key]} holds no rows")
        people: dict[str, int] = {}
        out[task] = [{**r, "answer": r["golden_answer"], "index": i,
                      "author": people.setdefault(r["name"], len(people))} for i, r in enumerate(rows)]
    trained = {r.get("name") for key in ("forget", "retain") for r in common.read_rows(files[key], common.QA, optional=("name",))}
    seen = {r["name"] for r in out["retain"]} & (trained | {r["name"] for r in out["forget"]})
    if seen:
        raise TofuError(f"{files['neighbour_eval'].name} names people that training also uses "
                        f"({', '.join(sorted(seen)[:3])}); the held-out neighbours must be other people")
    return out


def privacy_spec(privacy: bool, split: str, authors: set[int] | None, holdout_data: str | None = None,
                 n_retain: int = common.QUICK_RETAIN_AUTHORS, continual: bool = False, gradnorm: bool = False,
                 es_form: str = "definition") -> dict | None:
    """What evaluate(privacy=...) takes: None when --privacy is off; else the holdout rows and where they come
    from (--holdout_data, the quick path's unseen TOFU authors, or TOFU's hub holdout), or {"reason": ...}
    when there is none (offline without the hub holdout, your own forget set without --holdout_data), so
    the evaluation runs and says why the privacy numbers are missing."""
    if not privacy:
        return None
    opts = {"gradnorm": gradnorm, "es_form": es_form}
    if holdout_data:
        return {"holdout": load_custom(holdout_data, "--holdout_data"), "holdout_name": f"--holdout_data {holdout_data}",
                **opts}
    if split not in common.FORGET_SPLITS:
        return {"reason": "not computed: your own forget set needs --holdout_data FILE (rows of the same kind that no "
                          "model trained on) for membership inference"}
    try:
        rows, name = common.holdout_rows(split, authors, n_retain, continual)
    except TofuError as e:
        return {"reason": f"not computed: {e}"}
    return {"holdout": rows, "holdout_name": name, **opts}


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
    return common.forget_retain_rows(args.split, subset_authors(args), args.forget_task)


def retain_source(args) -> str:
    """Where a run's retain rows come from, for the sentence that says there are none."""
    if getattr(args, "forget_data", None):
        return f"--retain_data {args.retain_data}" if args.retain_data else "the run (no --retain_data given)"
    return f"{common.RETAIN_OF[args.split]} for this subset (--quick_retain_authors {args.quick_retain_authors})"


def check_scenario(args) -> None:
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
    for flag, bad in (("--forget_task", args.forget_task is not None), ("--model quick", args.model == models.QUICK),
                      ("--subset quick", args.subset == "quick")):
        if bad:
            raise TofuError(f"{flag} is TOFU's; with --forget_data give --model (a model folder or hub id) and "
                            "leave --forget_task and --subset unset")
    args.split, args.subset = CUSTOM, "all"


def subset_authors(args) -> set[int] | None:
    if args.split == CUSTOM or args.subset != "quick":
        return None
    return common.quick_authors(args.split, args.quick_retain_authors, getattr(args, "forget_task", None) is not None)
