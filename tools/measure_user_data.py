"""Measure the stages on users' data (issue #21's checks), single process, from a given SFT model:

    python tools/measure_user_data.py SFT_MODEL_DIR OUT_DIR

1. SFT on tests/data/user/qa_alpaca.jsonl (10% held out): the stage's held-out exact match, and the same
   rows scored by plain transformers (greedy, one prompt at a time);
2. DPO from that SFT model on qa_ultrafeedback.jsonl (10% held out): implicit-reward accuracy on the held-out
   pairs, and exact match of SFT vs DPO on 300 fresh questions written apart from every training file;
3. a reward model on qa_hh.jsonl + qa_ultrafeedback.jsonl mixed: pairwise accuracy on their held-out pairs.
Prints one JSON object with every number.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = ROOT / "tests" / "data" / "user"


def exact_match(model_dir: Path, rows: list[dict]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    hits = 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == row["completion"][-1]["content"].strip()
    return hits / len(rows)


def fresh_questions(count: int) -> list[dict]:
    """Questions of the user files' kind, drawn with a seed none of them used (make_user_data.py uses 1, 2, 3)."""
    sys.path.insert(0, str(USER))
    import make_user_data

    rows = []
    for instruction, word, answer, _ in make_user_data._questions(7, count):
        rows.append({"prompt": [{"role": "user", "content": f"{instruction}\n\n{word}"}], "completion": [{"role": "assistant", "content": answer}]})
    return rows


def main(sft_dir: str, out: str) -> None:
    from stages import data, policy, reward_model, sft
    from stages.core.config import load_config

    out_dir = Path(out)
    os.environ["RLHF_HOME"] = str(out_dir / "home")
    result: dict[str, float] = {}
    alpaca = {"source": str(USER / "qa_alpaca.jsonl"), "eval_fraction": 0.1}
    metrics = sft.run(load_config(sft.SFTStageConfig, [
        "--config", str(ROOT / "configs/sft/tiny.yaml"), f"model={sft_dir}", f"datasets=[{alpaca}]", "train.num_train_epochs=2",
        "train.learning_rate=5e-4", "train.warmup_steps=0", "eval.num_prompts=200", "tracking.report_to=none", "run_name=m",
        f"output_dir={out_dir / 'sft'}"]))
    heldout = data.load_sft_heldout(data.DatasetSpec(**alpaca))
    result |= {f"sft/{key}": value for key, value in metrics.items() if key.startswith("eval/")}
    result["sft/plain_transformers_exact_match"] = exact_match(out_dir / "sft", heldout[:200])

    prefs = {"source": str(USER / "qa_ultrafeedback.jsonl"), "eval_fraction": 0.1}
    metrics = policy.run(load_config(policy.PolicyStageConfig, [
        "--config", str(ROOT / "configs/policy/tiny.yaml"), f"model={out_dir / 'sft'}", "reward_model=null", f"datasets=[{prefs}]",
        "eval.num_prompts=200", "tracking.report_to=none", "run_name=m", f"output_dir={out_dir / 'dpo'}"]))
    result |= {f"dpo/{key}": value for key, value in metrics.items() if key.startswith("eval/")}
    fresh = fresh_questions(300)
    result["fresh/sft_exact_match"] = exact_match(out_dir / "sft", fresh)
    result["fresh/dpo_exact_match"] = exact_match(out_dir / "dpo", fresh)

    mixed = [{"source": str(USER / "qa_hh.jsonl"), "eval_fraction": 0.1}, prefs]
    metrics = reward_model.run(load_config(reward_model.RewardStageConfig, [
        "--config", str(ROOT / "configs/reward/tiny.yaml"), f"model={out_dir / 'sft'}", f"datasets={mixed}", "train.num_train_epochs=1",
        "tracking.report_to=none", "run_name=m", f"output_dir={out_dir / 'rm'}"]))
    result |= {f"rm/{key}": value for key, value in metrics.items() if key.startswith("eval/")}
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:3])
