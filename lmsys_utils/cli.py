"""Command line: python -m lmsys_utils {demo,check-data,...}. Errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys


def cmd_check_data(args) -> int:
    from .data import load_arena

    _, summary = load_arena(args.path, drop_invalid=args.drop_invalid)
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
                  device_kind=args.device, rules=args.rules, memory_target=args.memory_target,
                  force=args.force)
    print(f"wrote {args.out}: {len(sub)} rows")
    return 0


def cmd_train(args) -> int:
    import dataclasses
    import json

    from .config import Config
    from .train import train

    _quiet_libraries()
    config = Config.load(args.config) if args.config else Config()
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in {f.name for f in dataclasses.fields(Config)}:
            raise ValueError(f"{item!r}: use FIELD=VALUE with a Config field, e.g. max_steps=100")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value  # a bare string such as a path
    history = train(dataclasses.replace(config, **changes))
    last = history["eval"][-1] if history["eval"] else None
    print(f"trained {history['total_steps']} steps" + (f"; valid log loss {last['log_loss']:.4f}" if last else ""))
    return 0


def cmd_preflight(args) -> int:
    from .auth import preflight
    from .device import detect, memory_target
    from .memory import format_plan, plan_memory

    print(preflight(args.model))
    plan = plan_memory(args.model, args.target or memory_target(detect()), quantization=args.quantization,
                       training=args.train, batch_size=args.batch_size, max_length=args.max_length)
    print(format_plan(plan))
    return 0


def cmd_eda(args) -> int:
    from pathlib import Path

    from .data import load_arena
    from .demo import make_demo_data
    from .plots import save_eda_figures, token_lengths

    if args.data:
        df, summary = load_arena(args.data)
        print(summary)
    else:
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
    from .bundle import KAGGLE_MISSING, build_bundle, install_line

    packages = [] if args.no_packages else (args.package or list(KAGGLE_MISSING))
    try:
        out = build_bundle(args.out, packages=packages, kaggle_user=args.kaggle_user, slug=args.slug)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"upload it as the Kaggle dataset {args.kaggle_user}/{args.slug}; the notebook installs with:\n"
          f"  {install_line(args.slug, packages)}")
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
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (default: 16384)")
    p.add_argument("--quantization", choices=["8bit", "4bit"], help="bitsandbytes weights (GPU)")
    p.add_argument("--device", choices=["cuda", "xla", "cpu"], help="default: detected")
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
                                   "what to do when the model cannot be used.")
    p.add_argument("--model", required=True, help="hub id or local folder, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    p.add_argument("--target", help="device for the memory plan: tpu-v3-8, tpu-v5e-8, t4, 2xt4, gpu:NN, cpu "
                                    "(default: this machine)")
    p.add_argument("--train", action="store_true", help="plan for training (LoRA, AdamW) instead of prediction")
    p.add_argument("--quantization", choices=["8bit", "4bit"], help="plan for bitsandbytes weights")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch in the plan (default 8)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row in the plan (default 1024)")
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
    p.set_defaults(func=cmd_bundle)
    return parser


def main(argv=None) -> int:
    _quiet_import_noise()
    args = build_parser().parse_args(argv)
    from .auth import AccessError
    from .memory import DoesNotFitError

    try:
        return args.func(args)
    # errors a user can cause (bad file, no access, a setup that cannot fit) carry their own fix: no traceback
    except (ValueError, FileNotFoundError, AccessError, DoesNotFitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
