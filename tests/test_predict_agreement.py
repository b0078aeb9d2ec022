"""The agreement rule (predict.agree): two sources that ran must give the same PCR4/PCR7."""

import pytest

from rhel_cvm_update.boot_events import PlannedEvent, Prediction
from rhel_cvm_update.errors import PredictionError, SourcesDisagreeError
from rhel_cvm_update.predict import SourceRun, agree


def prediction(source, pcr7_event=b"\x07" * 32):
    events = (PlannedEvent(4, 0x80000003, {"sha256": b"\x04" * 32}, f"{source}: shim", "shim"),
              PlannedEvent(7, 0x800000E0, {"sha256": pcr7_event}, f"{source}: db entry", "db authority"))
    values = {"sha256": {4: b"\x44" * 32, 7: pcr7_event}}
    return Prediction(source, "uki.efi", "shim.efi", values, events)


def test_agreeing_sources_give_the_log_prediction_with_both_answers():
    result = agree({"log": SourceRun(prediction("log")), "model": SourceRun(prediction("model"))})
    assert result.source == "log" and result.agreed is True
    doc = result.to_json()
    assert doc["agreed"] is True and doc["sources"]["model"]["ran"] and doc["sources"]["log"]["pcr7"] == "07" * 32


def test_disagreeing_sources_name_both_values_and_the_first_differing_event():
    with pytest.raises(SourcesDisagreeError) as err:
        agree({"log": SourceRun(prediction("log")), "model": SourceRun(prediction("model", b"\x08" * 32))})
    text = str(err.value).splitlines()[0]
    assert f"log PCR4 {'44' * 32} PCR7 {'07' * 32}" in text and f"model PCR4 {'44' * 32} PCR7 {'08' * 32}" in text
    assert "first differing event: PCR7 event 1: log has db authority 0707" in text
    assert err.value.exit_code == 2


def test_one_source_that_cannot_run_is_noted():
    result = agree({"log": SourceRun(prediction("log")),
                    "model": SourceRun(error=PredictionError("no BootCurrent"))})
    assert result.agreed is None and result.sources["model"] == {"ran": False, "pcr4": None, "pcr7": None,
                                                                  "error": "no BootCurrent"}
    assert any("only the log source could run" in n and "no BootCurrent" in n for n in result.notes)


def test_a_log_that_cannot_run_is_noted_as_not_used():
    result = agree({"log": SourceRun(error=PredictionError("PCR4 does not replay")),
                    "model": SourceRun(prediction("model"))})
    assert result.source == "model"
    assert any("event log was not used: PCR4 does not replay" in n for n in result.notes)


def test_neither_source_lists_both_errors():
    with pytest.raises(PredictionError, match="neither source") as err:
        agree({"log": SourceRun(error=PredictionError("a")), "model": SourceRun(error=PredictionError("b"))})
    assert err.value.details == ["event log: a", "model: b"]
