"""Writes the shipped demo instruction dataset (jlora/data/demo/*.jsonl).

  python -m jlora.data._demo_data        # rewrites both files

Small templated tasks a tiny model can learn in minutes on a CPU (arithmetic,
reversing and capitalising words, counting letters, sorting, opposites,
plurals, weekdays, comparisons), in varied phrasings, some with a system
prompt and some with a follow-up turn. The same examples are written as chat
"messages" and as "prompt"/"completion" pairs. Deterministic: the test suite
checks that the shipped files equal this script's output.
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
FILES = {"messages": "instructions_messages.jsonl",
         "prompt_completion": "instructions_prompt_completion.jsonl"}
NUM_EXAMPLES = 400

WORDS = (
    "lamp harbor stone river candle window garden ladder bridge lantern"
    " anchor pebble meadow forest basket pillow orchard compass kettle"
    " blanket feather island market silver thunder mirror saddle valley"
    " cottage shadow ribbon marble hammer button pocket wagon castle"
    " pepper rabbit violin tunnel cloud planet rocket spider turtle wizard"
).split()
OPPOSITES = {"hot": "cold", "up": "down", "early": "late", "open": "closed",
             "light": "dark", "full": "empty", "fast": "slow", "old": "new",
             "wet": "dry", "high": "low", "loud": "quiet", "strong": "weak",
             "happy": "sad", "first": "last", "near": "far", "rich": "poor"}
PLURALS = {"box": "boxes", "child": "children", "mouse": "mice",
           "city": "cities", "leaf": "leaves", "foot": "feet",
           "knife": "knives", "tooth": "teeth", "bus": "buses",
           "story": "stories", "wolf": "wolves", "glass": "glasses",
           "person": "people", "baby": "babies", "dish": "dishes",
           "goose": "geese"}
DAYS = ("Monday Tuesday Wednesday Thursday Friday Saturday Sunday").split()
SYSTEMS = ("You are a concise assistant.", "Answer briefly and exactly.",
           "You are a helpful assistant that answers in one line.")


def _add(r):
  a, b = r.randint(2, 60), r.randint(2, 60)
  q = r.choice(["What is {a} + {b}?", "Add {a} and {b}.",
                "Compute {a} plus {b}."]).format(a=a, b=b)
  return q, f"{a} + {b} = {a + b}."


def _sub(r):
  a = r.randint(20, 99)
  b = r.randint(1, a)
  q = r.choice(["What is {a} - {b}?", "Subtract {b} from {a}."]).format(
      a=a, b=b)
  return q, f"{a} - {b} = {a - b}."


def _reverse(r):
  w = r.choice(WORDS)
  q = r.choice(['Reverse the word "{w}".', 'Spell "{w}" backwards.']).format(
      w=w)
  return q, w[::-1]


def _upper(r):
  w = " ".join(r.sample(WORDS, 2))
  q = r.choice(['Write "{w}" in capital letters.',
                'Convert "{w}" to uppercase.']).format(w=w)
  return q, w.upper()


def _count(r):
  w = r.choice(WORDS)
  q = r.choice(['How many letters are in "{w}"?',
                'Count the letters of "{w}".']).format(w=w)
  return q, f'"{w}" has {len(w)} letters.'


def _sort(r):
  xs = r.sample(range(1, 50), r.randint(3, 5))
  q = r.choice(["Sort these numbers from smallest to largest: {x}.",
                "Put in increasing order: {x}."]).format(
                    x=", ".join(map(str, xs)))
  return q, ", ".join(map(str, sorted(xs)))


def _opposite(r):
  w = r.choice(sorted(OPPOSITES))
  q = r.choice(['What is the opposite of "{w}"?',
                'Give the antonym of "{w}".']).format(w=w)
  return q, f'The opposite of "{w}" is "{OPPOSITES[w]}".'


def _plural(r):
  w = r.choice(sorted(PLURALS))
  q = r.choice(['What is the plural of "{w}"?',
                'One {w}, two ...?']).format(w=w)
  return q, PLURALS[w]


def _day(r):
  k = r.randrange(7)
  q = r.choice(["What day comes after {d}?",
                "Which day follows {d}?"]).format(d=DAYS[k])
  return q, f"{DAYS[(k + 1) % 7]} comes after {DAYS[k]}."


def _compare(r):
  a, b = r.sample(range(1, 100), 2)
  q = r.choice(["Which is larger, {a} or {b}?",
                "Which number is bigger: {a} or {b}?"]).format(a=a, b=b)
  return q, f"{max(a, b)} is larger than {min(a, b)}."


def _first_letter(r):
  w = r.choice(WORDS)
  return (f'What is the first letter of "{w}"?',
          f'The first letter of "{w}" is "{w[0]}".')


TASKS = (_add, _sub, _reverse, _upper, _count, _sort, _opposite, _plural,
         _day, _compare, _first_letter)


def examples(n: int = NUM_EXAMPLES, seed: int = 0) -> list[list[dict]]:
  """n conversations (lists of {"role", "content"} messages)."""
  r = random.Random(seed)
  out = []
  for i in range(n):
    chat = []
    if r.random() < 0.25:
      chat.append({"role": "system", "content": r.choice(SYSTEMS)})
    turns = 2 if r.random() < 0.2 else 1
    for _ in range(turns):
      q, a = TASKS[(i + len(chat)) % len(TASKS)](r)
      chat += [{"role": "user", "content": q},
               {"role": "assistant", "content": a}]
    out.append(chat)
  return out


def as_prompt_completion(chat: list[dict]) -> dict:
  """The conversation as one prompt and the last answer as completion."""
  lines = []
  for m in chat[:-1]:
    lines.append({"system": "", "user": "Question: ",
                  "assistant": "Answer: "}[m["role"]] + m["content"])
  return {"prompt": "\n".join(lines) + "\nAnswer:",
          "completion": " " + chat[-1]["content"]}


def render() -> dict[str, str]:
  """File name -> content of both files."""
  chats = examples()
  lines = {"messages": [json.dumps({"messages": c}) for c in chats],
           "prompt_completion": [json.dumps(as_prompt_completion(c))
                                 for c in chats]}
  return {FILES[k]: "\n".join(v) + "\n" for k, v in lines.items()}


def main() -> None:
  os.makedirs(HERE, exist_ok=True)
  for name, text in render().items():
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
      f.write(text)
    print(f"wrote {os.path.join(HERE, name)}")


if __name__ == "__main__":
  main()
