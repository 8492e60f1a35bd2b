"""sweep.py: workers sharing one study (PostgreSQL, and the embedded SQLite default), each grid
point run once, a killed worker's trial resumed by another, pruning, sampled ranges, the CSV of
results/tuning.csv and its report, and one real vae.py trial.

The multi-trial tests train a stand-in (FAKE_TRAIN below: vae.py's outputs and exit codes, without
TensorFlow) so that a trial takes under a second; only the last test runs vae.py itself."""

import contextlib
import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

import sweep
from conftest import ROOT

# Optuna calls its heartbeats experimental; sweep.py silences that in its own process only.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FAKE_TRAIN = '''
"""A stand-in for vae.py: --epochs epochs of --sleep seconds, each with the test loss --loss
(plus seed/100), written to history.csv (with the epoch's seconds) and a checkpoint; --resume continues the checkpoint; a
SIGINT exits 130 with the last epoch's checkpoint kept; metrics.json at the end. With --wait-for
FILE, epoch --wait-after + 1 begins once FILE exists (the test's cue); a run whose loss is above
--hang-above makes no progress after its first epoch (a hopeless run)."""
import argparse, json, os, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--sleep", type=float, default=0.1)
parser.add_argument("--loss", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--results-dir", required=True)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--wait-for")
parser.add_argument("--wait-after", type=int, default=0)
parser.add_argument("--hang-above", type=float, default=float("inf"))
args = parser.parse_args()
folder = Path(args.results_dir)
folder.mkdir(parents=True, exist_ok=True)
checkpoint = folder / "checkpoint.json"
if checkpoint.is_file() != args.resume:
    print("fake_train.py: error: " + ("no checkpoint" if args.resume else "holds a run"))
    sys.exit(2)
losses, seconds = json.loads(checkpoint.read_text()) if args.resume else ([], [])
with open(folder / "starts.txt", "a") as f:  # one line per start: process id, epochs done
    f.write(f"{os.getpid()} {len(losses)}\\n")
(folder / "metrics.json").unlink(missing_ok=True)
try:
    while len(losses) < args.epochs:
        while args.wait_for and len(losses) == args.wait_after and not Path(args.wait_for).exists():
            time.sleep(0.02)
        while losses and args.loss > args.hang_above:
            time.sleep(0.02)
        start = time.perf_counter()
        time.sleep(args.sleep)
        losses.append(args.loss + args.seed / 100)
        seconds.append(time.perf_counter() - start)
        (folder / "checkpoint.tmp").write_text(json.dumps([losses, seconds]))  # first, as vae.py
        os.replace(folder / "checkpoint.tmp", checkpoint)
        rows = [f"{epoch},{loss},{loss},{loss},0,{s}"
                for epoch, (loss, s) in enumerate(zip(losses, seconds), start=1)]
        (folder / "history.tmp").write_text(
            "epoch,loss,val_loss,val_reconstruction_loss,val_kl_loss,seconds\\n"
            + "\\n".join(rows) + "\\n")
        os.replace(folder / "history.tmp", folder / "history.csv")
except KeyboardInterrupt:
    (folder / "interrupted").touch()
    sys.exit(130)
metrics = {"fid_pixel_recon": losses[-1], "test_elbo": -losses[-1], "epochs": len(losses),
           "seconds_per_epoch": seconds, "config": {"latent_dim": 2},
           "machine": {"isa": "avx2"}, "active_units": 2 if args.seed == 0 else 1}
(folder / "metrics.json").write_text(json.dumps(metrics))
'''


@pytest.fixture
def fake_train(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return path


def pg_bin():
    """PostgreSQL's server programs: $PG_BIN, the PATH, or Debian's layout (off the PATH)."""
    candidates = [os.environ.get("PG_BIN"), shutil.which("pg_ctl") and
                  str(Path(shutil.which("pg_ctl")).parent),
                  *sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)]
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").is_file()), None)


@pytest.fixture(scope="session")
def postgresql():
    """A PostgreSQL server of this test session on a Unix socket in a temporary folder (as the
    postgres user when run as root, which PostgreSQL refuses to run as); yields its URL."""
    bin_dir = pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: initdb not found (set PG_BIN)")
        pytest.skip("PostgreSQL's initdb not found (install postgresql, or set PG_BIN)")
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # short: a socket's path has ~100 characters
    as_server = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_server, bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                    "--no-sync", "--locale=C", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_server, bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w",
                    "-o", f"-k {folder} -c listen_addresses='' -c fsync=off", "start"],
                   check=True, capture_output=True)
    yield f"postgresql://postgres@/postgres?host={folder}"
    subprocess.run([*as_server, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def sweep_args(tmp_path, study, *space, storage=None, options=(), script_args=("--epochs", "2")):
    """A sweep of the stand-in in tmp_path; --heartbeat 4 s (a beat each second), so a dead
    worker's trial comes back quickly."""
    return ["--script", str(tmp_path / "fake_train.py"), "--study", study,
            "--sweeps-dir", str(tmp_path / "sweeps"), "--heartbeat", "4",
            *(f"--space={entry}" for entry in space),
            *(["--storage", storage] if storage else []), *options, "--", *script_args]


def start_worker(tmp_path, args, name):
    """sweep.py as its own process: the worker process is the point of these tests."""
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, ROOT / "sweep.py", *args], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)


def finish(worker, tmp_path, name, timeout=60):
    assert worker.wait(timeout=timeout) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]


def run_sweep(*args):
    """sweep.main in this process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = sweep.main(list(map(str, args)))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            signal.signal(signal.SIGTERM, handler)
    return code, stdout.getvalue(), stderr.getvalue()


def load(study, tmp_path, storage=None):
    return optuna.load_study(study_name=study,
                             storage=storage or f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}")


def complete_params(study):
    return [trial.params for trial in study.trials
            if trial.state == optuna.trial.TrialState.COMPLETE]


def two_workers_run_the_grid_once(tmp_path, study_name, storage):
    """Two workers at once on a 2x2 grid; the first two runs wait for each other, so each worker
    takes one at least, however the two processes are scheduled."""
    go = tmp_path / "go"
    args = sweep_args(tmp_path, study_name, "loss=1,2", storage=storage, options=["--seeds=0,1"],
                      script_args=["--epochs", "2", "--sleep", "0.05", "--wait-for", go])
    workers = [start_worker(tmp_path, args, f"worker{i}") for i in range(2)]
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "sweeps" / study_name).glob("trial-*/starts.txt"))) < 2:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.05)
    go.touch()
    for i, worker in enumerate(workers):
        finish(worker, tmp_path, f"worker{i}")
    study = load(study_name, tmp_path, storage)
    params = complete_params(study)
    assert len(study.trials) == 4 and len(params) == 4, sweep.state_counts(study)
    assert sorted((p["loss"], p["seed"]) for p in params) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert {trial.user_attrs["worker"].split(":")[1] for trial in study.trials} == \
        {str(worker.pid) for worker in workers}  # both took trials
    assert sorted(trial.value for trial in study.trials) == [1, 1.01, 2, 2.01]
    for trial in study.trials:  # each run once, to the end
        starts = (Path(trial.user_attrs["results_dir"]) / "starts.txt").read_text().splitlines()
        assert len(starts) == 1 and starts[0].endswith(" 0")


def test_two_workers_share_a_postgresql_study_and_run_each_grid_point_once(
        tmp_path, fake_train, postgresql):
    two_workers_run_the_grid_once(tmp_path, "grid-pg", postgresql)


def test_two_workers_share_the_embedded_default_storage(tmp_path, fake_train):
    two_workers_run_the_grid_once(tmp_path, "grid-sqlite", None)
    assert (tmp_path / "sweeps" / "optuna.db").is_file()


def process_gone(pid):
    """No such process, or one already dead (a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_killed_workers_trial_is_resumed_by_another_worker(tmp_path, fake_train, postgresql):
    """A worker killed while its run is held after 2 of 4 epochs; another worker started after
    it runs the other trial, then resumes the killed one's run."""
    go = tmp_path / "go"
    args = sweep_args(tmp_path, "killed", "loss=1,2", storage=postgresql,
                      script_args=["--epochs", "4", "--sleep", "0.05", "--wait-for", go,
                                   "--wait-after", "2"])
    first_run = tmp_path / "sweeps" / "killed" / "trial-0"
    killed = start_worker(tmp_path, args, "killed")
    deadline = time.monotonic() + 60
    while len(sweep.read_history(first_run)) < 2:
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    training = int((first_run / "starts.txt").read_text().split()[0])
    deadline = time.monotonic() + 5
    while not process_gone(training):  # it dies with its worker
        assert time.monotonic() < deadline, "the training process outlived its killed worker"
        time.sleep(0.05)
    go.touch()
    other = start_worker(tmp_path, args, "other")
    finish(other, tmp_path, "other")
    study = load("killed", tmp_path, postgresql)
    states = [trial.state.name for trial in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"], states
    retry = study.trials[2]
    assert retry.params == study.trials[0].params == {"loss": 1, "seed": 0}
    assert retry.user_attrs["results_dir"] == str(first_run)
    assert retry.user_attrs["worker"].endswith(f":{other.pid}")
    starts = [line.split() for line in (first_run / "starts.txt").read_text().splitlines()]
    assert len(starts) == 2 and int(starts[1][1]) == 2  # resumed, not from epoch 1
    assert [epoch.number for epoch in sweep.read_history(first_run)] == [1, 2, 3, 4]
    assert sorted(map(str, complete_params(study))) == sorted(
        map(str, [{"loss": 1, "seed": 0}, {"loss": 2, "seed": 0}]))


def test_a_terminated_worker_stops_its_run_cleanly_and_queues_its_trial_again(
        tmp_path, fake_train):
    args = sweep_args(tmp_path, "terminated", "loss=1", script_args=["--epochs", "12",
                                                                     "--sleep", "0.1"])
    run = tmp_path / "sweeps" / "terminated" / "trial-0"

    def terminate_after_two_epochs():
        while len(sweep.read_history(run)) < 2:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # sweep.main turns it into KeyboardInterrupt

    threading.Thread(target=terminate_after_two_epochs, daemon=True).start()
    code, out, _ = run_sweep(*args)
    assert code == 130 and "trial 0 is queued again" in out
    assert (run / "interrupted").is_file() and not (run / "metrics.json").exists()
    code, out, err = run_sweep(*args)  # the same command again: it takes the queued trial
    assert code == 0, err
    study = load("terminated", tmp_path)
    assert [trial.state.name for trial in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["results_dir"] == str(run)
    starts = [line.split() for line in (run / "starts.txt").read_text().splitlines()]
    assert len(starts) == 2 and int(starts[1][1]) >= 2  # resumed


def test_pruning_stops_a_run_worse_than_the_median_and_keeps_its_checkpoint(tmp_path, fake_train):
    """Five runs complete (the median pruner's start-up), then a hopeless one: stopped by SIGINT
    after its first epoch, its checkpoint kept; with --pruner none, every run completes."""
    space = "loss=1,1.1,1.2,1.3,1.4,5"
    code, out, err = run_sweep(*sweep_args(tmp_path, "pruned", space, script_args=[
        "--epochs", "3", "--sleep", "0.02", "--hang-above", "4"]))
    assert code == 0, err
    study = load("pruned", tmp_path)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 5 + ["PRUNED"], out
    pruned = Path(study.trials[5].user_attrs["results_dir"])
    assert (pruned / "interrupted").is_file()  # SIGINT: the script's own clean stop
    assert json.loads((pruned / "checkpoint.json").read_text())[0] == [5]
    assert not (pruned / "metrics.json").exists() and "trial 5 pruned" in out
    assert study.trials[5].intermediate_values == {1: 5}
    code, out, err = run_sweep(*sweep_args(tmp_path, "unpruned", space, options=["--pruner=none"],
                                           script_args=["--epochs", "3", "--sleep", "0.02"]))
    assert code == 0 and sweep.state_counts(load("unpruned", tmp_path)) == "6 complete"
    report = shlex.join([sys.executable, "sweep.py", "--study", "unpruned", "--report", "--sweeps-dir",
                         str(tmp_path / "sweeps")])
    assert f"its table: {report}\n" in out  # complete: where the study is
    assert f"trial 0: {shlex.join([sys.executable, str(tmp_path / 'fake_train.py')])} --epochs 3" in out


def test_a_range_samples_configurations_each_run_with_every_seed(tmp_path, fake_train):
    # --pruner none: the sixth run is past the median pruner's start-up of five, and a sampled loss
    # above the median would stop it (test_pruning_stops_a_run_worse_than_the_median tests that)
    code, out, err = run_sweep(*sweep_args(tmp_path, "tpe", "loss=0.5:4:log", "sleep=0.01,0.02",
                                           options=["--seeds=0,1", "--trials=3", "--pruner=none"],
                                           script_args=["--epochs", "1"]))
    assert code == 0, err
    study = load("tpe", tmp_path)
    configurations = {}
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        configurations.setdefault(trial.user_attrs["flags"], []).append(trial.params["seed"])
        assert 0.5 <= trial.params["loss"] <= 4
    assert len(configurations) == 3 and all(sorted(s) == [0, 1] for s in configurations.values())
    code, out, err = run_sweep("--study", "tpe", "--sweeps-dir", tmp_path / "sweeps", "--report")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and all("| 0,1 |" in line for line in table[1:])  # header, rows
    assert "every latent dimension used | CPU |" in table[0]
    assert all("| 1 of 2 | avx2 |" in line for line in table[1:])  # seed 1's runs use one


def test_a_trial_over_the_time_budget_is_pruned_and_the_report_and_csv_say_so(tmp_path,
                                                                               fake_train):
    """The worker times the baseline (the stand-in's default --sleep 0.1 an epoch) before each
    trial; a configuration 3x slower is pruned once its epochs 2 and 3 are timed, a faster one
    completes with its ratio recorded."""
    code, out, err = run_sweep(*sweep_args(
        tmp_path, "budget", "sleep=0.03,0.3", options=["--max-time-ratio=2", "--pruner=none",
                                                       "--baseline-every=0"],
        script_args=["--epochs", "6"]))
    assert code == 0, err
    assert out.count("timing the baseline for 4 epochs") == 2  # before each trial, with 0
    assert "trial 1 pruned: " in out, out
    study = load("budget", tmp_path)
    fast, slow = study.trials
    assert (fast.state.name, slow.state.name) == ("COMPLETE", "PRUNED")
    assert fast.user_attrs["time_ratio"] < 0.6 and 2 < slow.user_attrs["time_ratio"] < 4.5
    assert slow.user_attrs["pruned"] == "time" and slow.user_attrs["epochs"] == 3
    assert sorted(slow.intermediate_values) == [1, 2, 3]  # stopped once timed: its checkpoint
    assert (Path(slow.user_attrs["results_dir"]) / "interrupted").is_file()
    assert slow.constraints["time"] > 0 > fast.constraints["time"]  # what TPE learns from
    assert not list((tmp_path / "sweeps" / "budget").glob("baseline-*"))  # the timing run is gone
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, err = run_sweep("--study", "budget", *storage, "--report", "--figure",
                               tmp_path / "history.png")
    assert code == 0, err
    assert "1 complete, 1 pruned (1 over the time budget)" in out
    [row] = [line for line in out.splitlines() if "fake_train.py |" in line]
    assert f"({sweep.number(fast.user_attrs['time_ratio'])}×)" in row and "--sleep 0.03" in row
    assert (tmp_path / "history.png").stat().st_size > 10_000
    code, _, _ = run_sweep("--study", "budget", *storage, "--export-csv", tmp_path / "budget.csv")
    with open(tmp_path / "budget.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert code == 0 and [row["pruned"] for row in rows] == ["", "time"]
    assert rows[1]["fid_pixel_recon"] == "" and float(rows[1]["time_ratio"]) > 2
    copy = sweep.study_from_csv(tmp_path / "budget.csv")  # the committed file tells the same story
    assert sweep.state_counts(copy) == sweep.state_counts(study)
    assert sweep.report_table(copy) == sweep.report_table(study)


def test_a_resumed_trial_is_timed_by_its_own_sitting_not_the_earlier_one(tmp_path, fake_train):
    """A run resumed in a later sitting (the machine slower or faster then, or another machine)
    is timed by its new epochs against the baseline timed now: its earlier slow epochs do not
    prune it."""
    options = ["--max-time-ratio=2", "--pruner=none"]  # 40 epochs: still running when polled
    code, _, err = run_sweep(*sweep_args(tmp_path, "resumed", "sleep=0.03", options=options,
                                         script_args=["--epochs", "40"]))
    assert code == 0, err
    earlier = tmp_path / "sweeps" / "resumed" / "trial-1"  # 3 epochs of 1 s: 10x the baseline
    earlier.mkdir()
    (earlier / "checkpoint.json").write_text(json.dumps([[1.0] * 3, [1.0] * 3]))
    (earlier / "history.csv").write_text("epoch,loss,val_loss,val_reconstruction_loss,"
                                         "val_kl_loss,seconds\n" + "".join(
                                             f"{epoch},1,1,1,0,1.0\n" for epoch in (1, 2, 3)))
    load("resumed", tmp_path).enqueue_trial(
        {"sleep": 0.03, "seed": 0}, user_attrs={"queued_as": "grid point",
                                                "results_dir": str(earlier), "time_ratio": 10.0})
    code, out, err = run_sweep(*sweep_args(tmp_path, "resumed", "sleep=0.03", options=options,
                                           script_args=["--epochs", "40"]))
    assert code == 0 and "resuming its checkpoint" in out, out + err
    resumed = load("resumed", tmp_path).trials[1]
    assert resumed.state.name == "COMPLETE" and resumed.user_attrs["time_ratio"] < 0.6


def test_the_best_command_is_the_best_configuration_within_the_time_budget(tmp_path, fake_train):
    """Two epochs: too few to prune at, so the slow configurations complete over budget; the
    equally good fast one is the best command."""
    code, out, err = run_sweep(*sweep_args(
        tmp_path, "best", "sleep=0.3,0.03", "loss=1,2", options=["--max-time-ratio=2"],
        script_args=["--epochs", "2"]))
    assert code == 0, err
    code, out, err = run_sweep("--study", "best", "--sweeps-dir", tmp_path / "sweeps", "--report")
    [best] = [line for line in out.splitlines() if line.startswith("best ")]
    assert code == 0 and "--sleep 0.03 --loss 1`" in best, out


def test_importances_rank_the_parameter_that_decides_the_objective(tmp_path):
    """Twelve imported runs whose objective follows --width alone, not --noise."""
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_COLUMNS)
        writer.writeheader()
        for i in range(12):
            width, noise = 2 ** (4 + i % 6), [0.3, 0.1, 0.7, 0.5][i % 4]
            writer.writerow({"script": "vae.py", "flags": f"--width {width} --noise {noise}",
                             "seed": 0, "epochs": 1, "fid_pixel_recon": 100 / width})
    study = sweep.study_from_csv(path)
    assert study.trials[0].distributions["width"] == optuna.distributions.IntDistribution(16, 512)
    assert study.trials[0].distributions["noise"] == optuna.distributions.FloatDistribution(0.1,
                                                                                           0.7)
    shares = sweep.importances(study)
    assert list(shares) == ["width", "noise"] and shares["width"] > 0.8
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:sweep.IMPORTANCE_MIN_TRIALS - 1])
    assert sweep.importances(sweep.study_from_csv(path)) == {}  # too few to say


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize()
def test_a_grid_study_runs_no_trial_it_did_not_queue(tmp_path, fake_train):
    """Where the queue cannot be locked (databases other than SQLite and PostgreSQL), another
    worker may take the grid's last queued trial between a worker's look at the queue and its
    pick; Optuna then hands the worker a new trial, which must run nothing."""
    args = sweep.parse_args(sweep_args(tmp_path, "race", "loss=1"))
    storage = sweep.open_storage(args)
    study = sweep.open_study(args, storage)
    study.ask()  # the other worker takes the one queued point
    study.optimize(lambda trial: sweep.run_trial(trial, args, study.user_attrs["sweep"], None), n_trials=1,
                   catch=(sweep.NothingQueued,))
    assert [trial.state.name for trial in study.trials] == ["RUNNING", "FAIL"]
    assert study.trials[1].params == {} and not (tmp_path / "sweeps" / "race").exists()


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, fake_train):
    for args, message in [
        (sweep_args(tmp_path, "bad", "loss"), "expected NAME=a,b,c"),
        (sweep_args(tmp_path, "bad", "loss=3:1"), "needs LOW < HIGH"),
        (sweep_args(tmp_path, "bad", "loss=1,2", script_args=["--seed", "3"]), "--seed: the sweep sets it"),
        (["--study", "nothing", "--sweeps-dir", tmp_path / "sweeps", "--report"], "no study"),
    ]:
        code, out, err = run_sweep(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    run_sweep(*sweep_args(tmp_path, "defined", "loss=1"))
    code, _, err = run_sweep(*sweep_args(tmp_path, "defined", "loss=2"))
    assert code == 2 and "choose another --study" in err
    code, _, err = run_sweep(*sweep_args(tmp_path, "defined", "loss=1", options=["--pruner=none"]))
    assert code == 2 and "choose another --study" in err  # the pruner defines it too
    for options, message in [(["--baseline=--sleep 1"], "--baseline is the reference"),
                             (["--figure=f.png"], "--figure draws")]:
        code, _, err = run_sweep(*sweep_args(tmp_path, "options", "loss=1", options=options))
        assert code == 2 and message in err, err
    code, _, err = run_sweep(*sweep_args(tmp_path, "typo", "lost=2"))  # the script refuses it
    assert code == 2 and "unrecognized arguments: --lost" in err


def test_tuning_csv_goes_through_a_study_unchanged_and_its_report_is_the_committed_table(
        tmp_path):
    tuning = ROOT / "results" / "tuning.csv"
    study = sweep.study_from_csv(tuning)
    sweep.export_csv(study, tmp_path / "tuning.csv")
    assert (tmp_path / "tuning.csv").read_bytes() == tuning.read_bytes()
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, _ = run_sweep("--study", "tuning", *storage, "--import-csv", tuning)
    with open(tuning, newline="") as f:
        rows = list(csv.DictReader(f))
    assert code == 0 and f"{len(rows)} run(s)" in out
    code, out, _ = run_sweep("--study", "tuning", *storage, "--import-csv", tuning)
    assert code == 0 and "0 run(s)" in out  # no run twice
    code, out, _ = run_sweep("--study", "tuning", *storage, "--report", "--", "--data", "my data.npz")
    assert code == 0 and sweep.report_table(study) in out  # the best command, complete, to paste:
    assert (f"best vae.py: `{shlex.quote(sys.executable)} vae.py --iw-samples 100 --hidden-dim 512 --hidden-layers 3 "
            "--data 'my data.npz'`") in out
    # A study's export replaces its own rows, keeps others.
    partial = tmp_path / "partial.csv"
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:3])
        writer.writerow({**rows[3], "flags": "--elsewhere 1"})
    code, out, _ = run_sweep("--study", "tuning", *storage, "--export-csv", partial)
    with open(partial, newline="") as f:
        exported = list(csv.DictReader(f))
    assert code == 0 and exported[:3] == rows[:3] and exported[3]["flags"] == "--elsewhere 1"
    assert exported[4:] == rows[3:]


def test_an_imported_study_keeps_its_search_space_and_time_budget(tmp_path):
    """Importances depend on each parameter's range, and the best run on the budget: given the
    study's --space and --max-time-ratio, a CSV's study reports what the study itself did."""
    study_csv = tmp_path / "study.csv"
    runs = [(64, 0.5, 14.0, 1.2), (256, 0.1, 12.0, 1.5), (256, 0.05, 11.0, 2.3)]  # the last: over
    with open(study_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_COLUMNS)
        writer.writeheader()
        for batch, beta, value, ratio in runs:
            writer.writerow({"script": "vae.py", "flags": f"--epochs 30 --batch-size {batch} "
                             f"--beta {beta}", "seed": 0, "epochs": 30, "fid_pixel_recon": value,
                             "time_ratio": ratio})
    space = ["--space", "batch-size=64,128,256", "--space", "beta=0.03:1.0:log"]
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, err = run_sweep("--study", "s", *storage, "--import-csv", study_csv, *space,
                               "--max-time-ratio", "2")
    assert code == 0, err
    url = f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}"
    study = optuna.load_study(study_name="s", storage=url)
    distributions = study.trials[0].distributions
    assert distributions["batch-size"] == optuna.distributions.CategoricalDistribution(
        [64, 128, 256])
    assert distributions["beta"] == optuna.distributions.FloatDistribution(0.03, 1.0, log=True)
    code, out, _ = run_sweep("--study", "s", *storage, "--report")
    assert code == 0 and "--batch-size 256 --beta 0.1` (fid_pixel_recon: median 12" in out
    code, _, err = run_sweep("--study", "t", *storage, "--import-csv", study_csv,
                             "--space", "beta=0.1:1.0")
    assert code == 2 and "`--epochs 30 --batch-size 256 --beta 0.05` lies outside --space" in err
    assert not optuna.load_study(study_name="t", storage=url).trials  # all or none
    code, _, err = run_sweep("--study", "u", *storage, "--import-csv", study_csv,
                             "--space", "betaa=0.1:1.0")  # a typo would leave beta's range guessed
    assert code == 2 and f"--space betaa: no run of {study_csv} sets it" in err


def test_a_real_vae_trial_reports_its_epochs_and_metrics(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script by its relative name, as the README's command gives it
    code, out, err = run_sweep(
        "--script", "vae.py", "--study", "real", "--sweeps-dir", tmp_path / "sweeps",
        "--space", "hidden-dim=16", "--", "--epochs", "2", "--train-size", "256",
        "--test-size", "128", "--fid", "pixel", "--iw-samples", "0", "--fid-samples", "128",
        "--beta", "0.5", "--data", tiny_mnist)
    assert code == 0, err
    study = load("real", tmp_path)
    trial = study.trials[0]
    metrics = json.loads((Path(trial.user_attrs["results_dir"]) / "metrics.json").read_text())
    assert trial.value == metrics["fid_pixel_recon"] > 0
    assert trial.user_attrs["test_elbo"] == metrics["test_elbo"]
    assert trial.user_attrs["flags"] == ("--epochs 2 --train-size 256 --test-size 128 --fid pixel "
                                         "--iw-samples 0 --fid-samples 128 --beta 0.5 "
                                         "--hidden-dim 16")
    assert study.user_attrs["sweep"]["args"] == trial.user_attrs["flags"].split()[:-2]  # no --data
    assert metrics["config"]["data"] == tiny_mnist.name  # this worker's own file
    assert metrics["config"]["hidden_dim"] == 16 and metrics["config"]["seed"] == 0
    assert sorted(trial.intermediate_values) == [1, 2]  # each epoch's test loss, from history.csv:
    # the negative test ELBO, not the beta-weighted loss the run minimizes
    assert trial.intermediate_values[2] == pytest.approx(
        metrics["final_test_reconstruction_loss"] + metrics["final_test_kl_loss"], rel=1e-5)
    assert trial.intermediate_values[2] > metrics["final_test_loss"] + 0.01
    code, _, _ = run_sweep("--study", "real", "--sweeps-dir", tmp_path / "sweeps",
                           "--export-csv", tmp_path / "runs.csv")
    with open(tmp_path / "runs.csv", newline="") as f:
        [row] = csv.DictReader(f)
    assert code == 0 and (row["script"], row["flags"], row["seed"], row["epochs"]) == (
        "vae.py", trial.user_attrs["flags"], "0", "2")
    assert float(row["fid_pixel_recon"]) == round(metrics["fid_pixel_recon"], 3)
    assert row["test_log_likelihood_iw"] == row["iw_samples"] == ""  # --iw-samples 0
