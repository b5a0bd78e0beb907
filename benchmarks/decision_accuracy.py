"""Where a CoT goes wrong: accuracy of each yes/no decision along the gold path of a ClevrPolicy.

    .venv/bin/python benchmarks/decision_accuracy.py DATA_DIR PREDS.jsonl

DATA_DIR holds the ``test.jsonl`` the predictions were made on (its records carry the gold CoT);
PREDS.jsonl is an evaluation's ``main.jsonl`` or ``in_context.jsonl`` (``trimpi evaluate --preds
DIR``). For every level of the decision tree, among the prompts whose CoT is still on the gold path
(the same condition, id and text, as the gold CoT), how many answered that level's condition
correctly; then, of the prompts right at every level, how many also wrote the right case label;
how many asked a condition the policy does not have there; and the most frequent first mistakes
(level, condition, gold answer). A model that has not learned to read the image for some condition
shows it here long before the final accuracy says which one; one that recites another policy than
the one in its prompt shows as "asked another condition".
"""
from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

STEP = re.compile(r"Condition ([\d.]+) asks: is there an? ([^?]+)\? (Yes|No)")


def main(data: str, preds: str) -> None:
    gold = {}
    with open(Path(data) / "test.jsonl") as f:
        for line in f:
            r = json.loads(line)
            gold[r["id"]] = r
    on_path, right, first_wrong = collections.Counter(), collections.Counter(), collections.Counter()
    n = other = path_right = label_right = 0
    with open(preds) as f:
        for line in f:
            r = json.loads(line)
            n += 1
            steps_g, steps_p = STEP.findall(gold[r["id"]]["cot"]), STEP.findall(r["response"])
            for level, g in enumerate(steps_g, 1):
                p = steps_p[level - 1] if level <= len(steps_p) else None
                if p is None or p[:2] != g[:2]:
                    other += 1  # asked another condition (or none): off the gold path
                    break
                on_path[level] += 1
                if g[2] != p[2]:
                    first_wrong[(level, g[1], g[2])] += 1
                    break
                right[level] += 1
            else:
                path_right += 1
                label_right += bool(r.get("correct"))
    for level in sorted(on_path):
        print(f"level {level}: {right[level]}/{on_path[level]} decisions right "
              f"({100 * right[level] / on_path[level]:.1f} %) among prompts still on the gold path")
    print(f"right at every level: {path_right}/{n}, of which the case label right: {label_right}; "
          f"asked another condition than the policy's: {other}/{n}")
    print("most frequent first mistakes (level, condition, gold answer):", first_wrong.most_common(6))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
