"""`python -m jlora.finetune`: the `jlora-finetune` command."""

from jlora.finetune.cli import run

run()
