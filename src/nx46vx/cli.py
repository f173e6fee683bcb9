"""Command line: a thin layer over the Python API.

``nx46vx run | demo | verify | score | inspect | wheelhouse | export-nnunet``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Sequence

from .errors import Nx46Error


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    result = run(args.input or None, output=args.output, profile=args.profile, config_file=args.config, overrides=args.set or None, resume=args.resume)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .runner import run
    from .synthetic import make_competition

    work = Path(args.output)
    data = work / "demo-data"
    if not (data / "test.csv").is_file():
        print(f"generating synthetic competition data in {data} …", flush=True)
        make_competition(data, seed=args.seed)
    result = run([data], output=work / "output", profile="demo", overrides=args.set or None, resume=args.resume)
    from .metric import score_volume
    from .volumes import read_volume
    import io
    import zipfile

    import tifffile

    scores = {}
    with zipfile.ZipFile(result.submission) as archive:
        for name in archive.namelist():
            pred = tifffile.imread(io.BytesIO(archive.read(name)))
            scores[name[:-4]] = score_volume(pred, read_volume(data / "test_labels" / name)).score
    print(f"status        : {result.status}")
    print(f"segmenter     : {result.segmenter}  (validation scores {result.validation_scores})")
    print(f"test score    : {sum(scores.values()) / len(scores):.4f} (synthetic hidden truth)")
    print(f"submission    : {result.submission}")
    print(f"journal       : {result.journal}  (check it: nx46vx verify {result.journal})")
    print(f"reports       : {result.output_dir / 'postmortem.json'}, {result.output_dir / 'RUN_PROFILE_SUMMARY.json'}")
    print(f"results bundle: {result.output_dir / 'results.zip'}")
    print(f"wall time     : {result.wall_s:.1f} s")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .journal import verify

    report = verify(args.file, previous=args.previous)
    print(report.message(args.file))
    return 0 if report.ok else 1


def _cmd_score(args: argparse.Namespace) -> int:
    from .scoring import score_submission

    print(json.dumps(score_submission(args.truth, args.pred), indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import check_integrity, read_manifest

    manifest = read_manifest(args.checkpoint)
    print(json.dumps(manifest, indent=2))
    check_integrity(args.checkpoint)
    print(f"OK {args.checkpoint}: {len(manifest['sha512'])} payload files match their SHA-512")
    return 0


def _cmd_wheelhouse(args: argparse.Namespace) -> int:
    from .wheelhouse import build_wheelhouse

    wheels = build_wheelhouse(args.folder, include_all=args.all)
    for wheel in wheels:
        print(wheel)
    print(f"{len(wheels)} wheels in {args.folder}: upload the folder as a Kaggle dataset, then in the notebook\n"
          f"  pip install --no-index --find-links /kaggle/input/<dataset> nx46vx")
    return 0


def _cmd_export_nnunet(args: argparse.Namespace) -> int:
    from .predict import export_nnunet

    folder = export_nnunet(args.model, args.folder)
    print(f"nnU-Net v2 model folder {folder}: nnUNetv2_predict_from_modelfolder -i IN -o OUT -m {folder} -f all")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nx46vx", description="Vesuvius surface detection with resumable training and a verifiable journal.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--debug", action="store_true", help="on an error, also print its traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline on competition-layout data")
    p.add_argument("--input", action="append", metavar="DIR", help="input root (repeatable; default: every folder under /kaggle/input)")
    p.add_argument("--output", metavar="DIR", default=None, help="output folder (default /kaggle/working on Kaggle, ./nx46vx-output elsewhere)")
    p.add_argument("--profile", default=None, help="config profile: default, demo, kaggle-train, kaggle-submit")
    p.add_argument("--config", metavar="FILE", default=None, help="TOML file with overrides")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH", help="resume policy (default auto)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="generate synthetic data and run the whole pipeline on it")
    p.add_argument("--output", metavar="DIR", default=str(Path(tempfile.gettempdir()) / "nx46vx-demo"), help="work folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", default="auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("verify", help="verify a journal's hash chain and Merkle roots")
    p.add_argument("file")
    p.add_argument("--previous", metavar="FILE", default=None, help="journal of the run this one resumed")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("score", help="score a submission.zip against label TIFFs with the competition metric")
    p.add_argument("--truth", required=True, metavar="DIR", help="folder of <id>.tif labels (or a folder holding train_labels/ or test_labels/)")
    p.add_argument("--pred", required=True, metavar="SUBMISSION.zip")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("wheelhouse", help="pack nx46vx and the dependencies Kaggle lacks into a folder of wheels for offline install")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--all", action="store_true", help="pack the whole requirement closure (torch included: several GB)")
    p.set_defaults(func=_cmd_wheelhouse)

    p = sub.add_parser("export-nnunet", help="write a run's student as an nnU-Net v2 model folder (plans.json, dataset.json, fold_all)")
    p.add_argument("model", metavar="OUTPUT_OR_CKPT", help="a run's output folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("folder", metavar="DIR", help="the model folder to write (an earlier export there is replaced; any other non-empty folder is refused)")
    p.set_defaults(func=_cmd_export_nnunet)

    p = sub.add_parser("inspect", help="print and verify a checkpoint manifest")
    p.add_argument("checkpoint", metavar="CKPT")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("nx46vx").setLevel(logging.INFO)  # the runner's concise progress lines, also in a redirected log
    try:
        return int(args.func(args))
    except Nx46Error as exc:
        if args.debug:
            traceback.print_exc()
        print(f"nx46vx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
