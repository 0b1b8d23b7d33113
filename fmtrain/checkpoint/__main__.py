"""``python -m fmtrain.checkpoint`` was the export command once: say where it went."""
import sys

print("error: python -m fmtrain.checkpoint is not a command (its export moved): the model alone is "
      "python -m fmtrain.export RUN OUT, a Hugging Face folder python -m fmtrain.hf export RUN OUT",
      file=sys.stderr)
sys.exit(2)
