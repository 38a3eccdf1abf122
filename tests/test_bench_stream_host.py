"""benchmarks/bench_stream_host.py runs both runners and reports each (no timing is asserted)."""
import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stream_host.py"


@pytest.mark.slow
def test_host_benchmark_reports_both_runners(capsys):
    spec = importlib.util.spec_from_file_location("bench_stream_host", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--layers", "1", "--frames", "7", "--chunks-per-step", "2", "--calls", "2"])
    assert set(rows) == {"invariants captured", "invariants op by op"}
    assert all(lo > 0 and med >= lo for lo, med in rows.values())
    assert "weight_addresses" in capsys.readouterr().out
