"""bench/gpu_check.py, its CPU-safe parts: arguments, the MFU arithmetic, the card's peak, the table, a
dry run of one method for one step in this process, and a failed run turned into exit status 1."""
import pytest

import gpu_check  # bench/ is on the path (tests/conftest.py)


def test_mfu_by_hand():
    # 6 N per trained token + 2 N per frozen forward token, against seconds x peak:
    # N = 1e9, 1,000 trained and 2,000 frozen tokens in 0.5 s on a 100 TFLOP/s card:
    # (6e12 + 4e12) / (0.5 x 1e14) = 0.2
    assert gpu_check.mfu(10 ** 9, 1000, 2000, 0.5, 100.0) == pytest.approx(0.2)
    assert gpu_check.mfu(10 ** 9, 1000, 0, 1.0, 989.0) == pytest.approx(6e12 / 989e12)
    assert gpu_check.mfu(10 ** 9, 1000, 0, 1.0, None) is None


def test_peak_from_the_device_name_or_the_flag():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("cpu") is None
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", 500.0) == 500.0


def test_arguments_are_checked():
    a = gpu_check.parse([])
    assert a.backends.split(",") == list(gpu_check.BACKENDS) and a.steps == 3 and a.model == "smollm2-135m"
    for bad in (["--backends", "tpu"], ["--methods", "nope"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse(bad)


def test_table_has_one_row_per_run():
    rows = [{"backend": "single", "method": "rkld", "status": "ok", "step_s": 0.1234, "tok_s": 12345.6, "mfu": 0.0512,
             "peak_gib": 3.21, "logits": {"Llama frozen": "float32"}, "eval_s": None},
            {"backend": "zero3", "method": "-", "status": "skipped: deepspeed does not import", "logits": {}}]
    lines = gpu_check.table(rows).splitlines()
    assert lines[0].startswith("| backend | method | status | step s | tokens/s | MFU | peak GiB")
    assert lines[2] == "| single | rkld | ok | 0.123 | 12,346 | 5.1% | 3.21 | Llama frozen float32 | - |"
    assert lines[3].startswith("| zero3 | - | skipped: deepspeed does not import | - |")


def test_dry_run_of_one_method_and_a_failure_exits_1(tiny_model_dir, tmp_path, capsys):
    # Catches: a measuring wrapper that breaks the script's fit() or main(), and a failure that exits 0.
    assert gpu_check.main(["--dry_run", "--model", str(tiny_model_dir), "--methods", "npo_kl", "--steps", "1",
                           "--out", str(tmp_path / "t.md")]) == 0
    row = (tmp_path / "t.md").read_text().splitlines()[2].split(" | ")
    assert row[:3] == ["| dry_run", "npo_kl", "ok"] and float(row[3]) > 0 and "Llama frozen float32" in row[7]
    assert gpu_check.main(["--dry_run", "--model", str(tmp_path / "missing"), "--methods", "ga_gd", "--steps", "1"]) == 1
    assert "| dry_run | ga_gd | FAILED |" in capsys.readouterr().out
