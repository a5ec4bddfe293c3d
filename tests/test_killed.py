"""A command SIGKILLed at the worst moment of writing an artifact folder: its re-run goes on.

Each test runs the write in a fresh interpreter that kills itself the first time a given function is called
(a rename, a figure), then repeats the write here. A folder left with files but no cfg.json would be refused by
every re-run as 'not an emlens artifact' (CI saw this once in `emlens run`, at the comparison stage)."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from emlens.analysis.compare import compare_directions
from emlens.base.io import CFG_FILE, artifact_kind, read_json, write_manifest
from emlens.runs import RunStore
from tests.test_compare import save_direction

ROOT = Path(__file__).resolve().parents[1]


def killed_at(target: str, code: str) -> None:
    """Run `code` in a new interpreter that SIGKILLs itself on its first call of `target` (module:attribute)."""
    module, attribute = target.split(":")
    script = textwrap.dedent(f"""
        import importlib, os, signal
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(importlib.import_module({module!r}), {attribute!r}, die)
    """) + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_a_manifest_killed_before_its_rename_leaves_no_folder(tmp_path):
    folder = tmp_path / "run"
    killed_at("os:replace", f"""
        from emlens.base.io import write_manifest
        write_manifest({str(folder)!r}, {{"kind": "training_run"}}, {{"data.jsonl": "x" * 10_000_000}})
    """)
    assert not folder.exists()
    write_manifest(folder, {"kind": "training_run"}, {"data.jsonl": "{}\n"})
    assert artifact_kind(folder) == "training_run" and (folder / "data.jsonl").read_text() == "{}\n"


def test_a_run_store_killed_while_opening_reopens(tmp_path):
    folder, manifest = tmp_path / "eval", {"kind": "eval_run", "config": {"limit": 2}}
    killed_at("os:replace", f"""
        from emlens.runs import RunStore
        RunStore({str(folder)!r}, ["id"]).open({manifest!r})
    """)
    store = RunStore(folder, ["id"])
    store.open(manifest)
    store.append([{"id": 1}])
    assert artifact_kind(folder) == "eval_run" and store.done_keys() == {(1,)}


def test_a_comparison_killed_while_plotting_is_redone(tmp_path):
    paths = [save_direction(tmp_path / name, torch.randn(3, 64)) for name in ("a", "b")]
    out = tmp_path / "compare"
    killed_at("emlens.analysis.compare:plot_drift", f"""
        from emlens.analysis.compare import compare_directions
        compare_directions({[str(p) for p in paths]!r}, {str(out)!r})
    """)
    assert not out.exists()
    compare_directions(paths, out)
    assert read_json(out / CFG_FILE)["kind"] == "comparison" and (out / "drift.png").exists()


def test_a_run_into_a_linked_empty_folder_writes_through_the_link(tmp_path):
    """A folder the user made (here a link to another disk) is written in place, never replaced by a new one."""
    disk = tmp_path / "big-disk" / "runs"
    disk.mkdir(parents=True)
    (tmp_path / "run").symlink_to(disk)
    store = RunStore(tmp_path / "run", ["id"])
    store.open({"kind": "eval_run", "config": {}})
    store.append([{"id": 1}])
    assert (tmp_path / "run").is_symlink() and artifact_kind(disk) == "eval_run" and list((disk / "parts").iterdir())
