"""``python -m trainer lora {inspect,resize,extract,merge,merge-loras,svd-merge} ...``: the LoRA tools on the
command line.

Each sub-command calls one function of :mod:`trainer.tools` and prints its report
(``--json`` for machine-readable output). Exit codes: 0 done (inspect: every key
matches the ``--base`` model), 1 the tool refused or failed (message on stderr),
2 bad arguments (argparse). Nothing heavy is imported until a command runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from trainer.tools.requests import (
    ExtractRequest, InspectRequest, MergeLorasRequest, MergeRequest, ResizeRequest, SvdMergeRequest, WritesFile,
    cli_flags, request_infos, value_type,
)

EXIT_OK = 0
EXIT_FAILED = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``lora`` and its sub-commands to the main parser's subparsers."""
    lora = subparsers.add_parser("lora", help="LoRA tools: inspect/verify, resize, extract, merge into a checkpoint, "
                                              "merge LoRAs into one (added or by SVD)")
    tools = lora.add_subparsers(dest="lora_command", required=True)
    _inspect_parser(tools)
    _resize_parser(tools)
    _extract_parser(tools)
    _merge_parser(tools)
    _merge_loras_parser(tools)
    _svd_merge_parser(tools)
    return lora


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if output:
        _options(p, WritesFile, "overwrite")


def _options(p: argparse.ArgumentParser, request, *names: str) -> None:
    """argparse options from a request model's declaration: flag, type, default, choices and help."""
    infos = request_infos(request)
    for name in names:
        info, flags = infos[name], cli_flags(infos[name])
        if not flags[0].startswith("-"):
            p.add_argument(name, help=info.help)
        elif info.type is bool:  # a flag; one that is on by default also gets its --no- form
            action = argparse.BooleanOptionalAction if info.default else "store_true"
            p.add_argument(*flags, dest=name, action=action, default=info.default, help=info.help)
        elif info.required:
            p.add_argument(*flags, dest=name, type=value_type(info), required=True, help=info.help)
        else:
            shown = f" (default {info.default})" if info.default not in (None, "") else ""
            metavar = None if info.choices else flags[-1].lstrip("-").replace("-", "_").upper()
            p.add_argument(*flags, dest=name, type=value_type(info), default=info.default, choices=info.choices,
                           metavar=metavar, help=info.help + shown)


def _inspect_parser(tools) -> None:
    p = tools.add_parser("inspect", help="modules, ranks, alphas, norms and training settings of a LoRA file; "
                                         "with --base, check every key against a base model")
    _options(p, InspectRequest, "file", "base")
    p.add_argument("--modules", action="store_true", help="list every module")
    _common(p, output=False)


def _resize_parser(tools) -> None:
    p = tools.add_parser("resize", help="lower a LoRA's rank by SVD, keeping its effective scale")
    _options(p, ResizeRequest, "file", "rank", "conv_rank", "method", "param", "out", "precision")
    p.add_argument("--device", help="compute device, e.g. cuda (default: cpu)")
    p.add_argument("--modules", action="store_true", help="list every module's new rank and error")
    _common(p)


def _extract_parser(tools) -> None:
    p = tools.add_parser("extract", help="extract a LoRA from a fine-tuned model minus its base model")
    _options(p, ExtractRequest, "base", "tuned", "out", "rank", "conv_rank", "clamp")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp (exact SVD factors)")
    _options(p, ExtractRequest, "min_diff", "precision", "load_precision")
    p.add_argument("--device", help="compute device for the SVDs, e.g. cuda")
    p.add_argument("--modules", action="store_true", help="list every module's error")
    _common(p)


def _merge_parser(tools) -> None:
    p = tools.add_parser("merge", help="merge LoRAs into a base model and save a single-file checkpoint")
    _options(p, MergeRequest, "base")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]",
                   help=f"LoRA to merge, with its ratio (default {_default_ratio()}); repeat for several")
    _options(p, MergeRequest, "out", "half", "allow_unmatched")
    p.add_argument("--v-parameterization", action="store_true", default=None,
                   help="mark the checkpoint as v-prediction (SD2 768-v); default: what the base says")
    _common(p)


def _merge_loras_parser(tools) -> None:
    p = tools.add_parser("merge-loras", help="merge LoRAs into one LoRA as sd-scripts' merge_lora.py does: each "
                                             "file's factors times its ratio, added (same ranks) or concatenated")
    _lora_list(p, MergeLorasRequest)
    _options(p, MergeLorasRequest, "out", "concat", "precision", "save_precision")
    _common(p)


def _svd_merge_parser(tools) -> None:
    p = tools.add_parser("svd-merge", help="merge LoRAs into one LoRA of a chosen rank: the ratio-weighted sum of "
                                           "their weight changes, decomposed by SVD (sd-scripts' svd_merge_lora.py)")
    _lora_list(p, SvdMergeRequest)
    _options(p, SvdMergeRequest, "out", "rank", "conv_rank", "clamp")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp (exact SVD factors)")
    _options(p, SvdMergeRequest, "save_precision")
    p.add_argument("--device", help="compute device, e.g. cuda (default: cpu)")
    p.add_argument("--modules", action="store_true", help="list every module's rank and error")
    _common(p)


def _lora_list(p: argparse.ArgumentParser, request) -> None:
    ratio = request_infos(request)["ratio"]
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]",
                   help=f"LoRA to merge, with its ratio (default {ratio.default}; {ratio.help}); repeat for several")


def lora_with_ratio(spec: str, request=MergeRequest) -> tuple[str, float]:
    """``file.safetensors:0.8`` -> (file, 0.8); a bare path (Windows drive letters included) has the request
    model's default ratio."""
    path, sep, ratio = spec.rpartition(":")
    if sep:
        try:
            return path, float(ratio)
        except ValueError:
            pass
    return spec, _default_ratio(request)


def _default_ratio(request=MergeRequest) -> float:
    return request_infos(request)["ratio"].default


# ---- running ---------------------------------------------------------------------------------------------

def run(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from trainer.checkpoints import CheckpointError
    from trainer.safety import SaveError
    from trainer.tools import ToolError

    try:
        return COMMANDS[args.lora_command](args, out, lambda message: print(message, file=err))
    except (ToolError, CheckpointError, SaveError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILED


def _report(args, out, result, text: str) -> None:
    out.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n" if args.json else text)


def _inspect(args, out, log) -> int:
    from trainer.tools import inspect_lora, read_lora, verify_lora

    lora = read_lora(args.file)
    report = inspect_lora(args.file, lora)
    match = verify_lora(lora, args.base) if args.base else None
    if args.json:
        data = {"lora": report.to_dict(), "verify": match.to_dict() if match else None}
        out.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        out.write(report.format(modules=args.modules) + (match.format() if match else ""))
    return EXIT_OK if match is None or match.ok else EXIT_FAILED


def _resize(args, out, log) -> int:
    from trainer.tools import resize_lora
    from trainer.tools.resize import default_resized_name

    target = args.out or default_resized_name(args.file, args.rank, args.method, args.param)
    result = resize_lora(args.file, target, args.rank, conv_rank=args.conv_rank or None, dynamic_method=args.method,
                         dynamic_param=args.param, save_precision=args.precision, device=args.device,
                         overwrite=args.overwrite)
    _report(args, out, result, result.format(modules=args.modules))
    return EXIT_OK


def _extract(args, out, log) -> int:
    from trainer.tools import extract_lora

    result = extract_lora(args.base, args.tuned, args.out, args.rank, conv_rank=args.conv_rank or None,
                          clamp_quantile=None if args.no_clamp else args.clamp, min_diff=args.min_diff,
                          save_precision=args.precision, load_precision=args.load_precision,
                          device=args.device, overwrite=args.overwrite, log=log)
    _report(args, out, result, result.format(modules=args.modules))
    return EXIT_OK


def _merge(args, out, log) -> int:
    from trainer.tools import merge_into_checkpoint

    loras = [lora_with_ratio(spec) for spec in args.lora]
    result = merge_into_checkpoint(args.base, loras, args.out, half=args.half, allow_unmatched=args.allow_unmatched,
                                   v_parameterization=args.v_parameterization, overwrite=args.overwrite, log=log)
    _report(args, out, result, result.format())
    return EXIT_OK


def _merge_loras(args, out, log) -> int:
    from trainer.tools.merge_loras import merge_loras

    loras = [lora_with_ratio(spec, MergeLorasRequest) for spec in args.lora]
    result = merge_loras(loras, args.out, concat=args.concat, precision=args.precision,
                         save_precision=args.save_precision, overwrite=args.overwrite, log=log)
    _report(args, out, result, result.format())
    return EXIT_OK


def _svd_merge(args, out, log) -> int:
    from trainer.tools.svd_merge import svd_merge_loras

    loras = [lora_with_ratio(spec, SvdMergeRequest) for spec in args.lora]
    result = svd_merge_loras(loras, args.out, args.rank, conv_rank=args.conv_rank or None,
                             clamp_quantile=None if args.no_clamp else args.clamp,
                             save_precision=args.save_precision, device=args.device, overwrite=args.overwrite,
                             log=log)
    _report(args, out, result, result.format(modules=args.modules))
    return EXIT_OK


COMMANDS = {"inspect": _inspect, "resize": _resize, "extract": _extract, "merge": _merge,
            "merge-loras": _merge_loras, "svd-merge": _svd_merge}
