"""`rlhf chat` (stages/chat.py), used the way a person uses it: the real command in a pseudo-terminal, two turns
typed and the screen read back; Ctrl-C stops an answer and the session goes on; Ctrl-D leaves. Every key is typed
once the screen shows what it answers (a prompt, the answer's label), never after a fixed delay alone: under a loaded
CPU the command's start and each step take any time."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from stages import chat, cli
from tests.conftest import REPO_ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A command on a pseudo-terminal: what it prints (`screen`) and keys typed into it."""

    def __init__(self, argv: list[str]) -> None:
        environment = os.environ | {"PYTHONPATH": str(REPO_ROOT), "TERM": "dumb", "INPUTRC": os.devnull, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal's slave side is its stdin, stdout, stderr and controlling tty
            os.chdir(REPO_ROOT)
            # SIGINT ignored, as a script's `&` job inherits it (a suite run in the background): the command must take
            # Ctrl-C back, and these tests check it however the suite was started. Left inherited that way before the
            # fix, both Ctrl-Cs were lost exactly as in the full run that failed (the prompt's, and the answer's).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execve(argv[0], argv, environment)
        self.raw = ""

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, text: str, count: int = 1, timeout: float = 600) -> None:
        # 600 s: starting the command (torch, transformers, the model) took minutes on a CPU shared by five jobs
        deadline = time.time() + timeout
        while self.screen.count(text) < count:
            if not self._read(deadline - time.time()):
                raise AssertionError(f"{text!r} did not appear {count} times; the screen:\n{self.screen}")

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while self._read(deadline - time.time()):
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def _read(self, remaining: float) -> bool:
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.fd], [], [], remaining)
        try:
            chunk = os.read(self.fd, 4096) if ready else b""
        except OSError:  # EIO: the command ended and closed the terminal
            chunk = b""
        self.raw += chunk.decode(errors="replace")
        return bool(chunk)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*arguments: str) -> Terminal:
        opened.append(Terminal([sys.executable, "-m", "stages.cli", "chat", *arguments]))
        return opened[-1]

    yield start
    for session in opened:
        session.kill()


def test_two_turns_typed_in_a_terminal_answer_as_the_model_does(registered_sft: str, terminal) -> None:
    """Greedy, so the screen's answers must be the model's own for the same conversation: the second turn is
    answered with the first in its history (the in-process session is the reference)."""
    reference = chat.open_session(registered_sft, temperature=0, max_new_tokens=24)
    expected = [reference.reply(text, lambda piece: None)[0] for text in ("uppercase: hello", "copy: river")]

    screen = terminal(registered_sft, "--temperature", "0", "--max-new-tokens", "24")
    screen.wait_for("you> ")
    screen.type("uppercase: hello\r")
    screen.wait_for("you> ", 2)
    screen.type("copy: river\r")
    screen.wait_for("you> ", 3)
    screen.type("/reset\r")
    screen.wait_for("(history cleared)")
    screen.wait_for("you> ", 4)
    # A moment after the prompt is drawn, as a person types: readline draws it a few instructions before it waits for
    # input, and CPython's readline sees a signal only when it interrupts that wait (Modules/readline.c), so a Ctrl-C
    # landing in between would count at the next key. (Never seen: 0 of 200 at 0 s in a bare input() loop under load.
    # The Ctrl-Cs this test lost were ignored by the command: SIGINT inherited ignored, see Terminal.)
    time.sleep(0.3)
    screen.type("\x03")  # Ctrl-C at the prompt: a fresh prompt, not the end
    screen.wait_for("you> ", 5)
    screen.type("\x04")  # Ctrl-D leaves
    assert screen.exit_code() == 0
    answers = re.findall(r"model> (.*?)\r\n", screen.screen)
    assert answers == expected, screen.screen
    assert "uppercase: hello" in screen.screen  # the typed text echoed, as a person sees it


@pytest.mark.parametrize("delay", [0, 2], ids=["on the label", "inside the answer"])
def test_ctrl_c_stops_an_answer_and_the_session_goes_on(terminal, delay: float) -> None:
    """The random tiny-llama never ends a greedy answer: it runs to --max-new-tokens, 2000 special tokens that print
    nothing (about 50 s on a quiet CPU), so there is no word on the screen to wait for and the Ctrl-C is typed the
    moment the answer's label shows (before the first token, or on the label) or 2 s later (inside the token loop on a
    quiet CPU, still before the first token on a loaded one). Either way the answer stops with [stopped], nothing
    is printed after it but the next prompt, and the session takes the next command."""
    screen = terminal("tiny-llama", "--temperature", "0", "--max-new-tokens", "2000")
    screen.wait_for("you> ")
    screen.type("hello\r")
    screen.wait_for("model> ")
    time.sleep(delay)
    screen.type("\x03")
    screen.wait_for("[stopped]")
    screen.wait_for("you> ", 2)
    screen.type("/exit\r")
    assert screen.exit_code() == 0
    assert screen.screen.split("[stopped]", 1)[1].replace("\r", "") == "\nyou> /exit\n", screen.screen


ANSWER = "Hi there é!"  # tiny-llama's tokenizer is byte-level: 12 tokens, é two of them


def _scripted(session: chat.Session, ids: list[int], interrupt_after: int | None = None):
    """`session._tokens` replaced by known tokens (the random tiny model writes only special tokens, which print
    nothing); with `interrupt_after`, a Ctrl-C while the token after that many is computed."""
    def tokens(prompt: list[int]):
        for index, token in enumerate(ids):
            if index == interrupt_after:
                raise KeyboardInterrupt
            yield token
    session._tokens = tokens


def test_an_answer_streams_and_a_stopped_one_keeps_exactly_what_was_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the screen showed is what the history holds: never a token decoded but not yet written when Ctrl-C hit,
    nor the half of é that waits for its second byte; and the answer comes piece by piece, not in one write."""
    session = chat.open_session("tiny-llama", temperature=0, max_new_tokens=50)
    ids = session.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    half = ANSWER.index("é")  # the first byte of é is token `half`

    pieces: list[str] = []
    _scripted(session, ids)
    assert session.reply("hello", pieces.append) == (ANSWER, False)
    assert "".join(pieces) == ANSWER and len([piece for piece in pieces if piece]) == len(ANSWER) and "é" in pieces

    # Ctrl-C while the token after é's first byte is computed: "Hi there " was shown, é was not
    pieces.clear()
    _scripted(session, ids, interrupt_after=half + 1)
    assert session.reply("again", pieces.append) == ("Hi there ", True)
    assert "".join(pieces) == "Hi there " and session.history[-1] == {"role": "assistant", "content": "Hi there "}

    # Ctrl-C while the fourth token is decoded, after it joined the answer's tokens: three characters were shown
    pieces.clear()
    _scripted(session, ids)
    decode, calls = session.tokenizer.decode, []

    def interrupted_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(session.tokenizer, "decode", interrupted_decode)
    assert session.reply("once more", pieces.append) == ("Hi ", True)
    assert "".join(pieces) == "Hi "
    monkeypatch.undo()

    # Ctrl-C as the third piece is flushed (it is in the stream's buffer: on the screen): it stays
    pieces.clear()

    def write(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    _scripted(session, ids)
    assert session.reply("last", write) == ("Hi ", True) and "".join(pieces) == "Hi "
    assert [message["content"] for message in session.history[1::2]] == [ANSWER, "Hi there ", "Hi ", "Hi "]

    del session._tokens  # the model's own loop again: the next turn works
    answer, stopped = session.reply("and now?", lambda piece: None)
    assert not stopped and len(session.history) == 10
    session.reset()
    assert session.history == []


def test_the_context_note_goes_to_stderr_once_per_session_never_into_an_answer(capsys: pytest.CaptureFixture) -> None:
    """tiny-llama's context is 256 positions: a 300-character message (303 tokens) leaves no room for the answer. The
    note is written once (until /reset), not on every turn, and never among the answer's pieces; --prompt's stdout is
    the answer alone, the note on stderr."""
    session = chat.open_session("tiny-llama", temperature=0, max_new_tokens=3)
    notes: list[str] = []
    pieces: list[str] = []
    session.note = notes.append
    for message in ("x" * 300, "y", "z"):
        session.reply(message, pieces.append)
    assert len(notes) == 1 and "nears the model's context of 256" in notes[0]
    assert not any("context" in piece for piece in pieces)
    session.reset()
    session.reply("x" * 300, pieces.append)
    assert len(notes) == 2

    assert cli.main(["chat", "tiny-llama", "--prompt", "x" * 300, "--temperature", "0", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "context" not in captured.out and "nears the model's context of 256" in captured.err


def test_ctrl_c_before_the_first_token_stops_the_answer_and_keeps_the_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the conversation is encoded (before any token) is the answer's stop too, not an error out of
    reply(): the message and the empty answer join the history, as the screen showed them."""
    from stages import generation

    session = chat.open_session("tiny-llama", temperature=0, max_new_tokens=5)

    def interrupted(tokenizer, messages):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "encode_prompt", interrupted)
    assert session.reply("hello", lambda piece: None) == ("", True)
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]


def test_the_loop_reads_commands_and_leaves_on_end_of_input(capsys: pytest.CaptureFixture) -> None:
    session = chat.open_session("tiny-llama", temperature=0, max_new_tokens=3)
    lines = iter(["", "/help", "hi", "/reset", KeyboardInterrupt, "/exit", "never read"])

    def read(prompt: str) -> str:
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    assert chat.loop(session, lambda piece: None, read) == 0
    out = capsys.readouterr().out
    assert "unknown command /help" in out and "(history cleared)" in out
    assert next(lines) == "never read"
    assert chat.loop(session, lambda piece: None, lambda prompt: (_ for _ in ()).throw(EOFError)) == 0


def test_the_system_prompt_and_the_history_reach_the_template(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import generation

    seen: list[list[dict]] = []
    encode = generation.encode_prompt
    monkeypatch.setattr(generation, "encode_prompt", lambda tokenizer, messages: seen.append(messages) or encode(tokenizer, messages))
    session = chat.open_session("tiny-llama", system="Be brief.", temperature=0, max_new_tokens=2)
    first, _ = session.reply("one", lambda piece: None)
    session.reply("two", lambda piece: None)
    assert seen[-1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
                        {"role": "assistant", "content": first}, {"role": "user", "content": "two"}]


def test_prompt_answers_once(registered_sft: str, capsys: pytest.CaptureFixture) -> None:
    expected = chat.open_session(registered_sft, temperature=0, max_new_tokens=24).reply("uppercase: hello", lambda piece: None)[0]
    assert expected.strip(), "the SFT model's answer prints nothing: endswith would pass whatever --prompt printed"
    assert cli.main(["chat", registered_sft, "--prompt", "uppercase: hello", "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.endswith(expected + "\n")


def test_bad_input_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["chat", "no-such-model", "--prompt", "hi"]) == 2
    assert "'no-such-model'" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path / "gone"), "--prompt", "hi"]) == 2
    assert str(tmp_path / "gone") in capsys.readouterr().err
    assert cli.main(["chat", "tiny-llama", "--temperature", "-1", "--prompt", "hi"]) == 2
    assert "--temperature" in capsys.readouterr().err
