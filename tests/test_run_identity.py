"""One rule for reusing finished work (`emlens.runs.open_run`): same kind, same config identity, data, model and
code version, or the folder is refused with what changed."""

import pytest

from emlens.base.errors import EmlensInputError
from emlens.base.io import read_json
from emlens.runs import RunStore, open_run

IDENTITY = {"config": {"seed": 0, "free_form": {"samples": 3}}, "model": {"model": "m", "fingerprint": "aa"},
            "data.sha256": "d1", "results_version": 3}


def test_a_new_folder_records_its_identity_and_the_same_identity_reopens_it(tmp_path):
    assert open_run(tmp_path / "run", "eval_run", IDENTITY, {"note": "kept"}) is None
    cfg = read_json(tmp_path / "run" / "cfg.json")
    assert cfg["data"] == {"sha256": "d1"} and cfg["results_version"] == 3 and cfg["note"] == "kept"
    assert open_run(tmp_path / "run", "eval_run", IDENTITY)["created"] == cfg["created"]


@pytest.mark.parametrize("change, message", [
    ({"config": {"seed": 0, "free_form": {"samples": 4}}}, r"different run \(changed: free_form.samples\)"),
    ({"data.sha256": "d2"}, r"changed: data.sha256"),
    ({"model": {"model": "m", "fingerprint": "bb"}}, "answers of another model"),
    ({"results_version": 4}, r"another version of emlens's code \(results version 3, now 4\)"),
])
def test_any_changed_part_of_the_identity_is_refused(tmp_path, change, message):
    open_run(tmp_path / "run", "eval_run", IDENTITY)
    with pytest.raises(EmlensInputError, match=message):
        open_run(tmp_path / "run", "eval_run", {**IDENTITY, **change})


def test_a_folder_of_another_kind_is_refused(tmp_path):
    open_run(tmp_path / "run", "generate_run", IDENTITY)
    with pytest.raises(EmlensInputError):
        open_run(tmp_path / "run", "eval_run", IDENTITY)


def test_an_eval_run_of_older_code_is_not_resumed(tmp_path):
    """Before the code's results version was part of a run's identity, a run resumed after an upgrade mixed old
    and new rows in one table."""
    manifest = {"kind": "eval_run", "model": {"fingerprint": "aa"}, "config": {"seed": 0}}
    RunStore(tmp_path / "run", ["id"]).open(manifest, results_version=2)
    RunStore(tmp_path / "run", ["id"]).open(manifest, results_version=2)
    with pytest.raises(EmlensInputError, match="results version 2, now 3"):
        RunStore(tmp_path / "run", ["id"]).open(manifest, results_version=3)


def test_finished_is_one_rule_for_runs_written_in_pieces_and_artifacts_written_whole(tmp_path):
    """`base.io.finished`, what the runner asks of every stage: a run is finished when its cfg.json says so (a
    training run says `finished: false` until its last step), a direction or comparison as soon as it exists."""
    import emlens.analysis.compare
    import emlens.directions.artifact  # noqa: F401
    from emlens.base.io import atomic_write_json, finished

    def folder(name: str, cfg: dict):
        atomic_write_json(tmp_path / name / "cfg.json", cfg)
        return tmp_path / name

    assert not finished(tmp_path / "missing")
    store = RunStore(tmp_path / "eval", ["id"])
    store.open({"kind": "eval_run", "config": {}, "model": {}})
    store.append([{"id": 1}])
    assert not finished(store.folder)
    store.finish()
    assert finished(store.folder)
    assert not finished(folder("train", {"kind": "training_run", "finished": False}))
    assert finished(folder("trained", {"kind": "training_run", "finished": True}))
    assert finished(folder("direction", {"kind": "direction"})) and finished(folder("cmp", {"kind": "comparison"}))
    assert not finished(folder("other", {"kind": "generate_run"}))


def test_a_setting_added_since_a_run_and_none_now_does_not_refuse_it(tmp_path):
    """A run made before a config field existed ran as the field's None does: it is reused (before the fix it was
    refused with "changed: " and no field named, e.g. every finished eval once harm_perception.limit was added)."""
    open_run(tmp_path / "run", "eval_run", IDENTITY)
    grown = {**IDENTITY, "config": {**IDENTITY["config"], "free_form": {"samples": 3, "limit": None}}}
    assert open_run(tmp_path / "run", "eval_run", grown) is not None
    with pytest.raises(EmlensInputError, match=r"changed: free_form.limit\)"):
        open_run(tmp_path / "run", "eval_run", {**grown, "config": {**grown["config"], "free_form": {"samples": 3,
                                                                                                   "limit": 4}}})
