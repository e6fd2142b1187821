"""Cost of the privacy pass (evaluation/privacy.py, --privacy) against the rest of the evaluation, same run,
same model, same rows: evaluate() as a method script runs it on the quick path (generation included, no
privacy), then evaluate_privacy() without GradNorm (the default) and with it. Prints each time and its ratio
to evaluate()'s; on a shared machine the ratios are steadier than the seconds.

  OMP_NUM_THREADS=1 python bench/bench_privacy.py --model smollm2-135m --split forget01
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from evaluation.engine import evaluate, task_rows  # noqa: E402
from evaluation.method_eval import eval_caps  # noqa: E402
from evaluation.privacy import evaluate_privacy  # noqa: E402
from harness import models, scenarios  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="Model folder, hub id or preset (default: the embedded "
                                                            "SmolLM2-135M).")
    p.add_argument("--split", default="forget01", help="Forget split; the quick subset's rows (default forget01: "
                                                        "40 forget + 40 holdout rows).")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = models.load_model(args.model, frozen=True)
    fmt = models.prompt_format(tok, args.model)
    authors = common.quick_authors(args.split)
    spec = scenarios.privacy_spec(True, args.split, authors)
    forget = task_rows("forget", args.split, authors)
    print(f"{len(forget)} forget rows, {len(spec['holdout'])} holdout rows: {spec['holdout_name']}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        evaluate(model, tok, fmt, args.split, out, max_eval_samples=eval_caps(common.QUICK_EVAL_SAMPLES, True),
                 authors=authors, cs_model="none", nli_model="none", verbose=False)
        base = time.time() - t
    t = time.time()
    evaluate_privacy(model, tok, fmt, forget, spec, "cpu", 32, False)
    fwd = time.time() - t
    t = time.time()
    evaluate_privacy(model, tok, fmt, forget, {**spec, "gradnorm": True}, "cpu", 32, False)
    full = time.time() - t
    print(f"{args.model}: evaluate() without privacy {base:.1f} s; privacy forward pass {fwd:.1f} s "
          f"({fwd / base:.2f}x); with GradNorm {full:.1f} s ({full / base:.2f}x), GradNorm alone {full - fwd:.1f} s "
          f"({(full - fwd) / base:.2f}x)")


if __name__ == "__main__":
    common.cli(main)
