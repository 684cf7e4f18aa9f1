"""Train (or adopt) the run's tokenizer and save it as a Hugging Face tokenizer folder.

    python -m stages.tokenizer --run-dir runs/tiny

Trains byte-level BPE on `tokenizer.corpus` (default: the pretrain corpus), or adopts
`tokenizer.pretrained` / the base model's tokenizer. Output: RUN_DIR/tokenizer/final.
"""

from __future__ import annotations

import time

from data.sources import stream_corpus
from pipeline.config import loading_model
from pipeline.orchestration.stage import StageContext, StageResult, run_stage
from stages.tokenizer.bpe import adopt_pretrained, train_bpe


def build_tokenizer(context: StageContext) -> StageResult:
    """The tokenizer stage: train byte-level BPE on the corpus, or adopt a pretrained tokenizer."""
    config, section = context.config, context.config.tokenizer
    started = time.perf_counter()
    metrics: dict = {}
    if context.is_main:
        pretrained = section.pretrained or config.model.base_model
        if pretrained is not None:
            key, holds = ("tokenizer.pretrained", "tokenizer_config.json") if section.pretrained else ("model.base_model", "config.json")
            with loading_model(key, pretrained, holds):
                tokenizer = adopt_pretrained(pretrained, config.model.revision, config.model.trust_remote_code)
            metrics["source"] = pretrained
        else:
            # Streamed: a hub corpus is read only as far as max_rows / max_chars take it.
            documents = 0

            def counted(batches):
                nonlocal documents
                for batch in batches:
                    documents += len(batch)
                    yield batch

            corpus = stream_corpus(config.tokenizer_corpus, context.run_dir / "cache" / "datasets", max_chars=section.max_chars)
            tokenizer = train_bpe(counted(corpus), section.vocab_size, section.min_frequency)
            metrics["source"] = "trained"
            metrics["corpus_documents"] = documents
        tokenizer.save_pretrained(context.output_dir)
        metrics.update(vocab_size=len(tokenizer), seconds=round(time.perf_counter() - started, 2))
        context.tracker.log({"tokenizer/vocab_size": len(tokenizer)}, step=0)
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("tokenizer", build_tokenizer)
