"""`jaxalign plot`: a run's metrics.jsonl to a PNG, all metrics or a chosen few."""

import json

import pytest

from jaxalign.cli import main
from jaxalign.errors import JaxalignError
from jaxalign.plot import plot_run


def _run_dir(tmp_path):
    records = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "loss": 2.0, "kl": 0.0},
               {"step": 2, "loss": 1.5, "kl": 0.2}, {"step": 2, "eval/accuracy": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(tmp_path)


def test_plot_chosen_metrics_and_name_the_missing(tmp_path):
    run = _run_dir(tmp_path)
    out = plot_run(run, str(tmp_path / "few.png"), ["eval/accuracy", "kl"])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(JaxalignError, match=r"has no eval/acc; logged: kl, loss, eval/accuracy"):
        plot_run(run, str(tmp_path / "x.png"), ["eval/acc"])
    assert not (tmp_path / "x.png").exists()


def test_plot_cli(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["plot", run, "--metrics", "loss,eval/accuracy"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
