"""Smoke test of bench/: two SFT arms for a few steps, in this process (the bench itself starts one process per
arm; here the imports would cost more than the arms). Asserts the result format, the table and that both arms
did the same work; never speed (timings on a shared machine are not a test)."""

import pytest
import torch

from bench import sft
from bench.runner import Arm, Comparison, Outcome, _work_mismatches, format_outcome


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_arms_do_equal_work_and_print_a_ratio_table():
    params = {"model": "tiny", "data": "variable", "examples": 16}
    results = {}
    for name in ("trl_defaults", "ours"):
        result = sft.run(params | {"arm": name})
        result["rate"], result["cpu_rate"] = result["amount"] / result["seconds"], result["amount"] / result["cpu_seconds"]
        results[name] = [result]

    defaults, ours = results["trl_defaults"][0], results["ours"][0]
    assert defaults["work"] == ours["work"] and defaults["work"]["sequences"] == 16
    assert defaults["amount"] == ours["amount"] == defaults["work"]["real_tokens"] > 0
    # TRL's defaults: batch 8 with checkpointing; ours (configs/sft/tiny.yaml): batch 32 without.
    assert defaults["optimizer_steps"] == 2 and ours["optimizer_steps"] == 1
    assert defaults["settings"]["gradient_checkpointing"] is True and ours["settings"]["gradient_checkpointing"] is False
    assert 0 <= ours["padding_waste"] < 1 and ours["seconds"] > 0 and ours["cpu_seconds"] > 0

    comparison = Comparison(title="smoke", arms=[Arm(name, "sft", params | {"arm": name}) for name in results],
                            baseline="trl_defaults", unit="real tok", columns=[("padding_waste", "pad waste", "{:.0%}")])
    table = format_outcome(Outcome(comparison, results, problems=[]))
    lines = table.splitlines()
    assert lines[0] == "### smoke"
    assert "x trl_defaults" in lines[1] and "real tok/CPU-s" in lines[1]
    assert lines[3].startswith("| trl_defaults") and "1.00" in lines[3]
    assert "work per arm (equal, checked): " in table and "PROBLEM" not in table


def test_unequal_work_is_reported():
    comparison = Comparison(title="t", arms=[Arm("a", "sft", {}), Arm("b", "sft", {})], baseline="a", unit="x")
    results = {name: [{"rate": 1.0, "cpu_rate": 1.0, "work": {"tokens": tokens}}] for name, tokens in (("a", 1), ("b", 2))}
    problems = _work_mismatches(results)
    assert problems and "unequal work" in problems[0]
    assert "PROBLEM: unequal work" in format_outcome(Outcome(comparison, results, problems))


def test_smollm2_mfu_counts_the_products_its_matmul_peak_times():
    """The real-model MFU's numerator (model FLOPs of a LoRA step) and denominator (the frozen products the
    matmul peak times, at the step's token count) count the same linear layers and LM head: without attention
    and adapters they agree up to the norms' few parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench import smollm2

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tokens = 96
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    counted = smollm2.training_flops(model, {"real_tokens": tokens, "squared_lengths": 0}) - 6 * adapters * tokens
    timed = sum(2 * m * k * n * count for m, k, n, count in smollm2._matmul_shapes(config, tokens))
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert counted == timed + 4 * norms * tokens


def test_smollm2_pairs_fit_the_shipped_max_length_and_vary_in_length(smollm2):
    """The real-model DPO and reward comparisons' pairs (bench/smollm2_pairs.py): every sequence fits the shipped
    configs' max_length under SmolLM2's chat template (so no arm truncates or drops one), the two sources alternate,
    and lengths differ within pairs and across them (a padded batch has padding). The arms read the shipped configs:
    ours is padding-free as shipped, ours+padded is not, TRL's defaults carry only the CPU run's two changes."""
    from bench import smollm2_pairs
    from stages.core import models
    from stages.core.registry import Registry

    tokenizer = models.load_tokenizer(Registry().get("smollm2-135m-instruct"))
    pairs = smollm2_pairs.preference_pairs(tokenizer, 32)
    assert len(pairs) == 32 and smollm2_pairs.max_length() == 96

    def length(pair, side):
        return len(tokenizer.apply_chat_template(pair["prompt"] + pair[side], return_dict=True)["input_ids"])

    lengths = [(length(pair, "chosen"), length(pair, "rejected")) for pair in pairs]
    assert max(max(both) for both in lengths) <= 96
    assert all(pair["chosen"] != pair["rejected"] for pair in pairs)
    assert pairs[0]["prompt"][-1]["content"].startswith("Add the numbers") and "\n\n" in pairs[1]["prompt"][-1]["content"]
    assert sum(chosen != rejected for chosen, rejected in lengths) >= 16
    flat = [length for both in lengths for length in both]
    assert 1 - sum(flat) / (len(flat) * max(flat)) > 0.2  # one padded batch of the 32 pairs: over a fifth padding

    assert smollm2_pairs._settings("dpo", "trl_defaults") == {"bf16": False, "use_cpu": True}
    for stage, batch in (("dpo", 16), ("reward", 16)):
        ours, padded = smollm2_pairs._settings(stage, "ours"), smollm2_pairs._settings(stage, "ours+padded")
        assert ours["padding_free"] is True and padded["padding_free"] is False
        assert ours["per_device_train_batch_size"] == batch and ours["gradient_checkpointing"] is False
