"""The benchmark keeps working on the CPU at tiny size (no speed assertions: CPU numbers mean
nothing here); it checks that graph and hand-written models compute the same loss."""
from __future__ import annotations

from search import bench, bench_models


def test_bench_runs_at_tiny_size_and_reports_both_models(capsys):
    assert bench.main(["--steps", "5", "--models", "gpt2,llama"]) == 0
    out = capsys.readouterr().out
    for row in ("| gpt2 hand-written | 2 |", "| gpt2 graph (none) | 2 |", "| llama hand-written | 2 |",
                "| llama graph (none) | 2 |"):
        assert row in out


def test_hand_written_references_load_the_graph_weights_and_agree():
    import torch
    for name in ("gpt2", "llama"):
        plan, gm = bench_models.graph_model(name, "tiny", "cpu")
        ref = bench_models.reference_model(name, plan, "cpu")
        from bench.reference import load_from_graph
        load_from_graph(ref, gm)
        idx = torch.randint(0, 50257, (2, plan.seq_len))
        torch.testing.assert_close(gm(idx)[0], ref(idx)[0])                    # the logits
        torch.testing.assert_close(gm(idx, idx)[1], ref(idx, idx)[1])          # the (fused) loss


def test_a_graph_is_timed_against_the_chosen_baseline_without_twins(capsys):
    assert bench.main(["--steps", "5", "--models", "llama,ngpt", "--baseline", "llama", "--no-twins"]) == 0
    out = capsys.readouterr().out
    assert "step time vs llama graph" in out and "| llama hand-written" not in out
    row = next(line for line in out.splitlines() if line.startswith("| ngpt graph (none) | 2 |"))
    assert row.split("|")[6].strip() not in ("-×", "")          # a ratio to the llama graph


def test_op_benchmark_times_every_backend_op_and_writes_its_table(capsys, tmp_path):
    from blocks import twins
    from search import bench_ops
    out_file = tmp_path / "b.md"
    assert bench_ops.main(["--reps", "1", "--write", str(out_file)]) == 0
    out = capsys.readouterr().out
    ops = {op for op in twins.TWINS if not op.startswith("mhc")}
    for op in ops:   # every op a block can put on Liger, with both twin timings
        row = next(line for line in out.splitlines() if line.startswith(f"| {op} |"))
        eager, compiled = (float(v) for v in row.split("|")[3:5])
        assert eager > 0 and compiled > 0 and row.rstrip().endswith("| torch |")   # no Liger on CPU
    assert out_file.read_text().strip() == out.strip()
