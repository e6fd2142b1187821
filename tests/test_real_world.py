"""Closer-Look's real-world scenario (§5.3, App. E.7) on a small set the test writes in the format of
its data/real_world/ files: training on forget.json with neighbor.json as the retain set, model
utility over the held-out neighbours (neighbor_perturbed.json) only, ES in the generation =>
golden answer direction on both sets, and the aggregates checked against the paper's Table 8."""
import json

import pytest
import torch

import me_gd
from common import TofuError
from evaluation import engine, metrics
from harness import scenarios


def person_rows(name, n, perturbed, start=0):
    rows = []
    for i in range(start, start + n):
        r = {"name": name, "question": f"What did {name} do in year {i}?",
             "answer": f"In year {i}, {name} did many things, among them a long tour.",  # the model's own answer
             "golden_answer": f"{name} toured in year {i}."}
        if perturbed:
            r.update(paraphrased_answer=f"In year {i} {name} went on tour.",
                     perturbed_answer=[f"{name} stayed home in year {i}.", f"{name} retired in year {i}."],
                     paraphrased_question=f"In year {i}, what did {name} do?")
        rows.append(r)
    return rows


def write(folder, held_out=("Hana Held", "Ivo Held"), train_neighbours=("Nia Near", "Odo Near")):
    folder.mkdir(exist_ok=True)
    sets = {"forget.json": [r for p in ("Fay Gone", "Gus Gone") for r in person_rows(p, 2, False)],
            "forget_perturbed.json": [r for p in ("Fay Gone", "Gus Gone") for r in person_rows(p, 2, True)],
            "neighbor.json": [r for p in train_neighbours for r in person_rows(p, 2, False)],
            "neighbor_perturbed.json": [r for p in held_out for r in person_rows(p, 2, True, start=5)]}
    for name, rows in sets.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sets


def test_aggregates_reproduce_table8_initial_row():
    """Llama-3 before unlearning (App. E.7, Table 8, 'Initial'): neighbour R, P, TR, TE, CS, ES =
    .7803 .3375 .5625 .8854 .9819 .6275 -> MU .6145; forget R, P, TR, CS, ES = .8057 .3898 .6071
    .9875 .6900 (TR as 1 - min(TR, 1/TR)) -> FE .3040."""
    s = dict(zip(metrics.REAL_WORLD_MU, (0.7803, 0.3375, 0.5625, 0.8854, 0.9819, 0.6275)))
    s.update(forget_rouge=0.8057, forget_prob=0.3898, forget_truth_ratio=1 - 0.6071, forget_cs=0.9875, forget_es=0.69)
    s.update(metrics.closer_look(s))
    out = metrics.real_world_scores(s)
    assert out["real_world_mu"] == pytest.approx(0.6145, abs=5e-5)
    assert out["real_world_fe"] == pytest.approx(0.3040, abs=5e-5)
    s["retain_es"] = None
    assert metrics.real_world_scores(s)["real_world_mu_reason"] == "not computed: missing retain_es"


def test_scenario_end_to_end(monkeypatch, tmp_path, tiny_model_dir, capsys):
    sets = write(tmp_path / "rw")
    golden = {r["golden_answer"] for name in ("forget_perturbed.json", "neighbor_perturbed.json") for r in sets[name]}
    pairs = []

    def classify(premises, hypotheses):  # an NLI stand-in: entailment only from a generation to a golden answer
        pairs.extend(zip(premises, hypotheses))
        return ["entailment" if p not in golden and h in golden else "neutral" for p, h in zip(premises, hypotheses)]
    monkeypatch.setattr(engine, "load_nli_model", lambda *a: (classify, "stub NLI"))
    monkeypatch.setattr(engine, "load_cs_model", lambda *a: (lambda texts: torch.ones(len(texts), 3), "stub CS"))
    monkeypatch.setattr(engine, "rouge_recall", lambda g, a: (1.0, 1.0))  # every pair reaches the classifier
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["me_gd.py", "--scenario", "real_world", "--real_world_dir", str(tmp_path / "rw"),
                                     "--model", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "2",
                                     "--batch_size", "2", "--per_device_batch_size", "2", "--max_new_tokens", "3",
                                     "--nli_model", "stub", "--cs_model", "stub"])
    me_gd.main()
    saved = json.loads((out / "args.json").read_text())
    assert saved["derived"]["forget_rows"] == 4 and saved["derived"]["retain_rows"] == 4  # forget.json, neighbor.json
    after = json.loads((out / "eval" / "after" / "summary.json").read_text())
    assert after["settings"]["es_setting"] == "real_world" and after["n_forget"] == 4 and after["n_retain"] == 4
    log = json.loads((out / "eval" / "after" / "eval_log.json").read_text())  # the neighbour task: held out only
    assert [g[2] for g in log["generated_text"].values()] == [r["golden_answer"] for r in sets["neighbor_perturbed.json"]]
    prob = sum(torch.exp(-torch.tensor(v)).item() for v in log["avg_gt_loss"].values()) / 4
    assert after["retain_prob"] == pytest.approx(prob, rel=1e-6)
    mu = metrics.harmonic_mean([after[k] for k in metrics.REAL_WORLD_MU])
    assert after["real_world_mu"] == pytest.approx(mu)
    assert after["real_world_fe"] == after["fe"] is not None
    # ES: generation => golden answer on both sets (TOFU's direction on a neighbour would give 0 here)
    assert after["retain_es"] == 1.0 and after["forget_es"] == 1.0
    assert pairs and all(h in golden and p not in golden for p, h in pairs)
    # TOFU's model utility is n/c here, for this scenario's reason (it used to give TOFU's), said under the table
    from evaluation import method_eval
    assert after["model_utility"] is None and after["skipped"]["model_utility"] == method_eval.REAL_WORLD_NO_TOFU_MU
    printed = capsys.readouterr().out
    assert "n/c MU (before, after): TOFU's model utility needs" in printed


def test_held_out_neighbours_must_be_other_people(tmp_path):
    write(tmp_path / "rw", held_out=("Hana Held", "Nia Near"))
    with pytest.raises(TofuError, match="neighbor_perturbed.json names people that training also uses \\(Nia Near\\)"):
        scenarios.real_world_eval_rows(tmp_path / "rw")
    (tmp_path / "rw" / "neighbor.json").unlink()
    with pytest.raises(TofuError, match="lacks neighbor.json; download"):
        scenarios.real_world_files(tmp_path / "rw")
