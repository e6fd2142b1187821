"""Fixtures: a tiny random Llama model + tokenizer, built offline in seconds.

The tokenizer is a byte-level BPE trained on a slice of the shipped TOFU data, so
questions and answers tokenize into many small pieces like a real one would.
`tiny_model_dir` has a ChatML chat template (like SmolLM2); `tiny_legacy_model_dir`
has none and adds a BOS token, like the Llama-2 tokenizer TOFU used.
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402  (tiny_llama: the tests' model)

torch.set_num_threads(1)  # tiny models gain nothing from threads; spinning threads slow a shared 2-core box

def _tokenizer(chat: bool):
    return throughput.tiny_tokenizer(chat)  # the tiny model's tokenizer lives beside tiny_llama, for the benches


def _save_tiny(path: Path, chat: bool) -> Path:
    return throughput.tiny_llama(_tokenizer(chat), path)


@pytest.fixture(scope="session", autouse=True)
def isolated_runs_dir(tmp_path_factory):
    """Runs, caches and default output folders of the tests go to a temp dir, not the repo's runs/."""
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "RUNS_DIR", tmp_path_factory.mktemp("runs"))
    yield common.RUNS_DIR
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_chat"), chat=True)


@pytest.fixture(scope="session")
def tiny_legacy_model_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_legacy"), chat=False)


@pytest.fixture
def hand_forget_quality():
    """forget_quality(model_eval_dir, retain_eval_dir) by hand from two TOFU-format forget logs:
    the exact two-sample KS p-value (scipy) of the per-row truth ratios
    exp(L_paraphrased - mean_j L_perturbed_j), and the two lists of truth ratios."""
    import json
    import math

    from scipy import stats

    def truth_ratios(folder):
        log = json.loads((Path(folder) / "eval_log_forget.json").read_text())
        para, pert = log["avg_paraphrased_loss"], log["average_perturb_loss"]
        return [math.exp(para[i] - sum(pert[i]) / len(pert[i])) for i in sorted(para, key=int)]

    def fq(model_dir, retain_dir):
        a, b = truth_ratios(model_dir), truth_ratios(retain_dir)
        return stats.ks_2samp(a, b, method="exact").pvalue, a, b
    return fq


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    in-process model calls then match the one-thread subprocesses they are compared with, and run faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
