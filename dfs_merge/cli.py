"""The `dfs-merge` command. It parses arguments and calls the modules; it holds no logic of its own.

A user's mistake (a `DfsMergeError`) is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dfs_merge import bundled
from dfs_merge.errors import DfsMergeError


def layer_counts_arg(text: str) -> tuple[int, ...]:
    """`--sizes 2,4,6,8`: positive integers, comma-separated."""
    try:
        sizes = tuple(int(n) for n in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def download_flag(parser: argparse.ArgumentParser, main: bool = False) -> None:
    """`--allow-download`, on the main parser and on each command that loads sources (where it is left unset
    unless given, so as not to undo the main parser's)."""
    parser.add_argument("--allow-download", action="store_true", default=False if main else argparse.SUPPRESS,
                        help="download sources named as Hub models (org/name) that are not in the local Hugging Face "
                             "cache (default: only the cache is read)")


def cmd_show(args: argparse.Namespace) -> None:
    from dfs_merge.genome_files import load_genome
    from dfs_merge.merging.recipe import Recipe
    from dfs_merge.outputs import check_output

    if args.png:
        check_output(args.png, kind="file", force=args.force, inputs=[args.genome], what="--png")
    g = load_genome(args.genome)
    if isinstance(g, Recipe):
        print(f"recipe: {args.genome}")
        for i, s in enumerate(g.sources):
            print(f"  source {i}: {s} ({g.layers} layers)")
        print(f"method: {g.method}, base: {g.base}, layer groups: {g.layer_groups}")
        print("\n".join(g.table()))
        for name, value in g.scores.items():
            print(f"score {name}: {value}")
        if args.png:
            from dfs_merge.plots import recipe_png

            print(f"picture: {recipe_png(g, args.png)}")
        return
    route = g.decode()
    print(f"genome: {args.genome}")
    for i, s in enumerate(g.sources):
        print(f"  source {i}: {s} ({g.layout.layers[i]} layers)")
    print(f"slots: {g.layout.T} ({g.layout.M} layers x {g.layout.repeats} repeats), scaling: {g.scaling}")
    for name, value in g.settings().items():
        short = not isinstance(value, str) or (len(value) <= 60 and value.isprintable())
        print(f"{name}: {value if short else repr(value[:57]) + '...'}")
    print(f"route: {route.text()}")
    print(f"hops: {len(route)}")
    print(f"{'hop':>4}  {'source':>6}  {'layer':>5}  {'scale':>7}")
    for k, h in enumerate(route):
        print(f"{k:>4}  {h.source:>6}  {h.layer:>5}  {h.scale:>7.4f}")
    for name, value in g.scores.items():
        print(f"score {name}: {value}")
    if args.png:
        from dfs_merge.plots import route_png

        print(f"picture: {route_png(g, args.png)}")


def cmd_models(args: argparse.Namespace) -> None:
    from dfs_merge.models import store as model_store

    if args.name:
        print(model_store.fetch(args.name))
        return
    print(f"{'name':<28} {'package':<26} {'installed':<9} {'converted':<9} path / how to install")
    for m in model_store.packaged_models():
        where = str(m.path) if m.converted else m.install_command
        print(f"{m.name:<28} {m.package:<26} {m.installed!s:<9} {m.converted!s:<9} {where}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dfs_merge.apps.compare import evaluate_for_cli
    from dfs_merge.config import load_config

    if args.genome and args.sources_only:
        raise DfsMergeError("--genome and --sources-only contradict each other (the genome would not be scored); "
                            "give one of them")
    cfg = load_config(args.config)
    evaluate_for_cli(cfg, genome=args.genome, split=args.split, sources_only=args.sources_only)


def cmd_baseline(args: argparse.Namespace) -> None:
    from dfs_merge.apps.compare import baselines_for_cli
    from dfs_merge.config import load_config

    cfg = load_config(args.config)
    baselines_for_cli(cfg, args.calibration, split=args.split, sizes=args.sizes)


def cmd_evolve(args: argparse.Namespace) -> None:
    from dfs_merge.config import load_config
    from dfs_merge.search.evolution import run_evolution

    cfg = load_config(args.config, out=args.out)
    run_evolution(cfg, resume=args.resume)


def cmd_demo(args: argparse.Namespace) -> None:
    if args.config is None:
        from dfs_merge.apps.family_demo import run_family_demo

        run_family_demo()
        return
    from dfs_merge.apps.demo import run_demo

    run_demo(args.config)


def cmd_study(args: argparse.Namespace) -> None:
    from dfs_merge.apps.study import run_study

    run_study(args.config, sizes=args.sizes, prune_hops=args.prune_hops,
              ablation=not args.no_ablation, held_out=args.held_out)


def cmd_export(args: argparse.Namespace) -> None:
    from dfs_merge.errors import ExportError
    from dfs_merge.export.formats import FORMATS, ExportOptions, check_options
    from dfs_merge.export.progress import Progress
    from dfs_merge.genome_files import load_genome
    from dfs_merge.outputs import check_output

    for flag, value in (("--quant", args.quant), ("--max-shard-size", args.max_shard_size)):
        if value is not None and not value.strip():  # not taken as the default without a word
            raise ExportError(f"{flag}: an empty value; give one, or leave {flag} out for the default")
    fmt = FORMATS[args.format]
    g = load_genome(args.genome)
    # before any source is loaded: the genome file and its sources are the inputs
    out = check_output(args.out, kind=fmt.out, force=args.force, inputs=[args.genome, *g.sources], error=ExportError)
    options = ExportOptions(force=args.force, verify="off" if args.no_verify else args.verify or "quick",
                            dtype=args.dtype, device=args.device, quant=args.quant,
                            max_shard_size=args.max_shard_size or None, copy_tokenizer=not args.no_copy_tokenizer)
    check_options(fmt, options)
    if args.no_verify and args.verify not in (None, "off"):
        raise ExportError(f"--no-verify and --verify {args.verify} contradict each other; give one of them")
    writer = fmt.load_for(g)
    writer.precheck(g, options)
    print(f"wrote {writer.write(g, out, options, Progress(on=True))}")


def cmd_import_mergekit(args: argparse.Namespace) -> None:
    from dfs_merge.errors import GenomeError
    from dfs_merge.export.mergekit import import_mergekit
    from dfs_merge.genome_files import save_genome
    from dfs_merge.outputs import check_output

    check_output(args.out, kind="file", force=args.force, inputs=[args.config], error=GenomeError)
    g = import_mergekit(args.config, repeats=args.repeats, scaling=args.scaling)
    save_genome(g, args.out)
    print(f"wrote {args.out}: {len(g.decode())} hops, {g.text()}")


def cmd_report(args: argparse.Namespace) -> None:
    from dfs_merge.errors import ReportError
    from dfs_merge.outputs import check_output
    from dfs_merge.report import report_inputs, write_report

    if args.out:
        check_output(args.out, kind="file", force=args.force, inputs=report_inputs(args.run_dir), error=ReportError)
    print(f"wrote {write_report(args.run_dir, args.out)}")


def cmd_zoo(args: argparse.Namespace) -> None:
    from dfs_merge.apps.zoo.family import main_zoo

    code = main_zoo(args.zoo_args)
    if code:
        raise SystemExit(code)


class CommandLineParser(argparse.ArgumentParser):
    """argparse, whose refusal of a command line (a bad flag value, a missing argument) is one line and exit code 2,
    as every other user error is: argparse's own prints the whole usage first; `--help` still shows it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = CommandLineParser(prog="dfs-merge", description="Evolve layer routes through existing language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    download_flag(p, main=True)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("show", help="print a genome's route or a recipe's weights (and draw it with --png)")
    s.add_argument("genome", type=bundled.example_path)
    s.add_argument("--png", help="also draw the route into this PNG file")
    s.add_argument("--force", action="store_true", help="replace an existing --png file")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("models", help="list packaged models, or fetch one (convert once into the cache)")
    s.add_argument("name", nargs="?")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("eval", help="score a genome, the base, or each source on the config's tasks")
    s.add_argument("config")
    s.add_argument("--genome", help="genome file (default: the base model unchanged)")
    s.add_argument("--split", choices=["dev", "test"], default="dev")
    s.add_argument("--sources-only", action="store_true", help="score each source alone")
    download_flag(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("baseline", help="score ShortGPT, angular-distance pruning and naive deepening of the base")
    s.add_argument("config")
    s.add_argument("--calibration", default=str(bundled.suites_dir() / "data/prose_ppl_dev.jsonl"),
                   help="JSONL with a 'text' field to measure layer similarity on (default: the bundled prose dev split)")
    s.add_argument("--sizes", type=layer_counts_arg, default=(2, 4, 6, 8), help="numbers of layers to remove, comma-separated")
    s.add_argument("--split", choices=["dev", "test"], default="test")
    download_flag(s)
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("evolve", help="run the evolutionary search of a config")
    s.add_argument("config")
    s.add_argument("--resume", action="store_true", help="continue the run in the config's out: folder")
    s.add_argument("--out", help="run directory (overrides the config's out:)")
    download_flag(s)
    s.set_defaults(func=cmd_evolve)

    s = sub.add_parser("demo", help="the committed merge of two SmolLM2 specialists exported and scored against "
                                    "its parents (what `make demo` runs); with CONFIG: evolve that config, export "
                                    "the winner and compare it with the base (genomes/demo.yaml: a self-merge)")
    s.add_argument("config", nargs="?", default=None, type=bundled.example_path)
    download_flag(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("study", help="a self-merge study: evolution (and its scaling ablation) against the pruning "
                       "heuristics, held-out table, Pareto plot, export of the best pruned member")
    s.add_argument("config", nargs="?", default="genomes/smollm2-self.yaml", type=bundled.example_path)
    s.add_argument("--sizes", type=layer_counts_arg, default=(2, 4, 6, 8),
                   help="numbers of layers the heuristics remove, comma-separated")
    s.add_argument("--prune-hops", type=int, default=26, help="export the best front member with at most this many hops")
    s.add_argument("--no-ablation", action="store_true", help="skip the scaling: none rerun")
    s.add_argument("--held-out", choices=("compared", "all"), default="compared",
                   help="front members scored held out besides the heuristics: those the comparisons take (default), "
                   "or all of them (the whole points table and plot; the held-out split is the largest, so slower)")
    download_flag(s)
    s.set_defaults(func=cmd_study)

    from dfs_merge.export.formats import FORMATS

    s = sub.add_parser("export", help="write a genome or recipe as a Hugging Face checkpoint, a GGUF file or a "
                       "mergekit config")
    s.add_argument("genome")
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=list(FORMATS), default="hf")
    s.add_argument("--quant", help="GGUF tensor type: f16 (default), q8_0, bf16 or f32")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--verify", choices=["quick", "full", "off"],
                   help="quick (default): every written tensor read back and compared with its source, then logits "
                        "on 2 prompts; full: also greedy generations; off: no check")
    s.add_argument("--no-verify", action="store_true", help="the same as --verify off")
    s.add_argument("--max-shard-size", help="the largest safetensors shard, e.g. 2GB (default), 500MB, 64KiB")
    s.add_argument("--no-copy-tokenizer", action="store_true", help="write no tokenizer files (nor chat template)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the checkpoint is written in (default: the genome's out_dtype, else its dtype, "
                        "else the sources' own; a GGUF export loads its sources in it, default float32)")
    s.set_defaults(func=cmd_export)

    from dfs_merge.merging.methods import METHODS

    s = sub.add_parser("import-mergekit", help="turn a mergekit config into a genome (passthrough) or a recipe "
                                                f"({', '.join(METHODS)})")
    s.add_argument("config")
    s.add_argument("--out", required=True)
    s.add_argument("--repeats", type=int)
    s.add_argument("--scaling", choices=["slot", "transition", "none"], default="slot")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    download_flag(s)
    s.set_defaults(func=cmd_import_mergekit)

    s = sub.add_parser("report", help="write a run folder as one self-contained HTML page (plots, routes, every "
                                      "evaluation); a running run rewrites its own at each checkpoint")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the config's out:)")
    s.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html, which is always replaced)")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("zoo", help="the small two-language model family of the cross-skill experiment (train, table, ...)")
    s.add_argument("zoo_args", nargs=argparse.REMAINDER, help="train | suites | check | verify | merge | table ...")
    s.set_defaults(func=cmd_zoo)
    return p


DASH_VALUE_FLAGS = ("--max-shard-size",)
"""Flags whose value a user may begin with a dash (`--max-shard-size -5GB`)."""


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """`--max-shard-size -5GB` as `--max-shard-size=-5GB`: argparse takes a value that begins with a dash (and is
    not a plain negative number) for another flag and says only "expected one argument"; joined, the value
    reaches the command, which says in one line what is wrong with it. Only a value that looks like a negative
    number is joined: a flag after it (`--max-shard-size --force`) stays argparse's to refuse."""
    out = list(argv)
    for i in range(len(out) - 2, -1, -1):
        if out[i] in DASH_VALUE_FLAGS and out[i + 1][:1] == "-" and out[i + 1][1:2] in set("0123456789.+"):
            out[i:i + 2] = [f"{out[i]}={out[i + 1]}"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; a user error gives one line on stderr and exit code 2."""
    args = build_parser().parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.allow_download:
        from dfs_merge.models.hub import allow_downloads

        allow_downloads()
    try:
        args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then a BrokenPipeError this handler sees
    except DfsMergeError as err:
        print(f"dfs-merge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfs-merge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    return 0


SIGPIPE_EXIT = 141
"""Exit code when the reader of stdout went away (`dfs-merge show G | head -1`): 128 + SIGPIPE, what a shell
reports for a command that SIGPIPE ended, so `set -o pipefail` still sees that the output was cut short."""


def _stdout_closed() -> int:
    """The reader of stdout has gone: as the Python docs advise, point stdout at devnull so that the flush at
    exit does not raise again, and exit quietly with `SIGPIPE_EXIT`."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (a test's StringIO): nothing will flush it at exit
        pass
    return SIGPIPE_EXIT


def run() -> None:
    """The `dfs-merge` command: `main`, then exit without the interpreter's last garbage collection.

    At exit Python collects every object the command left (models, modules, lm-eval's tasks): 0.6-2.5 s after an
    export on 2 cores, a tenth of it and more than the export's own verification. `gc.freeze()` leaves them to the
    end of the process; `atexit` handlers (log flushing, temporary folders) still run. Only the command does this:
    `main` called in a process that goes on (tests, other programs) collects as usual."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
