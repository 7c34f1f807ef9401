"""The first poll of a prediction waits until most recent ones had ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from provider_fixtures import wait_for_status

from imageopt.pipeline import PredictionTiming
from imageopt.provider import Prediction, PredictionStatus

CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def ended_after(seconds: float) -> Prediction:
    return Prediction(
        id=f"p{seconds}",
        status=PredictionStatus.SUCCEEDED,
        created_at=CREATED,
        completed_at=CREATED + timedelta(seconds=seconds),
    )


def test_before_any_prediction_has_ended_the_first_poll_is_at_once():
    assert PredictionTiming().expected() == 0.0


def test_the_first_poll_waits_for_nine_in_ten_recent_predictions():
    timing = PredictionTiming()
    for seconds in range(1, 11):
        timing.observe(ended_after(seconds))

    # 1 to 10 s: nine of the ten had ended by 9 s, eight by 8 s.
    assert timing.expected() == 9.0


def test_only_recent_predictions_count():
    timing = PredictionTiming(keep=20)
    for _ in range(20):
        timing.observe(ended_after(30))
    for _ in range(20):
        timing.observe(ended_after(2))

    assert timing.expected() == 2.0


def test_a_stuck_model_does_not_hold_polls_back_past_the_ceiling():
    timing = PredictionTiming(ceiling=60)
    timing.observe(ended_after(600))

    assert timing.expected() == 60.0


def test_predictions_without_both_times_are_left_out():
    timing = PredictionTiming()
    timing.observe(Prediction(id="p", status=PredictionStatus.FAILED))
    timing.observe(ended_after(4))

    assert timing.expected() == 4.0


def test_one_poll_at_a_time_scouts_while_nothing_is_known():
    timing = PredictionTiming()

    first, second = timing.take_scout(), timing.take_scout()
    timing.end_scout()
    third = timing.take_scout()

    assert (first, second, third) == (True, False, True)


def test_nobody_scouts_once_a_duration_is_known():
    timing = PredictionTiming()
    timing.observe(ended_after(3))

    assert timing.wait_known(0) and not timing.take_scout()


def test_a_run_learns_the_timing_from_the_providers_recent_successes(
    provider_server, image_server
):
    server = provider_server("--allow-private-urls", "--latency", "1.5")
    client = server.client()
    image = {"image": image_server.sample_url("rocket.jpg"), "format": "webp"}
    made = [client.create(image).id for _ in range(3)]
    for prediction_id in made:
        wait_for_status(client, prediction_id)
    # Still running when listed: no duration to learn from it.
    client.create(image)
    timing = PredictionTiming()

    timing.learn(client.recent_successes())

    assert 1.5 <= timing.expected() < 3.0
