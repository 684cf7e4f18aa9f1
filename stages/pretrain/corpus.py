"""The pretraining corpus as a token store (data/token_store.py), tokenized once per run and read as blocks."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from data.sources import stream_corpus
from data.token_store import Blocks, TokenStore, build_token_store, cores_per_process, wait_for_store
from pipeline.config import PretrainConfig, config_hash, corpus_sources
from pipeline.errors import DataError
from pipeline.orchestration.manifest import hash_file


def prepare_store(
    section: PretrainConfig, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, cache_root: Path,
    *, worker: int = 0, workers: int = 1,
) -> TokenStore:
    """The corpus's token store under `cache_root/<key>/`, built there on first use.

    The key names the corpus (and its files' contents), the tokenizer and the shard size, not the
    block size: blocks are cut when read, so changing `block_size` reuses the store. `worker` of
    `workers` are this machine's processes, which tokenize their shares of the shards together.
    """
    sources = corpus_sources(section.data)
    files = {name: hash_file(Path(name)) for source in sources if source.path for name in source.files()}
    key = {
        # One source keys its store as it always did, so an existing store is found again.
        "data": sources[0].model_dump() if len(sources) == 1 else [source.model_dump() for source in sources],
        "files": files or None,
        "tokenizer": hash_file(tokenizer_dir / "tokenizer.json") if (tokenizer_dir / "tokenizer.json").exists() else str(tokenizer_dir),
        "shard_mb": section.shard_mb,
    }
    folder = cache_root / config_hash(key)
    if any(source.hub is not None for source in sources) and workers > 1:
        # Every worker reads the whole stream to find its shards: free for local files (the page
        # cache), one download per process from the hub. So there the first process streams and
        # encodes on every core, and the others wait for its store.
        if worker != 0:
            return wait_for_store(folder)
        worker, workers = 0, 1
    # Each process's share of the cores for the Rust tokenizer (read when its thread pool starts).
    os.environ.setdefault("RAYON_NUM_THREADS", str(cores_per_process(workers)))
    return build_token_store(
        folder,
        stream_corpus(sources, cache_dir=cache_root.parent / "datasets"),
        tokenizer.backend_tokenizer,
        tokenizer.eos_token_id,
        len(tokenizer),
        shard_bytes=int(section.shard_mb * (1 << 20)),
        worker=worker,
        workers=workers,
        progress=worker == 0,
    )


def prepare_blocks(store: TokenStore, section: PretrainConfig) -> tuple[Blocks, Blocks]:
    """(train, validation) blocks of `section.block_size` tokens from the store."""
    try:
        return store.blocks(section.block_size, section.validation_fraction)
    except ValueError as error:
        names = ", ".join(source.hub or source.path for source in corpus_sources(section.data))
        raise DataError(f"{names}: {error}; add text or lower pretrain.block_size") from None
