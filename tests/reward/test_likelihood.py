"""The likelihood reward head: its score is the response's log-likelihood, whatever the padding."""

from __future__ import annotations

import os

import pytest
import torch

from reward import likelihood
from reward.scoring import render, score
from stages.core import models
from stages.core.registry import Registry


@pytest.fixture(scope="module")
def tiny_lm():
    return models.load_causal_lm(Registry(os.devnull).get("tiny-llama"))


def _reward_model(tokenizer):
    """The untrained tiny Llama with the likelihood head (its own copy: the class swap is in place)."""
    return likelihood.as_reward_model(models.load_causal_lm(Registry(os.devnull).get("tiny-llama")), tokenizer)


def _response_logprob_by_hand(model, tokenizer, prompt, response) -> float:
    """log p(response tokens + end token | prompt) from the plain causal LM, one sequence at a time:
    tokens of the full conversation after the prompt's generation marker, each scored by the logits
    one position earlier."""
    prefix = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    full = tokenizer(render(tokenizer, prompt, response), add_special_tokens=False).input_ids
    assert full[: len(prefix)] == prefix
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[position - 1, full[position]].item() for position in range(len(prefix), len(full)))


def test_marker_is_the_generation_prompt(tiny_tokenizer) -> None:
    assert tiny_tokenizer.convert_ids_to_tokens(likelihood.response_marker(tiny_tokenizer)) == ["<|assistant|>"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_score_is_response_loglikelihood(tiny_lm, tiny_tokenizer, padding_side: str) -> None:
    prompts = [[{"role": "user", "content": "Copy: abc"}], [{"role": "user", "content": "Add 3 and 14, please"}]]
    responses = ["abc", "seventeen"]  # different lengths, so one row is padded
    expected = torch.tensor([_response_logprob_by_hand(tiny_lm, tiny_tokenizer, p, r) for p, r in zip(prompts, responses)])

    reward_model = _reward_model(tiny_tokenizer)
    torch.testing.assert_close(score(reward_model, tiny_tokenizer, prompts, responses), expected, atol=1e-4, rtol=0)

    tiny_tokenizer.padding_side = padding_side
    try:
        texts = [render(tiny_tokenizer, p, r) for p, r in zip(prompts, responses)]
        batch = tiny_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tiny_tokenizer.padding_side = "right"
    with torch.no_grad():
        torch.testing.assert_close(reward_model(**batch).logits[:, 0], expected, atol=1e-4, rtol=0)
        # PPO reads the per-position scores at each sequence's last token: the same numbers.
        token_scores = reward_model.token_scores(batch["input_ids"], batch["attention_mask"])
    last = (batch["attention_mask"] * torch.arange(batch["input_ids"].shape[1])).argmax(-1)
    torch.testing.assert_close(token_scores[torch.arange(2), last], expected, atol=1e-4, rtol=0)


def test_score_counts_from_the_prompt_end_even_if_the_reply_spells_the_marker(tiny_lm, tiny_tokenizer) -> None:
    """A reply that contains the marker's text is tokenized into the marker; score() still counts every reply
    token (the marker search alone would count only those after it)."""
    prompts, responses = [[{"role": "user", "content": "Copy: abc"}]], ["zz<|assistant|>abc"]
    expected = _response_logprob_by_hand(tiny_lm, tiny_tokenizer, prompts[0], responses[0])
    reward_model = _reward_model(tiny_tokenizer)
    torch.testing.assert_close(score(reward_model, tiny_tokenizer, prompts, responses), torch.tensor([expected]), atol=1e-4, rtol=0)
    batch = tiny_tokenizer([render(tiny_tokenizer, prompts[0], responses[0])], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert reward_model(**batch).logits[0, 0] > expected + 0.1  # from the last marker: fewer tokens counted


def test_sequence_without_marker_is_a_clear_error(tiny_tokenizer) -> None:
    reward_model = _reward_model(tiny_tokenizer)
    ids = tiny_tokenizer("<|user|>no reply here<|end|>", return_tensors="pt", add_special_tokens=False)
    with pytest.raises(likelihood.LikelihoodHeadError, match="row 0 has no assistant-turn marker"):
        reward_model(**ids)


def test_saved_checkpoint_loads_as_plain_lm_and_as_reward_model(tmp_path, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from reward.models import load_reward

    reward_model = _reward_model(tiny_tokenizer)
    reward_model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    likelihood.mark_saved_config(tmp_path / "rm", tiny_tokenizer)  # what the reward stage does after saving

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "rm")
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.architectures == ["LlamaForCausalLM"]
    registry = Registry()
    entry = registry.begin("rm", "reward", tmp_path / "rm", parent="tiny-llama")
    registry.mark_ready(entry.ref)
    loaded = load_reward(registry.get(entry.ref))
    prompts, responses = [[{"role": "user", "content": "Copy: abc"}]], ["abc"]
    torch.testing.assert_close(score(loaded, tiny_tokenizer, prompts, responses), score(reward_model, tiny_tokenizer, prompts, responses))


def test_chosen_nll_term_adds_the_chosen_replys_negative_loglikelihood(tmp_path, tiny_tokenizer) -> None:
    """loss = -log σ(s_chosen - s_rejected) + c·(-s_chosen), the scores computed by hand from the plain LM."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    prompt, chosen, rejected = [{"role": "user", "content": "Add 3 and 14"}], "17", "71"
    plain_lm = models.load_causal_lm(Registry(os.devnull).get("tiny-llama"))
    s_chosen = _response_logprob_by_hand(plain_lm, tiny_tokenizer, prompt, chosen)
    s_rejected = _response_logprob_by_hand(plain_lm, tiny_tokenizer, prompt, rejected)
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, report_to=[], use_cpu=True, max_length=128)

    losses = {}
    for coefficient in (0.0, 0.5):
        trainer_class = likelihood.with_chosen_nll(RewardTrainer, coefficient)
        trainer = trainer_class(model=_reward_model(tiny_tokenizer), args=args, train_dataset=Dataset.from_list([pair]), processing_class=tiny_tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[coefficient] = trainer.compute_loss(trainer.model, batch).item()
    pairwise = -torch.nn.functional.logsigmoid(torch.tensor(s_chosen - s_rejected)).item()
    assert losses[0.0] == pytest.approx(pairwise, abs=1e-4)
    assert losses[0.5] == pytest.approx(pairwise + 0.5 * -s_chosen, abs=1e-4)
    assert trainer._metrics["train"]["chosen_nll"] == [pytest.approx(-s_chosen, abs=1e-4)]
