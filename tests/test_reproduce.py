"""scripts/reproduce.py end to end on its tiniest setting (--size tiny --quick): every stage runs as the real
CLIs, the report has a table per claim and its PNGs are images; --report-only rebuilds the same tables; a
failing stage stops everything with one line.

Run: .venv/bin/python -m pytest -q tests/test_reproduce.py   (CPU, 1.5-3 minutes: about 35 subprocesses)
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ["1. Continual-pretraining budget", "2. Translation-task instructions", "3. English share",
          "4. SFT vs SFT + ORPO", "5. ORPO vs DPO vs KTO", "6. Chat vector"]
VARIANTS = {1: ["CPT 0%", "CPT 25%", "CPT 50%", "CPT 100%"],
            2: ["CPT 0%, SFT", "CPT 0%, TRTASK + SFT", "CPT 100%, SFT", "CPT 100%, TRTASK + SFT"],
            3: ["base (English only)", "CPT 100%, 0% English", "CPT 100%, 25% English"], 4: ["SFT", "SFT + ORPO"],
            5: ["SFT", "SFT + ORPO", "SFT + DPO", "SFT + KTO"],
            6: ["CPT 100%", "CPT 100% + chat vector", "CPT 100% + SFT"]}
KEYS = ["cpt_budget", "translation", "english_share", "orpo", "objectives", "chat_vector"]


def reproduce(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--size", "tiny", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)


def sections(report: str) -> dict:
    """{claim number: its section's text}."""
    parts = report.split("\n## ")[1:]
    return {int(p.split(".")[0]): p for p in parts}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "r"
    proc = reproduce("--quick", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_report_has_every_table_and_plot(quick):
    import matplotlib.image

    out, proc = quick
    assert proc.stdout.strip().splitlines()[-1].startswith(f"report: {out / 'report.md'}")
    report = (out / "report.md").read_text()
    assert "Seeds: 1 " in report and "--quick --size tiny" in report
    found = sections(report)
    assert [found[i].split("\n")[0] for i in range(1, 7)] == [c + t for c, t in zip(CLAIMS, [
        ", then the identical SFT", ", without and after continual pretraining", " of the continual-pretraining mixture",
        "", " on identical preference data", ": CPT + (instruct - base) without target-language instructions"])]
    for number, text in found.items():
        if number not in VARIANTS:
            continue
        table = [line for line in text.splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert header == ["metric", *VARIANTS[number], "difference", "sign reproduced"]
        rows = table[2:]
        assert len(rows) >= 3 and all(len(r.strip("|").split("|")) == len(header) for r in rows)
        for row in rows:  # one seed: plain numbers, a verdict in the last column
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert all(c == "-" or float(c) == float(c) for c in cells[1:len(VARIANTS[number]) + 1]), row
            assert cells[-1].startswith(("yes", "no", "helps at 0%", "(no claim)", "ORPO: ")), row
            if number == 5 and "(no claim)" not in cells[-1]:  # each objective's own verdict
                assert [v.split(":")[0] for v in cells[-1].split("; ")] == ["ORPO", "DPO", "KTO"], row
        assert text.split("\n")[2].startswith("> ")  # the paper's claim beside the table
        png = out / "plots" / f"{number}_{KEYS[number - 1]}.png"
        assert f"](plots/{png.name})" in text
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # a real image
    training = (out / "training/report.md").read_text()
    assert "| seed1/cpt |" in training and "| base |" in training
    pngs = list((out / "training").glob("*.png"))
    assert len(pngs) >= 20 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["total_s"] > 0 and "seed1_orpo" in timings and "eval_seed1_sft_tr100" in timings
    # every variant was evaluated: results.json with headline rows for what its table shows
    for name in ["base", "seed1_cpt25", "seed1_cpt100_en0", "seed1_sft0", "seed1_sft_tr100", "seed1_orpo", "seed1_dpo",
                 "seed1_kto", "seed1_chatvec", "seed1_cpt100_chat"]:
        rows = json.loads((out / "eval" / name / "results.json").read_text())["results"]
        assert rows and not [r for r in rows if "error" in r], name


@pytest.mark.slow
def test_report_only_and_resume_rebuild_the_same_tables(quick):
    out, _ = quick
    before = (out / "report.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    proc = reproduce("--quick", "--out", out, "--report-only")
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_text() == before
    # --resume: every stage finished with the same command, so none runs again; the time stays the first run's
    (out / "logs/seed1_orpo.done").write_text("[\"another command\"]")
    proc = reproduce("--quick", "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    ran = [line for line in proc.stdout.splitlines()[:-1] if "(done before)" not in line]
    assert len(ran) == 1 and "] seed1_orpo (" in ran[0], ran
    again = json.loads((out / "timings.json").read_text())
    assert again.keys() == timings.keys() and abs(again["total_s"] - timings["total_s"]) < 0.3 * timings["total_s"]
    assert (out / "report.md").read_text().split("\n## ", 1)[1] == before.split("\n## ", 1)[1]


def test_a_failing_stage_stops_with_one_line(tmp_path):
    (tmp_path / "world").write_text("a file where the sample world's directory should go")
    proc = reproduce("--quick", "--out", tmp_path)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stage world failed (exit status 1): error: --out ")
    assert f"(log: {tmp_path / 'logs/world.log'})" in err[0]
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "tokenizer").exists()
