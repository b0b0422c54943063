"""Build the embedded byte-level tokenizer once; its output is committed under stages/core/resources/tiny_tokenizer.

Run: python tools/build_tokenizer.py
One token per byte (256) plus role/control tokens: lossless for any UTF-8 text, and one token per
character for the ASCII tasks the tiny model learns, which keeps arithmetic and reversal learnable.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "stages" / "core" / "resources" / "tiny_tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def main() -> None:
    byte_alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + byte_alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text maps byte for byte, so decode(encode(x)) == x.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        model_max_length=512,
    )
    fast.chat_template = (OUT / "chat_template.jinja").read_text()
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()
