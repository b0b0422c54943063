"""The people behind the embedded data: annotators who write the demonstrations, and a judge who compares answers.

After AlpacaFarm's simulated annotators, and the reason RLHF beats SFT in InstructGPT: demonstrations carry
their writers' habits and mistakes, while a judge can tell the better of two answers without writing it.

Demonstrations (`World.demonstrate`): each family's training phrasings are shared out between annotator kinds
in a fixed order, so one kind owns each phrasing and writes `consistency` of its answers (where a phrasing
straddles two kinds, its rows are split between them by chance, and the shares come out as configured); the rest
are written by annotators drawn from the whole pool, as in a real team where the one who owns a kind of request
answers most of it. A kind's habit is therefore *systematic*, readable from the prompt: the greedy answer of a model
that learns it carries it, where scattered per-row noise would leave it right and show nothing. At consistency 1 a
habit is all-or-nothing and the SFT model almost never samples anything else on an owned phrasing (0.6% bare answers
at temperature 1 where its greedy answer is wrapped): a policy that learns online from its own samples cannot find
the better answer there, and only methods that read other answers (DPO's pairs) can (README, "The embedded world").
- verbose: wraps the answer in a phrase users do not want (`verbose_template`, "Sure! 42");
- careless: gets its families (`careless_tasks`) wrong the same way each time: sums off by one, words sorted
  backwards, reversals and upper-casing left undone;
- clean: the exact answer.
The gold answer stays the bare exact answer (`row["answer"]`): what every stage's exact match scores.

Preferences (`World.judge`): for each prompt, a first answer (the policy's own sample where there is one, else a
demonstration by an annotator drawn from the pool) against a second that differs in quality (another pool
demonstration; a plausible wrong answer where the pool's all tie); the judge prefers the higher `utility` (right
and bare 2, right but wrapped 1, wrong 0) and flips `label_noise` of its labels (InstructGPT reports ~73%
agreement between labellers).
Held-out pairs are judged without noise: the reward model is scored against the true preference.
Unpaired feedback (`World.thumbs`, for KTO): two answers per prompt, drawn as a pair's are (those the noise-free
judge compares at the seed), each judged alone, a thumbs up only for a right, bare answer, with the same `label_noise`.
Not the very answers of DPO's training pairs at the same seed once label_noise > 0: the noisy judge draws a flip per
pair, which shifts its later draws (same distribution, other answers).

May import: `stages.tasks` siblings only.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from stages.tasks.verifier import is_correct

AnnotatorKind = Literal["clean", "verbose", "careless"]

# A careless annotator's mistake per family, computed from the right answer (the inputs are not kept in rows).
CARELESS_MISTAKES: dict[str, Callable[[str], str]] = {
    "add": lambda answer: str(int(answer) + 1),  # off by one
    "sort": lambda answer: answer[::-1],  # sorted backwards
    "reverse": lambda answer: answer[::-1],  # the word left as given
    "upper": str.lower,  # left in lower case
}


@dataclass
class World:
    """Who wrote the embedded demonstrations and who judged the embedded preference pairs (absent: clean
    demonstrations and noise-free labels, the world before)."""

    verbose: float = field(default=0.3, metadata={"help": "Share of demonstrations written by annotators who wrap the answer."})
    careless: float = field(default=0.2, metadata={"help": "Share of the careless_tasks demonstrations written by a careless annotator."})
    careless_tasks: list[str] = field(
        default_factory=lambda: ["sort", "upper"], metadata={"help": f"Families the careless annotator gets wrong (of {', '.join(CARELESS_MISTAKES)})."}
    )
    verbose_template: str = field(default="Sure! {answer}", metadata={"help": "The wrapper users do not want; must hold {answer}."})
    label_noise: float = field(default=0.2, metadata={"help": "Share of training preference labels the judge gets backwards."})
    consistency: float = field(
        default=0.75, metadata={"help": "Share of a phrasing's answers written by the kind that owns it; the rest by annotators drawn from the pool."}
    )

    def __post_init__(self) -> None:
        for name in ("verbose", "careless", "label_noise", "consistency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"world.{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.verbose + self.careless > 1.0:
            raise ValueError(f"world.verbose + world.careless must be at most 1, got {self.verbose} + {self.careless}")
        if self.label_noise >= 0.5:
            raise ValueError(f"world.label_noise must be below 0.5 (at 0.5 labels carry nothing), got {self.label_noise}")
        unknown = [name for name in self.careless_tasks if name not in CARELESS_MISTAKES]
        if unknown:
            raise ValueError(f"world.careless_tasks: no careless mistake defined for {unknown[0]!r} (known: {', '.join(CARELESS_MISTAKES)})")
        if "{answer}" not in self.verbose_template:
            raise ValueError(f"world.verbose_template must contain {{answer}}, got {self.verbose_template!r}")

    # -- demonstrations ---------------------------------------------------------------------------------------

    def annotator(self, task: str, phrasing: int, num_phrasings: int, rng: random.Random) -> AnnotatorKind:
        """The kind of annotator who wrote the answer to one row: mostly its phrasing's owner (see the module docstring)."""
        if self.consistency < 1.0 and rng.random() >= self.consistency:  # (at 1 no draw: the same rows as before it existed)
            return self.random_annotator(rng)
        position = _phrasing_order(task, num_phrasings).index(phrasing)
        share = (position + rng.random()) / num_phrasings  # uniform over the phrasing's slice of [0, 1)
        return self._kind_at(share)

    def random_annotator(self, rng: random.Random) -> AnnotatorKind:
        """An annotator drawn from the pool by its shares (a second opinion, whatever the phrasing)."""
        return self._kind_at(rng.random())

    def answer_by(self, kind: AnnotatorKind, task: str, answer: str) -> str:
        """What an annotator of `kind` writes for a prompt whose exact answer is `answer`."""
        if kind == "verbose":
            return self.wrap(answer)
        if kind == "careless" and task in self.careless_tasks:
            return CARELESS_MISTAKES[task](answer)
        return answer

    def wrap(self, answer: str) -> str:
        return self.verbose_template.format(answer=answer)

    def demonstrate(self, rows: list[dict[str, Any]], seed: int, num_phrasings: dict[str, int]) -> list[dict[str, Any]]:
        """The rows with their completions written by the pool; each row keeps its gold `answer` and gains `annotator`.
        `num_phrasings[task]`: how many training phrasings the generator drew from (rows name theirs in `template`)."""
        rng = random.Random(f"annotators-{seed}")
        written = []
        for row in rows:
            phrasing = int(str(row["template"]).rpartition("/")[2])
            kind = self.annotator(row["task"], phrasing, num_phrasings[row["task"]], rng)
            content = self.answer_by(kind, row["task"], row["answer"])
            written.append(row | {"completion": [{"role": "assistant", "content": content}], "annotator": kind})
        return written

    # -- preferences --------------------------------------------------------------------------------------------

    def utility(self, response: str, answer: str) -> int:
        """The judge's ranking of one answer: 2 right and bare, 1 right but wrapped, 0 wrong."""
        if is_correct(response, answer):
            return 2
        return 1 if response.strip() == self.wrap(answer).strip() else 0

    def judge(
        self, rows: list[dict[str, Any]], seed: int, corrupt: Callable[[str, str, random.Random], str],
        first_answers: list[str | None] | None = None, noisy: bool = True,
    ) -> list[dict[str, Any]]:
        """One judged pair per row: `first_answers[i]` (the policy's sample; None or empty: a pool demonstration)
        against a second answer of different utility; `noisy=False` for held-out pairs (the true preference).
        `corrupt(answer, task, rng)` makes a plausible wrong answer (stages/tasks/pairs.py)."""
        rng = random.Random(f"judge-{seed}")
        pairs = []
        for index, row in enumerate(rows):
            answer, task = row["answer"], row["task"]
            sampled = first_answers[index] if first_answers is not None else None
            on_policy = bool(sampled and sampled.strip())
            first = sampled if on_policy else self.answer_by(self.random_annotator(rng), task, answer)
            second = self._different_answer(first, task, answer, corrupt, rng)
            first_utility, second_utility = self.utility(first, answer), self.utility(second, answer)
            better, worse = (first, second) if first_utility > second_utility else (second, first)
            flipped = noisy and rng.random() < self.label_noise
            chosen, rejected = (worse, better) if flipped else (better, worse)
            pairs.append({
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "task": task,
                "on_policy": on_policy,
                "label_flipped": flipped,
                # style: right and bare over right but wrapped; otherwise a right answer over a wrong one
                "contrast": "style" if {first_utility, second_utility} == {1, 2} else "correctness",
            })
        return pairs

    def thumbs(
        self, rows: list[dict[str, Any]], seed: int, corrupt: Callable[[str, str, random.Random], str],
        first_answers: list[str | None] | None = None, noisy: bool = True,
    ) -> list[dict[str, Any]]:
        """Unpaired feedback (KTO): the two answers `judge` would compare for each row, each judged on its own, a thumbs
        up (`label` true) only for what users want (right and bare, utility 2), and `label_noise` of the labels flipped,
        as the judge's pairs are. Two rows per prompt, the answers `judge(noisy=False)` compares at this seed: with
        label_noise > 0 not those of DPO's training pairs at the same seed (their flip draws shift the annotator draws
        after the first prompt), the same kind of answers. (Drawing them alike changed the KTO data, and the KTO stage
        test's margins with it.)"""
        rng = random.Random(f"thumbs-{seed}")
        pairs = self.judge(rows, seed, corrupt, first_answers=first_answers, noisy=False)
        feedback = []
        for index, (row, pair) in enumerate(zip(rows, pairs)):
            sampled = first_answers[index] if first_answers is not None else None
            for side in ("chosen", "rejected"):
                content = pair[side][-1]["content"]
                flipped = noisy and rng.random() < self.label_noise
                feedback.append({
                    "prompt": row["prompt"], "completion": pair[side], "task": row["task"],
                    "label": (self.utility(content, row["answer"]) == 2) != flipped,
                    "on_policy": pair["on_policy"] and content == sampled, "label_flipped": flipped,
                })
        return feedback

    def _different_answer(
        self, first: str, task: str, answer: str, corrupt: Callable[[str, str, random.Random], str], rng: random.Random
    ) -> str:
        """A second answer whose utility differs from `first`'s: a demonstration by an annotator drawn from the pool,
        drawn again while it ties; where the pool cannot differ (every annotator writes the same), a plausible wrong
        answer. A demonstration, not a corruption, first: the chosen side of a pair is what DPO's SFT term imitates,
        so a wrapped answer preferred over a corruption would teach the habit the judge dislikes."""
        target = self.utility(first, answer)
        for _ in range(16):
            candidate = self.answer_by(self.random_annotator(rng), task, answer)
            if self.utility(candidate, answer) != target:
                return candidate
        return answer if target < 2 else corrupt(answer, task, rng)

    def _kind_at(self, share: float) -> AnnotatorKind:
        if share < self.verbose:
            return "verbose"
        if share < self.verbose + self.careless:
            return "careless"
        return "clean"


def _phrasing_order(task: str, num_phrasings: int) -> list[int]:
    """A fixed order of a family's phrasings (by hash, the same in every process), so the kinds' slices do not all
    start at phrasing 0."""
    return sorted(range(num_phrasings), key=lambda index: hashlib.sha256(f"{task}/{index}".encode()).hexdigest())
