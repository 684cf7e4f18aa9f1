"""Train the judges: reward models on preference pairs the training reward model never sees.

    python -m stages.judges --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.judges --run-dir runs/big

PPO maximises one reward model's score, so that score cannot say whether PPO helped: the policy
learns whatever the model mistakes for quality (Gao et al., 2022). Judges trained on other pairs,
each from its own seed, make other mistakes. Each is trained by the reward stage's loop
(reward_model/training.py) from the pretrained model (`judges.init_from`), on `judges.data` or on
the share of `reward.data` the reward stage left out for them. A share of the judges' prompts is
held out from every judge: eval measures every reward model's accuracy on those pairs, which no
model it reports on has seen.

Output: RUN_DIR/judges/final/judge-<i>/ (each a plain reward-model folder with its
`reward_stats.json`), `judges.json` listing them and any judges given by path, and the held-out
pairs. A killed stage resumes at the judge it was training, from that judge's last checkpoint.
"""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from data.splits import held_out_split
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import make_accelerator
from reward_model.data import load_preference_groups, split_for_judges
from reward_model.judges import PANEL_NAME
from reward_model.provenance import write_held_out
from reward_model.training import Member, train_in_turn


def judge_seed(seed: int, index: int) -> int:
    """Judge `index`'s seed: its head's initialisation and its data order differ from every other model's."""
    return seed + 1000 * (index + 1)


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.judges
    backbone_dir = context.inputs[section.init_from]
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache" / "datasets"
    if section.data is not None:
        groups, rows = load_preference_groups(section.data, section, cache, config_section="judges")
    else:  # the share of reward.data the reward stage left out for the judges
        groups, rows = load_preference_groups(config.reward.data, section, cache, config_section="judges")
        groups = split_for_judges(groups, section.reward_share, config.seed)[1]
    train_groups, held_out = held_out_split(groups, section.validation_fraction, config.seed, what="judge prompts")

    # --------------------------------------------------------------------------- one by one
    members = [
        Member(f"judge-{index}", judge_seed(config.seed, index), context.output_dir / f"judge-{index}",
               context.stage_dir / "checkpoints" / f"judge-{index}")
        for index in range(section.count)
    ]
    trained = train_in_turn(
        members, accelerator, section, backbone_dir, tokenizer, train_groups, held_out,
        tracker=context.tracker, token_cache=context.run_dir / "cache" / "chat_tokens",
    )
    judges, metrics = [], {}
    for member, result in zip(members, trained):
        judges.append({"name": member.name, "folder": member.name, "seed": member.seed, "accuracy": result["accuracy"]})
        metrics.update({f"{member.name}/{key}": result[key] for key in ("accuracy", "shorter_wins_accuracy", "mean_margin", "length_slope")})

    # ----------------------------------------------------------------------------------- save
    if accelerator.is_main_process:
        context.output_dir.mkdir(parents=True, exist_ok=True)
        listing = {"judges": judges, "external": list(section.paths)}
        (context.output_dir / PANEL_NAME).write_text(json.dumps(listing, indent=2) + "\n")
        write_held_out(context.output_dir, held_out)  # each judge's folder names what it trained on
    accelerator.wait_for_everyone()
    accuracies = [judge["accuracy"] for judge in judges]
    return StageResult(context.output_dir, {
        **metrics,
        "judges": len(judges),
        "external_judges": len(section.paths),
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "train_prompts": len(train_groups),
        "held_out_prompts": len(held_out),
        "rows_read": rows.total,
        "rows_dropped": rows.dropped,
        "world_size": accelerator.num_processes,
    })


if __name__ == "__main__":
    run_stage("judges", train)
