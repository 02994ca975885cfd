"""Talk to a model in the terminal: multi-turn history, streamed output, the sampling options of
minillm.generate. Prompts are built by minillm.chat_format.render — the function SFT trained with.

    python -m minillm.chat --model runs/demo/sft/model
    python -m minillm.chat --model runs/demo/orpo/model --temperature 0.6 --top-p 0.9 --repetition-penalty 1.2
    echo "Translate to Estonian: the red cat" | python -m minillm.chat --model DIR   # one turn, then exit

Commands at the prompt: /reset clears the history, /quit (or Ctrl-D) leaves.
The defaults are the sampling settings of the LLAMMAS paper (top-p 0.9, temperature 0.6,
repetition penalty 1.2); --temperature 0 is greedy.
"""
from __future__ import annotations

import argparse
import sys

import torch

from minillm.chat_format import render
from minillm.generate import generate
from minillm.model import Llama
from minillm.tokenizer import Tokenizer


def reply(model, tokenizer, messages, args, out=sys.stdout) -> str:
    """Generate the assistant's next turn for `messages`, streaming its text to `out`."""
    prompt, _ = render(messages, tokenizer, fmt="chat", add_generation_prompt=True)
    prompt = list(prompt)
    room = model.config.max_seq_len - args.max_new_tokens
    if len(prompt) > room:  # forget the oldest context rather than fail mid-conversation
        prompt = prompt[-room:]
    printed = ""
    tokens: list[int] = []

    def stream(row, token):
        nonlocal printed
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text

    new = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_id=tokenizer.eos_id, stop_strings=["<|user|>"], tokenizer=tokenizer, seed=args.seed,
                   stream=stream)[0]
    text = tokenizer.decode(new)
    if text.startswith(printed):  # what the stream held back (an unfinished character)
        out.write(text[len(printed):])
    out.write("\n")
    return text.strip()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minillm.chat", description="Chat with a minillm / HF Llama model.")
    p.add_argument("--model", required=True, help="Hugging Face layout directory (with tokenizer.model)")
    p.add_argument("--system", default="", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        tokenizer = Tokenizer.from_pretrained(args.model)
        model = Llama.from_pretrained(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not user:
            break
        user = user.strip()
        if user in ("/quit", "/exit"):
            break
        if user == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        if interactive:
            sys.stdout.write("model> ")
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, args)})


if __name__ == "__main__":
    main()
