"""Train (or adopt) the run's tokenizer and save it as a Hugging Face tokenizer folder.

    python -m stages.tokenizer --run-dir runs/tiny

Trains byte-level BPE on `tokenizer.corpus` (default: the pretrain corpus), or adopts
`tokenizer.pretrained` / the base model's tokenizer. Output: RUN_DIR/tokenizer/final.
"""

from __future__ import annotations

import time

from data.sources import iter_text, load_texts
from pipeline.orchestration.stage import StageContext, StageResult, run_stage
from stages.tokenizer.bpe import adopt_pretrained, train_bpe


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.tokenizer
    started = time.perf_counter()
    metrics: dict = {}
    if context.is_main:
        pretrained = section.pretrained or config.model.base_model
        if pretrained is not None:
            tokenizer = adopt_pretrained(pretrained, config.model.revision, config.model.trust_remote_code)
            metrics["source"] = pretrained
        else:
            corpus = load_texts(config.tokenizer_corpus, cache_dir=context.run_dir / "cache" / "datasets")
            tokenizer = train_bpe(iter_text(corpus, section.max_chars), section.vocab_size, section.min_frequency)
            metrics["source"] = "trained"
            metrics["corpus_documents"] = len(corpus)
        tokenizer.save_pretrained(context.output_dir)
        metrics.update(vocab_size=len(tokenizer), seconds=round(time.perf_counter() - started, 2))
        context.tracker.log({"tokenizer/vocab_size": len(tokenizer)}, step=0)
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("tokenizer", train)
