"""The run folder: args.json and metrics.jsonl, experiment trackers (--report_to), atomic JSON
writes, and the plain text tables that end every run."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import common
from common import TofuError

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


def atomic_write_json(path, obj):
    """Write JSON to a temp file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    make_readable(tmp)
    os.replace(tmp, path)


def replace_dir(src, dst) -> None:
    """Put the folder `src` at `dst` in one rename (an old `dst` is moved aside first and removed
    after), so a reader sees the old folder or the new one, never a half-copied one. `src` must be
    on dst's file system: make it with tempfile.mkdtemp(dir=dst.parent)."""
    src, dst = Path(src), Path(dst)
    make_readable(src)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_dir_atomic(src, dst) -> None:
    """Copy the folder `src` to `dst` through a temp folder beside it and one rename (replace_dir)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    replace_dir(tmp, dst)


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
            r = subprocess.run(["git", "-C", str(common.REPO), *args], capture_output=True, text=True, timeout=5)
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


def scalars(d: dict, prefix: str = "") -> dict:
    """The numbers of a (nested) dict as {"a/b": float}: what a tracker can plot. Booleans and
    None are left out, so are strings and lists."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class RunLogger:
    """args.json (args, derived sizes, versions) and metrics.jsonl in the run folder, and, when the
    accelerator was built with trackers (--report_to), the same to them: the arguments as the run's
    config, every logged step, and each evaluation's numbers (log_eval). Only the main process
    writes or prints; accelerate's trackers run on the main process only. With defer=True nothing is
    written until open() (or the first log): a run refused while it sets up leaves no files behind.
    moved_steps counts the logged steps whose lr was above 0 (AdamW at lr 0 leaves every weight as it was)."""

    def __init__(self, out_dir, args, derived: dict, is_main: bool = True, accelerator=None, prefix: str = "",
                 defer: bool = False):
        self.dir, self.is_main, self.step, self.prefix = Path(out_dir), is_main, 0, prefix
        self.acc = accelerator if accelerator is not None and accelerator.log_with else None
        self.args, self.derived, self.opened, self.moved_steps = args, derived, False, 0
        if not defer:
            self.open()

    def open(self) -> None:
        """Create the folder, args.json, an empty metrics.jsonl and the trackers' run (once)."""
        if self.opened:
            return
        self.opened, args, derived, is_main = True, self.args, self.derived, self.is_main
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
        self.open()
        if self.acc is None or not summary:
            return
        prefix = "eval/" if name in ("before", "after") or re.fullmatch(r"epoch\d+", name) else f"eval_{name}/"
        self.acc.log(scalars({k: v for k, v in summary.items() if k != "settings"}, prefix), step=self.step)

    def finish(self) -> None:
        """End the trackers' runs (a no-op without --report_to)."""
        if self.acc is not None:
            self.acc.end_training()

    def log(self, step: int, metrics: dict, echo: bool = False):
        self.open()
        self.step = step
        self.moved_steps += float(metrics.get("lr", 0)) > 0
        if self.acc is not None:
            self.acc.log(scalars(metrics, self.prefix), step=step)
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
