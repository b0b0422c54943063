"""Write the user-format files of tests/stages/test_user_data.py: short-answer questions (upper-case or copy a
word, in phrasings of their own, not the embedded tasks'), as a user would bring them.

    python tests/data/user/make_user_data.py      # rewrites the three files beside this script

- qa_alpaca.jsonl: tatsu-lab/alpaca's columns (instruction, input, output, text);
- qa_ultrafeedback.jsonl: HuggingFaceH4/ultrafeedback_binarized's (prompt, prompt_id, chosen, rejected,
  messages, score_chosen, score_rejected), the correct answer over a wrong one;
- qa_hh.jsonl: Anthropic/hh-rlhf's (chosen, rejected transcripts).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = {
    "upper": ("Write this word in capital letters.", str.upper),
    "copy": ("Repeat this word exactly.", lambda word: word),
}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _wrong(answer: str, task: str, rng: random.Random) -> str:
    if task == "upper" and rng.random() < 0.5:
        return answer.lower()
    index = rng.randrange(len(answer) - 1)
    return answer[:index] + answer[index + 1] + answer[index] + answer[index + 2 :] if answer[index] != answer[index + 1] else answer + "x"


def _questions(seed: int, count: int) -> list[tuple[str, str, str, str]]:
    """(instruction, word, answer, wrong answer); each file draws its own words, so no question is in two files."""
    rng, questions = random.Random(seed), []
    for index in range(count):
        task = ("upper", "copy")[index % 2]
        instruction, solve = QUESTIONS[task]
        word = _word(rng)
        questions.append((instruction, word, solve(word), _wrong(solve(word), task, rng)))
    return questions


def main() -> None:
    alpaca, ultrafeedback, hh = [], [], []
    for instruction, word, answer, _ in _questions(1, 900):
        alpaca.append({"instruction": instruction, "input": word, "output": answer,
                       "text": f"### Instruction:\n{instruction}\n\n### Input:\n{word}\n\n### Response:\n{answer}"})
    for instruction, word, answer, wrong in _questions(2, 900):
        prompt = f"{instruction}\n\n{word}"
        chosen = [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]
        rejected = [{"content": prompt, "role": "user"}, {"content": wrong, "role": "assistant"}]
        ultrafeedback.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen,
                              "rejected": rejected, "messages": chosen, "score_chosen": 9.0, "score_rejected": 3.0})
    for instruction, word, answer, wrong in _questions(3, 900):
        prompt = f"{instruction}\n\n{word}"
        hh.append({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {answer}", "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {wrong}"})
    for name, rows in (("qa_alpaca", alpaca), ("qa_ultrafeedback", ultrafeedback), ("qa_hh", hh)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
