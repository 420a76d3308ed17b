"""Tests of the memory and step-time estimate printed before CPU training."""

import logging

from configs import giant
from lasegjax.estimates import estimate, log_estimate
from lasegjax.model.segmenter import build_model


def small_giant_config():
    config = giant.get_config()
    config.model.encoder.depth = 2
    config.data.image_size = (56, 56)
    config.train.batch_size = 2
    return config


def test_estimate_giant_reports_positive_figures():
    config = small_giant_config()
    result = estimate(config, build_model(config.model))
    assert result["memory_gib"] > 0
    assert result["step_seconds"] > 0
    assert result["trainable"] < result["parameters"]


def test_log_estimate_giant_on_cpu_warns(caplog):
    config = small_giant_config()
    with caplog.at_level(logging.WARNING):
        log_estimate(config, build_model(config.model))
    assert "Running the giant encoder on a CPU" in caplog.text
    assert "GiB of memory" in caplog.text
