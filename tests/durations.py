"""Records test durations for the fast tier.

    python -m pytest --junitxml=full.xml
    python -m pytest -m "not slow" --junitxml=fast.xml
    python tests/durations.py full.xml fast.xml

Each report is a JUnit report of a run on a 2-core machine; the file written,
tests/durations.json, maps each test id to the longest time any report gives
it (the fast tier's run matters too: a module fixture shared with a slow
test is paid by a fast one there). Tests that took longer than
`conftest.SLOW_SECONDS` are marked ``slow``, so ``python -m pytest -m "not
slow"`` leaves them out. Tests newer than the record are in the fast tier
until the record is refreshed.
"""

import json
import pathlib
import sys
import xml.etree.ElementTree as ET

OUT = pathlib.Path(__file__).with_name("durations.json")


def test_id(case: ET.Element) -> str:
  module = case.get("classname", "").replace(".", "/") + ".py"
  return f"{module}::{case.get('name')}"


def main(reports: list[str]) -> None:
  old = json.loads(OUT.read_text()) if OUT.exists() else {}
  seen: dict[str, float] = {}
  for report in reports:
    for case in ET.parse(report).getroot().iter("testcase"):
      name, time = test_id(case), round(float(case.get("time", 0.0)), 2)
      seen[name] = max(seen.get(name, 0.0), time)
  record = {**old, **seen}
  OUT.write_text(json.dumps(dict(sorted(record.items())), indent=0) + "\n")
  print(f"{len(record)} durations in {OUT}")


if __name__ == "__main__":
  main(sys.argv[1:])
