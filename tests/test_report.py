"""minillm.report: the page and its charts from metrics.jsonl files (with matplotlib, and text only without it),
bar charts with error bars, bad input.

Run: .venv/bin/python -m pytest -q tests/test_report.py   (CPU, seconds)

Oracles: the summary numbers recomputed from the records written here; the PNGs read back with matplotlib
(size, not blank, the colours of their lines); the text-only page with matplotlib hidden from imports.
"""
import json
import math
import statistics
import sys

import pytest

from minillm import report


def write_run(directory, records):
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture
def runs(tmp_path):
    """A pretraining-like run (per-language validation) and an ORPO-like one (a step-0 validation record)."""
    pretrain = [{"step": s, "loss": 8.0 / s, "lr": 1e-3 * min(1, s / 5), "tokens_per_s": 1000.0 + 10 * s,
                 "grad_norm": None if s == 1 else 1.0 / s} for s in range(1, 41)]
    for r in pretrain:
        if r["step"] % 10 == 0:
            r.update(val_loss=9.0 / r["step"] + 0.1, val_loss_et=8.0 / r["step"], val_loss_en=10.0 / r["step"])
    pretrain[19]["best"] = True
    orpo = [{"step": 0, "val_loss": 2.0, "val_reward_accuracy": 0.6}]
    orpo += [{"step": s, "loss": 2.0 - s / 20, "lr": 2e-4, "tokens_per_s": 500.0, "reward_accuracy": 0.5 + s / 40}
             for s in range(1, 11)]
    orpo[-1].update(val_loss=1.5, val_reward_accuracy=0.8)
    return (write_run(tmp_path / "runs/pretrain", pretrain), pretrain), (write_run(tmp_path / "runs/orpo", orpo), orpo)


def test_summary_numbers(runs):
    (_, pretrain), (_, orpo) = runs
    s = report.run_summary(pretrain)
    vals = [(r["step"], r["val_loss"]) for r in pretrain if "val_loss" in r]
    best_step, best = min(vals, key=lambda x: x[1])
    assert (s["steps"], s["loss"], s["best_val_loss"], s["best_val_step"]) == (40, 8.0 / 40, best, best_step)
    assert s["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in pretrain)
    assert s["val_loss_by_language"] == {"en": 10.0 / 40, "et": 8.0 / 40}
    assert report.series(pretrain, "grad_norm")[0] == list(range(2, 41))  # None is no point
    o = report.run_summary(orpo)
    assert (o["steps"], o["best_val_loss"], o["best_val_step"], o["val_loss_by_language"]) == (10, 1.5, 10, {})


def test_each_kind_of_loss_is_its_own_panel(runs):
    """Pretraining, SFT, ORPO and DPO losses are defined differently: each kind gets a panel of its own."""
    (_, pretrain), (_, orpo) = runs
    sft = [{"step": 1, "stage": 1, "loss": 2.0}]
    dpo = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0}]
    assert [report.loss_kind(r) for r in (pretrain, sft, orpo, dpo)] == [
        "pretraining: NLL per token", "SFT: NLL per response token", "pretraining: NLL per token",
        "DPO / IPO / KTO loss"]
    orpo_with_terms = [{**r, "or_loss": 0.7} for r in orpo]
    assert report.loss_kind(orpo_with_terms) == "ORPO: NLL + lambda L_OR"


def read_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return matplotlib.image.imread(path)


def test_page_and_charts(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (pretrain_dir, _), (orpo_dir, _) = runs
    out = tmp_path / "page"
    page = report.main([str(pretrain_dir), str(orpo_dir), "--out", str(out)])  # run dirs without a flag
    assert page == out / "report.md" and capsys.readouterr().out.strip() == f"report: {page}"
    text = page.read_text()
    assert "| pretrain | 40 | 0.2000 | 0.3250 (40) | 1205 | en 0.2500, et 0.2000 |" in text
    assert "| orpo | 10 | 1.5000 | 1.5000 (10) | 500 | - |" in text
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"all_runs_loss.png", "pretrain_loss.png", "pretrain_val_loss_by_language.png", "pretrain_lr.png",
                    "pretrain_tokens_per_s.png", "orpo_loss.png", "orpo_lr.png", "orpo_tokens_per_s.png",
                    "orpo_reward_accuracy.png"}  # no per-language chart for a run without per-language losses
    for name in pngs:
        assert f"]({name})" in text
        image = read_png(out / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 600
        assert image[..., :3].std() > 0.05  # not blank
    # the per-language chart holds two lines in matplotlib's first two colours (C0 blue, C1 orange)
    image = read_png(out / "pretrain_val_loss_by_language.png")[..., :3]
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05)):
        assert (abs(image - colour).max(axis=-1) < 0.08).sum() > 50, colour
    # one run: the page goes to RUN_DIR/report by default
    assert report.main(["--runs", str(pretrain_dir)]) == pretrain_dir / "report/report.md"


def test_text_only_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec and import fail
    assert not report.plots_available()
    (pretrain_dir, _), (orpo_dir, _) = runs
    page = report.main([str(pretrain_dir), str(orpo_dir), "--out", str(tmp_path / "text")])
    text = page.read_text()
    assert "| pretrain | 40 |" in text and "pip install 'minillm[report]'" in text and "![" not in text
    assert not list((tmp_path / "text").glob("*.png"))
    assert "text only" in capsys.readouterr().out
    assert report.bar_chart(tmp_path / "bars.png", "t", [("p", ["a"], [1.0], [0.1])]) is False


def test_bar_chart_with_error_bars(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bars.png"
    panels = [("acc (higher is better)", ["CPT 0%", "CPT 100%"], [0.25, 0.75], [0.05, 0.1]),
              ("bits/byte", ["CPT 0%", "CPT 100%"], [2.0, math.nan], [0.1, math.nan])]  # a missing value
    assert report.bar_chart(path, "budget", panels)
    image = read_png(path)[..., :3]
    assert image.shape[1] >= 1000  # two panels side by side
    assert (abs(image - (0.12, 0.47, 0.71)).max(axis=-1) < 0.15).sum() > 500  # the first bar, in C0


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in (([str(tmp_path / "empty")], "no metrics.jsonl"), ([], "give at least one run directory")):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    write_run(tmp_path / "bad", [{"step": 1, "loss": 1.0}])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        report.read_metrics(tmp_path / "bad")
