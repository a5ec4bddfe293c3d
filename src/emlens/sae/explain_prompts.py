"""The prompts of SAE autointerp and the reading of their answers (the method of EleutherAI's delphi /
sae-auto-interp, Paulo et al. 2024: an explainer writes an explanation from highlighted contexts; scorers then
classify held-out contexts with it).

- Explainer: top-activating windows, the latent's strongest tokens between << >>, and random windows where it
  is silent; the answer's last line is `[EXPLANATION]: ...`.
- Detection: the explanation and a few plain windows; the scorer answers a list of 0 / 1 (which windows fit).
- Fuzzing: the explanation and a few activating windows, some highlighted where the latent fires and some
  re-highlighted at random tokens; the scorer answers a list of 0 / 1 (which are highlighted correctly).

An answer that does not have that form is unparsed (None), never read as a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

MARK = ("<<", ">>")

EXPLAINER_SYSTEM = """You are a meticulous AI researcher investigating patterns in language. You are shown text \
examples in which the tokens where one feature of a language model is most active are marked <<like this>> \
(consecutive marked tokens share one pair of marks), then counterexamples where the feature is silent.

- Describe, in one short phrase, what the marked tokens and their contexts have in common.
- Use the counterexamples to make the description specific.
- Do not mention the marks << >>, do not list several guesses.
- The last line of your answer must be the explanation, written as [EXPLANATION]: <the explanation>"""

EXPLAINER_EXAMPLE = """Examples where the feature is active:
Example 1: she paid the <<rent>> late again and the landlord
Example 2: a fine of two hundred <<dollars>> for parking there
Example 3: he saved enough <<money>> to buy a bike

Counterexamples (the feature is silent):
Example 4: the cat slept on the warm windowsill
Example 5: turn left at the second traffic light"""

EXAMPLE_EXPLANATION = "Money, prices and payments."
EXPLAINER_EXAMPLE_ANSWER = f"The marked words name money or payments.\n[EXPLANATION]: {EXAMPLE_EXPLANATION}"

DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given the explanation of a feature of text, such as "male pronouns" or "text with negative \
sentiment", and then several text examples. Decide which examples have the feature.

For each example in turn, write 1 if it has the feature and 0 if it does not. Answer with a Python list of \
0s and 1s, one per example, and nothing else."""

FUZZING_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given the explanation of a feature of text, such as "male pronouns" or "text with negative \
sentiment", and then text examples in which some tokens are marked <<like this>>. Some examples are marked \
correctly, others are not. An example is correct only if every marked token stands for the feature.

For each example in turn, write 1 if it is marked correctly and 0 if it is not. Answer with a Python list of \
0s and 1s, one per example, and nothing else."""

WEATHER = "Words about the weather, such as rain or snow."
DETECTION_SHOTS = (
    (WEATHER, ["heavy rain is expected over the weekend", "the function returns a list of integers",
               "we cancelled the picnic because it was snowing", "he signed the contract on Tuesday"], "[1,0,1,0]"),
    ("Python code that opens or reads files.", ["she laughed at the joke", "with open(path) as f: data = f.read()",
                                                "the museum opens at nine"], "[0,1,0]"),
)
FUZZING_SHOTS = (
    (WEATHER, ["heavy <<rain>> is expected over the weekend", "we cancelled the <<picnic>> because it was snowing",
               "the roads froze after the <<snow>> storm", "<<he>> said the forecast was <<wrong>>"], "[1,0,1,0]"),
)


def highlight(pieces: Sequence[str], marked: Sequence[bool]) -> str:
    """The window's text with each run of marked tokens between << >>, on one line."""
    out, inside = [], False
    for piece, mark in zip(pieces, marked, strict=True):
        if mark and not inside:
            out.append(MARK[0])
        elif not mark and inside:
            out.append(MARK[1])
        out.append(piece)
        inside = mark
    if inside:
        out.append(MARK[1])
    return one_line("".join(out))


def one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def numbered(examples: Sequence[str], start: int = 0) -> str:
    return "\n".join(f"Example {start + i}: {text}" for i, text in enumerate(examples))


def explainer_chat(activating: Sequence[str], silent: Sequence[str]) -> list[dict]:
    """The explainer's conversation: one worked example, then this latent's windows."""
    shown = f"Examples where the feature is active:\n{numbered(activating, 1)}"
    if silent:
        shown += f"\n\nCounterexamples (the feature is silent):\n{numbered(silent, len(activating) + 1)}"
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": EXPLAINER_EXAMPLE}, {"role": "assistant", "content": EXPLAINER_EXAMPLE_ANSWER},
            {"role": "user", "content": shown}]


def scorer_chat(system: str, shots, explanation: str, examples: Sequence[str]) -> list[dict]:
    chat = [{"role": "system", "content": system}]
    for shot_explanation, shot_examples, answer in shots:
        chat += [{"role": "user", "content": scorer_text(shot_explanation, shot_examples)},
                 {"role": "assistant", "content": answer}]
    return [*chat, {"role": "user", "content": scorer_text(explanation, examples)}]


def scorer_text(explanation: str, examples: Sequence[str]) -> str:
    return f"Feature explanation: {explanation}\n\nText examples:\n\n{numbered(examples)}"


def detection_chat(explanation: str, examples: Sequence[str]) -> list[dict]:
    return scorer_chat(DETECTION_SYSTEM, DETECTION_SHOTS, explanation, examples)


def fuzzing_chat(explanation: str, examples: Sequence[str]) -> list[dict]:
    return scorer_chat(FUZZING_SYSTEM, FUZZING_SHOTS, explanation, examples)


EXPLANATION = re.compile(r"\[EXPLANATION\]\s*:?[ \t]*(.*)", re.IGNORECASE)
MAX_EXPLANATION_CHARS = 300


def parse_explanation(answer: str) -> str | None:
    """The text after the first `[EXPLANATION]:` (to the end of its line); None when there is none, or it is
    empty or longer than an explanation can be."""
    found = EXPLANATION.search(answer or "")
    if found is None:
        return None
    text = found.group(1).strip().strip("\"'`*").strip()
    if not re.search(r"\w", text) or len(text) > MAX_EXPLANATION_CHARS:
        return None
    return text


def read_explanation(answer: str) -> tuple[str | None, str]:
    """(the explanation, "") or (None, why there is none): no marked line, or the worked example's explanation
    copied (small models do; it says nothing about this latent)."""
    explanation = parse_explanation(answer)
    if explanation is None:
        return None, "the explainer's answer has no [EXPLANATION]: line"
    if explanation.lower().rstrip(".") == EXAMPLE_EXPLANATION.lower().rstrip("."):
        return None, "the explainer copied the worked example's explanation"
    return explanation, ""


LIST = re.compile(r"\[[^\[\]]*\]")


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The first [...] in the answer read as n labels 0 / 1 (a lone 0 or 1 answers a one-example prompt);
    None when it is anything else: another length, other values, no list."""
    text = (answer or "").strip()
    if n == 1 and text.rstrip(".") in ("0", "1"):
        return [int(text.rstrip("."))]
    found = LIST.search(text)
    if found is None:
        return None
    try:
        labels = json.loads(found.group(0))
    except json.JSONDecodeError:
        return None
    if len(labels) != n or any(label not in (0, 1) or isinstance(label, float) for label in labels):
        return None
    return [int(label) for label in labels]
