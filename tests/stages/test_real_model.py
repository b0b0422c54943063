"""What the real pretrained model (SmolLM2-135M-Instruct) shows that the tiny byte-level one hid: a BPE tokenizer,
`<|im_end|>` ending a turn, pad token = eos, a chat template that adds a default system prompt, tied embeddings
under LoRA merge and ZeRO-3. The fast tests use its real tokenizer with a small random model of its vocabulary;
the slow one runs the SmolLM2 recipe for a few steps per stage under the deepspeed launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import generation
from stages.core import models
from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"prompt": [{"role": "user", "content": "Add 6 and 15."}], "completion": [{"role": "assistant", "content": "21"}]},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse abcdef."}],
        "completion": [{"role": "assistant", "content": "fedcba"}],
    },
]


def _small_model(tokenizer, head: str = "causal"):  # noqa: ANN001, ANN202
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )
    torch.manual_seed(0)
    return (LlamaForCausalLM if head == "causal" else LlamaForSequenceClassification)(config)


@pytest.fixture
def tokenizer(smollm2: Path):  # noqa: ANN201
    return models.load_tokenizer(Registry().get("smollm2-135m-instruct"))


def test_training_and_generation_see_the_same_prompt_and_the_answer_ends_with_im_end(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """TRL's SFT tokenization (what the stage trains on) against stages.generation (what every evaluation and PPO
    feed the model): the same prompt ids, default system prompt included where the row has none and replaced
    where it has one; the labels are the answer plus `<|im_end|>` (pad = eos must not mask the end of turn)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    trainer = SFTTrainer(
        model=_small_model(tokenizer),
        args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=96),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    for row, example in zip(ROWS, trainer.train_dataset):
        prompt_ids = generation.encode_prompt(tokenizer, row["prompt"])
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids
        trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
        answer = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]
        assert trained[: len(answer) + 1] == answer + [tokenizer.eos_token_id]
        assert all(label == -100 for label in example["labels"][: len(prompt_ids)])
    default_system, custom = (tokenizer.decode(generation.encode_prompt(tokenizer, row["prompt"])) for row in ROWS)
    assert "You are a helpful AI assistant named SmolLM" in default_system
    assert "Be brief." in custom and "SmolLM" not in custom

    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for index, example in enumerate(trainer.train_dataset):  # padding (eos ids) is masked, the real eos is not
        length = len(example["input_ids"])
        assert batch["labels"][index, :length].tolist() == example["labels"]
        assert (batch["labels"][index, length:] == -100).all() and (batch["attention_mask"][index, length:] == 0).all()


def test_generation_stops_at_im_end_and_decodes_without_special_tokens(tokenizer) -> None:  # noqa: ANN001
    """A model scripted to say "21<|im_end|>99": the answers of a left-padded batch of prompts of different lengths
    are "21" (generation ends at `<|im_end|>`, the eos; pad = eos, and the prompts' own `<|im_end|>` tokens do not
    end it early), decoded without special tokens."""
    digits = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer = digits("21") + [tokenizer.eos_token_id] + digits("99")
    responses = _scripted_generate(tokenizer, answer)
    assert responses == ["21", "21"]


def _scripted_generate(tokenizer, answer: list[int]) -> list[str]:  # noqa: ANN001
    """generation.generate with a small Llama whose k-th forward call (k generated tokens so far, the KV cache
    holding the rest) puts all probability on answer[k]."""
    model = _small_model(tokenizer).eval()
    calls = []
    original = model.forward

    def scripted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        output = original(*args, **kwargs)
        step = min(len(calls), len(answer) - 1)
        calls.append(step)
        output.logits = torch.full_like(output.logits, -1e9)
        output.logits[:, -1, answer[step]] = 0.0
        return output

    model.forward = scripted
    prompts = [row["prompt"] for row in ROWS]
    return generation.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)


def test_reward_scores_do_not_depend_on_padding_when_pad_is_eos(tokenizer) -> None:  # noqa: ANN001
    """The classifier head reads the last non-pad token; with pad = eos = the turn's end token, a conversation
    scored alone and in a padded batch beside a longer one must get the same score."""
    from reward.scoring import score

    model = _small_model(tokenizer, head="classifier").eval()
    prompts = [row["prompt"] for row in ROWS]
    responses = ["21", "fedcba and a much longer reply than the first"]
    together = score(model, tokenizer, prompts, responses)
    alone = torch.cat([score(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert together[0] != together[1]


# -- the recipe under the launcher -----------------------------------------------------------------

FEW_STEPS = [  # a few steps per stage, short sequences, a handful of held-out prompts: minutes, not the recipe's half hour
    "run_name=real", "report_to=none",
    "sft.deepspeed=deepspeed_configs/zero3.json",  # tied embeddings under ZeRO-3 and the LoRA merge
    "sft.datasets=[{source: embedded, num_examples: 32}]", "sft.train.max_steps=2", "sft.train.max_length=64",
    "sft.eval.num_prompts=4", "sft.eval.batch_size=4",
    "reward.datasets=[{source: embedded, num_examples: 32}]", "reward.train.max_steps=2", "reward.heldout_pairs=8",
    "policy.datasets=[{source: embedded, num_examples: 32}]", "policy.dpo.max_steps=2",
    "policy.eval.num_prompts=4", "policy.eval.batch_size=4",
]


@pytest.mark.slow
def test_the_smollm2_recipe_runs_under_the_launcher_and_saves_loadable_models(smollm2: Path, isolated_home: Path) -> None:
    """SFT (ZeRO-3) -> reward -> DPO (ZeRO-2) on the real model, 2 ranks: each output loads with plain
    transformers, keeps its tied embeddings, and LoRA moved the targeted weights but not the embeddings."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    environment = dict(os.environ, RLHF_HOME=str(isolated_home), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, "-m", "stages.cli", "run", "configs/recipes/smollm2.yaml", *FEW_STEPS],
        capture_output=True, text=True, env=environment, timeout=1500, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    base = AutoModelForCausalLM.from_pretrained(smollm2).state_dict()
    for stage in ("sft", "policy"):
        out = isolated_home / "real" / stage
        assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*")), stage  # merged, not adapters
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        trained = model.state_dict()
        torch.testing.assert_close(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # LoRA left them
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            assert not torch.equal(trained[name], base[name]), f"{stage}: {name} did not change"
    summary = (isolated_home / "real" / "summary.json").read_text()
    assert '"start"' in summary and "eval/ref_exact_match" not in summary  # the base row, under the base's own keys
    assert (isolated_home / "real" / "reward" / "model.safetensors").is_file()
