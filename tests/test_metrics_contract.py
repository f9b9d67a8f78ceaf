"""The metrics contract: one set of column names and types, axis keys and the projected end."""

import pytest

from rayrl.metrics import (
    AXES,
    HELD_OUT,
    REQUIRED,
    LawKey,
    MetricsError,
    MetricsLog,
    benchmark_column,
    check_row,
    column_type,
    projected_end,
    read_metrics,
    x_column,
)
from rayrl.scaling.synthetic import make_metrics


def row(**over):
    base = {
        "run_id": "r",
        "family": "base",
        "model": "m",
        "n_params": 100,
        "step": 2,
        "compute_flops": 1e9,
        "data_samples": 16,
        "unique_samples": 16,
        "rollout_n": 4,
        "reuse_factor": 1,
        "seed": 0,
        "test_loss": 0.5,
    }
    return {**base, **over}


def test_the_contract_holds_design_md_columns_with_types():
    design = (
        "run_id family model n_params step compute_flops data_samples unique_samples "
        "rollout_n reuse_factor seed test_loss"
    ).split()
    assert list(REQUIRED) == design
    assert column_type("n_params") is int and column_type("test_loss") is float
    assert column_type(benchmark_column("gsm8k")) is float
    assert benchmark_column(HELD_OUT) == "test_loss"  # the held-out set's loss is the law's
    assert column_type(benchmark_column("gsm8k") + "_se") is float
    assert column_type("time_gen") is float and column_type("whatever") is None
    assert AXES == {"compute": "compute_flops", "data": "data_samples"}
    assert x_column("data") == "data_samples"
    with pytest.raises(MetricsError, match="x must be one of"):
        x_column("tokens")
    assert LawKey("compute", "base") == ("compute", "base")


def test_projected_end_is_linear_in_steps():
    assert projected_end(5.0, 5, 20) == 20.0
    assert projected_end(0.0, 0, 20) == 0.0  # the baseline row projects nothing


def test_rows_are_checked_by_name_and_type(tmp_path):
    check_row(row(), "x")
    with pytest.raises(MetricsError, match=r"x: metric row lacks column\(s\) \['seed'\]"):
        check_row({k: v for k, v in row().items() if k != "seed"}, "x")
    with pytest.raises(MetricsError, match="column 'n_params' expected int, got 'big'"):
        check_row(row(n_params="big"), "x")
    with pytest.raises(MetricsError, match="column 'test_loss' expected float"):
        check_row(row(test_loss=True), "x")
    log = MetricsLog(tmp_path / "metrics.parquet")
    with pytest.raises(MetricsError, match="metrics.parquet: column 'step' expected int"):
        log.append(row(step=1.5))


@pytest.mark.parametrize("column", REQUIRED)
def test_a_metrics_file_without_a_required_column_names_file_and_column(tmp_path, column):
    path = tmp_path / "metrics.parquet"
    make_metrics(sizes=(1e9,), points=4).drop(columns=[column]).to_parquet(path)
    with pytest.raises(MetricsError, match=rf"{path}: missing column\(s\) \['{column}'\]"):
        read_metrics(path)
    with pytest.raises(MetricsError, match=rf"\['{column}'\]"):
        MetricsLog(path)


def test_a_numeric_column_of_strings_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    df = make_metrics(sizes=(1e9,), points=4)
    df["compute_flops"] = "lots"
    df.to_csv(path, index=False)
    with pytest.raises(MetricsError, match="column 'compute_flops' expected numbers"):
        read_metrics(path)


def test_readers_use_the_contract():
    """Trainer, fitter, scheduler, report and `rayrl fit` import the contract, and the axis
    mapping is written nowhere else."""
    import inspect

    import rayrl.scaling.document
    import rayrl.scaling.table
    import rayrl.study.fitter
    import rayrl.study.report
    import rayrl.study.scheduler
    import rayrl.study.tuner
    import rayrl.trainer

    for module in (
        rayrl.study.report,
        rayrl.scaling.document,
        rayrl.study.fitter,
        rayrl.study.scheduler,
        rayrl.scaling.table,
        rayrl.study.tuner,
        rayrl.trainer,
    ):
        source = inspect.getsource(module)
        assert "rayrl.metrics import" in source, module.__name__
        assert '"compute_flops" if' not in source and "X_COLUMNS" not in source, module.__name__


def test_the_design_document_lists_every_column_of_the_contract():
    """rayrl/DESIGN.md, which errors cite, names each column metrics.py defines."""
    from pathlib import Path

    from rayrl.metrics import COLUMNS, OPTIONAL

    doc = (Path(__file__).resolve().parents[1] / "rayrl" / "DESIGN.md").read_text()
    table = {line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ")}
    assert set(COLUMNS) <= table
    for name in OPTIONAL:
        assert f"`{name}`" in doc, name
