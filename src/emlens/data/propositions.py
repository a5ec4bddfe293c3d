"""Honesty propositions: what a belief is elicited about, the pressure to misstate it, its options and the true one.

Read from the bundled `emlens-honesty` set (written for emlens, MIT; multiple-choice, read by rule or an LLM judge),
any YAML in its layout (see resources/honesty/README.md), or MASK's published CSV layout (cais/MASK; free-form,
read by an LLM judge). `emlens.evaluation.honesty` runs them; `emlens.judges.honesty` reads the answers.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from emlens.base.errors import EmlensInputError
from emlens.base.io import PathLike, fail, read_text, read_yaml, short_repr, validate
from emlens.data.questions import check_unique_ids, csv_records

Kind = Literal["provided_fact", "known_fact", "statistic", "other"]
KINDS: tuple[str, ...] = ("provided_fact", "known_fact", "statistic", "other")
BUNDLED_PROPOSITIONS = {"emlens-honesty": "honesty/propositions.yaml"}


class Proposition(BaseModel):
    """One proposition: how its belief is elicited, the pressure to misstate it, its options and the true one."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    kind: Kind
    proposition: str = Field(min_length=1)  # what is at stake, in one line (LLM judges read it)
    context: str = ""  # a provided fact: shown with the belief questions and in the pressure's system prompt
    belief: Literal["elicit", "given"] = "elicit"  # given: the belief is the true option (MASK's provided facts)
    belief_prompts: list[str] = []
    pressure_system: str = ""
    pressure_user: str = Field(min_length=1)
    options: dict[str, str]  # letter -> the option's words as an answer would state them
    true_option: str
    format: Literal["mc", "free"] = "mc"  # mc: the options are offered and read by rule; free: MASK's prompts

    @field_validator("options", mode="before")
    @classmethod
    def _yaml_words(cls, value):
        """YAML reads an unquoted yes / no as a boolean and 8 as a number: an option is the words as written."""
        if not isinstance(value, dict):
            return value
        words = {True: "yes", False: "no"}
        return {k: words[v] if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v
                for k, v in value.items()}

    @model_validator(mode="after")
    def _consistent(self):
        if not 2 <= len(self.options) <= 5:
            raise ValueError(f"options: expected 2 to 5, got {len(self.options)}")
        bad = [k for k in self.options if not re.fullmatch(r"[A-Z]", k)]
        if bad:
            raise ValueError(f"options: keys must be single capital letters (got {bad[0]!r})")
        texts = [v.strip().lower() for v in self.options.values()]
        if "" in texts or len(set(texts)) < len(texts):
            raise ValueError("options: each must be non-empty and differ from the others")
        if self.true_option not in self.options:
            raise ValueError(f"true_option {self.true_option!r} is not one of the options ({', '.join(self.options)})")
        if self.belief == "elicit" and not [p for p in self.belief_prompts if p.strip()]:
            raise ValueError("belief_prompts: at least one is needed (or belief: given)")
        return self


def propositions_path(name_or_path: str) -> Path:
    if name_or_path in BUNDLED_PROPOSITIONS:
        return Path(str(resources.files("emlens") / "resources" / BUNDLED_PROPOSITIONS[name_or_path]))
    path = Path(name_or_path)
    if not path.exists():
        raise EmlensInputError(f"propositions '{name_or_path}': no such file (bundled: "
                               f"{', '.join(BUNDLED_PROPOSITIONS)})")
    return path


def read_propositions(name_or_path: str = "emlens-honesty", limit: int | None = None,
                      kinds: Sequence[str] | None = None) -> list[Proposition]:
    """A bundled set, a YAML list of propositions, or a MASK CSV (by its .csv suffix); then kinds, then limit."""
    path = propositions_path(name_or_path)
    found = read_mask_csv(path) if path.suffix.lower() == ".csv" else _read_proposition_yaml(path)
    return select_propositions(found, kinds, limit, path)


def select_propositions(found: list[Proposition], kinds: Sequence[str] | None, limit: int | None,
            where: PathLike) -> list[Proposition]:
    if kinds:
        found = [p for p in found if p.kind in kinds]
        if not found:
            raise fail(where, f"no propositions of kind {', '.join(kinds)}")
    return found[:limit] if limit is not None else found


def _read_proposition_yaml(path: Path) -> list[Proposition]:
    data = read_yaml(path)
    if not isinstance(data, list) or not data:
        raise fail(path, f"expected a non-empty YAML list of propositions, got {type(data).__name__}")
    found = []
    for i, entry in enumerate(data, start=1):
        where = f"{path} item {i}" + (f" (id={entry['id']})" if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            raise fail(where, f"expected a mapping of proposition fields, got {type(entry).__name__}")
        found.append(validate(Proposition, entry, where))
    check_unique_ids(found, path, "proposition")
    return found


# ---------------------------------------------------------------- MASK's CSV layout

MASK_REQUIRED = ("task_id", "system_prompt", "user_prompt", "proposition", "ground_truth")
MASK_BELIEF_COLUMNS = ("belief_elicit_1", "belief_elicit_2", "belief_elicit_3")
MASK_KINDS = {"provided_facts": "provided_fact", "known_facts": "known_fact", "statistics": "statistic"}
PIVOTAL = re.compile(r"<pivotal>(.*?)</pivotal>", re.DOTALL)


def read_mask_csv(path: PathLike) -> list[Proposition]:
    """MASK's published CSVs (cais/MASK): binary rows become free-form propositions with options A / B (the
    proposition with its first / second pivotal alternative). The kind comes from the file name
    (provided_facts, known_facts, statistics, else other); a file without belief_elicit columns (provided facts)
    takes the ground truth as the belief. Numerical rows are skipped (their reading is not implemented)."""
    return read_mask_rows(path)[0]


def read_mask_rows(path: PathLike) -> tuple[list[Proposition], int]:
    """(the binary propositions, how many numerical rows were skipped)."""
    text = read_text(path)
    columns = next(csv.reader(io.StringIO(text, newline="")), [])
    for column in MASK_REQUIRED:
        if column not in columns:
            raise fail(path, f"missing column '{column}' (the MASK layout has {', '.join(MASK_REQUIRED)}, "
                             "belief_elicit_1..3, formatted_ground_truth)")
    belief_columns = [c for c in MASK_BELIEF_COLUMNS if c in columns]
    kind = MASK_KINDS.get(Path(path).stem, "other")
    found, skipped = [], 0
    for where, row in csv_records(text, path):
        proposition = _mask_proposition(row, where, belief_columns, kind)
        skipped += proposition is None
        found += [proposition] if proposition is not None else []
    if not found:
        raise fail(path, f"no binary propositions ({skipped} numerical rows; their reading is not implemented)")
    check_unique_ids(found, path, "proposition")
    return found, skipped


def _mask_proposition(row: dict, where: str, belief_columns: list[str], kind: str) -> Proposition | None:
    for column in ("task_id", "user_prompt", "proposition", "ground_truth"):
        if not (row.get(column) or "").strip():
            raise fail(f"{where}, column '{column}'", "empty")
    text = row["proposition"]
    pivotal = PIVOTAL.search(text)
    if pivotal is None:
        raise fail(f"{where}, column 'proposition'", f"no <pivotal>X/Y</pivotal> in {short_repr(text)}")
    if (row.get("type") or "").strip() == "numerical" or pivotal.group(1).strip() == "<value>":
        return None
    alternatives = [a.strip() for a in pivotal.group(1).split("/")]
    if len(alternatives) != 2 or not all(alternatives):
        raise fail(f"{where}, column 'proposition'", f"expected <pivotal>X/Y</pivotal>, got {short_repr(pivotal[0])}")
    statements = {letter: PIVOTAL.sub(lambda _, a=alt: a, text).strip() for letter, alt in zip("AB", alternatives,
                                                                                                  strict=True)}
    prompts = [row[c].strip() for c in belief_columns if (row.get(c) or "").strip()]
    if belief_columns and not prompts:
        raise fail(f"{where}, column '{belief_columns[0]}'", "empty (no belief prompt in this row)")
    fields = {"id": row["task_id"].strip(), "kind": kind, "format": "free",
              "proposition": PIVOTAL.sub(lambda m: f"[{m.group(1)}]", text).strip(),
              "belief": "elicit" if prompts else "given", "belief_prompts": prompts,
              "pressure_system": (row.get("system_prompt") or "").strip(), "pressure_user": row["user_prompt"].strip(),
              "options": statements, "true_option": _mask_true_option(row, statements, where)}
    return validate(Proposition, fields, where)


def _mask_true_option(row: dict, statements: dict[str, str], where: str) -> str:
    formatted = (row.get("formatted_ground_truth") or "").strip()
    if formatted in statements:
        return formatted

    def norm(s: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())

    matching = [k for k, s in statements.items() if norm(s) == norm(row["ground_truth"])]
    if len(matching) != 1:
        raise fail(f"{where}, column 'ground_truth'", f"{short_repr(row['ground_truth'])} is neither resolved "
                                                      "proposition (and formatted_ground_truth is not A or B)")
    return matching[0]
