"""Re-score a `responses.jsonl` of `rlhf eval --benchmark ifbench` the way IFBench's own `run_eval.py` does, as a
cross-check of stages/benchmarks (which scores each instruction on its own, through the same functions).

    python tools/rescore_official.py RLHF_HOME/evals/MODEL/ifbench-all-t384/responses.jsonl

Follows `ifbench/run_eval.py` after its API calls: `read_prompt_list` of the packaged test file,
`read_prompt_to_response_dict` of the responses, `test_instruction_following_strict` then `_loose` per prompt
(prompts without a response skipped, as run_eval does under --limit), `generate_report`'s prompt- and
instruction-level numbers. Two departures, both printed: spaCy's model download at import is stubbed (the
package never uses spaCy), and a prompt whose checker raises (offline: `words:start_verb` without NLTK's
tagger) counts as not followed, where run_eval would stop.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


def main(responses_path: str) -> None:
    cli = types.ModuleType("spacy.cli")
    cli.download = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.modules.setdefault("spacy", types.ModuleType("spacy")).cli = cli  # type: ignore[attr-defined]
    sys.modules["spacy.cli"] = cli
    import ifbench
    from ifbench import evaluation_lib

    inputs = evaluation_lib.read_prompt_list(str(Path(ifbench.__file__).parent / "data" / "IFBench_test.jsonl"))
    prompt_to_response = evaluation_lib.read_prompt_to_response_dict(responses_path)
    numbers, raised = {}, set()
    for function, mode in ((evaluation_lib.test_instruction_following_strict, "strict"), (evaluation_lib.test_instruction_following_loose, "loose")):
        prompts = instructions = prompts_followed = instructions_followed = 0
        for example in inputs:
            if example.prompt not in prompt_to_response:
                continue
            try:
                followed = function(example, prompt_to_response).follow_instruction_list
            except Exception as error:  # noqa: BLE001 - see the module docstring
                raised.add(f"{example.key} {example.instruction_id_list}: {type(error).__name__}")
                followed = [False] * len(example.instruction_id_list)
            prompts += 1
            instructions += len(followed)
            prompts_followed += all(followed)
            instructions_followed += sum(followed)
        numbers[f"prompt_{mode}"] = prompts_followed / prompts
        numbers[f"instruction_{mode}"] = instructions_followed / instructions
    print(f"{prompts} prompts, {instructions} instructions")
    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        print(f"  {key:<20} {numbers[key]:.4f}")
    if raised:
        print(f"  {len(raised)} prompt(s) whose checker raised, counted as not followed: " + "; ".join(sorted(raised)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/rescore_official.py RESPONSES.jsonl")
    main(sys.argv[1])
