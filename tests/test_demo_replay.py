"""demo/pretrain_as_sft.py: pretraining documents as 'continue the text' SFT records (the demo's replay)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

from pretrain_as_sft import as_record  # noqa: E402

from minillm.sft_data import load_sft_jsonl  # noqa: E402


def test_first_sentence_is_the_prompt_the_rest_the_reply():
    r = as_record("Kati elab Järvelas. Kati on juuksur. Katil on part.", "et")
    assert r["messages"] == [{"role": "user", "content": "Jätka teksti.\n\nKati elab Järvelas."},
                             {"role": "assistant", "content": "Kati on juuksur. Katil on part."}]
    assert as_record("Mari lives in Kivila. Mari is a cook.", "en")["messages"][0]["content"] == \
        "Continue the text.\n\nMari lives in Kivila."


def test_dates_and_decimal_commas_do_not_end_a_sentence():
    r = as_record("Täna on 12. märts 2024. Sibul maksab 2,00 eurot.", "et")
    assert r["messages"][0]["content"].endswith("Täna on 12. märts 2024.")
    assert r["messages"][1]["content"] == "Sibul maksab 2,00 eurot."


def test_one_sentence_documents_are_skipped():
    assert as_record("Koer ajas kassi taga.", "et") is None


def test_cli_writes_valid_sft_records(tmp_path):
    docs = [{"text": f"Mari elab Kivilas. Maril on {n} kassi."} for n in ("kaks", "kolm", "neli")] + [{"text": "Tere."}]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "demo" / "pretrain_as_sft.py"), "--input", str(src), "--lang", "et",
                           "--limit", "2", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = load_sft_jsonl(out)  # what train_sft.py reads
    assert len(records) == 2 and all(r["messages"][1]["role"] == "assistant" for r in records)
