"""Every backbone family: the engine's mixed (IA)3 batch against the bare backbone, side by side.

For each family (core/families/) a random-weight model of one shape (MiniLM's by default: hidden 384,
6 layers, 12 heads, feed-forward 1536; `--shape base`: 768/12/12/3072) is wrapped as the server wraps a
loaded one, and an fp32 CPU engine holds 16 random (IA)3 tasks at the family's PEFT-default sites
(vectors 1 + 0.1·randn, 3-label heads with the family's own pooling). Timed in interleaved rounds,
medians of the calls during which the process had its cores (CPU time ÷ wall ≈ threads: on a shared
machine other processes otherwise skew one side):

- engine: `Engine.forward` on a mixed batch (rows round-robin over the 16 tasks, shuffled);
- bare: Hugging Face's own forward of an untouched copy of the same model (no hooks installed) under
  `torch.inference_mode`, on the same token ids, as one padded batch;
- chunked (context): the same bare forward on the engine's own length-sorted chunks (`Engine.chunks`),
  which separates what chunking wins from what the per-row task parameters cost.

The issue's target is bare time ÷ engine time ≥ 0.9 (the engine keeps 90 % of the backbone's
throughput while serving 16 tasks in one batch). Real text (Debian package descriptions) of about
`--tokens` tokens per row; the MiniLM WordPiece tokenizer (vocabulary 30522) fits every family.

    python -m bench.backbones                   # MiniLM shape, every family: ~1.5 min on 2 idle cores
    python -m bench.backbones --repeats 3 --families bert,deberta-v3
    python -m bench.backbones --shape base

Results: bench/out/backbones.json and the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from transformers import AutoModel, AutoTokenizer

from bench.texts import sample_texts
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec, default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.core.families import family_for
from switchboard.server.core.tuners.head.config import HeadWeights, pooled_width
from switchboard.server.core.tuners.ia3.config import Ia3Weights

SHAPES: dict[str, dict[str, int]] = {
    "minilm": dict(hidden=384, layers=6, heads=12, ffn=1536),
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072),
}
VOCAB = 30522  # the MiniLM tokenizer's ids
NUM_TASKS = 16
NUM_LABELS = 3


def family_config(name: str, hidden: int, layers: int, heads: int, ffn: int) -> Any:  # noqa: ANN401
    """A transformers config of the family at this shape (random weights are built from it)."""
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn)
    decoder = dict(num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048, pad_token_id=0, **shape)
    if name == "bert":
        return tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **shape)
    if name == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                                   max_position_embeddings=512)
    if name == "mpnet":
        return tf.MPNetConfig(vocab_size=30527, max_position_embeddings=514, **shape)
    if name == "deberta-v3":
        return tf.DebertaV2Config(vocab_size=VOCAB, max_position_embeddings=512, relative_attention=True,
                                  pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=256,
                                  max_relative_positions=-1, norm_rel_ebd="layer_norm", position_biased_input=False,
                                  type_vocab_size=0, hidden_act="gelu", **shape)
    if name == "modernbert":
        return tf.ModernBertConfig(vocab_size=VOCAB, max_position_embeddings=8192, pad_token_id=0, bos_token_id=101,
                                   eos_token_id=102, cls_token_id=101, sep_token_id=102, **shape)
    if name == "qwen3":
        return tf.Qwen3Config(vocab_size=VOCAB, head_dim=hidden // heads, **decoder)
    if name == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, **decoder)
    raise ValueError(f"unknown family {name!r}")


FAMILIES = ("bert", "distilbert", "mpnet", "deberta-v3", "modernbert", "qwen3", "llama")

# PEFT's default (IA)3 targets per model type, as our sites (where PEFT has no default: the analogous
# modules). BERT/DeBERTa's "output.dense" matches both the attention output and the feed-forward output.
PEFT_SITES: dict[str, tuple[str, ...]] = {
    "bert": ("k_out", "v_out", "attn_out_in", "ffn_out_in"),
    "deberta-v3": ("k_out", "v_out", "attn_out_in", "ffn_out_in"),
    "distilbert": ("k_out", "v_out", "ffn_out_in"),
    "mpnet": ("k_out", "v_out", "ffn_out_in"),
    "modernbert": ("qkv_out", "ffn_out_in"),
    "qwen3": ("q_out", "v_out", "ffn_out_in"),
    "llama": ("k_out", "v_out", "ffn_out_in"),
}


def ia3_task(spec: BackboneSpec, sites: tuple[str, ...], seed: int) -> TaskAdapter:
    g = torch.Generator().manual_seed(seed)
    ia3 = Ia3Weights({s: 1.0 + 0.1 * torch.randn(*spec.sites[s], generator=g) for s in sites})
    head = HeadWeights(out_w=0.3 * torch.randn(NUM_LABELS, pooled_width(spec.pooling, spec.hidden_size), generator=g),
                       out_b=torch.zeros(NUM_LABELS), pooling=spec.pooling)
    return TaskAdapter(labels=[f"l{i}" for i in range(NUM_LABELS)], parts={"ia3": ia3, "head": head})


def batch_of(tokenizer: Any, rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN401
    """`rows` real texts cut to `tokens` ± 12 % tokens each ([CLS] … [SEP]), right-padded."""
    lo, hi = int(tokens * 0.88), int(tokens * 1.12)
    rng = random.Random(seed)
    chosen: list[list[int]] = []
    for text in sample_texts(rows * 40, seed=seed):
        ids = tokenizer(text, truncation=True, max_length=hi)["input_ids"]
        if len(ids) >= lo:
            cut = rng.randint(lo, len(ids))
            chosen.append(ids[:cut - 1] + [tokenizer.sep_token_id])
        if len(chosen) == rows:
            break
    if len(chosen) < rows:
        raise RuntimeError(f"only {len(chosen)} texts of {lo}+ tokens")
    width = max(map(len, chosen))
    input_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, ids in enumerate(chosen):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = 1
    return input_ids, mask


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_family(name: str, shape: dict[str, int], tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor,  # noqa: ANN401
                 args: argparse.Namespace) -> dict[str, Any]:
    config = family_config(name, **shape)
    family = family_for(config.model_type)
    assert family is not None
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=family.attention).eval()
    bare_model = copy.deepcopy(model)  # the same weights, never wrapped: no hooks at all
    for p in bare_model.parameters():
        p.requires_grad_(False)
    backbone = wrap_model(model, tokenizer, name=f"random-{name}", max_length=512)
    spec = backbone.spec
    engine = Engine(backbone, precision="fp32", device="cpu")
    if args.chunk_rows is not None:
        engine.chunk_rows = args.chunk_rows
    sites = PEFT_SITES[name]
    slots = [engine.load(ia3_task(spec, sites, seed=t)).slot for t in range(NUM_TASKS)]
    rows = ids.shape[0]
    task_slots = torch.tensor([slots[r % NUM_TASKS] for r in range(rows)])
    task_slots = task_slots[torch.randperm(rows, generator=torch.Generator().manual_seed(1))]
    call_kwargs = dict(family.call_kwargs)  # a decoder's use_cache=False, as the engine calls it

    def run_engine() -> None:
        engine.forward(ids, mask, task_slots)

    def run_bare() -> None:
        with torch.inference_mode():
            bare_model(input_ids=ids, attention_mask=mask, **call_kwargs)

    plan = engine.chunks(mask)

    def run_bare_chunked() -> None:
        with torch.inference_mode():
            for chunk, width in plan:
                bare_model(input_ids=ids[chunk, :width], attention_mask=mask[chunk, :width], **call_kwargs)

    configs = {"engine": run_engine, "bare": run_bare, "bare_chunked": run_bare_chunked}
    for fn in configs.values():  # warm-up
        fn()
    # Rounds of one call each, rotated (no fixed first slot), until every side has `repeats` clean calls or
    # the family's time is up. Clean: the process had its threads' CPU (CPU ÷ wall ≥ 0.8 × threads), i.e.
    # no other process (tests, another bench) took cores away mid-call.
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    names = list(configs)
    threads = torch.get_num_threads()
    start, rnd = time.perf_counter(), 0

    def clean(k: str) -> list[float]:
        return [w for w, c in samples[k] if c >= 0.8 * threads * w]

    while rnd < 3 or (time.perf_counter() - start < args.family_seconds
                      and min(len(clean(k)) for k in names) < args.repeats):
        for k in names[rnd % len(names):] + names[:rnd % len(names)]:
            samples[k].append(timed(configs[k]))
        rnd += 1
    enough = min(len(clean(k)) for k in names) >= 3
    times = {k: clean(k) if enough else [w for w, _ in samples[k]] for k in names}
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(w for w, _ in samples[k]) for k in names}
    every = {k: statistics.median([w for w, _ in samples[k]]) for k in names}
    return {"family": name, "model_type": config.model_type, "attention": family.attention, "pooling": spec.pooling,
            "sites": list(sites), "engine_ms": 1000 * med["engine"], "bare_ms": 1000 * med["bare"],
            "bare_chunked_ms": 1000 * med["bare_chunked"], "bare_over_engine": med["bare"] / med["engine"],
            "bare_over_engine_min": low["bare"] / low["engine"],
            "bare_over_engine_all": every["bare"] / every["engine"], "clean": enough, "rounds": rnd,
            "clean_calls": {k: len(clean(k)) for k in names},
            "chunked_over_engine": med["bare_chunked"] / med["engine"],
            "engine_rows_per_s": rows / med["engine"], "bare_rows_per_s": rows / med["bare"],
            "chunks": [(len(c), w) for c, w in plan], "samples_wall_cpu_s": samples,
            "params": sum(p.numel() for p in bare_model.parameters())}


def t5_rank(args: argparse.Namespace, rows_per_task: int) -> dict[str, Any]:
    """T-Few rank classification with 16 tasks mixed: the engine (one encoder pass, one decoder pass per
    choice index, every row with its own task's (IA)3 vectors, choices and template) vs PEFT scoring the
    same rows one task at a time as T-Few's own code does (set_adapter, the encoder once on the task's
    rows, the decoder once over rows × choices). Random weights of t5-small's shape."""
    import copy
    import random
    import statistics

    from peft import IA3Config, TaskType, get_peft_model
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    from switchboard.server.core.adapter import TaskAdapter
    from switchboard.server.core.backbone import default_model_path, wrap_model
    from switchboard.server.core.engine import Engine
    from switchboard.server.core.tuners.choices.config import choices_from_text
    from switchboard.server.core.tuners.ia3.config import Ia3Weights

    small = args.shape == "minilm"
    config = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6 if small else 12,
                      num_decoder_layers=6 if small else 12, num_heads=8 if small else 12,
                      feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)
    if not small:
        config.d_model, config.d_ff = 768, 3072
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    n_tasks = NUM_TASKS
    verbalizers = [["positive", "negative"], ["yes", "no", "maybe"], ["sports", "politics", "science", "art"],
                   ["true", "false"]]
    templates = ["{text} Is this review positive or negative?", "Question: {text} Answer:", "{text} Topic?", None]
    backbone = wrap_model(copy.deepcopy(base), tokenizer, name="t5-random")  # before PEFT wraps `base` in place
    peft = get_peft_model(base, IA3Config(task_type=TaskType.SEQ_2_SEQ_LM), adapter_name="t0")
    for t in range(1, n_tasks):
        peft.add_adapter(f"t{t}", IA3Config(task_type=TaskType.SEQ_2_SEQ_LM))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=g))
    peft.eval()
    engine = Engine(backbone, chunk_rows=0)
    slots, tasks = [], []
    for t in range(n_tasks):
        vectors: dict[str, torch.Tensor] = {}
        for name, param in peft.named_parameters():
            if name.endswith(f"ia3_l.t{t}"):
                stack = "encoder" if name.split("base_model.model.")[-1].startswith("encoder") else "decoder"
                layer = int(name.split(".block.")[1].split(".")[0])
                module = name.split(".ia3_l")[0].rsplit(".", 2)[-2:]
                site = {("SelfAttention", "k"): "k_out", ("SelfAttention", "v"): "v_out",
                        ("DenseReluDense", "wo"): "ffn_out_in", ("EncDecAttention", "k"): "cross_k_out",
                        ("EncDecAttention", "v"): "cross_v_out"}[tuple(module)]
                if stack == "decoder" and site in ("k_out", "v_out", "ffn_out_in"):
                    site = "dec_" + site
                vectors.setdefault(site, torch.ones(*backbone.spec.sites[site]))[layer] = param.detach().reshape(-1)
        choices, template = verbalizers[t % 4], templates[t % 4]
        adapter = TaskAdapter(labels=choices, parts={"ia3": Ia3Weights(vectors),
                                                     "choices": choices_from_text(tokenizer, choices, template)})
        slots.append(engine.load(adapter).slot)
        tasks.append((choices, template))
    rng = random.Random(0)
    words = ["the", "a", "package", "server", "library", "tool", "for", "with", "fast", "small", "graphical", "editor", "network", "game"]
    texts = [" ".join(rng.choice(words) for _ in range(args.t5_words)) for _ in range(n_tasks * rows_per_task)]
    assignment = [i % n_tasks for i in range(len(texts))]
    rng.shuffle(assignment)
    enc = engine.tokenize(texts)
    task_slots = torch.tensor([slots[a] for a in assignment])

    def engine_run() -> torch.Tensor:
        return engine.forward(enc["input_ids"], enc["attention_mask"], task_slots)

    def templated(text: str, template: str | None) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        if not template:
            return ids
        before, after = template.split("{text}")
        side = [tokenizer(s, add_special_tokens=False)["input_ids"] if s.strip() else [] for s in (before, after)]
        return side[0] + ids[:-1] + side[1] + ids[-1:]

    per_task = []  # (adapter name, input ids, mask, choice ids [C, Lc], choice mask, rows)
    for t in range(n_tasks):
        rows = [i for i, a in enumerate(assignment) if a == t]
        choices, template = tasks[t]
        batch = tokenizer.pad({"input_ids": [templated(texts[i], template) for i in rows]}, return_tensors="pt")
        labels = tokenizer.pad({"input_ids": [tokenizer(c)["input_ids"] for c in choices]}, return_tensors="pt")
        per_task.append((f"t{t}", batch["input_ids"], batch["attention_mask"], labels["input_ids"],
                         labels["attention_mask"], rows))

    def peft_run() -> torch.Tensor:
        out = torch.full((len(texts), 4), float("-inf"))
        with torch.inference_mode():
            for name, ids, mask, labels, lmask, rows in per_task:
                peft.set_adapter(name)
                hidden = peft.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                R, C = ids.shape[0], labels.shape[0]
                flat = labels.repeat(R, 1)
                dec_in = torch.cat([torch.zeros(R * C, 1, dtype=torch.long), flat[:, :-1]], 1)
                logits = peft(encoder_outputs=BaseModelOutput(hidden.repeat_interleave(C, 0)),
                              attention_mask=mask.repeat_interleave(C, 0), decoder_input_ids=dec_in).logits
                lp = torch.log_softmax(logits.float(), -1).gather(-1, flat[..., None]).squeeze(-1)
                m = lmask.repeat(R, 1)
                out[rows, :C] = ((lp * m).sum(-1) / m.sum(-1)).view(R, C)
        return out

    ours, theirs = engine_run(), peft_run()
    finite = torch.isfinite(theirs)
    agree = float((ours[finite] - theirs[finite]).abs().max())
    times: dict[str, list[tuple[float, float]]] = {"engine": [], "peft": []}
    for _ in range(args.repeats):
        for name, fn in (("engine", engine_run), ("peft", peft_run)):
            times[name].append(timed(fn))
    # calls during which the process had its cores (CPU ÷ wall near the thread count), as bench_family does
    busy = {k: [w for w, c in v if c / w >= 0.8 * args.threads] or [w for w, _ in v] for k, v in times.items()}
    engine_ms, peft_ms = (statistics.median(busy[k]) * 1e3 for k in ("engine", "peft"))
    result = {"clean_calls": {k: len(v) for k, v in busy.items()}, "tasks": n_tasks, "rows": len(texts), "rows_per_task": rows_per_task, "shape": args.shape,
              "engine_ms": engine_ms, "peft_one_task_at_a_time_ms": peft_ms, "speedup": peft_ms / engine_ms,
              "max_abs_score_difference": agree}
    print(f"T5 rank classification, {n_tasks} tasks x {rows_per_task} rows mixed ({args.shape} shape): engine "
          f"{engine_ms:.1f} ms, PEFT one task at a time {peft_ms:.1f} ms -> {peft_ms / engine_ms:.2f}x "
          f"(scores agree within {agree:.1e})")
    return result


def t5_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """T5 rank classification, engine vs PEFT one task at a time, at each --t5-rows-per-task; `--t5` only."""
    return [t5_rank(args, int(n)) for n in args.t5_rows_per_task.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="about this many tokens per row")
    parser.add_argument("--repeats", type=int, default=7, help="clean timed calls wanted of each side (median)")
    parser.add_argument("--family-seconds", type=float, default=30.0,
                        help="timing budget per family (at least 3 rounds are run whatever it is)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk-rows", type=int, default=None, help="the engine's chunk_rows (default: its own)")
    parser.add_argument("--t5", action="store_true", help="also the T5 rank-classification comparison")
    parser.add_argument("--t5-only", action="store_true", help="only the T5 comparison (no encoder families)")
    parser.add_argument("--t5-rows-per-task", default="1,4", help="rows of each of the 16 tasks, comma-separated")
    parser.add_argument("--t5-words", type=int, default=12, help="words per T5 input text")
    parser.add_argument("--out", type=Path, default=Path("bench/out/backbones.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    ids, mask = batch_of(tokenizer, args.rows, args.tokens, seed=1)
    lengths = mask.sum(1)
    print(f"shape {args.shape} {shape}, {args.threads} threads, fp32 CPU; {args.rows} rows × {NUM_TASKS} (IA)3 tasks "
          f"mixed; tokens per row {int(lengths.min())}-{int(lengths.max())} (mean {lengths.float().mean():.1f}), "
          f"padded to {ids.shape[1]}; interleaved rounds until {args.repeats} clean calls each (or "
          f"{args.family_seconds:.0f} s), median")
    print("bare: HF forward, whole padded batch; chunked: HF forward on the engine's own length-sorted chunks.\n"
          "bare/eng: bare time ÷ engine time (target ≥ 0.9), medians of the clean calls (the process had its cores);\n"
          "(all): medians of every call; (min): of the fastest calls; clean: clean calls engine/bare/chunked, "
          "'!' = under 3, so the medians are of every call")
    results = []
    print(f"\n{'family':12s}{'(IA)3 sites':36s}{'engine ms':>10s}{'bare ms':>9s}{'chunked ms':>11s}"
          f"{'bare/eng':>10s}{'(all)':>7s}{'(min)':>7s}{'chunk/eng':>11s}{'clean':>10s}")
    for name in ([] if args.t5_only else args.families.split(",")):
        r = bench_family(name, shape, tokenizer, ids, mask, args)
        results.append(r)
        clean = "/".join(str(n) for n in r["clean_calls"].values()) + ("" if r["clean"] else "!")
        flag = "" if r["bare_over_engine"] >= 0.9 else "  < 0.9"
        print(f"{name:12s}{','.join(r['sites']):36s}{r['engine_ms']:10.1f}{r['bare_ms']:9.1f}{r['bare_chunked_ms']:11.1f}"
              f"{r['bare_over_engine']:10.3f}{r['bare_over_engine_all']:7.3f}{r['bare_over_engine_min']:7.3f}"
              f"{r['chunked_over_engine']:11.3f}{clean:>10s}{flag}", flush=True)
    t5 = t5_section(args) if args.t5 or args.t5_only else None
    summary = {"shape": args.shape, **shape, "rows": args.rows, "tokens_target": args.tokens,
               "tokens": int(lengths.sum()), "padded_width": int(ids.shape[1]), "threads": args.threads,
               "repeats": args.repeats, "tasks": NUM_TASKS, "torch": torch.__version__,
               "transformers": tf.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
               "families": results, "t5": t5}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({r["family"]: round(r["bare_over_engine"], 3) for r in results}))


if __name__ == "__main__":
    main()
