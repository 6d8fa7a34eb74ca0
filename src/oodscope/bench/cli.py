"""``oodscope bench``: extract once, tune on validation data, score, write a report.

Examples::

    oodscope bench fashion-mnist
    oodscope bench fashion-mnist --ood mnist,notmnist --detectors msp,energy,knn,vim --out runs/fm
    oodscope bench cifar10 --model path/to/ckpt.pt --data-root /data/openood
    oodscope bench imagenet --vlm hf:openai/clip-vit-base-patch16 --class-names names.txt
    oodscope bench clinc150 --finetune none
    oodscope bench banking77-oos --data-root path/to/BANKING77-OOS
    oodscope bench text --data intents.csv --oos-label out_of_scope
    oodscope bench images --id photos/ --ood other/ --ood noise/ --model net.safetensors
    oodscope bench mixoe-car --model resnet50_car.safetensors --data-root path/to/MixOE
    oodscope bench pt-ood --id id/ --near imagenet_like/ --ood other/ --model backbone.pt
    oodscope bench nova --id normal_mri/ --model net.pt --data-root path/to/Nova --boxes boxes.jsonl
    oodscope bench fashion-mnist-split --compare-training ce,oe,logitnorm --epochs 4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

from ..commands.ray_option import add_ray_arguments

__all__ = ["add_arguments", "run"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except ``None``: an option that is not
    given leaves the choice to the benchmark, and its help says what that is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _HelpFormatter
    p.add_argument("benchmark", metavar="BENCHMARK", nargs="?",
                   help="benchmark name, e.g. fashion-mnist, cifar10, cifar100, imagenet200, "
                        "imagenet, or a text/CLIP benchmark; omit (or use --list) to list them")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    p.add_argument("--model",
                   help="checkpoint of the network to evaluate (.pt/.safetensors); by default the "
                        "benchmark's reference model is trained or reused from the cache")
    p.add_argument("--ood", action="append", metavar="NAMES_OR_DIR",
                   help="comma-separated test OOD sets to evaluate (default: all of the benchmark's); "
                        "an unknown name is an error that lists the valid ones. With 'bench images': a "
                        "folder of OOD images (far OOD), repeatable")
    p.add_argument("--detectors",
                   help="comma-separated detector names, or 'all' (default: the benchmark's default "
                        "list, else every detector the extracted features can feed; detectors that re-run the "
                        "network, such as ODIN, only when named or with 'all')")
    p.add_argument("--out",
                   help="output folder for results.csv, results.json and report.html "
                        "(default: runs/bench/<BENCHMARK>)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated seeds; each seed reruns the provider (model seed, ID-val "
                        "split, generated sets) and the leaderboard averages over seeds")
    p.add_argument("--no-tune", action="store_true",
                   help="use every detector's default hyperparameters instead of choosing them on "
                        "ID-val vs the validation OOD set")
    p.add_argument("--full-spectrum", action="store_true",
                   help="also report full-spectrum results, where covariate-shifted ID sets "
                        "(e.g. Fashion-MNIST-C) count as in-distribution")
    p.add_argument("--subset", type=int, metavar="N",
                   help="use at most N samples per split (quick, smaller runs; default: all)")
    p.add_argument("--cache-dir",
                   help="where extracted features and reference models are cached "
                        "(default: ~/.cache/oodscope)")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run: small subsets, fewer bootstrap resamples")
    p.add_argument("--n-boot", type=int, default=200,
                   help="bootstrap resamples for the confidence intervals (0 = no intervals)")
    p.add_argument("--no-report", action="store_true", help="write results.csv/json but no report.html")
    p.add_argument("--export", metavar="DIR",
                   help="save the detector that won on validation (highest ID-val vs val-OOD AUROC, "
                        "never chosen on test OOD) as a calibrated guard in DIR, for `oodscope "
                        "score` / `oodscope serve`; its threshold is calibrated on half of the "
                        "test ID split and checked on the other half")
    p.add_argument("--export-tpr", type=float, default=0.95, metavar="TPR",
                   help="with --export: fraction of in-distribution inputs the guard accepts "
                        "(default 0.95)")
    _add_provider_options(p)
    _add_own_data_options(p)
    _add_training_options(p)
    r = p.add_argument_group("Ray (extra 'ray'): fitting and tuning stay local, the test sets are scored "
                             "on Ray workers")
    add_ray_arguments(r, "score the test sets")


def _add_provider_options(p: argparse.ArgumentParser) -> None:
    """Options a provider reads: where its data lives, and how text and images are embedded."""
    g = p.add_argument_group("provider options (passed to benchmarks that use them; a benchmark "
                             "that does not use a given option stops with an error)")
    g.add_argument("--data-root", metavar="DIR",
                   help="where the benchmark's data lives (e.g. the OpenOOD v1.5 folder with "
                        "benchmark_imglist/ and images_*/, or the Fashion-MNIST files); default: "
                        "found via $OODSCOPE_DATA")
    g.add_argument("--encoder",
                   help="text benchmarks: sentence encoder / language model name or path")
    g.add_argument("--finetune", metavar="RECIPE",
                   help="text benchmarks (clinc150): fine-tuning of the sentence encoder before "
                        "extraction: 'none' (frozen encoder), 'ce' (cross-entropy; aliases 'true', "
                        "'full'), 'supcon' (supervised contrastive) or 'margin'. Default 'auto': "
                        "'ce' on full runs with the default encoder, frozen for --subset/--quick "
                        "runs and other encoders")
    g.add_argument("--vlm", metavar="SPEC",
                   help="embed images with a CLIP-like model instead of a classifier, for the "
                        "zero-shot detectors (MCM, GL-MCM, NegLabel, AdaNeg): hf:<model or dir> or "
                        "open_clip:<arch>/<tag>; works with the *-vlm benchmarks and the OpenOOD "
                        "ones (e.g. 'bench imagenet --vlm hf:openai/clip-vit-base-patch16')")
    g.add_argument("--class-names", metavar="FILE",
                   help="with --vlm: text file with the ID class names, one a line in label order "
                        "(default: the benchmark's own names, e.g. CIFAR-10's, or "
                        "<data-root>/class_names/<benchmark>.txt)")


#: The options of 'bench text', 'bench images', 'pt-ood' and 'nova': flag -> (the benchmark
#: parameter it sets, argparse keywords). 'bench images' takes its OOD folders from --ood.
_DATA_OPTIONS = {
    "--data": ("data", dict(metavar="DIR_OR_FILE", help=(
        "bench text: a CLINC150, BANKING77-OOS, CLINC-Single-Domain-OOS or ROSTD release folder "
        "(the layout is detected), or a CSV/TSV/JSONL file with text and label columns whose "
        "out-of-scope rows carry --oos-label"))),
    "--text-column": ("text_column", dict(
        metavar="NAME", help="bench text with a file: the text column (default: text)")),
    "--label-column": ("label_column", dict(
        metavar="NAME", help="bench text with a file: the label column (default: label)")),
    "--oos-label": ("oos_label", dict(
        metavar="LABEL", help="bench text with a file: the label of out-of-scope rows (default: oos)")),
    "--id": ("id_dir", dict(metavar="DIR", dest="id_dir", help=(
        "bench images: the ID images, one sub-folder per class (split into train, ID-val and "
        "test ID)"))),
    "--near": ("near_dirs", dict(action="append", metavar="DIR", help=(
        "bench images / pt-ood: a folder of near-OOD images (pt-ood: familiar, pre-training OOD), "
        "repeatable"))),
    "--boxes": ("boxes", dict(metavar="FILE", help=(
        "bench nova: predicted anomaly boxes (JSON lines: filename, boxes [[x_min, y_min, x_max, "
        "y_max], ...], optional scores) scored against NOVA's gold boxes"))),
}


def _add_own_data_options(p: argparse.ArgumentParser) -> None:
    """The `_DATA_OPTIONS`: the ID and OOD data of ``bench text``, ``images``, ``pt-ood``, ``nova``."""
    group = p.add_argument_group(
        "your own data ('bench text --data ...', 'bench images --id ... --ood ...')")
    for flag, (_, keywords) in _DATA_OPTIONS.items():
        group.add_argument(flag, **keywords)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """``--compare-training``: train one model per objective, then benchmark each."""
    t = p.add_argument_group("training comparison (--compare-training)")
    t.add_argument("--compare-training", metavar="METHODS",
                   help="compare OOD-aware training objectives (comma list, e.g. ce,oe,logitnorm): "
                        "trains one model per method and benchmarks each (oodscope.bench.compare); "
                        "the BENCHMARK defaults to fashion-mnist-split")
    t.add_argument("--epochs", type=int, metavar="N",
                   help="training epochs per method (default: the comparison's budget; fewer with "
                        "--quick)")
    t.add_argument("--train-size", type=int, metavar="N",
                   help="train each method on at most N ID images (class-stratified draw; default: "
                        "the comparison's budget)")
    t.add_argument("--batch-size", type=int, metavar="N",
                   help="training batch size (default: the comparison's budget)")
    t.add_argument("--lr", type=float,
                   help="learning rate (default: the comparison's budget)")


def _list() -> int:
    from .catalog import get_benchmark, list_benchmarks

    names = list_benchmarks()
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {get_benchmark(name).description}")
    return 0


def _class_names(path: str | None) -> list[str] | None:
    """``--class-names FILE``: one name per line (blank lines ignored)."""
    if path is None:
        return None
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--class-names {path!r}: no such file (one class name a line).")
    names = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--class-names {path!r} is empty: give one ID class name a line.")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}.") from None
    if not seeds:
        raise ValueError("--seeds needs at least one seed.")
    return seeds


def _with_data(spec, args: argparse.Namespace):
    """``(spec, --ood filter)``: the `_DATA_OPTIONS` given, set as the spec's parameters ('bench
    images' takes its OOD folders from ``--ood``); an option the benchmark has no parameter
    for is an error."""
    given = {}  # flag -> (parameter, value)
    for flag, (param, keywords) in _DATA_OPTIONS.items():
        value = getattr(args, keywords.get("dest", flag[2:].replace("-", "_")), None)
        if value is not None:
            given[flag] = (param, value)
    unused = [flag for flag, (param, _) in given.items() if param not in spec.params]
    if unused:
        raise ValueError(f"Benchmark {spec.name!r} does not use option(s) {', '.join(unused)}.")
    params = dict(given.values())
    if "near_dirs" in params:
        params["near_dirs"] = tuple(params["near_dirs"])
    ood = ",".join(args.ood) if args.ood else None
    if "ood_dirs" in spec.params:  # bench images: --ood names folders
        params["ood_dirs"], ood = tuple(args.ood or ()), None
    return (spec.with_params(**params) if params else spec), ood


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list", False) or not (args.benchmark or args.compare_training):
        return _list()
    if args.compare_training:
        for opt, flag in (("export", "--export"), ("ray", "--ray")):
            if getattr(args, opt, None):
                raise ValueError(f"{flag} applies to one benchmark run, not to --compare-training.")
        try:
            compare = importlib.import_module("oodscope.bench.compare")
        except ModuleNotFoundError as exc:
            if exc.name not in ("oodscope.bench.compare",):
                raise
            raise ValueError(
                "--compare-training needs oodscope.bench.compare, which is not available in this "
                "install.") from None
        return int(compare.run_comparison(args) or 0)
    for opt in ("epochs", "train_size", "batch_size", "lr"):
        if getattr(args, opt, None) is not None:
            raise ValueError(f"--{opt.replace('_', '-')} is a training option: it only applies with "
                             "--compare-training.")

    from .catalog import get_benchmark
    from .runner import run_benchmark
    from .spec import ProviderOptions

    n_boot = min(args.n_boot, 50) if args.quick else args.n_boot
    if args.model is not None and not Path(args.model).exists() and not Path(args.model).with_suffix(
            ".safetensors").exists():
        raise FileNotFoundError(f"--model {args.model!r}: no such file.")
    options = ProviderOptions.of({
        "model": args.model, "subset": args.subset, "cache_dir": args.cache_dir, "quick": args.quick,
        "encoder": args.encoder, "finetune": args.finetune, "vlm": args.vlm, "data_root": args.data_root,
        "class_names": _class_names(args.class_names),
    })
    if options.class_names is not None and args.vlm is None:
        raise ValueError("--class-names is used with --vlm only.")
    spec, ood = _with_data(get_benchmark(args.benchmark), args)
    out = Path(args.out) if args.out else Path("runs") / "bench" / args.benchmark
    with _ray(args):
        res = run_benchmark(
            spec, args.detectors, seeds=_seeds(args.seeds), ood=ood,
            tune_params=not args.no_tune, full_spectrum=args.full_spectrum, ci=n_boot > 0,
            n_boot=max(n_boot, 1), provider_options=options, progress=True, out_dir=None,
            keep_detectors=bool(args.export), ray_workers=args.ray_workers if args.ray else None,
        )
    paths = res.write(out, report=not args.no_report)
    print_leaderboard(res)
    for kind, path in paths.items():
        print(f"{kind:5s} {path}")
    if args.export:
        _export(res, args.export, args.export_tpr, out)
    return 0


def _ray(args: argparse.Namespace):
    """One Ray session (``--ray ADDRESS``) around the whole run, else nothing."""
    if getattr(args, "ray", None) is None:
        return contextlib.nullcontext()
    if args.ray_workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {args.ray_workers}.")
    from ..distributed import ray_session

    return ray_session(args.ray, num_cpus=args.ray_workers)


def _export(res, target: str, tpr: float, out: Path) -> None:
    import json

    from .export import export_best

    summary = export_best(res, target, tpr=tpr)
    (out / "export.json").write_text(json.dumps(summary, indent=1))
    ood = ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["ood_acceptance"].items())
    print(f"exported {summary['detector']} {summary['params']} (validation AUROC "
          f"{100 * summary['val_auroc']:.2f}) to {summary['path']}")
    print(f"  threshold {summary['threshold']:.6g} (calibrated on {summary['calibration_samples']} "
          f"test-ID samples for TPR {tpr}); held-out ID accepted "
          f"{100 * summary['held_out_id_acceptance']:.1f}%; OOD accepted: {ood}")
    print(f"  serve it: oodscope serve {target}    (summary: {out / 'export.json'})")


def print_leaderboard(res, file=None) -> None:
    """The leaderboard as a terminal table (rich when available)."""
    file = file or sys.stdout
    acc = res.info.get("id_accuracy")
    head = f"{res.benchmark}: ID accuracy {100 * acc:.2f}%" if acc is not None else res.benchmark
    modes = ["standard"] + [m for m in ("full-spectrum", "stream") if any(r["mode"] == m for r in res.rows)]
    for mode in modes:
        lb = res.leaderboard(mode)
        title = head + ("" if mode == "standard" else f" ({mode})")
        cols = [c for c in lb.columns if c != "detector"
                and not (mode == "stream" and c.endswith("FPR95") and "(mean)" not in c)]  # stages: AUROC only
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title + " — AUROC / FPR@95 in %")
            t.add_column("detector", justify="left")
            for c in cols:
                t.add_column(c, justify="right", no_wrap=False, min_width=7)
            for _, r in lb.iterrows():
                t.add_row(str(r["detector"]), *[("–" if r[c] != r[c] else f"{r[c]:.1f}") for c in cols])
            Console(file=file, width=max(120, 16 * (len(cols) + 1))).print(t)
        except ImportError:  # pragma: no cover - rich is a dependency, keep a plain fallback
            print(title, file=file)
            print(lb.round(1).to_string(index=False), file=file)
    for name, reason in res.skipped.items():
        print(f"skipped {name}: {reason}", file=file)
