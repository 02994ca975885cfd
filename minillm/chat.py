"""Talk to a model in the terminal: multi-turn history, streamed output, the sampling options of
minillm.generate. Prompts are built by minillm.chat_format.render — the function SFT trained with — in the
layout the model's chat template names (or whose markers its tokenizer has); a reply ends at any end id the
model declares or any marker of the layout.

    python -m minillm.chat --model runs/demo/sft/model
    python -m minillm.chat --model runs/demo/orpo/model --temperature 0.6 --top-p 0.9 --repetition-penalty 1.2
    echo "Translate to Estonian: the red cat" | python -m minillm.chat --model DIR   # one turn, then exit

At the prompt: /reset clears the history, /quit (or Ctrl-D) leaves, and a line of three double quotes
starts a message of several lines (a paste), which another such line ends.

The defaults are the sampling settings of the LLAMMAS paper (top-p 0.9, temperature 0.6,
repetition penalty 1.2); --temperature 0 is greedy.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from minillm.chat_format import render, resolve_template, stop_ids
from minillm.generate import check_sampling, generate
from minillm.hf import load_pretrained
from minillm.options import cli, parse_options, require_option
from minillm.sft_data import truncate_example
from minillm.tokenizer import load_tokenizer


@dataclass(kw_only=True)
class ChatOptions:
    model: str  # Hugging Face layout directory (a minillm export, with its tokenizer and chat template)
    system: str = ""  # an optional system message before the conversation
    max_new_tokens: int = 256  # longest reply, in tokens (capped by the context the conversation leaves)
    temperature: float = 0.6  # sampling temperature; 0 = greedy
    top_p: float = 0.9  # nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]
    top_k: int = 0  # keep only the k most likely tokens; 0 = all
    repetition_penalty: float = 1.2  # > 1 makes tokens already in the conversation less likely (CTRL)
    seed: int = 0  # sampling seed

    def check(self):
        require_option(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be at least 1")
        check_sampling(self)


MIN_REPLY_TOKENS = 32  # a conversation is cut to leave at least this much room for the reply


def fit_context(messages: list[dict], tokenizer, max_seq_len: int, max_new_tokens: int, template: str = "auto"
                ) -> tuple[list[int], int, int]:
    """(prompt ids, reply budget, turns dropped): the conversation's inference prompt, its oldest
    user/assistant turns dropped (a system message kept) until the reply has room, and the reply budget
    capped by the context left. A single turn too long for the context keeps its end."""
    want = min(max_new_tokens, MIN_REPLY_TOKENS, max_seq_len // 2)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system):], 0
    prompt, _ = render(system + turns, tokenizer, template=template, add_generation_prompt=True)
    while len(prompt) > max_seq_len - want and len(turns) > 1:
        turns, dropped = turns[2:], dropped + 1
        prompt, _ = render(system + turns, tokenizer, template=template, add_generation_prompt=True)
    if len(prompt) > max_seq_len - want:
        prompt = truncate_example(prompt, prompt, max_seq_len - want, "left", tokenizer.bos_id)[0]
    return prompt, min(max_new_tokens, max_seq_len - len(prompt)), dropped


def reply(model, tokenizer, messages, args, template: str, out=sys.stdout, prefix: str = "") -> tuple[str, int]:
    """Generate the assistant's next turn for `messages` in chat_format's `template`, streaming its text to
    `out` after `prefix` (written with the first token, so that whatever the first forward pass prints comes
    before it); returns (the text, how many old turns had to be left out). The reply is capped by the context
    the conversation leaves."""
    prompt, budget, dropped = fit_context(messages, tokenizer, model.config.max_seq_len, args.max_new_tokens,
                                          template)
    printed = ""
    tokens: list[int] = []

    def stream(row, token):
        nonlocal printed
        if not tokens:
            out.write(prefix)
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text

    new = generate(model, [prompt], max_new_tokens=budget, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_id=stop_ids(tokenizer, template), tokenizer=tokenizer, seed=args.seed, stream=stream)[0]
    text = tokenizer.decode(new)
    if not tokens:  # nothing was generated (the model ended at once)
        out.write(prefix)
    if text.startswith(printed):  # what the stream held back (an unfinished character)
        out.write(text[len(printed):])
    out.write("\n")
    return text.strip(), dropped


MULTILINE = '"""'  # a line of its own that starts and ends a message of several lines


def read_message(interactive: bool) -> str | None:
    """The user's next message: one line, or the lines between two MULTILINE lines; None at the end of input."""
    line = input("you> ") if interactive else sys.stdin.readline()
    if not interactive and not line:
        return None
    if line.strip() != MULTILINE:
        return line
    lines = []
    while True:
        line = input("... ") if interactive else sys.stdin.readline()
        if (not interactive and not line) or line.strip() == MULTILINE:
            return "\n".join(lines)
        lines.append(line.rstrip("\n"))


@cli
def main(argv=None):
    args = parse_options(ChatOptions, argv, prog="python -m minillm.chat",
                         description="\n\n".join(__doc__.split("\n\n")[:3:2]))  # what it is, and the commands
    model = load_pretrained(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    template = resolve_template("auto", tokenizer)
    interactive = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 is read with U+FFFD, and said so below
    messages = [{"role": "system", "content": args.system}] if args.system else []
    said_dropping = False
    if interactive:
        print(f"{args.model}: {model.config.family} model, chat layout '{template}', context {model.config.max_seq_len} "
              f"tokens. /reset clears the history, /quit leaves, a line \"\"\" starts and ends a message of "
              "several lines.")
    while True:
        try:
            user = read_message(interactive)
        except (EOFError, KeyboardInterrupt):
            break
        if user is None:
            break
        user = user.strip()
        if user in ("/quit", "/exit"):
            break
        if user == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user:
            continue
        if "\ufffd" in user:
            print("(that line was not valid UTF-8: its undecodable bytes became \ufffd)", file=sys.stderr)
        messages.append({"role": "user", "content": user})
        text, dropped = reply(model, tokenizer, messages, args, template, prefix="model> " if interactive else "")
        if dropped and not said_dropping:
            print(f"(the conversation outgrew the model's context of {model.config.max_seq_len} tokens: its oldest "
                  "turns are left out of the prompt from now on)", file=sys.stderr)
            said_dropping = True
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
