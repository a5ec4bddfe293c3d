"""`emlens extract`: its flags fill an ExtractConfig; bad ones fail in one line before the model loads."""

import pytest

from tests.cli_runner import run_cli


@pytest.mark.parametrize("extra, message", [
    (("--table", "t.parquet"), "give exactly one of questions, table"),
    (("--backend", "hooks"), "field 'backend'"),
    (("--position", "middle"), "field 'position'"),
    (("--dtype", "int8"), "field 'dtype'"),
])
def test_bad_extract_flags_are_one_line(tmp_path, capsys, extra, message):
    questions = tmp_path / "q.txt"
    questions.write_text("hello\n")
    code = run_cli("extract", "--model", tmp_path / "no-model", "--questions", questions, "--out", tmp_path / "s",
                   *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "command line" in err, err
    assert not (tmp_path / "s").exists()


def test_extract_config_defaults_are_the_apis():
    import inspect

    from emlens.capture.config import ExtractConfig
    from emlens.capture.extract import extract_to_store

    config = ExtractConfig(questions="q.txt")
    defaults = {k: p.default for k, p in inspect.signature(extract_to_store).parameters.items()}
    for field in ("position", "backend", "batch_size", "max_response_tokens", "dtype", "shard_mb"):
        assert getattr(config, field) == defaults[field], field
