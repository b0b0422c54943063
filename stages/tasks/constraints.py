"""Verifiable constraints for instruction prompts: IFEval's instruction types, with arguments drawn here, phrasings
written here, and a `repair` that rewrites an answer so it satisfies the constraint.

Each `ConstraintType` carries, for one IFEval instruction id (`if_verifiable.ifeval`'s INSTRUCTION_DICT):
- `arguments(rng, task)`: the checker's keyword arguments, IFEval's names and ranges (some drawn from the base task:
  a forbidden word the answer would naturally use, the request to repeat);
- `phrase(rng, arguments)`: the instruction in words. Our own phrasings (2-3 a type), not IFEval's prompt text and not
  its description templates, so a model is measured on wording it did not train on when IFEval-style suites score it;
- `repair(answer, arguments)`: the answer rewritten to follow the constraint (lowercased, commas removed, cut to
  a number of sentences, split into sections...), or None where it cannot be (an answer too short to split in
  five paragraphs). The sampling stage keeps a repaired answer only where the official checker then passes it:
  `repair` proposes, the checker decides (stages/sample.py, `repair: true`).

`conflicts` names groups of types that cannot hold together (two case rules, JSON with any other layout); a prompt
never carries two types of one group, nor a type twice. Scoring never happens here: reward/checkers.py runs the
checker package's own functions.

May import: the standard library only.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

Arguments = dict[str, Any]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Let me know if you have additional questions.",
               "Thank you for reading.", "That is all.")
COMMON_WORDS = ("the", "and", "is", "of", "to", "in", "it", "for", "that", "you")  # forbidden-word candidates besides the task's
EXTRA_KEYWORDS = ("simple", "clear", "example", "important", "future", "people", "time", "idea", "world", "change",
                  "careful", "balance", "history", "practice", "question", "answer", "value", "reason", "friend", "plan")


@dataclass(frozen=True)
class ConstraintType:
    instruction_id: str
    arguments: Callable[[random.Random, dict[str, Any]], Arguments]
    phrases: tuple[str, ...]  # str.format templates over the arguments (and {keywords_text} etc. from `_words`)
    repair: Callable[[str, Arguments], str | None]
    conflicts: tuple[str, ...] = ()  # group names

    def phrase(self, rng: random.Random, arguments: Arguments) -> str:
        return rng.choice(self.phrases).format(**arguments, **_words(arguments))


def _words(arguments: Arguments) -> dict[str, str]:
    """Lists as text for the phrasings: keywords 'a' and 'b'."""
    out = {}
    for name in ("keywords", "forbidden_words"):
        if name in arguments:
            quoted = [f"'{word}'" for word in arguments[name]]
            out[f"{name}_text"] = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    if "relation" in arguments:
        out["relation_text"] = "fewer than" if arguments["relation"] == "less than" else "at least"
    for name in ("let_relation", "capital_relation"):
        if name in arguments:
            out[f"{name}_text"] = "fewer than" if arguments[name] == "less than" else "at least"
    return out


def sentences(text: str) -> list[str]:
    """The answer cut into sentences (a plain regex: the checker's own counting decides afterwards)."""
    flat = " ".join(line.strip(" *-#\t") for line in text.splitlines() if line.strip())
    return [piece.strip() for piece in SENTENCE_END.split(flat) if piece.strip()]


def _groups(items: list[str], count: int) -> list[list[str]] | None:
    """`items` in `count` consecutive, non-empty groups of near-equal size; None if there are too few."""
    if count < 1 or len(items) < count:
        return None
    size, extra = divmod(len(items), count)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(items[start:end])
        start = end
    return groups


def _without_markup(text: str) -> str:
    """Asterisks, bullets, section headers and dividers out: a repaired layout starts from plain sentences."""
    return re.sub(r"\*+|^\s*[-#]+\s*", "", text, flags=re.MULTILINE)


# -- repairs --------------------------------------------------------------------------------------

def _lowercase(answer: str, _: Arguments) -> str:
    return answer.lower()


def _uppercase(answer: str, _: Arguments) -> str:
    return answer.upper()


def _capital_words(answer: str, arguments: Arguments) -> str | None:
    words = answer.split()
    target = arguments["capital_frequency"]
    if arguments["capital_relation"] == "less than":
        return " ".join(word.lower() if word.isupper() else word for word in words)
    if len(words) < target + 1:
        return None
    lowered = [word.lower() if word.isupper() else word for word in words]
    shout = set(range(0, len(words), max(1, len(words) // (target + 1))))  # spread: not one shouted opening
    return " ".join(word.upper() if index in shout else word for index, word in enumerate(lowered))


def _no_comma(answer: str, _: Arguments) -> str:
    return re.sub(r"\s*,\s*", " ", answer).replace("，", " ")


def _end_phrase(answer: str, arguments: Arguments) -> str:
    return answer.rstrip() + "\n" + arguments["end_phrase"]  # one newline: not a paragraph of its own


def _quotation(answer: str, _: Arguments) -> str:
    return '"' + answer.strip().strip('"') + '"'


def _title(answer: str, arguments: Arguments) -> str:
    return f"<<{arguments.get('_title') or 'My Answer'}>>\n\n{answer.strip()}" if "<<" not in answer else answer


def _postscript(answer: str, arguments: Arguments) -> str:
    return f"{answer.rstrip()}\n{arguments['postscript_marker']} I hope this is useful."


def _json(answer: str, _: Arguments) -> str:
    return "```json\n" + json.dumps({"answer": answer.strip()}, indent=2) + "\n```"


def _keywords_in(answer: str, arguments: Arguments) -> str:
    missing = [word for word in arguments["keywords"] if not re.search(re.escape(word), answer, flags=re.IGNORECASE)]
    if not missing:
        return answer
    listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    return f"{answer.rstrip()} This also touches on {listed}."


def _forbidden_out(answer: str, arguments: Arguments) -> str:
    for word in arguments["forbidden_words"]:
        answer = re.sub(r"\b" + re.escape(word) + r"\b\s?", "", answer, flags=re.IGNORECASE)
    return answer


def _keyword_frequency(answer: str, arguments: Arguments) -> str:
    word, count = arguments["keyword"], arguments["frequency"]
    found = len(re.findall(word, answer, flags=re.IGNORECASE))
    if arguments["relation"] == "less than":
        excess = max(0, found - count + 1)
        pattern = re.compile(r"\b" + re.escape(word) + r"\b\s?", flags=re.IGNORECASE)
        return pattern.sub("", answer, count=excess)
    extra = " ".join(f"The word {word} matters here." for _ in range(max(0, count - found)))
    return f"{answer.rstrip()} {extra}".rstrip()


def _letter_frequency(answer: str, arguments: Arguments) -> str | None:
    letter, count = arguments["letter"], arguments["let_frequency"]
    found = answer.lower().count(letter)
    if arguments["let_relation"] == "at least":
        words = [word for word in re.findall(r"[A-Za-z]+", answer) if letter in word.lower()]
        if found >= count:
            return answer
        filler = words[0] if words else letter * 3
        return f"{answer.rstrip()} " + " ".join([filler] * (count - found))
    kept = []
    for sentence in sentences(answer):  # fewer than `count`: whole sentences while the letter stays under it
        if sum(piece.lower().count(letter) for piece in kept) + sentence.lower().count(letter) >= count:
            break
        kept.append(sentence)
    return " ".join(kept) or None


def _number_sentences(answer: str, arguments: Arguments) -> str | None:
    parts, count = sentences(answer), arguments["num_sentences"]
    if arguments["relation"] == "less than":
        keep = count - 1 - arguments.get("_reserve_sentences", 0)  # room for what later repairs append
        return " ".join(parts[:keep]) if keep >= 1 and parts else None
    return answer if len(parts) >= count else None


def _number_words(answer: str, arguments: Arguments) -> str | None:
    count = arguments["num_words"]
    if arguments["relation"] == "at least":
        return answer if len(answer.split()) >= count else None
    kept, words = [], 0
    budget = count - 2 - arguments.get("_reserve_words", 0)  # the checker's tokenizer may count a few more words
    for sentence in sentences(answer):
        if words + len(sentence.split()) >= budget:  # the checker's tokenizer may count a few more words
            break
        kept.append(sentence)
        words += len(sentence.split())
    return " ".join(kept) or None


def _paragraphs(answer: str, arguments: Arguments) -> str | None:
    groups = _groups(sentences(_without_markup(answer)), arguments["num_paragraphs"])
    return None if groups is None else "\n\n***\n\n".join(" ".join(group) for group in groups)


def _nth_paragraph(answer: str, arguments: Arguments) -> str | None:
    groups = _groups(sentences(_without_markup(answer)), arguments["num_paragraphs"])
    if groups is None:
        return None
    paragraphs = [" ".join(group) for group in groups]
    nth = arguments["nth_paragraph"] - 1
    paragraphs[nth] = f"{arguments['first_word'].capitalize()}, {paragraphs[nth][0].lower()}{paragraphs[nth][1:]}"
    return "\n\n".join(paragraphs)


def _bullets(answer: str, arguments: Arguments) -> str | None:
    parts = sentences(_without_markup(answer))
    count = arguments["num_bullets"]
    return None if len(parts) < count else "\n".join(f"* {sentence}" for sentence in parts[:count])


def _highlights(answer: str, arguments: Arguments) -> str | None:
    parts = sentences(_without_markup(answer))
    count = arguments["num_highlights"]
    if len(parts) < count:
        return None
    return " ".join(f"*{sentence}*" if index < count else sentence for index, sentence in enumerate(parts))


def _sections(answer: str, arguments: Arguments) -> str | None:
    groups = _groups(sentences(_without_markup(answer)), arguments["num_sections"])
    if groups is None:
        return None
    return "\n\n".join(f"{arguments['section_spliter']} {index}\n{' '.join(group)}" for index, group in enumerate(groups, 1))


def _placeholders(answer: str, arguments: Arguments) -> str:
    names = ["[name]", "[date]", "[place]", "[number]", "[email]", "[topic]"]
    have = len(re.findall(r"\[.*?\]", answer))
    wanted = max(0, arguments["num_placeholders"] - have)
    return answer if not wanted else f"{answer.rstrip()} Fill in: {', '.join(names[:wanted])}."


def _repeat_prompt(answer: str, arguments: Arguments) -> str:
    return f"{arguments['prompt_to_repeat']}\n\n{answer.strip()}"


def _two_responses(answer: str, _: Arguments) -> str | None:
    halves = _groups(sentences(answer), 2)
    if halves is None or halves[0] == halves[1]:
        return None
    return f"{' '.join(halves[0])}\n******\n{' '.join(halves[1])}"


# -- argument samplers ----------------------------------------------------------------------------

def _none(rng: random.Random, task: dict[str, Any]) -> Arguments:
    return {}


def _relation(rng: random.Random) -> str:
    return rng.choice(("less than", "at least"))


TYPES: dict[str, ConstraintType] = {t.instruction_id: t for t in (
    ConstraintType("change_case:english_lowercase", _none, (
        "Write your whole answer in lowercase letters; no capital letters at all.",
        "Use only lowercase letters throughout your reply.",
        "Do not use any capital letters in your response."), _lowercase, ("case",)),
    ConstraintType("change_case:english_capital", _none, (
        "Write your entire answer in capital letters.",
        "Your reply must be in English and in all uppercase letters.",
        "Answer using uppercase letters only."), _uppercase, ("case",)),
    ConstraintType("change_case:capital_word_frequency",
                   lambda rng, task: {"capital_relation": _relation(rng), "capital_frequency": rng.randint(2, 8)}, (
        "Words written fully in capitals should appear {capital_relation_text} {capital_frequency} times.",
        "Use {capital_relation_text} {capital_frequency} words in all capital letters."), _capital_words, ("case",)),
    ConstraintType("punctuation:no_comma", _none, (
        "Do not use a single comma in your answer.",
        "Avoid commas entirely.",
        "Your reply must contain no commas."), _no_comma, ("comma",)),
    ConstraintType("startend:end_checker", lambda rng, task: {"end_phrase": rng.choice(END_PHRASES)}, (
        'Close your reply with the exact phrase "{end_phrase}" and write nothing after it.',
        'The very last words of your answer must be: "{end_phrase}"'), _end_phrase, ("end",)),
    ConstraintType("startend:quotation", _none, (
        "Put your entire reply inside double quotation marks.",
        "Wrap the whole answer in double quotes."), _quotation, ("wrap", "end", "lines")),
    ConstraintType("detectable_format:title", _none, (
        "Give your answer a title enclosed in double angle brackets, like <<my title>>.",
        "Start with a title written between double angular brackets, for example <<a title>>."), _title, ("wrap",)),
    ConstraintType("detectable_content:postscript", lambda rng, task: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}, (
        "Add a postscript at the end that begins with {postscript_marker}",
        "Finish with a short note starting with {postscript_marker}"), _postscript, ("end",)),
    ConstraintType("detectable_format:json_format", _none, (
        "Format your whole output as JSON; markdown code fences are allowed.",
        "Return your answer wrapped in valid JSON."), _json, ("wrap", "end", "layout", "case")),
    ConstraintType("keywords:existence", lambda rng, task: {"keywords": rng.sample(EXTRA_KEYWORDS, rng.randint(1, 2))}, (
        "Make sure the words {keywords_text} appear in your answer.",
        "Include the keywords {keywords_text} somewhere in your reply."), _keywords_in, ("keywords",)),
    ConstraintType("keywords:forbidden_words",
                   lambda rng, task: {"forbidden_words": sorted({rng.choice(COMMON_WORDS[:4]), *rng.sample(COMMON_WORDS[4:], 1)})}, (
        "Do not use the words {forbidden_words_text} anywhere in your answer.",
        "Your reply must not contain the words {forbidden_words_text}."), _forbidden_out, ("keywords", "end", "start")),
    ConstraintType("keywords:frequency",
                   lambda rng, task: {"keyword": rng.choice(EXTRA_KEYWORDS), "frequency": rng.randint(1, 3), "relation": _relation(rng)}, (
        "The word '{keyword}' should appear {relation_text} {frequency} times in your reply.",
        "Use the word '{keyword}' {relation_text} {frequency} times."), _keyword_frequency, ("keywords",)),
    ConstraintType("keywords:letter_frequency",
                   lambda rng, task: {"letter": rng.choice("bcdfgkmpwy"), "let_frequency": rng.randint(2, 8), "let_relation": _relation(rng)}, (
        "The letter '{letter}' should appear {let_relation_text} {let_frequency} times in your answer.",
        "Use the letter '{letter}' {let_relation_text} {let_frequency} times."), _letter_frequency, ("letters",)),
    ConstraintType("length_constraints:number_sentences",
                   lambda rng, task: {"num_sentences": rng.randint(2, 6), "relation": _relation(rng)}, (
        "Your answer should have {relation_text} {num_sentences} sentences.",
        "Write {relation_text} {num_sentences} sentences."), _number_sentences, ("length",)),
    ConstraintType("length_constraints:number_words",
                   lambda rng, task: {"num_words": rng.choice((30, 50, 80, 100, 150)), "relation": _relation(rng)}, (
        "Answer in {relation_text} {num_words} words.",
        "Your reply should be {relation_text} {num_words} words long."), _number_words, ("length",)),
    ConstraintType("length_constraints:number_paragraphs", lambda rng, task: {"num_paragraphs": rng.randint(2, 4)}, (
        "Write exactly {num_paragraphs} paragraphs, separated from each other by the markdown divider ***.",
        "Your answer needs {num_paragraphs} paragraphs; put *** on its own line between paragraphs."), _paragraphs, ("layout",)),
    ConstraintType("length_constraints:nth_paragraph_first_word",
                   lambda rng, task: (lambda count: {"num_paragraphs": count, "nth_paragraph": rng.randint(1, count),
                                                     "first_word": rng.choice(("first", "also", "finally", "overall", "today"))})(rng.randint(2, 4)), (
        "Write {num_paragraphs} paragraphs separated by blank lines; paragraph number {nth_paragraph} must begin with the word '{first_word}'.",), _nth_paragraph, ("layout",)),
    ConstraintType("detectable_format:number_bullet_lists", lambda rng, task: {"num_bullets": rng.randint(2, 5)}, (
        "Answer with exactly {num_bullets} bullet points in markdown, each line starting with *.",
        "Give exactly {num_bullets} markdown bullet points such as:\n* first point\n* second point"), _bullets, ("layout", "lines")),
    ConstraintType("detectable_format:number_highlighted_sections", lambda rng, task: {"num_highlights": rng.randint(1, 3)}, (
        "Highlight at least {num_highlights} parts of your answer with markdown, as in *a highlighted part*.",
        "Mark {num_highlights} or more sections in italics with single asterisks, like *this*."), _highlights, ("layout",)),
    ConstraintType("detectable_format:multiple_sections",
                   lambda rng, task: {"section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 4)}, (
        "Organise your answer in {num_sections} parts, each starting with {section_spliter} and its number ({section_spliter} 1, {section_spliter} 2, ...).",
        "Split the reply into {num_sections} sections labelled {section_spliter} 1, {section_spliter} 2 and so on."), _sections, ("layout", "case")),
    ConstraintType("detectable_content:number_placeholders", lambda rng, task: {"num_placeholders": rng.randint(1, 3)}, (
        "Include at least {num_placeholders} placeholders in square brackets, such as [name].",
        "Leave {num_placeholders} or more blanks for the reader to fill in, written in square brackets like [date]."), _placeholders, ()),
    ConstraintType("combination:repeat_prompt", lambda rng, task: {"prompt_to_repeat": task["text"]}, (
        "First repeat the request word for word without change, then give your answer (do not repeat anything said after the request).",
        "Begin by copying the request above exactly as written, then answer it; do not copy these extra instructions."), _repeat_prompt, ("start", "wrap", "comma")),
    ConstraintType("combination:two_responses", _none, (
        "Give two different answers, separated by a line of six asterisks: ******",
        "Write two distinct replies and put ****** between them, nothing else separating them."), _two_responses, ("layout", "wrap")),
)}


def compatible(chosen: list[str], candidate: str) -> bool:
    """Whether `candidate` may join the types already `chosen` for one prompt."""
    groups = set(TYPES[candidate].conflicts)
    return candidate not in chosen and not any(groups & set(TYPES[other].conflicts) for other in chosen)


def complete(answer: str) -> bool:
    """Whether the answer ends where a writer would stop (closing punctuation, a bracket, a code fence), not mid-sentence
    at the token cap."""
    return answer.rstrip().endswith(ENDINGS)


def trim_fragment(answer: str) -> str:
    """An answer cut at the token cap without its unfinished last sentence (unchanged if it ends complete)."""
    if complete(answer):
        return answer
    cut = max(answer.rfind(mark) for mark in (". ", "! ", "? ", ".\n", "!\n", "?\n"))
    return answer[: cut + 1].rstrip() if cut > 0 else answer


ENDINGS = (".", "!", "?", '"', "'", ")", "]", "}", "*", "`", ">", ":")


def repair_all(answer: str, instruction_ids: list[str], kwargs: list[Arguments]) -> str | None:
    """The answer rewritten to follow each constraint in turn (an unfinished last sentence dropped first; length cuts
    next, leaving room for what other repairs append; then layouts, added words, endings, and what wraps the whole
    text); None if one cannot be repaired. Only the checker says whether the result passes."""
    answer = trim_fragment(answer)
    arguments = [{k: v for k, v in (given or {}).items() if v is not None} for given in kwargs]
    reserve_sentences = reserve_words = 0
    for instruction_id, given in zip(instruction_ids, arguments):
        sentences_added, words_added = _APPENDS.get(instruction_id, (0, 0))
        if instruction_id == "combination:repeat_prompt":
            sentences_added, words_added = len(sentences(given["prompt_to_repeat"])), len(given["prompt_to_repeat"].split())
        if instruction_id == "keywords:frequency" and given.get("relation") == "at least":
            sentences_added, words_added = given["frequency"], 5 * given["frequency"]
        reserve_sentences, reserve_words = reserve_sentences + sentences_added, reserve_words + words_added
    order = sorted(range(len(instruction_ids)), key=lambda index: _REPAIR_ORDER.get(instruction_ids[index], 2))
    for index in order:
        constraint = TYPES.get(instruction_ids[index])
        if constraint is None or answer is None:
            return None
        answer = constraint.repair(answer, arguments[index] | {"_reserve_sentences": reserve_sentences, "_reserve_words": reserve_words})
    return answer


# What a repair appends, in (sentences, words): length cuts leave room for it.
_APPENDS = {"detectable_content:postscript": (1, 7), "startend:end_checker": (1, 10), "keywords:existence": (1, 8),
            "detectable_content:number_placeholders": (1, 6), "detectable_format:title": (0, 3)}

# Length cuts first, then layouts (they rebuild the text from its sentences), then added words, endings, the
# repeated request; the case and comma rules after every repair that adds words (the end phrases have capitals);
# wrappers (quotes, JSON) last.
_REPAIR_ORDER = {
    "length_constraints:number_words": 0, "length_constraints:number_sentences": 0, "keywords:letter_frequency": 0,
    "length_constraints:number_paragraphs": 1, "length_constraints:nth_paragraph_first_word": 1, "combination:two_responses": 1,
    "detectable_format:number_bullet_lists": 1, "detectable_format:number_highlighted_sections": 1, "detectable_format:multiple_sections": 1,
    "keywords:existence": 2, "keywords:frequency": 2, "detectable_content:number_placeholders": 2,
    "detectable_format:title": 3, "startend:end_checker": 3, "detectable_content:postscript": 3, "combination:repeat_prompt": 4,
    "change_case:english_lowercase": 5, "change_case:english_capital": 5, "change_case:capital_word_frequency": 5,
    "punctuation:no_comma": 5, "keywords:forbidden_words": 5,
    "startend:quotation": 6, "detectable_format:json_format": 6,
}
