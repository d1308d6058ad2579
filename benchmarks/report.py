"""Summarise a benchmarks/gpu_suite.sh run folder into ``<out>/report.md``.

Reads what the suite leaves there: ``steps.tsv`` (step, status, exit code, seconds, log),
``env.txt`` / ``nvidia-smi.txt``, the pytest junit file(s) ``junit-*.xml``, and every benchmark's
``<name>.json`` + ``<name>.md`` (written by benchmarks/results.py). Failed steps get the tail of
their log. Works on a partial folder (a step that never ran is simply absent).

    python benchmarks/report.py OUT_DIR
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TAIL_LINES = 25


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def steps_section(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = out / "steps.tsv"
    if not path.exists():
        return ["(no steps.tsv: the suite did not record its steps)"], []
    with path.open() as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    lines = ["| step | status | exit | seconds | log |", "|---|---|---|---|---|"]
    for s in steps:
        lines.append(
            f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {Path(s['log']).name} |"
        )
    return lines, steps


def junit_section(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("junit-*.xml")):
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            lines.append(f"- {path.name}: unreadable ({exc})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root)
        count = {
            k: sum(int(s.get(k, 0)) for s in suites)
            for k in ("tests", "failures", "errors", "skipped")
        }
        passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
        lines.append(
            f"- {path.name}: {count['tests']} tests, {passed} passed, {count['failures']} failed, "
            f"{count['errors']} errors, {count['skipped']} skipped"
        )
        for case in root.iter("testcase"):
            for kind in ("failure", "error"):
                el = case.find(kind)
                if el is not None:
                    msg = (
                        (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
                    )
                    lines.append(
                        f"  - {kind.upper()} {case.get('classname')}::{case.get('name')}: {msg}"
                    )
        skipped_reasons: dict[str, int] = {}
        for case in root.iter("testcase"):
            el = case.find("skipped")
            if el is not None:
                reason = (el.get("message") or "").strip()[:120]
                skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
        for reason, n in sorted(skipped_reasons.items(), key=lambda x: -x[1])[:5]:
            lines.append(f"  - skipped ×{n}: {reason}")
    return lines or ["(no junit file)"]


def bench_sections(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(doc, dict) or "benchmark" not in doc:
            continue
        md = path.with_suffix(".md")
        lines += ["", md.read_text() if md.exists() else f"## {doc['benchmark']}\n(no markdown)"]
        errors = [r for r in doc.get("rows", []) if r.get("status") == "error"]
        for r in errors:
            lines += [
                f"Error in {r['case']} / {r['provider']}:",
                "```",
                r.get("traceback", r.get("note", "")),
                "```",
            ]
    return lines or ["(no benchmark results)"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    step_lines, steps = steps_section(out)
    parts = ["# unif2ace GPU suite report", ""]
    env = out / "env.txt"
    if env.exists():
        parts += ["```", env.read_text().strip(), "```", ""]
    smi = out / "nvidia-smi.txt"
    if smi.exists():
        parts += [
            "<details><summary>nvidia-smi</summary>",
            "",
            "```",
            smi.read_text().strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    parts += ["## Steps", "", *step_lines, ""]
    parts += ["## Tests", "", *junit_section(out), ""]
    parts += ["## Benchmarks", *bench_sections(out), ""]
    failed = [s for s in steps if s["status"] not in ("ok", "skipped")]
    if failed:
        parts += ["## Failed steps (log tails)", ""]
        for s in failed:
            parts += [
                f"### {s['step']} ({s['status']}, exit {s['rc']})",
                "```",
                _tail(Path(s["log"])),
                "```",
                "",
            ]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
