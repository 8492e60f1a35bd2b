"""Hyper-parameter sweeps of vae.py or conv_vae.py on Optuna, by workers on one or many machines.

One command per worker, as many workers as cores or machines, all sharing one study:

    python sweep.py --script vae.py --study dense-z2 --space hidden-dim=256,512,1024 \\
        --space hidden-layers=1,2,3 --seeds 0,1,2 -- --latent-dim 2 --epochs 30
    python sweep.py --study dense-z2 --report

A trial is one configuration (a value for each --space) with one seed, run as a user would run it,
in its own process: `python SCRIPT ARGS FLAGS --seed S --results-dir SWEEPS_DIR/STUDY/trial-N`.
Its value is the run's --objective in metrics.json; the other metrics become the trial's user
attributes. Every epoch's test loss (the negative test ELBO, from history.csv) goes to Optuna's
pruner (median, or Hyperband's multi-fidelity rungs), which stops a hopeless run with SIGINT (the
script checkpoints and exits 130).

With --max-time-ratio R, each worker first times a baseline configuration (the flags after -- alone,
or --baseline) for a few epochs on its machine; a trial whose epochs take longer than R times the
baseline's is pruned as over the time budget, and TPE learns to avoid such configurations (Optuna's
constraints). The report gives each configuration's time per epoch, its ratio to the baseline,
what was pruned and why, the trials' total run time, and the parameters' importances; --figure
draws the study's history.

When every --space is a list, the study's first worker queues the whole grid times the seeds and
each worker takes the next queued trial, so no point runs twice. With a range (LOW:HIGH[:log]),
Optuna's TPE sampler draws --trials configurations, and each is queued again for the other seeds.

Workers share the study through --storage: by default a SQLite file in SWEEPS_DIR (one machine,
any number of workers), or a PostgreSQL URL that workers on every machine run the same command
against. Each worker records a heartbeat while it runs a trial: the trial of a killed worker is
failed after --heartbeat seconds and queued again, and the worker that takes it resumes the run
from its last checkpoint (--resume) when the run's folder is on its file system. Its training
process dies with it (Linux), so nothing is left running.
"""

import argparse
import csv
import ctypes
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import typing
import warnings
from pathlib import Path

import optuna
import sqlalchemy

import fid
import plot_utils
from fid import RunFailed, UsageError

DEFAULT_OBJECTIVE = "fid_pixel_recon"  # the original repository's metric
# The columns of history.csv summed into each epoch's reported test loss: the negative test ELBO,
# unweighted, so that runs of any --beta or KL warm-up compare.
PRUNING_TERMS = ("val_reconstruction_loss", "val_kl_loss")
PRUNERS = ("median", "hyperband", "none")
PRUNER_STARTUP_TRIALS = 5  # no median pruning until this many trials completed (Optuna's default)
# A run's time per epoch is the median of its epochs after the first (which traces the step): the
# time budget is judged once TIMED_EPOCHS of them are done, the baseline timed on BASELINE_EPOCHS.
TIMED_EPOCHS = 2
BASELINE_EPOCHS = 4
# Set by the sweep itself: a trial's seed, folder and resumption.
RESERVED_FLAGS = ("--seed", "--results-dir", "--resume", "--overwrite", "--evaluate-only")
# Files on the worker's own machine: each worker gives its own, outside the study's definition.
LOCAL_FLAGS = ("--data", "--inception-weights")
SQLITE_TIMEOUT = 60  # seconds a worker waits for another's write to the default storage
STORAGE_ATTEMPTS = 5  # workers that start together race to create the storage's tables
POLL_SECONDS = 0.2  # how often a worker reads its run's history.csv
# The columns of results/tuning.csv: one run per row.
CSV_METRICS = ("fid_pixel_recon", "fid_pixel_samples", "fid_classifier_samples",
               "fid_classifier_recon", "test_log_likelihood_iw", "test_elbo")
# Later additions: a file may lack them. pruned: "time" (over the budget) or "loss" (the pruner).
RUN_COLUMNS = ("active_units", "latent_dim", "cpu", "epoch_seconds", "time_ratio", "pruned")
CSV_COLUMNS = ("script", "flags", "seed", "epochs", *CSV_METRICS, "iw_samples", "train_seconds",
               "seconds", *RUN_COLUMNS)
# The metrics the report shows beside the objective (whose range over seeds it shows too).
REPORTED = ("fid_pixel_recon", "fid_classifier_samples", "test_elbo", "test_log_likelihood_iw")
IMPORTANCE_MIN_TRIALS = 10  # fewer complete trials say little about which parameters matter
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# Optuna calls heartbeats and their retries experimental (since 2.8): they are what sweeps rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own lines
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()  # queue a dead worker's trial again


class NothingQueued(Exception):
    """Another worker took the grid's last queued trial between this worker's look and its pick
    (with a storage that QueueLock cannot lock)."""


def direction(metric):
    return "maximize" if fid.RUN_METRICS[metric].higher_is_better else "minimize"


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def choice(text):
    """A --space value as the script's option would take it: an int, a float, else the text."""
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
        choices = [choice(value) for value in values.split(",")]
        if len(set(choices)) < len(choices) or "" in choices:
            raise argparse.ArgumentTypeError(f"{text!r}: empty or repeated choices")
        return {"name": name, "choices": choices}
    low, high, *log = values.split(":")
    if log not in ([], ["log"]):
        raise argparse.ArgumentTypeError(f"{text!r}: a range is LOW:HIGH or LOW:HIGH:log")
    low, high = choice(low), choice(high)
    if not all(isinstance(end, (int, float)) and math.isfinite(end) for end in (low, high)):
        raise argparse.ArgumentTypeError(f"{text!r}: a range's ends are numbers")
    if not low < high or (log and low <= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: needs LOW < HIGH (and LOW > 0 for log)")
    return {"name": name, "low": low, "high": high, "log": bool(log)}


def seed_list(text):
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"repeated seeds in {text!r}")
    return seeds


heartbeat_seconds = fid.whole_number("heartbeat_seconds", 2, "2 or more")


def split_local(script_args):
    """The script's arguments that define the runs, and those naming this machine's files
    (LOCAL_FLAGS with their values, as `--data PATH` or `--data=PATH`)."""
    defining, local = [], []
    words = iter(script_args)
    for word in words:
        if word in LOCAL_FLAGS:
            local += [word, next(words, "")]
        elif word.split("=")[0] in LOCAL_FLAGS:
            local.append(word)
        else:
            defining.append(word)
    return defining, local


def build_parser():
    parser = fid.OneLineErrorParser(
        prog="sweep.py", description=__doc__.splitlines()[0],
        usage="%(prog)s --study NAME [--script SCRIPT --space NAME=VALUES ...] [options] "
              "[-- SCRIPT ARGS]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--study", required=True, help="the study's name in the storage")
    parser.add_argument("--script", help="the training script each trial runs (vae.py, "
                                         "conv_vae.py); its own options go after --")
    parser.add_argument("--space", type=space_entry, action="append", default=[],
                        help="a searched option of the script: NAME=a,b,c or NAME=LOW:HIGH[:log] "
                             "(repeat for each option)")
    parser.add_argument("--seeds", type=seed_list, default=[0],
                        help="every configuration runs once per seed (comma-separated)")
    parser.add_argument("--trials", type=fid.positive_int, default=20,
                        help="with a range in --space: configurations the study samples in all "
                             "(each run with every seed); a grid runs all its points")
    parser.add_argument("--objective", choices=tuple(fid.RUN_METRICS), default=DEFAULT_OBJECTIVE,
                        metavar="METRIC", help="the metrics.json entry to optimize (its direction "
                                               "is known: FIDs down, ELBO up, ...)")
    parser.add_argument("--storage", help="an SQLAlchemy URL every worker shares, e.g. "
                                          "postgresql://user:password@host/db for many machines; "
                                          "none: SQLite in --sweeps-dir (one machine)")
    parser.add_argument("--sweeps-dir", default="results/sweeps",
                        help="where each study's runs go (STUDY/trial-N), and the default storage")
    parser.add_argument("--heartbeat", type=heartbeat_seconds, default=60,
                        help="seconds without a heartbeat after which another worker fails a "
                             "trial and queues it again, to be resumed")
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="stops runs whose test loss is worse than the median of earlier "
                             "trials' at the same epoch, or Hyperband's (multi-fidelity: runs "
                             "compete in rungs of 1, 3, 9, ... epochs), or none")
    parser.add_argument("--max-time-ratio", type=fid.positive_float, metavar="R",
                        help="prune a trial whose epochs take longer than R times the baseline's, "
                             f"which each worker times first ({BASELINE_EPOCHS} epochs) on its "
                             "machine")
    parser.add_argument("--baseline", metavar="FLAGS",
                        help="with --max-time-ratio: the script's flags of the baseline, as one "
                             "argument (--baseline='--latent-dim 2'); default: the flags after -- "
                             "alone, which leave the searched options at the script's defaults")
    parser.add_argument("--baseline-every", type=fid.non_negative_int, default=10,
                        metavar="MINUTES", help="with --max-time-ratio: time the baseline again "
                                                "before a trial once its last timing is this old "
                                                "(0: before every trial)")
    parser.add_argument("--figure", metavar="PNG",
                        help="with --report: draw the study's history (each trial's objective, "
                             "the best so far, the pruned) and its parameters' importances")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--report", action="store_true",
                       help="print the study's table (per configuration: seeds, median and range "
                            "of the objective, other metrics, seconds) and its best command")
    modes.add_argument("--import-csv", metavar="CSV",
                       help="add the runs of a results/tuning.csv-like file to the study as "
                            "complete trials (rows it already holds are skipped); with the "
                            "study's --space and --max-time-ratio, its report has the study's "
                            "ranges (for the importances) and time budget")
    modes.add_argument("--export-csv", metavar="CSV",
                       help="write the study's complete trials into a CSV of those columns, "
                            "keeping the file's rows of other runs")
    return parser


def parse_args(argv):
    """The sweep's options, and the script's own arguments (everything after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.script_args, args.local_args = split_local(script_args)
    if args.figure and not args.report:
        parser.error("--figure draws a study's history with --report")
    if args.report or args.import_csv or args.export_csv:
        return args
    if args.baseline is not None and not args.max_time_ratio:
        parser.error("--baseline is the reference of --max-time-ratio: give both")
    if not args.script:
        parser.error("--script is required to run a sweep (or give --report, --import-csv or "
                     "--export-csv)")
    names = [entry["name"] for entry in args.space]
    if len(set(names)) < len(names):
        parser.error(f"an option is given twice in --space: {' '.join(names)}")
    kept = [name for name in names if f"--{name}" in (*RESERVED_FLAGS, *LOCAL_FLAGS)]
    if kept:
        parser.error(f"--space {kept[0]}: not a searched option (seeds go to --seeds)")
    taken = [arg for arg in script_args if arg.split("=")[0] in
             (*RESERVED_FLAGS, *(f"--{name}" for name in names))]
    if taken:
        parser.error(f"{taken[0].split('=')[0]} after --: the sweep sets it (--seeds, --space, "
                     "--sweeps-dir)")
    if not Path(args.script).is_file():
        parser.error(f"--script {args.script}: no such file")
    return args


# ----------------------------------------------------------------------------------------------
# The study: storage, definition, queue
# ----------------------------------------------------------------------------------------------

def storage_url(args):
    return args.storage or f"sqlite:///{Path(args.sweeps_dir) / 'optuna.db'}"


def heartbeat_interval(args):
    """Seconds between a running trial's heartbeats: a few fit in --heartbeat."""
    return max(1, args.heartbeat // 4)


def open_storage(args):
    """Optuna's RDBStorage with heartbeats. JournalStorage would avoid SQLite's locks too, but it
    records no heartbeats, so a killed worker's trial could never come back; SQLite does, shared
    by the workers of one machine as sqlite_connection sets it up."""
    url = storage_url(args)
    engine_kwargs = {}
    if not args.storage:
        Path(args.sweeps_dir).mkdir(parents=True, exist_ok=True)
        engine_kwargs["creator"] = functools.partial(sqlite_connection,
                                                     Path(args.sweeps_dir) / "optuna.db")
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval(args),
                grace_period=args.heartbeat, heartbeat_stale_trial_callback=RETRY)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            creating = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
            if attempt == STORAGE_ATTEMPTS - 1 or not creating:
                raise UsageError(f"cannot open --storage {shown(url)}: "
                                 f"{str(e).splitlines()[0]}") from None
            time.sleep(1)  # another worker is creating the tables: they are there next time


def sqlite_connection(path):
    """A connection that waits SQLITE_TIMEOUT for another worker's write (SQLite's default 5 s
    ends in "database is locked"), in write-ahead-log mode: readers and the one writer do not
    block each other, and a commit is not flushed to disk (a power cut may lose the last trials'
    updates, never the file)."""
    connection = sqlite3.connect(path, timeout=SQLITE_TIMEOUT, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def shown(url):
    """The URL without its password, for messages."""
    return sqlalchemy.make_url(url).render_as_string(hide_password=True)


def definition(args):
    """What makes a study: every worker must agree on it (--trials may grow)."""
    sweep = {"script": args.script, "space": args.space, "seeds": args.seeds,
             "args": args.script_args, "objective": args.objective}
    if args.pruner != "median":  # each later option only where given: older studies still match
        sweep["pruner"] = args.pruner
    if args.max_time_ratio:
        sweep["max_time_ratio"] = args.max_time_ratio
        sweep["baseline"] = (split_local(shlex.split(args.baseline))[0]
                             if args.baseline is not None else args.script_args)
    return sweep


def is_grid(space):
    return all("choices" in entry for entry in space)


def grid(space, seeds):
    """Every configuration with every seed: seed by seed, so an early stop covers every
    configuration."""
    configurations = [{}]
    for entry in space:
        configurations = [{**configuration, entry["name"]: value}
                          for configuration in configurations for value in entry["choices"]]
    return [{**configuration, "seed": seed} for seed in seeds for configuration in configurations]


def open_study(args, storage):
    """Create the study and queue its grid, or join it once its creator has. Creating is atomic
    (the storage refuses a second study of the name), so exactly one worker queues the grid; its
    definition, written last, tells the others that the queue is complete."""
    sweep = definition(args)
    try:
        study = optuna.create_study(storage=storage, study_name=args.study,
                                    direction=direction(args.objective), sampler=sampler(),
                                    pruner=pruner(sweep))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler(),
                                  pruner=pruner(sweep))
        deadline = time.monotonic() + args.heartbeat
        while "sweep" not in study.user_attrs:
            if time.monotonic() > deadline:
                raise UsageError(f"study {args.study} has no sweep definition: it was not made by "
                                 "sweep.py, or its first worker died while queueing; delete it "
                                 "(optuna delete-study) or choose another --study")
            time.sleep(POLL_SECONDS)
        if study.user_attrs["sweep"] != json.loads(json.dumps(sweep)):
            raise UsageError(f"study {args.study} was started as {study.user_attrs['sweep']}, "
                             "not as this command: choose another --study")
        return study
    if is_grid(args.space):
        for params in grid(args.space, args.seeds):
            study.enqueue_trial(params, user_attrs={"queued_as": "grid point"})
    study.set_user_attr("sweep", sweep)
    return study


def sampler():
    """TPE. With a time budget, each trial's excess over it is its constraint (TPE counts a trial
    over budget as worse than any within it)."""
    return optuna.samplers.TPESampler()


def pruner(sweep):
    """With a time budget, the loss pruner waits until a run's time per epoch is known."""
    first_epoch = 1 + TIMED_EPOCHS if "max_time_ratio" in sweep else 1
    return {"median": optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                  n_warmup_steps=first_epoch),
            "hyperband": optuna.pruners.HyperbandPruner(min_resource=first_epoch),
            "none": optuna.pruners.NopPruner()}[sweep.get("pruner", "median")]


def sampled_configurations(trials):
    """Configurations the sampler was (or is queued to be) asked for: first attempts only."""
    return sum(trial.user_attrs.get("queued_as") == "new configuration"
               and "failed_trial" not in trial.system_attrs for trial in trials)


class QueueLock:
    """Held by a worker from its look at the study's queue until Optuna hands it the trial it saw
    there. Without it two workers may both see one last queued trial, and the one that loses the
    race gets a new trial from Optuna instead (a grid point again, or one sampled configuration
    too many). A file lock beside a SQLite file (one machine); a PostgreSQL advisory lock, waited
    for at most --heartbeat seconds (its holder's machine may be gone) before going on without it;
    none for other databases."""

    def __init__(self, args, storage):
        url = storage.engine.url
        self.file = self.connection = None
        self.held = False
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            self.file = open(f"{url.database}.lock", "a")
        elif url.get_backend_name() == "postgresql":
            self.connection = storage.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT")  # a session lock, outside any transaction
            self.connection.execute(sqlalchemy.text("SELECT set_config('lock_timeout', :limit, "
                                                    "false)"), {"limit": f"{args.heartbeat}s"})
            self.key = int.from_bytes(hashlib.sha256(args.study.encode()).digest()[:8], "big",
                                      signed=True)

    def acquire(self):
        if self.file:
            fcntl.flock(self.file, fcntl.LOCK_EX)
        elif self.connection:
            try:
                self.connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                                        {"key": self.key})
            except sqlalchemy.exc.OperationalError:  # lock_timeout
                return
        self.held = True

    def release(self):
        if not self.held:
            return
        self.held = False
        if self.file:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        else:
            self.connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                    {"key": self.key})


# ----------------------------------------------------------------------------------------------
# A trial: the script in its own process
# ----------------------------------------------------------------------------------------------

def flag_value(value):
    """How a parameter goes to the script (a sampled float with 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def space_distributions(space):
    """Each --space entry as the Optuna distribution it is sampled from."""
    distributions = {}
    for entry in space:
        if "choices" in entry:
            distributions[entry["name"]] = optuna.distributions.CategoricalDistribution(
                entry["choices"])
        elif isinstance(entry["low"], int) and isinstance(entry["high"], int):
            distributions[entry["name"]] = optuna.distributions.IntDistribution(
                entry["low"], entry["high"], log=entry["log"])
        else:
            distributions[entry["name"]] = optuna.distributions.FloatDistribution(
                entry["low"], entry["high"], log=entry["log"])
    return distributions


def suggest(trial, space, seeds):
    params = {}
    for name, sampled in space_distributions(space).items():
        if isinstance(sampled, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, sampled.choices)
        elif isinstance(sampled, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, sampled.low, sampled.high, log=sampled.log)
        else:
            params[name] = trial.suggest_float(name, sampled.low, sampled.high, log=sampled.log)
    return params, trial.suggest_categorical("seed", seeds)


def prepare_training_process(parent):
    """In the training process before the script starts. SIGINT is its clean stop even where the
    worker started with it ignored (a background job); on Linux, SIGKILL comes when its worker
    (parent) dies, so a killed worker leaves no orphan training on, and its checkpoint is what a
    retry resumes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python turns it into KeyboardInterrupt
    if LIBC:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before prctl took effect
            os._exit(1)


class Epoch(typing.NamedTuple):
    number: int
    loss: float  # the negative test ELBO (PRUNING_TERMS)
    seconds: float


def read_history(results_dir):
    path = results_dir / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [Epoch(int(row["epoch"]), sum(float(row[term]) for term in PRUNING_TERMS),
                      float(row["seconds"])) for row in csv.DictReader(f)]


def seconds_per_epoch(seconds):
    """The median of a run's epoch times after the first, which traces the training step."""
    return statistics.median(seconds[1:] or seconds)


def last_line(path):
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_script(command, results_dir, on_epoch):
    """The script in its own process, its output appended to train.log. After each new epoch of
    history.csv, on_epoch(history so far) may return why to stop the run, which then (if still
    running) gets SIGINT, checkpoints and exits 130, as on Ctrl-C. Returns (exit code, the reason
    it was stopped or None)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / "train.log", "a") as log:  # its own process group: a Ctrl-C
        # reaches the worker, which passes one SIGINT on
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            process_group=0, preexec_fn=functools.partial(prepare_training_process, os.getpid()))
    seen = 0
    try:
        while True:
            try:
                code = process.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            history = read_history(results_dir)
            for count in range(seen + 1, len(history) + 1):
                reason = on_epoch(history[:count])
                if reason and code is None:
                    process.send_signal(signal.SIGINT)  # checkpointed, exit 130
                    return process.wait(), reason
            seen = len(history)
            if code is not None:
                return code, None
    except BaseException:
        if process.poll() is None:  # an interrupt: let the run checkpoint, as Ctrl-C would
            process.send_signal(signal.SIGINT)
            process.wait()
        raise


def time_baseline(args, sweep):
    """Seconds per epoch of the study's baseline on this worker's machine, from a run of
    BASELINE_EPOCHS epochs (stopped there, then deleted)."""
    results_dir = (Path(args.sweeps_dir) / args.study /
                   f"baseline-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(results_dir, ignore_errors=True)
    command = [sys.executable, sweep["script"], *sweep["baseline"], *args.local_args,
               "--seed", str(sweep["seeds"][0]), "--results-dir", str(results_dir)]
    print(f"[sweep] timing the baseline for {BASELINE_EPOCHS} epochs: {shlex.join(command)}",
          flush=True)
    code, _ = run_script(command, results_dir,
                         lambda history: "timed" if len(history) >= BASELINE_EPOCHS else None)
    history = read_history(results_dir)
    if len(history) < min(BASELINE_EPOCHS, 2):
        raise UsageError(f"the baseline ({shlex.join(sweep['baseline'])}) ran {len(history)} "
                         f"epoch(s), exit code {code}: {last_line(results_dir / 'train.log')}")
    shutil.rmtree(results_dir)
    seconds = seconds_per_epoch([epoch.seconds for epoch in history])
    print(f"[sweep] baseline: {seconds:.3g} s per epoch; a trial over "
          f"{sweep['max_time_ratio'] * seconds:.3g} s ({sweep['max_time_ratio']:g}x) is pruned",
          flush=True)
    return seconds


class Objective:
    """Runs one trial: its configuration through the script, reporting each epoch's test loss."""

    def __init__(self, args, study, lock):
        self.args, self.study, self.lock = args, study, lock
        self.sweep = study.user_attrs["sweep"]
        self.baseline_seconds = None  # per epoch, with a time budget: see baseline()
        self.baseline_timed = -math.inf  # when (time.monotonic())
        self.trial = None  # the trial it runs, for an interrupt

    def __call__(self, trial):
        self.lock.release()  # Optuna has handed this worker its trial
        self.trial = trial
        args, sweep = self.args, self.sweep
        queued_as = trial.user_attrs.get("queued_as")
        if queued_as is None and is_grid(sweep["space"]):
            raise NothingQueued()
        params, seed = suggest(trial, sweep["space"], sweep["seeds"])
        retry = "results_dir" in trial.user_attrs  # a copy of a dead worker's trial
        if not retry and queued_as in (None, "new configuration"):
            trial.set_user_attr("queued_as", "new configuration")
            for other in sweep["seeds"]:
                if other != seed:
                    self.study.enqueue_trial({**params, "seed": other},
                                             user_attrs={"queued_as": "other seed"})
        words = [*sweep["args"], *(word for name, value in params.items()
                                   for word in (f"--{name}", flag_value(value)))]
        flags = " ".join(words)
        results_dir = Path(trial.user_attrs.get("results_dir")
                           or Path(args.sweeps_dir) / args.study / f"trial-{trial.number}")
        if not retry and results_dir.is_dir() and any(results_dir.iterdir()):
            raise UsageError(f"{results_dir} holds an earlier study's run (one of the same name, "
                             "deleted?): move it away, or choose another --study")
        for key, value in dict(script=sweep["script"], flags=flags, seed=seed,
                               results_dir=str(results_dir),
                               worker=f"{socket.gethostname()}:{os.getpid()}").items():
            trial.set_user_attr(key, value)
        command = [sys.executable, sweep["script"], *words, *args.local_args,
                   "--seed", str(seed), "--results-dir", str(results_dir)]
        resumed = retry and (results_dir / "checkpoint.json").is_file()
        print(f"[sweep] trial {trial.number}: {shlex.join(command)}"
              + (" (resuming its checkpoint)" if resumed else ""), flush=True)
        start = time.perf_counter()
        earlier = len(read_history(results_dir)) if resumed else 0  # epochs of an earlier sitting
        if not (retry and (results_dir / "metrics.json").is_file()):  # its run finished, its
            # worker did not
            self.train(trial, command + ["--resume"] * resumed, results_dir, start, earlier)
        metrics = json.loads((results_dir / "metrics.json").read_text())
        if not isinstance(metrics.get(sweep["objective"]), (int, float)):
            raise UsageError(f"{results_dir}/metrics.json has no {sweep['objective']}: give the "
                             "script options that compute the --objective")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                trial.set_user_attr(key, value)
        trial.set_user_attr("train_seconds", round(sum(metrics.get("seconds_per_epoch", []))))
        if metrics.get("seconds_per_epoch"):
            self.record_time(trial, metrics["seconds_per_epoch"], earlier)
        self.constrain(trial)
        trial.set_user_attr("latent_dim", metrics["config"]["latent_dim"])
        trial.set_user_attr("cpu", metrics.get("machine", {}).get("isa"))  # float32 differs by kind
        trial.set_user_attr("seconds", round(time.perf_counter() - start))
        return metrics[sweep["objective"]]

    def record_time(self, trial, seconds, earlier=0):
        """The run's seconds per epoch and, with a time budget, their ratio to the baseline's
        (returned). The ratio compares this sitting's epochs (after the earlier ones of a resumed
        run, which ran beside another baseline, maybe on another machine) with this sitting's
        baseline; too few of them to time, and the earlier sitting's ratio stands."""
        per_epoch = seconds_per_epoch(seconds)
        trial.set_user_attr("epoch_seconds", round(per_epoch, 4))
        if "max_time_ratio" not in self.sweep:
            return None
        if len(seconds) - earlier <= TIMED_EPOCHS and "time_ratio" in trial.user_attrs:
            return trial.user_attrs["time_ratio"]
        ratio = seconds_per_epoch(seconds[earlier:]) / (self.baseline_seconds or self.baseline())
        trial.set_user_attr("time_ratio", round(ratio, 4))
        return ratio

    def baseline(self):
        """The baseline's seconds per epoch, timed again before a trial once the last timing is
        --baseline-every minutes old: a shared machine's speed drifts."""
        if time.monotonic() - self.baseline_timed > 60 * self.args.baseline_every:
            self.baseline_seconds = time_baseline(self.args, self.sweep)
            self.baseline_timed = time.monotonic()
        return self.baseline_seconds

    def constrain(self, trial):
        """Tell the sampler, once the trial ends, how far over the time budget it was."""
        if "time_ratio" in trial.user_attrs:
            trial.set_constraint("time", trial.user_attrs["time_ratio"]
                                 - self.sweep["max_time_ratio"])

    def train(self, trial, command, results_dir, start, earlier=0):
        """The script, its test losses reported as they come; pruned over the time budget (once
        TIMED_EPOCHS epochs after the first of this sitting, past the earlier ones, are timed) or
        by the pruner."""
        budget = self.sweep.get("max_time_ratio")
        if budget:
            self.baseline()

        def on_epoch(history):
            epoch = history[-1]
            trial.report(epoch.loss, epoch.number)
            print(f"[sweep] trial {trial.number} epoch {epoch.number}: test loss "
                  f"{epoch.loss:.4g}", flush=True)
            if budget and len(history) == earlier + 1 + TIMED_EPOCHS:
                ratio = self.record_time(trial, [e.seconds for e in history], earlier)
                if ratio > budget:
                    return ("time", epoch.number, f"epoch {epoch.number}: {ratio:.2f}x the "
                            f"baseline's time per epoch, over the budget of {budget:g}x")
            if trial.should_prune():
                return "loss", epoch.number, f"epoch {epoch.number}: test loss {epoch.loss:.4g}"
            return None

        code, pruned = run_script(command, results_dir, on_epoch)
        if pruned:
            cause, epochs, message = pruned
            trial.set_user_attr("pruned", cause)
            trial.set_user_attr("epochs", epochs)
            trial.set_user_attr("seconds", round(time.perf_counter() - start))
            self.constrain(trial)
            raise optuna.TrialPruned(message)
        if code == fid.EXIT_USAGE:
            raise UsageError(f"{' '.join(command[1:])}: {last_line(results_dir / 'train.log')}")
        if code:
            failure = f"exit code {code}: {last_line(results_dir / 'train.log')}"
            trial.set_user_attr("failure", failure)
            raise RunFailed(failure)


# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------

def work(args, study, storage):
    """Take queued trials (and, for a range, sample new configurations) until the study has none
    left; while other workers' trials run, wait, since a dead worker's trial comes back."""
    lock = QueueLock(args, storage)
    objective = Objective(args, study, lock)
    sweep = study.user_attrs["sweep"]
    waiting_shown = False
    while True:
        lock.acquire()
        trials = study.get_trials(deepcopy=False)
        states = [trial.state for trial in trials]
        if optuna.trial.TrialState.WAITING not in states and not is_grid(sweep["space"]) \
                and sampled_configurations(trials) < args.trials:
            study.enqueue_trial({"seed": sweep["seeds"][0]},
                                user_attrs={"queued_as": "new configuration"})
        elif optuna.trial.TrialState.WAITING not in states:
            lock.release()
            running = states.count(optuna.trial.TrialState.RUNNING)
            if not running:
                return
            if not waiting_shown:
                print(f"[sweep] waiting for {running} trial(s) of other workers (a dead "
                      f"worker's trial is queued again after {args.heartbeat} s)", flush=True)
                waiting_shown = True
            time.sleep(heartbeat_interval(args))
            optuna.storages.fail_stale_trials(study)
            continue
        waiting_shown = False
        objective.trial = None
        try:
            study.optimize(objective, n_trials=1, catch=(RunFailed, NothingQueued))
        except (KeyboardInterrupt, ValueError) as e:
            trial = objective.trial and study.get_trials(deepcopy=False)[objective.trial.number]
            if not trial or trial.state != optuna.trial.TrialState.FAIL:
                raise
            if isinstance(e, ValueError):
                if not str(e).startswith("Cannot tell a FAIL trial"):
                    raise
                print(f"[sweep] trial {trial.number}: another worker failed it, its heartbeat "
                      f"{args.heartbeat} s late (an overloaded machine? raise --heartbeat); the "
                      "copy it queued takes this run's results", flush=True)
                continue
            RETRY(study, trial)  # the interrupt failed it
            raise KeyboardInterrupt(f"trial {trial.number} is queued again; the worker that takes "
                                    f"it resumes its run ({trial.user_attrs.get('results_dir')}) "
                                    "from its checkpoint") from None
        finally:
            lock.release()
        if objective.trial is not None:
            trial = study.get_trials(deepcopy=False)[objective.trial.number]
            print(f"[sweep] trial {trial.number} {outcome(trial, sweep)}", flush=True)


def outcome(trial, sweep):
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return f"complete: {sweep['objective']} {trial.value:.4g}"
    if trial.state == optuna.trial.TrialState.PRUNED:
        why = (f"{trial.user_attrs['time_ratio']:.2f}x the baseline's time per epoch, over the "
               f"budget of {sweep['max_time_ratio']:g}x"
               if trial.user_attrs.get("pruned") == "time" else
               f"its test loss is worse than the {sweep.get('pruner', 'median')} pruner allows")
        return f"pruned: {why}; its run is checkpointed in {trial.user_attrs['results_dir']}"
    if "failure" in trial.user_attrs:
        return f"failed: {trial.user_attrs['failure']} (in {trial.user_attrs['results_dir']})"
    return "failed: another worker took the last queued trial first; nothing ran"


# ----------------------------------------------------------------------------------------------
# Reports and CSV files
# ----------------------------------------------------------------------------------------------

def number(value, digits=2):
    """A table's number, with a true minus sign; a dash when missing."""
    return "—" if value is None else f"{value:.{digits}f}".replace("-", "\N{MINUS SIGN}")


def configurations(study):
    """The complete trials grouped by script and flags, in the order they were first run."""
    groups = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
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
    """"k of n": the runs (their metrics: a trial's user attributes) whose active units are all
    their latent dimensions (posterior collapse leaves one unused), of those that measured them."""
    known = [run for run in runs if run.get("active_units") is not None]
    if not known:
        return "—"
    return f"{sum(run['active_units'] == run['latent_dim'] for run in known)} of {len(known)}"


def report_table(study):
    """The markdown table of a study: one row per configuration, best median first."""
    objective = study.user_attrs["sweep"]["objective"]
    others = [metric for metric in REPORTED if metric != objective]
    sign = 1 if direction(objective) == "minimize" else -1
    header = ["script", "flags", "epochs", "seeds",
              f"{fid.RUN_METRICS[objective].label}: median (range)",
              *(fid.RUN_METRICS[metric].label for metric in others), "every latent dimension used",
              "CPU", "s per epoch (× baseline)", "training (s)", "run (s)"]
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    groups = sorted(configurations(study).items(),
                    key=lambda group: sign * statistics.median(trial.value for trial in group[1]))
    for (script, flags), trials in groups:
        values = [trial.value for trial in trials]
        digits = fid.RUN_METRICS[objective].table_digits
        value = number(statistics.median(values), digits) + value_range(values, digits)
        cells = [script, f"`{flags}`" if flags else "(defaults)", trials[0].user_attrs["epochs"],
                 ",".join(str(seed) for seed in sorted(trial.user_attrs["seed"] for trial in trials)),
                 value]
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
    """Whether a time ratio (None: untimed) is over the study's budget, if it has one."""
    return (ratio or 0) > study.user_attrs["sweep"].get("max_time_ratio", math.inf)


def best_commands(study, local_args=()):
    """Per script, the configuration with the best median objective within the study's time
    budget (where it has one), as a command to paste: this interpreter, the script, its flags and
    local_args (this machine's --data)."""
    objective = study.user_attrs["sweep"]["objective"]
    sign = 1 if direction(objective) == "minimize" else -1
    best = {}
    for (script, flags), trials in configurations(study).items():
        if over_time_budget(study, median(trials, "time_ratio")):
            continue
        value = statistics.median(trial.value for trial in trials)
        if script not in best or sign * value < sign * best[script][0]:
            best[script] = (value, flags, [trial.user_attrs["seed"] for trial in trials])
    return [f"best {script}: "
            f"`{shlex.join([sys.executable, script, *shlex.split(flags), *local_args])}` "
            f"({objective}: median {value:.4g} over seeds {','.join(map(str, seeds))})"
            for script, (value, flags, seeds) in best.items()]


def state_counts(study):
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    over_time = sum(trial.user_attrs.get("pruned") == "time" for trial in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    return ", ".join(f"{count} {state}" + (f" ({over_time} over the time budget)"
                                           if state == "pruned" and over_time else "")
                     for state, count in counts.items()) or "no trials"


def searched(study):
    """The parameters the study's complete trials vary, the seed aside."""
    values = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        for name, value in trial.params.items():
            values.setdefault(name, set()).add(value)
    return [name for name, seen in values.items() if name != "seed" and len(seen) > 1]


def importances(study):
    """Each searched parameter's share of what decides a good objective (PED-ANOVA, Optuna's
    evaluator that needs no scikit-learn), or {} with too few complete trials to say."""
    names = searched(study)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < IMPORTANCE_MIN_TRIALS or not names:
        return {}
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=names)


def run_hours(study):
    """Hours the study's trials ran, complete and pruned: their runs' wall-clock seconds."""
    return sum(trial.user_attrs.get("seconds") or 0 for trial in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                optuna.trial.TrialState.PRUNED))) / 3600


def flag_params(flags):
    """`--name value --switch ...` as Optuna parameters {name: value, switch: True}."""
    words = flags.split()
    params = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            params[word[2:]] = True if following.startswith("--") else choice(following)
        elif i == 0 or not words[i - 1].startswith("--"):
            raise UsageError(f"flags {flags!r}: {word!r} follows no option")
    return params


def read_csv(path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    missing = [column for column in CSV_COLUMNS
               if rows and column not in rows[0] and column not in RUN_COLUMNS]
    if missing:
        raise UsageError(f"{path}: no column {missing[0]} (expected {','.join(CSV_COLUMNS)})")
    return rows


def import_csv(study, path, objective=DEFAULT_OBJECTIVE, space=(), max_time_ratio=None):
    """Each row of the CSV as a complete trial (its flags and seed as parameters, its columns as
    user attributes), unless the study holds that run already. A parameter's range is the
    study's --space where given (importances depend on it), else what the rows span. Returns how
    many were added."""
    rows = read_csv(path)
    objective = study.user_attrs.get("sweep", {}).get("objective", objective)
    if objective not in CSV_COLUMNS:
        raise UsageError(f"--objective {objective}: not a column of {path}")
    try:
        params = [{**flag_params(row["flags"]), "seed": int(row["seed"])} for row in rows]
    except ValueError as e:
        raise UsageError(f"{path}: a seed that is not an integer ({e})") from None
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", {"objective": objective, "imported": Path(path).name,
                                      **({"max_time_ratio": max_time_ratio} if max_time_ratio
                                         else {})})
    held = {run_key(trial.user_attrs) for trial in study.get_trials(deepcopy=False)}
    choices = {}
    for run in params:
        for name, value in run.items():
            choices.setdefault(name, []).append(value)
    distributions = {name: distribution(values) for name, values in choices.items()}
    given = space_distributions(space)
    unset = [name for name in given if name not in choices]
    if unset:
        raise UsageError(f"--space {unset[0]}: no run of {path} sets it")
    distributions.update(given)
    trials = []
    for row, run in zip(rows, params):
        attrs = {key: (row[key] if key in ("script", "flags") else choice(row[key])
                       if row.get(key) else None) for key in CSV_COLUMNS}
        if run_key(attrs) in held or (attrs.get(objective) is None and not attrs["pruned"]):
            continue
        try:
            trials.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED if attrs["pruned"] else
                optuna.trial.TrialState.COMPLETE,
                value=None if attrs["pruned"] else attrs[objective], params=run,
                distributions={name: distributions[name] for name in run}, user_attrs=attrs))
        except ValueError:
            raise UsageError(f"{path}: the run `{row['flags']}` lies outside --space") from None
    study.add_trials(trials)  # all or none
    return len(trials)


def distribution(values):
    """A parameter's range as its runs' values show it: numbers span [min, max] (on a log scale
    where they are positive and span 10x or more), anything else is a choice."""
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        low, high = min(values), max(values)
        if all(isinstance(value, int) for value in values):
            return optuna.distributions.IntDistribution(low, high)
        return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high >= 10 * low)
    return optuna.distributions.CategoricalDistribution(
        sorted(set(values), key=lambda value: (str(type(value)), value)))


def run_key(attrs):
    return attrs.get("script"), attrs.get("flags"), attrs.get("seed")


def export_csv(study, path):
    """The study's complete and pruned trials as CSV rows, replacing the file's rows of the same
    runs (script, flags, seed) in place and keeping its others."""
    runs = {run_key(trial.user_attrs): trial.user_attrs for trial in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))}
    rows = [{**row, "seed": int(row["seed"])} for row in read_csv(path)] if Path(path).is_file() \
        else []
    rows = [runs.pop(run_key(row), row) for row in rows] + list(runs.values())

    def cell(row, key):
        value = row.get(key)
        return "" if value is None else round(value, 3) if isinstance(value, float) else value

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([cell(row, key) for key in CSV_COLUMNS])


def study_from_csv(path):
    """An in-memory study of a CSV's runs: what `--import-csv` then `--report` print."""
    study = optuna.create_study(direction=direction(DEFAULT_OBJECTIVE))
    import_csv(study, path)
    return study


def print_report(study, args):
    """The study's table, the parameters' importances, its best command per script, and with
    --figure its history drawn."""
    print(f"study {args.study} ({state_counts(study)}; its trials ran {run_hours(study):.2f} h in "
          "all):\n")
    print(report_table(study) + "\n")
    shares = importances(study)
    if shares:
        print("parameter importances (PED-ANOVA): "
              + ", ".join(f"{name} {share:.2f}" for name, share in shares.items()))
    print("\n".join(best_commands(study, args.local_args)))
    if args.figure:
        trials = study.get_trials(deepcopy=False)
        objective = study.user_attrs["sweep"]["objective"]
        figure = plot_utils.study_history(
            [trial.value if trial.state == optuna.trial.TrialState.COMPLETE else math.nan
             for trial in trials],
            [trial.user_attrs.get("pruned") for trial in trials], fid.RUN_METRICS[objective].label,
            lower_is_better=direction(objective) == "minimize", importances=shares,
            title=args.study, over_budget=[trial.state == optuna.trial.TrialState.COMPLETE
                                           and over_time_budget(study, trial.user_attrs.get(
                                               "time_ratio")) for trial in trials])
        try:
            figure.savefig(args.figure)
        except OSError as e:
            raise UsageError(f"--figure {args.figure}: cannot write ({e.strerror})") from None
        print(f"figure: {args.figure}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(args):
    database = Path(args.sweeps_dir) / "optuna.db"
    if (args.report or args.export_csv) and not args.storage and not database.is_file():
        raise UsageError(f"no study {args.study}: {database} does not exist (give --storage?)")
    storage = open_storage(args)
    if args.import_csv:
        study = optuna.create_study(storage=storage, study_name=args.study, load_if_exists=True,
                                    direction=direction(args.objective))
        added = import_csv(study, args.import_csv, args.objective, args.space,
                           args.max_time_ratio)
        print(f"study {args.study}: {added} run(s) of {args.import_csv} added "
              f"({state_counts(study)})")
        return
    if args.report or args.export_csv:
        try:
            study = optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            raise UsageError(f"no study {args.study} in {shown(storage_url(args))}") from None
        if "sweep" not in study.user_attrs:
            raise UsageError(f"study {args.study} was not made by sweep.py")
        if args.export_csv:
            export_csv(study, args.export_csv)
            print(f"study {args.study}: its complete and pruned trials written to "
                  f"{args.export_csv} ({state_counts(study)})")
            return
        print_report(study, args)
        return
    study = open_study(args, storage)
    print(f"[sweep] study {args.study} in {shown(storage_url(args))}: {state_counts(study)}",
          flush=True)
    work(args, study, storage)
    where = (["--storage", shown(args.storage)] if args.storage else
             ["--sweeps-dir", args.sweeps_dir]
             if args.sweeps_dir != build_parser().get_default("sweeps_dir") else [])
    report = shlex.join([sys.executable, "sweep.py", "--study", args.study, "--report", *where])
    print(f"[sweep] study {args.study} done ({state_counts(study)}); its table: {report}")


def main(argv=None):
    """Parse and run; every failure is one line and an exit code: 2 for bad input, 130 for an
    interrupt (the running trial's run checkpointed and queued again)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill requeues too
    return fid.exit_code("sweep.py", lambda: run(args), interrupted="no trial was running")


if __name__ == "__main__":
    sys.exit(main())
