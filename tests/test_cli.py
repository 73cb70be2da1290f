"""The jobs' command lines: bad values and a non-empty output are refused at once (exit 2 / 5, one line
``error: ...``), before Ray or any scoring starts."""

from __future__ import annotations

import pytest

from support.images import make_labelled_tree
from support.jobs import run_job

# An address nothing listens on: a job that got as far as joining Ray would fail otherwise (exit 1, a traceback).
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:9"}


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("score.py", ["--batch-size", "0"], "--batch-size must be at least 1"),
        ("score.py", ["--actors", "-2"], "--actors must be at least 1"),
        ("score.py", ["--cpus-per-actor", "0"], "--cpus-per-actor must be greater than 0"),
        ("score.py", ["--gpus-per-actor", "-1"], "--gpus-per-actor must be at least 0"),
        ("score.py", ["--threads-per-actor", "0"], "--threads-per-actor must be at least 1"),
        ("score.py", ["--explain-limit", "0"], "--explain-limit must be at least 1"),
        ("nightly.py", ["--rows-per-file", "0"], "--rows-per-file must be at least 1"),
        ("nightly.py", ["--drift-threshold", "1.5"], "--drift-threshold must be between 0 and 1"),
        ("nightly.py", ["--cpus-per-actor", "nan"], "--cpus-per-actor must be a finite number, got 'nan'"),
        ("evaluate.py", ["--threshold", "-0.1"], "--threshold must be between 0 and 1"),
        ("evaluate.py", ["--bootstrap", "-5"], "--bootstrap must be at least 0"),
        ("evaluate.py", ["--batch-size", "ten"], "--batch-size must be an integer, got 'ten'"),
        ("explain.py", ["--limit", "0"], "--limit must be at least 1"),
        ("explain.py", ["--batch-size", "0"], "--batch-size must be at least 1"),
        ("validate.py", ["--near-distance", "33"], "--near-distance must be in 0..32"),
        ("validate.py", ["--min-side", "0"], "--min-side must be at least 1"),
        ("audit.py", ["--heatmaps-per-class", "-1"], "--heatmaps-per-class must be at least 0"),
        ("audit.py", ["--actors", "0"], "--actors must be at least 1"),
        ("train.py", ["--epochs", "0"], "--epochs must be at least 1"),
        ("train.py", ["--val-fraction", "1"], "--val-fraction must be above 0 and at most 0.5"),
        (
            "train.py",
            ["--val-fraction", "0.7"],
            "--val-fraction must be above 0 and at most 0.5",
        ),  # was a traceback, rc 1
        (
            "tune.py",
            ["--val-fraction", "0"],
            "--val-fraction must be above 0 and at most 0.5",
        ),  # (tune also left a config)
        ("tune.py", ["--cpus-per-trial", "0"], "--cpus-per-trial must be greater than 0"),
        ("tune.py", ["--lr-range", "0.1", "-1"], "--lr-range must be greater than 0"),
    ],
)
def test_a_bad_numeric_option_is_a_one_line_usage_error(script, args, message, tmp_path):
    where = {
        "score.py": ["--input", str(tmp_path), "--output", str(tmp_path / "o")],
        "nightly.py": ["--input", str(tmp_path), "--table", str(tmp_path / "t")],
        "evaluate.py": ["--data", str(tmp_path), "--output", str(tmp_path / "o")],
        "explain.py": ["--input", str(tmp_path), "--output", str(tmp_path / "o")],
        "validate.py": ["--data", str(tmp_path), "--output", str(tmp_path / "o")],
        "audit.py": ["--internal", str(tmp_path), "--output", str(tmp_path / "o")],
        "train.py": ["--data", str(tmp_path), "--output", str(tmp_path / "o")],
        "tune.py": ["--data", str(tmp_path), "--output", str(tmp_path / "o")],
    }[script]
    proc = run_job(script, *where, *args, env=NO_RAY, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {message}" and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_missing_argument_is_a_one_line_usage_error(tmp_path):
    proc = run_job("evaluate.py", "--data", str(tmp_path), env=NO_RAY, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: the following arguments are required: --output"


@pytest.mark.parametrize("script", ["evaluate.py", "validate.py", "audit.py"])
def test_a_non_empty_output_is_refused_without_overwrite(script, tiny_model, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=2, size=32, layout="")
    out = tmp_path / "out"
    out.mkdir()
    (out / "subgroups.png").write_bytes(b"from an earlier run")
    data_arg = {
        "evaluate.py": ["--data", str(data), "--model", tiny_model],
        "validate.py": ["--data", str(data)],
        "audit.py": ["--internal", str(data), "--internal-split", "all", "--model", tiny_model],
    }[script]
    proc = run_job(script, *data_arg, "--output", str(out), env=NO_RAY, timeout=120)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: output {out} is not empty; choose a new location or pass --overwrite"
    )
    assert (out / "subgroups.png").read_bytes() == b"from an earlier run"


# Jobs whose parser and main still live in jobs/<job>.py (no console command yet): none.
NOT_YET_IN_THE_PACKAGE: set[str] = set()


def console_scripts() -> dict[str, str]:
    import tomllib

    from support.jobs import ROOT

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_job_has_a_console_command_running_the_scripts_main():
    """One `cxr-<job>` per jobs/<job>.py, each pointing at the `run` of the module whose `main` the script calls."""
    import importlib

    from support.jobs import ROOT, load_job_script

    scripts = console_scripts()
    jobs = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem not in NOT_YET_IN_THE_PACKAGE)
    assert sorted(name.removeprefix("cxr-") for name in scripts) == jobs
    for name, target in scripts.items():
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        job = name.removeprefix("cxr-")
        assert module_name == f"cxr.jobs.{job}" and func == "run"
        shim = load_job_script(job)
        assert shim.main is module.main and shim.parse_args is module.parse_args


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_a_console_command_resolves_and_prints_its_help(name, tmp_path, monkeypatch, capsys):
    """The entry point's target, called as the console script calls it, prints the job's --help (the same options
    as jobs/<job>.py) and exits 0; so does the installed command where this venv has it (`pip install -e .`, CI)."""
    import os
    import shutil
    import subprocess

    from support.jobs import PYTHON, ROOT, load_job_script

    module_name, func = console_scripts()[name].split(":")
    code = f"import sys; sys.argv = [{name!r}, '--help']; from {module_name} import {func}; {func}()"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "COLUMNS": "200"}
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {name} ") and "--help" in out.stdout
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exited:
        load_job_script(name.removeprefix("cxr-")).parse_args(["--help"])
    assert exited.value.code == 0
    script = capsys.readouterr().out
    assert out.stdout.split()[2:] == script.split()[2:]  # after "usage: PROG": the same options, word for word
    installed = shutil.which(name, path=os.path.dirname(PYTHON))
    if installed:
        cmd = subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert cmd.returncode == 0 and cmd.stdout == out.stdout, cmd.stderr


@pytest.mark.parametrize("job, config", [("train", "TrainConfig"), ("tune", "SearchConfig")])
def test_training_defaults_are_the_config_dataclasses(job, config):
    """Every option of train and tune that names a field of its config has that field's default: the command line
    and the library cannot disagree."""
    from dataclasses import MISSING, fields

    from cxr import configs
    from support.jobs import load_job_script

    cls = getattr(configs, config)
    parsed = vars(load_job_script(job).parse_args(["--data", "d", "--output", "o"]))
    checked = 0
    for f in fields(cls):
        if f.name not in parsed or f.name in ("data", "output"):
            continue
        want = f.default if f.default is not MISSING else f.default_factory()
        got = parsed[f.name]
        if f.name == "crop":
            got = None if got == "none" else got
        elif f.name == "backbones":
            got = got.split(",")
        assert (list(got) if isinstance(want, tuple | list) else got) == (
            list(want) if isinstance(want, tuple | list) else want
        ), f.name
        checked += 1
    assert checked >= 14


def test_shared_options_are_grouped_by_topic_in_every_jobs_help(monkeypatch):
    """--output, --overwrite and --verbose come from cxr.cli's shared groups, with one help text for --overwrite
    where the job refuses a non-empty output."""
    import argparse

    from cxr import cli
    from support.jobs import load_job_script

    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for job in ("audit", "evaluate", "explain", "validate", "train", "tune"):
        with pytest.raises(SystemExit):
            load_job_script(job).parse_args([])
        parser = parsers[-1]
        titles = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
        assert titles["general"] == {"verbose"}, job
        assert "output" in titles["output"], job
        if job in ("audit", "evaluate", "explain", "validate"):
            overwrite = next(a for a in parser._actions if a.dest == "overwrite")
            assert overwrite.help == cli.OVERWRITE_HELP, job
        assert len(titles) >= 5, (job, titles)  # options, general, output and at least two topics


def test_every_labelled_data_job_maps_manifest_labels_and_names_the_bad_rows(tmp_path):
    # pos/neg are mapped by --label-map in every job: the only row named is the one whose value it does not map
    (tmp_path / "labels.csv").write_text("path,label\na.png,POS\nb.png,neg\nc.png,???\n")
    data = str(tmp_path / "labels.csv")
    jobs = {
        "train.py": ["--data", data],
        "tune.py": ["--data", data],
        "evaluate.py": ["--data", data],
        "validate.py": ["--data", data],
        "audit.py": ["--internal", data],
    }
    from concurrent.futures import ThreadPoolExecutor

    def run(item):
        script, args = item
        out = str(tmp_path / script)
        return script, run_job(script, *args, "--label-map", "pos=covid,neg=non", "--output", out, env=NO_RAY)

    with ThreadPoolExecutor(len(jobs)) as pool:
        for script, job in pool.map(run, jobs.items()):
            assert job.returncode == 3, (script, job.stderr[-2000:])
            assert job.stderr.strip().splitlines()[-1] == (
                f"error: labelled manifest {data}: row 3 (c.png) with an unknown label "
                "(values '???'; --label-map maps pos=covid, neg=non)"
            ), script
