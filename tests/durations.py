"""Records test durations for the fast tier: python tests/durations.py RUN.xml.

RUN.xml is a JUnit report of a full run on a 2-core machine
(``python -m pytest --junitxml=RUN.xml``); the file written,
tests/durations.json, maps each test id to its seconds. Tests that took
longer than `conftest.SLOW_SECONDS` are marked ``slow``, so
``python -m pytest -m "not slow"`` leaves them out. Tests newer than the
record are in the fast tier until the record is refreshed.
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
  record = json.loads(OUT.read_text()) if OUT.exists() else {}
  for report in reports:
    for case in ET.parse(report).getroot().iter("testcase"):
      record[test_id(case)] = round(float(case.get("time", 0.0)), 2)
  OUT.write_text(json.dumps(dict(sorted(record.items())), indent=0) + "\n")
  print(f"{len(record)} durations in {OUT}")


if __name__ == "__main__":
  main(sys.argv[1:])
