"""One rank of test_distributed's test of shared files that the ranks see differently (run through
tests/dist_worker.py: `dist_worker.py ddp tests/agree_worker.py OUT MODEL`).

First both ranks build RKLD's strengthened model and fill the evaluation caches (the retain model's
forget logs and a cached evaluation) with the same view of the files. Then rank 1 stops seeing
strengthen.json and summary.json (as when another job writes them between two ranks' checks, or a
network file system has not shown rank 1 the write yet), and both ask again: each rank must take
rank 0's decision, so neither trains nor evaluates again. The evaluation is replaced by a stand-in
that runs a collective, as the real one does, so a rank that decided otherwise hangs (the launch
timeout) instead of passing.
"""
import pathlib
import sys
from pathlib import Path

from transformers import HfArgumentParser

import common
import rkld
from evaluation import method_eval
from harness import flags, launch, models, runlog

out, model = Path(sys.argv[1]), sys.argv[2]
common.RUNS_DIR = out / "runs"  # the caches, beside the run rather than in the repo's runs/
args = flags.finalize_args(HfArgumentParser(rkld.Args).parse_args_into_dataclasses(
    ["--model", model, "--retain_model", model, "--subset", "quick", "--batch_size", "2", "--per_device_batch_size",
     "1", "--max_steps", "1", "--strengthen_epochs", "1", "--max_eval_samples", "2", "--cs_model", "none",
     "--nli_model", "none", "--output_dir", str(out)])[0], "rkld", rkld.QUICK, rkld.PAPER)
acc = launch.make_accelerator(args.batch_size, args.per_device_batch_size)[0]
tok = models.load_tokenizer(model)
fmt = models.prompt_format(tok, model)
calls = []


def stand_in_evaluate(model, tokenizer, fmt, split, output_dir, accelerator=None, **kw):
    from accelerate.utils import gather_object
    gather_object([accelerator.process_index])  # the real evaluation gathers every rank's records
    calls.append(str(output_dir))
    if accelerator.is_main_process:
        runlog.atomic_write_json(Path(output_dir) / "summary.json", {"forget_quality": 0.5})
    return {"forget_quality": 0.5}


method_eval.evaluate = stand_in_evaluate
launch.load_frozen = lambda *a, **k: None  # the stand-in needs no retain model


def ask():
    """Strengthening, the retain model's forget logs and the starting model's evaluation."""
    path = rkld.strengthen(args, tok, fmt, acc)
    ev = method_eval.MethodEval(args, tok, fmt, acc, out)
    ev._retain()
    ev.run(None, "before", cache_key=model)
    return path


ask()  # same views: both build and fill
built = len(calls)
real_exists = pathlib.Path.exists
if acc.process_index == 1:  # rank 1 no longer sees what rank 0 sees
    pathlib.Path.exists = lambda p: False if p.name in ("strengthen.json", "summary.json") else real_exists(p)


def no_second_strengthening(seed):
    raise RuntimeError(f"rank {acc.process_index} strengthens again while the other rank reuses the model")


rkld.set_seed = no_second_strengthening  # fail at once rather than hang in the training collectives
ask()
pathlib.Path.exists = real_exists
print(f"rank {acc.process_index}: evaluations {built} then {len(calls) - built}", flush=True)
acc.wait_for_everyone()
