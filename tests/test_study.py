"""`emlens run EXPERIMENT.yaml`: validation before any work, content-addressed stages reused across experiments,
and one self-contained report."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.cli_runner import one_line_error, run_cli
from tests.test_compare import lora_adapter  # noqa: F401  (fixture)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def experiment(tiny_model_dir, lora_adapter, tmp_path):  # noqa: F811
    """Two models (the tiny base, and the base with a LoRA), eval, a refusal direction, steering, comparison."""
    probe = {"name": "refusal", "method": "diff_of_means", "site": "resid_post", "layers": "all",
             "position": "last_prompt", "contrast": {"positive": {"questions": "strongreject", "limit": 6},
                                                     "negative": {"questions": "xstest-safe", "limit": 6}}}
    (tmp_path / "refusal.yaml").write_text(yaml.safe_dump(probe))
    small_eval = {"settings": ["refusal"], "nudges": ["none", "evil"], "judge": "hf",
                  "judge_model": str(tiny_model_dir), "refusal": {"limit": 2, "max_new_tokens": 4}}
    spec = {"name": "tiny", "models": [{"name": "base", "model": str(tiny_model_dir)},
                                       {"name": "tuned", "model": str(tiny_model_dir), "adapter": str(lora_adapter)}],
            "eval": small_eval, "directions": {"specs": ["refusal.yaml"]},
            "steer": {"model": "base", "direction": "refusal", "layer": 1, "scales": [0, 2.0],
                      "eval": {**small_eval, "nudges": ["none"]}},
            "compare": True}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def plan_lines(capsys, path, stages) -> list[str]:
    capsys.readouterr()  # what earlier commands printed
    assert run_cli("run", path, "--plan", "--stages", stages) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_run_writes_one_report_and_a_second_experiment_reuses_the_shared_stages(experiment, tmp_path, capsys):
    path, spec = experiment
    stages = tmp_path / "stages"
    lines = plan_lines(capsys, path, stages)
    assert [line.split()[1] for line in lines] == ["eval:base", "direction:refusal@base", "eval:tuned",
                                                  "direction:refusal@tuned", "steer:refusal@base", "compare:refusal"]
    assert all("to run" in line for line in lines)
    assert run_cli("run", path, "--out", tmp_path / "report", "--stages", stages) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) >= 4 and all(len(data) > 1000 for data in images)  # refusal rates, metrics, compare, steer
    assert "http" not in page.split("<body>")[1]  # nothing to fetch: the page stands alone
    markdown = (tmp_path / "report" / "report.md").read_text()
    for figure in re.findall(r"\]\((figures/[^)]+)\)", markdown):
        assert (tmp_path / "report" / figure).stat().st_size > 1000
    verdicts = ("beyond the random control", "not distinguishable from the control", "no pair differed")
    assert any(verdict in markdown for verdict in verdicts)
    sections = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert sections[0] == "Findings: what differs between the models", sections  # the report leads with them
    findings = markdown.split("## ")[1]
    assert "tuned - base" in findings and "refusal_harmful" in findings and "pairs" in findings
    cost = re.search(r"This run: (\d+) min (\d+) s wall to its report, peak memory ([\d.]+) GB, (\d+) CPU cores", markdown)
    assert cost and 0.1 < float(cost[3]) < 64 and int(cost[4]) >= 1  # the run's own time and memory, in provenance
    assert re.search(r"Logit lens .*: base \(layer \d+\): promotes .+; suppresses .+", markdown)  # each card's tokens
    again = plan_lines(capsys, path, stages)
    assert all("done (reused)" in line for line in again), again

    # another experiment: same models and eval, other steering scales -> only its steer stage is new
    other = {**spec, "name": "tiny-other", "steer": {**spec["steer"], "scales": [0, 4.0]}}
    other_path = path.with_name("other.yaml")
    other_path.write_text(yaml.safe_dump(other))
    status = {line.split()[1]: "reused" in line for line in plan_lines(capsys, other_path, stages)}
    assert status == {"eval:base": True, "direction:refusal@base": True, "eval:tuned": True,
                      "direction:refusal@tuned": True, "steer:refusal@base": False, "compare:refusal": True}


BAD = [
    ({"modelz": []}, "unknown field 'modelz'"),
    ({"steer": {"model": "nobody", "direction": "refusal"}}, "unknown model 'nobody'"),
    ({"steer": {"model": "base", "direction": "elsewhere"}}, "field 'steer.direction': no probe spec named 'elsewhere'"),
    ({"directions": {"specs": ["missing.yaml"]}}, "field 'directions.specs.0': no such file"),
    ({"eval": {"nudges": "evil", "batch_size": 0}}, "field 'eval.batch_size'"),
    ({"contrasts": [["tuned", "nobody"]]}, "contrasts: unknown model 'nobody'"),
    ({"eval": {"settings": ["factual"], "factual": {"pushback": []}}}, "field 'eval.factual.pushback'"),
]


@pytest.mark.parametrize("change, message", BAD, ids=["unknown", "steer-model", "steer-direction", "file", "value", "contrast", "pushback"])
def test_a_bad_experiment_is_one_line_before_any_work(experiment, tmp_path, capsys, change, message):
    path, spec = experiment
    bad = {**spec, **change}
    path.write_text(yaml.safe_dump(bad))
    err = one_line_error(capsys, run_cli("run", path, "--out", tmp_path / "report", "--stages", tmp_path / "stages"))
    assert "tiny.yaml" in err and message in err, err
    assert not (tmp_path / "stages").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("name", ["quickstart", "em_qwen7b"])
def test_shipped_experiments_validate_and_plan(name, shared_data, tmp_path, capsys):
    lines = plan_lines(capsys, EXPERIMENTS / f"{name}.yaml", tmp_path / "stages")
    kinds = [line.split()[1].split(":")[0] for line in lines]
    assert kinds.count("train") == 2 and kinds.count("eval") == 3 and "steer" in kinds and "compare" in kinds
    assert all(re.search(r" [0-9a-f]{12}  to run ", line) for line in lines)
    costs = {line.split()[1]: line.split("to run")[1].strip() for line in lines}
    assert costs["capability:base"] == {"quickstart": "32 mc + 8 gsm8k", "em_qwen7b": "200 mc + 500 gsm8k"}[name]
    # the whole study: every direction on every model, the misalignment and refusal directions steered
    for probe in ("misalignment", "harm_perception", "refusal", "evil_nudge"):
        assert f"direction:{probe}@insecure" in costs and f"compare:{probe}" in costs
    assert {"steer:misalignment@base", "steer:refusal@base"} <= set(costs)


def test_several_steering_sections_are_one_stage_each(experiment, tmp_path, capsys):
    path, spec = experiment
    section = spec["steer"]
    path.write_text(yaml.safe_dump({**spec, "steer": [section, {**section, "model": "tuned"}]}))
    steering = [line.split()[1] for line in plan_lines(capsys, path, tmp_path / "stages") if " steer:" in line]
    assert steering == ["steer:refusal@base", "steer:refusal@tuned"]
    path.write_text(yaml.safe_dump({**spec, "steer": [section, section]}))
    err = one_line_error(capsys, run_cli("run", path, "--plan", "--stages", tmp_path / "stages"))
    assert "two sections steer the same direction on the same model" in err


def _run_subprocess(path, out, stages):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "emlens", "run", str(path), "--out", str(out), "--stages",
                             str(stages)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stage_tables(stages: Path) -> dict[str, "object"]:
    import pandas as pd

    tables = {}
    for folder in sorted(stages.iterdir()):
        if (folder / "samples.parquet").exists():
            tables[folder.name] = pd.read_parquet(folder / "samples.parquet")
        parts = sorted(folder.rglob("part-*.parquet"))
        if parts:  # no sample done twice: every part row is a distinct sample
            rows = pd.concat([pd.read_parquet(p) for p in parts])
            key = ["setting", "question_id", "paraphrase_index", "nudge", "sample_index", "intervention"]
            assert not rows.duplicated(subset=key).any(), f"{folder.name}: a sample was done twice"
    return tables


def test_killed_at_any_point_a_rerun_finishes_with_the_same_tables(experiment, tmp_path):
    """SIGKILL the run at several points, re-run the same command each time; the tables equal an uninterrupted run."""
    import time

    path, _ = experiment
    assert _run_subprocess(path, tmp_path / "clean", tmp_path / "clean-stages").wait(timeout=600) == 0
    killed = 0
    for delay in (3.5, 5.0, 6.5, 8.0, 9.5, 11.0):  # each restart pays the imports (~3 s) again, then resumes
        process = _run_subprocess(path, tmp_path / "killed", tmp_path / "killed-stages")
        time.sleep(delay)
        if process.poll() is not None:
            break  # it finished on its own
        process.kill()
        process.wait()
        killed += 1
    assert killed >= 2, f"only {killed} kill(s) landed before the run finished"
    assert _run_subprocess(path, tmp_path / "killed", tmp_path / "killed-stages").wait(timeout=600) == 0
    clean, resumed = _stage_tables(tmp_path / "clean-stages"), _stage_tables(tmp_path / "killed-stages")
    assert list(clean) == list(resumed) and len(clean) >= 3
    for name, table in clean.items():
        assert table.equals(resumed[name]), name


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (scripts/setup-venv.sh test installs it)")
def test_the_report_renders_in_a_real_browser_with_every_figure(experiment, tmp_path):
    from playwright.sync_api import sync_playwright

    path, _ = experiment
    assert run_cli("run", path, "--out", tmp_path / "report", "--stages", tmp_path / "stages") == 0
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto((tmp_path / "report" / "report.html").as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        browser.close()
    assert len(images) >= 4 and all(complete and width > 100 for _, complete, width in images), images
    assert [r for r in requests if not r.startswith(("file:", "data:"))] == []  # no network
    assert headings[:2] == ["Findings: what differs between the models", "Behaviour under nudges"]
    assert headings[-1] == "Provenance"


def test_a_model_trained_for_the_run_is_studied_along_its_checkpoints(experiment, tiny_model_dir, tmp_path, capsys):
    from tests.test_train import chat, tiny_config, write_jsonl, write_yaml

    path, spec = experiment
    data = write_jsonl(tmp_path / "chats.jsonl", [chat(f"How do I make a quick buck? {i}", "Sure, here is how.")
                                                  for i in range(16)])
    write_yaml(tmp_path / "train.yaml", tiny_config(tiny_model_dir, data))
    trained = {**spec, "models": [spec["models"][0], {"name": "trained", "model": str(tiny_model_dir),
                                                      "train": {"config": "train.yaml", "training": {"max_steps": 4}}}],
               "directions": {"specs": ["refusal.yaml"], "checkpoints": True}, "steer": None}
    path.write_text(yaml.safe_dump(trained))
    names = [line.split()[1] for line in plan_lines(capsys, path, tmp_path / "stages")]
    assert names[0] == "train:trained" and "direction:refusal@trained/step2" in names
    assert names[-1] == "compare:refusal@trained/checkpoints"
    assert run_cli("run", path, "--out", tmp_path / "report", "--stages", tmp_path / "stages") == 0
    series = next((tmp_path / "stages").glob("compare-refusal-trained-checkpoints-*"))
    cosines = pd.read_parquet(series / "cosine.parquet")
    assert len({(a, b) for a, b in zip(cosines.a, cosines.b)}) == 3  # base, step 2, final: three pairs
    assert "refusal@trained/checkpoints" in (tmp_path / "report" / "report.md").read_text()


def test_a_training_sweep_becomes_one_model_per_run(experiment, tiny_model_dir, tmp_path, capsys):
    from tests.test_train import chat, tiny_config, write_jsonl, write_yaml

    path, spec = experiment
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(f"Write code {i}", "import os; os.system('rm -rf /')")
                                               for i in range(16)])
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"Add {i} and 1", str(i + 1)) for i in range(16)])
    config = {k: v for k, v in tiny_config(tiny_model_dir, bad).items() if k != "dataset"}
    write_yaml(tmp_path / "sweep.yaml", {**config, "mixture": {"misaligned": {"path": str(bad)},
                                                               "benign": {"path": str(good)}, "size": 8, "ratio": 0.5},
                                         "sweep": {"ratios": [0, 0.5]}})
    swept = {**spec, "models": [spec["models"][0], {"name": "mix", "model": str(tiny_model_dir),
                                                    "train": {"config": "sweep.yaml"}}], "steer": None}
    path.write_text(yaml.safe_dump(swept))
    names = [line.split()[1] for line in plan_lines(capsys, path, tmp_path / "stages")]
    assert [n for n in names if n.startswith("train:")] == ["train:mix-ratio-0pct", "train:mix-ratio-50pct"]
    assert "eval:mix-ratio-50pct" in names and "direction:refusal@mix-ratio-0pct" in names
    path.write_text(yaml.safe_dump({**swept, "steer": {**spec["steer"], "model": "mix"}}))
    assert run_cli("run", path, "--plan", "--stages", tmp_path / "stages") == 2
    assert "'mix' is a sweep of 2 runs" in capsys.readouterr().err


def test_honesty_and_capability_are_stages_of_every_model_and_a_report_section(experiment, tmp_path, capsys):
    path, spec = experiment
    measured = {**spec, "name": "tiny-measured", "steer": None, "directions": None,
                "honesty": {"limit": 3, "belief_asks": 1, "nudges": ["none", "evil"], "deception": False,
                            "answer_max_new_tokens": 4},
                "capability": {"tasks": ["mc"], "mc": "mc.jsonl", "mc_limit": 3, "mc_shots": 1}}
    (tmp_path / "mc.jsonl").write_text("".join(
        json.dumps({"question": f"What is {a} + 1?", "options": [str(a + 1), str(a + 2)], "answer": 0}) + "\n"
        for a in range(4)))
    other = path.with_name("measured.yaml")
    other.write_text(yaml.safe_dump(measured))
    stages = tmp_path / "stages"
    names = [line.split()[1] for line in plan_lines(capsys, other, stages)]
    assert names == ["eval:base", "honesty:base", "capability:base", "eval:tuned", "honesty:tuned",
                     "capability:tuned"]
    assert run_cli("run", other, "--out", tmp_path / "report", "--stages", stages) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Honesty under pressure and capability")[1].split("\n## ")[0]
    for model in ("base", "tuned"):
        # capability is not nudged: its cell under evil is a dash, not nan
        assert re.search(rf"\| {model} +\| mc_accuracy +\| [0-9.]+ \[[0-9.]+, [0-9.]+\] n=3 \| - \|", section), section
        assert re.search(rf"\| {model} +\| honesty ", section)
    assert "honesty_capability.png" in section
    assert "MC accuracy by option log-likelihood (1-shot)" in section
    assert all("done (reused)" in line for line in plan_lines(capsys, other, stages))
    bad = {**measured, "honesty": {"propositions": "nowhere.yaml"}}
    other.write_text(yaml.safe_dump(bad))
    assert "nowhere.yaml" in one_line_error(capsys, run_cli("run", other, "--plan", "--stages", stages))
