"""Talk to a run's policy in the terminal: one prompt for scripts, or a multi-turn chat.

    chatpipe chat RUN_DIR [--stage ppo|dpo|sft|pretrain] [--prompt TEXT] [--temperature 0.7] ...

The policy is the first completed of ppo, dpo, sft, pretrain (or the stage named), found through the
manifest like any later stage would. Replies are streamed token by token: the generation engine
(pipeline/models/generation.py) runs in a background thread and feeds transformers'
`TextIteratorStreamer`, which the caller iterates. `chatpipe serve` (pipeline/apps/serve.py)
batches requests through pipeline/apps/batching.py on the same engine, and shares this module's
policy loading, prompt fitting and sampling settings; a seed draws from a private generator and
never moves the global RNG.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from pipeline.errors import ConfigError, ManifestError
from pipeline.models.checkpoints import adapter_base, is_adapter, load_causal_lm
from pipeline.models.generation import Sampling, generate, seeded_generator
from pipeline.orchestration.manifest import altered_files, manifest_path, read_manifest, resolve_input

# The stages whose output is a policy one can talk to, best first: PPO and DPO refine SFT refines pretrain.
POLICY_STAGES = ("ppo", "dpo", "sft", "pretrain")


# ---------------------------------------------------------------------------------------------
# Which checkpoint


def resolve_policy_stage(run_dir: str | Path, stage: str | None = None) -> tuple[str, Path]:
    """(stage, checkpoint folder) of the policy to talk to; see `resolve_policy`."""
    manifest = read_manifest(run_dir)
    where = manifest_path(run_dir)
    completed = [name for name in POLICY_STAGES if name in manifest.stages and manifest.stages[name].status == "completed"]
    if stage is None:
        if not completed:
            statuses = ", ".join(
                f"{name} {manifest.stages[name].status}"
                for name in reversed(POLICY_STAGES) if name in manifest.stages
            ) or "none has run"
            raise ManifestError(
                f"{where}: no policy stage of run {run_dir} is completed ({statuses}); "
                f"finish one first, e.g. `chatpipe stage pretrain --run-dir {run_dir}`"
            )
        stage = completed[0]
    elif stage not in POLICY_STAGES:
        raise ManifestError(
            f"{where}: stage {stage!r} is not a policy one can chat with; choose one of {', '.join(POLICY_STAGES)}"
        )
    elif stage not in completed:
        status = manifest.stages[stage].status if stage in manifest.stages else "not run"
        hint = f"completed: {', '.join(completed)}" if completed else "no policy stage is completed yet"
        raise ManifestError(
            f"{where}: stage {stage!r} of run {run_dir} is {status}, not completed ({hint}); "
            f"pick a completed stage or finish it with `chatpipe stage {stage} --run-dir {run_dir}`"
        )
    # Not refused when altered (chat changes nothing, and one may want to poke at a damaged model):
    # `checkpoint_warning` says so instead.
    found = resolve_input(run_dir, manifest, stage, verify=False)
    return stage, Path(found.path)


def checkpoint_warning(run_dir: str | Path, stage: str) -> str | None:
    """A warning when `stage`'s checkpoint no longer matches its manifest record, else None.

    Hashes every recorded file: milliseconds for the demo's checkpoints, before loading them anyway.
    """
    entry = read_manifest(run_dir).stages[stage]
    changed = altered_files(run_dir, entry.output) if entry.output is not None else []
    if not changed:
        return None
    return (
        f"chatpipe: warning: the {stage} checkpoint was altered since {manifest_path(run_dir)} recorded it "
        f"(changed or missing: {', '.join(changed[:5])}); its replies are not the trained model's. "
        f"Rebuild it with `chatpipe run CONFIG --run-dir {run_dir}`"
    )


def resolve_policy(run_dir: str | Path, stage: str | None = None) -> Path:
    """The checkpoint folder to talk to: `stage`'s output, or the first completed of ppo, dpo, sft, pretrain.

    Raises ManifestError naming the run dir, the stage and what is completed when none fits.
    """
    return resolve_policy_stage(run_dir, stage)[1]


def load_policy(
    run_dir: str | Path, stage: str, folder: str | Path, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_chat_model` for `stage` of a run: a checkpoint that cannot be loaded (weights truncated
    or deleted since the stage recorded them) is a ManifestError naming its files and the fix,
    not transformers' traceback."""
    try:
        return load_chat_model(folder, device)
    except Exception as error:  # safetensors, transformers and tokenizers (plain Exception) each raise their own kinds
        entry = read_manifest(run_dir).stages[stage]
        changed = altered_files(run_dir, entry.output) if entry.output is not None else []
        if not changed and not isinstance(error, (OSError, ValueError, SafetensorError)):
            raise  # the checkpoint is as recorded: a fault of this code, with its traceback
        files = [f"{Path(folder) / name} {'changed' if (Path(folder) / name).exists() else 'went missing'}"
                 for name in changed[:5]]
        damaged = (f"{', '.join(files)} since {manifest_path(run_dir)} recorded it" if changed
                   else f"{Path(folder)}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
        raise ManifestError(
            f"the {stage} checkpoint cannot be loaded: {damaged}; rebuild it with "
            f"`chatpipe run CONFIG --run-dir {run_dir}`, or choose another --stage"
        ) from error


def check_seed(seed: int | None) -> int | None:
    """`seed` as given, refused unless a torch generator can take it as is (0 to 2**63 - 1)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ConfigError(f"seed {seed!r} is out of range; use a whole number from 0 to 2**63 - 1")
    return seed


def load_chat_model(folder: str | Path, device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a full or adapter checkpoint, on a GPU when there is one."""
    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(folder).to(device)
    model.eval()
    # Every stage saves its tokenizer next to its weights; an adapter made elsewhere may only have it on its base.
    has_tokenizer = (folder / "tokenizer_config.json").exists() or not is_adapter(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else adapter_base(folder))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingSettings(Sampling):
    """How replies are sampled: chat's defaults on top of the generation engine's settings."""

    temperature: float = 0.7  # 0 = greedy: always the likeliest token, so replies are reproducible
    top_p: float = 0.9  # nucleus sampling: keep the likeliest tokens covering this much probability
    top_k: int = 0  # keep only the k likeliest tokens; 0 = off
    max_new_tokens: int = 256  # reply length at most, in tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens} must be at least 1")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_tokens: int | None) -> list[int]:
    """The chat-formatted prompt, ending in the assistant's turn marker, left-truncated to `max_tokens`.

    Whole early turns go first (a leading system message stays), so the model still sees complete
    turns; only a last turn too long on its own is cut mid-text. Control tokens typed inside a
    message are encoded as plain text, so a user cannot forge a turn boundary.

    How many early turns to drop is a binary search (dropping more never makes the prompt longer),
    so a long conversation costs about log2(messages) renders, not one per dropped message: 2,000
    short messages took 40 s dropping one at a time, inside the server's generation lock.
    """

    def render(selected: list[dict]) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            selected, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
        )
        return list(encoded["input_ids"])

    ids = render(messages)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    # The fewest leading turns to drop so the rest fits; the last turn always stays.
    low, high = 1, len(rest) - 1  # dropping `high` keeps only the last turn
    fitting = None
    while low <= high:
        middle = (low + high) // 2
        candidate = render(system + rest[middle:])
        if len(candidate) <= max_tokens:
            fitting, high = candidate, middle - 1
        else:
            low = middle + 1
    if fitting is not None:
        return fitting
    return render(system + rest[-1:])[-max_tokens:] if rest else ids[-max_tokens:]


def fit_prompt(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_new_tokens: int
) -> tuple[list[int], int]:
    """(prompt ids, reply length) that fit the model's context together.

    The prompt gives way to the reply, but keeps at least half the context (or all of itself).
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return prompt_ids(tokenizer, messages, None), max_new_tokens
    whole_prompt = prompt_ids(tokenizer, messages, None)
    max_new_tokens = min(max_new_tokens, context - min(len(whole_prompt), context // 2))
    if len(whole_prompt) <= context - max_new_tokens:
        return whole_prompt, max_new_tokens
    return prompt_ids(tokenizer, messages, context - max_new_tokens), max_new_tokens


class ReplyStream:
    """One reply being generated: iterate it for text pieces as they come.

    After iteration ends, `completion_tokens` counts the generated tokens (EOS included) and
    `finish_reason` is "stop" (the model ended its turn) or "length" (max_new_tokens reached).
    Closing the iterator early stops generation.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict],
        settings: SamplingSettings,
        seed: int | None = None,
    ):
        self.model, self.tokenizer, self.settings, self.seed = model, tokenizer, settings, check_seed(seed)
        self.input_ids, self.max_new_tokens = fit_prompt(model, tokenizer, messages, settings.max_new_tokens)
        self.prompt_tokens = len(self.input_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)  # gets generated tokens only
        self._pieces = self._read()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

    def _read(self) -> Iterator[str]:
        thread = threading.Thread(target=self._generate, name="chatpipe-generate", daemon=True)
        thread.start()
        try:
            for text in self._streamer:
                if text:
                    yield text
        finally:
            self._stop.set()
            thread.join()
        if self._error is not None:
            raise self._error

    def _generate(self) -> None:
        device = self.model.device
        input_ids = torch.tensor([self.input_ids], dtype=torch.long, device=device)
        generated: list[int] = []

        def on_tokens(tokens: torch.Tensor) -> bool:
            generated.append(int(tokens[0]))
            self._streamer.put(tokens.cpu())
            return self._stop.is_set()  # the reader has gone: closed stream, client disconnected, Ctrl-C

        try:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            generate(
                self.model, input_ids, torch.ones_like(input_ids), max_new_tokens=self.max_new_tokens,
                sampling=self.settings, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad,
                generator=seeded_generator(self.seed, device) if self.seed is not None else None, on_tokens=on_tokens,
            )
            self.completion_tokens = len(generated)
            self.finish_reason = "stop" if self.tokenizer.eos_token_id in generated else "length"
        except BaseException as error:  # handed to the reading thread, which raises it
            self._error = error
        finally:
            self._streamer.end()  # flush the last text and unblock the reader


def start_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    settings: SamplingSettings | None = None,
    seed: int | None = None,
) -> ReplyStream:
    """A streamed reply to `messages` (role/content dicts); generation starts on first iteration."""
    return ReplyStream(model, tokenizer, messages, settings or SamplingSettings(), seed)


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    settings: SamplingSettings | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """The assistant's reply to `messages`, as text pieces while they are generated."""
    yield from start_reply(model, tokenizer, messages, settings, seed)


def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    settings: SamplingSettings | None = None,
    seed: int | None = None,
) -> str:
    """The assistant's whole reply to `messages`."""
    return "".join(stream_reply(model, tokenizer, messages, settings, seed))


# ---------------------------------------------------------------------------------------------
# Terminal


USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "
HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def run_repl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: SamplingSettings | None = None,
    input_stream: TextIO = sys.stdin,
    output_stream: TextIO = sys.stdout,
    name: str | None = None,
) -> None:
    """A multi-turn chat: each reply sees the whole conversation so far, and is written as it streams."""
    settings = settings or SamplingSettings()
    interactive = input_stream is sys.stdin and output_stream is sys.stdout and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    write = output_stream.write
    write(f"Chatting with {name or 'the model'}. {HELP}\n")
    messages: list[dict] = []
    while True:
        try:
            if interactive:
                line = input(USER_PROMPT) + "\n"
            else:
                write(USER_PROMPT)
                output_stream.flush()
                line = input_stream.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:  # end of input
            write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = []
            write("(conversation cleared)\n")
            continue
        if text == "/help":
            write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": text})
        write(ASSISTANT_PREFIX)
        pieces = []
        stream = stream_reply(model, tokenizer, messages, settings)
        try:
            for piece in stream:
                pieces.append(piece)
                write(piece)
                output_stream.flush()
        except KeyboardInterrupt:
            stream.close()
            messages.pop()  # the interrupted turn is forgotten, as if never asked
            write("\n(interrupted)\n")
            continue
        write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
    output_stream.flush()


def chat_command(
    run_dir: str | Path,
    stage: str | None = None,
    prompt: str | None = None,
    settings: SamplingSettings | None = None,
    seed: int | None = None,
) -> int:
    """`chatpipe chat`: print the reply to `prompt` alone (for scripts), or chat in the terminal."""
    check_seed(seed)
    stage, folder = resolve_policy_stage(run_dir, stage)
    warning = checkpoint_warning(run_dir, stage)
    model, tokenizer = load_policy(run_dir, stage, folder)  # a checkpoint that cannot load stops here, unwarned
    if warning:
        print(warning, file=sys.stderr)
    settings = settings or SamplingSettings()
    if prompt is not None:
        for piece in stream_reply(model, tokenizer, [{"role": "user", "content": prompt}], settings, seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    run_repl(model, tokenizer, settings, name=f"{stage} policy at {folder}")
    return 0
