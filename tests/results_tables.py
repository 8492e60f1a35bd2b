"""The markdown tables of the committed results, printed from their files, so that README.md and
results/README.md cannot drift from them (tests/test_readme.py checks both documents).

    python tests/results_tables.py            # print all three tables
    python tests/results_tables.py --write    # put them into README.md and results/README.md

Each table sits in its document between `<!-- NAME -->` and `<!-- /NAME -->`.
"""

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fid  # noqa: E402
import sweep  # noqa: E402
from sweep import number  # noqa: E402

# The committed runs, in the README's order: folder under results/, and what the row is.
RUNS = [
    ("vae", "dense, as the original"),
    ("vae_tuned", "dense, tuned"),
    ("vae_budget", "dense, swept at ≤ 2x time"),
    ("conv_vae", "conv, as the original"),
    ("conv_vae_tuned", "conv, tuned"),
    ("fashion_vae", "dense, Fashion-MNIST"),
    ("cvae", "dense, conditional"),
]
# Committed for their figures beside a row's example: results/README.md shows them.
OTHER_EXAMPLES = ["conv_vae_amx"]  # seed 0 of conv, as the original, on the AMX CPU
ORIGINAL_PIXEL_FID = {"vae.py": "20.359", "conv_vae.py": "15.511"}  # the original's README
ALWAYS_SHOWN = ("latent_dim", "epochs")  # in every command, as the original gives them
NOT_IN_COMMANDS = ("data", "results_dir")  # machine-specific; the command names its own folder


def load_metrics(folder):
    return json.loads((ROOT / "results" / folder / "metrics.json").read_text())


def architecture_of(metrics=None, script=None):
    """The script's Architecture, from a run's metrics.json or the script's name."""
    import conv_vae
    import vae

    dense = metrics["model"] == vae.DENSE.title if metrics else script == vae.DENSE.script
    return vae.DENSE if dense else conv_vae.CONV


def options(config, architecture):
    """The options a run's config sets away from the script's defaults, as flags in the parser's
    order (latent size and epochs always: the original gives them)."""
    import vae

    parser, _ = vae.build_parser(architecture)
    flags = []
    for action in parser._actions:  # argparse keeps no public list of its options
        key, option = action.dest, action.option_strings[-1] if action.option_strings else None
        if key not in config or key in NOT_IN_COMMANDS or option is None:
            continue
        value = config[key]
        default = action.default
        if action.type is vae.fid_kinds:
            default, value = vae.fid_kinds(default), tuple(value)
        if value == default and key not in ALWAYS_SHOWN:
            continue
        if isinstance(value, bool):
            flags.append(option)
        else:
            shown = ",".join(value) if isinstance(value, tuple) else value
            flags.append(f"{option} {shown}")
    return " ".join(flags)


def command(metrics, folder):
    """The command that makes the run: its options that differ from the script's defaults."""
    architecture = architecture_of(metrics)
    return " ".join(["python", architecture.script, options(metrics["config"], architecture),
                     "--results-dir", f"results/{folder}"])


def same_options(script, flags):
    """A sweep run's flags in the form options() gives them, to match a folder's command."""
    import vae

    architecture = architecture_of(script=script)
    parser, _ = vae.build_parser(architecture)
    return options(vars(parser.parse_args(flags.split())), architecture)


def shown(metrics, key):
    """A metric as tables round it (fid.RUN_METRICS), a dash where the run has none."""
    return number(metrics.get(key), fid.RUN_METRICS[key].table_digits)


def kid(metrics, images="samples", std=True):
    """KID in the classifier's features (with its standard deviation over subsets)."""
    if f"kid_classifier_{images}" not in metrics:
        return "—"
    mean = shown(metrics, f"kid_classifier_{images}")
    return f"{mean} ± {number(metrics[f'kid_classifier_{images}_std'])}" if std else mean


def manifold(metrics, names=("precision", "recall", "density", "coverage"), images="samples"):
    """The k-NN manifold metrics in the classifier's features, joined by " / "."""
    keys = [f"{name}_classifier_{images}" for name in names]
    return " / ".join(shown(metrics, key) for key in keys) if keys[0] in metrics else "—"


def cpu(metrics, model=False):
    """The CPU kind that made the run (avx2, avx512, amx: float32 results differ across kinds in
    their late digits), after its model name with model=True."""
    machine = metrics.get("machine")
    if machine is None:
        return "—"
    return f"{machine['cpu']} ({machine['isa']})" if model else machine["isa"]


def seed_runs():
    """results/seeds.csv's runs by script and options (as options() gives them)."""
    study = sweep.study_from_csv(ROOT / "results" / "seeds.csv")
    return {(script, same_options(script, flags)): trials
            for (script, flags), trials in sweep.configurations(study).items()}


def readme_table():
    """One row per committed example: over its seeds in results/seeds.csv where that holds runs of
    its command, else its own run (seed 0)."""
    rows = ["| run | seeds | pixel FID, reconstructions | original | classifier FID, samples | "
            "test ELBO | log p(x) | both latent dimensions used | CPU | command |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    seeds = seed_runs()
    for folder, label in RUNS:
        m = load_metrics(folder)
        architecture = architecture_of(m)
        script, flags = architecture.script, options(m["config"], architecture)
        original = (ORIGINAL_PIXEL_FID[script] if m["config"]["dataset"] == "mnist"
                    and not m["config"].get("conditional") else "—")  # the original's models
        if "label_accuracy" in m:
            label += f" (label accuracy {shown(m, 'label_accuracy')})"
        runs = [trial.user_attrs for trial in seeds.get((script, flags), [])] or [
            {**m, "seed": m["config"]["seed"], "latent_dim": m["config"]["latent_dim"],
             "cpu": cpu(m)}]
        rows.append(f"| {label} | {', '.join(str(seed) for seed in sorted(run['seed'] for run in runs))} | "
                    f"{spread(runs, 'fid_pixel_recon')} | {original} | "
                    f"{spread(runs, 'fid_classifier_samples', ranged=False)} | "
                    f"{spread(runs, 'test_elbo', ranged=False)} | "
                    f"{spread(runs, 'test_log_likelihood_iw', ranged=False)} "
                    f"(K={m.get('iw_samples', '—')}) | {sweep.dimensions_used(runs)} | "
                    f"{'/'.join(sorted({str(run['cpu']) for run in runs}))} | "
                    f"`{command(m, folder)}` |")
    return "\n".join(rows)


def spread(runs, key, ranged=True):
    """The median of the runs' values, with their range when there are several."""
    values = [run[key] for run in runs if run.get(key) is not None]
    if not values:
        return "—"
    digits = fid.RUN_METRICS[key].table_digits
    median = number(statistics.median(values), digits)
    if not ranged:
        return median
    return f"**{median}**" + sweep.value_range(values, digits)


def committed_runs_table():
    rows = ["| folder | CPU | seed | epochs | K | training (s) | evaluation (s) "
            "| pixel FID recon / samples | classifier FID recon / samples | test ELBO | log p(x) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    manifold_rows = ["| folder | images | KID | precision / recall / density / coverage |",
                     "|---|---|---|---|"]
    for folder in [folder for folder, _ in RUNS] + OTHER_EXAMPLES:
        m = load_metrics(folder)
        rows.append(
            f"| `results/{folder}` | {cpu(m, model=True)} | {m['config']['seed']} | {m['epochs']} "
            f"| {m.get('iw_samples', '—')} "
            f"| {sum(m['seconds_per_epoch']):.0f} | {number(m.get('evaluation_seconds'), 0)} "
            f"| {shown(m, 'fid_pixel_recon')} / {shown(m, 'fid_pixel_samples')} "
            f"| {shown(m, 'fid_classifier_recon')} / {shown(m, 'fid_classifier_samples')} "
            f"| {shown(m, 'test_elbo')} | {shown(m, 'test_log_likelihood_iw')} |")
        for images in ("recon", "samples"):
            manifold_rows.append(f"| `results/{folder}` | {images} | {kid(m, images)} "
                                 f"| {manifold(m, images=images)} |")
    return "\n".join([*rows, "", "In the classifier's features (k = 5):", "", *manifold_rows])


def tuning_table():
    """`python sweep.py --study NAME --report` of a study holding results/tuning.csv's runs."""
    return sweep.report_table(sweep.study_from_csv(ROOT / "results" / "tuning.csv"))


def seeds_table():
    """The same of results/seeds.csv: each configuration's runs over seeds 0, 1, 2."""
    return sweep.report_table(sweep.study_from_csv(ROOT / "results" / "seeds.csv"))


TABLES = {"results-table": readme_table, "committed-runs-table": committed_runs_table,
          "tuning-table": tuning_table, "seeds-table": seeds_table}
DOCUMENTS = {"results-table": ROOT / "README.md",
             "committed-runs-table": ROOT / "results" / "README.md",
             "tuning-table": ROOT / "results" / "README.md",
             "seeds-table": ROOT / "results" / "README.md"}


def block(name):
    return f"<!-- {name} -->\n{TABLES[name]()}\n<!-- /{name} -->"


if __name__ == "__main__":
    for name, document in DOCUMENTS.items():
        if "--write" in sys.argv:
            text = re.sub(f"<!-- {name} -->\n.*?<!-- /{name} -->", lambda _: block(name),
                          document.read_text(), flags=re.S)
            document.write_text(text)
        else:
            print(block(name) + "\n")
