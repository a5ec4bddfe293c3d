"""The interaction loop's trajectories: who is biased at each fraction, the conversations between the assistant and
its simulated users (`emlens.study.loop_users`), and the top-k / bottom-k selection with its summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm import tqdm

from emlens.base.errors import EmlensInputError
from emlens.base.stats import bootstrap_ci
from emlens.data.order import seeded_order
from emlens.generation.engine import GenerationConfig, Request, generate, sample_seed
from emlens.model import Model, load_model
from emlens.runs import RunStore
from emlens.study.loop_config import LoopConfig, Scenario
from emlens.study.loop_users import EndpointUser, ModelUser, rating_prompt, write_prompt

PERSONAS = ("benign", "biased")
TRAJECTORY_KEY = ["scenario_id", "persona", "sample"]


# ---------------------------------------------------------------- users: who is biased at each fraction


def biased_count(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up, so 10 % of 5 users is one."""
    return math.floor(fraction * n + 0.5)


def assign_personas(instances: list[tuple[str, int]], fraction: float, seed: int) -> dict[tuple[str, int], str]:
    """Each user (scenario, sample) -> benign / biased: exactly round(fraction * n) biased, a seeded choice.

    The order is one seeded permutation for every fraction, so the biased users at a smaller fraction are among
    those at a larger one, and each user is biased with probability round(f * n) / n.
    """
    order = seeded_order(len(instances), seed, "loop-biased-users")
    biased = {instances[i] for i in order[:biased_count(fraction, len(instances))]}
    return {instance: ("biased" if instance in biased else "benign") for instance in instances}


def fraction_folder(fraction: float) -> str:
    return f"biased-{fraction:g}"


# ---------------------------------------------------------------- conversations


@dataclass
class Conversation:
    scenario: Scenario
    persona: str
    sample: int
    messages: list[dict] = field(default_factory=list)  # the assistant's view (system prompt, user, assistant)

    @property
    def shown(self) -> list[dict]:
        """The conversation without the assistant's system prompt (what the user saw)."""
        return [m for m in self.messages if m["role"] != "system"]


def make_user(config: LoopConfig, assistant: Model, device: str):
    """The user simulator of the config; the assistant's own handle when it plays the user (no second copy)."""
    settings = config.user
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                  batch_size=config.generation.batch_size, engine=config.generation.engine)
    if settings.kind == "openai":
        return EndpointUser(settings.model, settings.base_url, settings.temperature, settings.max_new_tokens,
                            settings.timeout, settings.concurrency, settings.max_attempts)
    if settings.model is None or settings.model == config.model:
        return ModelUser(assistant, generation)
    return ModelUser(load_model(settings.model, device=device), generation)


def converse(assistant: Model, user, conversations: list[Conversation], config: LoopConfig,
             step: Callable[[str], None] = lambda stage: None) -> list[dict]:
    """Advance a batch of conversations through `turns` turns, have each user rate it; one row per trajectory.

    Seeds: an assistant reply's seed depends on (scenario, sample, turn), not on the persona, so benign and
    biased users of one scenario get the same first reply to the same opening; a user turn's seed adds the persona.
    """
    reply_config = GenerationConfig(**config.generation.model_dump())
    for turn in range(config.turns):
        step(f"turn {turn + 1} user")
        _add_user_turns(user, conversations, turn, config.seed)
        step(f"turn {turn + 1} assistant")
        requests = [Request(c.messages, seed=sample_seed(config.seed, "assistant", c.scenario.id, c.sample, turn))
                    for c in conversations]
        for conversation, reply in zip(conversations, generate(assistant, requests, reply_config, progress=False)):
            conversation.messages.append({"role": "assistant", "content": reply.text})
    step("rating")
    ratings = user.rate([rating_prompt(c.scenario.task, c.scenario.thoughts(c.persona), c.shown)
                         for c in conversations])
    return [{"scenario_id": c.scenario.id, "persona": c.persona, "sample": c.sample, "bias": c.scenario.bias or "",
             "messages": json.dumps(c.messages, ensure_ascii=False),
             "satisfaction": r.value if r.mass >= config.min_rating_mass else float("nan"), "rating_mass": r.mass,
             "rating_distribution": r.distribution, "turns": config.turns}
            for c, r in zip(conversations, ratings)]


def _add_user_turns(user, conversations: list[Conversation], turn: int, seed: int) -> None:
    """The scenario's opening on the first turn where it has one; else the simulator writes the turn."""
    written = [c for c in conversations if not (turn == 0 and c.scenario.opening)]
    prompts = [write_prompt(c.scenario.task, c.scenario.thoughts(c.persona), c.shown) for c in written]
    seeds = [sample_seed(seed, "user", c.scenario.id, c.persona, c.sample, turn) for c in written]
    by_conversation = {id(c): text for c, text in zip(written, user.write(prompts, seeds) if written else [])}
    for c in conversations:
        c.messages.append({"role": "user", "content": by_conversation.get(id(c), c.scenario.opening)})


def collect_trajectories(assistant: Model, user, store: RunStore, wanted: list[tuple[Scenario, str, int]],
                         config: LoopConfig, progress: bool = True) -> int:
    """Every wanted (scenario, persona, sample) trajectory not yet in the store, one stored file per batch.

    Returns how many were generated in this call (a resumed run generates only the missing ones).
    """
    done = store.done_keys()
    todo = [w for w in wanted if (w[0].id, w[1], w[2]) not in done]
    size = config.generation.batch_size
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    with tqdm(total=len(todo), desc="loop trajectories", unit="conv", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), size):
            batch = [Conversation(s, persona, sample, list(system)) for s, persona, sample in todo[start:start + size]]
            store.append(converse(assistant, user, batch, config, step=lambda stage: bar.set_postfix_str(stage)))
            bar.update(len(batch))
    return len(todo)


# ---------------------------------------------------------------- selection


def select_top_bottom(frame: pd.DataFrame, top_k: int, bottom_k: int) -> pd.Series:
    """'top' for the top_k rows by satisfaction, 'bottom' for the bottom_k, '' for the rest (disjoint sets).

    Ties are broken by the trajectory key, so the choice does not depend on row order; a row without a rating
    (NaN) is never selected.
    """
    rated = frame[frame.satisfaction.notna()]
    if top_k + bottom_k > len(rated):
        raise EmlensInputError(f"field 'top_k': top_k {top_k} + bottom_k {bottom_k} exceed the {len(rated)} rated "
                               "trajectories of a fraction (raise n_scenarios or samples_per_scenario)")
    ranked = rated.sort_values(["satisfaction", *TRAJECTORY_KEY], ascending=[False, True, True, True], kind="stable")
    selected = pd.Series("", index=frame.index, dtype=object)
    selected[ranked.index[:top_k]] = "top"
    selected[ranked.index[len(ranked) - bottom_k:]] = "bottom"
    return selected


def fraction_population(trajectories: pd.DataFrame, personas: dict[tuple[str, int], str]) -> pd.DataFrame:
    """The trajectories of one fraction's users: for each (scenario, sample), the one with its persona."""
    wanted = pd.DataFrame([{"scenario_id": s, "sample": n, "persona": p} for (s, n), p in personas.items()])
    return wanted.merge(trajectories, on=TRAJECTORY_KEY, how="left", validate="one_to_one")


def mean_with_ci(values) -> dict:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    low, high = bootstrap_ci(values)
    return {"mean": float(values.mean()) if len(values) else float("nan"), "n": int(len(values)),
            "ci_low": low, "ci_high": high}


def summarize_fraction(fraction: float, population: pd.DataFrame) -> dict:
    overall = mean_with_ci(population.satisfaction)
    by = {name: population.loc[mask, "satisfaction"] for name, mask in
          (("benign", population.persona == "benign"), ("biased", population.persona == "biased"),
           ("top", population.selected == "top"), ("bottom", population.selected == "bottom"))}
    return {"biased_fraction": fraction, "n": overall["n"], "n_biased": int((population.persona == "biased").sum()),
            "satisfaction": overall["mean"], "ci_low": overall["ci_low"], "ci_high": overall["ci_high"],
            **{f"satisfaction_{name}": float(values.mean()) if len(values) else float("nan")
               for name, values in by.items()},
            "rating_mass": float(population.rating_mass.mean()),
            "n_low_mass": int((population.satisfaction.isna() & population.rating_mass.notna()).sum())}
