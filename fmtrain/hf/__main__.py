"""``python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT [--dtype fp32|bf16|fp16]``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmtrain.hf", description="Hugging Face interop.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a Hugging Face folder (config.json, model.safetensors, tokenizer)",
                        description="sdpa models become LlamaForCausalLM, loadable by plain "
                                    "transformers; fma/local models become model_type 'fmtrain', loadable by "
                                    "AutoModelForCausalLM after `import fmtrain.hf`.")
    ex.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ex.add_argument("out", help="the folder to write (new or empty; see --force)")
    ex.add_argument("--force", action="store_true",
                    help="write into a folder that holds other files: the export's own files are replaced, "
                         "the others (a README, a model card) kept")
    ex.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights' dtype (default fp32)")
    args = ap.parse_args(argv)
    from . import export, require_extra

    require_extra()  # transformers and tokenizers: or one error line naming the install

    out = export(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    # ExportError, ExtraMissing (UserErrors) or a full disk: one error: line, exit 2; Ctrl-C: exit 130, no traceback.
    from ..errors import run_command

    sys.exit(run_command(main))
