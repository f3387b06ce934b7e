"""The book's one interval formatter."""

from fastmem import report


def test_interval_text_uses_the_same_decimals_for_both_bounds():
    assert report.interval_text(0.1234, 0.5) == "[0.123, 0.500]"
    assert report.interval_text(-1.5, 2.25, 2, signed=True) == "[-1.50, +2.25]"
    assert report.interval_text(3.6e-4, 7.2e-1, 1, scientific=True) == "[3.6e-04, 7.2e-01]"


def test_estimate_text_puts_the_unit_after_the_estimate():
    assert report.estimate_text(16.5, 15.0, 17.9, 1, signed=True, unit="%") == "+16.5% [+15.0, +17.9]"
    assert report.estimate_text(0.5, 0.4, 0.6, 2) == "0.50 [0.40, 0.60]"


def test_missing_values_read_as_not_available():
    assert report.number_text(float("nan")) == "n/a"
    assert report.interval_text(float("nan"), float("nan")) == "[n/a, n/a]"


def test_html_table_is_deterministic_wraps_and_hides_a_meaningless_index():
    import pandas as pd

    frame = pd.DataFrame({"row": ["a"], "rate": [0.12345]})
    html = report.html_table(frame, "tfixed", "Table: x").to_html()
    assert html == report.html_table(frame, "tfixed", "Table: x").to_html()
    assert 'id="T_tfixed"' in html and "0.123" in html and "white-space: normal" in html
    assert "Table: x" in html and "row_heading" not in html
    assert "row_heading" in report.html_table(frame, "tfixed", index=True).to_html()


def test_estimate_table_writes_one_cell_per_estimate_and_marks_missing_ones():
    estimates = {("seen", "gated", "read"): (0.5, 0.4, 0.6)}
    table = report.estimate_table(estimates, [("gated", ("seen", "gated")), ("none", ("seen", "none"))],
                                  {"read": "Read"})
    assert table.to_dict("records") == [{"row": "gated", "Read": "0.500 [0.400, 0.600]"},
                                        {"row": "none", "Read": "-"}]
