"""Command line: python -m lmsys_utils {demo,check-data,...}. Errors are one line and a non-zero exit.

Each command imports what it uses inside its function, so `--help` and `check-data` start without torch.
"""

from __future__ import annotations

import argparse
import errno
import sys

from .config import DEVICES, QUANTIZATIONS


def cmd_check_data(args) -> int:
    from .data import load_arena

    labels = {"train": True, "predict": False}.get(args.use)
    _, summary = load_arena(args.path, drop_invalid=args.drop_invalid, labels=labels)
    print(summary)
    return 0


# Log lines libraries write on import that say nothing where they appear (logger name: message start). torch_xla,
# imported by transformers and peft whenever installed, picks the CPU when it finds no TPU (it says so too, in
# another line, when it picks a TPU); bitsandbytes falls back to its own CPU kernel without the `kernels` package.
IMPORT_NOISE = {
    "root": "Defaulting to PJRT_DEVICE=CPU",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


def _not_import_noise(record) -> bool:
    return not record.getMessage().startswith(IMPORT_NOISE.get(record.name, "\0"))


def _quiet_import_noise() -> None:
    """Drop exactly the IMPORT_NOISE lines; every other warning still shows. Call before any library import."""
    import logging

    for name in IMPORT_NOISE:
        logging.getLogger(None if name == "root" else name).addFilter(_not_import_noise)  # once: a set


def _quiet_libraries() -> None:
    """Keep the output to our own progress: no per-file weight-loading bars or deprecation notes of libraries."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def cmd_demo(args) -> int:
    from .demo import run_demo

    _quiet_libraries()
    run_demo(args.out, data=args.data, max_steps=args.max_steps)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    _quiet_libraries()
    sub = predict(args.data, args.model, adapter=args.adapter, out=args.out, tta=args.tta,
                  max_length=args.max_length, max_tokens=args.max_tokens, quantization=args.quantization,
                  device=args.device, rules=args.rules, memory_target=args.memory_target, force=args.force)
    print(f"wrote {args.out}: {len(sub)} rows")
    return 0


def cmd_train(args) -> int:
    from .config import Config

    # settings are checked before torch and the model load: a typo costs a second, not a session
    config = Config.from_overrides(args.config, args.set)
    from .train import train

    _quiet_libraries()
    history = train(config)
    last = history["eval"][-1] if history["eval"] else None
    print(f"trained {history['total_steps']} steps" + (f"; valid log loss {last['log_loss']:.4f}" if last else ""))
    return 0


def cmd_preflight(args) -> int:
    from .auth import preflight
    from .config import Config
    from .device import detect, memory_target
    from .memory import PEAK_TFLOPS, format_plan, format_time_plan, plan_memory, time_plan_from_config

    print(preflight(args.model))
    kind = None if args.target else detect()
    target = args.target or memory_target(kind)
    plan = plan_memory(args.model, target, quantization=args.quantization, training=args.train,
                       batch_size=args.batch_size, max_length=args.max_length)
    print(format_plan(plan))
    peak = args.peak_tflops
    if peak is None and kind == "cuda" and target not in PEAK_TFLOPS:
        import torch

        peak = torch.cuda.get_device_name(0)
    if peak is None and target not in PEAK_TFLOPS:
        print(f"no time plan: the peak FLOP/s of {target} is unknown; pass --peak-tflops (a number or a GPU name)")
        return 0
    lengths = None
    if args.data:
        lengths = _sample_lengths(args.data, args.model, args.max_length)
    # the run's other settings are Config's defaults (split, grad_accum, evaluation, LoRA)
    config = Config(model=args.model, max_length=args.max_length, batch_size=args.batch_size,
                    quantization=args.quantization, epochs=args.epochs, tta=args.tta,
                    predict_batch_tokens=args.batch_size * args.max_length)
    rows = args.rows or (TRAIN_ROWS if args.train else TEST_ROWS)
    print(format_time_plan(time_plan_from_config(config, target, args.train, rows, lengths, args.mean_tokens,
                                                 args.padding, placement=plan.placement, peak_tflops=peak)))
    return 0


TRAIN_ROWS = 57_477
"""Rows of the competition's train.csv."""
TEST_ROWS = 25_000
"""About the rows of the hidden test.csv a submission predicts."""


def _sample_lengths(path, model, max_length: int, n: int = 2000):
    """Encoded length of up to n rows of a CSV (seeded sample), with the model's tokenizer, as training encodes."""
    from .data import load_arena
    from .model import load_tokenizer
    from .text import encode_rows

    df, summary = load_arena(path, drop_invalid=True)
    sample = df.sample(min(n, len(df)), random_state=0)
    lengths = [len(ids) for ids in encode_rows(load_tokenizer(model), sample, max_length)]
    print(f"token lengths of {len(sample):,} of the {len(df):,} readable rows of {path} "
          f"(mean {sum(lengths) / len(lengths):.0f} at max_length {max_length})")
    return lengths


def cmd_eda(args) -> int:
    from pathlib import Path

    from .data import load_arena
    from .files import check_writable
    from .plots import save_eda_figures, token_lengths

    check_writable(args.out)  # before the data and the tokenizer load
    if args.data:
        df, summary = load_arena(args.data)
        print(summary)
    else:
        from .synthetic import make_demo_data

        df = make_demo_data()
        print("no --data given: using the project's synthetic demo data")
    lengths = None
    if args.tokenizer:
        from .model import load_tokenizer

        lengths = token_lengths(load_tokenizer(args.tokenizer), df)
    paths = save_eda_figures(df, Path(args.out), lengths=lengths, max_lengths=args.max_length,
                             top_n=args.top_n, tokenizer_name=Path(args.tokenizer or "").name)
    print(f"wrote {len(paths)} figures to {args.out}: {', '.join(p.name for p in paths.values())}")
    return 0


def cmd_bundle(args) -> int:
    from .kaggle import KAGGLE_MISSING, build_bundle

    packages = [] if args.no_packages else (args.package or list(KAGGLE_MISSING))
    try:
        bundle = build_bundle(args.out, packages=packages, kaggle_user=args.kaggle_user, slug=args.slug,
                              image_freeze=args.image_freeze, python_version=args.python_version,
                              platform=args.platform, target_python=args.target_python)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {bundle.path}: {', '.join(sorted(p.name for p in bundle.path.iterdir()))}")
    if bundle.offline_check:
        print(f"offline dry run for the image: {bundle.offline_check}")
    print(f"upload it as the Kaggle dataset {bundle.dataset_id}; the notebook installs with:\n"
          f"  {bundle.install_line}")
    return 0


def cmd_kaggle_meta(args) -> int:
    from .kaggle import write_kaggle_meta

    try:
        written = write_kaggle_meta(args.user, args.out, notebooks_dir=args.notebooks, bundle_slug=args.bundle_slug,
                                    adapter_slug=args.adapter_slug, model=args.model, force=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, folder in written.items():
        print(f"wrote {folder}/")
    print(f"next: python -m lmsys_utils bundle --out {written['bundle']} --kaggle-user {args.user} "
          f"--slug {args.bundle_slug}; then the kaggle commands in the README (Kaggle from the command line)")
    return 0


def cmd_extra_data(args) -> int:
    import datasets

    from .extra import write_extra

    datasets.disable_progress_bars()
    report = write_extra(args.source, args.out, exclude=args.exclude)
    print(report)
    print(f"wrote {args.out}: {report.rows_kept} rows")
    return 0


def cmd_folds(args) -> int:
    from pathlib import Path

    import pandas as pd

    from .data import CLASS_NAMES, load_arena, make_folds

    if Path(args.out).exists() and Path(args.out).samefile(args.path):
        raise ValueError(f"{args.out}: --out is the input file; choose another path")
    df, summary = load_arena(args.path)
    folds = make_folds(df, k=args.folds, seed=args.seed)
    for fold, rows in df.groupby(folds.to_numpy()):
        shares = rows["label"].value_counts(normalize=True) if "label" in rows else pd.Series(dtype=float)
        balance = ", ".join(f"{name} {shares.get(k, 0):.1%}" for k, name in enumerate(CLASS_NAMES))
        print(f"fold {fold}: {len(rows)} rows ({balance})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": df["id"], "fold": folds}).to_csv(args.out, index=False)
    print(f"wrote {args.out}: id,fold for {len(df)} rows of {summary.rows_read}")
    return 0


def cmd_blend(args) -> int:
    from .blend import apply_blend_files, blend_files

    if args.apply:
        sub = apply_blend_files(args.apply, args.preds, args.out, data=args.data)
        print(f"wrote {args.out}: {len(sub)} rows")
    else:
        blend_files(args.labels, args.preds, args.out, folds=args.folds, seed=args.seed)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmsys_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-data", help="validate a competition-format CSV and print what it holds",
                       description="Read a train.csv/test.csv the way training does and print a summary: rows "
                                   "kept and dropped, labels, multi-turn rows, null turns, repairs. "
                                   "Exits 1 on invalid input, naming file, row, id and column.")
    p.add_argument("path", help="the CSV to check, e.g. /kaggle/input/lmsys-chatbot-arena/train.csv")
    p.add_argument("--drop-invalid", action="store_true", help="drop invalid rows and report their ids")
    p.add_argument("--for", dest="use", choices=["train", "predict"],
                   help="check as training reads it (labels required) or as predict reads it (labels ignored); "
                        "default: labels checked when present")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("demo", help="the main job on the project's own synthetic data (no download)",
                       description="Make synthetic battles in the competition format (or use --data), draw the "
                                   "EDA figures, train the tiny model on the CPU with the step-level bar, evaluate "
                                   "on a held-out split against the uniform guess and the class prior, and write a "
                                   "checked submission.csv, metrics.json and the figures under --out.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data", help="use this competition-format train CSV instead of the demo data")
    p.add_argument("--max-steps", type=int, help="stop training after this many steps (default: three epochs)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="predict a test CSV and write a checked submission",
                       description="Load a base model (+ LoRA adapter), predict with length-sorted batches "
                                   "(one model copy per GPU) and write id,winner_model_a,winner_model_b,winner_tie. "
                                   "The HF token, when needed, comes from HF_TOKEN or a stored login.")
    p.add_argument("--data", required=True, help="competition-format test CSV")
    p.add_argument("--model", required=True, help="hub id or local directory of the base (or merged) model")
    p.add_argument("--adapter", help="LoRA adapter directory written by training")
    p.add_argument("--out", default="submission.csv", help="submission path (default: submission.csv)")
    p.add_argument("--tta", action="store_true", help="average with the A/B-swapped prediction (2x time)")
    p.add_argument("--max-length", type=int,
                   help="override the max_length saved with the adapter (default: the adapter's; printed when changed)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (default: 16384)")
    p.add_argument("--quantization", choices=QUANTIZATIONS[1:], help="bitsandbytes weights (GPU)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: auto (detected)")
    p.add_argument("--rules", action="store_true", help="identical/empty-response rules (measure them first)")
    p.add_argument("--memory-target", help="device the memory plan checks (default: this machine), e.g. 2xt4")
    p.add_argument("--force", action="store_true", help="predict even if the memory plan says it does not fit")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("train", help="fine-tune a model with LoRA (TPU, GPU or CPU) and save the adapter",
                       description="Train with the settings of lmsys_utils.config.Config: load the CSV, split, "
                                   "tokenize, LoRA, fit with step-level progress and checkpoints, save the adapter "
                                   "and history.json to output_dir. The HF token comes from HF_TOKEN or a login.")
    p.add_argument("--config", help="a Config JSON (Config.save writes one); default: the Kaggle TPU defaults")
    p.add_argument("set", nargs="*", metavar="FIELD=VALUE",
                   help="override Config fields, e.g. train_path=train.csv model=/path max_steps=100 resume=true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preflight", help="check that a model can be loaded (token, access, files) before downloading",
                       description="For a hub id: find the token (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the Kaggle "
                                   "secret HF_TOKEN, the stored login) and check access without downloading. "
                                   "For a local folder: check config.json, tokenizer and weights. Exits 1 with "
                                   "what to do when the model cannot be used. Then print the memory plan and a "
                                   "wall-time estimate against Kaggle's 9-hour limit.")
    p.add_argument("--model", required=True, help="hub id or local folder, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    p.add_argument("--target", help="device for the memory plan: tpu-v3-8, tpu-v5e-8, t4, 2xt4, gpu:NN, cpu "
                                    "(default: this machine)")
    p.add_argument("--train", action="store_true", help="plan for training (LoRA, AdamW) instead of prediction")
    p.add_argument("--quantization", choices=QUANTIZATIONS[1:], help="plan for bitsandbytes weights")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch in the plan (default 8)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row in the plan (default 1024)")
    p.add_argument("--rows", type=int, help=f"rows of the time plan (default: {TRAIN_ROWS:,} train.csv rows with "
                                            f"--train, else {TEST_ROWS:,} test rows)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of the time plan (default 1)")
    p.add_argument("--tta", action="store_true", help="time plan: predict with A/B-swap TTA (2x time)")
    p.add_argument("--padding", choices=["fixed", "sorted", "longest"],
                   help="time plan: how rows are padded (default: fixed when training on TPU, longest when "
                        "training on GPU, sorted when predicting)")
    p.add_argument("--data", help="time plan: a competition-format CSV to measure token lengths on (2,000 rows)")
    p.add_argument("--mean-tokens", type=float, help="time plan: mean real tokens per row (instead of --data)")
    p.add_argument("--peak-tflops", help="time plan: peak TFLOP/s per device, or a GPU name (a100, l4, ...), "
                                         "for gpu:NN and cpu targets")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("eda", help="write the exploratory figures of a training CSV as PNGs",
                       description="Label balance, win/tie rate per model, response length by outcome, "
                                   "verbosity and position bias, turns, duplicate prompts and (with --tokenizer) "
                                   "how many rows each max_length truncates. One PNG per figure.")
    p.add_argument("--data", help="competition-format train CSV (default: the synthetic demo data)")
    p.add_argument("--out", default="runs/eda", help="folder for the PNGs (default: runs/eda)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id to count tokens with (optional)")
    p.add_argument("--max-length", type=int, nargs="+", default=[512, 1024, 2048],
                   help="candidate max_length values to mark on the token-length figure (default: 512 1024 2048)")
    p.add_argument("--top-n", type=int, default=15, help="models shown in the per-model figures (default: 15)")
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser("bundle", help="make a folder of wheels to upload as a Kaggle dataset (offline install)",
                       description="Build this project's wheel and download wheels of the packages the Kaggle "
                                   "image lacks (pinned as in requirements.txt), plus dataset-metadata.json and "
                                   "INSTALL.txt with the pip line the inference notebook runs with internet off. "
                                   "Needs PyPI access and a clone of the project.")
    p.add_argument("--out", default="runs/bundle", help="output folder (default: runs/bundle)")
    p.add_argument("--kaggle-user", default="USERNAME", help="your Kaggle user name, for the dataset id")
    p.add_argument("--slug", default="lmsys-utils-wheels",
                   help="dataset slug; the notebook finds it at /kaggle/input/SLUG (default: lmsys-utils-wheels)")
    p.add_argument("--package", action="append",
                   help="a package to bundle (repeatable; default: bitsandbytes and peft)")
    p.add_argument("--no-packages", action="store_true", help="bundle only this project's wheel")
    p.add_argument("--image-freeze", metavar="FILE",
                   help="`pip list --format=freeze` of the target Kaggle image (lmsys_utils.kaggle.image_freeze() "
                        "prints one): bundle only what the image lacks, at versions that fit it, for its Python and "
                        "platform, and prove the install line resolves offline")
    p.add_argument("--python-version", help="the image's Python, e.g. 3.12 (default: the freeze's '# python:' line)")
    p.add_argument("--platform", help="the image's platform tag (default: the freeze's '# platform:' line, else "
                                      "manylinux_2_35_x86_64)")
    p.add_argument("--target-python", metavar="PATH",
                   help="an interpreter of the image's Python version for pip to run in, so that environment "
                        "markers are evaluated for it (default: pythonX.Y on PATH when there is one)")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("extra-data", help="convert a public Arena preference set into extra training rows",
                       description="Read a hub dataset (lmarena-ai/arena-human-preference-55k, -100k, -140k, "
                                   "lmsys/chatbot_arena_conversations) or a local parquet/jsonl/csv file with "
                                   "datasets, map conversations and winners to the competition's columns, drop "
                                   "non-text parts, rows without text and duplicates (within the source and of "
                                   "every --exclude file, A/B-swapped copies included), print the counts and write "
                                   "a CSV that check-data accepts. Ids are extra-<content hash>.")
    p.add_argument("source", help="hub dataset id or local .parquet/.jsonl/.csv file")
    p.add_argument("--out", required=True, help="output CSV (competition format)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="FILE",
                   help="competition-format CSVs whose battles are dropped, e.g. train.csv test.csv")
    p.set_defaults(func=cmd_extra_data)

    p = sub.add_parser("folds", help="write a K-fold split (grouped by prompt, stratified by label) as id,fold",
                       description="Deterministic folds: the same prompt is never in two folds and each fold's "
                                   "label shares follow the whole file's. Prints rows and label shares per fold.")
    p.add_argument("path", help="competition-format train CSV")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the split (default: 42)")
    p.add_argument("--out", default="folds.csv", help="output CSV of id,fold (default: folds.csv)")
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("blend", help="fit or apply a blend (weights on log-probabilities + temperature)",
                       description="Fit: --labels LABELED.csv --preds A.csv B.csv --out blend.json fits non-negative "
                                   "weights on the models' log-probabilities and one temperature by log loss and "
                                   "prints each input's, the blend's and the calibrated blend's cross-validated log "
                                   "loss (one file: temperature scaling alone). Apply: --apply blend.json --preds "
                                   "A_test.csv B_test.csv --out submission.csv writes a checked submission.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--labels", help="labeled CSV (train.csv, or id + winner_* columns) to fit on")
    mode.add_argument("--apply", metavar="BLEND_JSON", help="a blend.json written by a fit")
    p.add_argument("--preds", nargs="+", required=True, help="submission-format prediction files, one per model")
    p.add_argument("--out", required=True, help="blend.json (fit) or submission.csv (apply)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the fit (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds (default: 0)")
    p.add_argument("--data", help="with --apply: the test CSV whose ids the submission must hold exactly")
    p.set_defaults(func=cmd_blend)

    p = sub.add_parser("kaggle-meta", help="write Kaggle metadata for the three notebooks and the two datasets",
                       description="Write, under --out, one folder per notebook (kernel-metadata.json and a copy of "
                                   "the notebook whose inputs point at the attached sources) for `kaggle kernels "
                                   "push -p`, and the dataset-metadata.json of the wheel bundle and of the adapter "
                                   "for `kaggle datasets create -p`. Run it in a clone of the project.")
    p.add_argument("--user", required=True, help="your Kaggle user name (kaggle.com/NAME)")
    p.add_argument("--out", default="kaggle", help="output folder (default: kaggle)")
    p.add_argument("--bundle-slug", default="lmsys-utils-wheels", help="slug of the wheel dataset")
    p.add_argument("--adapter-slug", default="lmsys-llama3-lora", help="slug of the adapter dataset")
    p.add_argument("--model", default="metaresearch/llama-3/transformers/8b-chat-hf/1",
                   help="Kaggle Models source of the base model (owner/model/framework/variation/version)")
    p.add_argument("--notebooks", help="the project's notebooks/ folder (default: the checkout's)")
    p.add_argument("--force", action="store_true", help="replace files that differ from what would be written")
    p.set_defaults(func=cmd_kaggle_meta)
    return parser


def main(argv=None) -> int:
    _quiet_import_noise()
    try:
        return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt as e:  # training says where it stopped and how to resume (train.TrainingInterrupted)
        print(f"error: {str(e) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


def _run(args) -> int:
    from .auth import AccessError

    try:
        return args.func(args)
    # errors a user can cause (bad file, no access, a setup that cannot fit) carry their own fix: no traceback
    except (ValueError, AccessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {describe_os_error(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 1


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "no permission: choose a location you may write, or fix the permissions",
    errno.EPERM: "not permitted: choose a location you may write, or fix the permissions",
    errno.EROFS: "a read-only file system: write to a writable folder (on Kaggle: under /kaggle/working)",
    errno.EISDIR: "a folder where a file is needed: give a file path",
    errno.ENOTDIR: "a file where a folder is needed in the path",
    errno.EIO: "the storage failed (I/O error): retry, or use other storage",
    errno.ENOENT: "check the path",
}


def describe_os_error(e: OSError, fallback_path=None) -> str:
    """One line for an OSError: the path, what the system said, and what to do."""
    what = e.strerror or str(e) or type(e).__name__
    line = what + (f" ({_OS_HINTS[e.errno]})" if e.errno in _OS_HINTS else "")
    if e.filename is not None:
        return f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "") + f": {line}"
    if fallback_path is not None:  # a failed write (ENOSPC) often names no file: name the output it was for
        return f"while writing {fallback_path}: {line}"
    return line
