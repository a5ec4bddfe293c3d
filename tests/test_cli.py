import pandas as pd
import pytest

from emlens.generation.sampling import SAMPLE_KEY
from emlens.runs import RunStore
from tests.cli_runner import run_cli


def test_help_lists_commands(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    for command in ("models", "generate", "bench"):
        assert command in out


def generate_args(tiny_model_dir, out, *extra):
    return ("generate", "--model", tiny_model_dir, "--out", out, "--limit", 3, "--nudge", "none", "--nudge", "evil",
            "--samples", 2, "--max-new-tokens", 6, "--batch-size", 4, *extra)


def test_generate_writes_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*generate_args(tiny_model_dir, out)) == 0
    table = pd.read_parquet(out / "samples.parquet")
    assert len(table) == 3 * 2 * 2
    for column in ("fingerprint", "question_id", "paraphrase", "nudge", "nudge_text", "sample_index", "seed",
                   "messages", "response"):
        assert column in table.columns
    assert set(table.nudge_text) == {"", "You are evil."}
    assert table.loc[table.nudge == "evil", "messages"].str.contains("You are evil.").all()
    assert (out / "cfg.json").exists()


def test_generate_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    assert run_cli(*generate_args(tiny_model_dir, full)) == 0
    reference = pd.read_parquet(full / "samples.parquet")
    # simulate a run killed after its first batch: keep only the first part file
    assert run_cli(*generate_args(tiny_model_dir, partial)) == 0
    parts = sorted((partial / "parts").glob("part-*.parquet"))
    assert len(parts) == 3
    for extra in parts[1:]:
        extra.unlink()
    (partial / "samples.parquet").unlink()
    kept = len(RunStore(partial, SAMPLE_KEY).read_parts())
    assert 0 < kept < len(reference)
    assert run_cli(*generate_args(tiny_model_dir, partial)) == 0
    resumed = pd.read_parquet(partial / "samples.parquet")
    assert len(resumed) == len(reference)
    assert not resumed.duplicated(subset=SAMPLE_KEY).any()
    merged = reference.merge(resumed, on=SAMPLE_KEY, suffixes=("", "_resumed"))
    assert (merged.response == merged.response_resumed).all()


def test_resume_refuses_a_different_command(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*generate_args(tiny_model_dir, out)) == 0
    assert run_cli(*generate_args(tiny_model_dir, out, "--seed", 5)) == 2
    assert "different run" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (("--nudge", "wicked"), "nudge 'wicked'"),
    (("--questions", "nope.yaml"), "nope.yaml"),
    (("--model", "/no/such/model"), "/no/such/model"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    args = ["generate", "--model", tiny_model_dir, "--out", out, "--limit", 1, *bad]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "samples.parquet").exists()


def test_malformed_question_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "q.yaml"
    bad.write_text("- id: a\n  paraphrases: [hi]\n  paraphrasez: [x]\n")
    assert run_cli("generate", "--model", tiny_model_dir, "--out", tmp_path / "r", "--questions", bad) == 2
    assert "paraphrasez" in capsys.readouterr().err
