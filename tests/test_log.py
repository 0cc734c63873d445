"""The one per-epoch line, and the CLI's log handler."""

import logging

from locallearn import log


def test_the_epoch_line_labels_every_stage_loss_and_shows_accuracy_and_speed():
    row = {"epoch": 3, "train_loss": [1.2341, 0.98749], "final_acc": 81.2,
           "samples_per_s": 1234.4, "epoch_seconds": 12.34}
    assert (log.epoch_line(row, epochs=10)
            == "epoch 3/10 | loss s1 1.234 s2 0.987 | test acc 81.20% | 1234 img/s | 12.3 s")


def test_the_epoch_line_copes_with_an_epoch_without_evaluation_and_untrained_stages():
    row = {"epoch": 1, "train_loss": [float("nan"), 0.5], "final_acc": None}
    assert log.epoch_line(row, unit="samples/s") == "epoch 1 | loss s1 - s2 0.500"


def test_setup_adds_one_handler_however_often_it_is_called(capsys):
    log.setup()
    log.setup()
    ours = [h for h in log.logger.handlers if isinstance(h, log._TqdmHandler)]
    assert len(ours) == 1
    log.logger.info("hello %s", "there")
    assert capsys.readouterr().err == "hello there\n"
    log.logger.setLevel(logging.NOTSET)


def test_records_still_reach_other_handlers_after_setup(caplog):
    log.setup()
    with caplog.at_level(logging.INFO, logger="locallearn"):
        log.logger.info("seen by pytest too")
    assert "seen by pytest too" in caplog.text
