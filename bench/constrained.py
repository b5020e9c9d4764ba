"""What structured output and logprobs cost: c=16 aggregate tok/s on the bundled model with
every row under a JSON schema, every row asking `top_logprobs: 5`, and neither, alternating
(plain first and last, so drift shows). One server, default settings; run on a quiet machine.

Schema answers stop when the JSON closes (~83 tokens against plain's 128), so their batches
are ragged; "plain, schema lengths" replays each schema request's output length on a plain
request (`ignore_eos`) to tell the grammar's cost from that of the shorter, ragged outputs.

    .venv/bin/python bench/constrained.py [--concurrency 16] [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ragtune.launcher import start_server

LOAD = Path(__file__).with_name("serve_load.py")
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "answer": {"type": "string", "maxLength": 200},
                "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                "topics": {"type": "array", "items": {"type": "string", "maxLength": 30}},
            },
            "required": ["answer", "confidence", "topics"],
            "additionalProperties": False,
        },
    },
}
RUNS = [  # label, extra body, lengths ("out": record them, "in": replay the recorded ones)
    ("plain", None, None),
    ("json_schema", {"response_format": SCHEMA}, "out"),
    ("plain, schema lengths", None, "in"),
    ("top_logprobs 5", {"logprobs": True, "top_logprobs": 5}, None),
    ("plain again", None, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server({"RAGTUNE_SERVER__LOG_LEVEL": "warning"}, Path(scratch) / "log")
        try:
            rows = []
            lengths = Path(scratch) / "lengths.json"
            for label, extra, replay in RUNS:
                command = [
                    sys.executable,
                    str(LOAD),
                    "--url",
                    server.v1,
                    "--concurrency",
                    str(args.concurrency),
                    "--requests",
                    str(args.requests),
                    "--max-tokens",
                    str(args.max_tokens),
                    "--label",
                    label,
                ]
                if extra:
                    command += ["--extra", json.dumps(extra)]
                if replay:
                    command += [f"--lengths-{replay}", str(lengths)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    plain = (rows[0]["tok_per_s"] + rows[-1]["tok_per_s"]) / 2
    print("| run | tok/s | vs plain | errors |\n|---|---|---|---|")
    for row in rows:
        ratio = row["tok_per_s"] / plain if plain else 0
        print(f"| {row['label']} | {row['tok_per_s']} | {ratio:.2f}x | {row['errors']} |")
    by_label = {row["label"]: row["tok_per_s"] for row in rows}
    matched = by_label["json_schema"] / by_label["plain, schema lengths"]
    print(f"json_schema against plain rows of the same lengths: {matched:.2f}x")


if __name__ == "__main__":
    main()
