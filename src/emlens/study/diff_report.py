"""The figure, the top-KL list and the report of `emlens diff` (`emlens.study.diff`): a reading of the run that
states each null plainly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from emlens.analysis.diff import SHAM_TOLERANCE, STEER_CONTRASTS
from emlens.base.io import save_figure


@dataclass
class Member:
    """One adapter of a diff: its label (folder names), role, folder, fingerprint and name inside peft."""

    label: str
    role: Literal["adapter", "control"]
    path: Path
    fingerprint: str
    peft: str


def kl_top_markdown(top: pd.DataFrame) -> str:
    lines = ["# Highest-KL tokens", "", "KL(fine-tune || base) of the next-token distribution after the marked "
             "token.", ""]
    for adapter, rows in top.groupby("adapter", sort=False):
        lines += [f"## {adapter}", "", "| KL | part | row | position | in context | next |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.kl:.4f} | {r.part} | {r.row} | {r.position} | {_cell(r.context)} | {_cell(r.next_token)} |"
                  for r in rows.itertuples()]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return "`" + str(text).replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"


def diff_figure(tables: dict, members: list[Member], path: Path) -> Path:
    """The lens's relative norm by layer, mean KL by position group, the steering contrasts and the weight norms
    by layer, per adapter (the control dashed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    summary = tables["summary"]
    for member in members:
        style = "--" if member.role == "control" else "-"
        rows = tables["adl"][tables["adl"].adapter == member.label]
        axes[0, 0].plot(rows.layer, rows.relative_norm, style, marker="o", ms=2, label=member.label)
        weights = tables["weights"][tables["weights"].adapter == member.label]
        per_layer = weights.groupby("layer").frobenius.apply(lambda f: float(np.sqrt((f ** 2).sum())))
        axes[1, 1].plot(per_layer.index, per_layer.values, style, marker="o", ms=2, label=member.label)
    _bars(axes[0, 1], summary, members, ["kl_prompt", "kl_response"], "mean KL(fine-tune || base) per token")
    _bars(axes[1, 0], summary, members, list(STEER_CONTRASTS)[:3],
          "log P(misaligned) - log P(aligned): change from the base")
    axes[0, 0].set(xlabel="layer", ylabel="|mean difference| / |resid|", title="activation-difference lens")
    axes[1, 1].set(xlabel="layer", ylabel="|scaling B A|_F (the layer's modules)", title="LoRA weight norm")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, summary: pd.DataFrame, members: list[Member], quantities: list[str], title: str) -> None:
    width = 0.8 / len(members)
    for i, member in enumerate(members):
        rows = summary[(summary.adapter == member.label) & (summary.role == member.role)].set_index("quantity")
        rows = rows.reindex(quantities)
        x = np.arange(len(quantities)) + i * width
        errors = np.abs(np.vstack([rows.value - rows.ci_low, rows.ci_high - rows.value]).astype(float))
        ax.bar(x, rows.value, width, yerr=np.nan_to_num(errors), capsize=2, label=member.label,
               hatch="//" if member.role == "control" else None)
    ax.set_xticks(np.arange(len(quantities)) + 0.4 - width / 2,
                  [q.removeprefix("steer_").replace("_", " ") for q in quantities], fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title(title, fontsize=9)


def report_text(out: Path, model: str, steer_scale: float, record: dict, tables: dict, members: list[Member]) -> str:
    """A reading of the run that states each null plainly."""
    summary, sham, first = tables["summary"], record["sham"], record["first_token"]
    lines = [f"# What did the fine-tune change? ({model})", "",
             f"Adapters: {', '.join(m.label for m in members if m.role == 'adapter')}; control: "
             f"{next((m.label for m in members if m.role == 'control'), 'none')}.", "",
             "## Controls", "",
             f"- Sham adapter (the first adapter with B = 0): max |logit difference| from the base "
             f"{sham['max_abs_logit_diff']:.3g} over {sham['n_tokens']} tokens, mean KL {sham['mean_kl']:.3g} "
             f"(asserted <= {SHAM_TOLERANCE:g}): the diff measures the adapter and nothing else.",
             f"- First token: its residual norm is {first['ratio']:.1f}x the others' at its most massive layer; "
             f"{'left out (an attention sink)' if first['skipped'] else 'kept'} (policy {first['policy']}, "
             f"sink above {first['threshold']:g}x).", ""]
    for member in members:
        lines += _member_lines(out, model, steer_scale, member, summary, tables)
    lines += _direction_lines(tables)
    return "\n".join(lines) + "\n"


def _member_lines(out: Path, model: str, steer_scale: float, member: Member, summary: pd.DataFrame,
                  tables: dict) -> list[str]:
    mine = summary[summary.adapter == member.label]
    own, versus = mine[mine.role == member.role].set_index("quantity"), mine[mine.role == "minus_control"]
    versus = versus.set_index("quantity")
    adl = own.loc["adl_norm"]
    layer = int(adl.layer)
    lens = tables["adl"][(tables["adl"].adapter == member.label) & (tables["adl"].layer == layer)].iloc[0]
    layers = tables["adl"][tables["adl"].adapter == member.label]
    peak = layers.loc[layers.relative_norm.idxmax()]
    lines = [f"## {member.label} ({member.role})", "",
             f"- Activation-difference lens at layer {layer} (the steering layer): |mean difference| {_figure(adl)}, "
             f"{lens.relative_norm:.4f} of the stream's norm (largest relative norm: {peak.relative_norm:.4f} at layer "
             f"{int(peak.layer)}){_versus(versus, 'adl_norm')}{_same_way(lens)}{_direction_cosines(lens)}. Logit lens promotes "
             f"{', '.join(map(repr, list(lens.promoted)[:8]))}; suppresses "
             f"{', '.join(map(repr, list(lens.suppressed)[:8]))}.",
             f"- KL(fine-tune || base) per token: prompt {_figure(own.loc['kl_prompt'])}"
             f"{_versus(versus, 'kl_prompt')}; response {_figure(own.loc['kl_response'])}"
             f"{_versus(versus, 'kl_response')} (CIs resample token rows). Top tokens: kl_top.md."]
    if "steer_adl_minus_base" in own.index:
        lines.append(
            f"- Steering the base at layer {layer} with the lens ({steer_scale:g}x its norm), judge-free metric "
            f"log P(misaligned) - log P(aligned) on {int(own.loc['steer_adl_minus_base'].n)} answer pairs: the "
            f"fine-tune moves it {_figure(own.loc['steer_finetune_minus_base'])} "
            f"({_reading(own.loc['steer_finetune_minus_base'])}){_versus(versus, 'steer_finetune_minus_base')}; "
            f"base + lens {_figure(own.loc['steer_adl_minus_base'])};"
            f" base + random vector of the same norm {_figure(own.loc['steer_random_minus_base'])}; lens minus "
            f"random {_figure(own.loc['steer_adl_minus_random'])} ({_reading(own.loc['steer_adl_minus_random'])}).")
    else:
        lines.append("- Steering: the lens is zero at every layer, so there is nothing to steer with.")
    lines += [f"- LoRA weights: |scaling B A|_F over all modules {own.loc['weights_frobenius'].value:.4g}"
              f"{_versus(versus, 'weights_frobenius', ci=False)}.",
              f"- Steer the base model with the lens against the misaligned rate: `emlens steer "
              f"steering/misalignment_add_base.yaml --model {model} --direction {out / 'directions' / member.label}"
              f" --out {out / ('steer-' + member.label)}`", ""]
    return lines


def _same_way(lens) -> str:
    """Whether the adapter's lens points where the control's does (the trace of any such fine-tune)."""
    if "cos_control" not in lens or lens.cos_control != lens.cos_control:
        return ""
    chance = "no more than" if abs(lens.cos_control) <= lens.cos_null95 else "more than"
    return (f"; cosine with the control's lens at that layer {lens.cos_control:+.3f} ({chance} random vectors' 95th "
            f"percentile {lens.cos_null95:.3f})")


def _direction_cosines(lens) -> str:
    names = [c.removeprefix("cos_") for c in lens.index if c.startswith("cos_") and c not in ("cos_null95",
                                                                                               "cos_control")]
    if not names:
        return ""
    found = ", ".join(f"{name} {lens[f'cos_{name}']:+.3f}" for name in names)
    return f"; its cosine with {found} (random vectors' 95th percentile of |cos|: {lens.cos_null95:.3f})"


def _figure(row) -> str:
    if np.isnan(row.ci_low):
        return f"{row.value:.4g}"
    return f"{row.value:.4g} [{row.ci_low:.4g}, {row.ci_high:.4g}]"


def _reading(row) -> str:
    if row.ci_low > 0:
        return "above zero"
    if row.ci_high < 0:
        return "below zero"
    return "null: the CI covers 0"


def _versus(versus: pd.DataFrame, quantity: str, ci: bool = True) -> str:
    if quantity not in versus.index:
        return ""
    row = versus.loc[quantity]
    if not ci:
        return f" (minus the control: {row.value:+.4g})"
    return f" (minus the control: {row.value:+.4g} [{row.ci_low:+.4g}, {row.ci_high:+.4g}], {_reading(row)})"


def _direction_lines(tables: dict) -> list[str]:
    """Cosines of the residual writers' singular directions with the fitted directions, against the share
    random vectors would exceed (5 %)."""
    cos = tables["weights_cos"]
    if cos.empty:
        return ["## Weights and fitted directions", "", "No direction given (--direction): no cosines read.", ""]
    lines = ["## Weights and fitted directions", "",
             f"|cos| of the top output-side singular vectors of o_proj / down_proj with each direction at the same "
             f"layer; random unit vectors exceed {cos.null95.iloc[0]:.3f} 5 % of the time.", ""]
    for (adapter, direction), rows in cos.groupby(["adapter", "direction"], sort=False):
        share = rows.above_null.mean()
        lines.append(f"- {adapter} vs {direction}: {int(rows.above_null.sum())} of {len(rows)} above the null "
                     f"({share:.1%}; {'no more than chance' if share <= 0.05 else 'more than chance'}), "
                     f"max {rows.abs_cos.max():.3f}.")
    return lines + [""]
