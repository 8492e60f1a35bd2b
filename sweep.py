"""Hyper-parameter sweeps of vae.py or conv_vae.py on Optuna, by workers on one or many machines.

    python sweep.py --script vae.py --study dense-z2 --space hidden-dim=256,512,1024 \\
        --space hidden-layers=1,2,3 --seeds 0,1,2 -- --latent-dim 2 --epochs 30
    python sweep.py --study dense-z2 --report

One worker per core or machine, all on one study; each trial a run of the script in its own
process, pruned by SIGINT (it checkpoints and exits 130). results/studies/sweeps.md tells more.
"""

import argparse
import collections
import csv
import ctypes
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import fid
import plot_utils
from fid import RunFailed, UsageError

DEFAULT_OBJECTIVE = "fid_pixel_recon"  # the original repository's metric
# history.csv's columns summed into each epoch's test loss: the negative test ELBO, unweighted, so
# that runs of any --beta or KL warm-up compare.
PRUNING_TERMS = ("val_reconstruction_loss", "val_kl_loss")
# A run's time per epoch is the median of its epochs after the first (which traces the step): the
# time budget is judged once TIMED_EPOCHS of them are done, the baseline timed on BASELINE_EPOCHS.
TIMED_EPOCHS, BASELINE_EPOCHS = 2, 4
RESERVED_FLAGS = ("--seed", "--results-dir",  # set by the sweep for each trial
                  *(f"--{name.replace('_', '-')}" for name in fid.INVOCATION_OPTIONS))
# This machine's files: each worker gives its own, outside the study's definition.
LOCAL_FLAGS = tuple(f"--{name.replace('_', '-')}" for name in fid.MACHINE_OPTIONS)
SQLITE_TIMEOUT = 60  # seconds a worker waits for another's write to the default storage
POLL_SECONDS = 0.2  # how often a worker reads its run's history.csv
# results/tuning.csv's columns, one run per row (a file may lack those from active_units on).
# pruned: "time" (over the budget) or "loss" (the pruner).
CSV_COLUMNS = ("script", "flags", "seed", "epochs", "fid_pixel_recon", "fid_pixel_samples",
               "fid_classifier_samples", "fid_classifier_recon", "test_log_likelihood_iw",
               "test_elbo", "iw_samples", "train_seconds", "seconds", "active_units", "latent_dim",
               "cpu", "epoch_seconds", "time_ratio", "pruned")
# The metrics the report shows beside the objective (whose range over seeds it shows too).
REPORTED = ("fid_pixel_recon", "fid_classifier_samples", "test_elbo", "test_log_likelihood_iw")
IMPORTANCE_MIN_TRIALS = 10  # fewer complete trials say little about which parameters matter
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
# Optuna calls heartbeats and their retries experimental (since 2.8): they are what sweeps rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own lines
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()  # queues a failed trial's copy
Epoch = collections.namedtuple("Epoch", "number loss seconds")  # loss: PRUNING_TERMS' sum


class NothingQueued(Exception):
    """Another worker took the grid's last queued trial between this worker's look at the queue
    and its pick, and Optuna made this one a new trial: it runs nothing."""


def direction(metric):
    return "maximize" if fid.RUN_METRICS[metric].higher_is_better else "minimize"


def choice(text):
    """A value as the script's option would take it: an int, a float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def space_entry(text):
    """NAME=a,b,c (choices) or NAME=LOW:HIGH[:log] (a range, of ints if both ends are ints)."""
    name, _, values = text.partition("=")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=a,b,c or NAME=LOW:HIGH[:log]")
    if ":" not in values:
        return {"name": name, "choices": list(dict.fromkeys(map(choice, values.split(","))))}
    low, high, *log = map(choice, values.split(":"))
    if log not in ([], ["log"]) or not all(isinstance(end, (int, float)) and math.isfinite(end)
                                           for end in (low, high)) or not 0 < high - low or (
                                               log and low <= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: needs numbers LOW < HIGH (LOW > 0 for log)")
    return {"name": name, "low": low, "high": high, "log": bool(log)}


def seed_list(text):
    return list(dict.fromkeys(int(seed) for seed in text.split(",")))  # each seed once


def split_local(script_args):
    """The script's arguments that define the runs, and LOCAL_FLAGS with their values."""
    defining, local = [], []
    words = iter(script_args)
    for word in words:
        if word in LOCAL_FLAGS:
            local += [word, next(words, "")]
        else:
            (local if word.split("=")[0] in LOCAL_FLAGS else defining).append(word)
    return defining, local


def parse_args(argv=None):
    """The sweep's options, and the script's own arguments (everything after `--`)."""
    parser = fid.OneLineErrorParser(
        prog="sweep.py", description=__doc__.splitlines()[0],
        usage="%(prog)s --study NAME [--script SCRIPT --space NAME=VALUES ...] [options] "
              "[-- SCRIPT ARGS]", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--study", required=True, help="the study's name in the storage")
    add("--script", help="the script each trial runs (vae.py, conv_vae.py); its options after --")
    add("--space", type=space_entry, action="append", default=[],
        help="a searched option of the script: NAME=a,b,c or NAME=LOW:HIGH[:log] (repeatable)")
    add("--seeds", type=seed_list, default=[0], help="each configuration runs with every seed")
    add("--trials", type=fid.positive_int, default=20, help="configurations a range samples")
    add("--objective", choices=tuple(fid.RUN_METRICS), default=DEFAULT_OBJECTIVE, metavar="METRIC",
        help="the metrics.json entry to optimize (its direction is known: FIDs down, ELBO up)")
    add("--storage", help="an SQLAlchemy URL all workers share (postgresql://user:password@host/db"
                          " for many machines); none: SQLite in --sweeps-dir")
    add("--sweeps-dir", default="results/sweeps", help="the runs' folders (STUDY/trial-N)")
    add("--heartbeat", type=fid.whole_number("heartbeat_seconds", 2, "2 or more"), default=60,
        help="seconds without a worker's heartbeat before its trial is queued again, to resume")
    add("--pruner", choices=("median", "hyperband", "none"), default="median",
        help="stop runs whose test loss trails the median at that epoch, or Hyperband's rungs")
    add("--max-time-ratio", type=fid.positive_float, metavar="R",
        help="prune trials whose epochs take over R times the baseline's, which each worker "
             f"times on {BASELINE_EPOCHS} epochs")
    add("--baseline", metavar="FLAGS", help="the baseline's flags as one argument; none: the "
                                            "flags after --")
    add("--baseline-every", type=fid.non_negative_int, default=10, metavar="MINUTES",
        help="time the baseline again before a trial once its timing is this old")
    add("--figure", metavar="PNG", help="with --report: draw the study's history and importances")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--report", action="store_true",
                       help="print the study's table, importances and best command per script")
    modes.add_argument("--import-csv", metavar="CSV", help="add a results/tuning.csv-like file's "
                                                           "runs (with the study's --space)")
    modes.add_argument("--export-csv", metavar="CSV", help="write the study's complete and pruned "
                                                           "trials, keeping other runs' rows")
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:end])
    args.script_args, args.local_args = split_local(argv[end + 1:])
    args.url = args.storage or f"sqlite:///{Path(args.sweeps_dir) / 'optuna.db'}"
    if args.figure and not args.report:
        parser.error("--figure draws a study's history with --report")
    if args.report or args.import_csv or args.export_csv:
        return args
    if args.baseline is not None and not args.max_time_ratio:
        parser.error("--baseline is the reference of --max-time-ratio: give both")
    if not args.script or not Path(args.script).is_file():
        parser.error(f"--script {args.script}: no such file (a sweep runs one)")
    flags = [word.split("=")[0] for word in args.script_args if word.startswith("--")] + [
        f"--{entry['name']}" for entry in args.space]
    taken = [f for f in flags if flags.count(f) > 1 or f in RESERVED_FLAGS + LOCAL_FLAGS]
    if taken:
        parser.error(f"{taken[0]}: set by the sweep (--seeds, --sweeps-dir), or given twice (in "
                     "--space and after --)")
    return args


def shown(url):
    return sqlalchemy.make_url(url).render_as_string(hide_password=True)  # for messages


def open_storage(args):
    """Optuna's RDBStorage, which records heartbeats (JournalStorage does not). Workers that start
    together race to create its tables: the losers try again. SQLite waits SQLITE_TIMEOUT for
    another worker's write, in write-ahead-log mode; each of its transactions takes the write lock
    as it begins, so that two workers cannot both read a queued trial as waiting and both claim it
    (SQLite has no SELECT ... FOR UPDATE, and Python's sqlite3 begins a transaction at its first
    write)."""
    sqlite = {} if args.storage else {"connect_args": {"timeout": SQLITE_TIMEOUT,
                                                       "isolation_level": None}}
    if sqlite:
        Path(args.sweeps_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                args.url, engine_kwargs=sqlite, heartbeat_interval=max(1, args.heartbeat // 4),
                grace_period=args.heartbeat, heartbeat_stale_trial_callback=RETRY)
            break
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            if attempt == 4 or not (isinstance(e, sqlalchemy.exc.IntegrityError)
                                    or "already exists" in str(e)):
                raise UsageError(f"cannot open --storage {shown(args.url)}: "
                                 f"{str(e).splitlines()[0]}") from None
            time.sleep(1)
    if sqlite:
        with storage.engine.connect() as connection:  # the file keeps the mode
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        sqlalchemy.event.listen(storage.engine, "begin",
                                lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def is_grid(space):
    return all("choices" in entry for entry in space)


def grid(space, seeds):
    """Every configuration with every seed, seed by seed: an early stop covers each one."""
    return [{**dict(zip([entry["name"] for entry in space], values)), "seed": seed}
            for seed in seeds for values in itertools.product(*(e["choices"] for e in space))]


def open_study(args, storage):
    """Create the study and queue its grid, or join it once its creator has: creating is atomic,
    so one worker queues the grid, and its definition, written last, says the queue is complete.
    Every worker must agree on the definition (later options are in it only where given, so older
    studies still match). TPE, Optuna's default sampler, learns from the time constraints."""
    sweep = {"script": args.script, "space": args.space, "seeds": args.seeds,
             "args": args.script_args, "objective": args.objective}
    if args.pruner != "median":
        sweep["pruner"] = args.pruner
    if args.max_time_ratio:
        sweep["max_time_ratio"] = args.max_time_ratio
        sweep["baseline"] = (split_local(shlex.split(args.baseline))[0]
                             if args.baseline is not None else args.script_args)
    first = 1 + TIMED_EPOCHS if args.max_time_ratio else 1  # the loss once the time is judged
    pruner = {"median": optuna.pruners.MedianPruner(n_warmup_steps=first),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=first),
              "none": optuna.pruners.NopPruner()}[args.pruner]
    try:
        study = optuna.create_study(storage=storage, study_name=args.study, pruner=pruner,
                                    direction=direction(args.objective))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=args.study, storage=storage, pruner=pruner)
        deadline = time.monotonic() + args.heartbeat
        while "sweep" not in study.user_attrs:
            if time.monotonic() > deadline:
                raise UsageError(f"study {args.study} has no sweep definition: not made by "
                                 "sweep.py, or its first worker died queueing; choose another "
                                 "--study") from None
            time.sleep(POLL_SECONDS)
        if study.user_attrs["sweep"] != json.loads(json.dumps(sweep)):
            raise UsageError(f"study {args.study} was started as {study.user_attrs['sweep']}, "
                             "not as this command: choose another --study") from None
        return study
    if is_grid(args.space):
        for params in grid(args.space, args.seeds):
            study.enqueue_trial(params, user_attrs={"queued_as": "grid point"})
    study.set_user_attr("sweep", sweep)
    return study


def space_distributions(space):
    return {entry["name"]: CategoricalDistribution(entry["choices"]) if "choices" in entry else (
        IntDistribution if all(isinstance(entry[end], int) for end in ("low", "high"))
        else FloatDistribution)(entry["low"], entry["high"], log=entry["log"]) for entry in space}


def read_history(results_dir):
    if not (results_dir / "history.csv").is_file():
        return []
    with open(results_dir / "history.csv", newline="") as f:
        return [Epoch(int(row["epoch"]), sum(float(row[term]) for term in PRUNING_TERMS),
                      float(row["seconds"])) for row in csv.DictReader(f)]


def seconds_per_epoch(seconds):
    return statistics.median(seconds[1:] or seconds)  # the first epoch traces the training step


def last_line(results_dir):
    lines = (results_dir / "train.log").read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def run_script(command, results_dir, on_epoch):
    """The script in its own process group (a Ctrl-C reaches the worker alone, which passes it
    on), its output in train.log. After each new epoch of history.csv, on_epoch(history so far)
    may return why to stop the run with SIGINT. Returns (exit code, that reason or None)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()

    def prepare():
        """SIGINT is the run's clean stop even where the worker ignores it (a background job); on
        Linux SIGKILL comes when the worker dies, so no orphan trains on beside its retry."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if LIBC:
            LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the worker died before prctl took effect
                os._exit(1)

    with open(results_dir / "train.log", "a") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, process_group=0, preexec_fn=prepare)
    seen = 0
    try:
        while True:
            code = process.poll()
            history = read_history(results_dir)
            for count in range(seen + 1, len(history) + 1):
                reason = on_epoch(history[:count])
                if reason and code is None:
                    process.send_signal(signal.SIGINT)
                    return process.wait(), reason
            seen = len(history)
            if code is not None:
                return code, None
            time.sleep(POLL_SECONDS)
    finally:
        if process.poll() is None:  # an interrupt: let the run checkpoint, as Ctrl-C would
            process.send_signal(signal.SIGINT)
            process.wait()


def time_baseline(args, sweep):
    """The baseline's seconds per epoch on this machine, from a run of BASELINE_EPOCHS epochs."""
    results_dir = Path(args.sweeps_dir, args.study, f"baseline-{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(results_dir, ignore_errors=True)
    command = [sys.executable, sweep["script"], *sweep["baseline"], *args.local_args,
               "--seed", str(sweep["seeds"][0]), "--results-dir", str(results_dir)]
    print(f"[sweep] timing the baseline for {BASELINE_EPOCHS} epochs: {shlex.join(command)}",
          flush=True)
    code, _ = run_script(command, results_dir, lambda history: len(history) >= BASELINE_EPOCHS)
    history = read_history(results_dir)
    if len(history) < 2:
        raise UsageError(f"the baseline ({shlex.join(sweep['baseline'])}) ran {len(history)} "
                         f"epoch(s), exit code {code}: {last_line(results_dir)}")
    shutil.rmtree(results_dir)
    seconds = seconds_per_epoch([epoch.seconds for epoch in history])
    print(f"[sweep] baseline: {seconds:.3g} s per epoch; a trial over "
          f"{sweep['max_time_ratio'] * seconds:.3g} s ({sweep['max_time_ratio']:g}x) is pruned",
          flush=True)
    return seconds


def time_ratio(trial, seconds, earlier, baseline):
    """Records the run's seconds per epoch and, with a timed baseline, returns their ratio to the
    baseline's: those of this sitting (a resumed run's earlier epochs ran beside another baseline,
    maybe on another machine), or with too few of them the earlier sitting's ratio."""
    trial.set_user_attr("epoch_seconds", round(seconds_per_epoch(seconds), 4))
    if "seconds" not in baseline:
        return None
    if len(seconds) - earlier <= TIMED_EPOCHS and "time_ratio" in trial.user_attrs:
        return trial.user_attrs["time_ratio"]
    ratio = seconds_per_epoch(seconds[earlier:] or seconds) / baseline["seconds"]
    trial.set_user_attr("time_ratio", round(ratio, 4))
    return ratio


def run_trial(trial, args, sweep, baseline):
    """One trial: its configuration through the script, each epoch's test loss reported. With a
    time budget, its time per epoch against the baseline's (this worker's last timing: {"seconds",
    "timed"}), timed again once --baseline-every minutes old, as a shared machine's speed drifts."""
    queued_as, budget = trial.user_attrs.get("queued_as"), sweep.get("max_time_ratio")
    if queued_as is None and is_grid(sweep["space"]):
        raise NothingQueued()
    params = {}
    for name, sampled in space_distributions(sweep["space"]).items():
        if isinstance(sampled, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, sampled.choices)
        else:
            suggest = trial.suggest_int if isinstance(sampled, IntDistribution) else \
                trial.suggest_float
            params[name] = suggest(name, sampled.low, sampled.high, log=sampled.log)
    seed = trial.suggest_categorical("seed", sweep["seeds"])
    retry = "results_dir" in trial.user_attrs  # a copy of a dead or interrupted worker's trial
    if not retry and queued_as in (None, "new configuration"):
        trial.set_user_attr("queued_as", "new configuration")
        for other in sweep["seeds"]:
            if other != seed:
                trial.study.enqueue_trial({**params, "seed": other},
                                          user_attrs={"queued_as": "other seed"})
    flags = [*sweep["args"], *(word for name, value in params.items() for word in (
        f"--{name}", f"{value:.4g}" if isinstance(value, float) else str(value)))]
    results_dir = Path(trial.user_attrs.get("results_dir")
                       or Path(args.sweeps_dir, args.study, f"trial-{trial.number}"))
    for key, value in dict(script=sweep["script"], flags=" ".join(flags), seed=seed,
                           results_dir=str(results_dir), local_flags=shlex.join(args.local_args),
                           worker=f"{os.uname().nodename}:{os.getpid()}").items():
        trial.set_user_attr(key, value)
    command = [sys.executable, sweep["script"], *flags, *args.local_args,
               "--seed", str(seed), "--results-dir", str(results_dir)]
    resumed = retry and (results_dir / "checkpoint.json").is_file()
    print(f"[sweep] trial {trial.number}: {shlex.join(command)}"
          + (" (resuming its checkpoint)" if resumed else ""), flush=True)
    start = time.perf_counter()
    earlier = len(read_history(results_dir)) if resumed else 0  # epochs of an earlier sitting

    def on_epoch(history):
        epoch = history[-1]
        trial.report(epoch.loss, epoch.number)
        print(f"[sweep] trial {trial.number} epoch {epoch.number}: test loss {epoch.loss:.4g}",
              flush=True)
        if budget and len(history) == earlier + 1 + TIMED_EPOCHS and time_ratio(
                trial, [e.seconds for e in history], earlier, baseline) > budget:
            return "time", epoch.number
        return ("loss", epoch.number) if trial.should_prune() else None

    pruned = None
    if not (retry and (results_dir / "metrics.json").is_file()):  # else its run had finished
        try:
            if budget and time.monotonic() - baseline["timed"] > 60 * args.baseline_every:
                baseline.update(seconds=time_baseline(args, sweep), timed=time.monotonic())
            code, pruned = run_script(command + ["--resume"] * resumed, results_dir, on_epoch)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run checkpointed; queue it again
            RETRY(trial.study, trial.study.get_trials(deepcopy=False)[trial.number])
            raise KeyboardInterrupt(f"trial {trial.number} is queued again; the worker that takes "
                                    f"it resumes its run ({results_dir}) from its checkpoint")
        if pruned:
            trial.set_user_attr("pruned", pruned[0])
            trial.set_user_attr("epochs", pruned[1])
        elif code == fid.EXIT_USAGE:
            raise UsageError(f"{' '.join(command[1:])}: {last_line(results_dir)}")
        elif code:
            trial.set_user_attr("failure", f"exit code {code}: {last_line(results_dir)}")
            raise RunFailed(trial.user_attrs["failure"])
    if not pruned:
        metrics = json.loads((results_dir / "metrics.json").read_text())
        if not isinstance(metrics.get(sweep["objective"]), (int, float)):
            raise UsageError(f"{results_dir}/metrics.json has no {sweep['objective']}: give the "
                             "script options that compute the --objective")
        seconds = metrics.get("seconds_per_epoch") or []
        attrs = {key: value for key, value in metrics.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)}
        attrs.update(train_seconds=round(sum(seconds)), latent_dim=metrics["config"]["latent_dim"],
                     cpu=metrics.get("machine", {}).get("isa"))  # float32 results differ by CPU
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if seconds:
            time_ratio(trial, seconds, earlier, baseline)
    trial.set_user_attr("seconds", round(time.perf_counter() - start))
    if "time_ratio" in trial.user_attrs:  # what TPE learns from
        trial.set_constraint("time", trial.user_attrs["time_ratio"] - budget)
    if pruned:
        raise optuna.TrialPruned()
    return metrics[sweep["objective"]]


def work(args, study):
    """Take queued trials (for a range, sample new configurations) until the study has none left;
    while other workers' trials run, wait, since a dead worker's trial comes back."""
    sweep, baseline, waited = study.user_attrs["sweep"], {"timed": -math.inf}, False
    while True:
        trials = study.get_trials(deepcopy=False)
        states = [trial.state for trial in trials]
        if TrialState.WAITING in states:
            waited = False
        elif not is_grid(sweep["space"]) and args.trials > sum(
                trial.user_attrs.get("queued_as") == "new configuration"
                and "failed_trial" not in trial.system_attrs for trial in trials):
            study.enqueue_trial({"seed": sweep["seeds"][0]},
                                user_attrs={"queued_as": "new configuration"})
        elif TrialState.RUNNING not in states:
            return
        else:
            if not waited:
                print(f"[sweep] waiting for {states.count(TrialState.RUNNING)} trial(s) of other "
                      f"workers (a dead worker's is queued again after {args.heartbeat} s)",
                      flush=True)
            waited = True
            time.sleep(max(1, args.heartbeat // 4))
            optuna.storages.fail_stale_trials(study)
            continue
        try:
            study.optimize(lambda trial: run_trial(trial, args, sweep, baseline), n_trials=1,
                           catch=(RunFailed, NothingQueued), callbacks=[print_outcome])
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
            if isinstance(e, ValueError) and not str(e).startswith("Cannot tell a FAIL trial"):
                raise
            print(f"[sweep] another worker failed this worker's trial, its heartbeat {args.heartbeat}"
                  " s late (an overloaded machine? raise --heartbeat); the copy it queued takes "
                  "over the run", flush=True)


def print_outcome(study, trial):
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        outcome = f"complete: {study.user_attrs['sweep']['objective']} {trial.value:.4g}"
    elif trial.state == TrialState.PRUNED:
        outcome = (f"pruned: {attrs['time_ratio']:.2f}x the baseline's time per epoch"
                   if attrs["pruned"] == "time" else "pruned by its test loss")
    else:
        outcome = f"failed: {attrs.get('failure', 'another worker took the last queued trial')}"
    print(f"[sweep] trial {trial.number} {outcome} ({attrs.get('results_dir', 'nothing ran')})",
          flush=True)


def number(value, digits=2):
    """A table's number, with a true minus sign; a dash when missing."""
    return "—" if value is None else f"{value:.{digits}f}".replace("-", "\N{MINUS SIGN}")


def ended(study, pruned=False):
    return study.get_trials(deepcopy=False,
                            states=(TrialState.COMPLETE,) + (TrialState.PRUNED,) * pruned)


def configurations(study):
    """The complete trials grouped by script and flags, in the order they were first run."""
    groups = {}
    for trial in ended(study):
        groups.setdefault((trial.user_attrs["script"], trial.user_attrs["flags"]), []).append(trial)
    return groups


def median(trials, key):
    values = [trial.user_attrs[key] for trial in trials if trial.user_attrs.get(key) is not None]
    return statistics.median(values) if values else None


def value_range(values, digits):
    """" (lowest to highest)" of several runs' values, nothing for one."""
    return (f" ({number(min(values), digits)} to {number(max(values), digits)})"
            if len(values) > 1 else "")


def dimensions_used(runs):
    """"k of n": the runs whose active units are all their latent dimensions (posterior collapse
    leaves one unused), of those that measured them."""
    known = [run for run in runs if run.get("active_units") is not None]
    if not known:
        return "—"
    return f"{sum(run['active_units'] == run['latent_dim'] for run in known)} of {len(known)}"


def best_first(study):
    sign = 1 if direction(study.user_attrs["sweep"]["objective"]) == "minimize" else -1
    return sorted(configurations(study).items(),
                  key=lambda group: sign * statistics.median(trial.value for trial in group[1]))


def report_table(study):
    """The markdown table of a study: one row per configuration, best median first."""
    objective = study.user_attrs["sweep"]["objective"]
    others = [metric for metric in REPORTED if metric != objective]
    header = ["script", "flags", "epochs", "seeds",
              f"{fid.RUN_METRICS[objective].label}: median (range)",
              *(fid.RUN_METRICS[metric].label for metric in others), "every latent dimension used",
              "CPU", "s per epoch (× baseline)", "training (s)", "run (s)"]
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for (script, flags), trials in best_first(study):
        values = [trial.value for trial in trials]
        digits = fid.RUN_METRICS[objective].table_digits
        cells = [script, f"`{flags}`" if flags else "(defaults)", trials[0].user_attrs["epochs"],
                 ",".join(str(seed) for seed in sorted(t.user_attrs["seed"] for t in trials)),
                 number(statistics.median(values), digits) + value_range(values, digits)]
        for metric in others:
            cells.append(number(median(trials, metric), fid.RUN_METRICS[metric].table_digits))
            if metric == "test_log_likelihood_iw" and median(trials, metric) is not None:
                cells[-1] += f" (K={trials[0].user_attrs['iw_samples']})"
        ratio = median(trials, "time_ratio")
        cells += [dimensions_used([trial.user_attrs for trial in trials]),
                  "/".join(sorted({str(trial.user_attrs.get("cpu") or "—") for trial in trials})),
                  number(median(trials, "epoch_seconds"))
                  + (f" ({number(ratio)}×)" if ratio is not None else ""),
                  number(median(trials, "train_seconds"), 0), number(median(trials, "seconds"), 0)]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def over_time_budget(study, ratio):
    return (ratio or 0) > study.user_attrs["sweep"].get("max_time_ratio", math.inf)


def state_counts(study):
    trials = study.get_trials(deepcopy=False)
    counts = collections.Counter(trial.state.name.lower() for trial in trials)
    over_time = sum(trial.state == TrialState.PRUNED and trial.user_attrs.get("pruned") == "time"
                    for trial in trials)
    return ", ".join(f"{count} {state}" + (f" ({over_time} over the time budget)"
                                           if state == "pruned" and over_time else "")
                     for state, count in counts.items()) or "no trials"


def importances(study):
    """Each parameter's share in a good objective (PED-ANOVA: no scikit-learn needed), among those
    the complete trials vary (the seed aside); {} with too few trials to say."""
    complete = ended(study)
    values = collections.defaultdict(set)
    for trial in complete:
        for name, value in trial.params.items():
            values[name].add(value)
    names = [name for name, seen in values.items() if name != "seed" and len(seen) > 1]
    if len(complete) < IMPORTANCE_MIN_TRIALS or not names:
        return {}
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=names)


def print_report(study, args):
    """The table, importances, best command per script within the time budget, and figure."""
    hours = sum(trial.user_attrs.get("seconds") or 0 for trial in ended(study, pruned=True)) / 3600
    print(f"study {args.study} ({state_counts(study)}; its trials ran {hours:.2f} h in all):\n")
    print(report_table(study) + "\n")
    shares = importances(study)
    if shares:
        print("parameter importances (PED-ANOVA): "
              + ", ".join(f"{name} {share:.2f}" for name, share in shares.items()))
    objective, best = study.user_attrs["sweep"]["objective"], set()
    for (script, flags), trials in best_first(study):
        if script not in best and not over_time_budget(study, median(trials, "time_ratio")):
            best.add(script)
            local = args.local_args or shlex.split(trials[0].user_attrs.get("local_flags") or "")
            command = shlex.join([sys.executable, script, *shlex.split(flags), *local])
            print(f"best {script}: `{command}`{'' if local else ' (offline: add --data PATH)'} "
                  f"({objective}: median "
                  f"{statistics.median(trial.value for trial in trials):.4g} over seeds "
                  f"{','.join(str(trial.user_attrs['seed']) for trial in trials)})")
    if args.figure:
        trials = study.get_trials(deepcopy=False)
        complete = [trial.state == TrialState.COMPLETE for trial in trials]
        plot_utils.study_history(
            [trial.value if done else math.nan for trial, done in zip(trials, complete)],
            [trial.user_attrs.get("pruned") for trial in trials], fid.RUN_METRICS[objective].label,
            lower_is_better=direction(objective) == "minimize", importances=shares,
            title=args.study, over_budget=[done and over_time_budget(study, trial.user_attrs.get(
                "time_ratio")) for trial, done in zip(trials, complete)]).savefig(args.figure)
        print(f"figure: {args.figure}")


def distribution(values):
    """A parameter's range as its runs' values show it: numbers span [min, max] (on a log scale
    where they are positive and span 10x or more), anything else is a choice."""
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        low, high = min(values), max(values)
        if all(isinstance(value, int) for value in values):
            return IntDistribution(low, high)
        return FloatDistribution(low, high, log=low > 0 and high >= 10 * low)
    return CategoricalDistribution(sorted(set(values), key=lambda value: (str(type(value)), value)))


def read_csv(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None


def run_key(attrs):
    return attrs.get("script"), attrs.get("flags"), attrs.get("seed")


def import_csv(study, path, objective=DEFAULT_OBJECTIVE, space=(), max_time_ratio=None):
    """The CSV's runs the study lacks as trials: flags (`--name value --switch`) and seed their
    parameters, columns their user attributes. A parameter's range is the study's --space where
    given (importances depend on it), else what the rows span. Returns how many were added."""
    rows = read_csv(path)
    objective = study.user_attrs.get("sweep", {}).get("objective", objective)
    runs = []
    for row in rows:
        words = (row.get("flags") or "").split() + ["--"]
        try:
            runs.append({**{word[2:]: True if value.startswith("--") else choice(value)
                            for word, value in zip(words, words[1:]) if word.startswith("--")},
                         "seed": int(row["seed"])})
        except (KeyError, ValueError, TypeError):
            raise UsageError(f"{path}: a row without the script, flags and seed of a run "
                             f"({', '.join(CSV_COLUMNS[:3])})") from None
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", {"objective": objective, "imported": Path(path).name,
                                      **({"max_time_ratio": max_time_ratio} if max_time_ratio
                                         else {})})
    held = {run_key(trial.user_attrs) for trial in study.get_trials(deepcopy=False)}
    names = {name for run in runs for name in run}
    distributions = {name: distribution([run[name] for run in runs if name in run])
                     for name in names} | space_distributions(space)
    if set(distributions) - names:
        raise UsageError(f"--space {min(set(distributions) - names)}: no run of {path} sets it")
    trials = []
    for row, run in zip(rows, runs):
        attrs = {key: (row[key] if key in ("script", "flags") else choice(row[key])
                       if row.get(key) else None) for key in CSV_COLUMNS}
        if run_key(attrs) in held or (attrs.get(objective) is None and not attrs["pruned"]):
            continue
        try:
            trials.append(optuna.trial.create_trial(
                state=TrialState.PRUNED if attrs["pruned"] else TrialState.COMPLETE,
                value=None if attrs["pruned"] else attrs[objective], params=run,
                distributions={name: distributions[name] for name in run}, user_attrs=attrs))
        except ValueError:
            raise UsageError(f"{path}: the run `{row['flags']}` lies outside --space") from None
    study.add_trials(trials)  # all or none
    return len(trials)


def export_csv(study, path):
    """The complete and pruned trials into the CSV, replacing its rows of the same runs in place
    and keeping the others."""
    runs = {run_key(trial.user_attrs): trial.user_attrs for trial in ended(study, pruned=True)}
    rows = [{**row, "seed": int(row["seed"])} for row in read_csv(path)] if Path(path).is_file() \
        else []
    rows = [runs.pop(run_key(row), row) for row in rows] + list(runs.values())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows([round(value, 3) if isinstance(value, float) else "" if value is None
                          else value for value in map(row.get, CSV_COLUMNS)] for row in rows)


def study_from_csv(path):
    """An in-memory study of a CSV's runs: what `--import-csv` then `--report` print."""
    study = optuna.create_study(direction=direction(DEFAULT_OBJECTIVE))
    import_csv(study, path)
    return study


def run(args):
    storage = open_storage(args)
    if args.import_csv:
        study = optuna.create_study(storage=storage, study_name=args.study, load_if_exists=True,
                                    direction=direction(args.objective))
        added = import_csv(study, args.import_csv, args.objective, args.space,
                           args.max_time_ratio)
        print(f"study {args.study}: {added} run(s) of {args.import_csv} added "
              f"({state_counts(study)})")
    elif args.report or args.export_csv:
        try:
            study = optuna.load_study(study_name=args.study, storage=storage)
            if "sweep" not in study.user_attrs:
                raise KeyError(args.study)
        except KeyError:
            raise UsageError(f"no study {args.study} of sweep.py in {shown(args.url)}") from None
        if args.report:
            print_report(study, args)
        else:
            export_csv(study, args.export_csv)
            print(f"study {args.study}: its complete and pruned trials written to "
                  f"{args.export_csv} ({state_counts(study)})")
    else:
        study = open_study(args, storage)
        print(f"[sweep] study {args.study} in {shown(args.url)}: {state_counts(study)}",
              flush=True)
        work(args, study)
        where = (["--storage", shown(args.storage)] if args.storage else
                 ["--sweeps-dir", args.sweeps_dir] if args.sweeps_dir != "results/sweeps" else [])
        print(f"[sweep] study {args.study} done ({state_counts(study)}); its table: "
              + shlex.join([sys.executable, "sweep.py", "--study", args.study, "--report", *where]))


def main(argv=None):
    """Every failure is one line and an exit code: 2 for bad input, 130 for an interrupt."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill requeues too
    def work():
        try:
            run(args)
        except OSError as e:  # a file of the sweep's own: the CSV or figure written
            raise UsageError(f"{e.filename}: {e.strerror}") from None
    return fid.exit_code("sweep.py", work, interrupted="no trial was running")


if __name__ == "__main__":
    sys.exit(main())
