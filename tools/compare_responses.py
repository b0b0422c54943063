"""Share of identical answers between two `responses.jsonl` files of `rlhf eval --benchmark` (joined by key).

    python tools/compare_responses.py A/responses.jsonl B/responses.jsonl

Used to check that batching does not change what is measured: greedy answers at batch 1 against the default
batch (left padding and its attention mask must leave each answer as it would be alone). Prints the share of
identical answers over the keys both files hold, and for the ones that differ the first differing character.
"""

from __future__ import annotations

import json
import sys


def _read(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as lines:
        return {str(row["key"]): row["response"] for row in map(json.loads, lines) if row}


def main(first: str, second: str) -> None:
    a, b = _read(first), _read(second)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise SystemExit("the two files share no key")
    different = [key for key in keys if a[key] != b[key]]
    print(f"{len(keys) - len(different)} of {len(keys)} answers identical ({(len(keys) - len(different)) / len(keys):.3f})")
    for key in different:
        at = next((i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y), min(len(a[key]), len(b[key])))
        print(f"  key {key}: first difference at character {at} of {len(a[key])} / {len(b[key])}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/compare_responses.py A.jsonl B.jsonl")
    main(sys.argv[1], sys.argv[2])
