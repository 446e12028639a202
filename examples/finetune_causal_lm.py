"""Fine-tune a causal language model with LoRA: the `jlora-finetune` command.

This example is the command itself (`jlora.finetune.cli`), so that both stay
one program; see `jlora-finetune --help` for every option. Offline by
default: a small random Llama (`TOY_CONFIG`) with a byte-level tokenizer
learns the shipped instruction dataset (`jlora.data.demo_path()`, chats with
the loss on the assistant turns only), on CPU in a few minutes. Real use names
a HuggingFace checkpoint and a dataset:

  python examples/finetune_causal_lm.py                      # offline demo
  python examples/finetune_causal_lm.py --model Qwen/Qwen2.5-0.5B-Instruct \\
      --data chat.jsonl --seq-len 1024 --batch 8 --steps 1000 --merged
  python examples/finetune_causal_lm.py --data examples/data/tiny_corpus.txt
  python examples/finetune_causal_lm.py --mesh data:2,model:4  # 8 devices

It loads and tokenizes the data (cached), truncates and packs it, holds out
10% of the examples, trains the adapters with a progress bar, evaluates loss
and perplexity on the held-out examples before and after, and writes to --out:
loss_curve.png, metrics.json, adapter_peft/ (`peft.PeftModel.from_pretrained`
loads it), adapter_orbax/, checkpoints/ (--resume), merged/ with --merged; then
prints a sample.
"""

from jlora.finetune import DEMO_CONFIG as TOY_CONFIG, main
from jlora.finetune.cli import run

__all__ = ["TOY_CONFIG", "main"]

if __name__ == "__main__":
  run()
