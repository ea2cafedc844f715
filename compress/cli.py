"""The `compress` command line. Each subcommand is one stage config plus one function;
the flags are generated from the config's fields, so CLI, recipes and API agree.

Bad input ends with one paragraph on stderr and exit status 2 (3 when a stage's own
quality gate failed), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

# name -> (module, config class, function, one-line help). Modules are imported only
# for the command that runs, so `compress --help` is instant.
COMMANDS = {
    "train": ("compress.train", "TrainConfig", "train", "fine-tune a checkpoint or train a size spec (the teacher)"),
    "distill": ("compress.distill", "DistillConfig", "distill", "distill a teacher into a smaller student"),
    "eval": ("compress.eval", "EvalConfig", "evaluate", "the task's metrics of an artifact on a split (accuracy, perplexity)"),
    "generate": ("compress.generate", "GenerateConfig", "generate", "continue a prompt with a causal LM, streaming the text"),
    "export": ("compress.export", "ExportConfig", "export", "export to ONNX with a parity gate; optional graph fusion"),
    "quantize": ("compress.quantize", "QuantizeConfig", "quantize", "int8 / 4-bit / bf16 quantization, accuracy-aware"),
    "bench": ("compress.bench", "BenchConfig", "bench", "accuracy, size, latency, memory of artifacts side by side"),
    "report": ("compress.bench.report", "ReportConfig", "report", "re-render report.md / report.html from results.json"),
    "run": ("compress.recipe", "RunConfig", "run", "run a recipe YAML: the whole chain"),
    "validate": ("compress.recipe", "ValidateConfig", "validate", "check a recipe YAML without running it"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<10} {spec[3]}" for name, spec in COMMANDS.items())
    return f"usage: compress COMMAND [options]\n\ncommands:\n{rows}\n\n`compress COMMAND --help` lists a command's options."


def main(argv: list[str] | None = None) -> int:
    from compress.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from compress import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"compress: unknown command '{name}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, cls_name, fn_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        parser = argparse.ArgumentParser(prog=f"compress {name}", description=help_)
        from compress.config import add_arguments, from_args

        add_arguments(parser, cls)
        args = parser.parse_args(argv[1:])
        cfg = from_args(cls, args)
        result = getattr(module, fn_name)(cfg)
        if isinstance(result, dict) and name == "eval":
            import json

            print(json.dumps(result, indent=2))
        return 0
    except UserError as err:
        msg = textwrap.fill(str(err), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"compress {name}: error: {msg}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"compress {name}: interrupted.", file=sys.stderr)
        return 130
    finally:
        from compress import distributed

        distributed.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
