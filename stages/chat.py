"""`rlhf chat`: talk to a model in the terminal.

    rlhf chat REF [--system TEXT] [--temperature T] [--max-new-tokens N] [--seed S]
    rlhf chat REF --prompt "..."        # answers once and exits (scriptable)

REF is anything a stage config takes as `model` (a registry reference, a built-in such as tiny-llama or
smollm2-135m-instruct, a model folder, a .gguf file). Every turn is the whole conversation (system prompt, the
history, the new message) through the model's own chat template; the answer is printed token by token as it is
generated and stops at the template's end-of-turn token (stages/generation.py, `stop_ids`). /reset clears the
history, /exit or Ctrl-D leaves; Ctrl-C stops the current answer (what was printed stays in the history, so the
next turn sees what you saw) and a Ctrl-C at the prompt clears the line, without ending the session. At a terminal
the session takes SIGINT even where its launcher ignored it (`main`: Ctrl-C is this command's key). When the
conversation nears the model's context a note says so on stderr, once until /reset (never inside an answer).

Decoding is a plain token loop with transformers' DynamicCache (batch 1: the in-place cache of the batched
evaluation loop buys nothing here), greedy at --temperature 0, else sampled from a generator seeded by --seed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from stages import export, generation
from stages.core import distributed
from stages.core.errors import UserError
from stages.core.registry import Registry

HELP = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


class ChatError(UserError, ValueError):
    """The model cannot chat (no chat template, a reward model) or a setting is out of range."""


@dataclass
class Session:
    """A conversation with one model: its history and its decoding settings."""

    model: Any
    tokenizer: Any
    system: str | None = None
    temperature: float = 0.7
    max_new_tokens: int = 256
    seed: int = 0
    history: list[dict[str, str]] = field(default_factory=list)
    # Where notes about the session go (the context warning): stderr, never into an answer (--prompt's stdout).
    note: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True), repr=False)

    def __post_init__(self) -> None:
        self.stop_ids = set(generation.stop_ids(self.model, self.tokenizer))
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.context_noted = False

    def reset(self) -> None:
        self.history = []
        self.context_noted = False

    def reply(self, message: str, write: Callable[[str], None]) -> tuple[str, bool]:
        """Answer `message` after the history, calling `write` with each new piece of text; returns the answer and
        whether it was stopped (Ctrl-C). Both turns join the history either way, also when the Ctrl-C came before
        the first token (while the prompt was encoded or the first token computed): the answer is then empty. A stopped
        answer is what was written, never a token decoded but not yet shown (nor half of a multi-byte character)."""
        answer_ids: list[int] = []
        shown = ""
        stopped = False
        try:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            prompt = generation.encode_prompt(self.tokenizer, messages + [{"role": "user", "content": message}])
            # Past its trained positions a model's answers degrade; say so (once, until /reset) when little room is left.
            if not self.context_noted and self.context and len(prompt) > self.context - min(self.max_new_tokens, self.context // 4):
                self.context_noted = True
                self.note(f"[the conversation ({len(prompt)} tokens) nears the model's context of {self.context}; /reset starts over]")
            for token in self._tokens(prompt):
                answer_ids.append(token)
                text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    # `shown` first: a Ctrl-C inside write() comes once the piece is in the stream's buffer, shown
                    piece, shown = text[len(shown):], text
                    write(piece)
        except KeyboardInterrupt:
            stopped = True
        answer = shown if stopped else self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer, stopped

    @torch.no_grad()
    def _tokens(self, prompt: list[int]) -> Iterator[int]:
        """The answer's tokens one at a time, without the stop token."""
        from transformers import DynamicCache

        self.model.eval()
        cache = DynamicCache(config=self.model.config)
        inputs = torch.tensor([prompt], device=self.model.device)
        for _ in range(self.max_new_tokens):
            logits = self.model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
            if self.temperature > 0:
                probs = torch.softmax(logits / self.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
            else:
                token = int(logits.argmax())
            if token in self.stop_ids:
                return
            yield token
            inputs = torch.tensor([[token]], device=self.model.device)


def open_session(ref: str, system: str | None = None, temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 0) -> Session:
    if temperature < 0:
        raise ChatError(f"--temperature must be 0 (greedy) or more, not {temperature}")
    if max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    registry = Registry()
    entry = registry.get(ref)  # an unknown reference: RegistryError, naming it
    if entry.kind not in export.EXPORTABLE_KINDS:
        raise ChatError(f"{entry.ref} is a {entry.kind} entry, not a chat model; give an SFT, policy or base model")
    model, tokenizer = export.load(entry, registry)
    if tokenizer.chat_template is None:
        raise ChatError(f"{ref} has no chat template, so `rlhf chat` cannot format a conversation for it")
    return Session(model.to(distributed.device()), tokenizer, system, temperature, max_new_tokens, seed)  # a GPU where there is one


def main(args: argparse.Namespace) -> int:
    session = open_session(args.ref, args.system, args.temperature, args.max_new_tokens, args.seed)
    write = _writer(sys.stdout)
    if args.prompt is not None:
        _, stopped = session.reply(args.prompt, write)
        print()
        return 130 if stopped else 0
    print(f"chatting with {args.ref} ({HELP})", flush=True)
    if not sys.stdin.isatty():  # lines from a pipe or a file: SIGINT stays as the launcher left it
        return loop(session, write)
    # At a terminal Ctrl-C is ours even where the launcher ignored SIGINT (a `&` job of a script inherits it ignored,
    # and Python then never raises KeyboardInterrupt: every Ctrl-C, at the prompt or in an answer, did nothing).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return loop(session, write)
    finally:
        signal.signal(signal.SIGINT, previous)


def loop(session: Session, write: Callable[[str], None], read: Callable[[str], str] = input) -> int:
    """The interactive session: one line in, one streamed answer out, until /exit or end of input."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    except ImportError:
        pass
    while True:
        answering = False
        try:  # a Ctrl-C anywhere in a turn ends that turn, never the session
            line = read("you> ").strip()
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                session.reset()
                print("(history cleared)", flush=True)
            elif line.startswith("/"):
                print(f"unknown command {line}: {HELP}", flush=True)
            elif line:
                answering = True
                write("model> ")
                _, stopped = session.reply(line, write)  # a Ctrl-C from here on: stopped, what was shown kept
                print(" [stopped]" if stopped else "", flush=True)
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt a fresh line; around an answer (its label, its last newline) its end
            print(" [stopped]" if answering else "", flush=True)


def _writer(stream: Any) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write
