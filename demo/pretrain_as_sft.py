"""Turn pretraining documents into SFT records that carry no task: the first sentence is the prompt
("Jätka teksti." / "Continue the text." and the sentence), the rest of the document is the reply.

    python demo/pretrain_as_sft.py --input data/sample/pretrain/et/train.jsonl --lang et --limit 600 \\
        --out runs/demo/sft_data/replay_et.jsonl

`make demo` mixes a few hundred of these into instruction tuning (replay): the sample world's instructions
state facts about the world's people in their input, with other values than the pretraining text tells
(reading comprehension), and train the reply to repeat them; without some of the pretraining text beside
them, the SFT model forgets what it learnt in pretraining. Documents of one sentence are skipped.
Records are chat {"messages": [...]}, so the loss covers the reply only, as for every other SFT record.
"""
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.files import read_json_objects, write_jsonl  # noqa: E402
from minillm.options import cli, parse_options, require_option  # noqa: E402

PROMPTS = {"et": "Jätka teksti.", "en": "Continue the text."}
# A sentence ends at . ! or ? before a capital letter: "12. märts" and "1,50 eurot" stay whole.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÕÄÖÜŠŽ])")


@dataclass(kw_only=True)
class ReplayOptions:
    input: str  # pretraining JSONL ({"text": ...} per line)
    lang: Literal["et", "en"]  # language of the prompt
    out: str  # SFT JSONL written (chat records)
    limit: int = 0  # at most this many records, drawn at random (0 = all)
    seed: int = 0  # seed of the draw

    def check(self):
        require_option(self.limit >= 0, "limit", self.limit, "must be >= 0 (0 = all)")


def as_record(text: str, lang: str) -> dict | None:
    sentences = SENTENCE_END.split(text.strip())
    if len(sentences) < 2:
        return None
    return {"messages": [{"role": "user", "content": f"{PROMPTS[lang]}\n\n{sentences[0]}"},
                         {"role": "assistant", "content": " ".join(sentences[1:])}]}


@cli
def main(argv=None):
    args = parse_options(ReplayOptions, argv, prog="python demo/pretrain_as_sft.py", description=__doc__)
    records = [r for r in (as_record(doc["text"], args.lang) for _, doc in read_json_objects(args.input)) if r]
    if args.limit and len(records) > args.limit:
        records = random.Random(args.seed).sample(records, args.limit)
    write_jsonl(args.out, records)
    print(f"{args.input}: {len(records)} documents as SFT records -> {args.out}")


if __name__ == "__main__":
    main()
