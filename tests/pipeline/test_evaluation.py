"""The statistics behind eval's verdict, against hand-computed values."""

import math

import pytest
import torch

from pipeline.evaluation.comparison import (
    Estimate,
    correlation,
    judge_agreement,
    length_controlled_win_rate,
    length_differences,
    logistic_intercepts,
    matched_length_win_rate,
    outcomes,
    percentile_interval,
    prompt_resamples,
    win_rate,
)
from pipeline.evaluation.replies import distinct_n, normalized_reply, reply_statistics
from pipeline.evaluation.verdict import verdict_lines


def test_outcomes_compare_every_reply_with_every_reply_to_the_same_prompt():
    challenger = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    baseline = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    expected = torch.tensor([
        [[1.0, 0.5, 1.0], [0.0, 0.0, 0.5]],  # 2.0 and 0.0 against 1.0, 2.0, 0.0
        [[0.5, 1.0, 0.0], [0.5, 1.0, 0.0]],  # 1.0 and 1.0 against 1.0, 0.0, 3.0
    ], dtype=torch.float64)
    assert torch.equal(outcomes(challenger, baseline), expected)


def test_win_rate_weighs_prompts_equally_and_ties_half():
    # Prompt 0: 1 win out of 1; prompt 1: a tie and a loss -> (1 + 0.25) / 2.
    outcome = outcomes(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0], [1.0]]))
    resamples = prompt_resamples(2, samples=500, seed=0)
    estimate = win_rate(outcome, resamples)
    assert estimate.value == pytest.approx((1.0 + 0.25) / 2)
    assert estimate.count == 4
    assert 0.25 <= estimate.low <= estimate.value <= estimate.high <= 1.0


def test_the_bootstrap_interval_covers_what_resampling_prompts_gives():
    resamples = prompt_resamples(3, samples=4000, seed=1)
    assert resamples.shape == (4000, 3) and torch.equal(resamples.sum(1), torch.full((4000,), 3.0, dtype=torch.float64))
    outcome = outcomes(torch.tensor([[1.0], [1.0], [0.0]]), torch.tensor([[0.0], [0.0], [1.0]]))  # wins 1, 1, 0
    estimate = win_rate(outcome, resamples)
    # Three prompts drawn with replacement: the mean is k/3 with k ~ Binomial(3, 2/3), and
    # P(k = 0) = 1/27 > 2.5%, P(k = 3) = 8/27: the central 95% runs from 0 to 1.
    assert estimate.value == pytest.approx(2 / 3)
    assert estimate.low == 0.0 and estimate.high == 1.0
    narrower = win_rate(outcome, resamples, level=0.5)  # P(k <= 1) = 7/27 > 25%, P(k = 3) = 8/27 > 25%
    assert narrower.low == pytest.approx(1 / 3) and narrower.high == pytest.approx(1.0)


def test_percentile_interval_ignores_resamples_with_nothing_to_measure():
    values = torch.tensor([float("nan"), 0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert percentile_interval(values, level=0.5) == pytest.approx((1.0, 3.0))
    assert all(math.isnan(v) for v in percentile_interval(torch.tensor([float("nan")])))


def test_logistic_fit_recovers_a_known_intercept():
    # Two features: 1 and x in {-1, 1}; P(win | x) = 0.8 at x = 1, 0.4 at x = -1, equal counts.
    features = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0.8, 0.4], dtype=torch.float64)
    intercept = logistic_intercepts(features, labels, torch.ones(1, 2, dtype=torch.float64))[0]
    # logit(0.8) = a + b and logit(0.4) = a - b: a = (logit(0.8) + logit(0.4)) / 2.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert intercept.item() == pytest.approx((logit(0.8) + logit(0.4)) / 2, abs=1e-6)


def test_length_control_removes_a_win_that_is_only_length():
    # The challenger wins exactly when its reply is shorter: at equal length it wins half the time.
    generator = torch.Generator().manual_seed(0)
    lengths_a = torch.randint(5, 50, (200, 2), generator=generator)
    lengths_b = torch.randint(5, 50, (200, 2), generator=generator)
    score_a, score_b = -lengths_a.double(), -lengths_b.double()
    outcome = outcomes(score_a, score_b)
    resamples = prompt_resamples(200, samples=200, seed=0)
    raw = win_rate(outcome, resamples)
    controlled = length_controlled_win_rate(outcome, length_differences(lengths_a, lengths_b), resamples)
    assert raw.value == pytest.approx(0.5, abs=0.05)  # as many shorter as longer replies
    assert controlled.value == pytest.approx(0.5, abs=0.05)
    # Shift the challenger's replies 10 tokens shorter: the raw win rate jumps, the controlled one does not.
    shorter = lengths_a - 10
    outcome = outcomes(-shorter.double(), score_b)
    raw = win_rate(outcome, resamples)
    controlled = length_controlled_win_rate(outcome, length_differences(shorter, lengths_b), resamples)
    assert raw.value > 0.65 and controlled.value == pytest.approx(0.5, abs=0.08)
    assert controlled.low < 0.5 < controlled.high


def test_length_control_keeps_a_win_that_is_not_length():
    generator = torch.Generator().manual_seed(1)
    lengths_a = torch.randint(5, 50, (100, 2), generator=generator)
    lengths_b = torch.randint(5, 50, (100, 2), generator=generator)
    outcome = outcomes(torch.ones(100, 2), torch.zeros(100, 2))  # always better, whatever the length
    controlled = length_controlled_win_rate(outcome, length_differences(lengths_a, lengths_b), prompt_resamples(100, 100))
    assert controlled.value > 0.999


def test_matched_length_win_rate_keeps_only_replies_of_about_the_same_length():
    outcome = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # (2 prompts, 1, 2)
    lengths_a = torch.tensor([[20], [10]])
    lengths_b = torch.tensor([[21, 40], [30, 10]])
    estimate = matched_length_win_rate(outcome, lengths_a, lengths_b, prompt_resamples(2, 100))
    # Matched: (20, 21) won, (10, 10) won; (20, 40) and (10, 30) are left out.
    assert estimate.value == 1.0 and estimate.count == 2
    none = matched_length_win_rate(outcome, torch.tensor([[100], [100]]), lengths_b, prompt_resamples(2, 100))
    assert none.count == 0 and math.isnan(none.value)


def test_judge_agreement():
    a = torch.tensor([1.0, 0.0, 1.0, 0.5])
    b = torch.tensor([1.0, 1.0, 1.0, 0.5])
    c = torch.tensor([1.0, 0.0, 0.0, 0.5])
    agreement = judge_agreement([a, b, c])
    assert agreement["all_agree"] == pytest.approx(2 / 4)
    assert agreement["pairwise"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 4) / 3)
    assert math.isnan(judge_agreement([a])["all_agree"])


def test_correlation():
    assert correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(correlation(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))


def test_estimate_reads_as_an_interval_and_flat_metrics():
    estimate = Estimate(0.534, 0.49, 0.571, 800)
    assert estimate.describe() == "0.53 [0.49, 0.57]"
    assert estimate.as_metrics("x") == {"x": 0.534, "x_low": 0.49, "x_high": 0.571, "x_n": 800}


def test_reply_statistics_show_early_stops_cuts_and_stock_replies():
    texts = ["I'm sorry.", "i'm sorry!", "I don't know", "Sure, here is a long answer that was cut"]
    tokens = [[1, 2], [1, 2], [3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13]]
    lengths = torch.tensor([3, 3, 4, 8])
    has_eos = torch.tensor([True, True, True, False])
    stats = reply_statistics(lengths, has_eos, tokens, texts, limit=8)
    assert stats["eos_share"] == 0.75 and stats["cut_share"] == 0.25
    assert stats["length_median"] == 3.0 and stats["length_mean"] == 4.5
    assert stats["repeated_share"] == 0.5
    assert stats["top_replies"] == [["i'm sorry", 0.5]]
    assert stats["distinct_1"] == pytest.approx(13 / 15)
    assert stats["distinct_2"] == pytest.approx(10 / 11)  # (1,2) twice among 11 bigrams


def test_distinct_n_and_normalized_reply():
    assert distinct_n([[1, 1, 1]], 1) == pytest.approx(1 / 3)
    assert math.isnan(distinct_n([[1]], 2))
    assert normalized_reply("  I'm SORRY, I can\u2019t!! ") == "i'm sorry i can't"


def verdict_metrics(**updates):
    metrics = {
        "judges": ["judge-0", "judge-1", "judge-2"],
        "response_length": 48,
        "null_replies": [["i_don_t_know", "I don't know."], ["empty", ""]],
        "ppo_vs_sft/reward_sampled/win_rate": 0.87,
        "ppo_vs_sft/reward/win_rate": 0.50,
        "ppo_vs_sft/judges/lc_win_rate": 0.53, "ppo_vs_sft/judges/lc_win_rate_low": 0.49, "ppo_vs_sft/judges/lc_win_rate_high": 0.57,
        "ppo_vs_sft/judges/win_rate": 0.46, "ppo_vs_sft/judges/win_rate_low": 0.42, "ppo_vs_sft/judges/win_rate_high": 0.50,
        "ppo_vs_sft/judges/all_agree": 0.2,
        "accuracy/reward": 0.60, "accuracy/reward_low": 0.57, "accuracy/reward_high": 0.63, "accuracy/pairs": 311,
        "accuracy/shorter_wins": 0.598, "accuracy/reward/longer_chosen": 0.47,
        "accuracy/judge-0": 0.58, "accuracy/judge-1": 0.61, "accuracy/judge-2": 0.60, "accuracy/judges": 0.62,
        "null/i_don_t_know/vs_ppo/reward_sampled/win_rate": 0.78, "null/i_don_t_know/vs_ppo/judges/win_rate": 0.40,
        "null/empty/vs_ppo/reward_sampled/win_rate": 0.30, "null/empty/vs_ppo/judges/win_rate": 0.20,
        "sft/length_median": 38, "sft/eos_share": 0.6, "sft/cut_share": 0.4, "sft/repeated_share": 0.02, "sft/top_replies": [],
        "ppo/length_median": 12, "ppo/eos_share": 1.0, "ppo/cut_share": 0.0, "ppo/repeated_share": 0.21,
        "ppo/top_replies": [["i'm not sure", 0.09]],
    }
    metrics.update(updates)
    return metrics


def test_the_verdict_says_no_clear_win_evasion_and_length_in_plain_words():
    lines = verdict_lines(verdict_metrics(), baseline="sft", challengers=["ppo"])
    assert lines[0] == (
        "PPO vs SFT at equal length: 0.53 [0.49, 0.57] by 3 held-out judges — no clear win (raw 0.46 [0.42, 0.50]; "
        "all 3 judges agree on 20% of comparisons; 0.87 by the reward model it was trained on; 0.50 once replies cut "
        "at the length limit are scored complete)."
    )
    assert "it has learned little beyond length" in lines[1] and "0.60 [0.57, 0.63]" in lines[1]
    assert "'the shorter reply wins' scores 0.60" in lines[1] and "Judges: 0.58–0.61, together 0.62" in lines[1]
    assert "right 47% of the time: below chance" in lines[1]
    assert lines[2] == ("A constant \"I don't know.\" outscores PPO's replies 78% of the time by the reward model "
                        "(40% by the judges): the reward model rewards evasion.")
    assert "PPO: median 12 tokens, 100% end with EOS" in lines[3] and "(most often \"i'm not sure\", 9%)" in lines[3]
    assert "SFT: median 38 tokens, 60% end with EOS (40% cut at the 48-token limit)" in lines[3]


def test_the_verdict_calls_a_win_only_when_the_interval_clears_a_half():
    win = verdict_metrics(**{"ppo_vs_sft/judges/lc_win_rate": 0.70, "ppo_vs_sft/judges/lc_win_rate_low": 0.65,
                             "ppo_vs_sft/judges/lc_win_rate_high": 0.75, "accuracy/reward": 0.66, "accuracy/reward_low": 0.63,
                             "null/i_don_t_know/vs_ppo/reward_sampled/win_rate": 0.31})
    lines = verdict_lines(win, baseline="sft", challengers=["ppo"])
    assert "0.70 [0.65, 0.75] by 3 held-out judges — a win" in lines[0]
    assert "it has learned more than length (+6 points)" in lines[1]
    assert lines[2] == ("No fixed reply beats PPO's replies more than half the time by the reward model "
                        "(best: \"I don't know.\" at 31%; 40% by the judges).")


def test_the_verdict_names_the_fixed_reply_the_judges_prefer_when_it_is_another():
    empty_wins = verdict_metrics(**{"null/empty/vs_ppo/judges/win_rate": 0.99})
    assert verdict_lines(empty_wins, baseline="sft", challengers=["ppo"])[2] == (
        "A constant \"I don't know.\" outscores PPO's replies 78% of the time by the reward model (40% by the judges): "
        "the reward model rewards evasion; by the judges an empty reply does (99%): they reward such replies too, "
        "so read their equal-length figure, not their raw one.")


def test_the_verdict_warns_when_the_policy_collapses_onto_stock_replies():
    collapsed = verdict_metrics(**{"ppo/repeated_share": 0.5, "ppo/top_replies": [["i'm sorry i'm sorry", 0.17]]})
    line = verdict_lines(collapsed, baseline="sft", challengers=["ppo"])[0]
    assert line.endswith("Beware: 50% of PPO's replies repeat another word for word (most often \"i'm sorry i'm sorry\"): "
                         "where the judges share the reward model's taste for a stock reply, they reward it too.")
    assert "Beware" not in verdict_lines(verdict_metrics(), baseline="sft", challengers=["ppo"])[0]  # 21%: below the mark


def test_without_judges_the_verdict_says_it_cannot_tell():
    metrics = verdict_metrics(judges=[], **{"ppo_vs_sft/reward/lc_win_rate": 0.8})
    lines = verdict_lines(metrics, baseline="sft", challengers=["ppo"])
    assert "by the reward model PPO was trained on" in lines[0] and "add a `judges` section" in lines[0]


def test_with_dpo_beside_ppo_the_verdict_compares_each_with_sft_then_ppo_with_dpo_and_names_what_each_trained_on():
    def pair(prefix, lc, low, high):
        return {f"{prefix}/reward_sampled/win_rate": 0.7, f"{prefix}/judges/lc_win_rate": lc,
                f"{prefix}/judges/lc_win_rate_low": low, f"{prefix}/judges/lc_win_rate_high": high}

    metrics = verdict_metrics(**pair("dpo_vs_sft", 0.58, 0.53, 0.62), **pair("ppo_vs_dpo", 0.40, 0.33, 0.46),
                              **{"dpo/length_median": 28, "dpo/eos_share": 0.85})
    lines = verdict_lines(metrics, baseline="sft", challengers=["dpo", "ppo"])
    assert lines[0].startswith("DPO vs SFT at equal length: 0.58 [0.53, 0.62] by 3 held-out judges — a win")
    assert "0.70 by the reward model, which DPO never trained against" in lines[0]
    assert lines[1].startswith("PPO vs SFT at equal length: 0.53 [0.49, 0.57]") and "the reward model it was trained on" in lines[1]
    assert lines[2].startswith("PPO vs DPO at equal length: 0.40 [0.33, 0.46] by 3 held-out judges — a loss")
    assert lines[-1].startswith("Replies — SFT: median 38 tokens") and "; DPO: median 28 tokens" in lines[-1]
    # Without judges DPO's line does not call the reward model its training signal.
    alone = verdict_lines(verdict_metrics(judges=[], **{"dpo_vs_sft/reward/lc_win_rate": 0.6}), baseline="sft", challengers=["dpo"])
    assert alone[0] == "DPO vs SFT at equal length: 0.60 by the reward model, which DPO never trained against (add a `judges` section for held-out judges)."
