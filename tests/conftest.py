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

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    rows = common.load_split("full")[::10] + common.load_split("forget01_perturbed")
    texts = [r["question"] + " " + r["answer"] for r in rows]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not chat:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                  unk_token="<|endoftext|>")
    if chat:
        tok.chat_template = CHATML
    return tok


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
