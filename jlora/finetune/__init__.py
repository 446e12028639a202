"""`jlora-finetune`, the fine-tuning command (see `jlora.finetune.cli`).

  >>> from jlora.finetune import main
  >>> metrics = main(["--steps", "100", "--out", "run"])   # offline demo
"""

from jlora.finetune.cli import DEMO_CONFIG, main, parse_args

__all__ = ["DEMO_CONFIG", "main", "parse_args"]
