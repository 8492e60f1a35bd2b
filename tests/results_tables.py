"""The markdown tables of the committed results, printed from their files so that README.md,
results/README.md and results/studies/ cannot drift from them (tests/test_readme.py checks them):
`python tests/results_tables.py` prints them, `--write` puts each into its document between
`<!-- NAME -->` and `<!-- /NAME -->`."""

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

# The committed runs, in the README's order: folder under results/, what the row is, and the
# sweep.py options of the study that ran its configuration over the seeds of results/seeds.csv.
RUNS = [
    ("vae", "dense, as the original", "--study dense-original"),
    ("vae_tuned", "dense, tuned", "--study dense-tuned"),
    ("vae_budget", "dense, swept at ≤ 2x time", "--study dense-budget-low-beta-best "
     "--max-time-ratio 2 --baseline='--latent-dim 2 --epochs 30' --baseline-every 0 --pruner none"),
    ("conv_vae", "conv, as the original", "--study conv-original"),
    ("conv_vae_tuned", "conv, tuned", "--study conv-tuned"),
    ("fashion_vae", "dense, Fashion-MNIST", None),
    ("cvae", "dense, conditional", None),
]
# Committed for their figures beside a row's example: results/studies/collapse.md shows them.
OTHER_EXAMPLES = ["conv_vae_amx"]  # seed 0 of conv, as the original, on the AMX CPU
LITERATURE = "vae_burda"  # the run of Burda et al. (2016)'s recipe: README's literature table
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
        value, default = config[key], action.default
        if action.type is vae.fid_kinds:  # a list in metrics.json, a tuple from the parser
            value, default = ",".join(value), ",".join(vae.fid_kinds(default))
        if value != default or key in ALWAYS_SHOWN:
            flags.append(option if isinstance(value, bool) else f"{option} {value}")
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


def cpu(metrics):
    """The CPU kind that made the run (avx2, avx512, amx): float32 digits differ across kinds."""
    return metrics.get("machine", {}).get("isa", "—")


def sources():
    """Per README row: its folder, label, study options and metrics.json, and its runs: over its
    seeds in results/seeds.csv where that holds runs of its command (their trials), else its own."""
    study = sweep.study_from_csv(ROOT / "results" / "seeds.csv")
    seeds = {(script, same_options(script, flags)): trials
             for (script, flags), trials in sweep.configurations(study).items()}
    for folder, label, options_of_study in RUNS:
        m = load_metrics(folder)
        architecture = architecture_of(m)
        trials = seeds.get((architecture.script, options(m["config"], architecture)), [])
        runs = [trial.user_attrs for trial in trials] or [
            {**m, "seed": m["config"]["seed"], "latent_dim": m["config"]["latent_dim"],
             "cpu": cpu(m)}]
        yield (folder, label, options_of_study, m, trials, runs,
               ", ".join(str(seed) for seed in sorted(run["seed"] for run in runs)),
               "/".join(sorted({str(run["cpu"]) for run in runs})))


def readme_table():
    """One row per committed example: over its seeds, else its own run (seed 0)."""
    rows = ["| run | seeds | pixel FID, reconstructions | original | classifier FID, samples | "
            "test ELBO | log p(x) | both latent dimensions used | CPU | command |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for folder, label, _, m, _, runs, seeds, cpus in sources():
        script = architecture_of(m).script
        original = (ORIGINAL_PIXEL_FID[script] if m["config"]["dataset"] == "mnist"
                    and not m["config"].get("conditional") else "—")  # the original's models
        if "label_accuracy" in m:
            label += f" (label accuracy {shown(m, 'label_accuracy')})"
        medians = " | ".join(spread(runs, key, ranged=False) for key in (
            "fid_classifier_samples", "test_elbo", "test_log_likelihood_iw"))
        rows.append(f"| {label} | {seeds} | {spread(runs, 'fid_pixel_recon')} | {original} | "
                    f"{medians} (K={m.get('iw_samples', '—')}) | {sweep.dimensions_used(runs)} | "
                    f"{cpus} | `{command(m, folder)}` |")
    return "\n".join(rows)


def index_table():
    """results/README.md's index: each README row's pixel FID, what made it, and where it is."""
    rows = ["| README row | pixel FID, or what it names | made by | seeds | numbers in | CPU "
            "| example (seed 0): CPU, pixel FID |", "|---|---|---|---|---|---|---|"]
    for folder, label, study, m, trials, runs, seeds, cpus in sources():
        ratio = sweep.median(trials, "time_ratio") if trials else None
        made = (f"python sweep.py --script {runs[0]['script']} {study} --seeds "
                f"{seeds.replace(' ', '')} -- {runs[0]['flags']}" if trials else command(m, folder))
        rows.append(f"| {label} | {spread(runs, 'fid_pixel_recon')}"
                    + (f", at {number(ratio)}× the original's time per epoch" if ratio else "")
                    + f" | `{made}` | {seeds} | `results/"
                    f"{'seeds.csv' if trials else folder + '/metrics.json'}` | {cpus} | "
                    f"`results/{folder}/`: {cpu(m)}, {shown(m, 'fid_pixel_recon')} |")
    m = load_metrics(LITERATURE)  # and its cost: the median epoch's and the estimate's seconds
    epoch = number(statistics.median(m["seconds_per_epoch"]))
    rows.append(f"| literature: VAE | log p(x) **{shown(m, 'test_log_likelihood_iw')}**; {epoch} s "
                f"per epoch, estimate {m['iw_seconds']:.0f} s | "
                f"`{command(m, LITERATURE)}` | 0 | `results/{LITERATURE}/metrics.json` | {cpu(m)} | "
                f"`results/{LITERATURE}/`: {cpu(m)}, {shown(m, 'fid_pixel_recon')} |")
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


def kid_prdc_table():
    """Each committed example's FID, KID and k-NN metrics (k = 5) in the classifier's features."""
    rows = ["| folder | images | classifier FID | KID | precision / recall / density / coverage |",
            "|---|---|---|---|---|"]
    for folder in [run[0] for run in RUNS] + OTHER_EXAMPLES:
        m = load_metrics(folder)
        for images in ("recon", "samples"):
            key = f"_classifier_{images}"
            manifold = [shown(m, name + key) for name in ("precision", "recall", "density",
                                                          "coverage")]
            rows.append(f"| `results/{folder}` | {images} | {shown(m, 'fid' + key)} | "
                        f"{shown(m, 'kid' + key)} ± {number(m[f'kid{key}_std'])} | "
                        f"{' / '.join(manifold)} |")
    return "\n".join(rows)


def literature_table():
    """The run of Burda et al.'s recipe beside their Table 1 (one stochastic layer, VAE, k=1)."""
    m = load_metrics(LITERATURE)
    return "\n".join([
        "| model | log p(x) | paper | active units | paper | test ELBO | command |",
        "|---|---|---|---|---|---|---|",
        f"| VAE | **{shown(m, 'test_log_likelihood_iw')}** (K={m['iw_samples']}) | −86.76 | "
        f"{m['active_units']} | 19 | {shown(m, 'test_elbo')} | `{command(m, LITERATURE)}` |"])


def report(csv_name):  # `python sweep.py --study NAME --report` of a study holding the CSV's runs
    return lambda: sweep.report_table(sweep.study_from_csv(ROOT / "results" / csv_name))


STUDIES = ROOT / "results" / "studies"
TABLES = {"results-table": (ROOT / "README.md", readme_table),  # name: document, table
          "literature-table": (ROOT / "README.md", literature_table),
          "index-table": (ROOT / "results" / "README.md", index_table),
          "kid-prdc-table": (STUDIES / "kid-prdc.md", kid_prdc_table),
          "tuning-table": (STUDIES / "tuning.md", report("tuning.csv")),
          "seeds-table": (STUDIES / "seeds.md", report("seeds.csv"))}


def block(name):
    return f"<!-- {name} -->\n{TABLES[name][1]()}\n<!-- /{name} -->"


if __name__ == "__main__":
    for name, (document, _) in TABLES.items():
        if "--write" in sys.argv:
            text = re.sub(f"<!-- {name} -->\n.*?<!-- /{name} -->", lambda _: block(name),
                          document.read_text(), flags=re.S)
            document.write_text(text)
        else:
            print(block(name) + "\n")
