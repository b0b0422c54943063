"""Write data/word_tasks_alpaca.jsonl, the Alpaca-format file the SmolLM2 recipe trains on beside the embedded tasks.

    python tools/make_word_tasks_alpaca.py      # rewrites the file

Rows as tatsu-lab/alpaca publishes them (instruction, input, output, text): the embedded families in
instruction-plus-input wordings of their own. Two rules keep the recipe's held-out numbers honest:
- only task instances of the embedded *train* split (stages.tasks.instance_split), so no held-out prompt's
  word or numbers is ever trained, in any wording;
- no `sort` rows, the family the recipe holds out (eval/exact_match_unseen_tasks);
and no wording here is one of the embedded held-out phrasings (checked below).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from stages import tasks

OUT = Path(__file__).resolve().parents[1] / "data" / "word_tasks_alpaca.jsonl"
ROWS = 600
INSTRUCTIONS = {
    "add": ["Compute the sum of the two numbers.", "Add the numbers given in the input.", "What do these two numbers add up to?"],
    "reverse": ["Write the input word with its letters in reverse order.", "Reverse the letters of this word.", "Spell this word backwards."],
    "upper": ["Write this word in capital letters.", "Convert the input to upper case.", "Make every letter of this word uppercase."],
    "copy": ["Repeat this word exactly.", "Copy the input word without changing it.", "Say this word back to me."],
}


def main() -> None:
    heldout_wordings = {p for family in tasks.load_templates().values() for p in family.get("heldout", [])}
    rng, rows = random.Random(20261202), []
    families = list(INSTRUCTIONS)
    while len(rows) < ROWS:
        name = families[len(rows) % len(families)]
        family = tasks.FAMILIES[name]
        arguments = family.sample(rng)
        if tasks.instance_split(name, arguments) != "train":
            continue
        instruction = rng.choice(INSTRUCTIONS[name])
        assert instruction not in heldout_wordings
        given = f"{arguments['a']} and {arguments['b']}" if name == "add" else arguments["text"]
        output = family.solve(arguments)
        text = f"### Instruction:\n{instruction}\n\n### Input:\n{given}\n\n### Response:\n{output}"
        rows.append({"instruction": instruction, "input": given, "output": output, "text": text})
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
