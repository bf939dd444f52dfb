"""`qlora chat`: a terminal chat that streams tokens, keeps history and takes slash commands.

Ctrl-C stops the answer being written (not the session); Ctrl-D or /quit leaves.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import fields, replace
from typing import Dict, List, Optional

from qlora.config import GenConfig
from qlora.data import render_chat
from qlora.generate import sampling_kwargs
from qlora.inference import Loaded, conversation, load_for_inference
from qlora.models import stop_token_ids
from qlora.validation import refuse, validate_gen

HELP = """commands:
  /reset               forget the conversation
  /system TEXT         set the system message (and reset); /system alone clears it
  /set KEY=VALUE       change a sampling setting: temperature, top_p, top_k, max_new_tokens,
                       do_sample, repetition_penalty (e.g. /set temperature=0.7 do_sample=true)
  /compare             answer the last prompt with the base model and with the fine-tuned one
  /save FILE           write the transcript as JSON
  /help                this list
  /quit                leave (Ctrl-D too); Ctrl-C stops the current answer"""
SETTABLE = {"temperature", "top_p", "top_k", "max_new_tokens", "do_sample", "repetition_penalty", "show_speed"}


class ChatSession:
    """The conversation state and the commands; `handle` takes one input line."""

    def __init__(self, loaded: Loaded, gen: GenConfig, out=sys.stdout):
        self.loaded, self.gen, self.out = loaded, gen, out
        self.system: Optional[str] = gen.system
        self.history: List[Dict[str, str]] = []
        self.stop = threading.Event()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Answer a prompt or run a command; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            answer = self.answer(conversation(line, self.system, self.history))
            self.history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
            return True
        cmd, _, arg = line.partition(" ")
        if cmd == "/quit":
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/reset":
            self.history = []
            self.say("(conversation cleared)")
        elif cmd == "/system":
            self.system, self.history = (arg.strip() or None), []
            self.say(f"(system message {'set' if self.system else 'cleared'}; conversation cleared)")
        elif cmd == "/set":
            self.set(arg)
        elif cmd == "/compare":
            self.compare()
        elif cmd == "/save":
            self.save(arg.strip())
        else:
            self.say(f"unknown command {cmd}; /help lists the commands")
        return True

    def set(self, arg: str) -> None:
        changes = {}
        for item in arg.split():
            key, eq, value = item.partition("=")
            if not eq or key not in SETTABLE:
                self.say(f"cannot set {item!r}; use /set KEY=VALUE with KEY one of {', '.join(sorted(SETTABLE))}")
                return
            kind = {f.name: f.type for f in fields(GenConfig)}[key]
            try:
                if kind == "bool":
                    if value.lower() not in ("true", "false"):
                        raise ValueError
                    changes[key] = value.lower() == "true"
                else:
                    changes[key] = int(value) if kind == "int" else float(value)
            except ValueError:
                self.say(f"{key}={value!r}: expected {'true or false' if kind == 'bool' else 'a number'}")
                return
        if not changes:
            self.say("usage: /set KEY=VALUE (e.g. /set temperature=0.7)")
            return
        problems = validate_gen(replace(self.gen, **changes))
        if problems:
            self.say("; ".join(problems) + " (settings unchanged)")
            return
        self.gen = replace(self.gen, **changes)
        self.say("(" + ", ".join(f"{k}={v}" for k, v in changes.items()) + ")")

    def compare(self) -> None:
        if not self.history:
            self.say("nothing to compare yet: ask something first")
            return
        if not self.loaded.has_adapter:
            self.say("/compare needs a fine-tuned model: start the chat with adapter=RUN")
            return
        prompt = self.history[-2]["content"]
        convo = conversation(prompt, self.system, self.history[:-2])
        self.say("--- base model:")
        with self.loaded.model.disable_adapter():
            self.answer(convo)
        self.say("--- fine-tuned:")
        self.answer(convo)

    def save(self, path: str) -> None:
        if not path:
            self.say("usage: /save FILE")
            return
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        try:
            with open(path, "w") as f:
                json.dump({"model": self.loaded.name, "messages": msgs}, f, indent=2)
        except OSError as e:
            self.say(f"cannot write {path}: {e.strerror}")
            return
        self.say(f"(saved {len(msgs)} messages to {path})")

    def answer(self, messages: List[Dict[str, str]]) -> str:
        """Stream an answer to the terminal; Ctrl-C stops it and keeps what was written."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tok, model, gen = self.loaded.tokenizer, self.loaded.model, self.gen
        text = render_chat(tok, messages, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stop = self.stop
        stop.clear()

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return stop.is_set()

        sampling = sampling_kwargs(gen)
        result = {}

        def run():
            with torch.no_grad():
                result["ids"] = model.generate(
                    **enc, max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty,
                    eos_token_id=stop_token_ids(tok, getattr(model, "generation_config", None)),
                    pad_token_id=tok.pad_token_id, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Interrupted()]), **sampling)

        started = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                self.say(piece, end="")
        except KeyboardInterrupt:
            stop.set()
            for piece in streamer:  # drain what was already produced
                pieces.append(piece)
            self.say(" [stopped]", end="")
        worker.join()
        seconds = time.perf_counter() - started
        self.say()
        n = int(result["ids"].shape[1] - enc["input_ids"].shape[1]) if "ids" in result else 0
        if gen.show_speed and n:
            self.say(f"[{n} tokens, {n / seconds:.1f} tokens/s]")
        return "".join(pieces).strip()


def chat_cli(cfg) -> int:
    """The `qlora chat` verb."""
    refuse(validate_gen(cfg.gen))
    loaded = load_for_inference(cfg)
    session = ChatSession(loaded, cfg.gen)
    interactive = sys.stdin.isatty()
    session.say(f"chatting with {loaded.name} on {loaded.device}; /help for commands, /quit to leave")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            session.say("\n(Ctrl-D or /quit leaves)")
            continue
        if not interactive:
            session.say(f"you> {line}")
        if not session.handle(line):
            break
    return 0
