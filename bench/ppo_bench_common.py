"""What both PPO benchmark workers share: loading the prepared models, a seeded held-out score, memory.

    from ppo_bench_common import load_models, held_out_score, peak_rss_mb

Imported by bench/chatpipe_ppo_worker.py (main venv) and bench/trl_ppo_worker.py (the TRL 1.12
venv), so it uses torch and transformers only, never chatpipe or TRL: the score before and after
training is then measured by the same code on both sides, whatever each trainer logs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_config() -> dict:
    """A worker's settings: the JSON file named by its one argument."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} CONFIG.json")
    return json.loads(Path(sys.argv[1]).read_text())


def emit(result: dict) -> None:
    """The worker's answer: one JSON object on the real stdout (trainers' prints go to stderr)."""
    sys.__stdout__.write(json.dumps(result) + "\n")
    sys.__stdout__.flush()


def load_models(folder: str | Path, *, value: bool = True):
    """(tokenizer, policy, reference, value or None, reward), all fp32, from the prepared folder.

    The value model starts from the reward model, as chatpipe's PPO stage and TRL's examples do.
    The reward is the known one (`target_count_reward`), computed alongside the reward model.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1, dtype=torch.float32) if value else None
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1, dtype=torch.float32)
    reward = target_count_reward(reward_model, json.loads((folder / "reward_targets.json").read_text()))
    return tokenizer, policy, reference, value_model, reward


def target_count_reward(reward_model, target_ids: list[int]):
    """The known synthetic reward, as a module both trainers call like a reward model.

    Its score at every position is the number of tokens so far that are in `target_ids`, tokens
    that no prompt contains. Read at the last real token, as both trainers read a reward model,
    it is the number of target tokens in the response: a known quantity, which the held-out
    evaluation measures to ~0.1 token, and which RL with a working gradient raises within a few
    hundred episodes.

    The module has the shape TRL's `get_reward` and chatpipe's `per_token_scores` expect from
    AutoModelForSequenceClassification: a backbone under `base_model_prefix` whose output has
    `last_hidden_state` / `hidden_states`, and a `score` head. Its backbone also runs the real
    reward model's transformer on the same tokens, so the reward costs what a reward model costs
    and the throughput comparison is unchanged; that output enters the score multiplied by 0.
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = getattr(reward_model, reward_model.base_model_prefix)
            indicator = torch.zeros(reward_model.config.vocab_size)
            indicator[torch.tensor(target_ids)] = 1.0
            self.register_buffer("indicator", indicator)

        def forward(self, input_ids, attention_mask, position_ids=None, **_):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
            count = (self.indicator[input_ids] * attention_mask.float()).cumsum(1)
            state = count.unsqueeze(-1) + 0.0 * hidden[..., :1]
            return BaseModelOutputWithPast(last_hidden_state=state, hidden_states=(state,))

    class TargetCountReward(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone, self.score, self.config = Backbone(), torch.nn.Identity(), reward_model.config

    return TargetCountReward().eval().requires_grad_(False)


def left_pad(prompts: list[list[int]], pad_token_id: int):
    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def response_token_count(responses, eos_token_id: int) -> int:
    """Response tokens up to and including the first EOS (all of them when there is none)."""
    import torch

    is_eos = responses == eos_token_id
    length = responses.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((responses.shape[0],), length - 1))
    return int((first + 1).sum())


def held_out_score(policy, reward_model, tokenizer, prompts: list[list[int]], *, response_length: int,
                   temperature: float, seed: int, samples_per_prompt: int = 1, batch_size: int = 16,
                   reference=None) -> dict:
    """Mean reward-model score of seeded samples on held-out prompts, plus length and EOS rate, and
    with a `reference` the KL from the policy to it.

    Each prompt is sampled `samples_per_prompt` times: one sample of 64 prompts leaves a standard
    error of about 0.1 on a score that spreads ~1, as large as the gains being measured.

    Sampling as both trainers do (temperature, top_k=0, top_p=1), responses cut after the first
    EOS, the reward read at the last real token with positions counted over real tokens only.

    KL: the mean over the sampled response tokens of log p(token) - log q(token), both at the
    sampling temperature (the k1 estimate of KL(policy || reference), unbiased on the policy's own
    samples), per token (`kl`) and summed per response (`kl_per_response`). The same code measures
    both trainers, whatever estimator each one logs.
    """
    import torch
    from transformers import GenerationConfig

    was_training = policy.training
    policy.eval()
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    config = GenerationConfig(max_new_tokens=response_length, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    prompts = [ids for ids in prompts for _ in range(samples_per_prompt)]
    scores, lengths, eos, kl = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            query_ids, query_mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id)
            sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
            responses = sequences[:, query_ids.shape[1]:]
            is_eos = responses == tokenizer.eos_token_id
            has_eos = is_eos.any(1)
            first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, responses.shape[1] - 1, dtype=torch.long))
            response_mask = (torch.arange(responses.shape[1]).expand_as(responses) <= first.unsqueeze(1)).long()
            responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
            ids = torch.cat([query_ids, responses], 1)
            mask = torch.cat([query_mask, response_mask], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            backbone = getattr(reward_model, reward_model.base_model_prefix)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
            per_token = reward_model.score(hidden).squeeze(-1).float()
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
            scores.append(per_token.gather(1, last.unsqueeze(1)).squeeze(1))
            lengths.append(response_mask.sum(1).float())
            eos.append(has_eos.float())
            if reference is not None:
                kl.append(sequence_log_ratio(policy, reference, ids, mask, positions, responses.shape[1], temperature, response_mask))
    torch.set_rng_state(state)
    policy.train(was_training)
    scores, lengths = torch.cat(scores), torch.cat(lengths)
    result = {"score": float(scores.mean()), "score_standard_error": float(scores.std() / len(scores) ** 0.5),
              "samples": len(prompts), "response_length": float(lengths.mean()), "eos_fraction": float(torch.cat(eos).mean())}
    if kl:
        per_response = torch.cat(kl)
        result.update(kl=float(per_response.sum() / lengths.sum()), kl_per_response=float(per_response.mean()))
    return result


def sequence_log_ratio(policy, reference, ids, mask, positions, response_length: int, temperature: float, response_mask):
    """Per response: the summed log p - log q of its tokens, at the sampling temperature."""
    import torch

    def logprobs(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logits = logits[:, -response_length - 1:-1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -response_length:].unsqueeze(-1)).squeeze(-1)

    return ((logprobs(policy) - logprobs(reference)) * response_mask).sum(1)


def first_and_last(per_rollout: list[float], count: int = 3) -> tuple[float, float]:
    """Mean training score of the first and of the last `count` rollouts (one rollout is 16 episodes: noisy)."""
    count = max(1, min(count, len(per_rollout) // 2 or 1))
    return sum(per_rollout[:count]) / count, sum(per_rollout[-count:]) / count


def profiled(path: str | None):
    """A cProfile.Profile writing to `path` on exit, or a no-op context when path is None."""
    import contextlib
    import cProfile

    if not path:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(path)

    return run()


class GarbageCollectionTimer:
    """Seconds spent in Python's garbage collector (automatic and explicit `gc.collect()`), via gc.callbacks."""

    def __init__(self):
        import gc
        import time

        self.seconds, self.collections, self._clock, self._started = 0.0, 0, time.perf_counter, None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            self.seconds += self._clock() - self._started
            self.collections += 1
            self._started = None


def environment() -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return info
