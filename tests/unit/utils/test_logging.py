"""The deepscale logger propagates to the application's logging and never prints a line twice."""
import logging

from deepscale.utils.logging import logger


def _without_root_handlers(monkeypatch):
    # Called inside the test body: pytest attaches its capture handlers to the root logger
    # after fixtures run.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_logger_propagates_to_the_root_logger():
    assert logger.propagate is True and logger.name == "deepscale"


def test_default_handler_prints_once_when_the_application_configured_nothing(monkeypatch, capsys):
    _without_root_handlers(monkeypatch)
    logger.info("engine says hello")
    captured = capsys.readouterr()
    assert captured.out.count("engine says hello") == 1 and "[INFO] [deepscale]" in captured.out
    assert "engine says hello" not in captured.err  # no last-resort handler copy either


def test_application_handlers_receive_records_and_the_default_stays_silent(monkeypatch, capsys):
    _without_root_handlers(monkeypatch)
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger()
    root.addHandler(Collect())
    logger.warning("a warning for the app")
    assert records == ["a warning for the app"]
    assert "a warning for the app" not in capsys.readouterr().out


def test_caplog_sees_deepscale_records(caplog):
    with caplog.at_level(logging.INFO, logger="deepscale"):
        logger.info("visible to caplog")
    assert [r.getMessage() for r in caplog.records if r.name == "deepscale"] == ["visible to caplog"]
