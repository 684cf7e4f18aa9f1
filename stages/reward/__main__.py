"""Train a reward model on ranked completions, InstructGPT-style.

    python -m stages.reward --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.reward --run-dir runs/big

The backbone starts from the SFT policy (or the pretrained model: `reward.init_from`) with a new
scalar head, trained by the loop the judges share (reward_model/training.py). When a `judges`
section takes its pairs from `reward.data`, that share of the prompts is left out here. Held-out
accuracy beside the rule "the shorter reply wins" on the same pairs, the mean margin and the score
statistics PPO normalises with go into the manifest. With `reward.ensemble`, more members train
on the same pairs from other seeds (ensemble/member-<i>), for PPO's conservative reward. Output: RUN_DIR/reward/final, a plain
`AutoModelForSequenceClassification`, with `reward_stats.json`, the fingerprints of the pairs it
trained on and the pairs it held out (for eval's accuracy).
"""

from __future__ import annotations

from accelerate.utils import set_seed
from transformers import AutoTokenizer

from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import make_accelerator
from reward_model.data import held_out_groups, load_preference_groups, split_for_judges
from reward_model.provenance import write_held_out
from reward_model.functions import ENSEMBLE_DIR
from reward_model.training import Member, train_in_turn, train_reward_model


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.reward
    backbone_dir = context.inputs[section.init_from]
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache" / "datasets"
    groups, rows = load_preference_groups(section.data, section, cache)
    given_to_judges, judges_share = 0, config.judges_share_of(section.data)
    if judges_share is not None:  # the judges train on a share of these prompts, and hold out eval's from it
        groups, judge_groups = split_for_judges(groups, judges_share, config.seed)
        given_to_judges = len(judge_groups)
    train_groups, validation_groups = held_out_groups(groups, section, config.seed, cache)

    # ----------------------------------------------------------------------------- train, save
    trained = train_reward_model(
        "reward", accelerator, section, backbone_dir, tokenizer, train_groups, validation_groups,
        checkpoint_dir=context.stage_dir / "checkpoints", output_dir=context.output_dir, tracker=context.tracker,
        seed=config.seed, token_cache=context.run_dir / "cache" / "chat_tokens",
    )
    # With reward.ensemble, more members on the same pairs, each from its own seed: ensemble/member-<i>.
    members = [
        Member(f"member-{index}", config.seed + 100 * index, context.output_dir / ENSEMBLE_DIR / f"member-{index}",
               context.stage_dir / "checkpoints" / f"member-{index}")
        for index in range(1, section.ensemble)
    ]
    others = train_in_turn(
        members, accelerator, section, backbone_dir, tokenizer, train_groups, validation_groups,
        tracker=context.tracker, token_cache=context.run_dir / "cache" / "chat_tokens",
    )
    if accelerator.is_main_process:
        write_held_out(context.output_dir, validation_groups)
    ensemble = {f"{member.name}/accuracy": result["accuracy"] for member, result in zip(members, others)}
    return StageResult(context.output_dir, {
        **trained.metrics,
        **ensemble,
        "rows_read": rows.total,
        "rows_dropped": rows.dropped,
        "dropped_reasons": dict(rows.reasons),
        "prompts_given_to_judges": given_to_judges,
    })


if __name__ == "__main__":
    run_stage("reward", train)
