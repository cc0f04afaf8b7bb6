"""One SetFit run (Tunstall et al. 2022), for bench/fewshot.py: run in SetFit's own venv, not the project's.

    bench/out/setfit-venv/bin/python bench/setfit_run.py --model DIR --train train.jsonl \
        --test test.jsonl --out result.json [--max-steps 100 --batch-size 16 --max-length 64 --seed 0]

Reads JSONL records with `text` and `label`, fine-tunes the sentence-transformers body contrastively
(CosineSimilarityLoss on same/different-label pairs, SetFit's defaults otherwise) then fits its
logistic-regression head; writes the test predictions, the train seconds and the bytes of the saved
model (body + head, `save_pretrained`) as JSON. Offline: the body is a local directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


def read(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=-1, help="contrastive steps (-1: SetFit's epochs)")
    parser.add_argument("--num-iterations", type=int, default=None, help="pairs per example (SetFit's option)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    torch.set_num_threads(args.threads)
    texts, labels = read(args.train)
    test_texts, _ = read(args.test)
    model = SetFitModel.from_pretrained(str(args.model), local_files_only=True)
    model.model_body.max_seq_length = args.max_length
    options = dict(batch_size=args.batch_size, num_epochs=1, max_steps=args.max_steps, seed=args.seed,
                   report_to="none", save_strategy="no", eval_strategy="no", show_progress_bar=False)
    if args.num_iterations is not None:
        options["num_iterations"] = args.num_iterations
    trainer = Trainer(model=model, args=TrainingArguments(**options),
                      train_dataset=Dataset.from_dict({"text": texts, "label": labels}))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    predictions = [str(p) for p in model.predict(test_texts, batch_size=64, show_progress_bar=False)]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    import setfit
    args.out.write_text(json.dumps({"predictions": predictions, "train_seconds": seconds,
                                    "stored_bytes": sum(files.values()), "files": files,
                                    "setfit_version": setfit.__version__,
                                    "options": {k: v for k, v in options.items() if k != "show_progress_bar"}}))


if __name__ == "__main__":
    main()
