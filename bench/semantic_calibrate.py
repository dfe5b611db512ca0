"""Calibrate the semantic cache's threshold for a real embeddings model on an evaluation set.

    python bench/semantic_calibrate.py --base-url http://127.0.0.1:8080/v1 --api-key $TENANT_KEY \\
        [--model text-embedding-3-small] [--dimensions 256] [--pairs tests/data/semantic_pairs.jsonl]

Embeds both questions of every pair (one embeddings call per pair, two inputs; through guardproxy
the calls are charged to the key's tenant like any other) with the model and dimensions of
``cache.semantic``, then prints, with the marks guard (as guardproxy decides) and without it:

- the lowest safe threshold: just above the most similar pair that is *not* a paraphrase;
- the recall (share of paraphrases that would hit) at that threshold and at ``--threshold``;
- the non-paraphrases closest to each threshold, so that the set can be extended where it is thin.

Pairs are JSON lines ``{"a": ..., "b": ..., "same": true|false, "kind": ...}``; add your own
tenants' questions (near-misses above all: other order ids, names, negations). Set
``cache.semantic.threshold`` to at least the safe threshold *without* the guard, so that the
threshold alone already serves no wrong answer on the set and the guard is a second line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guardproxy.http import semantic  # noqa: E402


def embed_pairs(client: httpx.Client, model: str, dimensions: int, pairs: list[dict[str, object]]
                ) -> list[semantic.Scored]:
    scored = []
    for pair in pairs:
        a, b = str(pair["a"]), str(pair["b"])
        response = client.post("embeddings", json={"model": model, "input": [a, b], "dimensions": dimensions})
        response.raise_for_status()
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        va, vb = (semantic.normalised(d["embedding"]) for d in data)
        scored.append(semantic.Scored(float(va @ vb), semantic.marks(a) == semantic.marks(b), bool(pair["same"])))
    return scored


def report(pairs: list[dict[str, object]], scored: list[semantic.Scored], threshold: float) -> None:
    for guard in (True, False):
        safe = semantic.safe_threshold(scored, guard=guard)
        label = "threshold and marks guard" if guard else "threshold alone"
        print(f"{label}: lowest safe threshold {safe}, recall {semantic.recall(scored, safe, guard=guard):.0%}; "
              f"at {threshold}: {len(semantic.false_hits(scored, threshold, guard=guard))} false hits, "
              f"recall {semantic.recall(scored, threshold, guard=guard):.0%}")
    print("closest non-paraphrases:")
    ranked = sorted(((s.similarity, p) for s, p in zip(scored, pairs, strict=True) if not s.paraphrase),
                    key=lambda t: -t[0])
    for similarity, pair in ranked[:8]:
        print(f"  {similarity:.4f}  {pair['a']!r} / {pair['b']!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="an OpenAI-compatible /v1 URL (guardproxy's, say)")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.92, help="the threshold configured now")
    parser.add_argument("--pairs", type=Path, default=HERE.parent / "tests" / "data" / "semantic_pairs.jsonl")
    args = parser.parse_args()
    pairs = [json.loads(line) for line in args.pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    headers = {"authorization": f"Bearer {args.api_key}"}
    with httpx.Client(base_url=args.base_url.rstrip("/") + "/", headers=headers, timeout=60) as client:
        scored = embed_pairs(client, args.model, args.dimensions, pairs)
    print(f"{len(pairs)} pairs ({sum(s.paraphrase for s in scored)} paraphrases), {args.model} "
          f"at {args.dimensions} dimensions")
    report(pairs, scored, args.threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
