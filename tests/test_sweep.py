"""sweep.py: workers sharing a study (PostgreSQL, and the SQLite default), a grid point run once, a
killed worker's trial resumed by another, pruning, the time budget, sampled ranges, CSV files and
reports. The trials run a stand-in (FAKE_TRAIN: vae.py's outputs and exit codes without
TensorFlow, a trial under a second); only the last test runs vae.py itself."""

import contextlib
import csv
import io
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import sweep
from conftest import ROOT

# Optuna calls its heartbeats experimental; sweep.py silences that in its own process only.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FAKE_TRAIN = '''
"""A stand-in for vae.py: --epochs epochs of --sleep seconds, each with the test loss --loss (plus
seed/100), in history.csv and a checkpoint that --resume continues; SIGINT exits 130, a negative
loss exits 1 (a NaN); metrics.json at the end. Epoch --wait-after + 1 begins once --wait-for FILE
exists (the test's cue); a loss above --hang-above makes no progress after epoch 1."""
import argparse, json, os, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
for flag, default in [("--epochs", 3), ("--sleep", 0.1), ("--loss", 1.0), ("--seed", 0),
                      ("--wait-after", 0), ("--hang-above", float("inf"))]:
    parser.add_argument(flag, type=type(default), default=default)
parser.add_argument("--results-dir")
parser.add_argument("--wait-for")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()
if args.loss < 0:
    sys.exit("fake_train.py: the loss is NaN")
folder = Path(args.results_dir)
checkpoint = folder / "checkpoint.json"
if checkpoint.is_file() != args.resume:
    parser.error("no checkpoint" if args.resume else "holds a run")
losses, seconds = json.loads(checkpoint.read_text()) if args.resume else ([], [])
with open(folder / "starts.txt", "a") as f:  # one line per start: process id, epochs done
    f.write(f"{os.getpid()} {len(losses)}\\n")
try:
    while len(losses) < args.epochs:
        while (args.wait_for and len(losses) == args.wait_after and not Path(args.wait_for).exists()
               or losses and args.loss > args.hang_above):
            time.sleep(0.02)
        start = time.perf_counter()
        time.sleep(args.sleep)
        losses.append(args.loss + args.seed / 100)
        seconds.append(time.perf_counter() - start)
        (folder / "checkpoint.tmp").write_text(json.dumps([losses, seconds]))  # first, as vae.py
        os.replace(folder / "checkpoint.tmp", checkpoint)
        rows = [f"{n},{x},{x},{x},0,{s}\\n" for n, (x, s) in enumerate(zip(losses, seconds), 1)]
        (folder / "history.tmp").write_text(
            "epoch,loss,val_loss,val_reconstruction_loss,val_kl_loss,seconds\\n" + "".join(rows))
        os.replace(folder / "history.tmp", folder / "history.csv")
except KeyboardInterrupt:
    (folder / "interrupted").touch()
    sys.exit(130)
metrics = {"fid_pixel_recon": losses[-1], "test_elbo": -losses[-1], "epochs": len(losses),
           "seconds_per_epoch": seconds, "config": {"latent_dim": 2},
           "machine": {"isa": "avx2"}, "active_units": 2 if args.seed == 0 else 1}
(folder / "metrics.json").write_text(json.dumps(metrics))
'''


@pytest.fixture(scope="session")
def postgresql():
    """This session's PostgreSQL on a Unix socket (run as the postgres user when root): its URL."""
    found = [os.environ.get("PG_BIN"), os.path.dirname(shutil.which("initdb") or ""),
             *sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)]  # Debian
    bin_dir = next((Path(c) for c in found if c and (Path(c) / "initdb").is_file()), None)
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: initdb not found (set PG_BIN)")
        pytest.skip("PostgreSQL's initdb not found (install postgresql, or set PG_BIN)")
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # short: a socket's path has ~100 characters
    as_server = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_server, bin_dir / "initdb", "-D", folder / "data", "-U", "postgres",
                    "--auth=trust", "--no-sync", "--locale=C", "-E", "UTF8"], check=True,
                   capture_output=True)
    pg_ctl = [*as_server, bin_dir / "pg_ctl", "-D", folder / "data"]
    subprocess.run([*pg_ctl, "-l", folder / "server.log", "-w", "-o",
                    f"-k {folder} -c listen_addresses='' -c fsync=off", "start"], check=True,
                   capture_output=True)
    yield f"postgresql://postgres@/postgres?host={folder}"
    subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def sweep_args(tmp_path, study, *space, storage=None, options=(), script_args=("--epochs", "2")):
    """A sweep of the stand-in; --heartbeat 4 s, so a dead worker's trial comes back quickly."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    return ["--script", str(tmp_path / "fake_train.py"), "--study", study,
            "--sweeps-dir", str(tmp_path / "sweeps"), "--heartbeat", "4",
            *(f"--space={entry}" for entry in space),
            *(["--storage", storage] if storage else []), *options, "--", *script_args]


def start_worker(tmp_path, args, name):
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, ROOT / "sweep.py", *args], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)


def finish(worker, tmp_path, name):
    assert worker.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]


def wait_until(condition, workers=(), timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.05)


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


def starts(results_dir):  # (process id, epochs done before it) of each start
    return [tuple(map(int, line.split()))
            for line in (Path(results_dir) / "starts.txt").read_text().splitlines()]


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_two_workers_share_a_study_and_run_each_grid_point_once(tmp_path, request, database):
    """Two workers on a 2x2 grid whose first two runs wait for each other: each worker takes one.
    The study in PostgreSQL, or in the embedded default storage (SQLite)."""
    study_name, go = f"grid-{database}", tmp_path / "go"
    storage = request.getfixturevalue("postgresql") if database == "postgresql" else None
    args = sweep_args(tmp_path, study_name, "loss=1,2", storage=storage, options=["--seeds=0,1"],
                      script_args=["--epochs", "2", "--sleep", "0.05", "--wait-for", go])
    workers = [start_worker(tmp_path, args, f"worker{i}") for i in range(2)]
    wait_until(lambda: len(list((tmp_path / "sweeps" / study_name).glob("trial-*/starts.txt")))
               >= 2, workers)
    go.touch()
    for i, worker in enumerate(workers):
        finish(worker, tmp_path, f"worker{i}")
    study = load(study_name, tmp_path, storage)
    complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
    assert sorted(sorted(t.params.items()) for t in complete) == [  # each point once, and a
        [("loss", loss), ("seed", seed)] for loss in (1, 2) for seed in (0, 1)]  # lost race's
    assert all(not trial.params for trial in study.trials if trial not in complete)  # nothing
    assert {t.user_attrs["worker"].split(":")[1] for t in complete} == {str(w.pid) for w in workers}
    for trial in complete:  # each run once, to the end
        assert [epochs for _, epochs in starts(trial.user_attrs["results_dir"])] == [0]
    if database == "sqlite":
        journal = sqlite3.connect(tmp_path / "sweeps" / "optuna.db").execute("PRAGMA journal_mode")
        assert journal.fetchone() == ("wal",)  # readers never block


def process_gone(pid):  # or a zombie until its new parent reaps it
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_killed_workers_trial_is_resumed_by_another_worker(tmp_path, postgresql):
    """A worker killed while its run is held after 2 of 4 epochs; another one started later runs
    the other trial, then resumes the killed one's run."""
    go = tmp_path / "go"
    args = sweep_args(tmp_path, "killed", "loss=1,2", storage=postgresql, script_args=[
        "--epochs", "4", "--sleep", "0.05", "--wait-for", go, "--wait-after", "2"])
    first_run = tmp_path / "sweeps" / "killed" / "trial-0"
    killed = start_worker(tmp_path, args, "killed")
    wait_until(lambda: len(sweep.read_history(first_run)) >= 2, [killed])
    killed.kill()
    killed.wait()
    wait_until(lambda: process_gone(starts(first_run)[0][0]), timeout=5)  # dies with its worker
    go.touch()
    other = start_worker(tmp_path, args, "other")
    finish(other, tmp_path, "other")
    failed, _, retry = load("killed", tmp_path, postgresql).trials
    assert [trial.state.name for trial in (failed, _, retry)] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert retry.params == failed.params == {"loss": 1, "seed": 0}
    assert (retry.user_attrs["results_dir"], retry.user_attrs["worker"]) == (
        str(first_run), f"{os.uname().nodename}:{other.pid}")
    assert [epochs for _, epochs in starts(first_run)] == [0, 2]  # resumed, not from epoch 1


@pytest.mark.parametrize("stop", ["terminated", "late"])
def test_a_trial_stopped_mid_run_is_queued_again_and_its_copy_resumes_it(tmp_path, stop):
    """terminated: SIGTERM to the worker, which stops its run cleanly and queues its trial again.
    late: what another worker does where a heartbeat is late (an overloaded machine): fail the
    trial mid-run and queue a copy. This worker says so, stops its run and takes the copy."""
    args = sweep_args(tmp_path, stop, "loss=1", script_args=["--epochs", "12"])
    run = tmp_path / "sweeps" / stop / "trial-0"

    def stop_after_two_epochs():
        wait_until(lambda: len(sweep.read_history(run)) >= 2)
        if stop == "terminated":
            os.kill(os.getpid(), signal.SIGTERM)  # sweep.main turns it into KeyboardInterrupt
            return
        study = load(stop, tmp_path)
        [trial] = study.get_trials(deepcopy=False)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        sweep.RETRY(study, trial)

    threading.Thread(target=stop_after_two_epochs, daemon=True).start()
    code, out, err = run_sweep(*args)
    if stop == "terminated":
        assert code == 130 and "trial 0 is queued again" in out
        assert (run / "interrupted").is_file() and not (run / "metrics.json").exists()
        assert run_sweep(*args)[0] == 0  # the same command again: it takes the queued trial
    else:
        assert code == 0 and "another worker failed this worker's trial" in out, err
    failed, retry = load(stop, tmp_path).trials
    assert (failed.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert retry.user_attrs["results_dir"] == str(run) and starts(run)[1][1] >= 2  # resumed


def test_pruning_stops_a_run_worse_than_the_median_and_a_failed_run_fails_only_its_trial(tmp_path):
    """Five runs complete (the median pruner's start-up), then a hopeless one: stopped by SIGINT
    after its first epoch, its checkpoint kept. With --pruner none every run completes, but one
    that exits 1 (a NaN loss)."""
    space = "loss=1,1.1,1.2,1.3,1.4,5"
    code, out, err = run_sweep(*sweep_args(tmp_path, "pruned", space, script_args=[
        "--epochs", "3", "--sleep", "0.02", "--hang-above", "4"]))
    study = load("pruned", tmp_path)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 5 + ["PRUNED"], out + err
    pruned = Path(study.trials[5].user_attrs["results_dir"])
    assert (pruned / "interrupted").is_file()  # SIGINT: the script's own clean stop
    assert json.loads((pruned / "checkpoint.json").read_text())[0] == [5]
    assert not (pruned / "metrics.json").exists() and "trial 5 pruned" in out
    code, out, err = run_sweep(*sweep_args(tmp_path, "unpruned", "loss=-1," + space[5:],
                                           options=["--pruner=none"],
                                           script_args=["--epochs", "3", "--sleep", "0.02"]))
    assert code == 0 and sweep.state_counts(load("unpruned", tmp_path)) == "1 fail, 6 complete"
    assert "trial 0 failed: exit code 1: fake_train.py: the loss is NaN" in out
    assert "its table: " + shlex.join([sys.executable, "sweep.py", "--study", "unpruned",
                                       "--report", "--sweeps-dir", str(tmp_path / "sweeps")]) in out
    assert f"trial 1: {shlex.join([sys.executable, str(tmp_path / 'fake_train.py')])} --epochs 3" \
        in out


def test_a_range_samples_configurations_each_run_with_every_seed(tmp_path):
    # --pruner none: the sixth run is past the median pruner's start-up of five
    code, out, err = run_sweep(*sweep_args(tmp_path, "tpe", "loss=0.5:4:log", "sleep=0.01,0.02",
                                           options=["--seeds=0,1", "--trials=3", "--pruner=none"],
                                           script_args=["--epochs", "1"]))
    assert code == 0, err
    trials = load("tpe", tmp_path).trials
    assert all(t.state.name == "COMPLETE" and 0.5 <= t.params["loss"] <= 4 for t in trials)
    assert len(trials) == 6 and len({trial.user_attrs["flags"] for trial in trials}) == 3
    out = run_sweep("--study", "tpe", "--sweeps-dir", tmp_path / "sweeps", "--report")[1]
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]  # each with both
    assert len(rows) == 3 and all("| 0,1 |" in row and "| 1 of 2 | avx2 |" in row for row in rows)


def test_a_trial_over_the_time_budget_is_pruned_and_the_report_and_csv_say_so(tmp_path):
    """The baseline (the stand-in's default --sleep 0.1) timed before each trial; a configuration 3x
    slower is pruned once its epochs 2 and 3 are timed, a faster one completes with its ratio."""
    options = ["--max-time-ratio=2", "--pruner=none", "--baseline-every=0"]
    code, out, err = run_sweep(*sweep_args(tmp_path, "budget", "sleep=0.03,0.3", options=options,
                                           script_args=["--epochs", "6"]))
    assert code == 0 and out.count("timing the baseline for 4 epochs") == 2, err  # before each
    assert "trial 1 pruned: " in out, out
    study = load("budget", tmp_path)
    fast, slow = study.trials
    assert (fast.state.name, slow.state.name) == ("COMPLETE", "PRUNED")
    assert fast.user_attrs["time_ratio"] < 0.6 and 2 < slow.user_attrs["time_ratio"] < 4.5
    assert slow.user_attrs["pruned"] == "time" and slow.user_attrs["epochs"] == 3  # once timed
    assert (Path(slow.user_attrs["results_dir"]) / "interrupted").is_file()
    assert slow.constraints["time"] > 0 > fast.constraints["time"]  # what TPE learns from
    assert not list((tmp_path / "sweeps" / "budget").glob("baseline-*"))  # the timing run is gone
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, err = run_sweep("--study", "budget", *storage, "--report", "--figure",
                               tmp_path / "history.png")
    assert code == 0 and "1 complete, 1 pruned (1 over the time budget)" in out, err
    [row] = [line for line in out.splitlines() if "fake_train.py |" in line]
    assert f"({sweep.number(fast.user_attrs['time_ratio'])}×)" in row and "--sleep 0.03" in row
    assert (tmp_path / "history.png").stat().st_size > 10_000
    code, _, _ = run_sweep("--study", "budget", *storage, "--export-csv", tmp_path / "budget.csv")
    rows = sweep.read_csv(tmp_path / "budget.csv")
    assert code == 0 and [row["pruned"] for row in rows] == ["", "time"]
    assert rows[1]["fid_pixel_recon"] == "" and float(rows[1]["time_ratio"]) > 2
    copy = sweep.study_from_csv(tmp_path / "budget.csv")  # the committed file tells the same story
    assert sweep.state_counts(copy) == sweep.state_counts(study)
    assert sweep.report_table(copy) == sweep.report_table(study)


def test_a_resumed_trial_is_timed_by_its_own_sitting_and_a_finished_one_is_read(tmp_path):
    """A run resumed in a later sitting is timed by its new epochs against the baseline timed now,
    not its earlier slow ones; a retry whose run had finished reads its metrics, running nothing."""
    args = sweep_args(tmp_path, "resumed", "sleep=0.03", options=["--max-time-ratio=2"],
                      script_args=["--epochs", "40"])  # 40 epochs: still running when polled
    code, _, err = run_sweep(*args)
    assert code == 0, err
    earlier = tmp_path / "sweeps" / "resumed" / "trial-1"  # 3 epochs of 1 s: 10x the baseline
    earlier.mkdir()
    (earlier / "checkpoint.json").write_text(json.dumps([[1.0] * 3, [1.0] * 3]))
    (earlier / "history.csv").write_text("epoch,loss,val_loss,val_reconstruction_loss,val_kl_loss,"
                                         "seconds\n1,1,1,1,0,1\n2,1,1,1,0,1\n3,1,1,1,0,1\n")
    finished = load("resumed", tmp_path).trials[0].user_attrs["results_dir"]
    for results_dir, ratio in [(earlier, 10.0), (finished, 0.1)]:
        load("resumed", tmp_path).enqueue_trial({"sleep": 0.03, "seed": 0}, user_attrs={
            "queued_as": "grid point", "results_dir": str(results_dir), "time_ratio": ratio})
    code, out, err = run_sweep(*args)
    assert code == 0 and "resuming its checkpoint" in out, out + err
    first, resumed, read = load("resumed", tmp_path).trials
    assert resumed.state.name == "COMPLETE" and resumed.user_attrs["time_ratio"] < 0.6
    assert read.value == first.value and len(starts(finished)) == 1


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize()
def test_a_grid_study_runs_no_trial_it_did_not_queue(tmp_path):
    """Another worker took the grid's last queued trial between this one's look and its pick."""
    args = sweep.parse_args(sweep_args(tmp_path, "race", "loss=1"))
    study = sweep.open_study(args, sweep.open_storage(args))
    study.ask()  # the other worker takes the one queued point
    study.optimize(lambda trial: sweep.run_trial(trial, args, study.user_attrs["sweep"], {}),
                   n_trials=1, catch=(sweep.NothingQueued,))
    assert [trial.state.name for trial in study.trials] == ["RUNNING", "FAIL"]
    assert study.trials[1].params == {} and not (tmp_path / "sweeps" / "race").exists()


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    sweeps = ["--sweeps-dir", tmp_path / "sweeps"]
    run_sweep(*sweep_args(tmp_path, "defined", "loss=1"))
    for args, message in [
        (sweep_args(tmp_path, "defined", "loss=2"), "choose another --study"),
        (sweep_args(tmp_path, "defined", "loss=1", options=["--pruner=none"]), "choose another"),
        (sweep_args(tmp_path, "bad", "loss"), "expected NAME=a,b,c"),
        (sweep_args(tmp_path, "bad", "loss=3:1"), "needs numbers LOW < HIGH"),
        (sweep_args(tmp_path, "bad", "loss=1,2", script_args=["--seed", "3"]), "--seed: set by"),
        (sweep_args(tmp_path, "bad", "loss=1", script_args=["--loss=2"]), "--loss: set by"),
        (sweep_args(tmp_path, "bad", "loss=1", options=["--baseline=--sleep 1"]), "--baseline is"),
        (sweep_args(tmp_path, "bad", "loss=1", options=["--figure=f.png"]), "--figure draws"),
        (["--script", tmp_path / "none.py", "--study", "bad"], f"{tmp_path / 'none.py'}: no such"),
        (["--study", "nothing", *sweeps, "--report"], "no study nothing"),
        (["--study", "nothing", *sweeps, "--import-csv", tmp_path / "no.csv"], "cannot read"),
        (["--study", "s", "--storage", "postgresql://me:secret@/db?host=/nothing", "--report"],
         "cannot open --storage postgresql://me:***@/db"),  # no password in messages
        (sweep_args(tmp_path, "typo", "lost=2"), "unrecognized arguments: --lost"),  # the script's
        (sweep_args(tmp_path, "objective", "loss=1", options=[
            "--objective=test_log_likelihood_iw"]), "metrics.json has no test_log_likelihood_iw"),
        (sweep_args(tmp_path, "baseline", "loss=1", options=["--max-time-ratio=2",
                                                             "--baseline=--lost 1"]),
         "the baseline (--lost 1) ran 0 epoch(s), exit code 2"),
    ]:
        code, out, err = run_sweep(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_tuning_csv_goes_through_a_study_unchanged_and_its_report_is_the_committed_table(tmp_path):
    tuning = ROOT / "results" / "tuning.csv"
    study = sweep.study_from_csv(tuning)
    sweep.export_csv(study, tmp_path / "tuning.csv")
    assert (tmp_path / "tuning.csv").read_bytes() == tuning.read_bytes()
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    rows = sweep.read_csv(tuning)
    for added in (len(rows), 0):  # no run twice
        code, out, _ = run_sweep("--study", "tuning", *storage, "--import-csv", tuning)
        assert code == 0 and f": {added} run(s)" in out
    out = run_sweep("--study", "tuning", *storage, "--report", "--", "--data", "my data.npz")[1]
    assert sweep.report_table(study) in out  # and the best command, complete, to paste:
    assert (f"best vae.py: `{shlex.quote(sys.executable)} vae.py --iw-samples 100 --hidden-dim "
            "512 --hidden-layers 3 --data 'my data.npz'`") in out
    partial = tmp_path / "partial.csv"  # a study's export replaces its own rows, keeps others
    write_csv(partial, [*rows[:3], {**rows[3], "flags": "--elsewhere 1"}])
    code, out, _ = run_sweep("--study", "tuning", *storage, "--export-csv", partial)
    exported = sweep.read_csv(partial)
    assert code == 0 and exported[:3] == rows[:3] and exported[3]["flags"] == "--elsewhere 1"
    assert exported[4:] == rows[3:]


def test_an_imported_study_has_its_runs_ranges_or_its_search_space_and_time_budget(tmp_path):
    """Twelve runs whose objective follows --width alone, not --noise (nor --fixed, one value in
    half of them): the importances say so, over the ranges the runs span. Given the study's
    --space (the ranges) and --max-time-ratio (the best run), it reports what the study did."""
    rows = [{"script": "vae.py", "flags": f"--width {2 ** (4 + i % 6)} --noise "
             f"{[0.3, 0.1, 0.7, 0.5][i % 4]}" + " --fixed 1" * (i % 2), "seed": 0,
             "epochs": 1, "fid_pixel_recon": 100 / 2 ** (4 + i % 6)} for i in range(12)]
    write_csv(tmp_path / "runs.csv", rows)
    study = sweep.study_from_csv(tmp_path / "runs.csv")
    assert study.trials[0].distributions == {"width": IntDistribution(16, 512),
                                             "noise": FloatDistribution(0.1, 0.7),
                                             "seed": IntDistribution(0, 0)}
    shares = sweep.importances(study)
    assert list(shares) == ["width", "noise"] and shares["width"] > 0.8
    write_csv(tmp_path / "runs.csv", rows[:sweep.IMPORTANCE_MIN_TRIALS - 1])
    assert sweep.importances(sweep.study_from_csv(tmp_path / "runs.csv")) == {}  # too few
    study_csv = tmp_path / "study.csv"
    write_csv(study_csv, [{"script": "vae.py", "flags": f"--epochs 30 --batch-size {batch} "
                           f"--beta {beta}", "seed": 0, "epochs": 30, "fid_pixel_recon": value,
                           "time_ratio": ratio} for batch, beta, value, ratio in
                          [(64, 0.5, 14.0, 1.2), (256, 0.1, 12.0, 1.5), (256, 0.05, 11.0, 2.3)]])
    space = ["--space", "batch-size=64,128,256", "--space", "beta=0.03:1.0:log"]
    storage = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, err = run_sweep("--study", "s", *storage, "--import-csv", study_csv, *space,
                               "--max-time-ratio", "2")
    assert code == 0, err
    distributions = load("s", tmp_path).trials[0].distributions
    assert distributions["batch-size"] == CategoricalDistribution([64, 128, 256])
    assert distributions["beta"] == FloatDistribution(0.03, 1.0, log=True)
    code, out, _ = run_sweep("--study", "s", *storage, "--report")  # the last run: over budget
    assert code == 0 and "--batch-size 256 --beta 0.1` (offline: add --data PATH) (fid_pixel_recon: median 12" in out
    code, _, err = run_sweep("--study", "t", *storage, "--import-csv", study_csv,
                             "--space", "beta=0.1:1.0")
    assert code == 2 and "`--epochs 30 --batch-size 256 --beta 0.05` lies outside --space" in err
    assert not load("t", tmp_path).trials  # all or none
    code, _, err = run_sweep("--study", "u", *storage, "--import-csv", study_csv,
                             "--space", "betaa=0.1:1.0")  # a typo would leave beta's range guessed
    assert code == 2 and f"--space betaa: no run of {study_csv} sets it" in err


def test_a_real_vae_trial_reports_its_epochs_and_metrics(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script by its relative name, as the README's command gives it
    flags = ["--epochs", "2", "--train-size", "256", "--test-size", "128", "--fid", "pixel",
             "--iw-samples", "0", "--fid-samples", "128", "--beta", "0.5"]
    sweeps = ["--sweeps-dir", tmp_path / "sweeps"]
    code, out, err = run_sweep("--script", "vae.py", "--study", "real", *sweeps, "--space",
                               "hidden-dim=16", "--", *flags, "--data", tiny_mnist)
    assert code == 0, err
    study = load("real", tmp_path)
    [trial] = study.trials
    metrics = json.loads((Path(trial.user_attrs["results_dir"]) / "metrics.json").read_text())
    assert trial.value == metrics["fid_pixel_recon"] > 0
    assert trial.user_attrs["test_elbo"] == metrics["test_elbo"]
    assert trial.user_attrs["flags"].split() == [*flags, "--hidden-dim", "16"]
    assert study.user_attrs["sweep"]["args"] == flags  # not --data: this worker's own file
    assert metrics["config"]["data"] == tiny_mnist.name
    assert metrics["config"]["hidden_dim"] == 16 and metrics["config"]["seed"] == 0
    assert sorted(trial.intermediate_values) == [1, 2]  # each epoch's test loss, from history.csv:
    # the negative test ELBO, not the beta-weighted loss the run minimizes
    assert trial.intermediate_values[2] == pytest.approx(
        metrics["final_test_reconstruction_loss"] + metrics["final_test_kl_loss"], rel=1e-5)
    assert trial.intermediate_values[2] > metrics["final_test_loss"] + 0.01
    out = run_sweep("--study", "real", *sweeps, "--report")[1]  # the runs' --data, to paste as is
    assert f"vae.py {shlex.join([*flags, '--hidden-dim', '16', '--data', str(tiny_mnist)])}`" in out
    assert run_sweep("--study", "real", *sweeps, "--export-csv", tmp_path / "runs.csv")[0] == 0
    [row] = sweep.read_csv(tmp_path / "runs.csv")
    assert (row["flags"], row["seed"], row["epochs"], float(row["fid_pixel_recon"])) == (
        trial.user_attrs["flags"], "0", "2", round(metrics["fid_pixel_recon"], 3))
    assert row["test_log_likelihood_iw"] == row["iw_samples"] == ""  # --iw-samples 0


def test_two_workers_on_sqlite_never_claim_the_same_queued_trial(tmp_path):
    """A claim reads a trial as waiting, then marks it running: on SQLite, unless the transaction
    takes the write lock first, two workers can both read it as waiting and both run it."""
    args = sweep.parse_args(sweep_args(tmp_path, "queue", "loss=1"))
    optuna.create_study(storage=sweep.open_storage(args), study_name="queue")
    studies = [optuna.load_study(study_name="queue", storage=sweep.open_storage(args))
               for _ in range(2)]
    for _ in range(100):
        studies[0].enqueue_trial({"loss": 1})
    claimed = []

    def claim(study):
        while (trial_id := study._pop_waiting_trial_id()) is not None:
            claimed.append(trial_id)
    threads = [threading.Thread(target=claim, args=(study,)) for study in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(trial._trial_id for trial in studies[0].trials)  # once each
