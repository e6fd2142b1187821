"""bench/grids.py, bench/reproduce.py and bench/results_report.py: the lr rule, collecting a run folder,
resuming without rerunning, and the verdicts, on hand-made records (no training)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import grids  # noqa: E402
import reproduce  # noqa: E402
import results_report  # noqa: E402


def flat(lines):
    """A claim's lines with the bullets under a line (a list) in place."""
    return [x for ln in lines for x in (flat(ln) if isinstance(ln, list) else [ln])]


def rec(method, lr, fq, mu, seed=42, grid="sweep", fe=0.5, peak=None):
    s = {"forget_quality": fq, "model_utility": mu, "fe_wo_es": fe}
    return {"name": reproduce.run_name(method, lr, seed), "grid": grid, "method": method, "lr": lr, "seed": seed,
            "before": {"forget_quality": 0.01, "model_utility": 0.4}, "last": s, "peak": peak or s}


def test_lr_rule_takes_the_best_forget_quality_that_keeps_utility():
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    # the target's MU is 0.4: 0.36 is 90%. hi forgets best but loses utility; mid is the best kept
    records = [rec("ga", hi, 0.9, 0.2), rec("ga", mid, 0.5, 0.37), rec("ga", lo, 0.1, 0.39)]
    assert grids.chosen_lr("ga", records) == mid
    # nobody keeps 90%: the highest utility
    records = [rec("ga", hi, 0.9, 0.2), rec("ga", mid, 0.5, 0.3), rec("ga", lo, 0.1, 0.35)]
    assert grids.chosen_lr("ga", records) == lo
    assert grids.chosen_lr("ga", records[:2]) is None  # the sweep is not complete
    # the rule reads the last epoch, not the peak one
    records = [rec("ga", hi, 0.9, 0.38, peak={"forget_quality": 0.01, "model_utility": 0.38}),
               rec("ga", mid, 0.5, 0.38), rec("ga", lo, 0.1, 0.38)]
    assert grids.chosen_lr("ga", records) == hi


def test_lr_rule_skips_a_rate_that_unlearned_nothing_and_fkl_takes_rkld_rate():
    """The sweep's RKLD: lr 2e-5 kept utility because its forget quality stayed at the target's (0.01 here);
    the rule takes the highest utility among the rates that moved it. FKL follows RKLD (Table 2's ablation)."""
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    records = [rec("rkld", hi, 0.9, 0.34), rec("rkld", mid, 0.4, 0.35), rec("rkld", lo, 0.01, 0.39),
               rec("rkld_fkl", hi, 0.1, 0.3), rec("rkld_fkl", mid, 0.2, 0.3), rec("rkld_fkl", lo, 0.05, 0.38)]
    assert grids.chosen_lr("rkld", records) == mid
    assert grids.chosen_lr("rkld_fkl", records) == mid  # its own sweep alone would choose lo
    # a rate that unlearned and kept 90% of utility wins over the highest utility
    records[0] = rec("rkld", hi, 0.9, 0.37)
    assert grids.chosen_lr("rkld", records) == hi
    # no rate unlearned anything: the rule as before over every rate
    records = [rec("ga", hi, 0.01, 0.2), rec("ga", mid, 0.01, 0.3), rec("ga", lo, 0.01, 0.39)]
    assert grids.chosen_lr("ga", records) == lo


def write(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_run(folder: Path, peak_epoch=2):
    write(folder / "args.json", {"args": {"epochs": 3}, "run": {"git_commit": "abc", "torch": "2.13.0"}})
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name, fq in (("before", 0.01), ("epoch1", 0.2), ("epoch2", 0.6), ("after", 0.3), ("peak", 0.6)):
        s = {"forget_quality": fq, "settings": {"precision": "fp32"}}
        if name not in ("epoch1", "epoch2"):
            s["model_utility"] = 0.4
        write(folder / "eval" / name / "summary.json", s)
    write(folder / "peak_epoch.json", {"peak_epoch": peak_epoch, "epochs": [], "selection": {"seconds": 1}})


def test_collect_reads_every_epoch_the_peak_and_the_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path)
    item = reproduce.method_item("sweep", "ga", 1e-4, 42)
    fake_run(tmp_path / item["name"])
    r = reproduce.collect(item, 12.0, 1)
    assert [e["forget_quality"] for e in r["epochs"]] == [0.01, 0.2, 0.6, 0.3]  # epoch 0 "before", 3 "after"
    assert r["peak_epoch"] == 2 and r["peak"]["forget_quality"] == 0.6 and r["last"]["forget_quality"] == 0.3
    assert r["info"]["git_commit"] == "abc" and r["before"]["forget_quality"] == 0.01
    assert "--lr 0.0001" in r["command"] and "--seed 42" in r["command"]


def test_a_recorded_run_is_not_run_again_and_a_finished_folder_is_collected(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    items = [reproduce.method_item("sweep", m, 1e-4, 42) for m in ("ga", "npo", "dpo")]
    reproduce.save_results([rec("ga", 1e-4, 0.5, 0.4)])  # recorded in an earlier sitting
    fake_run(tmp_path / "grid" / items[1]["name"])        # finished, not yet recorded
    launched = []

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def launch(item, threads):
        launched.append(item["name"])
        fake_run(tmp_path / "grid" / item["name"])
        return Done()

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    assert reproduce.run_grid(items, jobs=2, max_runs=None) == 0
    assert launched == [items[2]["name"]]
    assert sorted(r["name"] for r in grids.load_results()) == sorted(i["name"] for i in items)
    # a folder stopped between its last epoch's evaluation and its peak epoch's (no peak_epoch.json) is
    # run again, not collected without its peak row (what happened to a sitting's GA+GD run)
    more = [reproduce.method_item("sweep", "kto", 1e-4, 42)]
    fake_run(tmp_path / "grid" / more[0]["name"])
    (tmp_path / "grid" / more[0]["name"] / "peak_epoch.json").unlink()
    launched.clear()
    assert reproduce.run_grid(more, jobs=1, max_runs=None) == 0 and launched == [more[0]["name"]]


@pytest.mark.parametrize("grid", (*grids.METHOD_GRIDS, "gpu", "continual"))
def test_the_first_run_goes_alone_only_until_it_has_filled_the_shared_caches(tmp_path, monkeypatch, grid):
    """The second slot opens when the first run has written its starting evaluation (the retain logs come
    before it), not when the first run ends: a whole run on one idle core was the earlier cost. In every grid
    of method runs (the shared grid's first sitting ran its two runs one after the other; the gpu grid's method
    steps left the H200 78% idle, so its runs share it too), and for continual sequences whose target an earlier
    sitting recorded (2026-12-06: the two sequences at 5e-5 ran one after the other, each on one core)."""
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    if grid == "gpu":  # forget05's method runs, its models already built
        items = [{**it, "needs": None} for it in reproduce.gpu_items([]) if it.get("collect") is None][:3]
    elif grid == "continual":  # the sequences at the lower lr, the continual target already built
        items = [{**it, "needs": None} for it in reproduce.grid_items("continual", [])[0]
                 if it["name"].startswith("continual-low-")][:3]
    else:
        items = [reproduce.method_item(grid, m, 1e-4, 42) for m in ("ga", "npo", "dpo")]
    first_before = (tmp_path / "grid" / items[0]["name"] / ("task1" if grid == "continual" else "") / "eval" / "before"
                    / "summary.json")
    ticks, launched = [0], []

    class Proc:
        def __init__(self, item, end):
            self.item, self.end, self.returncode = item, end, 0

        def poll(self):
            if ticks[0] < self.end:
                return None
            if grid == "continual":  # a sequence: every task's folder, evaluated
                for k in range(1, grids.CONTINUAL_TASKS + 1):
                    fake_run(tmp_path / "grid" / self.item["name"] / f"task{k}")
            else:
                fake_run(tmp_path / "grid" / self.item["name"])
            return 0

    def launch(item, threads):
        launched.append((item["name"], ticks[0], first_before.exists(), threads))
        return Proc(item, ticks[0] + 10)

    def sleep(s):
        ticks[0] += 1
        if ticks[0] == 3:  # the first run has evaluated its starting model
            first_before.parent.mkdir(parents=True, exist_ok=True)
            first_before.write_text("{}")

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", sleep)
    assert reproduce.run_grid(items, jobs=2, max_runs=None) == 0
    (n0, t0, _, th0), (n1, t1, cached1, _), _ = launched
    assert n0 == items[0]["name"] and n1 == items[1]["name"]
    assert cached1 and t1 < t0 + 10  # after the caches, before the first run ends
    assert th0 == max(1, (reproduce.os.cpu_count() or 2) // 2)  # the first run has its share of the cores


def test_share_teacher_points_later_rkld_runs_at_the_first_of_their_seed():
    items = reproduce.share_teacher([reproduce.method_item("sweep", m, lr, s)
                                     for s in (42, 1) for lr in (1e-4, 5e-5) for m in ("rkld", "rkld_fkl", "ga")])
    first = {s: reproduce.run_name("rkld", 1e-4, s) for s in (42, 1)}
    for it in items:
        if it["method"].startswith("rkld") and it["name"] != first[it["seed"]]:
            assert it["teacher_from"] == first[it["seed"]]
        else:
            assert "teacher_from" not in it


def test_compare_needs_two_seeds_and_separation():
    assert results_report.compare([0.5, 0.52, 0.51], [0.3, 0.31, 0.29]) == "higher"
    assert results_report.compare([0.3, 0.31], [0.5, 0.52]) == "lower"
    assert results_report.compare([0.5, 0.3, 0.4], [0.45, 0.35, 0.4]) == "overlap"
    assert results_report.compare([0.5], [0.3, 0.31]) == "one seed: higher"
    assert results_report.compare([], [0.3]) == "missing"


def test_rkl_vs_fkl_pairs_runs_of_the_same_lr_and_seed():
    """The verdict compares the seeds at RKLD's chosen lr (the other claims' rule); every paired run at every
    swept lr is listed, with the reading of the rule as first written (RKL higher in every pair)."""
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    # RKLD's sweep (target MU 0.4): hi loses utility, mid keeps it -> chosen mid; lo unlearned nothing
    rs = [rec("rkld", hi, 0.9, 0.3), rec("rkld", mid, 0.4, 0.39), rec("rkld", lo, 0.01, 0.4),
          rec("rkld_fkl", hi, 0.2, 0.3), rec("rkld_fkl", mid, 0.17, 0.39), rec("rkld_fkl", lo, 0.05, 0.4)]
    assert results_report.claim_rkl_vs_fkl(rs)[0] == "inconclusive"  # one seed at the chosen lr
    for seed, a, b in ((1, 0.4, 0.17), (2, 0.5, 0.1)):
        rs += [rec("rkld", mid, a, 0.39, seed, "seeds"), rec("rkld_fkl", mid, b, 0.39, seed, "seeds")]
    verdict, lines, key = results_report.claim_rkl_vs_fkl(rs)
    assert verdict == "reproduced" and lines[0].startswith(f"at the chosen lr {mid:g} (3 seeds)")
    assert lines[1] == "every paired run (same teacher, lr and seed): RKL higher in 4 of 5, lower in 1"
    assert len(lines[2]) == 5 and lines[2][0].startswith(f"lr {lo:g}, seed 42: RKL FQ 0.01")  # the pairs, under it
    assert lines[-1].endswith("which reads inconclusive here")
    assert key == f"lr {mid:g}: RKL FQ 0.433 ± 0.0577 vs FKL FQ 0.147 ± 0.0404; paired runs: RKL higher in 4 of 5, lower in 1"
    rs[-2]["peak"] = {"forget_quality": 0.01, "model_utility": 0.39}  # seed 2 against: the seeds overlap
    assert results_report.claim_rkl_vs_fkl(rs)[0] == "inconclusive"
    for r in rs:  # every seed at the chosen lr against
        if r["method"] == "rkld" and r["lr"] == mid:
            r["peak"] = {"forget_quality": 0.01, "model_utility": 0.39}
    assert results_report.claim_rkl_vs_fkl(rs)[0] == "not reproduced"


def test_keeps_utility_verdict_and_the_report_renders(tmp_path, monkeypatch):
    rs = [rec("me_gd", 1e-4, 0.9, mu, s, "sweep" if s == 42 else "seeds", fe=0.6) for s, mu in ((42, 0.40), (1, 0.39), (2, 0.41))]
    rs += [rec("ga_gd", 1e-4, 0.9, mu, s, "sweep" if s == 42 else "seeds", fe=0.6) for s, mu in ((42, 0.1), (1, 0.12), (2, 0.08))]
    lrs = {m: 1e-4 for m in grids.METHODS}
    both = lambda v: f"{v} at each method's chosen lr; {v} at one shared lr, 0.0001 (Table 4's protocol)"
    assert results_report.claim_keeps_utility(rs, lrs, "me_gd", "ga_gd")[0] == both("reproduced")
    assert results_report.claim_keeps_utility(rs, lrs, "ga_gd", "me_gd")[0] == both("not reproduced")
    for r in rs[3:]:  # GA+GD forgets far more: a utility win bought with forgetting is not the claim
        r["last"]["fe_wo_es"] = 0.9
    assert results_report.claim_keeps_utility(rs, lrs, "me_gd", "ga_gd")[0] == both("inconclusive")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(results_report, "OUT", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results_report, "PLOTS", tmp_path)
    reproduce.save_results(rs)
    results_report.main([])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "ME+GD keeps model utility where GA+GD collapses (Closer-Look Table 4; last epoch): " + both("inconclusive") in text
    assert "| ME+GD (sweep incomplete: quick-recipe lr) | 0.0001 | 3 |" in text


def test_unknown_grid_is_one_sentence():
    with pytest.raises(SystemExit, match="unknown grid 'swep'"):
        reproduce.main(["--grid", "swep", "--list"])


def test_fe_without_es_by_hand():
    # 1 - mean(ROUGE 0.2, Prob 0.1, 1 - TR 0.2, CS 0.5) = 1 - 0.25; TR enters as 1 - min(TR, 1/TR)
    s = {"forget_rouge": 0.2, "forget_prob": 0.1, "forget_truth_ratio": 0.8, "forget_cs": 0.5}
    assert results_report.fe_wo_es(s) == pytest.approx(0.75)
    assert results_report.fe_wo_es({**s, "forget_cs": None}) is None
    recs = results_report.derive([{"last": dict(s), "tasks": {"0": dict(s)}}])
    assert recs[0]["last"]["fe_wo_es"] == recs[0]["tasks"]["0"]["fe_wo_es"] == pytest.approx(0.75)


def test_papers_numbers_beside_each_claim():
    """The papers' numbers RESULTS.md quotes (results/paper_numbers.json), checked against the tables by hand:
    RKLD Table 4 forget01 row RKLD (0.9659, 0.5913), Table 2 FKL forget01 (0.4786), Closer-Look Table 4
    ME+GD forget01 (MU 0.7271, FE 0.9204). Catches a column or row read off by one."""
    lines = {k: cell for k, (cell, _) in results_report.paper_lines().items()}
    assert "RKLD 0.966 / 0.591" in lines["rkld"] and "KTO 0.579 / 0.506" in lines["rkld"]
    assert "forget01: RKL 0.966 vs FKL 0.479" in lines["fkl"]
    assert "ME+GD 0.727 / 0.920" in lines["me_gd"] and "IDK+AP 0.758 / 0.762" in lines["idk_ap"]
    assert set(lines) == {key for key, _, _ in results_report.CLAIMS}
    assert results_report.paper_lines()["continual"][1].endswith("on a certain subtask.\" (line 196)")


def test_plots_are_drawn_from_the_records(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(results_report, "PLOTS", tmp_path)
    rs = [rec("rkld", 1e-4, 0.9, 0.37), rec("ga", 1e-4, 0.01, 0.2)]
    rs[0]["epochs"] = [{"epoch": 1, "forget_quality": 0.1}, {"epoch": 2, "forget_quality": 0.9, "model_utility": 0.37}]
    rs.append({"name": "continual-me_gd", "grid": "continual", "method": "me_gd", "lr": None, "seed": 42,
               "tasks": {"0": {"model_utility": 0.4, "fe_wo_es": 0.3}, "1": {"model_utility": 0.38, "fe_wo_es": 0.6}}})
    made = results_report.plots(rs, {m: None for m in grids.METHODS})
    assert made == ["fq_vs_mu.png", "epoch_curves.png", "continual.png"]
    assert all((tmp_path / m).stat().st_size > 10_000 for m in made)


def test_seeds_grid_draws_the_curves_from_its_seed_1_runs():
    """The per-epoch curves come from the seeds grid (seed 1 of the five curve methods evaluated every
    epoch) rather than a grid that trains those runs again; the other runs keep the cheap protocol."""
    records = [rec(m, lr, 0.5, 0.39) for m in grids.METHODS for lr in grids.SWEEP_LRS]
    items, waiting = reproduce.grid_items("seeds", records)
    assert not waiting and len(items) == 2 * len(grids.METHODS)
    every = sorted((i["method"], i["seed"]) for i in items if "--eval_every_epoch" in i["command"])
    assert every == sorted((m, 1) for m in grids.CURVES)
    assert "curves" not in grids.GRIDS


def test_two_sittings_saving_at_once_keep_each_others_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    mine = [rec("ga", 1e-4, 0.5, 0.4)]
    reproduce.save_results(mine)
    reproduce.save_results([rec("npo", 1e-4, 0.5, 0.4)])  # another process, which never loaded "ga"
    mine.append(rec("dpo", 1e-4, 0.5, 0.4))
    reproduce.save_results(mine)
    assert [r["name"] for r in grids.load_results()] == sorted(reproduce.run_name(m, 1e-4, 42) for m in ("dpo", "ga", "npo"))


def test_an_unfinished_run_is_redone_over_its_folder_and_an_incomplete_record_rerun(tmp_path, monkeypatch):
    """A run folder left without its peak evaluation holds args.json and model/, which the method scripts
    keep unless --overwrite when their arguments changed since (a flag added): the grid passes it for
    its own unfinished folders only. A record without the peak row it was run for is not 'done'."""
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path)
    item = reproduce.method_item("sweep", "ga_gd", 1e-4, 42)
    seen = []
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda cmd, **kw: seen.append(cmd))
    reproduce.launch(item, 1)
    fake_run(tmp_path / item["name"])
    reproduce.launch(item, 1)
    assert "--overwrite" not in seen[0] and seen[1][-2:] == ["--overwrite", "true"]
    r = rec("ga_gd", 1e-4, 0.5, 0.4)
    r["command"] = " ".join(item["command"][1:])
    assert reproduce.done_names([r]) == {r["name"]}
    del r["peak"]
    assert reproduce.done_names([r]) == set()


def test_a_first_run_that_fails_stops_the_grid_in_one_sentence(tmp_path, monkeypatch):
    """A sitting on a new machine once saw all 22 runs of a grid fail in 40 s, one after another, on the same
    missing model: the grid stops at its first failure when nothing has succeeded yet."""
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    items = [reproduce.method_item("sweep", m, 1e-4, 42) for m in ("ga", "npo", "dpo")]
    launched = []

    class Failed:
        returncode = 2

        def poll(self):
            return 2

    def launch(item, threads):
        launched.append(item["name"])
        (tmp_path / "grid").mkdir(parents=True, exist_ok=True)
        (tmp_path / "grid" / f"{item['name']}.log").write_text("loading\nError: the quick retain model is missing\n")
        return Failed()

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    with pytest.raises(SystemExit, match="first run this sitting, failed .*quick retain model is missing"):
        reproduce.run_grid(items, jobs=2, max_runs=None)
    assert launched == [items[0]["name"]]
    # once a run has succeeded, a later failure is counted and the grid goes on
    launched.clear()
    calls = iter([0, 2, 0])

    def launch_mixed(item, threads):
        launched.append(item["name"])
        rc = next(calls)
        if rc == 0:
            fake_run(tmp_path / "grid" / item["name"])
        return type("P", (), {"returncode": rc, "poll": lambda self: rc})()

    monkeypatch.setattr(reproduce, "launch", launch_mixed)
    more = [reproduce.method_item("sweep", m, 1e-4, 42) for m in ("kto", "idk", "rkld")]
    assert reproduce.run_grid(more, jobs=1, max_runs=None) == 1 and len(launched) == 3


def test_missing_quick_models_are_built_before_a_grid(tmp_path, monkeypatch):
    import common
    from harness import models
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    built, present = [], {"target": True, "retain": False}

    def quick_model(split, role, *a, **k):
        if not present[role]:
            raise common.TofuError(f"the quick {role} model for {split} is not built yet")
        return str(tmp_path / role)

    def run(cmd, **kw):
        built.append(cmd[1:])
        return type("R", (), {"returncode": 0})()

    monkeypatch.setattr(models, "quick_model", quick_model)
    monkeypatch.setattr(reproduce.subprocess, "run", run)
    reproduce.ensure_quick_models()
    assert built == [["finetune.py", "--split", "forget01"]]
    present["retain"] = True
    reproduce.ensure_quick_models()
    assert len(built) == 1  # both there: nothing built
    present["target"] = False
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **kw: type("R", (), {"returncode": 1})())
    with pytest.raises(SystemExit, match="building the quick models failed"):
        reproduce.ensure_quick_models()


def test_main_builds_the_quick_models_before_a_grid_that_needs_them(monkeypatch):
    order = []
    monkeypatch.setattr(reproduce, "ensure_quick_models", lambda: order.append("models"))
    monkeypatch.setattr(reproduce, "run_grid", lambda items, jobs, max_runs, start_by: order.append(items[0]["grid"]) or 0)
    monkeypatch.setattr(reproduce, "load_results", lambda: [])
    monkeypatch.setitem(sys.modules, "results_report", type("M", (), {"main": staticmethod(lambda argv: None)}))
    reproduce.main(["--grid", "sweep"])
    assert order == ["models", "sweep"]


def test_continual_verdict_reads_the_lowest_task_not_only_the_last():
    """MU per task, start 0.4: GA+GD falls to 0.05 at task 2 and recovers to 0.35 by task 3 (Closer-Look:
    'nearly zero on a certain subtask'); a verdict on the last task alone would call it kept."""
    def seq(m, *mus):
        return {"name": f"continual-{m}", "grid": "continual", "method": m, "lr": None, "seed": 42,
                "tasks": {str(k): {"model_utility": mu, "fe_wo_es": 0.5} for k, mu in enumerate((0.4, *mus))}}

    keep, dip, fall = (0.39, 0.38, 0.37), (0.3, 0.05, 0.35), (0.3, 0.2, 0.1)
    assert grids.CONTINUAL_TASKS >= 3
    pad = lambda t: t + (t[-1],) * (grids.CONTINUAL_TASKS - 3)
    recs = lambda **mus: [seq(m, *pad(mus[m])) for m in grids.CONTINUAL]
    v, lines, key = results_report.claim_continual(recs(me_gd=keep, idk_ap=keep, ga_gd=dip, npo_gd=fall))
    ga_line = next(ln for ln in flat(lines) if ln.startswith("GA+GD"))
    assert key.startswith("MU at the start 0.400; lowest over the tasks at lr 0.0001: ME+GD 0.370, GA+GD 0.050,")
    assert v == "reproduced" and "lowest 0.050 (task 2)" in ga_line and ga_line.endswith("declines (lowest below 80% of the start)")
    assert results_report.claim_continual(recs(me_gd=dip, idk_ap=keep, ga_gd=fall, npo_gd=fall))[0] == "not reproduced"
    assert results_report.claim_continual(recs(me_gd=keep, idk_ap=keep, ga_gd=keep, npo_gd=keep))[0] == "not reproduced"
    assert results_report.claim_continual(recs(me_gd=keep, idk_ap=keep, ga_gd=keep, npo_gd=fall))[0] == "inconclusive"
    assert results_report.claim_continual(recs(me_gd=keep, idk_ap=keep, ga_gd=fall, npo_gd=fall)[:3])[0] == "inconclusive"


def test_continual_verdict_on_the_sequences_run_so_far_shows_their_numbers():
    """A sitting that runs two of the four sequences: their lines in the report, the others named as not run,
    the verdict inconclusive unless one of ours already declines (which no later sequence can undo)."""
    def seq(m, *mus):
        return {"name": f"continual-{m}", "grid": "continual", "method": m, "lr": None, "seed": 42,
                "tasks": {str(k): {"model_utility": mu, "fe_wo_es": 0.5} for k, mu in enumerate((0.4, *mus))}}
    keep, fall = (0.39,) * grids.CONTINUAL_TASKS, (0.1,) * grids.CONTINUAL_TASKS
    v, lines, _ = results_report.claim_continual([seq("me_gd", *keep), seq("ga_gd", *fall)])
    lines = flat(lines)
    assert v == "inconclusive"
    assert any(ln.startswith("ME+GD: MU 0.400 at the start, lowest 0.390") and ln.endswith("keeps (lowest at least 80% of the start)") for ln in lines)
    assert any(ln.startswith("GA+GD: MU 0.400 at the start, lowest 0.100") and ln.endswith("declines (lowest below 80% of the start)") for ln in lines)
    assert "not run yet: IDK+AP, NPO+GD" in lines
    assert results_report.claim_continual([seq("me_gd", *fall), seq("ga_gd", *fall)])[0] == "not reproduced"
    assert results_report.claim_continual([seq("ga_gd", *keep)])[0] == "inconclusive"
    zero = results_report.claim_continual([seq("ga_gd", *(0.0,) * grids.CONTINUAL_TASKS)])[1][0]
    assert f"lowest 0.000 (task 1), 0.000 after task {grids.CONTINUAL_TASKS}" in zero  # 0.0 is not missing
    parts = seq("me_gd", *keep)
    parts["tasks"][str(grids.CONTINUAL_TASKS)].update(retain_rouge=0.6, real_authors_rouge=0.0, world_facts_rouge=0.3,
                                                           forget_rouge=0.2)
    lines = results_report.claim_continual([parts])[1]
    rouge = next(i for i, ln in enumerate(lines) if isinstance(ln, str) and ln.startswith("ROUGE-L after task"))
    assert lines[rouge + 1] == ["ME+GD retain 0.600, real authors 0.000, world facts 0.300, forget 0.200"]


def test_continual_at_the_lower_lr_is_a_second_verdict_that_leaves_the_first_alone():
    """The sequences at CONTINUAL_LOW_LR get the same rule as a verdict of their own; they must not replace the
    sequences at the quick recipe's lr in the first verdict (same methods, same grid)."""
    def seq(m, lr, *mus):
        return {"name": f"continual-{'low-' if lr else ''}{m}", "grid": "continual", "method": m, "lr": lr, "seed": 42,
                "tasks": {str(k): {"model_utility": mu, "fe_wo_es": 0.5} for k, mu in enumerate((0.4, *mus))}}
    keep, fall = (0.39,) * grids.CONTINUAL_TASKS, (0.1,) * grids.CONTINUAL_TASKS
    first = [seq("me_gd", None, *keep), seq("idk_ap", None, *keep), seq("ga_gd", None, *fall), seq("npo_gd", None, *fall)]
    v, lines, _ = results_report.claim_continual(first)
    assert v == "reproduced" and lines[-1] == "at one lower lr, 5e-05, for every method: not run yet (`--grid continual`)"
    low = grids.CONTINUAL_LOW_LR
    v, lines, key = results_report.claim_continual(first + [seq("me_gd", low, *fall), seq("ga_gd", low, *keep)])
    assert v == "reproduced at lr 0.0001; not reproduced at lr 5e-05"
    assert any(ln.startswith("ME+GD: MU 0.400 at the start, lowest 0.390") for ln in lines[:4])  # the first half's own
    head, second = lines[-2:]
    assert head.startswith("at one lower lr, 5e-05, for every method") and head.endswith("the verdict's second half:")
    assert second[0].startswith("ME+GD: MU 0.400 at the start, lowest 0.100")
    assert second[1].startswith("GA+GD: MU 0.400 at the start, lowest 0.390")
    assert second[-1] == "not run yet: IDK+AP, NPO+GD"
    assert key.endswith("; at lr 5e-05: ME+GD 0.100, GA+GD 0.390")
    v, _, _ = results_report.claim_continual(first + [seq("me_gd", low, *keep), seq("ga_gd", low, *fall)])
    assert v == "reproduced at lr 0.0001; inconclusive at lr 5e-05"  # two of four: ours keeps, so far


def test_continual_grid_runs_the_four_sequences_again_at_the_lower_lr(monkeypatch):
    monkeypatch.syspath_prepend(str(reproduce.REPO / "scripts"))
    import continual
    import baselines
    from transformers import HfArgumentParser
    items, _ = reproduce.grid_items("continual", [])
    names = [it["name"] for it in items]
    assert names == ["continual-target", *(f"continual-{m}" for m in grids.CONTINUAL),
                     *(f"continual-low-{m}" for m in grids.CONTINUAL)]
    low = {it["method"]: it for it in items if it["name"].startswith("continual-low-")}
    assert {it["lr"] for it in low.values()} == {grids.CONTINUAL_LOW_LR}
    assert all(it["needs"] == "continual-target" and it["collect"] == "continual" for it in low.values())
    cmd = low["ga_gd"]["command"]
    assert cmd[cmd.index("--out") + 1].endswith("continual-low-ga_gd")
    extra = cmd[cmd.index("--") + 1:]
    assert extra == ["--method", "ga_gd", "--lr", "5e-05"] and low["me_gd"]["command"][-3:] == ["--", "--lr", "5e-05"]
    # every task of the sequence trains at that lr: later tasks get the quick recipe's lr first, then ours
    for k in (1, 2):
        argv = continual.task_command("baselines", "forget01", k, "quick", Path("/tmp/seq"), "python", extra)[2:]
        a = HfArgumentParser(baselines.Args).parse_args_into_dataclasses(argv)[0]
        assert a.lr == grids.CONTINUAL_LOW_LR and a.method == "ga_gd" and a.forget_task == k


def test_continual_lr_the_report_states_is_the_scripts_quick_recipe():
    import baselines
    import idk_ap
    import me_gd
    assert {me_gd.QUICK["lr"], idk_ap.QUICK["lr"], baselines.QUICK["lr"]} == {grids.CONTINUAL_LR}


def test_report_warns_when_runs_started_from_different_targets():
    """A later sitting on a new machine rebuilds the quick target; a rebuild that differed must show, not mix."""
    a, b = rec("ga", 1e-4, 0.5, 0.4), rec("npo", 1e-4, 0.5, 0.4, seed=1, grid="seeds")
    assert results_report.starts_line([a, b]).startswith("Every sweep, seeds and shared run (2) started from the same")
    b["before"] = {**b["before"], "model_utility": 0.4 + 6e-6}  # the sweep's own float noise: one start
    assert results_report.starts_line([a, b]).startswith("Every sweep, seeds and shared run (2)")
    b["before"] = {**b["before"], "model_utility": 0.41}
    line = results_report.starts_line([a, b])
    assert line.startswith("**Warning: the runs started from 2 different quick targets**") and "npo-lr0.0001-seed1" in line


def test_the_continual_target_gets_every_core_while_the_sequences_wait_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    items, _ = reproduce.grid_items("continual", [])
    launched = []

    def launch(item, threads):
        launched.append((item["name"], threads))
        return type("P", (), {"returncode": 0, "poll": lambda self: 0})()

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce, "finished", lambda item: bool(launched) and item["name"] in dict(launched))
    monkeypatch.setattr(reproduce, "collect", lambda item, wall, jobs: {"name": item["name"], "grid": "continual"})
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    assert reproduce.run_grid(items, jobs=2, max_runs=None) == 0
    assert launched[0] == ("continual-target", 2)
    assert {n for _, n in launched[1:]} == {1} and len(launched) == 1 + 2 * len(grids.CONTINUAL)


def test_hours_starts_no_run_after_the_limit_and_records_the_runs_under_way(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    items = [reproduce.method_item("sweep", m, 1e-4, 42) for m in ("ga", "npo", "dpo")]
    clock, launched = [1000.0], []

    class Proc:
        def __init__(self, item):
            self.item, self.end, self.returncode = item, clock[0] + 50, 0

        def poll(self):
            if clock[0] < self.end:
                return None
            fake_run(tmp_path / "grid" / self.item["name"])
            return 0

    def launch(item, threads):
        launched.append(item["name"])
        return Proc(item)

    def sleep(s):
        clock[0] += 10

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", sleep)
    monkeypatch.setattr(reproduce.time, "time", lambda: clock[0])
    assert reproduce.run_grid(items, jobs=1, max_runs=None, start_by=1030.0) == 0
    assert launched == [items[0]["name"]]  # started before the limit, finished after it: recorded
    assert [r["name"] for r in grids.load_results()] == [items[0]["name"]]
    assert "--hours reached: no new runs; 2 left for a later sitting" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--hours must be positive"):
        reproduce.main(["--hours", "0", "--list"])


def test_gpu_grid_commands_parse_and_take_the_cpu_sweeps_lr(tmp_path, monkeypatch):
    """`--grid gpu` runs only on a machine with a GPU; here its commands are checked against each script's own
    parser (a flag renamed in a script would otherwise fail only there), its order (models before methods)
    and its lr (the CPU sweep's choice, not the papers' 1e-5)."""
    import importlib
    from transformers import HfArgumentParser
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    records = [rec(m, lr, fq, mu) for m in grids.METHODS for lr, fq, mu in ((hi, 0.9, 0.2), (mid, 0.5, 0.39), (lo, 0.1, 0.39))]
    items = reproduce.gpu_items(records)
    assert [i["name"] for i in items][:2] == ["gpu-models-forget05", "gpu-rkld-forget05"]
    assert len(items) == len(grids.GPU_SPLITS) * (1 + len(grids.GPU_METHODS))
    ten = next(i for i in items if i["name"] == "gpu-models-forget10")
    # forget10's item builds the target itself (finetune.py skips it where it exists) and retain90
    assert ten["needs"] is None and "--build" not in ten["command"] and ten["models"][0].endswith("_all_full")
    for it in items:
        script = Path(it["command"][1]).stem
        args = HfArgumentParser(importlib.import_module(script).Args).parse_args_into_dataclasses(args=it["command"][2:])[0]
        if it["method"] == "finetune":
            assert args.subset == "all" and args.batch_size == 32
            continue
        assert it["needs"] == f"gpu-models-{it['split']}" and args.split == it["split"]
        assert args.lr == mid and args.max_eval_samples == 300 and args.peak_epoch
        assert args.model.endswith("smollm2-135m_all_full") and args.retain_model.endswith(
            "smollm2-135m_all_" + {"forget05": "retain95", "forget10": "retain90"}[it["split"]])
        if it["method"] == "ga_gd":
            assert args.method == "ga_gd"
    # the gpu runs' records do not feed the CPU tables or the lr rule
    gpu_rec = {**rec("rkld", mid, 0.99, 0.9), "name": "a-gpu-run", "grid": "gpu",
               "before": {"forget_quality": 0.5, "model_utility": 0.2}}  # read as the target's, hi would keep 90%
    assert grids.chosen_lr("ga", [gpu_rec, *records]) == mid
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(results_report, "OUT", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results_report, "PLOTS", tmp_path)
    gpu_rec.update(split="forget05", peak_epoch=3, info={"cuda": "NVIDIA H200", "torch": "2.11.0+cu130"},
                   finished="2026-12-03 08:00 UTC", last={"forget_quality": 0.3, "model_utility": 0.8}, wall_s=312.0,
                   note="carried as wheels")
    models = {"name": "gpu-models-forget05", "grid": "gpu", "method": "finetune", "lr": None, "seed": None,
              "split": "forget05", "wall_s": None, "info": {"cuda": "NVIDIA H200", "torch": "2.11.0+cu130"}}
    # a later sitting: three runs at a time, from a tree with changes the commit does not hold, the same note twice
    shared = dict(grid="gpu", split="forget10", jobs=3, note="three at a time", finished="2026-12-04 18:00 UTC",
                  info={"cuda": "NVIDIA H200", "torch": "2.11.0+cu130", "git_commit": "ceb3450bae0000",
                        "git_dirty": ["bench/reproduce.py"]})
    later = [{**rec("ga_gd", mid, 0.2, 0.3), "name": "g-gpu-run", "wall_s": 210.0, **shared},
             {"name": "gpu-models-forget10", "method": "finetune", "lr": None, "seed": None, "wall_s": 90.0, **shared}]
    reproduce.save_results([*records, gpu_rec, models, *later])
    results_report.main([])
    text = (tmp_path / "RESULTS.md").read_text()
    assert ("**forget05** (1 of 10 methods, not run yet: ME+GD, IDK+AP, GA+GD, NPO+GD, WGA+GD, SatImp+GD, CE-U, PDU, "
            "RMU; NVIDIA H200; 2026-12-03;") in text
    assert "| RKLD | first peak (3) | 5e-05 | 0.99 |" in text
    # how the runs were made goes to results/commands.md: the models have no wall time in forget05's record; runs
    # that shared the GPU say so
    prov = (tmp_path / "commands.md").read_text()
    assert ("Software: torch 2.11.0+cu130. Wall time a run: RKLD forget05 5.2 min, GA+GD forget10 3.5 min (3 runs "
            "at a time), models forget10 1.5 min (3 runs at a time).") in prov
    assert "- a-gpu-run: carried as wheels" in prov
    assert "- g-gpu-run, gpu-models-forget10: three at a time" in prov and prov.count("three at a time\n") == 1
    assert "ceb3450bae with uncommitted changes to bench/reproduce.py" in prov
    assert "0.0 h of run wall time on the CPU" in prov and "; 10.2 min of GPU run wall time, about 6.9 min of the GPU (runs" in prov  # counted apart
    assert "carried as wheels" not in text and "Generated" in text.splitlines()[2]
    cpu_table = text.split("## Main table at the first-peak")[1]
    assert "| RKLD | 5e-05 | 1 | 0.5 |" in cpu_table  # the CPU row, not the GPU run
    assert "| target (before unlearning) | | | 0.01 | 0.400 |" in cpu_table  # the CPU target, not the GPU one


def test_a_recorded_model_missing_on_this_machine_is_built_again_before_the_runs_that_need_it(tmp_path, monkeypatch):
    """The continual target and the gpu grid's models are recorded in results.json, but live in runs/: on a new
    machine the sequences or method runs would start from a folder that is not there."""
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    records = [rec(m, lr, 0.5, 0.39) for m in grids.METHODS for lr in grids.SWEEP_LRS]
    items = reproduce.gpu_items(records)
    for it in items:
        if it["method"] == "finetune":
            it["models"] = [str(tmp_path / Path(m).name) for m in it["models"]]
    done = ["gpu-models-forget05", "gpu-models-forget10", *(f"gpu-{m}-forget05" for m in grids.GPU_METHODS)]
    reproduce.save_results([{"name": n, "grid": "gpu", "method": "x", "lr": None, "seed": None} for n in done])
    launched = []

    def launch(item, threads):
        launched.append(item["name"])
        for m in item.get("models", []):
            write(Path(m) / "config.json", {})
        if item["method"] != "finetune":
            fake_run(tmp_path / "grid" / item["name"])
        return type("P", (), {"returncode": 0, "poll": lambda self: 0})()

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    assert reproduce.run_grid(items, jobs=1, max_runs=None) == 0
    # forget05's runs are all done: only forget10's models (the target and retain90), not retain95 as well
    assert launched[0] == "gpu-models-forget10" and "gpu-models-forget05" not in launched
    assert sorted(launched[1:]) == sorted(f"gpu-{m}-forget10" for m in grids.GPU_METHODS)
    # a forget05 run to do: its models are built (retain95; the target is there), then the run
    def drop():  # the record and the run folder
        write(tmp_path / "results.json", [r for r in grids.load_results() if r["name"] != "gpu-rkld-forget05"])
        shutil.rmtree(tmp_path / "grid" / "gpu-rkld-forget05", ignore_errors=True)
    launched.clear()
    drop()
    assert reproduce.run_grid(items[:2], jobs=1, max_runs=None) == 0
    assert launched == ["gpu-models-forget05", "gpu-rkld-forget05"]
    # models on this machine: nothing is built again
    launched.clear()
    drop()
    assert reproduce.run_grid(items[:2], jobs=1, max_runs=None) == 0 and launched == ["gpu-rkld-forget05"]


def test_two_model_builds_never_run_side_by_side(tmp_path, monkeypatch):
    """Both gpu model items train the target into one folder where it is missing: with free slots (after a
    first run has finished) the second build still waits for the first to end."""
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path / "grid")
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    gpu = reproduce.gpu_items([])
    first = {**next(i for i in gpu if i.get("collect") is None), "needs": None}  # a run that ends at once
    models = [{**i, "models": [str(tmp_path / Path(m).name) for m in i["models"]]} for i in gpu if i.get("collect")]
    ticks, spans = [0], {}

    class Proc:
        def __init__(self, item):
            self.item, self.end, self.returncode = item, ticks[0] + (1 if item is first else 5), 0

        def poll(self):
            if ticks[0] < self.end:
                return None
            for m in self.item.get("models", []):
                write(Path(m) / "config.json", {})
            if self.item is first:
                fake_run(tmp_path / "grid" / self.item["name"])
            spans[self.item["name"]] = (spans[self.item["name"]][0], ticks[0])
            return 0

    def launch(item, threads):
        spans[item["name"]] = (ticks[0], None)
        return Proc(item)

    monkeypatch.setattr(reproduce, "launch", launch)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: ticks.__setitem__(0, ticks[0] + 1))
    monkeypatch.setattr(reproduce, "collect", lambda item, wall, jobs: {"name": item["name"], "grid": "gpu"})
    assert reproduce.run_grid([first, *models], jobs=3, max_runs=None) == 0
    (s5, e5), (s10, e10) = spans["gpu-models-forget05"], spans["gpu-models-forget10"]
    assert s5 < e5 <= s10 < e10 and s5 == spans[first["name"]][1]  # the slots were free: only the build held it


def test_keeps_utility_claim_lists_both_methods_at_each_shared_lr():
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    rs = [rec("me_gd", lr, 0.5, mu, fe=0.7) for lr, mu in ((hi, 0.40), (mid, 0.41), (lo, 0.42))]
    rs += [rec("ga_gd", lr, 0.5, mu, fe=0.6) for lr, mu in ((hi, 0.10), (mid, 0.39), (lo, 0.42))]
    rs.insert(0, rec("ga_gd", hi, 0.5, 0.35, seed=1, grid="seeds"))  # a seeds run is not the sweep's seed-42 row
    head, per = results_report.shared_lr_lines(rs, "me_gd", "ga_gd")
    assert head.startswith("at one shared lr (Closer-Look Table 4 trains every method at one lr")
    assert per[0] == f"lr {hi:g}: ME+GD MU 0.400, FE w/o ES 0.700 vs GA+GD MU 0.100, FE w/o ES 0.600"
    assert [x.split(":")[0] for x in per] == [f"lr {lr:g}" for lr in (hi, mid, lo)]
    assert results_report.shared_lr_lines(rs[1:4], "me_gd", "ga_gd") == []


def test_rkld_against_the_newer_baselines_is_table4s_test_worded_holds():
    """Issue 33: RKLD Table 4's test (FQ separated higher over seeds at MU within MU_TOL, first-peak epoch) against
    WGA+GD, SatImp+GD, CE-U, PDU and RMU. Not a paper's claim: holds / does not hold. A baseline whose sweep has no
    chosen lr yet is named and keeps the verdict inconclusive; the paper's own claim is not changed by them."""
    lr = 5e-5
    lrs = {m: lr for m in grids.METHODS}
    seeds = ((42, "sweep"), (1, "seeds"), (2, "seeds"))
    rs = [rec("rkld", lr, fq, 0.40, s, g) for (s, g), fq in zip(seeds, (0.4, 0.5, 0.45))]
    rs += [rec(m, lr, fq, 0.39, s, g) for m in grids.NEWER_BASELINES for (s, g), fq in zip(seeds, (0.01, 0.02, 0.015))]
    v, lines, key = results_report.claim_rkld_vs_newer(rs, lrs)
    assert v == "holds" and [x.split(":")[0] for x in lines] == ["RKLD", "WGA+GD", "SatImp+GD", "CE-U", "PDU", "RMU"]
    assert key == "RKLD FQ 0.45 ± 0.05, MU 0.400 ± 0.000; the baselines FQ 0.015-0.015, MU 0.390-0.390"
    assert results_report.claim_rkld_vs_baselines(rs, lrs)[0] == "inconclusive"  # the paper's baselines: no runs here
    for r in rs:  # RMU forgets more, separated: the test fails
        if r["method"] == "rmu":
            r["peak"] = dict(r["peak"], forget_quality=r["peak"]["forget_quality"] * 100)
    assert results_report.claim_rkld_vs_newer(rs, lrs)[0] == "does not hold"
    # RMU's sweep has only its first rate: that run is not read as RMU's chosen one (it forgets more than RKLD)
    first = [rec("rmu", grids.SWEEP_LRS[0], 0.9, 0.39)]
    v, lines, _ = results_report.claim_rkld_vs_newer([r for r in rs if r["method"] != "rmu"] + first, lrs | {"rmu": None})
    assert v == "inconclusive (sweep incomplete for RMU)" and lines[-1] == "RMU: sweep incomplete (no chosen lr yet)"


def test_a_baseline_that_unlearned_nothing_at_any_rate_is_named_in_the_claim():
    """RMU at WMDP's values and SatImp+GD at its defaults leave the quick target's forget quality at or below the
    target's (0.0143) at every swept lr: RKLD 'beats' them without either unlearning; the claim says so."""
    lrs = {m: grids.SWEEP_LRS[-1] for m in grids.METHODS}
    rs = [rec("rkld", grids.SWEEP_LRS[-1], 0.4, 0.40)]  # rec's target: forget quality 0.01 before
    rs += [rec("rmu", lr, fq, 0.42) for lr, fq in zip(grids.SWEEP_LRS, (0.01, 0.005, 0.01))]
    assert grids.unlearned_nothing("rmu", rs) and not grids.unlearned_nothing("rmu", rs[:3])  # sweep incomplete
    assert grids.chosen_lr("rmu", rs) == grids.SWEEP_LRS[0]  # LR_RULE: none moved, the highest MU (first on a tie)
    _, lines, key = results_report.claim_rkld_vs_newer(rs, lrs)
    assert key.endswith("; RMU unlearned nothing at any swept lr")
    assert lines[-1].endswith("; it unlearned nothing at any swept lr (last-epoch FQ never above the target's), so the "
                              "comparison says little")
    rs[2]["last"] = dict(rs[2]["last"], forget_quality=0.02)  # one rate moved it
    assert not grids.unlearned_nothing("rmu", rs)
    assert not results_report.claim_rkld_vs_newer(rs, lrs)[1][-1].endswith("says little")


def test_forget_quality_cells_keep_three_significant_figures():
    """0.405 (RKLD's first-peak FQ on the quick path) against 0.165 (FKL's) must not both print as 0.4 / 0.2."""
    assert results_report.cell([0.405] * 3, "g") == "0.405 ± 0"
    assert results_report.cell([0.0286], "g") == "0.0286"


def test_keeps_utility_has_a_second_verdict_at_the_shared_lr_once_it_has_seeds():
    """Closer-Look Table 4 trains every method at one lr: the claim keeps its verdict at each method's chosen
    lr and adds the same rule at SHARED_LR, read from every grid's runs there (sweep seed 42, seeds, shared)."""
    shared, other = grids.SHARED_LR, next(lr for lr in grids.SWEEP_LRS if lr != grids.SHARED_LR)
    lrs = {m: other for m in grids.METHODS} | {"me_gd": shared}
    rs = [rec("me_gd", shared, 0.9, mu, s, "sweep" if s == 42 else "seeds", fe=0.7) for s, mu in ((42, 0.40), (1, 0.39), (2, 0.41))]
    rs += [rec("ga_gd", other, 0.5, mu, s, "sweep" if s == 42 else "seeds", fe=0.5) for s, mu in ((42, 0.40), (1, 0.38), (2, 0.42))]
    rs += [rec("ga_gd", shared, 0.9, 0.10, 42, "sweep", fe=0.71)]
    v, lines, key = results_report.claim_keeps_utility(rs, lrs, "me_gd", "ga_gd")
    assert v == "inconclusive" and any("seeds 1 and 2 not all run yet" in x for x in flat(lines))
    assert key == "MU 0.400 ± 0.010 vs 0.400 ± 0.020 at the chosen lrs"
    rs += [rec("ga_gd", shared, 0.9, mu, s, "shared", fe=0.71) for s, mu in ((1, 0.12), (2, 0.08))]
    v, lines, key = results_report.claim_keeps_utility(rs, lrs, "me_gd", "ga_gd")
    assert v == f"inconclusive at each method's chosen lr; reproduced at one shared lr, {shared:g} (Table 4's protocol)"
    at = next(i for i, x in enumerate(lines) if isinstance(x, str)
              and x.startswith(f"at one shared lr {shared:g}, the verdict's second half"))
    under = lines[at + 1]
    assert under[1].startswith("GA+GD (lr 0.0001, 3 seeds, last epoch): MU 0.100 ± 0.020") and under[-1] == "MU higher, FE w/o ES lower"
    assert key.endswith(f"; 0.400 ± 0.010 vs 0.100 ± 0.020 at lr {shared:g}")
    for r in rs[-3:]:  # the baseline forgets far more at the shared lr: not the claim
        r["last"]["fe_wo_es"] = 0.9
    assert results_report.claim_keeps_utility(rs, lrs, "me_gd", "ga_gd")[0].endswith("inconclusive at one shared lr, "
                                                                                     f"{shared:g} (Table 4's protocol)")
    assert "ga_gd-lr0.0001-seed1" not in {r["name"] for r in rs[:6]}  # the shared runs are not the chosen-lr ones


def test_shared_grid_runs_the_closer_look_pairs_at_one_lr_and_reuses_me_gds_seeds():
    items = reproduce.grid_items("shared", [])[0]
    assert {(it["method"], it["lr"], it["seed"]) for it in items} == {
        (m, grids.SHARED_LR, s) for m in ("me_gd", "ga_gd", "idk_ap", "idk_gd") for s in grids.MORE_SEEDS}
    # ME+GD's chosen lr is the shared one: its seeds-grid runs have the same names, so they are not run twice
    assert "me_gd-lr0.0001-seed1" in {it["name"] for it in items}
    assert all(it["command"][it["command"].index("--lr") + 1] == f"{grids.SHARED_LR:g}" for it in items)


def test_median_interval_is_the_binomial_order_statistics():
    # n = 24: P(Bin(24, 1/2) <= 6) = 0.011 <= 0.025 < P(<= 7) = 0.032, so the 95% interval is x(7)..x(18)
    assert results_report.median_ci([float(x) for x in range(24, 0, -1)]) == (7.0, 18.0)
    assert results_report.median_ci([1.0, 2, 3, 4, 5, 6]) == (1.0, 6.0)  # n = 6: 2/64 <= 0.05
    assert results_report.median_ci([1.0, 2, 3, 4, 5]) is None  # n = 5: even the extremes cover only 94%


def test_interleaved_steps_are_balanced_over_who_took_the_first_turn(tmp_path, monkeypatch):
    # 4 rounds of 3 steps; rounds 1 and 3 ours took the first turn, and a first turn halves the ratio while a
    # second one doubles it: each step's order-balanced sample sqrt(a/2 * 2a) is its true ratio a
    def rounds(a):  # a: the true ratios of round pair 1 (3 steps), then of round pair 2
        return [x / 2 for x in a[:3]] + [x * 2 for x in a[:3]] + [x / 2 for x in a[3:]] + [x * 2 for x in a[3:]]
    fast, mixed = rounds([1.1, 1.2, 1.3, 1.05, 1.15, 1.25]), rounds([0.9, 1.1, 1.0, 0.95, 1.05, 1.2])
    common = {"forwards_per_step": {"trained": 2, "frozen": 0}, "tokens_per_step": [100, 200], "ours_tok_cpu_s": 50.0,
              "trainer_tok_cpu_s": 40.0, "max_rel_loss_diff": 0.0}
    ten = [10.0] * 12
    rec = {**common, "step_cpu_s": {"ours": ten, "trainer": [10 * x for x in fast]}}  # ratios: fast
    slow = {**common, "step_cpu_s": {"ours": [10 * x for x in fast], "trainer": ten}}  # ratios: 1 / fast
    level = {**rec, "step_cpu_s": {"ours": ten, "trainer": [10 * x for x in mixed]}}
    config = {"rounds": 4, "steps": 3, "warmup": 1, "batch": 8, "threads": 2, "rtol": 1e-4, "git_commit": "abc",
              "load_before": [0.0, 0, 0], "platform": "Linux-x"}
    monkeypatch.setattr(results_report, "PLOTS", tmp_path)
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    assert results_report.interleaved_files() == []
    assert "Not measured yet" in results_report.interleaved_table([])[0]
    (tmp_path / "throughput_interleaved.json").write_text(json.dumps(
        {"config": {**config, "methods": "rkld,ga_gd"}, "methods": {"rkld": rec, "ga_gd": slow}}))
    (tmp_path / "throughput_interleaved_others.json").write_text(json.dumps(
        {"config": {**config, "methods": "npo_gd"}, "methods": {"npo_gd": level}}))
    files = results_report.interleaved_files()
    table = "\n".join(results_report.interleaved_table(files))
    # total CPU time over all 12 raw pairs: 7.05 * (1/2 + 2) / 12
    assert "| RKLD | 2 + 0 | 150 | 50.0 | 40.0 | 1.175 (1.050-1.300) | 6 of 6 | 1.469 | 0.0e+00 | faster |" in table
    assert "| GA+GD | 2 + 0 | 150 | 50.0 | 40.0 | 0.851 (0.769-0.952) | 0 of 6 | 0.681 | 0.0e+00 | slower |" in table
    assert "| NPO+GD |" in table and "1.025 (0.900-1.200) | 4 of 6 |" in table and table.count("level with it") == 1
    assert ("Judged on these step pairs: ours faster for RKLD; ours level with the Trainer, neither shown faster nor "
            "slower, for NPO+GD: the 95% interval of each median step ratio holds 1.0, all of them within 0.900-1.200; "
            "ours slower for GA+GD, whose whole interval is below 1.0.") in table
    line = " ".join(results_report.interleaved_lines(*files[0]))
    assert "RKLD 0.58" in line and "2.350 when the Trainer did" in line and "commit abc, Linux-x, load average 0.0" in line
    assert "GA+GD 1.703 when ours took the first turn, 0.426 when the Trainer did" in line  # 2 / 1.175, 1 / 2.35
    assert "`python bench/throughput.py --batch 8 --steps 3 --rounds 4 --methods rkld,ga_gd " \
           "--json results/throughput_interleaved.json`" in line
    monkeypatch.setattr(results_report, "OUT", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results_report, "plots", lambda records, lrs: [])
    results_report.main([])  # no results.json: the claims not run yet, the throughput table from the files
    text = (tmp_path / "RESULTS.md").read_text()
    assert table in text and "RKLD, GA+GD: `python bench/throughput.py" in (tmp_path / "commands.md").read_text()


def test_list_estimates_what_is_left_per_percent_forgotten_and_says_whose_time(tmp_path, monkeypatch):
    """forget10's runs have twice forget05's steps: an estimate from forget05's records alone said 2 min a
    forget10 run, and called the GPU's minutes this machine's."""
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    gpu = reproduce.gpu_items([])
    reproduce.save_results([
        {"name": "gpu-rkld-forget05", "grid": "gpu", "method": "rkld", "split": "forget05", "wall_s": 300.0, "jobs": 1},
        {"name": "gpu-ga_gd-forget05", "grid": "gpu", "method": "ga_gd", "split": "forget05", "wall_s": 450.0, "jobs": 3},
        {"name": "gpu-models-forget05", "grid": "gpu", "method": "finetune", "split": "forget05", "wall_s": 999.0},
        {"name": "ga-lr1e-05-seed42", "grid": "sweep", "method": "ga", "wall_s": 600.0, "jobs": 2}])
    done = {i["name"] for i in gpu if i["split"] == "forget05"}
    left = [i for i in gpu if i["name"] in ("gpu-models-forget10", "gpu-rkld-forget10", "gpu-me_gd-forget10")]
    # 60 and 30 s of machine time per percent: median 45; two forget10 runs (the models are not runs): 900 s
    assert reproduce.cost("gpu", left, done) == (
        "; the 2 runs left (2 forget10): about 15 min of GPU time (the machine that ran them), from the "
        "recorded runs' median of 0.8 min a run per percent of TOFU forgotten")
    sweep = [reproduce.method_item("sweep", m, 1e-4, 42) for m in ("npo", "dpo", "kto")]
    assert reproduce.cost("sweep", sweep, set()).startswith("; the 3 runs left (3 forget01): about 15 min of this machine")


def test_gpu_reading_orders_the_methods_by_first_peak_forget_quality():
    runs = [{"method": "ga_gd", "peak": {"forget_quality": 1e-7, "model_utility": 0.33}, "last": {"forget_quality": 0.5}},
            {"method": "rkld", "peak": {"forget_quality": 0.016, "model_utility": 0.32}, "last": {"forget_quality": 1e-9}},
            {"method": "npo_gd", "peak": None, "last": {"forget_quality": 1e-9, "model_utility": 0.37}}]  # no peak row
    line, = results_report.gpu_reading(runs)
    assert line.startswith("First-peak epoch, highest forget quality first: RKLD FQ 0.016, MU 0.320; GA+GD FQ 1e-07, "
                           "MU 0.330; NPO+GD FQ 1e-09, MU 0.370. One seed")
    assert results_report.gpu_reading(runs[:1]) == []  # one method: nothing to order


def test_results_md_is_the_reports_output_from_the_committed_results():
    """RESULTS.md and results/commands.md are what the report writes from results/ (nobody edited them by hand,
    and a change to the report was followed by --report_only); RESULTS.md opens with the claims table and keeps
    every line short enough to read."""
    text = (grids.REPO / "RESULTS.md").read_text()
    mp = pytest.MonkeyPatch()
    try:
        out = {}
        mp.setattr(results_report, "plots", lambda records, lrs: [m[len("![") : m.index("]")] for m in text.splitlines()
                                                                 if m.startswith("![")])
        mp.setattr(results_report, "write", lambda path, t: out.__setitem__(path.name, t))
        results_report.main([])
    finally:
        mp.undo()
    assert out["RESULTS.md"] == text
    assert out["commands.md"] == (grids.REPO / "results" / "commands.md").read_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 400 and "Do not edit by hand" in lines[2]
    head = lines.index("| claim | paper's numbers (Llama-2-7B) | our verdict | key numbers |")
    assert lines[head + 2:head + 3 + len(results_report.CLAIMS)] == [
        *(ln for ln in lines[head + 2:] if ln.startswith("| "))][:len(results_report.CLAIMS)] + [""]  # one row a claim
    assert lines.index("## Plots") < lines.index("## The claims in detail") < lines.index(
        "## Learning-rate sweep (seed 42, last epoch: forget quality / model utility)")


def test_no_import_circle_among_the_bench_scripts():
    """bench/*.py import one another only one way (deferred imports inside functions count): reproduce.py may
    call the report, the report reads the grids, never reproduce.py."""
    import ast
    bench = grids.REPO / "bench"
    names = {p.stem for p in bench.glob("*.py")}
    graph = {}
    for p in bench.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
        graph[p.stem] = found & names - {p.stem}
    assert "reproduce" not in graph["results_report"] and "grids" in graph["results_report"]

    def reach(start, seen):
        for n in graph[start] - seen:
            seen.add(n)
            reach(n, seen)
        return seen
    assert not [m for m in graph if m in reach(m, set())]


def robust_rec(method, lr, privleak, relearn, q4, q8, ext=0.1, prob=0.05):
    """A robust-grid record: each attack's (attacked, yardstick, retain) forget Prob, as eval/after/summary.json holds;
    prob: the unlearned model's own forget Prob (full precision, before any attack)."""
    s = {"forget_quality": 0.5, "model_utility": 0.4, "privleak": privleak, "extraction_strength": ext, "forget_prob": prob}
    for prefix, models, v in (("relearn_attack/", ("unlearned", "attacked", "retain"), relearn),
                              ("quantize_attack/4bit/", ("attacked", "target", "retain"), q4),
                              ("quantize_attack/8bit/", ("attacked", "target", "retain"), q8)):
        s |= {f"{prefix}{m}/forget_prob": x for m, x in zip(models, v)}
        s |= {f"{prefix}{m}/forget_rouge": x / 2 for m, x in zip(models, v)}
    return {"name": reproduce.run_name(method, lr, 42, "robust"), "grid": "robust", "method": method, "lr": lr,
            "seed": 42, "before": {"forget_quality": 0.01, "model_utility": 0.4}, "last": s, "peak": s}


def test_robust_verdicts_keep_near_the_retain_yardstick_and_flag_privleak_far_above_0(tmp_path, monkeypatch):
    """A method relearned (or quantized) back to the target's level does not keep its forgetting; one that stays
    within ATTACK_TOL of the retain model under the same attack keeps it; privleak above PRIVLEAK_FAR over-unlearns."""
    assert (results_report.ATTACK_TOL, results_report.PRIVLEAK_FAR) == (0.1, 20.0)  # fixed before any robust run
    lrs = {m: (1e-4 if m in ("rkld", "ga", "npo") else None) for m in grids.METHODS}
    # (unlearned, attacked, retain) for relearning; (attacked, target, retain) for quantization
    rs = [robust_rec("rkld", 1e-4, 5.0, (0.1, 0.34, 0.25), (0.21, 0.8, 0.2), (0.15, 0.9, 0.2)),  # near the retain model
          robust_rec("ga", 1e-4, -3.0, (0.05, 0.9, 0.25), (0.8, 0.8, 0.2), (0.37, 0.9, 0.26)),  # back to the target's (8 bit: just past ATTACK_TOL)
          robust_rec("npo", 1e-4, 60.0, (0.01, 0.2, 0.25), (0.1, 0.8, 0.2), (0.1, 0.9, 0.2))]  # privleak far above 0
    got = {q: v for q, _, v, _ in results_report.robust_verdicts(rs, lrs)}
    n = len(grids.METHODS) - 3
    assert got["keeps its forgetting under relearning"] == f"keeps: RKLD, NPO; does not keep: GA; had not forgotten: none ({n} methods not run yet)"
    assert got["keeps its forgetting under 4-bit quantization"] == f"keeps: RKLD, NPO; does not keep: GA; had not forgotten: none ({n} methods not run yet)"
    assert got["keeps its forgetting under 8-bit quantization"] == f"keeps: RKLD, NPO; does not keep: GA; had not forgotten: none ({n} methods not run yet)"
    assert got["over-unlearns (privleak far above 0)"] == f"over-unlearns: NPO; does not: RKLD, GA ({n} methods not run yet)"
    # no robust run yet: every verdict reads "not run yet"
    assert {v for _, _, v, _ in results_report.robust_verdicts([], lrs)} == {"not run yet"}
    nums = {q: x for q, _, _, x in results_report.robust_verdicts(rs, lrs)}
    assert nums["over-unlearns (privleak far above 0)"] == "privleak from -3 (GA) to +60 (NPO)"
    # the report: the section's numbers per method, "not run yet" for the rest
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(results_report, "OUT", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results_report, "PLOTS", tmp_path)
    reproduce.save_results(rs)
    monkeypatch.setattr(results_report, "chosen", lambda records: lrs)
    results_report.main([])
    text = (tmp_path / "RESULTS.md").read_text()
    assert ("| GA | 0.0001 | -3.0 | 0.100 | 0.025 / 0.450 / 0.125 | 0.050 / 0.900 / 0.250 | 0.400 / 0.400 / 0.100 | "
            "0.800 / 0.800 / 0.200 | 0.185 / 0.450 / 0.130 | 0.370 / 0.900 / 0.260 |") in text
    assert "| ME+GD | sweep incomplete | not run yet |" in text
    assert "| keeps its forgetting under relearning | attacked forget Prob ≤ retain's attacked + 0.1 |" in text


def test_attack_claims_hold_when_most_methods_run_do_not_keep_their_forgetting():
    """The top table's two attack claims (relearning, 4-bit) by ATTACK_TOL's per-method rule: reproduced when more
    methods run lose their forgetting than keep it; a tie is inconclusive."""
    lrs = {m: 1e-4 for m in grids.METHODS}
    rs = [robust_rec("rkld", 1e-4, 5.0, (0.1, 0.34, 0.25), (0.21, 0.8, 0.2), (0.15, 0.9, 0.2)),  # keeps both
          robust_rec("ga", 1e-4, -3.0, (0.05, 0.9, 0.25), (0.8, 0.8, 0.2), (0.37, 0.9, 0.26)),  # loses both
          robust_rec("npo", 1e-4, 60.0, (0.01, 0.6, 0.25), (0.5, 0.5, 0.2), (0.1, 0.9, 0.2))]  # loses both
    v, lines, nums = results_report.claim_attack(rs, lrs, "relearn_attack/", "relearning")
    assert (v, nums) == ("reproduced", "2 of 3 methods do not keep their forgetting; attacked − unlearned forget Prob "
                                       "from +0.240 (RKLD) to +0.850 (GA)")
    assert "keep: RKLD;" in lines[1]
    v4, _, nums4 = results_report.claim_attack(rs, lrs, "quantize_attack/4bit/", "4-bit quantization")
    assert v4 == "reproduced" and nums4.startswith("2 of 3 methods do not keep their forgetting; attacked − unlearned "
                                                   "forget Prob from +0.160 (RKLD) to +0.750 (GA)")
    # a method already above the bar before the attack had nothing to bring back: left out of the count
    never = robust_rec("idk", 1e-4, -99.0, (0.9, 0.92, 0.25), (0.9, 0.9, 0.2), (0.9, 0.9, 0.2), prob=0.88)
    assert results_report.keeps_forgetting(never["last"], "relearn_attack/") == "had not forgotten"
    assert results_report.keeps_forgetting(never["last"], "quantize_attack/4bit/") == "had not forgotten"
    v, lines, nums = results_report.claim_attack(rs[:1] + [never], lrs, "quantize_attack/4bit/", "4-bit quantization")
    assert (v, nums.split(";")[0]) == ("not reproduced", "0 of 1 methods do not keep their forgetting") and ": IDK;" in lines[1]
    assert results_report.claim_attack(rs[:1], lrs, "relearn_attack/", "relearning")[0] == "not reproduced"
    assert results_report.claim_attack(rs[:2], lrs, "relearn_attack/", "relearning")[0] == "inconclusive"
    assert results_report.claim_attack([], lrs, "relearn_attack/", "relearning")[::2] == ("not run yet", "not run yet")


def test_robust_grid_tags_its_runs_and_counts_a_run_finished_only_with_its_attacks(tmp_path, monkeypatch):
    """Seed 42 at the chosen lr is also a sweep run's name: the robust runs are tagged, or --grid robust would take
    the sweep's records as done. A run stopped during its attacks (peak_epoch.json and eval/after written before
    them) is not finished; its record keeps the attacks' and privacy's summary keys."""
    records = [rec(m, lr, fq, 0.39) for m in ("ga", "npo") for lr, fq in zip(grids.SWEEP_LRS, (0.5, 0.3, 0.2))]
    items, waiting = reproduce.grid_items("robust", records)
    assert [i["name"] for i in items] == ["ga-lr0.0001-seed42-robust", "npo-lr0.0001-seed42-robust"]
    assert len(waiting) == len(grids.METHODS) - 2 and not {i["name"] for i in items} & {r["name"] for r in records}
    cmd = items[0]["command"]
    assert cmd[cmd.index("--quantize_attack") + 1] == "4bit,8bit" and cmd[cmd.index("--relearn_attack") + 1] == "true"
    # the robust table reads the last epoch: no per-epoch forget quality; the other grids keep their first-peak epoch
    assert cmd[cmd.index("--peak_epoch") + 1] == "false"
    sweep = reproduce.method_item("sweep", "ga", 1e-4, 42)["command"]
    assert sweep[sweep.index("--peak_epoch") + 1] == "true"
    monkeypatch.setattr(reproduce, "GRID_DIR", tmp_path)
    fake_run(tmp_path / items[0]["name"])
    (tmp_path / items[0]["name"] / "peak_epoch.json").unlink()  # --peak_epoch false: the run writes none
    assert not reproduce.finished(items[0])  # no attack numbers yet
    after = tmp_path / items[0]["name"] / "eval" / "after" / "summary.json"
    s = json.loads(after.read_text()) | {"relearn_attack/seconds": 9.0, "quantize_attack/4bit/seconds": 3.0,
                                         "relearn_attack/attacked/forget_prob": 0.3, "privleak": 12.5,
                                         "extraction_strength": 0.2, "mia_auc/min_k": 0.4}
    write(after, s)
    assert not reproduce.finished(items[0])  # 8 bit still missing
    write(after, s | {"quantize_attack/8bit/seconds": 2.0, "quantize_attack/8bit/retain/forget_prob": 0.2})
    assert reproduce.finished(items[0])
    robust = reproduce.collect(items[0], 5.0, 1)
    assert robust["name"] in reproduce.done_names([robust])  # recorded in full without a peak row
    last = robust["last"]
    assert last["relearn_attack/attacked/forget_prob"] == 0.3 and last["quantize_attack/8bit/retain/forget_prob"] == 0.2
    assert (last["privleak"], last["extraction_strength"], last["mia_auc/min_k"]) == (12.5, 0.2, 0.4)


def test_list_estimates_the_robust_grid_from_the_seeds_grid_until_a_robust_run_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "RESULTS", tmp_path / "results.json")
    items = [reproduce.method_item("robust", m, 1e-4, 42, grids.ROBUST_FLAGS, tag="robust") for m in ("ga", "npo")]
    reproduce.save_results([{"name": "ga-lr1e-05-seed1", "grid": "seeds", "method": "ga", "wall_s": 600.0, "jobs": 1}])
    assert reproduce.cost("robust", items, set()) == (
        "; the 2 runs left (2 forget01): about 20 min of this machine, from the recorded runs' median of 10.0 min a "
        "run per percent of TOFU forgotten (the seeds grid's runs: no robust run is recorded yet, so the attacks' own "
        "time is not in it)")
    reproduce.save_results([{"name": items[0]["name"], "grid": "robust", "method": "ga", "wall_s": 1500.0, "jobs": 1}])
    assert reproduce.cost("robust", items, {items[0]["name"]}).startswith("; the 1 runs left (1 forget01): about 25 min")


def test_robust_grid_commands_parse_with_the_attacks_on(monkeypatch):
    """Each robust run's command against its script's own parser: a renamed attack flag would otherwise fail only
    in the sitting that runs the grid."""
    import importlib
    from transformers import HfArgumentParser
    lo, mid, hi = sorted(grids.SWEEP_LRS)
    records = [rec(m, lr, fq, mu) for m in grids.METHODS for lr, fq, mu in ((hi, 0.9, 0.2), (mid, 0.5, 0.39), (lo, 0.1, 0.39))]
    items, waiting = reproduce.grid_items("robust", records)
    assert len(items) == len(grids.METHODS) and not waiting
    for it in items:
        args = HfArgumentParser(importlib.import_module(Path(it["command"][1]).stem).Args).parse_args_into_dataclasses(
            args=it["command"][2:])[0]
        assert args.relearn_attack is True and args.quantize_attack == "4bit,8bit" and args.seed == 42
        assert args.lr == mid and args.peak_epoch is False and args.split == "forget01"


def test_robust_grid_without_bitsandbytes_is_one_sentence_named_and_skipped_in_all(monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "robust_missing", lambda: "--quantize_attack needs the bitsandbytes package")
    monkeypatch.setattr(reproduce, "grid_items", lambda g, records: ([reproduce.method_item(g, "ga", 1e-4, 42)], []))
    monkeypatch.setattr(reproduce, "ensure_quick_models", lambda: None)
    ran = []
    monkeypatch.setattr(reproduce, "run_grid", lambda items, *a: ran.append(items[0]["grid"]))
    monkeypatch.setattr(reproduce, "done_names", lambda records: set())
    with pytest.raises(SystemExit, match="--grid robust: --quantize_attack needs the bitsandbytes package"):
        reproduce.main(["--grid", "robust"])
    assert ran == []
    import results_report
    monkeypatch.setattr(results_report, "main", lambda argv: ran.append("report"))
    reproduce.main([])
    assert ran == [*(g for g in grids.GRIDS if g != "robust"), "report"]
    assert "grid robust skipped: --quantize_attack needs" in capsys.readouterr().out
