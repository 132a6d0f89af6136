"""Quality gates: what a model must show before the export stage publishes it.

A gate is one comparison on numbers the pipeline already wrote, `<metric> <op> <bound>`, e.g.

    evaluate.shipped.exact_match >= evaluate.base.exact_match + 0.2
    forgetting.shipped.relative_loss_change <= 0.1

`<metric>` is a dotted path into the stages' metrics (`evaluate` is metrics/evaluate.json, ...), with
`shipped` standing for the model the export ships (`merged`, or `tuned` for a method that cannot merge).
`<bound>` is a number, or another metric plus or minus a number. A metric that is missing fails its gate
as not measured: nothing ships on a claim nobody checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
SHIPPED = "shipped"
_PATH = r"[A-Za-z_][\w-]*(?:\.[\w-]+)+"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(rf"^\s*(?P<metric>{_PATH})\s*(?P<op>>=|<=|>|<)\s*"
                   rf"(?:(?P<number>{_NUMBER})|(?P<other>{_PATH})\s*(?:(?P<sign>[-+])\s*(?P<margin>{_NUMBER}))?)\s*$")


class GateError(ValueError):
    """A gate expression that cannot be parsed."""


@dataclass(frozen=True)
class Gate:
    name: str
    metric: str
    op: str
    other: str | None
    offset: float  # the number, or the margin added to `other`

    @classmethod
    def parse(cls, name: str, expression: str) -> Gate:
        match = _GATE.match(expression)
        if match is None:
            raise GateError(f"gate {name!r}: {expression!r} is not `<metric> <op> <number>` or `<metric> <op> <metric> "
                            "[+|- <number>]` with op one of >=, <=, >, < and metrics as dotted paths, e.g. "
                            "'evaluate.shipped.exact_match >= evaluate.base.exact_match + 0.2'")
        if match["number"] is not None:
            return cls(name, match["metric"], match["op"], None, float(match["number"]))
        margin = float(match["margin"] or 0.0)
        return cls(name, match["metric"], match["op"], match["other"], -margin if match["sign"] == "-" else margin)

    def __str__(self) -> str:
        if self.other is None:
            return f"{self.metric} {self.op} {self.offset:g}"
        return f"{self.metric} {self.op} {self.other}" + (f" {'+' if self.offset >= 0 else '-'} {abs(self.offset):g}"
                                                            if self.offset else "")


def lookup(metrics: dict[str, Any], path: str, shipped: str) -> float | None:
    value: Any = metrics
    for part in path.split("."):
        part = shipped if part == SHIPPED else part
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def evaluate_gates(gates: dict[str, str], metrics: dict[str, Any], shipped: str) -> list[dict[str, Any]]:
    """Each gate's value, bound and verdict ("pass", "fail", or "not measured")."""
    results = []
    for name, expression in gates.items():
        gate = Gate.parse(name, expression)
        value = lookup(metrics, gate.metric, shipped)
        base = 0.0 if gate.other is None else lookup(metrics, gate.other, shipped)
        bound = None if base is None else base + gate.offset
        missing = [path for path, found in ((gate.metric, value), (gate.other, base)) if path and found is None]
        verdict = ("not measured" if missing else "pass" if OPERATORS[gate.op](value, bound) else "fail")
        results.append({"gate": name, "rule": str(gate).replace(SHIPPED, shipped), "value": value, "op": gate.op,
                        "bound": bound, "verdict": verdict,
                        **({"missing": [p.replace(SHIPPED, shipped) for p in missing]} if missing else {})})
    return results


def failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["verdict"] != "pass"]


def describe(result: dict[str, Any]) -> str:
    if result["verdict"] == "not measured":
        return f"{result['gate']}: {result['rule']}: not measured (no {', '.join(result['missing'])} in the metrics)"
    return (f"{result['gate']}: {result['rule']}: {result['value']:.4g} {result['op']} {result['bound']:.4g} "
            f"is {'true' if result['verdict'] == 'pass' else 'false'}")


def markdown(results: list[dict[str, Any]], forced: bool) -> str:
    lines = ["| gate | rule | value | bound | verdict |", "|---|---|---|---|---|"]
    for r in results:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        bound = "-" if r["bound"] is None else f"{r['op']} {r['bound']:.4g}"
        lines.append(f"| {r['gate']} | `{r['rule']}` | {value} | {bound} | {r['verdict']} |")
    if forced and failures(results):
        lines += ["", "**Exported with `export.force: true` although gates failed.**"]
    return "\n".join(lines) + "\n"
