"""README.md and results/**.md: tables are the committed files' numbers, commands run in a clone."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import results_tables
from conftest import ROOT, error_lines, run_main

README = ROOT / "README.md"
RESULTS_PAGES = [ROOT / "results" / "README.md", *sorted((ROOT / "results").glob("*/*.md"))]
QUICK_START = ".venv/bin/python vae.py --latent-dim 2 --epochs 30"
# Appended to each documented command: they only make it smaller (argparse lets the last value win).
SMALLER = ["--epochs", "1", "--train-size", "128", "--test-size", "64", "--fid", "none",
           "--iw-samples", "0"]


@pytest.fixture
def fresh_clone(tmp_path_factory):
    """What `git clone` gives a new user: the tracked files (as they are in this working tree, so
    uncommitted edits are tested too), and nothing that is untracked or ignored."""
    if not (ROOT / ".git").exists():
        if os.environ.get("CI"):
            pytest.fail("CI runs in a git clone: the fresh-clone test must run")
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    clone = tmp_path_factory.mktemp("fresh") / "repo"
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in the clone
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


def table_in(document, name):
    match = re.search(f"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", document.read_text(), re.S)
    assert match, f"{document.name} has no {name}"
    return match.group(1)


@pytest.mark.parametrize("name", results_tables.TABLES)
def test_tables_are_what_the_committed_files_say(name):
    assert table_in(results_tables.TABLES[name][0], name) == results_tables.TABLES[name][1]()


def test_committed_results_link_to_files_that_exist_hold_no_machine_paths_and_whole_eval_times():
    assert not [(page.name, link) for page in RESULTS_PAGES for link in re.findall(
        r'(?:\]\(|src=")(?!\w+:)([^)"#]+)', page.read_text()) if not (page.parent / link).exists()]
    assert len(README.read_bytes()) <= 12_000 and len(RESULTS_PAGES[0].read_bytes()) <= 15_000
    for path in sorted((ROOT / "results").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        for key in ("data", "results_dir"):
            value = metrics["config"][key]
            assert value is None or not (value.startswith(("/", "..", "~"))), (path, key, value)
        if "evaluation_seconds" in metrics:  # runs older than its fix leave it out
            parts = metrics.get("iw_seconds", 0) + sum(metrics["fid_seconds"].values())
            assert metrics["evaluation_seconds"] > parts, path


def test_quick_start_runs_in_a_fresh_clone_and_protects_its_run(fresh_clone, tiny_mnist):
    """The README's first command as a new user's process, then a second run into its folder."""
    assert QUICK_START in README.read_text()
    script, *arguments = QUICK_START.split()[1:]
    command = [sys.executable, script, *arguments, *SMALLER, "--data", str(tiny_mnist)]
    result = subprocess.run(command, cwd=fresh_clone, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, error_lines(result.stderr)[-5:]
    assert "this run replaces them" in result.stdout  # the committed example in results/vae
    assert (fresh_clone / "results" / "vae" / "model.keras").is_file()
    again = run_main(script, "--results-dir", fresh_clone / "results" / "vae", *SMALLER,
                     "--data", tiny_mnist)
    assert again.returncode == 2 and "holds a finished run" in error_lines(again.stderr)[-1]


def test_results_table_commands_run_as_printed_in_order(fresh_clone, tiny_mnist, monkeypatch):
    """Each row's command (the literature table's last), in a fresh clone, in the order printed:
    none is refused because an earlier one used its results directory."""
    commands = re.findall(r"`(python \S+\.py [^`]*)`", table_in(README, "results-table")
                          + table_in(README, "literature-table"))
    assert len(commands) == len(results_tables.RUNS) + 1
    monkeypatch.chdir(fresh_clone)
    for command in commands:
        script, *arguments = command.split()[1:]
        result = run_main(script, *arguments, *SMALLER, "--data", tiny_mnist)
        assert result.returncode == 0, (command, error_lines(result.stderr)[-3:])
        results_dir = fresh_clone / arguments[arguments.index("--results-dir") + 1]
        assert (results_dir / "model.keras").is_file(), command
        metrics = json.loads((results_dir / "metrics.json").read_text())
        assert not [key for key in metrics if key.startswith(("fid_pixel", "fid_classifier", "kid_"))]


def test_sweep_commands_parse_and_give_each_run_options_of_its_script(monkeypatch):
    """The sweeps the documents print: sweep.py takes them, and every grid point's command line
    (the arguments after `--` and the point's flags; a range's ends) is one its script takes."""
    import conv_vae
    import sweep
    import vae

    monkeypatch.chdir(ROOT)  # where --script names the scripts
    text = "".join(page.read_text() for page in [README, *RESULTS_PAGES])
    start = r"^(?:\.venv/bin/)?python sweep\.py "
    commands = re.findall(start + r"(.+?)(?:\s+#.*)?$", text, re.M)
    assert commands and len(commands) == len(re.findall(start, text, re.M))  # none missed
    for command in commands:
        args = sweep.parse_args(shlex.split(command))
        if not args.script:
            continue
        architecture = {"vae.py": vae.DENSE, "conv_vae.py": conv_vae.CONV}[args.script]
        parser, _ = vae.build_parser(architecture)
        ends = [entry if "choices" in entry else {"name": entry["name"], "choices": [
            entry["low"], entry["high"]]} for entry in args.space]  # a range: both its ends
        for point in sweep.grid(ends, args.seeds):
            flags = [word for name, value in point.items() for word in (f"--{name}", str(value))]
            parser.parse_args([*args.script_args, *args.local_args, *flags])
