"""README.md: its documented commands work as a new user runs them, in a fresh clone of the repository."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, error_lines

# The README's two headline commands, and flags that only make them smaller (fewer epochs, images
# and samples); --data because this machine cannot download MNIST.
DOCUMENTED_COMMANDS = [".venv/bin/python vae.py --latent-dim 2 --epochs 30", ".venv/bin/python conv_vae.py --epochs 100"]
SMALLER = ["--epochs", "1", "--train-size", "128", "--test-size", "64", "--fid-samples", "64", "--iw-samples", "4"]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """What `git clone` gives a new user: the tracked files (as they are in this working tree, so
    uncommitted edits are tested too), and nothing that is untracked or ignored."""
    if not (ROOT / ".git").exists():
        if os.environ.get("CI"):
            pytest.fail("CI runs in a git clone: the fresh-clone test must run")
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    clone = tmp_path_factory.mktemp("fresh") / "repo"
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in the clone either
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


@pytest.mark.parametrize("command", DOCUMENTED_COMMANDS)
def test_documented_command_runs_in_a_fresh_clone(command, fresh_clone, tiny_mnist):
    assert command in (ROOT / "README.md").read_text()
    script, *arguments = command.split()[1:]
    results_dir = fresh_clone / "results" / script.removesuffix(".py")
    committed_example = (results_dir / "metrics.json").is_file()

    def run():
        return subprocess.run([sys.executable, script, *arguments, *SMALLER, "--data", str(tiny_mnist)],
                              cwd=fresh_clone, capture_output=True, text=True, timeout=300)

    result = run()
    assert result.returncode == 0, error_lines(result.stderr)[-5:]
    assert (results_dir / "model.keras").is_file() and (results_dir / "reconstruction_images.png").is_file()
    if committed_example:
        assert "this run replaces them" in result.stdout
    again = run()  # the user's own finished run is protected
    assert again.returncode == 2 and "holds a finished run" in error_lines(again.stderr)[-1]
