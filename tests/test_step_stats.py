"""StepStats.summary: the median step time every method reports (plan_check reads it)."""

from __future__ import annotations

from cotune.training.loop import StepStats


def test_summary_reports_the_lower_median_step_time_like_the_split_device() -> None:
    stats = StepStats()
    assert "step_s_median" not in stats.summary()  # no step: no figure
    stats.step_times.extend([0.9, 0.2, 0.4, 0.3])
    # torch's median of an even count is the lower middle value, as the split device's
    assert stats.summary()["step_s_median"] == 0.3
    stats.step_times.append(0.5)
    assert stats.summary()["step_s_median"] == 0.4
