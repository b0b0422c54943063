"""`rlhf export` (stages/export.py, stages/model_card.py): a folder plain transformers loads alone, whose greedy
answers are the registered model's; LoRA merged, tied embeddings kept; a Hub card from the registry; bad input
refused with the reference or path named; a failed export leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages import chat, cli, export, generation, model_card
from stages.core import models
from stages.core.registry import Registry

PROMPTS = [[{"role": "user", "content": text}] for text in ("uppercase: hello", "Please uppercase the word river.", "copy: abc", "hi")]


def _exported(out: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)


def _plain_greedy(model: object, tokenizer: object, max_new_tokens: int) -> list[str]:
    """What anyone gets with transformers alone: the folder's chat template and generation_config.json."""
    answers = []
    for messages in PROMPTS:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_exported_sft_model_loads_alone_and_answers_as_registered(registered_sft: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    registry = Registry()
    registry.update(
        registered_sft,
        stage="sft", run="fixture", dataset_fingerprint="abc123",
        metrics={"eval/exact_match": 0.625, "eval/benchmark/ifeval/prompt_strict": 0.125},
        config={"datasets": [{"source": "embedded", "tasks": ["upper", "copy"]}, {"source": "trl-lib/Capybara"}, {"source": "data/mine.jsonl"}],
                "eval": {"num_prompts": 200, "max_new_tokens": 24}, "train": {"learning_rate": 0.002}},
    )
    out = tmp_path / "exported"
    assert cli.main(["export", registered_sft, str(out)]) == 0
    assert f"exported {registered_sft} to {out}" in capsys.readouterr().out

    files = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files) and not list(tmp_path.glob(".exported*"))
    exported, tokenizer = _exported(out)
    # Tied embeddings stay tied: one tensor, not two copies.
    assert exported.config.tie_word_embeddings and exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    eos = exported.generation_config.eos_token_id
    assert (eos[0] if isinstance(eos, list) else eos) == end_of_turn

    entry = registry.get(registered_sft)
    registered, registered_tokenizer = models.load_causal_lm(entry), models.load_tokenizer(entry)
    expected = generation.generate(registered, registered_tokenizer, PROMPTS, 24, 4, stop_token_ids=generation.stop_ids(registered, registered_tokenizer))
    assert _plain_greedy(exported, tokenizer, 24) == expected
    assert any(answer.strip() for answer in expected)

    card = (out / "README.md").read_text()
    front = model_card.front_matter(card)
    assert front["pipeline_tag"] == "text-generation" and front["license"] == "unknown"  # tiny-llama: random init, no upstream
    assert "base_model" not in front  # no Hub model to name
    assert front["datasets"] == ["trl-lib/Capybara"]  # Hub names only: not embedded, not a file
    assert {"rlhf-stages", "sft"} <= set(front["tags"])
    for text in ("`tiny-llama`", registered_sft, "abc123", "eval/exact_match | 0.625", "eval/benchmark/ifeval/prompt_strict", "num_prompts: 200",
                 "learning_rate: 0.002", "generation_config.json"):
        assert text in card, text


def test_lora_adapters_are_merged_and_tied_embeddings_kept(tmp_path: Path) -> None:
    """An output holding adapters only (lora.merge_on_save=false) exports as full weights: the logits of the plain
    folder equal those of base + adapters through peft."""
    import torch
    from peft import LoraConfig, get_peft_model

    registry = Registry()
    base = registry.get("tiny-llama")
    tokenizer = models.load_tokenizer(base)
    adapted = get_peft_model(models.load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # fresh adapters are zero: make them change the model
    adapters = tmp_path / "adapters"
    adapted.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    assert not (adapters / "config.json").exists()
    entry = registry.begin("lora-sft", "sft", adapters, parent="tiny-llama")
    registry.mark_ready(entry.ref)

    out = export.export(entry.ref, tmp_path / "merged")
    exported, _ = _exported(out)
    ids = torch.tensor([generation.encode_prompt(tokenizer, PROMPTS[0])])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        base_logits = models.load_causal_lm(base)(input_ids=ids).logits
        actual = exported(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


def test_bad_input_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", "no-such-model", str(tmp_path / "out")]) == 2
    assert "'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    assert cli.main(["export", "tiny-llama", str(taken)]) == 2
    error = capsys.readouterr().err
    assert str(taken) in error and "--overwrite" in error
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]

    assert cli.main(["export", "tiny-llama", str(tmp_path / "missing" / "out")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err

    (tmp_path / "empty").mkdir()  # an empty folder is fine: nothing to lose
    assert cli.main(["export", "tiny-llama", str(tmp_path / "empty")]) == 0
    assert cli.main(["export", "tiny-llama", str(taken), "--overwrite"]) == 0
    assert (taken / "model.safetensors").is_file() and not (taken / "notes.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_a_failed_export_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> str:
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(model_card, "render", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export("tiny-llama", tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous export\n")
    with pytest.raises(RuntimeError, match="disk full"):
        export.export("tiny-llama", old, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]  # no half-written folder, no temporary one
    assert [path.name for path in old.iterdir()] == ["keep.txt"]


def test_push_to_hub_without_credentials_is_a_clear_error_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert cli.main(["export", "tiny-llama", str(tmp_path / "out"), "--push-to-hub", "someone/tiny"]) == 2
    error = capsys.readouterr().err
    assert "someone/tiny" in error and "credentials" in error
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", "tiny-llama", str(tmp_path / "out"), "--push-to-hub", "not a repo"]) == 2
    assert "'not a repo'" in capsys.readouterr().err


def test_push_uploads_the_finished_folder_and_a_network_failure_says_it_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub stood in for (no network here): the repo is created, then the complete folder uploaded."""
    import huggingface_hub

    calls: list[tuple] = []

    class FakeApi:
        def __init__(self, token: str) -> None:
            calls.append(("token", token))

        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            calls.append(("create", repo_id, kwargs["private"]))

        def upload_folder(self, repo_id: str, folder_path: str, **kwargs: object) -> object:
            calls.append(("upload", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))
            if repo_id == "someone/offline":
                raise ConnectionError("no route to host")
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = export.export("tiny-llama", tmp_path / "out", push_to_hub="someone/tiny", private=True)
    assert calls[0] == ("token", "hf_test") and calls[1] == ("create", "someone/tiny", True)
    assert calls[2][:2] == ("upload", "someone/tiny") and {"model.safetensors", "README.md", "generation_config.json"} <= set(calls[2][2])
    with pytest.raises(export.ExportError, match=r"someone/offline failed \(ConnectionError: no route to host\); the folder is complete"):
        export.export("tiny-llama", tmp_path / "again", push_to_hub="someone/offline")
    assert (tmp_path / "again" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()


def test_builtin_specs_name_their_licence() -> None:
    specs = {entry.name: models.builtin_spec(entry) for entry in Registry().list() if entry.builtin}
    assert specs["smollm2-135m-instruct"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert specs["smollm2-135m-instruct"]["license"] == "apache-2.0"
    assert all("license" in spec for spec in specs.values())
    facts = model_card.base_facts(Registry().get("smollm2-135m-instruct"))
    assert facts == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    assert yaml.safe_load("---\n") is None  # front_matter of a card without one: {}
    assert model_card.front_matter("# no front matter\n") == {}


@pytest.mark.slow
def test_smollm2_exports_with_its_hub_base_and_end_of_turn(smollm2: Path, tmp_path: Path) -> None:
    """The real model: base_model and licence from the built-in's spec, eos = `<|im_end|>`, tied embeddings kept,
    a greedy answer of plain transformers equal to ours and to `rlhf chat`'s (8 tokens: SmolLM2 is slow on this CPU)."""
    out = export.export("smollm2-135m-instruct", tmp_path / "smollm2")
    front = model_card.front_matter((out / "README.md").read_text())
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    exported, tokenizer = _exported(out)
    eos = exported.generation_config.eos_token_id
    assert (eos[0] if isinstance(eos, list) else eos) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    base = Registry().get("smollm2-135m-instruct")
    registered, registered_tokenizer = models.load_causal_lm(base), models.load_tokenizer(base)
    messages = [PROMPTS[0]]
    expected = generation.generate(registered, registered_tokenizer, messages, 8, 1, stop_token_ids=generation.stop_ids(registered, registered_tokenizer))
    inputs = tokenizer.apply_chat_template(messages[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = exported.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert [tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)] == expected
    # `rlhf chat` on the exported folder (a path) answers the same, streamed.
    pieces: list[str] = []
    answer, stopped = chat.open_session(str(out), temperature=0, max_new_tokens=8).reply(messages[0][0]["content"], pieces.append)
    assert [answer] == expected and "".join(pieces) == answer and not stopped


# -- review fixes: what --overwrite may destroy, secrets in the card, errors as one line, a path's entry ----------

SECRET_KEY_VALUE = "0123456789abcdef0123456789abcdef01234567"  # a W&B-style key: only its key name gives it away
SECRET_ENV_VALUE = "set-since-registration-42"


@pytest.fixture
def tiny_output(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """tiny-llama saved as the output of a run `demo` (RLHF_HOME/demo/sft), registered ready as an sft entry whose
    config holds what a public card must not: a credential (recorded unscrubbed, as an older version did) and
    machine-local paths."""
    from stages.core import registry as registry_module

    registry = Registry()
    base = registry.get("tiny-llama")
    folder = isolated_home / "demo" / "sft"
    models.load_causal_lm(base).save_pretrained(folder)
    models.load_tokenizer(base).save_pretrained(folder)
    config = {
        "output_dir": str(folder), "wandb_api_key": SECRET_KEY_VALUE, "notes": f"pushed with {SECRET_ENV_VALUE}",
        "datasets": [{"source": "/home/someone/private/mine.jsonl"}], "train": {"learning_rate": 0.002},
    }
    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "scrub", lambda value: value)
        entry = registry.begin("sft", "sft", folder, parent="tiny-llama", run="demo", config=config)
    registry.mark_ready(entry.ref)
    return entry.ref, folder


def test_overwrite_refuses_to_destroy_registered_models_the_registry_or_the_working_folder(
    tiny_output: tuple[str, Path], isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`rlhf export sft:1 runs/demo --overwrite` once moved the run folder aside and deleted it, registry entry's
    folder included: every OUT that is, holds or lies inside a registered model's folder, that is or holds RLHF_HOME,
    or holds the working folder is refused in one line naming it, before anything is touched."""
    ref, folder = tiny_output
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    cases = [
        (folder, f"is the registered model {ref}"),
        (folder.parent, f"holds the registered model {ref}"),  # the run folder
        (folder / "inner", f"lies inside the registered model {ref}"),
        (isolated_home, "holds the registered model"),  # RLHF_HOME holds the run too: either says what would go
        (tmp_path, "holds the registered model"),
    ]
    for out, says in cases:
        for overwrite in (["--overwrite"], []):
            assert cli.main(["export", ref, str(out), *overwrite]) == 2, out
            error = capsys.readouterr().err
            assert str(out) in error and says in error and len(error.strip().splitlines()) == 1, error
    registry_only = tmp_path / "home_without_runs"
    (registry_only / "home").mkdir(parents=True)
    (registry_only / "home" / "keep.txt").write_text("mine\n")
    monkeypatch.setenv("RLHF_HOME", str(registry_only / "home"))
    assert cli.main(["export", "tiny-llama", str(registry_only), "--overwrite"]) == 2
    assert "RLHF_HOME" in capsys.readouterr().err
    working = tmp_path / "work" / "here"
    working.mkdir(parents=True)
    monkeypatch.chdir(working)
    assert cli.main(["export", "tiny-llama", str(tmp_path / "work"), "--overwrite"]) == 2
    assert f"holds the working folder {working}" in capsys.readouterr().err
    assert (registry_only / "home" / "keep.txt").is_file()
    after = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert [path for path in after if not path.startswith(("work", "home_without_runs"))] == before  # nothing touched
    assert Registry(isolated_home).get(ref).status == "ready"


def test_the_card_shows_no_secret_and_no_local_path(tiny_output: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry recorded unscrubbed, or whose secret became known since (an environment variable set now), exports
    a card without them; `output_dir` and absolute paths stay on this machine."""
    ref, folder = tiny_output
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET_ENV_VALUE)
    card = (export.export(ref, tmp_path / "exported") / "README.md").read_text()
    for leaked in (SECRET_KEY_VALUE, SECRET_ENV_VALUE, str(folder), "/home/someone", str(tmp_path), "output_dir"):
        assert leaked not in card, leaked
    for shown in ("wandb_api_key: <redacted>", "learning_rate: 0.002", "`.../mine.jsonl`"):
        assert shown in card, shown


def test_a_registered_outputs_folder_exports_its_entry(tiny_output: tuple[str, Path], tmp_path: Path) -> None:
    """`rlhf export RLHF_HOME/demo/sft OUT`: the entry registered there, not a bare `base` without lineage."""
    ref, folder = tiny_output
    card = (export.export(str(folder), tmp_path / "by_path") / "README.md").read_text()
    assert f"from the registry entry `{ref}`, run `demo`" in card and f"| 1 | `{ref}` | sft |" in card and "Original base: `tiny-llama`" in card


def test_an_unwritable_folder_and_a_model_without_stop_tokens_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                    capsys: pytest.CaptureFixture) -> None:
    from types import SimpleNamespace

    from transformers import GenerationConfig

    mkdir = Path.mkdir

    def refuse(path: Path, *args: object, **kwargs: object) -> None:
        if ".export-" in path.name:  # as in a folder this user may not write (tests run as root here: chmod is no test)
            raise PermissionError(13, "Permission denied", str(path))
        mkdir(path, *args, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cli.main(["export", "tiny-llama", str(tmp_path / "locked" / "out")]) == 2
    error = capsys.readouterr().err
    assert f"into the folder {tmp_path / 'locked'}: Permission denied" in error and len(error.strip().splitlines()) == 1
    monkeypatch.setattr(Path, "mkdir", mkdir)

    monkeypatch.setattr(generation, "stop_ids", lambda model, tokenizer: [])
    model = SimpleNamespace(generation_config=GenerationConfig(), config=None)
    with pytest.raises(export.ExportError, match=r"no-eos:1 has no token that ends an answer"):
        export._generation_config(model, SimpleNamespace(pad_token_id=None), "no-eos:1")


def test_stale_temporary_folders_of_killed_exports_are_removed_live_ones_kept(tmp_path: Path, dead_owner: dict) -> None:
    import os

    dead = tmp_path / f".out.export-{dead_owner['pid']}"
    live = tmp_path / f".out.export-{os.getppid()}"  # the process that started pytest: running
    other = tmp_path / f".other.export-{dead_owner['pid']}"  # another OUT's: not this export's business
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half written\n")
    export.export("tiny-llama", tmp_path / "out")
    assert not dead.exists() and live.exists() and other.exists() and (tmp_path / "out" / "model.safetensors").is_file()
