"""Ask a model held-out instructions (of kinds seen in training, never these ones) and show whether
each reply contains the expected answer. Used at the end of `make demo`.

    python scripts/heldout_check.py --model runs/demo/orpo/model --data data/sample/sft/heldout.jsonl
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.chat_format import as_messages, render  # noqa: E402
from minillm.generate import generate  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=10)
    args = p.parse_args()
    model, tok = Llama.from_pretrained(args.model), Tokenizer.from_pretrained(args.model)
    records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()][: args.limit]
    prompts = [render(as_messages({k: r[k] for k in ("instruction", "input", "output")})[:-1], tok,
                      add_generation_prompt=True)[0] for r in records]
    replies = [tok.decode(ids).strip() for ids in generate(model, prompts, max_new_tokens=32, eos_id=tok.eos_id)]
    hits = 0
    for r, reply in zip(records, replies):
        ok = r["answer"].lower() in reply.lower()
        hits += ok
        question = (r["instruction"] + " " + r["input"]).strip()
        print(f"{'OK ' if ok else '-- '} {question!r} -> {reply!r} (expected {r['answer']!r})")
    print(f"held-out instructions answered correctly: {hits}/{len(records)}")


if __name__ == "__main__":
    main()
