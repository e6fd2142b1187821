"""One rank of test_distributed's peak-epoch checkpoint test: `... peak_worker.py SPY_DIR BACKEND SCRIPT ARGS`
runs SCRIPT like tests/dist_worker.py does, with spies on the launch's saving:
  every accelerator.get_state_dict (the full gather) is logged with the function that called it
  (save_peak: an improving epoch; write_peak: the one gather at the end; other: the final model);
  after every launch.save_peak, the files of the peak shards' folder are logged, and what the
  one-process path writes at that epoch (launch.save_model) goes to SPY_DIR/epoch<N>/ (its gather
  logged as "reference"). Each rank writes its log to SPY_DIR/rank<r>.jsonl.
"""
import inspect
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import accelerate  # noqa: E402

import dist_worker  # noqa: E402
from harness import launch  # noqa: E402

spy = Path(sys.argv.pop(1))
rank = int(os.environ["RANK"])


def note(**kw):
    with open(spy / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\n")


real_get_state_dict = accelerate.Accelerator.get_state_dict


reference = []  # non-empty while the spy writes the reference folder


def get_state_dict(self, model, unwrap=True):
    callers = [f.function for f in inspect.stack()[1:8]]
    within = next((c for c in callers if c in ("save_peak", "write_peak", "epoch_end")), "other")
    note(event="gather", within="reference" if reference else within)
    return real_get_state_dict(self, model, unwrap)


real_save_peak = launch.save_peak


def spied_save_peak(accelerator, model, tokenizer, fmt, out):
    epoch = next(f.frame.f_locals["epoch"] for f in inspect.stack() if f.function == "epoch_end")
    real_save_peak(accelerator, model, tokenizer, fmt, out)
    shards = launch.peak_shards_dir(out)
    note(event="save_peak", epoch=epoch, files=sorted(os.listdir(shards)) if shards.exists() else [])
    reference.append(epoch)
    launch.save_model(accelerator, model, tokenizer, fmt, spy / f"epoch{epoch}")
    reference.clear()


accelerate.Accelerator.get_state_dict = get_state_dict
launch.save_peak = spied_save_peak
dist_worker.main()
