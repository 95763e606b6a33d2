"""benchmark.py on CPU with tiny models and one repeat: rows, JSON fields, ratios and memory columns.

No timing is asserted (speed is measured by benchmark.py itself, never by tests).
"""
import importlib.util
import json

import pytest
import torch

import benchmark

FIELDS = {"model", "img_s", "ratio_to_reference", "peak_mem_gib", "mode", "batch", "img_size", "device", "gpu_name",
          "dtype", "backend", "compiled", "torch", "timm", "mamba_ssm", "warmup_s", "level", "date"}
HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


def run(tmp_path, *argv):
    path = tmp_path / "bench.jsonl"
    rows = benchmark.main(["--quick", "--json", str(path), *argv])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))  # one JSON line per printed row
    return lines


def test_model_level_rows_fields_and_ratio_to_the_reference(tmp_path, capsys):
    lines = run(tmp_path, "--mode", "both", "--model", "adventurer_tiny_patch16,arm_base_pz16")
    assert [(r["model"], r["mode"]) for r in lines] == [
        (m, mode) for mode in ("train", "infer")
        for m in ("deit_tiny_patch16_224", "adventurer_tiny_patch16", "arm_base_pz16")]
    for row in lines:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert not row.get("skipped") and row["img_s"] > 0 and row["warmup_s"] >= 0
        assert (row["device"], row["dtype"], row["batch"], row["img_size"], row["compiled"]) == (
            "cpu", "float32", 2, 32, False)
        assert row["torch"] == torch.__version__ and row["peak_mem_gib"] is None  # CPU memory needs --rss
        reference = next(r for r in lines if r["model"] == "deit_tiny_patch16_224" and r["mode"] == row["mode"])
        assert row["ratio_to_reference"] == pytest.approx(row["img_s"] / reference["img_s"])
        assert row["backend"] == ("-" if row is reference else "torch")
    table = capsys.readouterr().out
    assert "ratio" in table and "adventurer_tiny_patch16" in table


def test_default_reference_is_the_deit_of_the_same_width(tmp_path):
    lines = run(tmp_path, "--mode", "infer", "--model", "adventurer_tiny_patch16", "--model-kwargs", "embed_dim=192",
                "--reference", "")
    assert [r["model"] for r in lines] == ["deit_tiny_patch16_224", "adventurer_tiny_patch16"]
    assert lines[1]["reference"] == "deit_tiny_patch16_224" and lines[1]["ratio_to_reference"] is not None


def test_rss_rows_run_in_fresh_processes_and_report_memory_per_image(tmp_path):
    lines = run(tmp_path, "--rss", "--mode", "train", "--batch-size", "4", "--model", "adventurer_tiny_patch16")
    assert [r["model"] for r in lines] == ["deit_tiny_patch16_224", "adventurer_tiny_patch16"]
    for row in lines:
        assert not row.get("skipped") and row["peak_mem_gib"] > 0 and row["mem_per_img_mib"] > 0


def test_mixer_level_keeps_the_three_mixers(tmp_path):
    lines = run(tmp_path, "--level", "mixer", "--mode", "train")
    assert [(r["model"], r["seq_len"]) for r in lines] == [("Mamba2", 6), ("Mamba1", 4), ("Mamba1-v3", 5)]
    assert all(r["img_s"] > 0 and r["ratio_to_reference"] is None for r in lines)


def test_scan_level_pairs_each_scan_with_the_mamba_ssm_reference(tmp_path):
    lines = run(tmp_path, "--level", "scan", "--mode", "train", "--img-size", "64")
    rows = {r["model"]: r for r in lines}
    for ours, refs in benchmark.SCANS.items():
        assert rows[ours]["img_s"] > 0
        for ref in refs:
            if HAS_MAMBA_SSM:
                assert rows[ref]["img_s"] > 0
            else:
                assert rows[ref]["skipped"] == "mamba-ssm is not installed"
        expected = rows[ours]["img_s"] / rows[refs[0]]["img_s"] if HAS_MAMBA_SSM else None
        assert rows[ours]["ratio_to_reference"] == pytest.approx(expected)


@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="mamba-ssm is not installed (its reference functions are timed)")
@pytest.mark.parametrize("ours", list(benchmark.SCANS))
def test_scan_rows_time_the_same_function_as_their_references(ours):
    """The references get padded / rearranged inputs: they must still compute what our scan computes."""
    args = benchmark.get_args_parser().parse_args(["--dim", "64"])
    outputs = []
    for name in (ours, *benchmark.SCANS[ours]):
        case = benchmark.Case("scan", name, "torch", "infer", seq_len=300)
        fn, make_inputs = benchmark.scan_workload(case, args, torch.device("cpu"))
        outputs.append(fn(*make_inputs(2))[:, :300] if name.startswith("mamba_ssm:ssd") else fn(*make_inputs(2)))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "not a timm model name"),
    (["--device", "cuda"], "torch.cuda.is_available() is False"),
    (["--batch-size", "0"], "must be >= 1"),
    (["--ssm-backend", "mamba_ssm"], "--ssm-backend mamba_ssm: SSM backend 'mamba_ssm' cannot run"),
])
def test_bad_input_is_one_clear_line(argv, message):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        benchmark.main(["--quick", *argv])
