"""Ask a model held-out instructions (of kinds seen in training, never these ones) and show whether each
reply is right. Used at the end of `make demo`.

    python demo/heldout_check.py --model runs/demo/orpo/model --data data/sample/sft/heldout.jsonl

A reply is right when it contains the expected answer and names nobody (and nowhere) else: a person or
town of the sample world that the reply mentions must be in the expected output too, so "Jüri part on
sinine." does not answer "Mis värvi on Tarmo koer?" even though Tarmo's dog is blue.
"""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.chat_format import as_messages, render, resolve_template, stop_ids  # noqa: E402
from minillm.files import read_json_objects  # noqa: E402
from minillm.generate import generate  # noqa: E402
from minillm.hf import load_pretrained  # noqa: E402
from minillm.options import cli, parse_options, require_option  # noqa: E402
from minillm.tokenizer import load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from words import PEOPLE, TOWNS  # noqa: E402  (the sample world's lexicon)


@dataclass(kw_only=True)
class CheckOptions:
    model: str  # Hugging Face layout directory (an SFT or ORPO export)
    data: str  # held-out JSONL: Alpaca fields plus "answer"
    limit: int = 10  # first N records
    max_new_tokens: int = 32  # longest reply

    def check(self):
        require_option(self.limit >= 1, "limit", self.limit, "must be at least 1")


NAMES = [name for name, _ in PEOPLE] + list(TOWNS)  # inflected forms start with them: Kivila -> Kivilas


def names(text: str) -> set[str]:
    return {n for n in NAMES if re.search(rf"\b{re.escape(n)}", text)}


def is_right(reply: str, record: dict) -> bool:
    return record["answer"].lower() in reply.lower() and names(reply) <= names(record["output"])


@cli
def main(argv=None):
    args = parse_options(CheckOptions, argv, prog="python demo/heldout_check.py", description=__doc__)
    model, tok = load_pretrained(args.model), load_tokenizer(args.model)
    records = [r for _, r in read_json_objects(args.data)][: args.limit]
    template = resolve_template("auto", tok)  # the layout the export's chat template names
    prompts = [render(as_messages({k: r[k] for k in ("instruction", "input", "output")})[:-1], tok,
                      template=template, add_generation_prompt=True)[0] for r in records]
    replies = [tok.decode(ids).strip() for ids in
               generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_id=stop_ids(tok, template))]
    hits = 0
    for r, reply in zip(records, replies):
        ok = is_right(reply, r)
        hits += ok
        question = (r["instruction"] + " " + r["input"]).strip()
        print(f"{'OK ' if ok else '-- '} {question!r} -> {reply!r} (expected {r['output']!r})")
    print(f"held-out instructions answered correctly: {hits}/{len(records)}")


if __name__ == "__main__":
    main()
