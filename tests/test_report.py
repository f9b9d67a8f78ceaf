"""The study report from a study directory alone: the per-size trend table and figures."""

import json
import shutil
from pathlib import Path

import pandas as pd

from rayrl.report import write_report
from rayrl.scaling.synthetic import make_metrics, make_reuse_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_report_shows_every_sizes_own_trend(tmp_path):
    sizes = (0.5e9, 3e9, 14e9, 72e9)
    table = pd.concat(
        [
            make_metrics(sizes=sizes, seeds=2, points=12, seed=1),
            make_reuse_metrics(taus=(4, 16), N=3e9, points=12, seed=9),
        ],
        ignore_index=True,
    )
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    report = write_report(tmp_path).read_text()

    law = json.loads((tmp_path / "fit.json").read_text())["laws"]["compute"]
    assert law["n_models"] == len(sizes)
    for i, label in enumerate(law["labels"]):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2].startswith(f"{law['k_hat'][i]:.4g} ± ")
        assert float(cells[4]) == round(law["r2_size"][i], 3)
    proto = json.loads((tmp_path / "fit.json").read_text())["protocol"]
    assert f"k predicted {proto['k_pred']:.3g}, observed {proto['k_obs']:.3g}" in report
    # the reuse table holds the swept size only
    reuse = report.split("## Data reuse")[1].split("## Rollout")[0]
    assert "| 3,000,000,000 | 4 |" in reuse and "| 72,000,000,000 |" not in reuse
    for figure in ("fit_per_size_compute.png", "fit_data_per_size_data.png", "reuse.png"):
        assert f"]({figure})" in report and (tmp_path / figure).stat().st_size > 1000
