"""Where pairs matter: Debian synopsis → description reranking and same-section pair classification.

Built offline from the Debian-sections set (`bench.debian_sections`, split by source package):
- **rerank**: query = a package's one-line synopsis; documents = its long description (the synopsis
  removed, so no verbatim match) and 19 long descriptions of other packages of the *same* section
  (hard negatives), shuffled. nDCG@10 and MRR with one relevant document.
- **pairs**: two long descriptions → `same` section or `different`, balanced.

Compared, in one run: the frozen bi-encoder (MiniLM mean-pooled cosine; logistic regression on
concatenated embeddings `[u; v]` and on SBERT's `[u; v; |u−v|; u∗v]` for pairs) against (IA)³ and
Houlsby *cross-encoder* tasks trained by `switchboard train`'s own trainer on pairs (`--objective
rerank` rows for reranking). ECE of the calibrated probabilities on held-out pairs, and the serving cost
per pair (engine rows/s) beside the bi-encoder's (embeddings/s).

    python -m bench.pairs --quick        # minutes: few queries, one short epoch
    python -m bench.pairs                # the full run
    python -m bench.pairs --tasks serving --seconds 30   # /v1/rerank 1 × 64 vs the engine on 64 pairs

Results: bench/out/pairs.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from bench.accuracy import embed
from bench.adapters import bench_adapter
from bench.debian_sections import load as load_splits
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import running_server
from switchboard.server.core.backbone import default_model_path, load_backbone
from switchboard.server.core.engine import Engine
from switchboard.server.core.precision import resolve
from switchboard.server.core.tokenize import Input
from switchboard.server.runtime.training.trainer import TrainConfig, expected_calibration_error, logits_of, train

Example = tuple[Input, str]


def with_long_description(rows: list[dict], min_chars: int = 40) -> list[dict]:
    """Rows whose long description (the text minus its synopsis) has `min_chars` at least, one per text."""
    out, seen = [], set()
    for r in rows:
        text, synopsis = r["text"], r["synopsis"]
        long = text[len(synopsis):].strip() if text.startswith(synopsis) else ""
        if len(long) >= min_chars and long not in seen and synopsis:
            seen.add(long)
            out.append({**r, "long": long})
    return out


def rerank_set(rows: list[dict], queries: int, docs: int, seed: int) -> list[tuple[str, list[str], int]]:
    """(query, documents, index of the relevant one): negatives from the same section where it has enough."""
    rng = random.Random(seed)
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["label"], []).append(r)
    chosen = rng.sample(rows, min(queries, len(rows)))
    out = []
    for r in chosen:
        same = [x for x in by_section[r["label"]] if x is not r]
        negatives = rng.sample(same, min(docs - 1, len(same)))
        if len(negatives) < docs - 1:
            others = [x for x in rows if x["label"] != r["label"]]
            negatives += rng.sample(others, docs - 1 - len(negatives))
        documents = [x["long"] for x in negatives] + [r["long"]]
        rng.shuffle(documents)
        out.append((r["synopsis"], documents, documents.index(r["long"])))
    return out


def rerank_training(rows: list[dict], queries: int, negatives: int, seed: int) -> list[Example]:
    """(query, document) → relevant / irrelevant, the rows `read_rerank_examples` makes of a rerank file."""
    examples: list[Example] = []
    for query, documents, relevant in rerank_set(rows, queries, negatives + 1, seed):
        examples += [((query, d), "relevant" if i == relevant else "irrelevant") for i, d in enumerate(documents)]
    return examples


def pair_set(rows: list[dict], n: int, seed: int) -> list[Example]:
    """(long description a, long description b) → same / different section, half each."""
    rng = random.Random(seed)
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["label"], []).append(r)
    sections = [s for s, members in by_section.items() if len(members) >= 2]
    out: list[Example] = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.sample(by_section[rng.choice(sections)], 2)
            out.append(((a["long"], b["long"]), "same"))
        else:
            s, t = rng.sample(sections, 2)
            out.append(((rng.choice(by_section[s])["long"], rng.choice(by_section[t])["long"]), "different"))
    return out


def ndcg_mrr(ranks: list[int], k: int = 10) -> tuple[float, float]:
    """Mean nDCG@k and MRR for one relevant document at 1-based `ranks`."""
    ndcg = float(np.mean([1.0 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]))
    return ndcg, float(np.mean([1.0 / r for r in ranks]))


def rank_of(scores: np.ndarray, relevant: int) -> int:
    return int((scores > scores[relevant]).sum()) + 1  # ties count for the relevant document


def bi_encoder_rerank(backbone, evaluation, max_length: int) -> tuple[list[int], float]:  # noqa: ANN001
    """Ranks by cosine of frozen embeddings, and embeddings/s."""
    texts = sorted({q for q, _, _ in evaluation} | {d for _, docs, _ in evaluation for d in docs})
    start = time.perf_counter()
    vectors = dict(zip(texts, embed(backbone, texts, max_length), strict=True))
    rate = len(texts) / (time.perf_counter() - start)
    ranks = [rank_of(np.array([vectors[d] @ vectors[q] for d in docs]), rel) for q, docs, rel in evaluation]
    return ranks, rate


def cross_encoder_rerank(backbone, adapter, evaluation, max_length: int) -> tuple[list[int], float]:  # noqa: ANN001
    """Ranks by the task's relevance (its second label's logit margin: the order of P(relevant)), pairs/s."""
    pairs = [(q, d) for q, docs, _ in evaluation for d in docs]
    start = time.perf_counter()
    logits = logits_of(backbone, adapter, pairs, max_length).numpy()
    rate = len(pairs) / (time.perf_counter() - start)
    margin = logits[:, 1] - logits[:, 0]
    ranks, at = [], 0
    for _, docs, rel in evaluation:
        ranks.append(rank_of(margin[at:at + len(docs)], rel))
        at += len(docs)
    return ranks, rate


def pair_features(backbone, examples: list[Example], max_length: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """([u; v], [u; v; |u − v|; u ∗ v]) of frozen embeddings."""
    texts = sorted({t for (a, b), _ in examples for t in (a, b)})
    vectors = dict(zip(texts, embed(backbone, texts, max_length), strict=True))
    u = np.stack([vectors[a] for (a, _), _ in examples])
    v = np.stack([vectors[b] for (_, b), _ in examples])
    return np.hstack([u, v]), np.hstack([u, v, np.abs(u - v), u * v])


def lr_accuracy(x_train, y_train, x_dev, y_dev, x_test, y_test) -> tuple[float, float]:  # noqa: ANN001
    best = (-1.0, None)
    for c in (0.1, 1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        dev = float((model.predict(x_dev) == np.array(y_dev)).mean())
        if dev > best[0]:
            best = (dev, model)
    return float((best[1].predict(x_test) == np.array(y_test)).mean()), best[1].C


def calibration(backbone, adapter, examples: list[Example], max_length: int) -> dict:  # noqa: ANN001
    """Accuracy and ECE of P(label) on held-out pairs, before (T = 1) and after the fitted temperature."""
    logits = logits_of(backbone, adapter, [x for x, _ in examples], max_length)
    y = torch.tensor([adapter.labels.index(label) for _, label in examples])
    t = adapter.head.temperature
    return {"accuracy": float((logits.argmax(-1) == y).float().mean()), "temperature": t,
            "ece_raw": expected_calibration_error(torch.softmax(logits, -1), y),
            "ece_calibrated": expected_calibration_error(torch.softmax(logits / t, -1), y)}


def rerank_serving(evaluation, seconds: float, clients: int = 2) -> dict:  # noqa: ANN001
    """`/v1/rerank` of one query × 64 documents on `switchboard serve` (its defaults: engine workers,
    `auto` precision), closed loop, against the engine alone (in-process, same precision, the machine's
    threads) forwarding the same 64 pairs as one batch: rows/s side by side."""
    import concurrent.futures
    import tempfile

    rng = random.Random(7)
    requests = []
    for query, docs, _ in evaluation:
        pool = [d for _, ds, _ in rng.sample(evaluation, 4) for d in ds]
        requests.append((query, (docs + pool)[:64]))
    backbone = load_backbone(default_model_path())
    adapter = bench_adapter(backbone.spec, "ia3", seed=1, num_labels=2, sites=("k_out", "v_out", "ffn_out_in"),
                            pooling="pair")
    engine = Engine(backbone, precision=resolve("auto", torch.device("cpu")), device="cpu")
    slot = engine.load(adapter).slot
    batches = [engine.tokenize([(q, d) for d in docs]) for q, docs in requests]
    engine.forward(batches[0]["input_ids"], batches[0]["attention_mask"], torch.full((64,), slot))
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = batches[rows // 64 % len(batches)]
        engine.forward(b["input_ids"], b["attention_mask"], torch.full((64,), slot))
        rows += 64
    engine_rate = rows / (time.perf_counter() - start)
    del engine
    with tempfile.TemporaryDirectory() as data, running_server(Path(data)) as (url, _):
        blob = native.dumps(adapter, backbone.spec.fingerprint)
        assert httpx.put(f"{url}/v1/tasks/rel", files=[("files", ("a.safetensors", blob))], timeout=60).is_success

        refused = [0] * clients

        def client(index: int) -> int:
            done, i = 0, index
            with httpx.Client(timeout=120) as http:
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    query, docs = requests[i % len(requests)]
                    r = http.post(f"{url}/v1/rerank", json={"task": "rel", "query": query, "documents": docs})
                    if r.status_code == 429:  # admission: wait as told, count it
                        refused[index] += 1
                        time.sleep(min(1.0, float(r.headers.get("retry-after", "0.1"))))
                        continue
                    r.raise_for_status()
                    done, i = done + 1, i + clients
            return done

        http_warm = httpx.post(f"{url}/v1/rerank", json={"task": "rel", "query": requests[0][0],
                                                         "documents": requests[0][1]}, timeout=120)
        http_warm.raise_for_status()
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as ex:
            answered = sum(ex.map(client, range(clients)))
        server_rate = 64 * answered / (time.perf_counter() - start)
    return {"engine_rows_per_s": engine_rate, "server_rows_per_s": server_rate,
            "server_vs_engine": server_rate / engine_rate, "clients": clients, "seconds": seconds,
            "refused_429": sum(refused)}


def trained(backbone, recipes: list[tuple[str, str]], train_ex: list[Example], dev_ex: list[Example],  # noqa: ANN001
            args: argparse.Namespace):  # noqa: ANN201 (an iterator)
    """(name, adapter, report, seconds) of each (kind, pooling) trained by the trainer `switchboard train` runs."""
    for kind, pooling in recipes:
        cfg = TrainConfig(kind=kind, epochs=args.epochs, max_length=args.max_length, seed=0, patience=1,
                          pooling=pooling, precision=args.precision)
        start = time.time()
        adapter, report = train(backbone, train_ex, cfg, dev_ex, progress=False)
        yield f"{kind}/{pooling}", adapter, report, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kinds", default="ia3,houlsby")
    parser.add_argument("--poolings", default="pair,mean", help="head poolings to train (pair: SBERT features of the "
                                                                "two texts pooled apart; mean: one pooled vector)")
    parser.add_argument("--train-queries", type=int, default=1200)
    parser.add_argument("--negatives", type=int, default=3, help="per training query")
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--test-queries", type=int, default=300)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--documents", type=int, default=20, help="per test query: 1 relevant + same-section negatives")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                        help="training matmuls (autocast; weights and evaluation stay fp32)")
    parser.add_argument("--tasks", default="rerank,pairs", help="any of rerank, pairs, serving")
    parser.add_argument("--seconds", type=float, default=30.0, help="per side of the serving measurement")
    parser.add_argument("--clients", type=int, default=2, help="closed-loop clients of the serving measurement")
    parser.add_argument("--data", type=Path, default=Path("bench/data/debian-sections"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/pairs.json"))
    args = parser.parse_args()
    if args.quick:
        args.train_queries, args.train_pairs, args.test_queries, args.test_pairs, args.epochs = 120, 400, 60, 200, 1
    torch.manual_seed(0)
    splits = {name: with_long_description(rows) for name, rows in load_splits(args.data).items()}
    backbone = load_backbone(default_model_path())
    recipes = [(kind, pooling) for kind in args.kinds.split(",") for pooling in args.poolings.split(",")]
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                     "rows": {name: len(rows) for name, rows in splits.items()}}

    if "rerank" in args.tasks:
        evaluation = rerank_set(splits["test"], args.test_queries, args.documents, seed=1)
        ranks, rate = bi_encoder_rerank(backbone, evaluation, args.max_length)
        ndcg, mrr = ndcg_mrr(ranks)
        results["rerank"] = {"queries": len(evaluation), "documents_per_query": args.documents,
                             "bi_encoder": {"ndcg@10": ndcg, "mrr": mrr, "embeddings_per_s": rate}}
        print(f"rerank  bi-encoder (frozen MiniLM cosine): nDCG@10 {ndcg:.4f}  MRR {mrr:.4f}  ({rate:.0f} texts/s)",
              flush=True)
        train_ex = rerank_training(splits["train"], args.train_queries, args.negatives, seed=2)
        dev_ex = rerank_training(splits["dev"], max(40, args.train_queries // 10), args.negatives, seed=3)
        for name, adapter, report, seconds in trained(backbone, recipes, train_ex, dev_ex, args):
            ranks, rate = cross_encoder_rerank(backbone, adapter, evaluation, args.max_length)
            ndcg, mrr = ndcg_mrr(ranks)
            results["rerank"][name] = {"ndcg@10": ndcg, "mrr": mrr, "pairs_per_s": rate, "train_seconds": seconds,
                                       "train_examples": len(train_ex), "steps": report["steps"],
                                       "bytes": adapter.nbytes, "calibration": report["calibration"]}
            print(f"rerank  {name} cross-encoder: nDCG@10 {ndcg:.4f}  MRR {mrr:.4f}  ({rate:.0f} pairs/s; trained "
                  f"{seconds:.0f} s on {len(train_ex)} pairs)", flush=True)
            _save(args.out, results)

    if "pairs" in args.tasks:
        train_ex = pair_set(splits["train"], args.train_pairs, seed=4)
        dev_ex = pair_set(splits["dev"], max(200, args.train_pairs // 10), seed=5)
        test_ex = pair_set(splits["test"], args.test_pairs, seed=6)
        feats = {name: pair_features(backbone, ex, args.max_length)
                 for name, ex in (("train", train_ex), ("dev", dev_ex), ("test", test_ex))}
        ys = {name: [label for _, label in ex] for name, ex in (("train", train_ex), ("dev", dev_ex),
                                                                ("test", test_ex))}
        results["pairs"] = {"test_pairs": len(test_ex), "train_pairs": len(train_ex)}
        for i, name in enumerate(("lr_concat", "lr_sbert_features")):
            accuracy, c = lr_accuracy(feats["train"][i], ys["train"], feats["dev"][i], ys["dev"], feats["test"][i],
                                      ys["test"])
            results["pairs"][name] = {"accuracy": accuracy, "C": c}
            print(f"pairs   {name}: accuracy {accuracy:.4f} (C={c})", flush=True)
        for name, adapter, report, seconds in trained(backbone, recipes, train_ex, dev_ex, args):
            held_out = calibration(backbone, adapter, test_ex, args.max_length)
            results["pairs"][name] = {**held_out, "train_seconds": seconds, "steps": report["steps"],
                                      "bytes": adapter.nbytes}
            print(f"pairs   {name} cross-encoder: accuracy {held_out['accuracy']:.4f}  ECE {held_out['ece_raw']:.4f} "
                  f"→ {held_out['ece_calibrated']:.4f} (T={held_out['temperature']:.2f}); trained {seconds:.0f} s",
                  flush=True)
            _save(args.out, results)
    if "serving" in args.tasks:
        serving = rerank_serving(rerank_set(splits["test"], 64, 20, seed=1), args.seconds, args.clients)
        results["serving"] = serving
        print(f"serving /v1/rerank 1 × 64: {serving['server_rows_per_s']:.0f} rows/s; the engine alone on the same "
              f"64 pairs {serving['engine_rows_per_s']:.0f} rows/s → {serving['server_vs_engine']:.2f}", flush=True)
    _save(args.out, results)
    print(json.dumps(results, indent=1))


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
